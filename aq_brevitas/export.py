"""Export to FPGA toolchains: QONNX for FINN, QCDQ ONNX for onnxruntime -- parity-checked, costed.

* :func:`export_qonnx`: Brevitas ``export_qonnx(dynamo=False, opset_version=13)`` (the TorchScript
  path FINN's own tests use; the dynamo path breaks residual models carrying QuantTensors and writes
  ``.onnx.data`` side files), then qonnx ``cleanup_model``, then execution of the cleaned graph with
  qonnx's ``execute_onnx`` against the PyTorch output. A difference above ``tol`` is an error.
* :func:`export_qcdq`: Brevitas ``export_onnx_qcdq`` (≤ 8-bit, no 1-bit layers), run in onnxruntime
  without graph optimisations (the exact semantics; the parity check). The difference with BASIC
  optimisations is reported too: measured here, BASIC's fusions move models with activation
  quantizers by 1e-2..3e-2 on the logits, while weight-only models stay exact.
* :func:`inference_cost`: qonnx ``inference_cost`` (BOPs, weight bits) per layer and in total.
* :func:`finn_check`: what FINN's QONNX→FINN conversion needs, checked on the file (FINN itself needs
  Vivado and is not run here).

Every file is written to a temporary path and renamed into place only after its check passed.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, ModelError
from .layers import quantizable_layers
from .storage import atomic_write_with

DEFAULT_TOL = 1e-5
WEIGHT_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")


@dataclass
class ExportResult:
    """What an export produced and how well it matched PyTorch."""

    path: str
    format: str
    max_abs_diff: float
    images_checked: int
    layer_bits: dict[str, int] = field(default_factory=dict)  # weight bits per layer found in the graph
    bipolar_layers: list[str] = field(default_factory=list)
    policy: dict[str, Any] | None = None
    opset: int = 13
    ort_basic_diff: float | None = (
        None  # QCDQ only: the same check with onnxruntime's BASIC graph optimisations
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_model(model: nn.Module) -> None:
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer as QuantWBIOL

    if not isinstance(model, nn.Module):
        raise ModelError(
            f"cannot export a {type(model).__name__}", "pass the nn.Module returned by aq_brevitas.quantize"
        )
    if not any(isinstance(m, QuantWBIOL) for m in model.modules()):
        raise ModelError(
            "model has no Brevitas quantized layers to export",
            "quantize it first: aq_brevitas.quantize(model, policy)",
        )


def _check_input(x: Any) -> torch.Tensor:
    if not torch.is_tensor(x) or not torch.is_floating_point(x) or x.dim() < 2:
        raise ConfigError(
            "example input must be a float tensor with a batch dimension",
            "pass e.g. images[:1] of shape 1x1x28x28",
        )
    return x[:1].detach()


@contextlib.contextmanager
def _scratch_dir():
    with tempfile.TemporaryDirectory(prefix="aq-export-") as d:
        yield Path(d)


def _torch_out(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        out = model(x)
    return getattr(out, "value", out).detach().cpu().numpy()


def _layer_bits(mw: Any, model: nn.Module) -> tuple[dict[str, int], list[str]]:
    """Weight bit width per layer, read from the Quant/BipolarQuant node feeding each weight input.

    Layers are matched by their float weight values (the quantizer's input initializer), which
    survive cleanup, so the mapping does not depend on node names or order.
    """
    layers = {n: m.weight.detach().cpu().numpy() for n, m in quantizable_layers(model).items()}
    bits: dict[str, int] = {}
    bipolar: list[str] = []
    for node in mw.graph.node:
        if node.op_type not in ("Quant", "BipolarQuant"):
            continue
        w = mw.get_initializer(node.input[0])
        if w is None:
            continue  # an activation quantizer
        match = next((n for n, lw in layers.items() if lw.shape == w.shape and np.array_equal(lw, w)), None)
        if match is None:
            continue
        if node.op_type == "BipolarQuant":
            bits[match] = 1
            bipolar.append(match)
        else:
            bits[match] = int(mw.get_initializer(node.input[3]))
    return bits, bipolar


def export_qonnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_input: torch.Tensor,
    *,
    opset: int = 13,
    check: bool = True,
    images: torch.Tensor | None = None,
    tol: float = DEFAULT_TOL,
) -> ExportResult:
    """Export a Brevitas model to cleaned QONNX at ``path`` and check it against PyTorch."""
    from brevitas.export import export_qonnx as brevitas_export_qonnx
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.util.cleanup import cleanup_model

    _check_model(model)
    x = _check_input(example_input)
    model.eval()
    with _scratch_dir() as d:
        raw = d / "raw.onnx"
        brevitas_export_qonnx(model, args=x, export_path=str(raw), dynamo=False, opset_version=opset)
        mw = cleanup_model(ModelWrapper(str(raw)))
        diff, n = _qonnx_parity(mw, model, x, images) if check else (math.nan, 0)
        if check and not diff <= tol:
            raise ModelError(
                f"QONNX output differs from PyTorch by {diff:.3g} (> tol {tol:g})",
                "report this model; or pass tol= if the difference is expected",
            )
        bits, bipolar = _layer_bits(mw, model)
        _onnx_check(mw.model)
        atomic_write_with(path, lambda tmp: mw.save(str(tmp)))
    policy = getattr(model, "aq_policy", None)
    return ExportResult(
        str(path), "qonnx", diff, n, bits, bipolar, policy.to_dict() if policy else None, opset
    )


def _onnx_check(model_proto: Any) -> None:
    """``onnx.checker`` on what is about to be written (QONNX custom ops live in their own domain)."""
    import onnx

    try:
        onnx.checker.check_model(model_proto)
    except onnx.checker.ValidationError as exc:
        raise ModelError(
            f"exported graph fails onnx.checker ({str(exc).splitlines()[0][:120]})", "report this model"
        ) from None


def _qonnx_parity(
    mw: Any, model: nn.Module, x: torch.Tensor, images: torch.Tensor | None
) -> tuple[float, int]:
    from qonnx.core.onnx_exec import execute_onnx

    inp, out = mw.graph.input[0].name, mw.graph.output[0].name
    batch = [x] + ([images[i : i + 1] for i in range(len(images))] if images is not None else [])
    diff = 0.0
    for xb in batch:
        got = execute_onnx(mw, {inp: xb.numpy()})[out]
        diff = max(diff, float(np.abs(got - _torch_out(model, xb)).max()))
    return diff, len(batch)


def export_qcdq(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_input: torch.Tensor,
    *,
    check: bool = True,
    images: torch.Tensor | None = None,
    tol: float = DEFAULT_TOL,
    opset: int = 13,
) -> ExportResult:
    """Export to QuantizeLinear/Clip/DequantizeLinear ONNX and check it in onnxruntime (BASIC optimisation)."""
    from brevitas.export import export_onnx_qcdq

    _check_model(model)
    x = _check_input(example_input)
    policy = getattr(model, "aq_policy", None)
    if policy is not None and any(
        s.weight_bit_width < 2 for s in policy.resolve(quantizable_layers(model)).values()
    ):
        raise ConfigError(
            "QCDQ cannot express 1-bit (binary) layers",
            "use export_qonnx (FINN) for binary layers, or give them >= 2 bits",
        )
    model.eval()
    with _scratch_dir() as d:
        raw = d / "qcdq.onnx"
        export_onnx_qcdq(model, args=x, export_path=str(raw), dynamo=False, opset_version=opset)
        diff, n = _ort_parity(raw, model, x, images) if check else (math.nan, 0)
        if check and not diff <= tol:
            raise ModelError(
                f"QCDQ output in onnxruntime differs from PyTorch by {diff:.3g} (> tol {tol:g})",
                "report this model; or pass tol= if the difference is expected",
            )
        basic = _ort_parity(raw, model, x, images, "ORT_ENABLE_BASIC")[0] if check else None
        import onnx

        _onnx_check(onnx.load(str(raw)))
        atomic_write_with(path, lambda tmp: tmp.write_bytes(raw.read_bytes()))
    return ExportResult(
        str(path), "qcdq", diff, n, {}, [], policy.to_dict() if policy else None, opset, basic
    )


def _ort_parity(
    path: Path, model: nn.Module, x: torch.Tensor, images: torch.Tensor | None, level: str = "ORT_DISABLE_ALL"
) -> tuple[float, int]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # Brevitas' QCDQ graphs list initializers as inputs; ORT warns about each
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    batch = [x] + ([images[i : i + 1] for i in range(len(images))] if images is not None else [])
    diff = 0.0
    for xb in batch:
        got = sess.run(None, {name: xb.numpy()})[0]
        diff = max(diff, float(np.abs(got - _torch_out(model, xb)).max()))
    return diff, len(batch)


def _load_qonnx(path: str | os.PathLike[str]) -> Any:
    from qonnx.core.modelwrapper import ModelWrapper

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"ONNX file {p} does not exist", "export one first with `aq-brevitas export`")
    try:
        return ModelWrapper(str(p))
    except Exception as exc:  # onnx raises DecodeError and friends for non-ONNX bytes
        raise ModelError(f"{p} is not a readable ONNX model ({type(exc).__name__})", "re-export it") from None


def inference_cost(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Per-layer and total BOPs, MACs and weight bits of a QONNX file (qonnx ``inference_cost``).

    qonnx 1.0.0 costs weights behind a ``BipolarQuant`` as FLOAT32; such layers are corrected to
    1 bit per weight here (``bipolar_corrected`` lists them), so weight bits equal the policy's cost.
    """
    from qonnx.util.inference_cost import inference_cost as qonnx_cost

    mw = _load_qonnx(path)
    bip_nodes = _bipolar_consumers(mw)
    res = qonnx_cost(mw, discount_sparsity=False, cost_breakdown=True)
    layers: dict[str, dict[str, float]] = {}
    corrected = []
    # qonnx names nodes uniquely after its preprocessing (Conv_0, Gemm_1, ...): keep its names.
    for name, cost in res["node_cost"].items():
        row = {k: float(v) for k, v in cost.items() if k.startswith("total_")}
        if name in bip_nodes:
            row["total_mem_w_bits"] = row["total_mem_w_elems"]
            corrected.append(name)
        layers[name] = row
    total = {k: float(v) for k, v in res["total_cost"].items() if k.startswith("total_")}
    total["total_mem_w_bits"] = sum(r.get("total_mem_w_bits", 0.0) for r in layers.values())
    return {"layers": layers, "total": total, "bipolar_corrected": corrected}


def _bipolar_consumers(mw: Any) -> set[str]:
    """qonnx-style unique names (``<Op>_<i>``) of weight layers fed by a BipolarQuant weight."""
    from qonnx.transformation.general import GiveUniqueNodeNames

    named = mw.transform(GiveUniqueNodeNames())
    out = set()
    for node in named.graph.node:
        if node.op_type == "BipolarQuant" and named.get_initializer(node.input[0]) is not None:
            consumer = named.find_consumer(node.output[0])
            if consumer is not None:
                out.add(consumer.name)
    return out


def cost_table(cost: dict[str, Any]) -> str:
    rows = [f"{'node':<12} {'MACs':>12} {'BOPs':>14} {'weight bits':>12}"]
    for name, r in cost["layers"].items():
        rows.append(
            f"{name:<12} {r.get('total_macs', 0):>12,.0f} {r.get('total_bops', 0):>14,.0f} {r.get('total_mem_w_bits', 0):>12,.0f}"
        )
    t = cost["total"]
    rows.append(
        f"{'total':<12} {t.get('total_macs', 0):>12,.0f} {t.get('total_bops', 0):>14,.0f} {t.get('total_mem_w_bits', 0):>12,.0f}"
    )
    return "\n".join(rows)


# Op types FINN's QONNX front end (ConvertQONNXtoFINN and the streamlining that follows) accepts in a
# cleaned QONNX graph of a CNN/MLP, after the FINN docs' "Brevitas export" and "QONNX" pages.
FINN_OP_TYPES = frozenset(
    {"Quant", "BipolarQuant", "Conv", "Gemm", "MatMul", "Relu", "MaxPool", "AveragePool", "GlobalAveragePool",
     "Flatten", "Reshape", "Transpose", "Add", "Mul", "Sub", "Div", "BatchNormalization", "Identity", "Concat",
     "Pad", "Squeeze", "Unsqueeze", "ConvTranspose", "Sigmoid"}
)  # fmt: skip


@dataclass
class FinnCheck:
    name: str
    passed: bool
    detail: str


def finn_check(path: str | os.PathLike[str], policy: Any = None) -> list[FinnCheck]:
    """Check what FINN's QONNX→FINN flow needs; this does not run FINN (it needs Vivado).

    Checks: only FINN-supported op types; every Quant has an integer bit width ≤ 8 and zero zero-point
    on weights; the graph input is quantized; and, where the policy asks for ``po2`` scaling, the
    weight scales are powers of two.
    """
    mw = _load_qonnx(path)
    nodes = list(mw.graph.node)
    checks = []
    unsupported = sorted({n.op_type for n in nodes} - FINN_OP_TYPES)
    checks.append(
        FinnCheck(
            "supported_op_types",
            not unsupported,
            "all supported" if not unsupported else f"unsupported: {', '.join(unsupported)}",
        )
    )
    bad_bits, nonzero_zp = [], []
    for n in nodes:
        if n.op_type != "Quant":
            continue
        bw = mw.get_initializer(n.input[3])
        if bw is None or float(bw) != int(bw) or not 1 < int(bw) <= 8:
            bad_bits.append(f"{n.name}={bw}")
        zp = mw.get_initializer(n.input[2])
        if mw.get_initializer(n.input[0]) is not None and zp is not None and np.any(zp != 0):
            nonzero_zp.append(n.name)
    checks.append(
        FinnCheck(
            "integer_bit_widths_le_8",
            not bad_bits,
            "all Quant nodes have integer widths in 2..8" if not bad_bits else f"bad: {', '.join(bad_bits)}",
        )
    )
    checks.append(
        FinnCheck(
            "symmetric_weights",
            not nonzero_zp,
            "weight zero-points are 0" if not nonzero_zp else f"non-zero: {', '.join(nonzero_zp)}",
        )
    )
    first = mw.find_consumer(mw.graph.input[0].name)
    quantized_input = first is not None and first.op_type in ("Quant", "BipolarQuant")
    checks.append(
        FinnCheck(
            "input_quantized",
            quantized_input,
            "graph input feeds a Quant node"
            if quantized_input
            else "the input is float: give the first layer act_bit_width (FINN needs integer inputs)",
        )
    )
    specs = (
        ([*policy.layers.values(), *([policy.default] if policy.default else [])])
        if policy is not None
        else []
    )
    if any(s.scaling == "po2" for s in specs):
        weight_scales = [
            (n.name, mw.get_initializer(n.input[1]))
            for n in nodes
            if n.op_type == "Quant" and mw.get_initializer(n.input[0]) is not None
        ]
        po2_bad = [
            name
            for name, sc in weight_scales
            if sc is not None and not np.allclose(np.exp2(np.round(np.log2(sc))), sc)
        ]
        n_not_po2 = sum(1 for s in policy.layers.values() if s.scaling != "po2")
        if policy.default is not None and policy.default.scaling != "po2":
            n_not_po2 = len(weight_scales)  # unknown how many layers the default covers: no constraint
        ok = len(po2_bad) <= n_not_po2
        checks.append(
            FinnCheck(
                "po2_scales",
                ok,
                "power-of-two weight scales where the policy asks for them"
                if ok
                else f"non-po2 scales: {', '.join(po2_bad)}",
            )
        )
    return checks
