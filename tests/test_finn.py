"""FINN for real: finn-plus's own builder steps on the files aq-brevitas writes, and the static checks
that must never pass a file FINN rejects (``make setup`` installs finn-plus from the lock)."""

from __future__ import annotations

import json
import subprocess
import sys

import brevitas.nn as qnn
import pytest
import torch
from brevitas.quant import Int32Bias
from brevitas_examples.bnn_pynq.models import model_with_cfg
from torch import nn

from aq_brevitas import LayerSpec, LayerwisePolicy, apply_policy, export_qonnx, load_float_model, quantize
from aq_brevitas.errors import ConfigError, ModelError
from aq_brevitas.export import FinnReport, finn_available, finn_check
from aq_brevitas.quantization.checkpoint import save_quantized
from conftest import run_cli

PARTITION_MSG = "Unsupported/unmapped layer(s) found in between FINN operators"
NEW_CHECKS = ("input_quantized", "matrix_inputs_quantized", "relu_feeds_quant", "no_stranded_float_ops")


def _zoo(tmp_path, x, net, spec, name, **kw):
    model, _ = load_float_model(net)
    q = quantize(model, LayerwisePolicy(default=spec), calibration_data=x[:32], **kw).eval()
    path = tmp_path / f"{name}.onnx"
    export_qonnx(q, path, x[:1])
    return path, q


def _failed(report: FinnReport) -> set[str]:
    return {c.name for c in report if not c.passed}


def _finn_ok(report: FinnReport) -> None:
    """FINN's front end through the estimates: ONE partition with every compute node, exec diff in bound."""
    run = report.finn
    assert run is not None and report.finn_passed, report.to_markdown()
    assert [s.name for s in run.steps][-1] == "step_generate_estimate_reports"
    diffs = [s.max_diff for s in run.steps if s.max_diff is not None]
    assert len(diffs) == 6 and max(diffs) <= run.allowed_diff  # every step up to the partition ran in Python
    assert run.partitions == 1 and run.compute_outside == [], run.outside_partition
    e = run.estimates
    assert e.throughput_fps > 0 and e.total["LUT"] > 0 and any(k.startswith("MVAU") for k in e.layers)


def test_finn_plus_is_installed():
    assert finn_available(), "finn-plus is missing: `make setup` installs it from requirements/lock.txt"


# -- the six false passes of issue 15: activation quantizers at the next layer's input ------------------
SIX = [
    ("cnn-pgd", LayerSpec(4, "max", "per_tensor", act_bit_width=4)),
    ("cnn-pgd", LayerSpec(4, "po2", "per_channel", act_bit_width=8)),
    ("cnn-pgd", LayerSpec(4, "max", "per_channel", act_bit_width=4)),
    ("vgg-pgd", LayerSpec(4, "max", "per_tensor", act_bit_width=4)),
    ("vgg-pgd", LayerSpec(4, "po2", "per_channel", act_bit_width=8)),
    ("vgg-pgd", LayerSpec(4, "po2", "per_tensor", act_bit_width=4)),
]


@pytest.mark.parametrize("net,spec", SIX, ids=[f"{n}-{s.short()}" for n, s in SIX])
def test_input_placed_activations_fail_the_fast_checks_and_finn_itself(net, spec, tmp_path, fmnist_test_1k):
    path, q = _zoo(tmp_path, fmnist_test_1k[0], net, spec, "in", act_placement="input")
    report = finn_check(path, model=q, inputs=fmnist_test_1k[0][:1])
    assert not report.passed and report.finn_passed is False  # the static verdict is FINN's, per model
    assert report.failed_step.name == "step_create_dataflow_partition"
    assert _failed(report) == {"relu_feeds_quant", "no_stranded_float_ops"}, report.to_markdown()
    detail = {c.name: c.detail for c in report}
    assert "Relu_0 -> MaxPool" in detail["relu_feeds_quant"]
    assert "MaxPool_0" in detail["no_stranded_float_ops"] and "Flatten_0" in detail["no_stranded_float_ops"]


