"""Real users' model shapes (issue 14), each on a small model of our own, with its right value:

* normalisations after a layer: a BatchNorm after Linear/Conv1d/ConvTranspose folds (weight axis 1 of a
  transposed conv) and its gain is in L; any other normalisation is named in one warning;
* multi-input models: a tuple of example inputs works where it can, a one-line refusal naming the
  inputs elsewhere, and a pair of tensors is never mistaken for (images, labels);
* the model's own forward errors keep their message and get a fix that fits them;
* coverage: a layer called twice costs twice, a weight used through F.linear is named, a tied weight
  costs its bits once and its MACs at every use;
* every function that runs a model gives it back in its own mode, BatchNorm statistics untouched.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from aq_brevitas.errors import ConfigError, ModelError
from aq_brevitas.folding import find_conv_bn_pairs, fold_batchnorm, folded_weight, norm_folding
from aq_brevitas.forward import (
    as_xy,
    check_forward,
    example_args,
    forward_arity,
    iter_x_batches,
    predicted_labels,
    require_single_input,
)
from aq_brevitas.nnutils import (
    layer_geometry,
    shared_weights,
    unquantized_weight_uses,
    warn_unsupported,
    weight_owners,
)
from aq_brevitas.policy import LayerSpec, LayerwisePolicy, cost_of
from aq_brevitas.score.jacobian import is_chain, local_jacobian_norm
from aq_brevitas.score.lipschitz import lipschitz_scores
from conftest import ConvBNDropNet, abs_map, fold_bound, gamma

torch.set_num_threads(1)


def _randomize(bn: nn.Module, gain: float = 1.0) -> None:
    """Running statistics and affine parameters far from the identity (a large gain on request)."""
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.05, 2)
        bn.weight.uniform_(0.5, 1.5).mul_(gain)
        bn.bias.uniform_(-1, 1)


def _dense_norm(fn, in_shape: tuple[int, ...]) -> float:
    """Largest singular value of the affine map ``fn`` (one sample, shape ``in_shape``), by a full SVD of
    its Jacobian: independent of folded_weight and of the power iteration."""
    jac = torch.autograd.functional.jacobian(fn, torch.zeros(1, *in_shape, dtype=torch.float64))
    n_in = torch.Size(in_shape).numel()
    return float(torch.linalg.svdvals(jac.reshape(-1, n_in))[0])


def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught]


# ---------------------------------------------------------------------------- normalisations (c)
class LinearBN(nn.Module):
    """Linear(bias=False) -> BatchNorm1d -> ReLU -> Linear: the MLP block of FINN users."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 6, bias=False)
        self.bn = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.bn(self.fc(x))))


def test_bn_after_linear_folds_and_its_gain_is_in_L():
    torch.manual_seed(0)
    model = LinearBN().eval()
    _randomize(model.bn, gain=8.0)
    assert find_conv_bn_pairs(model) == {"fc": "bn"}
    w, b = folded_weight(model.fc, model.bn)
    scale = model.bn.weight / torch.sqrt(model.bn.running_var + model.bn.eps)
    torch.testing.assert_close(w, scale[:, None] * model.fc.weight)  # the analytic fold
    torch.testing.assert_close(b, model.bn.bias - model.bn.running_mean * scale)

    scores = lipschitz_scores(model, torch.randn(5, 12), gains=("spectral",))
    s = scores["fc"]
    assert s.bn == "bn"
    folded_norm = float(torch.linalg.svdvals(w.double())[0])
    assert s.L == pytest.approx(folded_norm, rel=1e-9)  # the folded map's norm
    assert s.L > 2 * float(torch.linalg.svdvals(model.fc.weight.detach().double())[0])  # not ‖W‖
    m64 = copy.deepcopy(model).double()
    assert s.L == pytest.approx(_dense_norm(lambda x: m64.bn(m64.fc(x)), (12,)), rel=1e-6)  # float32 fold

    folded = copy.deepcopy(model)
    x = torch.randn(7, 12)
    (pairs, msgs) = _caught(lambda: fold_batchnorm(folded))
    assert pairs == {"fc": "bn"} and isinstance(folded.bn, nn.Identity) and not msgs
    # the fold's error after the ReLU (1-Lipschitz), through out: |W_out|·e, plus out's own dot product
    # (6 products and the bias) on each side's hidden values h
    e = fold_bound(model.fc, model.bn, x)
    with torch.no_grad():
        h = F.relu(model.bn(model.fc(x)))
    bound = abs_map(model.out, e) + 2 * gamma(7) * (
        abs_map(model.out, h.double() + e) + model.out.bias.double().abs()
    )
    assert ((folded(x) - model(x)).abs() <= bound).all()


