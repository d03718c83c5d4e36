"""FINN's own model shapes (issue 24, cases 22, 22b, 26, 29), each on a tiny model of our own:

* ``target="finn"`` lays a global-average-pool head and residual adds out as FINN needs (a quantizer
  before FINN's averaging unit, one quantizer per reader, re-quantized add inputs): ``small_resnet`` and
  a MobileNet-v1-shaped net reach ONE dataflow partition in FINN's own front end, and FINN's
  streamlined model runs what the PyTorch model runs;
* activations FINN cannot map are refused by ``quantize`` and ``search_policy`` in one line;
* the value-copying ops (:data:`~aq_brevitas.quantization.value_ops.VALUE_COPYING_OPS`) are followed by
  placement, the export read-back and the static checks;
* the static verdict and FINN's verdict agree, model by model, on the shapes above and on shapes the
  case scripts do not show (a concatenation, padding and nearest upsampling).
"""

from __future__ import annotations

import brevitas.nn as qnn
import pytest
import torch
from brevitas.quant import Int32Bias
from torch import nn
from torch.nn import functional as F

from aq_brevitas import (
    LayerSpec,
    LayerwisePolicy,
    SearchConfig,
    apply_policy,
    build_model,
    export_qonnx,
    input_quantizer,
    quantize,
    search_policy,
)
from aq_brevitas.errors import PolicyError
from aq_brevitas.export import finn_check
from aq_brevitas.quantization.act_sites import FinnAvgPool
from aq_brevitas.quantization.checkpoint import load_quantized, save_quantized
from aq_brevitas.quantization.value_ops import VALUE_COPYING_OPS

W4A4 = LayerwisePolicy(default=LayerSpec(4, act_bit_width=4))


