"""What a quantized model is, it says itself: policy, signedness and placement read from its Brevitas
quantizers; nothing set on the user's model; apply_policy merges; the checkpoint sidecar and the cost
report are typed records."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import brevitas.nn as qnn
import pytest
import torch
from torch import fx, nn

from aq_brevitas.data import load_split
from aq_brevitas.export import CostReport, export_qonnx, inference_cost
from aq_brevitas.models import load_float_model
from aq_brevitas.nnutils import layer_geometry
from aq_brevitas.policy import LayerSpec, LayerwisePolicy
from aq_brevitas.quantization.checkpoint import QuantizedSidecar, load_quantized, save_quantized
from aq_brevitas.quantization.convert import apply_policy, quantize
from aq_brevitas.quantization.placement import input_quantizer
from aq_brevitas.quantization.readback import act_placement_of, input_signedness, layer_changes, read_policy

REPO = Path(__file__).resolve().parents[1]
W4A8 = LayerwisePolicy(default=LayerSpec(4, act_bit_width=8))
FC1_2BIT = LayerwisePolicy({"fc1": LayerSpec(2, act_bit_width=8)})


@pytest.fixture(scope="module")
def rebitted():
    """cnn-pgd quantized at w4a8 (calibrated on 32 val images), then fc1 re-bitted to 2 bits."""
    model, meta = load_float_model("cnn-pgd")
    x = load_split("val", limit=64)[0]
    q = quantize(model, W4A8, calibration_data=x[:32]).eval()
    scale = input_quantizer(q, "fc1").scale().detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no calibrated scale is reset: no warning
        r = apply_policy(q, FC1_2BIT).eval()
    return model, meta, x, q, r, scale


def test_rebit_after_quantize_costs_exports_saves_and_exports_from_the_cli(rebitted, tmp_path):
    model, meta, x, q, r, scale = rebitted
    # the policy the quantizers say: fc1 at 2 bits, the rest at 4, every input at 8 bits
    expected = {
        n: LayerSpec(2 if n == "fc1" else 4, act_bit_width=8) for n in ("conv1", "conv2", "fc1", "fc2")
    }
    assert read_policy(r).layers == expected
    assert read_policy(q).layers == {n: LayerSpec(4, act_bit_width=8) for n in expected}  # q untouched
    assert torch.equal(input_quantizer(r, "fc1").scale(), scale)  # fc1's calibrated input scale kept
    params = {n: g.params for n, g in layer_geometry(r, x[:1]).items()}
    exact = sum((2 if n == "fc1" else 4) * p for n, p in params.items())
    assert read_policy(r).cost(r, x[:1]).weight_bits == exact
    # export: parity, weight memory per layer as the quantizers predict, the typed cost report
    res = export_qonnx(r, tmp_path / "r.onnx", x[:1], images=x[1:5])
    assert res.diff_without_flips <= res.allowed_diff and res.layer_bits == {
        n: s.weight_bit_width for n, s in expected.items()
    }
    assert res.weight_bits == {n: {"graph": exact_n, "quantizers": exact_n} for n, exact_n in (
        (n, (2 if n == "fc1" else 4) * p) for n, p in params.items())}  # fmt: skip
    assert isinstance(res.cost, CostReport) and res.cost.total.mem_w_bits == exact
    assert CostReport.from_dict(res.cost.to_dict()) == res.cost
    assert inference_cost(tmp_path / "r.onnx", r).weight_bits == res.weight_bits
    # save/load round-trips every layer's spec, signedness and placement
    path = tmp_path / "saved.pt"
    save_quantized(r, path, meta={"arch": meta["arch"]})
    back, side = load_quantized(path)
    assert read_policy(back) == read_policy(r) and input_signedness(back) == input_signedness(r)
    assert act_placement_of(back) == act_placement_of(r)
    assert QuantizedSidecar.from_dict(side).policy.layers == expected
    with torch.no_grad():
        assert torch.equal(back(x[:8]), r(x[:8]))
    # the CLI exports the saved file
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-m", "aq_brevitas.cli", "export", "--model", str(path), "--format", "qonnx",
         "--out", str(tmp_path / "x.onnx"), "--images", "2"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "x.onnx").is_file() and "fc1" in out.stdout


def test_layer_changes_name_what_changed(rebitted):
    model, _, _, q, r, _ = rebitted
    assert [(c.name, c.old, c.new) for c in layer_changes(q, r)] == [
        ("fc1", "QuantLinear 4b max pc a8", "QuantLinear 2b max pc a8")
    ]
    made = {c.name: (c.old, c.new) for c in layer_changes(model, q)}
    assert made["conv1"] == ("Conv2d float", "QuantConv2d 4b max pc a8")
    assert made["conv1.input_quant"] == ("float input", "input_quant a8 uint (input of conv1)")
    assert sum("QuantReLU a8 uint" in new for _, new in made.values()) == 3


def _state(module: nn.Module) -> set[str]:
    return set(vars(module))


def test_no_attribute_is_set_on_the_users_model(tmp_path):
    """quantize, apply_policy, save and load add nothing to a model's __dict__: the returned model holds
    only what nn.Module (and torch.fx, for a traced one) put there."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    before, x = _state(net), torch.rand(8, 1, 8, 8)
    q = quantize(net, W4A8, calibration_data=x)
    assert _state(net) == before and _state(q) == before  # in place here: Sequential stays Sequential
    r = apply_policy(q, LayerwisePolicy({"3": LayerSpec(2, act_bit_width=8)}))
    same = apply_policy(q, LayerwisePolicy({"3": LayerSpec(2, act_bit_width=8)}), inplace=True)
    assert same is q and _state(q) == _state(r) == before
    save_quantized(r, tmp_path / "r.pt")
    back, _ = load_quantized(tmp_path / "r.pt", float_model=net)
    assert _state(back) == before == _state(net)
    # a model that ends up an fx.GraphModule: only what fx gives a GraphModule of the same model
    model, _ = load_float_model("cnn-pgd")
    plain = _state(model)
    gq = quantize(model, W4A8, calibration_data=load_split("val", limit=8)[0])
    traced = fx.symbolic_trace(model)
    assert _state(model) == plain and isinstance(gq, fx.GraphModule)
    assert _state(gq) <= _state(traced) | plain
    assert _state(apply_policy(gq, FC1_2BIT)) <= _state(traced) | plain
    assert not [k for k in _state(gq) if k.startswith("aq")]