def test_input_placed_activations_fail_in_finn_itself(tmp_path, fmnist_test_1k):
    x = fmnist_test_1k[0]
    path, q = _zoo(tmp_path, x, "cnn-pgd", SIX[0][1], "in", act_placement="input")
    report = finn_check(path, model=q, inputs=x[:1])
    step = report.failed_step
    assert step.name == "step_create_dataflow_partition" and PARTITION_MSG in step.message
    assert "starting with node MaxPool_0" in step.message and "\n" not in step.message
    assert report.finn.estimates is None and report.finn_passed is False
    assert "FINN step_create_dataflow_partition: FINNUserError" in report.failure()


# -- FINN-ready files: the zoo nets with activations at their producers, Brevitas's own FINN models -------
READY = [
    ("cnn-pgd", LayerSpec(4, "max", "per_tensor", act_bit_width=4), False),
    ("vgg-pgd", LayerSpec(4, "po2", "per_channel", act_bit_width=4), False),
    ("vgg-pgd", LayerSpec(4, "max", "per_tensor", act_bit_width=4), True),
    ("tfc-pgd", LayerSpec(4, "max", "per_tensor", act_bit_width=4), True),  # FINN's own first example
]


@pytest.mark.parametrize("net,spec,fold", READY, ids=[f"{n}-{s.short()}-fold{f}" for n, s, f in READY])
def test_zoo_w4a4_reaches_one_partition(net, spec, fold, tmp_path, fmnist_test_1k):
    x = fmnist_test_1k[0]
    path, q = _zoo(tmp_path, x, net, spec, "ready", fold_bn=fold)
    report = finn_check(path, model=q, inputs=x[:1])
    assert report.static_passed, report.to_markdown()
    _finn_ok(report)


@pytest.mark.parametrize("name,shape", [("tfc_2w2a", (1, 1, 28, 28)), ("cnv_2w2a", (1, 3, 32, 32))])
def test_bnn_pynq_rebitted_passes_finn(name, shape, tmp_path, fmnist_test_1k):
    torch.manual_seed(0)
    model, _ = model_with_cfg(name, False)
    q = apply_policy(model.eval(), LayerwisePolicy(default=LayerSpec(4, "max", "per_tensor"))).eval()
    x = fmnist_test_1k[0][:1] if shape[1] == 1 else torch.rand(*shape)  # no CIFAR-10 here
    path = tmp_path / f"{name}.onnx"
    export_qonnx(q, path, x)
    report = finn_check(path, model=q, inputs=x)
    assert report.passed and not _failed(report), report.to_markdown()  # TFC's 2x-1 input is absorbed
    _finn_ok(report)


def test_weight_only_fails_the_static_checks(tmp_path, fmnist_test_1k):
    path, q = _zoo(tmp_path, fmnist_test_1k[0], "cnn-pgd", LayerSpec(4), "w4")
    report = finn_check(path, model=q, run_finn=False)
    assert _failed(report) == set(NEW_CHECKS)
    detail = {c.name: c.detail for c in report}
    assert "conv1 (Conv_0) <- the graph input" in detail["matrix_inputs_quantized"]
    assert "conv2 (Conv_1) <- MaxPool_0 <- Relu_0" in detail["matrix_inputs_quantized"]


