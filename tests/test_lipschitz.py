"""Operator norms against exact SVDs, BatchNorm folding, both gains, and the scoring entry point."""

from __future__ import annotations

import copy
import math
import random
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from aq_brevitas.errors import ConfigError, ModelError
from aq_brevitas.folding import bn_scale, find_conv_bn_pairs, folded_weight
from aq_brevitas.models import build_model
from aq_brevitas.nnutils import QUANTIZABLE_TYPES, quantizable_layers
from aq_brevitas.score.jacobian import is_chain, local_jacobian_norm
from aq_brevitas.score.lipschitz import NON_CHAIN_WARNING, lipschitz_scores
from aq_brevitas.score.norms import operator_norm
from conftest import fold_bound

torch.set_num_threads(1)


def dense_operator(layer: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    """The layer's (bias-free) map as a matrix: push the identity basis through nn's own forward."""
    n = math.prod(input_shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *input_shape)
    with torch.no_grad():
        out = layer.double()(basis)
    return out.reshape(n, -1).T


def exact_norm(layer: nn.Module, input_shape: tuple[int, ...]) -> float:
    return float(torch.linalg.svdvals(dense_operator(layer, input_shape))[0])


def conv2d_config(k: int) -> dict:
    """A seeded random Conv2d geometry whose output is not empty (channels <= 4, spatial <= 9)."""
    rng = random.Random(k)
    while True:
        groups_kind = rng.choice(["1", "2", "depthwise"])
        if groups_kind == "1":
            cin, cout, groups = rng.randint(1, 4), rng.randint(1, 4), 1
        elif groups_kind == "2":
            cin, cout, groups = 2 * rng.randint(1, 2), 2 * rng.randint(1, 2), 2
        else:
            cin = rng.randint(2, 4)
            cout, groups = cin * rng.choice([1, 2]) if cin <= 2 else cin, cin
        cfg = dict(
            in_channels=cin,
            out_channels=cout,
            groups=groups,
            kernel_size=rng.choice([1, 2, 3, (3, 2)]),
            stride=rng.choice([1, 2]),
            padding=rng.choice([0, 1, 2]),
            dilation=rng.choice([1, 2]),
            padding_mode=rng.choice(["zeros"] * 4 + ["reflect", "circular"]),
            hw=(rng.choice([5, 7, 8, 9]), rng.choice([6, 7, 9])),
        )
        kh, kw = cfg["kernel_size"] if isinstance(cfg["kernel_size"], tuple) else (cfg["kernel_size"],) * 2
        p, d = cfg["padding"], cfg["dilation"]
        if cfg["padding_mode"] != "zeros" and (p == 0 or p >= min(cfg["hw"])):
            continue
        if all(s + 2 * p - d * (kk - 1) - 1 >= 0 for s, kk in zip(cfg["hw"], (kh, kw))):
            return cfg


@pytest.mark.parametrize("k", range(24))
def test_conv2d_operator_norm_matches_exact_svd(k):
    cfg = conv2d_config(k)
    hw = cfg.pop("hw")
    torch.manual_seed(k)
    layer = nn.Conv2d(**cfg, bias=False)
    shape = (cfg["in_channels"], *hw)
    sigma, iters, _ = operator_norm(layer, shape)
    exact = exact_norm(layer, shape)
    assert sigma == pytest.approx(exact, rel=1e-4), (cfg, hw)  # tol=1e-6 leaves ~1e-6 in practice
    assert sigma <= exact * (1 + 1e-9)  # power iteration approaches from below
    assert 1 <= iters <= 500


@pytest.mark.parametrize(
    "layer,shape",
    [
        (nn.Conv1d(3, 4, 3, stride=2, padding=1, bias=False), (3, 9)),
        (nn.Conv1d(4, 4, 2, dilation=2, groups=4, bias=False), (4, 7)),
        (nn.Conv1d(2, 3, 3, padding=2, padding_mode="circular", bias=False), (2, 8)),
        (nn.Linear(7, 5, bias=False), (7,)),
        (nn.Linear(3, 9, bias=False), (2, 3)),  # leading per-sample dims
        (nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1, bias=False), (3, 4, 5)),
        (nn.ConvTranspose2d(4, 4, 2, stride=2, output_padding=1, groups=2, bias=False), (4, 3, 3)),
        (nn.ConvTranspose2d(2, 3, 3, stride=2, dilation=2, output_padding=1, bias=False), (2, 3, 4)),
    ],
    ids=[
        "conv1d-stride2",
        "conv1d-depthwise",
        "conv1d-circular",
        "linear",
        "linear-3d",
        "convT",
        "convT-g2",
        "convT-dil",
    ],
)
def test_other_layers_operator_norm_match_exact_svd(layer, shape):
    torch.manual_seed(1)
    for p in layer.parameters():
        nn.init.normal_(p)
    sigma = operator_norm(layer, shape).sigma
    assert sigma == pytest.approx(exact_norm(layer, shape), rel=1e-4)


