"""Issue 24, items 4 and 7 (cases 25, 27 and 28), each on a small model of our own:

* what is reported runs: a layer the forward never calls (nn.MultiheadAttention's ``out_proj``, a
  layer whose weight is read directly, a layer never used) stays float, is named in one warning and
  is out of the cost; scores and search run on models with attention (math attention kernel);
* one policy language for every backend: ``None``/``null`` keeps a layer float next to a default;
  layer names, parent-module names and ``re:`` patterns resolve to the same layers in Brevitas,
  torch.ao FX and PT2E, and ``policy.resolve(model)`` shows the per-layer result;
* re-bitting one layer after quantization keeps the rest, and the recorded policy, the cost and the
  exported graph agree (case 28).
"""

from __future__ import annotations

import copy
import json
import math
import operator
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from aq_brevitas.ao import convert_pt2e_model, prepare_fx_model, prepare_pt2e_model, to_qconfig_mapping
from aq_brevitas.ao.pt2e import _layer_name
from aq_brevitas.errors import PolicyError
from aq_brevitas.models import build_model
from aq_brevitas.nnutils import called_layers, layer_geometry, quantizable_layers
from aq_brevitas.policy import SCHEMA, LayerSpec, LayerwisePolicy
from aq_brevitas.quantization.convert import apply_policy, quantize
from aq_brevitas.quantization.readback import read_policy
from aq_brevitas.score.lipschitz import lipschitz_scores
from aq_brevitas.search import SearchConfig, search_policy

torch.set_num_threads(1)
W4 = LayerSpec(4)