def test_apply_policy_merges_and_keeps_signedness_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    x = torch.rand(8, 1, 8, 8)  # non-negative: conv's input quantizer is unsigned
    q = quantize(net, LayerwisePolicy(default=LayerSpec(4, "mse", act_bit_width=8)), calibration_data=x)
    r = apply_policy(q, LayerwisePolicy({"0": LayerSpec(3, "mse", act_bit_width=8)}))
    assert {n: s.short() for n, s in read_policy(r).layers.items()} == {
        "0": "3b mse pc a8",
        "3": "4b mse pc a8",
    }
    assert input_signedness(r) == input_signedness(q) == {"0": False, "3": False}
    save_quantized(r, tmp_path / "r.pt")
    back, side = load_quantized(tmp_path / "r.pt", float_model=net)
    assert read_policy(back) == read_policy(r) and input_signedness(back) == {"0": False, "3": False}
    assert side["act_placement"] == {"0": "input", "3": "producer"}


def test_a_reset_scale_is_named_with_the_fix():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    x = torch.rand(8, 1, 8, 8)
    q = quantize(net, W4A8, calibration_data=x)
    wider = LayerwisePolicy({"0": LayerSpec(4, act_bit_width=6), "3": LayerSpec(4, act_bit_width=6)})
    with pytest.warns(UserWarning, match=r"layers 0, 3 changed bits .* -- fix: pass calibration_data"):
        apply_policy(q, wider)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = apply_policy(q, wider, calibration_data=x)
    assert read_policy(r).layers["3"].act_bit_width == 6


def test_a_hand_made_brevitas_model_is_read_from_its_injectors():
    net = nn.Sequential(
        qnn.QuantIdentity(bit_width=8, return_quant_tensor=False),
        qnn.QuantConv2d(1, 4, 3, weight_bit_width=5),
        qnn.QuantReLU(bit_width=6),
        nn.Flatten(),
        qnn.QuantLinear(144, 10, bias=True, weight_bit_width=3),
    )
    policy = read_policy(net)
    assert policy.layers == {
        "1": LayerSpec(5, "max", "per_tensor", 8),
        "4": LayerSpec(3, "max", "per_tensor", 6),
    }
    assert input_signedness(net) == {"1": True, "4": False}
