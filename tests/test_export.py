"""Export: parity, bit widths and weight memory read back from the graph, QCDQ guard, FINN checks, CLI.

The residual model here is ``build_model("small_resnet")`` with random weights and BatchNorm
statistics from one training-mode pass: a unit test of the export path for residual adds and
BatchNorm (kept and folded), not a claim about a trained ResNet (the zoo has none).
"""

import itertools

import brevitas.nn as qnn
import numpy as np
import onnx
import pytest
import torch
from brevitas.quant import Uint8ActPerTensorFloatMaxInit
from onnx import numpy_helper
from torch import nn
from torch.nn import functional as F

from aq_brevitas.errors import ConfigError, ModelError
from aq_brevitas.export import DEFAULT_TOL, export_qcdq, export_qonnx, finn_check, inference_cost
from aq_brevitas.export.flips import QuantCall, boundary_flips, check_flips
from aq_brevitas.export.parity import enforce_bound, measure_parity
from aq_brevitas.models import build_model, load_float_model
from aq_brevitas.nnutils import quantizable_layers
from aq_brevitas.policy import LayerSpec, LayerwisePolicy
from aq_brevitas.quantization.checkpoint import save_quantized
from aq_brevitas.quantization.convert import apply_policy, quantize
from aq_brevitas.quantization.injectors import act_quant_for
from aq_brevitas.quantization.placement import input_quantizer
from conftest import run_cli

MIX = [
    LayerSpec(8, "max", "per_channel", act_bit_width=8),
    LayerSpec(5, "mse", "per_tensor", act_bit_width=8),
    LayerSpec(3, "po2", "per_channel", act_bit_width=8),
    LayerSpec(2, "percentile", "per_tensor", act_bit_width=6),
    LayerSpec(1, "max", "per_tensor", act_bit_width=4),
    LayerSpec(4, "po2", "per_tensor", act_bit_width=8),
]
# An ordinary policy whose logits reach ~60: float32 summation-order noise there is ~1e-5 absolute.
LARGE_LOGITS = LayerwisePolicy(
    {
        "conv1": LayerSpec(8, act_bit_width=8),
        "conv2": LayerSpec(4, "po2"),
        "fc1": LayerSpec(1),
        "fc2": LayerSpec(3, "mse", "per_tensor"),
    }
)


def _mixed_policy(model):
    names = list(quantizable_layers(model))
    return LayerwisePolicy({n: s for n, s in zip(names, itertools.cycle(MIX), strict=False)})


def _resnet(x):
    torch.manual_seed(0)
    m = build_model("small_resnet").train()
    with torch.no_grad():
        m(x)  # give BatchNorm non-trivial running statistics
    return m.eval()


@pytest.mark.parametrize(
    "which",
    ["cnn-pgd", "cnn-pgd-large-logits", "vgg-pgd", "vgg-pgd-folded", "small_resnet", "small_resnet-folded"],
)
def test_qonnx_parity_widths_and_cost(which, tmp_path, fmnist_test_1k):
    x = fmnist_test_1k[0][:64]
    base = which.replace("-folded", "").replace("-large-logits", "")
    model = _resnet(x) if base == "small_resnet" else load_float_model(base)[0]
    policy = LARGE_LOGITS if which.endswith("large-logits") else _mixed_policy(model)
    q = quantize(model, policy, calibration_data=x, fold_bn=which.endswith("folded")).eval()
    path = tmp_path / "m.onnx"
    res = export_qonnx(q, path, x[:1], images=fmnist_test_1k[0][100:104])
    assert res.images_checked == 5
    assert res.allowed_diff == DEFAULT_TOL * max(1.0, res.output_scale)
    # a few float32 ulps of the logits, once any rounding-boundary flip (export/flips.py) gets PyTorch's code
    assert res.diff_without_flips <= 1e-6 * max(1.0, res.output_scale)
    assert res.max_abs_diff <= res.allowed_diff or res.boundary_flips
    assert res.layer_bits == {n: s.weight_bit_width for n, s in policy.layers.items()}
    # layers reading one tensor share its quantizer (the widest they ask for), as in the model
    assert res.act_bits == {
        n: int(input_quantizer(q, n).bit_width()) for n, s in policy.layers.items() if s.act_bit_width
    }
    assert res.bipolar_layers == [n for n, s in policy.layers.items() if s.weight_bit_width == 1]
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    assert sum(n.op_type == "BipolarQuant" for n in graph.graph.node) == len(res.bipolar_layers)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no .onnx.data side files, no temp files
    assert res.expected_from == "quantizers" and list(res.weight_bits) == list(policy.layers)
    assert all(r["graph"] == r["quantizers"] for r in res.weight_bits.values())
    cost = inference_cost(path, q)
    assert cost.weight_bits == res.weight_bits
    assert cost.total.mem_w_bits == policy.cost(q, x[:1]).weight_bits
    assert {r.layer for r in cost.layers.values() if r.layer} == set(policy.layers)