class Block(nn.Module):
    """layer -> BatchNorm -> ReLU for one layer kind (per-sample input shape ``shape``)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.layer, self.bn, self.shape = {
            "conv1d": (nn.Conv1d(3, 4, 3, padding=1), nn.BatchNorm1d(4), (3, 7)),
            "convT1d": (nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2), nn.BatchNorm1d(6), (4, 5)),
            "convT2d": (nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6), (4, 3, 3)),
        }[kind]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.layer(x)))


@pytest.mark.parametrize("kind", ["conv1d", "convT1d", "convT2d"])
def test_bn_folds_into_conv1d_and_transposed_convs_per_output_channel(kind):
    torch.manual_seed(1)
    model = Block(kind).eval()
    _randomize(model.bn, gain=3.0)
    x = torch.randn(4, *model.shape)
    folded = copy.deepcopy(model)
    assert fold_batchnorm(folded) == {"layer": "bn"}
    # out channels: axis 1 if transposed
    assert ((folded(x) - model(x)).abs() <= fold_bound(model.layer, model.bn, x)).all()
    if kind == "convT2d":  # a quantizable layer: L is the folded map's norm
        s = lipschitz_scores(model, x, gains=())["layer"]
        m64 = copy.deepcopy(model).double()
        assert s.bn == "bn"
        assert s.L == pytest.approx(_dense_norm(lambda v: m64.bn(m64.layer(v)), model.shape), rel=1e-5)


class NormsThatDoNotFold(nn.Module):
    """A BatchNorm after a ReLU, a LayerNorm after a Linear, and a BatchNorm without running stats."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.late_bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.fc3 = nn.Linear(8, 8)
        self.live_bn = nn.BatchNorm1d(8, track_running_stats=False)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.late_bn(F.relu(self.fc1(x)))
        x = self.ln(self.fc2(x))
        return self.out(self.live_bn(self.fc3(x)))


def test_normalisations_that_do_not_fold_are_named_in_one_warning():
    model = NormsThatDoNotFold()
    folding = norm_folding(model)
    assert folding.pairs == {}
    assert set(folding.unfolded) == {"late_bn", "ln", "live_bn"}
    assert "relu" in folding.unfolded["late_bn"]
    assert "LayerNorm" in folding.unfolded["ln"] and "running statistics" in folding.unfolded["live_bn"]
    assert folding.after == {"ln": "fc2", "live_bn": "fc3"}

    folded = copy.deepcopy(model)
    pairs, msgs = _caught(lambda: fold_batchnorm(folded))  # no crash on the stat-less BatchNorm
    assert pairs == {}
    (msg,) = [m for m in msgs if m.startswith("BatchNorm folding leaves")]
    assert "\n" not in msg and all(n in msg for n in ("late_bn", "ln (", "live_bn"))

    _, msgs = _caught(lambda: lipschitz_scores(model, torch.randn(4, 8), gains=()))
    (msg,) = [m for m in msgs if m.startswith("L of these layers leaves out")]
    assert "fc2 (ln" in msg and "fc3 (live_bn" in msg and "late_bn" not in msg