def test_zero_weight_has_zero_norm():
    layer = nn.Conv2d(2, 3, 3, bias=False)
    assert operator_norm(layer, (2, 5, 5), weight=torch.zeros_like(layer.weight))[0] == 0.0


def test_weight_override_and_out_scale():
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
    w2 = torch.randn_like(layer.weight)
    scale = torch.rand(4) + 0.5
    ref = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
    with torch.no_grad():
        ref.weight.copy_(w2 * scale.reshape(-1, 1, 1, 1))
    expect = exact_norm(ref, (3, 7, 7))
    assert operator_norm(layer, (3, 7, 7), weight=w2, out_scale=scale)[0] == pytest.approx(expect, rel=1e-3)
    assert operator_norm(layer, (3, 7, 7), weight=ref.weight.float())[0] == pytest.approx(expect, rel=1e-3)
    # deterministic given the seed
    assert operator_norm(layer, (3, 7, 7), seed=3)[:2] == operator_norm(layer, (3, 7, 7), seed=3)[:2]


def test_operator_norm_rejects_bad_input():
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(ConfigError, match="input_shape"):
        operator_norm(conv, (4, 7, 7))
    with pytest.raises(ConfigError, match="input_shape"):
        operator_norm(conv, (1, 3, 7, 7))
    with pytest.raises(ConfigError, match="weight of shape"):
        operator_norm(conv, (3, 7, 7), weight=torch.zeros(4, 3, 1, 1))
    with pytest.raises(ModelError, match="does not support"):
        operator_norm(nn.ReLU(), (3,))


def test_reshaped_kernel_norm_is_not_the_operator_norm():
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False)
    shape = (4, 9, 9)
    kernel_norm = float(torch.linalg.svdvals(layer.weight.detach().double().reshape(4, -1))[0])
    sigma = operator_norm(layer, shape).sigma
    assert sigma == pytest.approx(exact_norm(layer, shape), rel=1e-3)
    assert abs(sigma - kernel_norm) / sigma > 0.01


# ------------------------------------------------------------------------------------------ BN folding
def randomize_bn(bn: nn.modules.batchnorm._BatchNorm, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) * 3 + 0.1)
        bn.weight.copy_(torch.randn(c, generator=g) * 2)
        bn.bias.copy_(torch.randn(c, generator=g))


class ConvBN(nn.Module):
    """The BN is declared before the conv and under a non-Sequential name: only the graph links them."""

    def __init__(self, transpose: bool = False) -> None:
        super().__init__()
        self.norm_after = nn.BatchNorm2d(6)
        if transpose:
            self.features = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        else:
            self.features = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.head = nn.Linear(6 * 10 * 10 if transpose else 6 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.norm_after(self.features(x))).flatten(1))


@pytest.mark.parametrize("transpose", [False, True], ids=["conv", "convT"])
def test_folded_weight_reproduces_conv_bn_and_its_norm(transpose):
    torch.manual_seed(0)
    model = ConvBN(transpose).eval()
    randomize_bn(model.norm_after, 1)
    x = torch.randn(2, 4, 5, 5)
    assert find_conv_bn_pairs(model) == {"features": "norm_after"}
    w, b = folded_weight(model.features, model.norm_after)
    conv = model.features
    if transpose:
        y = F.conv_transpose2d(x, w, b, conv.stride, conv.padding, conv.output_padding, conv.groups)
    else:
        y = F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)
    assert ((y - model.norm_after(conv(x))).abs() <= fold_bound(conv, model.norm_after, x)).all()

    scores = lipschitz_scores(model, x, gains=("spectral",))
    ref = type(conv)(
        4, 6, 3, stride=2, padding=1, groups=2, bias=False, **({"output_padding": 1} if transpose else {})
    )
    with torch.no_grad():
        ref.weight.copy_(w)
    assert scores["features"].bn == "norm_after"
    assert scores["features"].L == pytest.approx(operator_norm(ref, (4, 5, 5))[0], rel=1e-6)
    assert scores["features"].L == pytest.approx(exact_norm(ref, (4, 5, 5)), rel=1e-4)
    # the unfolded weight with the BN's scale on the output is the same map
    unfolded = operator_norm(conv, (4, 5, 5), out_scale=bn_scale(model.norm_after))[0]
    assert unfolded == pytest.approx(scores["features"].L, rel=1e-6)
    assert model.training is False


