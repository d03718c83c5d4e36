"""Issue 14 on quantize's data and on BatchNorm folding, each a right value on a small model of our own:

* (i) a model whose forward takes two inputs is calibrated on tuples of them, in every data form
  (tensors, tensors and labels, a list of batches, a DataLoader, a generator); at 8 bits its
  quantized outputs stay close to the float ones; each input's sign decides its layer's input
  quantizer; a wrong number of inputs is one line;
* a one-shot stream of calibration batches is read once, so no batch is lost to the sign check;
* folding a BatchNorm into a layer whose weight is tied to another layer gives the folded layer its
  own copy (the other layer keeps computing what it computed), named in one warning; a BatchNorm
  after a layer whose weight the forward also uses outside it is left unfolded, with its reason.
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
from aq_brevitas.folding import fold_batchnorm, norm_folding, parameter_holders, write_folded
from aq_brevitas.nnutils import shared_weights
from aq_brevitas.policy import LayerSpec, LayerwisePolicy
from aq_brevitas.quantization.calibrate import calibrate
from aq_brevitas.quantization.convert import quantize
from aq_brevitas.quantization.readback import input_signedness

torch.set_num_threads(1)

EIGHT_BITS = LayerwisePolicy(default=LayerSpec(8, act_bit_width=8))


def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught]


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and " -- fix: " in msg
    return msg


def _rel_error(q: torch.Tensor, f: torch.Tensor) -> float:
    return float((q - f).norm() / f.norm())


# ------------------------------------------------------------------------------- (i) two inputs
class Fuse(nn.Module):
    """An image branch (conv, non-negative after ReLU) and a signed side-vector branch, fused."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.side = nn.Linear(5, 6)
        self.head = nn.Linear(3 * 4 * 4 + 6, 4)

    def forward(self, image: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        a = F.avg_pool2d(F.relu(self.conv(image)), 2).flatten(1)
        return self.head(torch.cat([a, torch.tanh(self.side(side))], 1))


def _data(n: int = 64):
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=gen), torch.randn(n, 5, generator=gen)


def _forms(image, side):
    labels = torch.arange(len(image)) % 4
    return {
        "tuple": (image, side),
        "tuple+labels": (image, side, labels),
        "list of batches": [(image[:32], side[:32]), (image[32:], side[32:])],
        "loader": DataLoader(TensorDataset(image, side, labels), batch_size=16),
        "generator": ((image[i : i + 16], side[i : i + 16]) for i in range(0, len(image), 16)),
    }


@pytest.mark.parametrize("form", list(_forms(*_data())))
def test_a_two_input_model_is_calibrated_on_its_input_tuples_and_stays_close_to_float(form):
    torch.manual_seed(0)
    model = Fuse().eval()
    image, side = _data()
    q = quantize(model, EIGHT_BITS, calibration_data=_forms(image, side)[form])
    # the sign of each input decides its layer's quantizer: images >= 0, the side vector signed
    assert input_signedness(q) == {"conv": False, "side": True, "head": True}
    with torch.no_grad():
        assert _rel_error(q(image, side), model(image, side)) < 0.02


def test_calibration_of_a_two_input_model_moves_its_activation_scales_to_the_data():
    torch.manual_seed(0)
    model = Fuse().eval()
    image, side = _data()
    raw = quantize(model, EIGHT_BITS)
    calibrated = quantize(model, EIGHT_BITS, calibration_data=(image, side))
    with torch.no_grad():
        f = model(image, side)
        assert _rel_error(calibrated(image, side), f) < _rel_error(raw(image, side), f)
    calibrate(raw, (image, side), bias_correction=True)  # the public call takes the tuple too
    with torch.no_grad():
        assert _rel_error(raw(image, side), f) < 0.02


def test_a_wrong_number_of_inputs_for_a_two_input_model_is_one_line():
    model = Fuse().eval()
    image, side = _data(8)
    for data, kind, match in (
        ((image,), ConfigError, "holds 1 tensors for a model of 2 inputs"),
        (image, ModelError, r"Fuse.forward takes 2 inputs \(image, side\), but calibration data is a single"),
        ([(image,)], ConfigError, "batch 0 is not a tuple of 2 inputs"),
        ((image, side[:3]), ConfigError, "different batch sizes"),
    ):
        with pytest.raises(kind, match=match) as exc:
            quantize(model, EIGHT_BITS, calibration_data=data)
        _one_line(exc)
    q = quantize(model, EIGHT_BITS)
    with pytest.raises(ConfigError, match="holds 1 tensors") as exc:
        calibrate(q, (image,))
    _one_line(exc)


def test_a_failing_forward_during_calibration_is_one_line():
    model = Fuse().eval()
    image, side = _data(8)
    with pytest.raises(ModelError, match="model forward raised RuntimeError") as exc:
        quantize(model, EIGHT_BITS, calibration_data=(image, side[:, :3]))  # 3 features, not 5
    _one_line(exc)