class SeqLinearBN(nn.Module):
    """Linear on (N, L, C) then BatchNorm1d(C) with L == C: it normalises dim 1 (L), not the features."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 4)
        self.bn = nn.BatchNorm1d(4)
        self.out = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.bn(self.fc(x)).flatten(1))


def test_bn_on_a_linear_with_a_sequence_output_is_not_folded_when_shapes_are_known():
    model = SeqLinearBN().eval()
    _randomize(model.bn)
    x = torch.randn(3, 4, 5)
    scores, msgs = _caught(lambda: lipschitz_scores(model, x, gains=()))
    assert scores["fc"].bn is None and any("normalises dim 1 of fc's (4, 4) output" in m for m in msgs)
    folded = copy.deepcopy(model)
    _, msgs = _caught(lambda: fold_batchnorm(folded, x[:1]))
    assert isinstance(folded.bn, nn.BatchNorm1d) and any("bn (it normalises dim 1 of fc" in m for m in msgs)
    torch.testing.assert_close(folded(x), model(x))


def test_a_norm_shared_by_two_places_is_not_folded():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4, bias=False)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(self.fc(x)) + self.bn(x)  # the second call does not follow fc

    assert find_conv_bn_pairs(Twice()) == {}
    assert "something else" in norm_folding(Twice()).unfolded["bn"]


# -------------------------------------------------------------------------------- multi-input (i)
class TwoIn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, stride=2, padding=1)
        self.side = nn.Linear(3, 4)
        self.fc = nn.Linear(2 * 4 * 4 + 4, 5)

    def forward(self, img: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.conv(img)).flatten(1)
        return self.fc(torch.cat([a, F.relu(self.side(vec))], 1))


class OptionalMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x, mask=None):
        return self.fc(x if mask is None else x * mask)


def _two_inputs(n: int = 6):
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=gen), torch.rand(n, 3, generator=gen)


def test_forward_signature_tells_inputs_from_labels():
    assert forward_arity(TwoIn()) == 2 and forward_arity(OptionalMask()) == 1
    assert forward_arity(nn.Sequential(nn.Linear(2, 2))) == 1
    img, vec = _two_inputs()
    assert example_args(TwoIn(), (img, vec)) == (img, vec)
    assert example_args(OptionalMask(), (vec[:, :1].expand(-1, 4), torch.ones(6, 4)))[1].shape == (6, 4)
    with pytest.raises(
        ModelError, match=r"takes 2 inputs \(img, vec\), but example inputs is a single tensor"
    ):
        example_args(TwoIn(), img)
    with pytest.raises(ModelError, match="a tuple of 3 tensors"):
        check_forward(TwoIn(), (img, vec, vec))
    with pytest.raises(ConfigError, match="different batch sizes"):
        example_args(TwoIn(), (img, vec[:2]))
    labels = torch.randint(0, 5, (6,))
    with pytest.raises(ModelError, match="takes 1 input"):  # (x, y) is no tuple of inputs for one input
        layer_geometry(nn.Sequential(nn.Flatten(), nn.Linear(64, 5)), (img, labels))


def test_two_input_model_scores_geometry_and_cost():
    torch.manual_seed(0)
    model = TwoIn().eval()
    img, vec = _two_inputs()
    scores, _ = _caught(lambda: lipschitz_scores(model, (img, vec)))
    assert list(scores) == ["conv", "side", "fc"]
    assert scores["side"].input_shape == (3,) and scores["side"].macs == 12
    assert scores["side"].L == pytest.approx(
        float(torch.linalg.svdvals(model.side.weight.detach().double())[0])
    )
    assert scores["side"].A == pytest.approx(float(vec.double().norm(dim=1).mean()))
    assert all(s.gain_jacobian is not None and s.gain_jacobian > 0 for s in scores.values())
    assert not is_chain(model, (img, vec))
    geo, _ = _caught(lambda: layer_geometry(model, (img[:1], vec[:1])))
    assert {n: g.macs for n, g in geo.items()} == {"conv": 2 * 16 * 9, "side": 12, "fc": 36 * 5}
    policy = LayerwisePolicy(default=LayerSpec(4, act_bit_width=8))
    cost, _ = _caught(lambda: policy.cost(model, (img[:1], vec[:1])))
    assert cost.bops == sum(g.macs for g in geo.values()) * 4 * 8
    assert model.training is False
    with pytest.raises(ModelError, match=r"TwoIn.forward takes 2 inputs \(img, vec\)"):
        lipschitz_scores(model, img)
    with pytest.raises(ModelError, match="local_jacobian_norm takes single-input models"):
        local_jacobian_norm(model, img)


def test_a_pair_for_a_two_input_model_is_never_read_as_images_and_labels():
    model = TwoIn()
    img, vec = _two_inputs()
    for data in ((img, vec), (img, torch.randint(0, 5, (6,)))):
        with pytest.raises(ModelError, match=r"calibration data takes single-input models, and TwoIn"):
            as_xy(data, model=model, name="calibration data")
    with pytest.raises(ModelError, match="accuracy takes single-input models"):
        require_single_input(model, "accuracy")
    x, y = as_xy((img, torch.randint(0, 5, (6,))), model=nn.Sequential(nn.Flatten(), nn.Linear(64, 5)))
    assert x.shape == (6, 1, 8, 8) and y.shape == (6,)


def test_input_tuples_stream_for_a_multi_input_model():
    model = TwoIn()
    img, vec = _two_inputs(7)
    labels = torch.randint(0, 5, (7,))
    for data in ((img, vec), (img, vec, labels), TensorDataset(img, vec, labels)):
        batches = list(iter_x_batches(data, batch_size=4, model=model))
        assert [tuple(t.shape[0] for t in b) for b in batches] == [(4, 4), (3, 3)]
        torch.testing.assert_close(torch.cat([b[1] for b in batches]), vec)
    loader = DataLoader(TensorDataset(img, vec, labels), batch_size=5)
    assert len(list(iter_x_batches(loader, model=model, limit_batches=1))) == 1
    assert all(model(*b).shape[1] == 5 for b in iter_x_batches(loader, model=model))
    with pytest.raises(ConfigError, match="1 tensors for a model of 2 inputs"):
        list(iter_x_batches([img], model=model))
    with pytest.raises(ConfigError, match="batch 0 is not a tuple of 2 inputs"):
        list(iter_x_batches(iter([img]), model=model))  # a stream of bare tensors: no inputs tuple


# ---------------------------------------------------------------------------------- forward errors (j)
class Raises(nn.Module):
    def __init__(self, exc: Exception) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.exc = exc

    def forward(self, x):
        raise self.exc


def _entry_points(model, x):
    policy = LayerwisePolicy(default=LayerSpec(8))
    return {
        "check_forward": lambda: check_forward(model, x),
        "layer_geometry": lambda: layer_geometry(model, x),
        "lipschitz_scores": lambda: lipschitz_scores(model, x),
        "policy.cost": lambda: policy.cost(model, x),
        "as_xy": lambda: as_xy(x, model=model),
    }


SHAPE = (nn.Linear(4, 2), torch.rand(3, 5), "RuntimeError on inputs of shape (3, 5): mat1 and mat2 shapes")
DTYPE = (
    nn.Linear(4, 2),
    torch.rand(3, 4).double(),
    "RuntimeError on inputs of shape (3, 4): mat1 and mat2 must",
)
OTHER = (
    Raises(ValueError("labels must be sorted\nline 2")),
    torch.rand(3, 4),
    "ValueError on inputs of shape (3, 4)",
)
KEY = (Raises(KeyError("head")), torch.rand(3, 4), "KeyError on inputs of shape (3, 4): 'head'")


@pytest.mark.parametrize(
    "model, x, expect, fix",
    [
        (*SHAPE, "shape the model expects"),
        (*DTYPE, "dtype of the model's weights"),
        (*OTHER, "raised ValueError: fix the model or its inputs"),
        (*KEY, "raised KeyError: fix the model"),
    ],
    ids=["shape", "dtype", "other", "keyerror"],
)
def test_forward_errors_keep_their_message_and_get_a_fitting_fix(model, x, expect, fix):
    for name, call in _entry_points(model, x).items():
        with pytest.raises(ModelError) as info:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                call()
        msg = str(info.value)
        assert "\n" not in msg and "on inputs of shape (" in msg, (name, msg)
        assert expect in msg.replace("(1, ", "(3, ") and fix in info.value.fix, (
            name,
            msg,
        )  # (1, ...): one sample
        if "shape" not in fix:
            assert "shape the model expects" not in info.value.fix, (name, msg)


# -------------------------------------------------------------------------------------- coverage (k)
class CalledTwice(nn.Module):
    """One Linear applied twice (weights shared in time), one conv at two resolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(2 * 8 * 8 + 2 * 4 * 4 + 6, 3)

    def forward(self, x):
        big, small = self.conv(x).flatten(1), self.conv(F.avg_pool2d(x, 2)).flatten(1)
        h = self.fc(F.relu(self.fc(x[:, 0, 0, :6])))
        return self.head(torch.cat([big, small, h], 1))