def test_bn_scale_rejects_bn_without_running_stats():
    with pytest.raises(ModelError, match="running statistics"):
        bn_scale(nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ModelError, match="running statistics"):
        folded_weight(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ModelError, match="features"):
        folded_weight(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(3))


def test_conv_bn_pairs_on_reference_models():
    vgg = find_conv_bn_pairs(build_model("vgg_bn"))
    assert vgg == {f"block{i}.conv": f"block{i}.bn" for i in range(1, 5)}
    res = find_conv_bn_pairs(build_model("small_resnet"))
    assert res == {
        "stem": "stem_bn",
        "layer1.conv1": "layer1.bn1",
        "layer1.conv2": "layer1.bn2",
        "layer2.conv1": "layer2.bn1",
        "layer2.conv2": "layer2.bn2",
        "layer2.shortcut.0": "layer2.shortcut.1",
    }
    assert find_conv_bn_pairs(build_model("small_cnn")) == {}


class ForkedConvBN(nn.Module):
    """conv output feeds a BN and also a skip: not foldable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return (self.bn(h) + h).flatten(1)


class Untraceable(nn.Module):
    """Data-dependent control flow defeats torch.fx: pairs come from module order."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 3 * 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = -x
        return self.fc(self.bn(self.conv(x)).flatten(1))


def test_conv_bn_pairs_fork_and_fallback():
    assert find_conv_bn_pairs(ForkedConvBN()) == {}
    model = Untraceable()
    assert find_conv_bn_pairs(model) == {"conv": "bn"}
    assert is_chain(model, torch.rand(2, 1, 5, 5)) is False


# ---------------------------------------------------------------------------------------------- gains
def orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def linear_chain(aligned: bool) -> nn.Sequential:
    """Linear(8,6) -> Linear(6,5) -> Linear(5,3). Aligned: W_{k+1} = U_{k+1} S V_{k+1}ᵀ with V_{k+1} = U_k,
    so downstream products keep their top singular directions and ‖Π W‖ = Π ‖W‖ exactly."""
    g = torch.Generator().manual_seed(0)
    dims = [8, 6, 5, 3]
    model = nn.Sequential(*(nn.Linear(a, b) for a, b in zip(dims, dims[1:])))
    prev_u = orthogonal(dims[0], g)
    for layer, (a, b) in zip(model, zip(dims, dims[1:])):
        u = orthogonal(b, g)
        s = torch.zeros(b, a, dtype=torch.float64)
        s[range(min(a, b)), range(min(a, b))] = torch.sort(
            torch.rand(min(a, b), generator=g) + 0.5, descending=True
        )[0].double()
        w = u @ s @ prev_u.T if aligned else torch.randn(b, a, generator=g, dtype=torch.float64)
        with torch.no_grad():
            layer.weight.copy_(w)
        prev_u = u
    return model


def test_jacobian_gain_equals_spectral_gain_on_aligned_linear_chain():
    model = linear_chain(aligned=True)
    x = torch.randn(5, 8)
    scores = lipschitz_scores(model, x)
    assert list(scores) == ["0", "1", "2"]
    for s in scores.values():
        assert s.gain_jacobian == pytest.approx(s.gain_spectral, rel=1e-3)
    assert scores["2"].gain_spectral == 1.0 and scores["2"].gain_jacobian == pytest.approx(1.0, rel=1e-5)


def test_gains_on_unaligned_linear_chain_match_exact_products():
    model = linear_chain(aligned=False)
    ws = [m.weight.detach().double() for m in model]
    norms = [float(torch.linalg.svdvals(w)[0]) for w in ws]
    scores = lipschitz_scores(model, torch.randn(3, 8))
    s0, s1 = scores["0"], scores["1"]
    assert [s.L for s in scores.values()] == pytest.approx(norms, rel=1e-4)
    assert s0.gain_spectral == pytest.approx(norms[1] * norms[2], rel=1e-4)
    assert s1.gain_spectral == pytest.approx(norms[2], rel=1e-4)
    assert s0.gain_jacobian == pytest.approx(float(torch.linalg.svdvals(ws[2] @ ws[1])[0]), rel=1e-3)
    assert s1.gain_jacobian == pytest.approx(norms[2], rel=1e-3)
    assert s0.gain_jacobian < s0.gain_spectral  # Π of norms bounds the norm of the product