def _dw_sep(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
        nn.BatchNorm2d(cin),
        nn.ReLU(),
        nn.Conv2d(cin, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class TinyMobileNet(nn.Module):
    """Case 22: FINN's end-to-end MobileNet-v1 in small (depthwise-separable blocks, a strided one,
    global average pooling, a Linear head)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.features = nn.Sequential(_dw_sep(8, 16, 1), _dw_sep(16, 16, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(self.stem(x))).flatten(1))


def _randomize_bn(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _finn_one_partition(tmp_path, q: nn.Module, x: torch.Tensor, name: str):
    path = tmp_path / f"{name}.onnx"
    res = export_qonnx(q, path, x[:1], images=x[1:4])
    report = finn_check(path, model=q, inputs=x[:1], run_finn=True)
    assert report.static_passed and report.finn_passed, report.to_markdown()
    run = report.finn
    assert run.partitions == 1 and run.compute_outside == [], run.outside_partition
    with torch.no_grad():
        largest = float(q(x[:1]).abs().max())
    # FINN's Python execution of the streamlined model against the PyTorch model itself
    assert run.streamlined_vs_model is not None and run.streamlined_vs_model <= 1e-5 * max(1.0, largest)
    return res, report


@pytest.mark.parametrize("fold", [True])
def test_small_resnet_w4a4_reaches_one_finn_partition(fold, tmp_path):
    torch.manual_seed(0)
    x = torch.rand(16, 1, 28, 28)
    q = quantize(
        _randomize_bn(build_model("small_resnet")), W4A4, calibration_data=x, fold_bn=fold, target="finn"
    )
    q = q.eval()
    res, _ = _finn_one_partition(tmp_path, q, x, "resnet")
    assert res.act_bits == {n: 4 for n in res.layer_bits}  # the fc reads FINN's averaging unit at 4 bits
    assert any(isinstance(m, FinnAvgPool) for m in q.modules())


def test_finn_layout_is_kept_by_a_rebit_and_by_a_checkpoint(tmp_path):
    """apply_policy re-bits the pool, the add and fork quantizers in place (none added); a checkpoint
    replays the same layout and the same outputs."""
    torch.manual_seed(0)
    x = torch.rand(16, 1, 28, 28)
    q = quantize(
        _randomize_bn(build_model("small_resnet")), W4A4, calibration_data=x, fold_bn=True, target="finn"
    )
    q = q.eval()

    def act_modules(model: nn.Module) -> list[str]:
        kinds = ("QuantIdentity", "QuantReLU", "FinnAvgPool")
        return sorted(n for n, m in model.named_modules() if type(m).__name__ in kinds)

    r = apply_policy(q, LayerwisePolicy(default=LayerSpec(4, act_bit_width=6)), calibration_data=x).eval()
    assert act_modules(r) == act_modules(q)
    assert {int(m.act_quant.bit_width()) for n, m in r.named_modules() if n in act_modules(r)} == {6}
    ckpt = tmp_path / "q.pt"
    save_quantized(q, ckpt, {"arch": "small_resnet", "fold_bn": True})
    loaded, _ = load_quantized(ckpt, build_model("small_resnet"))
    assert act_modules(loaded) == act_modules(q)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), q(x))


def test_mobilenet_v1_shaped_net_reaches_one_finn_partition(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(16, 1, 28, 28)
    policy = LayerwisePolicy(
        {"stem.0": LayerSpec(8, "max", "per_channel", act_bit_width=8)},
        default=LayerSpec(4, "max", "per_channel", act_bit_width=4),
    )
    q = quantize(
        _randomize_bn(TinyMobileNet()), policy, calibration_data=x, fold_bn=True, target="finn"
    ).eval()
    assert not [n for n, m in q.named_modules() if isinstance(m, nn.BatchNorm2d)]
    res, report = _finn_one_partition(tmp_path, q, x, "mnet")
    assert res.layer_bits["stem.0"] == 8 and res.act_bits["stem.0"] == 8
    assert all(b == 4 for n, b in res.layer_bits.items() if n != "stem.0")
    assert any(k.startswith("VVAU") for k in report.finn.estimates.layers)  # depthwise convs in FINN's unit


def test_float_global_pool_after_a_hand_placed_quantizer_fails_static_and_finn_alike(tmp_path):
    """Case 22b: QuantReLU -> float GlobalAveragePool -> QuantIdentity. FINN leaves a float Mul after its
    GlobalAccPool; the static checks now say so instead of passing the file."""
    torch.manual_seed(0)

    class HandPlaced(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = qnn.QuantIdentity(bit_width=8, return_quant_tensor=True)
            self.conv = qnn.QuantConv2d(1, 8, 3, 2, 1, weight_bit_width=4, bias=False)
            self.relu = qnn.QuantReLU(bit_width=4)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.pool_q = qnn.QuantIdentity(bit_width=4, return_quant_tensor=True)
            self.fc = qnn.QuantLinear(8, 10, bias=True, weight_bit_width=4, bias_quant=Int32Bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.pool_q(self.pool(self.relu(self.conv(self.inp(x))))).flatten(1))

    model = HandPlaced()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(8, 1, 16, 16))
    x = torch.rand(1, 1, 16, 16)
    path = tmp_path / "hand.onnx"
    export_qonnx(model.eval(), path, x, check=False)
    report = finn_check(path, inputs=x, run_finn=True)
    detail = {c.name: c.detail for c in report if not c.passed}
    assert set(detail) == {"no_stranded_float_ops"} and "GlobalAveragePool" in detail["no_stranded_float_ops"]
    assert "averaging unit" in detail["no_stranded_float_ops"]
    assert report.finn_passed is False and report.failed_step.name == "step_create_dataflow_partition"


def test_batchnorm_before_the_first_quantizer_passes_static_as_finn_builds_it(tmp_path):
    """Case 26: an input BatchNorm FINN absorbs into its thresholds; the input check used to fail it."""

    class InputBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn_in = nn.BatchNorm2d(1)
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 7 * 7, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(F.max_pool2d(torch.relu(self.conv(self.bn_in(x))), 2).flatten(1))

    torch.manual_seed(0)
    m = InputBN().eval()
    with torch.no_grad():
        m.bn_in.weight.mul_(8.0)
        m.bn_in.running_mean.fill_(0.3)
    x = torch.rand(16, 1, 14, 14)
    q = quantize(m, W4A4, calibration_data=x, fold_bn=True, target="finn").eval()
    assert isinstance(q.get_submodule("bn_in"), nn.BatchNorm2d)  # nothing before it to fold into
    _finn_one_partition(tmp_path, q, x, "inputbn")


class _Cat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.fc = nn.Linear(8 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)
        return self.fc(F.relu(self.c(y)).flatten(1))


def test_concatenation_gets_one_scale_and_static_and_finn_agree(tmp_path):
    """Not in the case scripts: a concatenation. Its inputs share one quantizer (one scale); FINN's
    default streamlining still leaves the scale in front of the Concat, and both verdicts say no."""
    torch.manual_seed(0)
    x = torch.rand(16, 1, 14, 14)
    q = quantize(_Cat().eval(), W4A4, calibration_data=x, target="finn").eval()
    shared = q.get_submodule("cat_quant")
    assert not shared.act_quant.is_signed  # both inputs are ReLU outputs
    assert input_quantizer(q, "c") is shared.act_quant
    path = tmp_path / "cat.onnx"
    res = export_qonnx(q, path, x[:1])
    assert res.act_bits == {n: 4 for n in res.layer_bits}
    report = finn_check(path, model=q, inputs=x[:1], run_finn=True)
    bad = {c.name: c.detail for c in report if not c.passed}
    assert set(bad) == {"no_stranded_float_ops"} and "Concat" in bad["no_stranded_float_ops"]
    assert report.finn_passed is False and "Concat" in report.failed_step.message


class _PadUp(nn.Module):
    """Nearest upsampling, reflection padding and a slice between two quantized layers."""

    def __init__(self, pad_value: float | None = None) -> None:
        super().__init__()
        self.pad_value = pad_value
        self.a = nn.Conv2d(1, 4, 3, stride=2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.b = nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(F.relu(self.a(x)))  # 28 -> 13 -> 26
        if self.pad_value is None:
            y = F.pad(y, (1, 1, 1, 1), mode="reflect")[:, :, :28, :28]
        else:
            y = F.pad(y, (1, 1, 1, 1), value=self.pad_value)
        return self.fc(F.max_pool2d(F.relu(self.b(y)), 4).flatten(1))


def test_value_copying_ops_are_followed_by_placement_readback_and_static_checks(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(8, 1, 28, 28)
    q = quantize(_PadUp().eval(), W4A4, calibration_data=x, target="finn").eval()
    # the quantizer of b's input sits right after the ReLU, through upsampling, padding and slicing
    assert type(q.get_submodule("relu")).__name__ == "QuantReLU"
    assert not [n for n, m in q.named_modules() if type(m).__name__ == "QuantIdentity" and "pad" in n]
    assert int(input_quantizer(q, "b").bit_width()) == 4
    path = tmp_path / "padup.onnx"
    res = export_qonnx(q, path, x[:1])
    assert res.act_bits == {"a": 4, "b": 4, "fc": 4}  # read back through Resize, Pad and Slice
    report = finn_check(path, model=q, run_finn=False)
    bad = {c.name: c.detail for c in report if not c.passed}
    assert (
        set(bad) == {"supported_op_types"} and "Pad" in bad["supported_op_types"]
    )  # FINN has no Slice/reflect


def test_a_constant_pad_with_a_non_zero_value_is_not_value_copying():
    torch.manual_seed(0)
    x = torch.rand(8, 1, 28, 28)
    q = quantize(_PadUp(pad_value=0.5).eval(), W4A4, calibration_data=x).eval()
    assert [n for n, m in q.named_modules() if type(m).__name__ == "QuantIdentity" and n.startswith("pad")]
    kinds = {op.kind for op in VALUE_COPYING_OPS}
    assert {"pad", "slice", "concat", "nearest upsampling", "max-pool", "flatten", "reshape"} <= kinds


class _ActNet(nn.Module):
    """Case 29: SiLU, Hardswish and a LeakyReLU where FINN needs ReLUs."""

    def __init__(self, act: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.act1 = act if act is not None else nn.SiLU()
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act1(self.conv1(x)).flatten(1))


@pytest.mark.parametrize("act", [nn.SiLU(), nn.Hardswish(), nn.Sigmoid(), nn.GELU(), nn.ReLU6()])
def test_activations_finn_cannot_map_are_refused_in_one_line(act):
    with pytest.raises(PolicyError) as info:
        quantize(_ActNet(act), W4A4, calibration_data=torch.rand(4, 1, 8, 8), target="finn")
    msg = str(info.value)
    assert (
        "\n" not in msg and "module act1" in msg and type(act).__name__ in msg and "fix: use nn.ReLU" in msg
    )
    quantize(_ActNet(act), W4A4, calibration_data=torch.rand(4, 1, 8, 8))  # target="generic" takes it


def test_a_functional_gelu_is_refused_and_search_policy_refuses_before_any_work():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(F.gelu(self.fc1(x)))

    with pytest.raises(PolicyError, match=r"forward's call gelu is a GELU.*fix: use nn.ReLU"):
        quantize(Functional(), W4A4, target="finn")
    x = torch.rand(16, 1, 8, 8)
    with pytest.raises(PolicyError, match=r"module act1 is a SiLU"):
        search_policy(
            _ActNet(),
            (x, torch.zeros(16, dtype=torch.long)),
            "avg-bits=4",
            config=SearchConfig(target="finn"),
        )


def test_the_finn_refusal_names_each_module_with_its_own_type():
    net = nn.Sequential(nn.Linear(4, 4), nn.SiLU(), nn.Linear(4, 4), nn.Hardswish(), nn.Linear(4, 2))
    with pytest.raises(PolicyError, match=r"module 1 is a SiLU \(module 3 a Hardswish too\)"):
        quantize(net, LayerwisePolicy(default=LayerSpec(4, act_bit_width=4)), target="finn")