class Counted(nn.Sequential):
    """A single-input model counting its forwards on data (a class attribute: copies count into it too;
    fx tracing, which calls forward on proxies, does not count)."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).calls += isinstance(x, torch.Tensor)
        return super().forward(x)


@pytest.mark.parametrize("bias_correction, passes", [(False, 1), (True, 2)])
def test_a_one_shot_stream_of_batches_loses_no_batch_to_the_sign_check(bias_correction, passes):
    model = Counted(nn.Flatten(), nn.Linear(16, 3)).eval()
    batches = [torch.rand(4, 1, 4, 4) for _ in range(3)]
    Counted.calls = 0
    # input placement keeps the model's own class, whose forward counts (producer placement would trace
    # it into a GraphModule: Flatten sits between the input and the layer)
    quantize(
        model,
        EIGHT_BITS,
        calibration_data=iter(batches),
        bias_correction=bias_correction,
        act_placement="input",
    )
    # one forward finds the layers the model calls, one checks the signs (both on the first sample),
    # then every batch in every pass: none is lost
    assert Counted.calls == 2 + 3 * passes


# ------------------------------------------------------------------------ BatchNorm on tied weights
def _randomize(bn: nn.BatchNorm1d) -> nn.BatchNorm1d:
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.1, 2)
        bn.weight.uniform_(0.5, 3)
        bn.bias.uniform_(-1, 1)
    return bn


class TiedBN(nn.Module):
    """``a`` and ``b`` share one weight and bias; a BatchNorm follows ``a`` (and ``b`` when asked)."""

    def __init__(self, bn_after_b: bool = False) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.bn_a = _randomize(nn.BatchNorm1d(6))
        self.b = nn.Linear(6, 6)
        self.b.weight, self.b.bias = self.a.weight, self.a.bias
        self.bn_b = _randomize(nn.BatchNorm1d(6)) if bn_after_b else nn.Identity()
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.bn_b(self.b(torch.relu(self.bn_a(self.a(x)))))))


@pytest.mark.parametrize("bn_after_b", [False, True])
def test_folding_into_a_tied_layer_unties_it_and_keeps_every_layers_function(bn_after_b):
    torch.manual_seed(0)
    model = TiedBN(bn_after_b).eval()
    x = torch.randn(16, 6)
    with torch.no_grad():
        expected, b_alone = model(x), model.b(x)
    original = model.a.weight.detach().clone()
    assert shared_weights(model) == {"a": ("a", "b")}
    pairs, caught = _caught(lambda: fold_batchnorm(model))
    assert pairs == ({"a": "bn_a", "b": "bn_b"} if bn_after_b else {"a": "bn_a"})
    untie = [m for m in caught if "BatchNorm folding unties weights" in m]
    assert len(untie) == 1 and "a from b" in untie[0] and "\n" not in untie[0]
    assert model.a.weight is not model.b.weight and model.a.bias is not model.b.bias
    assert shared_weights(model) == {}
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
        if not bn_after_b:  # b, unfolded, still computes what it computed with the original weight
            torch.testing.assert_close(model.b(x), b_alone)
            assert torch.equal(model.b.weight, original)


def test_quantize_with_fold_bn_on_tied_weights_stays_close_to_float():
    torch.manual_seed(0)
    model = TiedBN().eval()
    x = torch.randn(64, 6)
    q, caught = _caught(lambda: quantize(model, EIGHT_BITS, calibration_data=x, fold_bn=True))
    assert any("a from b" in m for m in caught)
    assert model.a.weight is model.b.weight  # the caller's model is untouched
    assert isinstance(q.bn_a, nn.Identity)
    with torch.no_grad():
        assert _rel_error(q(x), model(x)) < 0.03


def test_write_folded_overwrites_an_unshared_parameter_in_place():
    layer = nn.Sequential(nn.Linear(3, 2, bias=False))
    weight = layer[0].weight
    assert write_folded(layer, "0", torch.ones(2, 3), torch.zeros(2)) == []
    assert layer[0].weight is weight and torch.equal(weight, torch.ones(2, 3))
    assert isinstance(layer[0].bias, nn.Parameter)  # a layer without bias gets one


def test_parameter_holders_counts_a_module_under_two_names_once():
    shared = nn.Linear(2, 2)
    model = nn.Module()
    model.first, model.again = shared, shared
    model.other = nn.Linear(2, 2)
    model.other.weight = shared.weight
    model.direct = shared.weight  # held by the model itself
    assert parameter_holders(model)[id(shared.weight)] == ["", "first", "other"]


class UsedOutside(nn.Module):
    """A BatchNorm after ``fc``, whose weight the forward also uses through ``F.linear``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = _randomize(nn.BatchNorm1d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x)) + F.linear(x, self.fc.weight)


def test_a_bn_after_a_layer_whose_weight_is_used_outside_it_is_left_unfolded():
    torch.manual_seed(0)
    model = UsedOutside().eval()
    before = copy.deepcopy(model)
    x = torch.randn(8, 4)
    assert norm_folding(model).unfolded == {
        "bn": "the forward also uses fc's weight or bias outside it, which folding would change"
    }
    pairs, caught = _caught(lambda: fold_batchnorm(model))
    assert pairs == {}
    assert any(
        "leaves these normalisations in float, unfolded: bn (the forward also uses" in m for m in caught
    )
    with torch.no_grad():
        torch.testing.assert_close(model(x), before(x))