class Nested(nn.Module):
    """Case 27's shape: two convs under a parent module ``features``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.features = nn.Sequential(
            nn.Conv2d(4, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
        )
        self.fc1 = nn.Linear(8 * 7 * 7, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(torch.relu(self.conv1(x)))
        return self.fc2(torch.relu(self.fc1(F.max_pool2d(h, 2).flatten(1))))


class Blocks(nn.Module):
    """A shape the scripts do not show: a ModuleList of blocks two levels deep, names with digits."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1)) for _ in range(3)
        )
        self.head = nn.Linear(4 * 14 * 14, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        for block in self.blocks:
            h = torch.relu(block(h))
        return self.head(h.flatten(1))


def _bits(resolved: dict[str, LayerSpec | None]) -> dict[str, int | None]:
    return {n: s.weight_bit_width if s else None for n, s in resolved.items()}


def _brevitas_bits(model: nn.Module, policy: LayerwisePolicy, x: torch.Tensor) -> dict[str, int | None]:
    q = quantize(model, policy, calibration_data=x)
    return {
        n: int(q.get_submodule(n).quant_weight().bit_width)
        if hasattr(q.get_submodule(n), "quant_weight")
        else None
        for n in quantizable_layers(model)
    }


def _fx_bits(model: nn.Module, policy: LayerwisePolicy, x: torch.Tensor) -> dict[str, int | None]:
    """Per layer, the bits convert_fx's integer weight spans (max-scaled per-channel weights reach the
    top of their narrow range), None for a float layer."""
    from torch.ao.quantization.quantize_fx import convert_fx

    prepared = prepare_fx_model(copy.deepcopy(model), policy, x[:1])
    prepared(x)
    converted = convert_fx(prepared)
    out: dict[str, int | None] = {}
    for n in quantizable_layers(model):
        m = converted.get_submodule(n)
        out[n] = (
            int(math.log2(int(m.weight().int_repr().abs().max()) + 1)) + 1 if callable(m.weight) else None
        )
    return out


def _pt2e_bits(model: nn.Module, policy: LayerwisePolicy, x: torch.Tensor) -> dict[str, int | None]:
    """Per layer, the bits of the int8 weight constant convert_pt2e dequantizes into it (None: float)."""
    prepared = prepare_pt2e_model(copy.deepcopy(model), policy, x[:2])
    prepared(x)
    converted = convert_pt2e_model(prepared)
    out: dict[str, int | None] = dict.fromkeys(quantizable_layers(model))
    for node in converted.graph.nodes:
        value = operator.attrgetter(node.target)(converted) if node.op == "get_attr" else None
        if isinstance(value, torch.Tensor) and value.dtype == torch.int8:
            (dequant,) = node.users
            (layer,) = dequant.users
            out[_layer_name(layer)] = int(math.log2(int(value.abs().max()) + 1)) + 1
    return out


# ------------------------------------------------------------------------- item 7: one policy language
def test_none_next_to_a_default_keeps_layers_float_in_python_and_json():
    torch.manual_seed(0)
    model, x = Nested().eval(), torch.rand(16, 1, 28, 28)
    policy = LayerwisePolicy({"conv1": None, "fc2": None}, default=W4)
    doc = {"schema": SCHEMA, "layers": {"conv1": None, "fc2": None}, "default": {"weight_bit_width": 4}}
    assert LayerwisePolicy.from_json(json.dumps(doc)) == policy
    assert json.loads(policy.to_json())["layers"] == {"conv1": None, "fc2": None}
    assert _bits(policy.resolve(model)) == {
        "conv1": None,
        "features.0": 4,
        "features.3": 4,
        "fc1": 4,
        "fc2": None,
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _brevitas_bits(model, policy, x) == _bits(policy.resolve(model))
    assert not [w for w in caught if "no spec and no default" in str(w.message)]  # float on purpose
    cost = policy.cost(model, x[:1])
    stored = {n: m.weight.numel() for n, m in quantizable_layers(model).items()}
    true_bits = sum(k * (32 if n in ("conv1", "fc2") else 4) for n, k in stored.items())
    assert cost.weight_bits == true_bits and cost.weight_bytes == true_bits / 8


@pytest.mark.parametrize(
    "layers, expected",
    [
        (  # case 27 (b): the explicit partial policy, no default
            {n: LayerSpec(4, act_bit_width=8) for n in ("features.0", "features.3", "fc1")},
            {"conv1": None, "features.0": 4, "features.3": 4, "fc1": 4, "fc2": None},
        ),
        (
            {"conv1": None, "fc2": None, None: W4},
            {"conv1": None, "features.0": 4, "features.3": 4, "fc1": 4, "fc2": None},
        ),
        (
            {"features": LayerSpec(8), None: W4},
            {"conv1": 4, "features.0": 8, "features.3": 8, "fc1": 4, "fc2": 4},
        ),
        (
            {"re:fc.*": LayerSpec(8), None: W4},
            {"conv1": 4, "features.0": 4, "features.3": 4, "fc1": 8, "fc2": 8},
        ),
        (  # a name beats its parent, a parent beats a pattern
            {"features": LayerSpec(8), "features.3": LayerSpec(2), "re:.*": LayerSpec(3), "fc2": None},
            {"conv1": 3, "features.0": 8, "features.3": 2, "fc1": 3, "fc2": None},
        ),
    ],
    ids=["partial", "none-default", "parent", "pattern", "precedence"],
)
def test_brevitas_fx_and_pt2e_resolve_a_policy_alike(layers, expected):
    torch.manual_seed(0)
    model, x = Nested().eval(), torch.rand(32, 1, 28, 28)
    policy = LayerwisePolicy({k: v for k, v in layers.items() if k is not None}, default=layers.get(None))
    assert _bits(policy.resolve(model)) == expected
    assert _brevitas_bits(model, policy, x) == expected
    assert _fx_bits(model, policy, x) == expected
    assert _pt2e_bits(model, policy, x) == expected


def test_bare_qconfig_mapping_reads_parents_patterns_and_none_as_resolve_does():
    """torch.ao's own reading of the mapping (no layers passed) gives the same per-layer result."""
    torch.manual_seed(0)
    model, x = Blocks().eval(), torch.rand(8, 1, 28, 28)
    policy = LayerwisePolicy(
        {"blocks.1": LayerSpec(8), r"re:blocks\.\d\.2": LayerSpec(2), "head": None}, default=LayerSpec(3)
    )
    expected = {"stem": 3, "blocks.0.0": 3, "blocks.0.2": 2, "blocks.1.0": 8, "blocks.1.2": 8}
    expected |= {"blocks.2.0": 3, "blocks.2.2": 2, "head": None}
    assert _bits(policy.resolve(model)) == expected
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation; the output-bits note of to_qconfig_mapping
        prepared = prepare_fx(copy.deepcopy(model), to_qconfig_mapping(policy), (x[:1],))
        prepared(x)
        converted = convert_fx(prepared)
    got = {}
    for n in quantizable_layers(model):
        m = converted.get_submodule(n)
        got[n] = (
            int(math.log2(int(m.weight().int_repr().abs().max()) + 1)) + 1 if callable(m.weight) else None
        )
    assert got == expected
    assert _fx_bits(model, policy, x) == expected and _pt2e_bits(model, policy, x) == expected


@pytest.mark.parametrize(
    "layers, match",
    [
        ({"feature": W4}, "'feature', which the model does not have"),
        ({"re:conv[": W4}, "not a valid regular expression"),
        ({"re:fc.": W4, "re:.*1": LayerSpec(2)}, "'fc1' matches patterns"),
        ({"features.1": W4}, "'features.1'"),  # a ReLU: a module, but no quantizable layer under it
    ],
    ids=["unknown", "bad-regex", "ambiguous-patterns", "no-layer-under-it"],
)
def test_every_backend_refuses_a_key_naming_no_layer_in_one_line(layers, match):
    model, x = Nested().eval(), torch.rand(4, 1, 28, 28)
    for run in (
        lambda: quantize(model, LayerwisePolicy(layers)),
        lambda: prepare_fx_model(copy.deepcopy(model), LayerwisePolicy(layers), x[:1]),
        lambda: prepare_pt2e_model(copy.deepcopy(model), LayerwisePolicy(layers), x[:2]),
    ):
        with pytest.raises(PolicyError, match=match) as info:
            run()
        assert "\n" not in str(info.value) and "-- fix:" in str(info.value)


def test_apply_policy_refuses_none_for_a_quantized_layer():
    q = quantize(Nested().eval(), LayerwisePolicy(default=W4))
    with pytest.raises(PolicyError, match="cannot turn quantized layers fc2 back to float"):
        apply_policy(q, LayerwisePolicy({"fc2": None}))
    assert _bits(read_policy(apply_policy(q, LayerwisePolicy({"features": LayerSpec(2)}))).resolve(q)) == {
        "conv1": 4, "features.0": 2, "features.3": 2, "fc1": 4, "fc2": 4,
    }  # fmt: skip


# ------------------------------------------------------------------------------ item 4: what runs
class TinyViT(nn.Module):
    """Case 25's model, smaller: patch conv, LayerNorm, MultiheadAttention, a GELU MLP, a head."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, d, 7, 7)
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        h = self.ln1(t)
        t = t + self.attn(h, h, h, need_weights=False)[0]
        t = t + self.mlp(self.ln2(t))
        return self.head(t.mean(1))


RUN_LAYERS = ["embed", "mlp.0", "mlp.2", "head"]


def test_multihead_attention_stays_float_named_and_out_of_the_cost():
    torch.manual_seed(0)
    model, x = TinyViT().eval(), torch.rand(16, 1, 28, 28)
    assert list(quantizable_layers(model)) == RUN_LAYERS  # out_proj is MultiheadAttention's, never called
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = quantize(model, LayerwisePolicy(default=W4), calibration_data=x)
    assert any("attn (MultiheadAttention, with attn.out_proj)" in str(w.message) for w in caught)
    assert type(q.get_submodule("attn.out_proj")) is type(model.attn.out_proj)  # not swapped: float
    assert sorted(read_policy(q).layers) == sorted(RUN_LAYERS)
    cost = LayerwisePolicy(default=W4).cost(model, x[:1])
    assert cost.params == sum(model.get_submodule(n).weight.numel() for n in RUN_LAYERS)
    with torch.no_grad():
        assert torch.isfinite(q(x)).all()
    four = dict.fromkeys(RUN_LAYERS, 4)  # PT2E would see the attention's own linear ops as layer "attn"
    assert _fx_bits(model, LayerwisePolicy(default=W4), x) == four
    assert _pt2e_bits(model, LayerwisePolicy(default=W4), x) == four


def test_scores_and_search_run_on_a_model_with_attention():
    """The default scores take a double backward, which the fused attention kernels lack."""
    torch.manual_seed(0)
    model, x = TinyViT().eval(), torch.rand(24, 1, 28, 28)
    y = torch.randint(0, 10, (24,))
    scores = lipschitz_scores(model, x[:8])
    assert list(scores) == RUN_LAYERS and all(math.isfinite(s.gain_jacobian) for s in scores.values())
    for method in ("lipschitz", "hessian"):
        config = SearchConfig(method=method, eps=0.05, pgd_steps=1, val_images=8)
        result = search_policy(
            model, (x, y), "avg-bits=5", config=config, val_data=(x[:8], y[:8]), progress=False
        )
        assert sorted(result.policy.layers) == sorted(RUN_LAYERS)


class Encoder(nn.Module):
    """A kind the scripts do not show: nn.TransformerEncoderLayer, whose eval no-grad fast path reads
    linear1/linear2's weights directly (torch._transformer_encoder_layer_fwd)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(12, 16)
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.embed(x)).mean(1))