def test_parity_tolerance_scales_with_logits_but_catches_a_real_mismatch(tmp_path, fmnist_test_1k):
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    x = fmnist_test_1k[0][:64]
    q = quantize(load_float_model("cnn-pgd")[0], LARGE_LOGITS, calibration_data=x).eval()
    export_qonnx(q, tmp_path / "m.onnx", x[:1])
    mw = ModelWrapper(str(tmp_path / "m.onnx"))
    images = fmnist_test_1k[0][100:108]
    run = lambda a: execute_onnx(mw, {mw.graph.input[0].name: a})[mw.graph.output[0].name]  # noqa: E731
    diff, scale, _ = measure_parity(run, q, x[:1], images)
    assert scale > 10  # large logits: an absolute 1e-5 would be a few ulps wide
    enforce_bound("QONNX", diff, scale, DEFAULT_TOL)
    # a 0.01 % error in one weight scale is a real mismatch, and the relative bound still catches it
    node = next(
        n for n in mw.graph.node if n.op_type == "Quant" and mw.get_initializer(n.input[0]) is not None
    )
    mw.set_initializer(node.input[1], mw.get_initializer(node.input[1]) * np.float32(1 + 1e-4))
    bad_diff, scale, _ = measure_parity(run, q, x[:1], images)
    with pytest.raises(ModelError, match="differs from PyTorch"):
        enforce_bound("QONNX", bad_diff, scale, DEFAULT_TOL)


def test_weight_memory_must_equal_what_the_quantizers_say(tmp_path, fmnist_test_1k):
    x = fmnist_test_1k[0][:16]
    model = load_float_model("cnn-pgd")[0]
    q = quantize(model, LayerwisePolicy(default=LayerSpec(4)), calibration_data=x).eval()
    export_qonnx(q, tmp_path / "ok.onnx", x[:1])
    # re-bitted after quantize: its export is costed at the new bits, the old file no longer matches it
    rebit = apply_policy(q, LayerwisePolicy({"conv2": LayerSpec(8)})).eval()
    res = export_qonnx(rebit, tmp_path / "rebit.onnx", x[:1])
    assert (
        res.weight_bits["conv2"] == {"graph": 36864, "quantizers": 36864}
        and res.policy["layers"]["conv2"]["weight_bit_width"] == 8
    )
    with pytest.raises(
        ModelError,
        match="layer conv2: the exported graph stores 18432 weight bits, the model.s quantizers predict 36864",
    ):
        inference_cost(tmp_path / "ok.onnx", rebit)
    other = quantize(build_model("small_cnn"), LayerwisePolicy(default=LayerSpec(4))).eval()
    with pytest.raises(ModelError, match="match no layer"):
        inference_cost(tmp_path / "ok.onnx", other)


def test_qcdq_parity_in_onnxruntime(tmp_path, fmnist_test_1k):
    model, _ = load_float_model("cnn-pgd")
    x = fmnist_test_1k[0][:32]
    act = quantize(model, LayerwisePolicy(default=LayerSpec(4, act_bit_width=8)), calibration_data=x).eval()
    res = export_qcdq(act, tmp_path / "m.onnx", x[:1], images=x[1:9])
    assert res.max_abs_diff <= res.allowed_diff
    assert res.layer_bits == dict.fromkeys(quantizable_layers(model), 4)
    assert res.act_bits == dict.fromkeys(quantizable_layers(model), 8)
    # every BASIC rewrite on: WeightBiasQuantization rounds the float biases, a real change
    assert res.ort_basic_diff > res.allowed_diff
    weight_only = quantize(model, LayerwisePolicy(default=LayerSpec(4))).eval()
    res = export_qcdq(weight_only, tmp_path / "w.onnx", x[:1], images=x[1:9])
    assert res.max_abs_diff <= res.allowed_diff and res.act_bits == {}
    assert res.ort_basic_diff <= res.allowed_diff  # no input scale: nothing for it to rewrite