def test_a_layer_called_twice_costs_every_call():
    model = CalledTwice()
    x = torch.rand(2, 1, 8, 8)
    geo, _ = _caught(lambda: layer_geometry(model, x))
    assert geo["fc"].calls == 2 and geo["fc"].macs == 2 * 36 and geo["fc"].params == 36
    assert geo["conv"].calls == 2 and geo["conv"].macs == 18 * (8 * 8 + 4 * 4)
    assert geo["conv"].input_shape == (1, 8, 8)  # shapes of the first call
    spec = LayerSpec(4, act_bit_width=8)
    cost = LayerwisePolicy(default=spec).cost(model, x[:1])
    assert cost.bops == (2 * 36 + 18 * 80 + geo["head"].macs) * 4 * 8
    assert cost.weight_bits == 4 * (36 + 18 + geo["head"].params)  # each weight stored once
    scores, msgs = _caught(lambda: lipschitz_scores(model, x, gains=()))
    assert scores["fc"].macs == 72 and scores["fc"].calls == 2 and scores["conv"].calls == 2
    (msg,) = [m for m in msgs if m.startswith("layers called more than once")]
    assert "conv (2 calls)" in msg and "fc (2 calls)" in msg and "counts every call" in msg


def test_a_module_under_two_names_costs_each_call_and_its_weight_once():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = self.a

        def forward(self, x):
            return self.b(self.a(x))

    geo = layer_geometry(Shared(), torch.rand(1, 4))
    assert list(geo) == ["a"] and geo["a"].calls == 2 and geo["a"].macs == 32 and geo["a"].params == 16