def test_transformer_encoder_layer_runs_its_quantized_linears_in_every_mode():
    torch.manual_seed(0)
    model, x = Encoder().eval(), torch.randn(8, 5, 12)
    q = quantize(model, LayerwisePolicy(default=W4), calibration_data=x)
    assert hasattr(q.enc.linear1, "quant_weight") and "enc.self_attn.out_proj" not in quantizable_layers(q)
    q1 = apply_policy(q, LayerwisePolicy({"enc.linear1": LayerSpec(1)}))
    with torch.no_grad():  # eval without grad: where torch's fast path would skip the quantizers
        assert (q1(x) - q(x)).abs().max() > 1e-3
    assert list(lipschitz_scores(model, x)) == ["embed", "enc.linear1", "enc.linear2", "head"]


class Uncalled(nn.Module):
    """Kinds the scripts do not show: a layer whose weight the forward reads directly (like
    MultiheadAttention's out_proj), and a layer the forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 8)
        self.proj = nn.Linear(8, 8)  # only its weight is used
        self.spare = nn.Linear(8, 8)  # never used
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(F.linear(torch.relu(self.fc1(x)), self.proj.weight, self.proj.bias)))


@pytest.mark.parametrize("with_data", [True, False], ids=["hooked-forward", "fx-graph"])
def test_a_layer_the_forward_never_calls_stays_float_named_and_out_of_the_cost(with_data):
    torch.manual_seed(0)
    model, x = Uncalled().eval(), torch.randn(8, 12)
    assert called_layers(model, x if with_data else None) == {"fc1", "fc2"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = quantize(model, LayerwisePolicy(default=W4), calibration_data=x if with_data else None)
    never = [str(w.message) for w in caught if "never called" in str(w.message)]
    assert len(never) == 1 and "layers proj, spare are never called" in never[0]
    assert type(q.proj) is nn.Linear and type(q.spare) is nn.Linear and hasattr(q.fc1, "quant_weight")
    assert _bits(LayerwisePolicy(default=W4).resolve(model, x)) == {
        "fc1": 4,
        "proj": None,
        "spare": None,
        "fc2": 4,
    }
    assert list(layer_geometry(model, x[:1])) == ["fc1", "fc2"]
    cost = LayerwisePolicy(default=W4).cost(model, x[:1])
    assert cost.params == 12 * 8 + 8 * 3 and cost.avg_weight_bits == 4.0


def test_tied_weight_of_a_never_called_layer_is_costed_at_the_layer_that_runs():
    model = Uncalled().eval()
    model.fc2 = nn.Linear(8, 8)
    model.spare.weight = model.fc2.weight  # spare comes first in registration order, but never runs
    geometry = layer_geometry(model, torch.randn(1, 12))
    assert geometry["fc2"].params == 64 and geometry["fc2"].weight_of is None


# ------------------------------------------------------------------- case 28: re-bit one layer
def test_rebit_one_layer_keeps_the_rest_and_cost_policy_and_graph_agree(tmp_path):
    from aq_brevitas.export.qonnx import export_qonnx
    from aq_brevitas.quantization.placement import input_quantizer

    torch.manual_seed(0)
    model, x = build_model("small_cnn").eval(), torch.rand(32, 1, 28, 28)
    spec = LayerSpec(4, "mse", "per_channel", act_bit_width=8)
    q = quantize(model, LayerwisePolicy(default=spec), calibration_data=x)
    names = list(quantizable_layers(q))
    before = {
        n: (q.get_submodule(n).quant_weight().scale.detach().clone(), input_quantizer(q, n).scale())
        for n in names
    }
    r = apply_policy(q, LayerwisePolicy({"fc1": LayerSpec(2, "mse", "per_channel", act_bit_width=8)}))
    for n in names:
        assert torch.equal(input_quantizer(r, n).scale(), before[n][1]), n
        if n != "fc1":
            assert torch.equal(r.get_submodule(n).quant_weight().scale, before[n][0]), n
    recorded = read_policy(r)
    bits = {n: 2 if n == "fc1" else 4 for n in names}
    assert _bits(recorded.resolve(names)) == bits
    stored = sum(r.get_submodule(n).weight.numel() * b for n, b in bits.items())
    assert recorded.cost(r, x[:1]).weight_bits == stored
    assert export_qonnx(r, tmp_path / "rebit.onnx", x[:1]).layer_bits == bits


def test_cli_quantize_rebits_a_quantized_checkpoint_with_a_one_entry_policy(tmp_path, capsys):
    """Case 28's CLI way: `aq-brevitas quantize --model <quantized.pt> --policy <fc1 only>`."""
    from aq_brevitas.cli import main
    from aq_brevitas.quantization.checkpoint import load_quantized, save_quantized

    torch.manual_seed(0)
    spec = LayerSpec(4, "mse", "per_channel", act_bit_width=8)
    q = quantize(
        build_model("small_cnn").eval(),
        LayerwisePolicy(default=spec),
        calibration_data=torch.rand(16, 1, 28, 28),
    )
    save_quantized(q, tmp_path / "q.pt", {"arch": "small_cnn"})
    LayerwisePolicy({"fc1": LayerSpec(2, "mse", "per_channel", act_bit_width=8)}).save(tmp_path / "fc1.json")
    argv = ["quantize", "--model", str(tmp_path / "q.pt"), "--policy", str(tmp_path / "fc1.json")]
    assert main([*argv, "--out", str(tmp_path / "r.pt"), "--calib-images", "0"]) == 0
    assert "QuantLinear 2b mse pc a8" in capsys.readouterr().out
    r = load_quantized(tmp_path / "r.pt")[0]
    assert _bits(read_policy(r).resolve(quantizable_layers(r))) == {
        "conv1": 4,
        "conv2": 4,
        "fc1": 2,
        "fc2": 4,
    }


def test_exporting_attention_names_the_op_and_no_opset_that_cannot_help(tmp_path):
    """Case 25's export: MultiheadAttention's fused kernel exports at no opset, so the fix must not
    suggest another one."""
    from aq_brevitas.errors import ModelError
    from aq_brevitas.export.qonnx import export_qonnx

    torch.manual_seed(0)
    model, x = TinyViT().eval(), torch.rand(4, 1, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize(model, LayerwisePolicy(default=W4), calibration_data=x)
    with pytest.raises(ModelError, match="attention has no QONNX/FINN mapping") as err:
        export_qonnx(q, tmp_path / "vit.onnx", x[:1])
    assert "another opset" not in str(err.value) and len(str(err.value).splitlines()) == 1