def test_qcdq_guard_reads_the_quantizers(tmp_path, fmnist_test_1k):
    model, _ = load_float_model("cnn-pgd")
    x = fmnist_test_1k[0][:8]
    binary = quantize(model, LayerwisePolicy({"fc1": LayerSpec(1)}, default=LayerSpec(4))).eval()
    with pytest.raises(ConfigError, match="1-bit quantizer fc1.weight_quant"):
        export_qcdq(binary, tmp_path / "b.onnx", x[:1])
    wide = quantize(model, LayerwisePolicy(default=LayerSpec(4, act_bit_width=8)), calibration_data=x).eval()
    inj = act_quant_for(10, signed=False)
    wide.fc2.input_quant = inj.proxy_class(wide.fc2, inj)
    with pytest.raises(ConfigError, match="10-bit quantizer fc2.input_quant"):
        export_qcdq(wide, tmp_path / "w.onnx", x[:1])
    assert list(tmp_path.iterdir()) == []


def _edit(src, dst, fn):
    g = onnx.load(str(src))
    fn(g, {i.name: i for i in g.graph.initializer})
    onnx.save(g, str(dst))
    return dst


def _set(init, value):
    init.CopyFrom(
        numpy_helper.from_array(np.asarray(value, dtype=numpy_helper.to_array(init).dtype), init.name)
    )


def test_finn_check_each_failure(tmp_path, fmnist_test_1k):
    model, _ = load_float_model("cnn-pgd")
    x = fmnist_test_1k[0][:32]
    po2 = LayerwisePolicy(
        {"conv2": LayerSpec(4, "po2", act_bit_width=8)}, default=LayerSpec(4, act_bit_width=8)
    )
    q = quantize(model, po2, calibration_data=x).eval()
    good = tmp_path / "a.onnx"
    export_qonnx(q, good, x[:1])
    checks = {c.name: c for c in finn_check(good, model=q, run_finn=False)}
    assert all(c.passed for c in checks.values()), checks
    assert "all 1 po2 layers" in checks["po2_scales"].detail

    def failed(path, **kw):
        return {c.name: c.detail for c in finn_check(path, run_finn=False, **kw) if not c.passed}

    # non-po2 scales where the policy asks for po2: named by layer
    claims = LayerwisePolicy(
        {"fc1": LayerSpec(4, "po2", act_bit_width=8)}, default=LayerSpec(4, act_bit_width=8)
    )
    assert failed(good, policy=claims, model=q) == {"po2_scales": "non-po2 scales: fc1"}
    with pytest.raises(ConfigError, match="needs the model"):
        finn_check(good, policy=claims, run_finn=False)

    def wider(g, inits):
        quant = [n for n in g.graph.node if n.op_type == "Quant" and n.input[0] in inits]
        _set(inits[quant[1].input[3]], 9.0)

    bad = failed(_edit(good, tmp_path / "b.onnx", wider), model=q)
    assert list(bad) == ["integer_bit_widths_le_8"] and "conv2" in bad["integer_bit_widths_le_8"]

    def zero_point(g, inits):
        quant = [n for n in g.graph.node if n.op_type == "Quant" and n.input[0] in inits]
        _set(inits[quant[0].input[2]], 1.0)

    bad = failed(_edit(good, tmp_path / "c.onnx", zero_point), model=q)
    assert list(bad) == ["zero_zero_points"] and "conv1" in bad["zero_zero_points"]

    def sigmoid(g, inits):
        next(n for n in g.graph.node if n.op_type == "Relu").op_type = "Sigmoid"

    bad = failed(_edit(good, tmp_path / "d.onnx", sigmoid))
    assert set(bad) == {"supported_op_types", "no_stranded_float_ops"}
    assert bad["supported_op_types"] == "unsupported: Sigmoid"

    weight_only = LayerwisePolicy(default=LayerSpec(4))
    export_qonnx(quantize(model, weight_only).eval(), tmp_path / "e.onnx", x[:1])
    assert set(failed(tmp_path / "e.onnx", policy=weight_only)) == {
        "input_quantized",
        "matrix_inputs_quantized",
        "relu_feeds_quant",
        "no_stranded_float_ops",
    }


