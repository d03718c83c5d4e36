"""QCDQ export (QuantizeLinear/Clip/DequantizeLinear ONNX) for onnxruntime, checked in onnxruntime.

onnxruntime runs at ``ORT_ENABLE_BASIC`` minus ``WeightBiasQuantization``: that one BASIC rewrite
re-quantizes each float Conv/Gemm bias to int32 with scale = input scale x weight scale, which the
PyTorch model never does, and moves logits by ~1e-2; the full-BASIC figure is reported as
``ort_basic_diff`` (see docs/export.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..classifier import unwrap_parallel
from ..errors import ConfigError
from ..forward import eval_mode
from ..nnutils import quantizable_layers
from ..storage import atomic_write_with
from .exporter import check_example_input, check_model, onnx_check, run_exporter, scratch_dir
from .graph import map_layers
from .parity import DEFAULT_TOL, ParityOutcome, Runner, enforce_bound, measure_parity
from .result import ExportResult, warn_read_back

# onnxruntime BASIC-level rewrites left out of the QCDQ check: each changes what the graph computes.
# WeightBiasQuantization (onnxruntime/core/optimizer/qdq_transformer/weight_bias_quantization.h)
# rounds a float bias to int32 at scale input_scale * weight_scale.
ORT_DISABLED_OPTIMIZERS = ("WeightBiasQuantization",)


def ort_session(path: str | os.PathLike[str], level: str = "ORT_ENABLE_BASIC", exact: bool = True) -> Any:
    """An onnxruntime CPU session for a QCDQ file; ``exact`` leaves out the rewrites that change results."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # Brevitas' QCDQ graphs list initializers as inputs; ORT warns about each
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    return ort.InferenceSession(
        str(path),
        opts,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=list(ORT_DISABLED_OPTIMIZERS) if exact else [],
    )


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
    """Export to QuantizeLinear/Clip/DequantizeLinear ONNX, checked in onnxruntime against PyTorch.

    Brevitas ``export_onnx_qcdq`` (2..8-bit quantizers only, read from the model's quantizers). The
    check runs onnxruntime at ``ORT_ENABLE_BASIC`` without ``WeightBiasQuantization`` (the one
    BASIC rewrite that changes results: it rounds float biases to int32); ``ort_basic_diff`` reports
    the difference with every BASIC rewrite on. Raises :class:`ConfigError` for quantizers outside
    2..8 bits or a weight scale that varies along two axes (per-channel grouped ConvTranspose),
    :class:`ModelError` when torch's ONNX exporter fails or when the outputs differ by more than
    ``tol * max(1, max |PyTorch|)``; nothing is written then. The per-layer weight and input bits
    are read back from the graph, through the layout ops Brevitas puts between a weight's
    ``DequantizeLinear`` and its layer (``Transpose -> MatMul`` for a bias-free ``nn.Linear``); a
    graph that passed parity but cannot be mapped back is still written, with a ``RuntimeWarning``
    (an aq-brevitas bug) and ``layer_table_available=False``. The model comes back in the
    train/eval mode it came in; the export runs in eval mode (BatchNorm statistics untouched).

    Unlike :func:`export_qonnx` this check does not account for rounding-boundary flips: onnxruntime
    runs the graph as one session, so an input it quantizes cannot be compared and corrected node by
    node without cutting the graph into sessions whose optimizations (and roundings) differ from the
    one checked. A flip here fails the check; ``boundary_flips`` stays 0.
    """
    import onnx
    from brevitas.export import export_onnx_qcdq

    model = unwrap_parallel(model)
    check_model(model, "QCDQ export")
    x = check_example_input(example_input)
    _check_qcdq_bits(model)
    _check_qcdq_scales(model)
    with eval_mode(model), scratch_dir() as d:
        raw = d / "qcdq.onnx"
        run_exporter("QCDQ", export_onnx_qcdq, model, x, raw, opset)
        parity, basic = _ort_parity(raw, model, x, images, tol) if check else (ParityOutcome(), None)
        proto = onnx.load(str(raw))
        graph = map_layers(proto, model, "qcdq")
        onnx_check(proto)
        atomic_write_with(path, lambda tmp: tmp.write_bytes(raw.read_bytes()))
    warn_read_back("QCDQ", path, graph.problem)
    return ExportResult.from_graph(path, "qcdq", graph, model, parity, opset=opset, ort_basic_diff=basic)


def _ort_parity(
    raw: Path, model: nn.Module, x: torch.Tensor, images: torch.Tensor | None, tol: float
) -> tuple[ParityOutcome, float]:
    """The parity check in onnxruntime without the rewrites that change results (enforced), and the
    difference with every BASIC rewrite on (reported only)."""
    diff, scale, n = measure_parity(_ort_runner(ort_session(raw)), model, x, images)
    allowed = enforce_bound("QCDQ (onnxruntime BASIC)", diff, scale, tol)
    basic = measure_parity(_ort_runner(ort_session(raw, exact=False)), model, x, images)[0]
    return ParityOutcome(diff, scale, n, allowed, diff_without_flips=diff), basic


def _check_qcdq_bits(model: nn.Module) -> None:
    """QCDQ carries int8/uint8 tensors: every enabled weight or activation quantizer needs 2..8 bits."""
    from brevitas.proxy import ActQuantProxyFromInjector, WeightQuantProxyFromInjector

    for name, mod in model.named_modules():
        if (
            isinstance(mod, (WeightQuantProxyFromInjector, ActQuantProxyFromInjector))
            and mod.is_quant_enabled
        ):
            bits = float(mod.bit_width())
            if not (bits == int(bits) and 2 <= bits <= 8):
                raise ConfigError(
                    f"QCDQ cannot express the {bits:g}-bit quantizer {name}",
                    "use export_qonnx (FINN) for 1-bit (binary) or wider-than-8-bit layers, or give them 2..8 bits",
                )


def _check_qcdq_scales(model: nn.Module) -> None:
    """QCDQ's ``DequantizeLinear`` takes one scale, or one per channel along one axis: a weight scale
    that varies along two axes (per output channel of a grouped ConvTranspose: input channel x
    output channel in its group) cannot be written."""
    for name, layer in quantizable_layers(model).items():
        quant = getattr(layer, "weight_quant", None)
        if quant is None or not quant.is_quant_enabled:
            continue
        with torch.no_grad():
            shape = tuple(layer.quant_weight().scale.shape)
        if sum(d > 1 for d in shape) > 1:
            raise ConfigError(
                f"QCDQ cannot express the weight scale of {name} ({type(layer).__name__}): it varies along "
                f"two axes (shape {'x'.join(map(str, shape))}), DequantizeLinear takes one scale per channel of one axis",
                "use export_qonnx (FINN) for this model, or give that layer per_tensor weights",
            )


def _ort_runner(sess: Any) -> Runner:
    name = sess.get_inputs()[0].name
    return lambda a: sess.run(None, {name: a})[0]