def exact_layer_gain(model: nn.Module, target: nn.Module, x: torch.Tensor) -> float:
    """RMS over examples of ‖∂y_i/∂h_i‖₂ from the full Jacobian (one backward pass per output)."""
    store = {}

    def hook(_m, _a, out):
        out.retain_grad()
        store["h"] = out

    handle = target.register_forward_hook(hook)
    y = model(x)
    handle.remove()
    rows = []
    for j in range(y.shape[1]):
        (g,) = torch.autograd.grad(y[:, j].sum(), store["h"], retain_graph=True)
        rows.append(g.flatten(1).double())
    jac = torch.stack(rows, dim=1)  # (N, out, hidden)
    sig = torch.linalg.matrix_norm(jac, ord=2)
    return float(sig.square().mean().sqrt())


@pytest.mark.parametrize("arch", ["small_cnn", "small_resnet"])
def test_jacobian_gain_matches_full_jacobian(arch):
    torch.manual_seed(0)
    model = build_model(arch).eval()
    x = torch.rand(3, 1, 28, 28)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = lipschitz_scores(model, x, gains=("jacobian",))
    # the non-chain caveat is about gain_spectral, which was not asked for
    assert not [w for w in caught if str(w.message) == NON_CHAIN_WARNING]
    modules = dict(model.named_modules())
    for s in scores.values():
        assert s.gain_spectral is None
        target = modules[s.bn or s.name]
        assert s.gain_jacobian == pytest.approx(exact_layer_gain(model, target, x), rel=1e-3), s.name


# --------------------------------------------------------------------------------------------- scores
@pytest.mark.parametrize("arch", ["small_cnn", "vgg_bn", "small_resnet"])
def test_scores_on_reference_models(arch):
    torch.manual_seed(0)
    model = build_model(arch)
    model.train()
    x = torch.rand(4, 1, 28, 28)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = lipschitz_scores(model, x)
    assert model.training  # the mode is restored
    assert set(scores) == set(quantizable_layers(model))
    for name, s in scores.items():
        layer = dict(model.named_modules())[name]
        assert s.L > 0 and s.A > 0 and s.gain_spectral > 0 and s.gain_jacobian > 0, name
        assert s.weight_shape == tuple(layer.weight.shape) and s.params == layer.weight.numel()
        assert s.type == type(layer).__name__ and s.macs > 0
        d = s.to_dict()
        assert d["L"] == s.L and d["input_shape"] == list(s.input_shape)
    last = list(scores.values())[-1]
    assert last.gain_spectral == 1.0 and last.gain_jacobian == pytest.approx(1.0, rel=1e-5)  # logits layer
    non_chain = [w for w in caught if str(w.message) == NON_CHAIN_WARNING]
    assert len(non_chain) == (1 if arch == "small_resnet" else 0)
    if arch == "small_cnn":
        assert scores["conv1"].input_shape == (1, 28, 28) and scores["conv1"].output_shape == (16, 28, 28)
        assert scores["fc1"].input_shape == (32 * 7 * 7,) and scores["fc1"].output_shape == (128,)
        assert scores["conv2"].macs == 14 * 14 * 32 * 16 * 9
        assert scores["fc1"].gain_spectral == pytest.approx(scores["fc2"].L)
        assert all(s.bn is None for s in scores.values())
    if arch == "small_resnet":
        assert scores["layer2.shortcut.0"].input_shape == (16, 28, 28)
        assert scores["layer2.shortcut.0"].output_shape == (32, 14, 14)
        assert scores["layer2.shortcut.0"].bn == "layer2.shortcut.1"
        # both branches feed the same add, so they share the downstream Jacobian
        assert scores["layer2.conv2"].gain_jacobian == pytest.approx(
            scores["layer2.shortcut.0"].gain_jacobian, rel=1e-3
        )


def test_is_chain():
    x = torch.rand(2, 1, 28, 28)
    assert is_chain(build_model("small_cnn"), x) is True
    assert is_chain(build_model("vgg_bn"), x) is True
    assert is_chain(build_model("small_resnet"), x) is False
    assert is_chain(ForkedConvBN(), torch.rand(2, 2, 4, 4)) is False

    class ViewBySize(nn.Module):  # x.size(0) is metadata, not a fork
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.fc = nn.Linear(2 * 2 * 2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x).view(x.size(0), -1))

    assert is_chain(ViewBySize(), torch.rand(2, 1, 4, 4)) is True