def test_cli_export_both_formats(tmp_path, fmnist_test_1k):
    model, meta = load_float_model("cnn-pgd")
    policy = LayerwisePolicy({"fc1": LayerSpec(2, "mse")}, default=LayerSpec(4, "po2", act_bit_width=8))
    ckpt = tmp_path / "q.pt"
    save_quantized(quantize(model, policy, calibration_data=fmnist_test_1k[0][:32]), ckpt, meta)
    for fmt in ("qonnx", "qcdq"):
        out = tmp_path / f"{fmt}.onnx"
        res = run_cli("export", "--model", str(ckpt), "--format", fmt, "--out", str(out), "--images", "2")
        assert res.returncode == 0, res.stderr
        assert out.is_file()
        assert f"({fmt}); max |ONNX - PyTorch| = " in res.stdout and "on 3 real images" in res.stdout
        lines = {ln.split()[0]: ln.split() for ln in res.stdout.splitlines() if ln.strip()}
        assert lines["fc1"][1:3] == ["2", "float"] and lines["conv1"][1:3] == ["4", "8"]
        if fmt == "qonnx":
            assert "(equal)" in res.stdout and "Gemm_0" in lines and "total" in lines
            assert lines["fc1"][3:] == ["401,408", "/", "401,408"]
            # fc1 has a float input (no act_bit_width): FINN cannot map it, and the checks say so
            finn_lines = [ln for ln in res.stdout.splitlines() if ln.startswith("FINN check")]
            assert len(finn_lines) == 10
            failed = {ln.split()[2] for ln in finn_lines if "FAIL" in ln}
            assert failed == {"matrix_inputs_quantized", "relu_feeds_quant", "no_stranded_float_ops"}
        else:
            assert "WeightBiasQuantization" in res.stdout and "FINN" not in res.stdout