class Functional(nn.Module):
    """Weights used outside any quantizable layer: F.linear and @ on bare Parameters, fc's own weight
    through F.linear, and a buffer (not a weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.proj = nn.Parameter(torch.randn(4, 4))
        self.mix = nn.Parameter(torch.randn(4, 4))
        self.register_buffer("fixed", torch.eye(4))

    def forward(self, x):
        x = F.linear(self.fc(x), self.proj)
        x = x @ self.mix.t()
        return F.linear(x, self.fc.weight) @ self.fixed


def test_weights_used_outside_quantizable_layers_are_named_in_one_line():
    model = Functional()
    assert unquantized_weight_uses(model) == {
        "proj": "F.linear",
        "mix": "@",
        "fc.weight": "F.linear, outside fc",
    }
    _, msgs = _caught(lambda: warn_unsupported(model))
    (msg,) = msgs
    assert msg.startswith("these weights are used outside a quantizable layer")
    assert "proj (F.linear)" in msg and "mix (@)" in msg and "fixed" not in msg and "\n" not in msg
    geo, msgs = _caught(lambda: layer_geometry(model, torch.rand(1, 4)))
    assert any("proj (F.linear)" in m for m in msgs)
    assert geo["fc"].macs == 16  # the call through fc only: the F.linear use stays float
    assert unquantized_weight_uses(nn.Sequential(nn.Linear(2, 2))) == {}


def test_tied_weights_cost_their_bits_once_and_their_macs_at_every_use():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Linear(6, 6, bias=False)
            self.dec = nn.Linear(6, 6)
            self.dec.weight = self.enc.weight  # two modules, one Parameter
            self.out = nn.Linear(6, 2)

        def forward(self, x):
            return self.out(F.relu(self.dec(F.relu(self.enc(x)))))

    model = Tied()
    assert shared_weights(model) == {"enc": ("enc", "dec")}
    assert weight_owners(model) == {"enc": "enc", "dec": "enc"}
    geo = layer_geometry(model, torch.rand(1, 6))
    assert (geo["enc"].params, geo["dec"].params, geo["dec"].weight_of) == (36, 0, "enc")
    assert geo["dec"].macs == 36
    cost = cost_of({n: LayerSpec(4) for n in geo}, geo)
    assert cost.params == 36 + 12 and cost.weight_bits == 4 * 48 and cost.avg_weight_bits == 4
    assert cost.bops == (36 + 36 + 12) * 4 * 8
    scores = lipschitz_scores(model, torch.rand(3, 6), gains=())
    assert scores["dec"].params == 0 and scores["dec"].weight_of == "enc" and scores["enc"].params == 36


# ------------------------------------------------------------------------------------ modes kept (d)
def TrainModel() -> nn.Module:  # noqa: N802 -- reads as the model class it builds
    return ConvBNDropNet(3, 6, 4)


@pytest.mark.parametrize(
    "call",
    ["check_forward", "layer_geometry", "lipschitz_scores", "is_chain", "local_jacobian_norm",
     "predicted_labels", "as_xy", "policy.cost", "norm_folding"],
)  # fmt: skip
def test_functions_that_run_a_model_give_it_back_in_its_mode(call):
    torch.manual_seed(0)
    model = TrainModel().train()
    model.drop.eval()  # a mixed state must come back as it was, too
    _randomize(model.bn)
    before = copy.deepcopy(model.bn.state_dict())
    x = torch.rand(4, 1, 6, 6)
    run = {
        "check_forward": lambda: check_forward(model, x),
        "layer_geometry": lambda: layer_geometry(model, x),
        "lipschitz_scores": lambda: lipschitz_scores(model, x),
        "is_chain": lambda: is_chain(model, x),
        "local_jacobian_norm": lambda: local_jacobian_norm(model, x),
        "predicted_labels": lambda: predicted_labels(model, x),
        "as_xy": lambda: as_xy(x, model=model),
        "policy.cost": lambda: LayerwisePolicy(default=LayerSpec(4)).cost(model, x),
        "norm_folding": lambda: norm_folding(model, {"conv": (3, 6, 6)}),
    }[call]
    first, _ = _caught(run)
    again, _ = _caught(run)
    assert model.training and model.bn.training and model.conv.training and not model.drop.training
    for k, v in model.bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    if isinstance(first, torch.Tensor):  # deterministic: eval semantics, not dropout/batch stats
        assert torch.equal(first, again)