# -- each new static check: a file where it fails and one where it passes, FINN agreeing -------------------
class _Small(nn.Module):
    """QuantIdentity -> QuantConv2d [-> ReLU / QuantReLU / MaxPool...] -> QuantLinear on 1x8x8 inputs."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        conv_bias = Int32Bias if kind == "conv_bias" else None
        self.inp = qnn.QuantIdentity(bit_width=8, return_quant_tensor=True)
        self.conv = qnn.QuantConv2d(
            1,
            4,
            3,
            bias=kind == "conv_bias",
            weight_bit_width=4,
            bias_quant=conv_bias,
            return_quant_tensor=True,
        )
        self.act = qnn.QuantReLU(bit_width=9 if kind == "wide" else 4, return_quant_tensor=True)
        self.pool_q = qnn.QuantIdentity(bit_width=4, return_quant_tensor=True)
        side = 3 if kind == "pool" else 6
        self.fc = qnn.QuantLinear(4 * side * side, 10, bias=True, weight_bit_width=4, bias_quant=Int32Bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.inp(x))
        y = self.pool_q(nn.functional.max_pool2d(y, 2)) if self.kind == "pool" else self.act(y)
        return self.fc(torch.flatten(y, 1))


@pytest.mark.parametrize(
    "kind,fails",
    [
        ("linear_bias", set()),  # Int32Bias on the Linear: a bias Quant, not a 32-bit activation
        ("pool", set()),  # conv -> max-pool -> QuantIdentity: FINN maps the pool, nothing stranded
        ("conv_bias", {"no_conv_bias_quant"}),
        ("wide", {"integer_bit_widths_le_8"}),
    ],
)
def test_small_graphs_static_checks_agree_with_finn(kind, fails, tmp_path):
    torch.manual_seed(0)
    model = _Small(kind)
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(8, 1, 8, 8))  # a few training-mode passes set the activation scales
    x = torch.rand(1, 1, 8, 8)
    path = tmp_path / f"{kind}.onnx"
    export_qonnx(model.eval(), path, x, check=False)
    report = finn_check(path, inputs=x)
    assert _failed(report) == fails, report.to_markdown()
    if fails:
        assert report.finn_passed is False
    else:
        _finn_ok(report)
    if kind == "linear_bias":
        bits = next(c for c in report if c.name == "integer_bit_widths_le_8")
        assert "1 bias Quant(s) not counted" in bits.detail
    if kind == "conv_bias":  # what FINN says (qonnx's ExtractBiasFromConv inside step_qonnx_to_finn)
        assert report.failed_step.name == "step_qonnx_to_finn"
        assert "cannot reshape array of size 1 into shape (1,4,1,1)" in report.failed_step.message


# -- errors, reports, the CLI ---------------------------------------------------------------------------
def test_bad_files_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        finn_check(tmp_path / "none.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(ModelError, match="not a readable ONNX"):
        finn_check(bad)


def test_cli_export_finn_writes_the_reports(tmp_path, fmnist_test_1k):
    model, meta = load_float_model("cnn-pgd")
    policy = LayerwisePolicy(default=LayerSpec(4, "po2", "per_channel", act_bit_width=4))
    ckpt = tmp_path / "q.pt"
    save_quantized(quantize(model, policy, calibration_data=fmnist_test_1k[0][:32]), ckpt, meta)
    out = tmp_path / "q.onnx"
    res = run_cli("export", "--model", str(ckpt), "--format", "finn", "--out", str(out), "--images", "2")
    assert res.returncode == 0, res.stderr
    assert "| step_generate_estimate_reports | ok |" in res.stdout and "FPS" in res.stdout
    reports = out.with_suffix(".finn")
    assert out.is_file() and (reports / "summary.md").read_text().rstrip().endswith("FINN-ready")
    perf = json.loads((reports / "estimate_network_performance.json").read_text())
    assert perf["estimated_throughput_fps"] > 0
    saved = json.loads((reports / "finn_report.json").read_text())
    assert saved["passed"] and saved["finn"]["partitions"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_cli_export_finn_without_finn_plus_says_how_to_install(tmp_path):
    code = (
        "import sys; sys.modules['finn'] = None; from aq_brevitas.cli import main; "
        f"sys.exit(main(['export', '--model', 'x.pt', '--format', 'finn', '--out', {str(tmp_path / 'q.onnx')!r}]))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "pip install -e '.[finn]'" in res.stderr and "finn-plus" in res.stderr