def test_bad_models_and_files(tmp_path):
    with pytest.raises(ModelError, match="no Brevitas quantized layers"):
        export_qonnx(build_model("small_cnn"), tmp_path / "x.onnx", torch.rand(1, 1, 28, 28))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(ModelError, match="not a readable ONNX"):
        inference_cost(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        finn_check(tmp_path / "none.onnx")
    assert not (tmp_path / "x.onnx").exists()


# ---- rounding-boundary flips ---------------------------------------------------------------------
#
# Which elements ONNX and PyTorch compute an ulp apart depends on the CPU's kernels, so no model
# flips on every machine. The tests below place a quantizer input exactly on a rounding boundary in
# PyTorch and make the ONNX side compute it one or two float32 ulps away (what another summation order does)
# by wrapping qonnx's Quant executor; everything else runs unchanged.


class ExampleNet(nn.Module):
    """MyBrevitasNet of examples/wrap_existing_brevitas.py, narrower: 8-bit input, conv-BN-ReLU-pool x2,
    linear. relu2 has a parameter scale (``max_val / 255``) so a test can put an input on a boundary."""

    def __init__(self) -> None:
        super().__init__()
        self.quant_inp = qnn.QuantIdentity(bit_width=8, return_quant_tensor=False)
        self.conv1 = qnn.QuantConv2d(1, 4, 3, padding=1, bias=False, weight_bit_width=8)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = qnn.QuantReLU(bit_width=8)
        self.conv2 = qnn.QuantConv2d(4, 8, 3, padding=1, bias=False, weight_bit_width=4)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu2 = qnn.QuantReLU(act_quant=Uint8ActPerTensorFloatMaxInit, max_val=4.0)
        self.fc = qnn.QuantLinear(8 * 7 * 7, 10, bias=True, weight_bit_width=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant_inp(x)
        x = F.max_pool2d(self.relu1(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(self.relu2(self.bn2(self.conv2(x))), 2)
        return self.fc(torch.flatten(x, 1))


def _relu2_input(model, x):
    """What relu2's integer quantizer receives for ``x`` (float32, after the ReLU)."""
    seen = {}
    int_quant = model.relu2.act_quant.fused_activation_quant_proxy.tensor_quant.int_quant
    handle = int_quant.register_forward_hook(lambda _m, args, _out: seen.update(x=args[3].detach().clone()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen["x"].numpy()


def _example_net_on_a_boundary(x):
    """ExampleNet with relu2's scale chosen so its largest input for ``x`` is exactly k + 0.5 steps.

    Returns the model, that element's index, k, and relu2's scale. The scale is ``value / 255`` in
    float32; the value is searched among float32 neighbours until PyTorch's own division lands on
    k + 0.5 exactly, which is then checked on PyTorch's quantizer, not assumed.
    """
    torch.manual_seed(0)
    model = ExampleNet().train()
    with torch.no_grad():
        model(x)  # BatchNorm statistics and the runtime activation scales
    model.eval()
    inp = _relu2_input(model, x[:1])
    e = np.unravel_index(np.argmax(inp), inp.shape)  # the largest: it survives both max-pools
    value = model.relu2.act_quant.fused_activation_quant_proxy.tensor_quant.scaling_impl.value
    k0 = int(inp[e] / np.float32(value.item() / 255))
    k, v = next(
        (k, v)
        for k in sorted(range(1, 255), key=lambda k: abs(k - k0))  # a scale near the calibrated one
        for v in _float32_neighbours(np.float32(inp[e] / (k + 0.5) * 255), 4)
        if inp[e] / (v / np.float32(255)) == np.float32(k + 0.5)
    )
    with torch.no_grad():
        value.fill_(float(v))
    scale = model.relu2.act_quant.scale().item()
    assert np.float32(inp[e]) / np.float32(scale) == np.float32(k + 0.5)  # PyTorch's scale, checked
    return model, e, k, scale


def _float32_neighbours(v, n):
    """``v`` and the ``n`` float32 values on each side of it."""
    out = [v]
    for direction in (np.inf, -np.inf):
        w = v
        for _ in range(n):
            w = np.nextafter(w, np.float32(direction))
            out.append(w)
    return out


def _wrap_quant_exec(monkeypatch, input_shape, *, before=None, after=None):
    """Wrap qonnx's Quant executor: at Quant nodes whose input has ``input_shape``, ``before`` maps
    the input (as if computed so upstream), ``after`` the output. Wrapping twice stacks."""
    from qonnx.custom_op.general.intquant import IntQuant

    original = IntQuant.execute_node

    def execute_node(self, context, graph):
        node = self.onnx_node
        hit = context[node.input[0]].shape == input_shape
        if hit and before:
            context[node.input[0]] = before(context[node.input[0]].copy())
        original(self, context, graph)
        if hit and after:
            context[node.output[0]] = after(context[node.output[0]].copy())

    monkeypatch.setattr(IntQuant, "execute_node", execute_node)


def test_example_net_with_a_flip_at_a_rounding_boundary_passes(tmp_path, monkeypatch, fmnist_test_1k):
    x = fmnist_test_1k[0][:64]
    model, e, k, scale = _example_net_on_a_boundary(x)
    inp = _relu2_input(model, x[:1])
    # PyTorch rounds k + 0.5 half to even; ONNX gets the input the fewest float32 ulps (1 or 2) to the
    # other side that make its division leave k + 0.5, so it rounds the other way
    away = np.float32(np.inf if k % 2 == 0 else -np.inf)
    moved = np.nextafter(inp[e], away)
    while moved / np.float32(scale) == np.float32(k + 0.5):
        moved = np.nextafter(moved, away)
    assert abs(moved - inp[e]) <= 2 * np.spacing(inp[e])

    def ulps_off(a):
        if abs(a[e] - inp[e]) < 1e-6:  # the example input (image 0), not the others
            a[e] = moved
        return a

    _wrap_quant_exec(monkeypatch, inp.shape, before=ulps_off)
    res = export_qonnx(model, tmp_path / "m.onnx", x[:1], images=x[1:3])
    assert res.boundary_flips >= 1 and sum(res.flip_detail.values()) == res.boundary_flips
    assert any(where.endswith("(relu2.act_quant)") for where in res.flip_detail), res.flip_detail
    # the flip moves the logits by a quantization step: the plain bound alone would have failed
    assert res.max_abs_diff > res.allowed_diff >= res.diff_without_flips
    assert (tmp_path / "m.onnx").is_file()

    # a flip does not excuse a real mismatch elsewhere: fc's quantized weights 0.1 % off still fail
    _wrap_quant_exec(monkeypatch, (10, 392), after=lambda w: w * np.float32(1 + 1e-3))
    with pytest.raises(ModelError, match=r"QONNX \(with 1 rounding-boundary flips .*\) output differs"):
        export_qonnx(model, tmp_path / "bad.onnx", x[:1])
    assert not (tmp_path / "bad.onnx").exists()


def test_one_step_away_from_a_boundary_fails(tmp_path, monkeypatch, fmnist_test_1k):
    x = fmnist_test_1k[0][:64]
    model, _, _, scale = _example_net_on_a_boundary(x)
    inp = _relu2_input(model, x[:1])
    t = inp / np.float32(scale)
    # an element as far from a boundary as it gets: its code is one step off, and float noise cannot say why
    e = np.unravel_index(np.argmin(np.where(inp > 0, np.abs(t - np.round(t)), np.inf)), t.shape)

    def one_step_up(out):
        out[e] += np.float32(scale)
        return out

    _wrap_quant_exec(monkeypatch, inp.shape, after=one_step_up)
    with pytest.raises(ModelError, match=r"\(relu2.act_quant\) on image 0 gives 1 of 1568 codes that differ"):
        export_qonnx(model, tmp_path / "m.onnx", x[:1])
    assert not (tmp_path / "m.onnx").exists()


def test_flip_criterion_on_values_exactly_at_a_boundary():
    """``boundary_flips`` on hand-made values: scale 0.25, inputs 0.125 (t = 0.5 exactly), 0.5, 0.3."""
    params = (np.float32(0.25), np.float32(0.0), np.float32(8.0))
    x_torch = np.array([0.125, 0.5, 0.3], np.float32)  # codes 0 (half to even), 2, 1
    call = QuantCall("q.act_quant", x_torch, np.array([0, 0.5, 0.25], np.float32), *params[:2], 8.0)
    x_onnx = x_torch.copy()
    x_onnx[0] = np.nextafter(x_onnx[0], np.float32(1))  # one ulp above the boundary: code 1

    def codes(*c):
        return np.array(c, np.float32) * params[0]

    differs, legit = boundary_flips(x_onnx, codes(1, 2, 1), params, call, DEFAULT_TOL)
    assert differs.tolist() == [True, False, False] and legit.tolist() == [True, False, False]
    differs, legit = boundary_flips(x_onnx, codes(1, 3, 1), params, call, DEFAULT_TOL)  # t = 2.0 -> 3
    assert differs.tolist() == [True, True, False] and legit.tolist() == [True, False, False]
    differs, legit = boundary_flips(x_onnx, codes(2, 2, 1), params, call, DEFAULT_TOL)  # two steps
    assert differs.tolist() == [True, False, False] and legit.tolist() == [False, False, False]

    class Node:
        name = "Quant_9"

    big = np.ones(2000, bool)
    assert check_flips(Node, 0, call, big & (np.arange(2000) < 2), big) == 2  # 2 of 2000: 1e-3
    with pytest.raises(ModelError, match="3 rounding-boundary flips, more than float32 noise explains"):
        check_flips(Node, 0, call, big & (np.arange(2000) < 3), big)


# ---- exporter failures ---------------------------------------------------------------------------


class PoolNet(nn.Module):
    """A 2x2 adaptive average pool over a 7x7 map, called as a function or as a module."""

    def __init__(self, module: bool) -> None:
        super().__init__()
        self.quant_inp = qnn.QuantIdentity(bit_width=8, return_quant_tensor=False)
        self.conv = qnn.QuantConv2d(1, 4, 3, stride=4, bias=False, weight_bit_width=4)
        self.pool = nn.AdaptiveAvgPool2d(2) if module else None
        self.fc = qnn.QuantLinear(16, 10, bias=True, weight_bit_width=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.quant_inp(x))
        x = self.pool(x) if self.pool is not None else F.adaptive_avg_pool2d(x, 2)
        return self.fc(torch.flatten(x, 1))


@pytest.mark.parametrize("module", [False, True], ids=["function", "module"])
def test_unexportable_op_is_one_line_and_writes_nothing(module, tmp_path, capfd):
    x = torch.rand(1, 1, 28, 28)
    where = "in pool (AdaptiveAvgPool2d)" if module else "in PoolNet.forward"
    for export, fmt in ((export_qonnx, "QONNX"), (export_qcdq, "QCDQ")):
        path = tmp_path / f"{fmt}.onnx"
        with pytest.raises(ModelError) as err:
            export(PoolNet(module).eval(), path, x)
        msg = str(err.value)
        assert "\n" not in msg and len(msg) < 400, msg
        assert msg.startswith(f"{fmt} export: torch.onnx cannot export adaptive_avg_pool2d ({where}")
        assert "output size that are not factor of input size" in msg
        assert "-- fix: use an output size that divides the feature map" in msg
        assert not path.exists()
    assert list(tmp_path.iterdir()) == []
    assert "Torch IR graph" not in capfd.readouterr().out  # torch's graph dump is not passed on