def test_local_jacobian_norm_of_linear_is_its_spectral_norm():
    torch.manual_seed(0)
    layer = nn.Linear(12, 7)
    expect = float(torch.linalg.svdvals(layer.weight.detach().double())[0])
    assert local_jacobian_norm(layer, torch.randn(4, 12)) == pytest.approx(expect, rel=1e-4)
    assert operator_norm(layer, (12,))[0] == pytest.approx(expect, rel=1e-6)


def test_errors():
    with pytest.raises(ModelError, match="no quantizable layers"):
        lipschitz_scores(nn.Sequential(nn.ReLU(), nn.Flatten()), torch.rand(2, 3))
    with pytest.raises(ConfigError, match="floating-point"):
        lipschitz_scores(build_model("small_cnn"), torch.zeros(2, 1, 28, 28, dtype=torch.long))
    with pytest.raises(ConfigError, match="floating-point"):
        lipschitz_scores(build_model("small_cnn"), [[0.0]])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown gain"):
        lipschitz_scores(build_model("small_cnn"), torch.rand(2, 1, 28, 28), gains=("hessian",))


def test_quantizable_types_and_order():
    assert QUANTIZABLE_TYPES == (nn.Conv1d, nn.Conv2d, nn.Linear, nn.ConvTranspose2d)
    assert list(quantizable_layers(build_model("small_resnet"))) == [
        "stem",
        "layer1.conv1",
        "layer1.conv2",
        "layer2.conv1",
        "layer2.conv2",
        "layer2.shortcut.0",
        "fc",
    ]


def test_warm_start_from_float_vectors_agrees_with_cold_start():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    _, cold_it, basis = operator_norm(conv, (4, 8, 8), tol=1e-7)
    w_hat = conv.weight.detach() + 0.01 * torch.randn_like(conv.weight)  # a "quantized" neighbour
    cold, it_cold, _ = operator_norm(conv, (4, 8, 8), weight=w_hat, tol=1e-7)
    warm, it_warm, _ = operator_norm(conv, (4, 8, 8), weight=w_hat, tol=1e-7, init=basis)
    assert warm == pytest.approx(cold, rel=1e-5) and it_warm < it_cold
    lin = nn.Linear(6, 5)
    sigma, iters, none = operator_norm(lin, (6,))
    assert none is None and iters == 1
    assert sigma == pytest.approx(
        float(torch.linalg.matrix_norm(lin.weight.detach().double(), ord=2)), rel=1e-12
    )


# -- batched candidate norms (issue 17): one LOBPCG over many weights of a layer ---------------------------
@pytest.mark.parametrize(
    "layer,shape",
    [
        (nn.Linear(12, 7), (12,)),
        (nn.Conv2d(3, 5, 3, padding=1), (3, 7, 7)),
        (nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode="reflect"), (4, 9, 8)),
        (nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), (4, 5, 5)),
        (nn.Conv1d(3, 5, 3, dilation=2), (3, 20)),
    ],
    ids=["linear", "conv2d", "grouped-reflect", "convtranspose-grouped", "conv1d"],
)
def test_batched_norms_match_one_at_a_time_and_the_dense_operator(layer, shape):
    from aq_brevitas.search.candidates import operator_norms

    torch.manual_seed(0)
    w = layer.weight.detach()
    weights = torch.stack(
        [w + 0.05 * torch.randn_like(w) for _ in range(4)] + [w - w]
    )  # the last: a zero map
    n_out = w.shape[1] * layer.groups if isinstance(layer, nn.ConvTranspose2d) else w.shape[0]
    scale = torch.rand(n_out) + 0.5
    _, _, basis = operator_norm(layer, shape, out_scale=scale, tol=1e-7)
    batched = operator_norms(layer, shape, weights, out_scale=scale, tol=1e-7, init=basis)
    for wk, (sigma, iters) in zip(weights, batched):
        alone = operator_norm(layer, shape, weight=wk, out_scale=scale, tol=1e-7, init=basis)
        assert sigma == pytest.approx(alone[0], rel=1e-7, abs=1e-12) and iters == alone[1]
        ref = copy.deepcopy(layer)
        ref.bias = None
        with torch.no_grad():
            ref.weight.copy_(wk)
        dense = dense_operator(ref, shape)  # rows: the flattened output, channel first
        dense = (dense.reshape(n_out, -1, dense.shape[1]) * scale.double()[:, None, None]).reshape(
            dense.shape
        )
        assert sigma == pytest.approx(float(torch.linalg.svdvals(dense)[0]), rel=1e-5, abs=1e-12)
    assert batched[-1] == (0.0, 1)
