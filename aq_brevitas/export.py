"""Export to FPGA toolchains: QONNX for FINN, QCDQ ONNX for onnxruntime -- parity-checked, costed.

* :func:`export_qonnx`: Brevitas ``export_qonnx(dynamo=False, opset_version=13)`` (the TorchScript
  path FINN's own tests use; the dynamo path breaks residual models carrying QuantTensors and writes
  ``.onnx.data`` side files), then qonnx ``cleanup_model``, then execution of the cleaned graph with
  qonnx's ``execute_onnx`` against the PyTorch output. Per layer, the weight and input bit widths are
  read back from the graph, and the weight memory qonnx's ``inference_cost`` finds in the graph must
  equal the policy's predicted cost exactly (per layer and in total). Any failed check is an error.
* :func:`export_qcdq`: Brevitas ``export_onnx_qcdq`` (2..8-bit quantizers only, read from the model's
  quantizers), run in onnxruntime at ``ORT_ENABLE_BASIC`` minus ``WeightBiasQuantization``. That one
  BASIC rewrite re-quantizes each float Conv/Gemm bias to int32 with scale = input scale x weight
  scale, which the PyTorch model never does, and moves logits by ~1e-2; the full-BASIC figure is
  reported as ``ort_basic_diff`` (see docs/export.md).
* Parity tolerance: ``max |ONNX - PyTorch| <= tol * max(1, max |PyTorch output|)``. Both sides compute
  in float32 with different summation orders, so the noise grows with the logits' magnitude (measured:
  1-3.5 float32 ulps of the largest logit); below logits of 1 this is the absolute ``tol``.
* Rounding-boundary flips (QONNX): where that noise puts a quantizer's input on a rounding boundary,
  the two sides pick neighbouring codes and the logits move by a whole step. An input that misses
  the bound is re-run node by node; it passes only if every code difference is such a flip and the
  output, flips given PyTorch's codes, meets the bound (see ``_forced_run`` and docs/export.md).
* A model torch's exporter cannot export fails with one line (the op, where it is called, the fix),
  not torch's TorchScript graph dump.
* :func:`inference_cost`: qonnx ``inference_cost`` (BOPs, weight bits) per layer and in total.
* :func:`finn_check`: what FINN's QONNX->FINN conversion needs, checked on the file (FINN itself needs
  Vivado and is not run here).

Every file is written to a temporary path and renamed into place only after its checks passed.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import nn

from .errors import AqError, ConfigError, ModelError
from .layers import layer_geometry, quantizable_layers
from .policy import cost_of
from .storage import atomic_write_with

DEFAULT_TOL = 1e-5
WEIGHT_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
# onnxruntime BASIC-level rewrites left out of the QCDQ check: each changes what the graph computes.
# WeightBiasQuantization (onnxruntime/core/optimizer/qdq_transformer/weight_bias_quantization.h)
# rounds a float bias to int32 at scale input_scale * weight_scale.
ORT_DISABLED_OPTIMIZERS = ("WeightBiasQuantization",)


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
    ort_basic_diff: float | None = None  # QCDQ only: the same check with every BASIC rewrite enabled
    act_bits: dict[str, int] = field(default_factory=dict)  # input-quantizer bits per layer in the graph
    output_scale: float = math.nan  # max |PyTorch output| over the checked images
    allowed_diff: float = math.nan  # tol * max(1, output_scale): the parity bound that was enforced
    weight_bits: dict[str, dict[str, int]] = field(default_factory=dict)  # per layer: graph vs expected
    expected_from: str = ""  # "policy" or "quantizers": where the expected weight bits came from
    cost: dict[str, Any] | None = None  # QONNX only: inference_cost of the written graph
    # QONNX only: codes that ONNX and PyTorch round to neighbouring levels because the quantizer's
    # input sits within float32 noise of a rounding boundary, summed over the checked images, and
    # per "node (quantizer)". max_abs_diff includes their effect and may then exceed allowed_diff;
    # diff_without_flips (the same difference once they get PyTorch's codes) may not.
    boundary_flips: int = 0
    flip_detail: dict[str, int] = field(default_factory=dict)
    diff_without_flips: float = math.nan  # equals max_abs_diff when nothing flipped

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


def _batch(x: torch.Tensor, images: torch.Tensor | None) -> list[torch.Tensor]:
    """The checked inputs: the example input (image 0), then each of ``images`` on its own."""
    return [x] + ([images[i : i + 1] for i in range(len(images))] if images is not None else [])


def _diffs(
    run: Callable[[np.ndarray], np.ndarray], model: nn.Module, batch: list[torch.Tensor]
) -> tuple[list[float], float]:
    """Per input, ``max |ONNX - PyTorch|``; and ``max |PyTorch|`` over all of them."""
    diffs, scale = [], 0.0
    for xb in batch:
        ref = _torch_out(model, xb)
        diffs.append(float(np.abs(run(xb.numpy()) - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
    return diffs, scale


def _parity(
    run: Callable[[np.ndarray], np.ndarray], model: nn.Module, x: torch.Tensor, images: torch.Tensor | None
) -> tuple[float, float, int]:
    """``(max |ONNX - PyTorch|, max |PyTorch|, images)`` over the example input and each image."""
    batch = _batch(x, images)
    diffs, scale = _diffs(run, model, batch)
    return float(np.max(diffs)), scale, len(batch)  # np.max: a NaN difference stays NaN (and fails)


def _enforce(what: str, diff: float, scale: float, tol: float) -> float:
    """Raise unless ``diff <= tol * max(1, scale)``; return that bound."""
    allowed = tol * max(1.0, scale)
    if not diff <= allowed:
        raise ModelError(
            f"{what} output differs from PyTorch by {diff:.3g} (> tol {tol:g} x output scale {max(1.0, scale):.3g})",
            "report this model; or pass tol= if the difference is expected",
        )
    return allowed


# ---- QONNX parity with rounding-boundary flips ----------------------------------------------------
#
# ONNX and PyTorch compute a quantizer's input (conv sums, BatchNorm) in float32 in different orders,
# so it can differ by an ulp or two. Where that input sits within such noise of a rounding boundary
# k + 0.5 (in code units t = x / scale + zero_point), the two sides round to codes k and k + 1: a
# "flip". One flip moves every logit that depends on it by a quantization step times the weights
# downstream (measured: 8.5e-4 on logits of 11.7), far above the float32 tolerance, and it cascades:
# the next quantizer's inputs then differ by a whole step, not by noise. So an image whose output
# misses the plain bound is re-run node by node: at each Quant node, in graph order, the ONNX codes
# are compared with those of the PyTorch quantizer that made the same tensor, the legitimate flips
# are given PyTorch's codes (so nothing cascades), and the final output must then meet the plain
# bound. Every other code difference is an error.

# At most this fraction of a quantizer's elements (and at least one) may flip on one image: float32
# noise puts an element within ~1e-5 code units of a boundary about once in 1e5.
MAX_FLIP_FRACTION = 1e-3
# Slack, in float32 ulps of the boundary, for the rounding of x / scale + zero_point itself (at most
# one ulp each for the division and the addition).
BOUNDARY_ULPS = 2


@dataclass
class _QuantCall:
    """One call of a Brevitas integer quantizer (``IntQuant``) during a PyTorch forward."""

    quantizer: str  # the quant proxy that made the call, e.g. "relu2.act_quant"
    x: np.ndarray  # its float input
    y: np.ndarray  # its (dequantized) output
    scale: np.ndarray
    zero_point: np.ndarray
    bit_width: float


def _quant_calls(model: nn.Module, xb: torch.Tensor) -> tuple[np.ndarray, list[_QuantCall]]:
    """PyTorch's output for ``xb`` and every integer-quantizer call the forward made, in call order.

    Hooks sit on Brevitas' ``IntQuant`` (where every integer quantizer divides, rounds and clamps),
    so weights, inputs and activations are seen alike, whatever proxy or layer wraps them.
    """
    from brevitas.core.quant.int_base import IntQuant
    from brevitas.proxy.quant_proxy import QuantProxyFromInjector

    modules = dict(model.named_modules())
    proxies = [n for n, m in modules.items() if isinstance(m, QuantProxyFromInjector)]
    calls: list[_QuantCall] = []

    def hook(quantizer: str) -> Callable[..., None]:
        def record(_mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if len(args) == 4:  # (scale, zero_point, bit_width, x): IntQuant.forward's positional call
                scale, zp, bw, x = (torch.as_tensor(a).detach().cpu() for a in args)
                arrays = (x.numpy(), out.detach().cpu().numpy(), scale.numpy(), zp.numpy())
                calls.append(_QuantCall(quantizer, *(a.copy() for a in arrays), float(bw)))

        return record

    handles = []
    for name, mod in modules.items():
        if isinstance(mod, IntQuant):
            owner = max((p for p in proxies if name.startswith(p + ".")), key=len, default=name)
            # a TorchScript IntQuant (BREVITAS_JIT=1) takes no hooks: its nodes stay unmatched
            with contextlib.suppress(RuntimeError):
                handles.append(mod.register_forward_hook(hook(owner)))
    try:
        return _torch_out(model, xb), calls
    finally:
        for h in handles:
            h.remove()


def _codes(y: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """Integer codes of a dequantized tensor ``y = (code - zero_point) * scale`` (exact after rounding)."""
    return np.round(y.astype(np.float64) / scale.astype(np.float64) + zero_point.astype(np.float64))


def _matching_call(y: np.ndarray, params: tuple[np.ndarray, ...], calls: list[_QuantCall]) -> Any:
    """The PyTorch call that made the tensor a Quant node outputs, or None.

    Candidates have the node's output shape and exactly its scale, zero-point and bit width (the
    export writes PyTorch's float32 values); among them the one whose codes agree most with the node's
    is taken, which tells apart a quantizer called on several tensors.
    """
    scale, zp, bw = params
    same = [
        c
        for c in calls
        if c.y.shape == y.shape
        and c.bit_width == float(bw)
        and np.array_equal(c.scale.ravel(), scale.ravel())
        and np.array_equal(c.zero_point.ravel(), zp.ravel())
    ]
    if not same:
        return None
    codes = _codes(y, scale, zp)
    return min(same, key=lambda c: int((_codes(c.y, scale, zp) != codes).sum()))


def _boundary_flips(
    x_onnx: np.ndarray, y_onnx: np.ndarray, params: tuple[np.ndarray, ...], call: _QuantCall, tol: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(code differs, differs legitimately)`` per element of one Quant node against PyTorch's call.

    A difference is a legitimate rounding-boundary flip when the codes are one step apart and both
    inputs, in code units ``t = x / scale + zero_point``, lie within ``delta`` of the boundary
    ``b = min(codes) + 0.5`` between them: ``delta = tol * max(1, max |x|) / scale`` (the parity
    tolerance, read as float32 noise relative to the tensor's magnitude, as for the output) plus
    BOUNDARY_ULPS float32 ulps of ``b`` (the rounding of ``t`` itself). A code one step off away from
    a boundary, or more than one step off, is not noise.
    """
    scale, zp, _ = (p.astype(np.float64) for p in params)
    c_onnx, c_torch = _codes(y_onnx, *params[:2]), _codes(call.y, *params[:2])
    differs = c_onnx != c_torch
    boundary = np.minimum(c_onnx, c_torch) + 0.5
    noise = tol * max(1.0, float(np.abs(call.x).max(initial=0.0))) / np.abs(scale)
    delta = noise + BOUNDARY_ULPS * np.spacing(np.abs(boundary).astype(np.float32)).astype(np.float64)
    near = [np.abs(x.astype(np.float64) / scale + zp - boundary) <= delta for x in (x_onnx, call.x)]
    legit = differs & (np.abs(c_onnx - c_torch) == 1) & near[0] & near[1]
    return differs, legit


def _check_flips(node: Any, image: int, call: _QuantCall, differs: np.ndarray, legit: np.ndarray) -> int:
    """Number of legitimate flips at one Quant node; raise if any difference is not one, or too many are."""
    bad = differs & ~legit
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ModelError(
            f"QONNX node {node.name} ({call.quantizer}) on image {image} gives {int(bad.sum())} of {bad.size} "
            f"codes that differ from PyTorch by more than a flip at a rounding boundary (first at index "
            f"{first}: input {call.x[first]:.7g} in PyTorch)",
            "report this model (the exported quantizer or an op before it computes something else)",
        )
    flips, limit = int(differs.sum()), max(1, int(MAX_FLIP_FRACTION * differs.size))
    if flips > limit:
        raise ModelError(
            f"QONNX node {node.name} ({call.quantizer}) on image {image} has {flips} rounding-boundary flips, "
            "more than float32 noise explains "
            f"(at most {limit} of {differs.size} elements)",
            "report this model (so many inputs on a boundary point at a wrong scale or zero-point)",
        )
    return flips


def _forced_run(
    mw: Any, model: nn.Module, xb: torch.Tensor, image: int, tol: float
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """``(ONNX output, PyTorch output, flips per node)`` for one input, flips given PyTorch's codes.

    The graph runs in segments ending at each Quant node; a node's output is compared with the
    PyTorch quantizer call that made the same tensor (:func:`_matching_call`), and its legitimate
    flips are replaced by PyTorch's values before the next segment runs. A Quant node that matches
    no PyTorch call is left as it is: whatever it changes stays in the output, which the caller
    holds to the plain bound.
    """
    ref, calls = _quant_calls(model, xb)
    nodes = list(mw.graph.node)
    ctx: dict[str, np.ndarray] = {mw.graph.input[0].name: xb.numpy()}
    flips: dict[str, int] = {}
    start = 0
    for i, node in enumerate(nodes):
        if node.op_type != "Quant":
            continue
        ctx = _run_segment(mw, ctx, nodes[start], node)
        start = i + 1
        params = tuple(mw.get_initializer(t) for t in node.input[1:4])
        if any(p is None for p in params):
            continue  # a computed scale: nothing exported to compare
        y = ctx[node.output[0]]
        call = _matching_call(y, params, calls)
        if call is None:
            continue
        differs, legit = _boundary_flips(ctx[node.input[0]], y, params, call, tol)
        if differs.any():
            flips[f"{node.name} ({call.quantizer})"] = _check_flips(node, image, call, differs, legit)
            ctx[node.output[0]] = np.where(differs, call.y, y).astype(y.dtype)
    if start < len(nodes):
        ctx = _run_segment(mw, ctx, nodes[start], nodes[-1])
    return ctx[mw.graph.output[0].name], ref, flips


def _run_segment(mw: Any, ctx: dict[str, Any], first: Any, last: Any) -> dict[str, np.ndarray]:
    """Nodes ``first..last`` of the graph on the tensors computed so far; the full context after them."""
    from qonnx.core.onnx_exec import execute_onnx

    known = {k: v for k, v in ctx.items() if v is not None}  # the context holds None for unset optionals
    return execute_onnx(mw, known, return_full_exec_context=True, start_node=first, end_node=last)


@dataclass
class _Parity:
    """The outcome of a parity check (see :class:`ExportResult` for the fields' meaning)."""

    max_abs_diff: float = math.nan
    output_scale: float = math.nan
    images: int = 0
    allowed: float = math.nan
    diff_without_flips: float = math.nan
    flips: dict[str, int] = field(default_factory=dict)


def _qonnx_parity(
    mw: Any, model: nn.Module, x: torch.Tensor, images: torch.Tensor | None, tol: float
) -> _Parity:
    """QONNX parity: the plain bound, or the same bound once rounding-boundary flips are accounted for.

    Every input runs through qonnx ``execute_onnx``; one whose output misses ``tol * max(1, max
    |PyTorch|)`` is re-run by :func:`_forced_run`. Raises :class:`ModelError` for a code difference
    that is not a legitimate flip, for too many flips at one node, or when the output, flips given
    PyTorch's codes, still misses the bound.
    """
    from qonnx.core.onnx_exec import execute_onnx

    inp, out = mw.graph.input[0].name, mw.graph.output[0].name
    batch = _batch(x, images)
    diffs, scale = _diffs(lambda a: execute_onnx(mw, {inp: a})[out], model, batch)
    allowed = tol * max(1.0, scale)
    residual, flips = list(diffs), {}
    for i, xb in enumerate(batch):
        if not diffs[i] <= allowed:
            forced, ref, found = _forced_run(mw, model, xb, i, tol)
            residual[i] = float(np.abs(forced - ref).max())
            for where, n in found.items():
                flips[where] = flips.get(where, 0) + n
    worst = float(np.max(residual))  # np.max, not max(): a NaN stays NaN and fails
    forced = f" (with {sum(flips.values())} rounding-boundary flips given PyTorch's codes)" if flips else ""
    _enforce("QONNX" + forced, worst, scale, tol)
    return _Parity(float(np.max(diffs)), scale, len(batch), allowed, worst, flips)


# ---- reading the graph back: which node is which layer, at which bit widths ----------------------


@dataclass
class GraphLayer:
    """One model layer as found in an exported graph."""

    node: str  # name of the Conv/Gemm/MatMul node
    weight_bits: int  # 32 for a float (unquantized) weight
    bipolar: bool
    act_bits: int | None  # the input quantizer's bit width; None for a float input
    weight_scale: Any = None  # the weight quantizer's scale (numpy), None for float weights
    weight_zero_point: Any = None


def _int_range_bits(lo: Any, hi: Any) -> int:
    """Bits of an integer range ``[lo, hi]`` (narrow ranges too: [-7, 7] is 4 bits)."""
    return math.ceil(math.log2(float(hi) - float(lo) + 1))


def _graph_layers(proto: Any, model: nn.Module, fmt: str) -> dict[str, GraphLayer]:
    """Map every weight node of a QONNX or QCDQ graph to the model layer whose weights it carries.

    Layers are matched by weight values (QONNX keeps the float weights in front of its ``Quant``
    node; QCDQ's ``DequantizeLinear`` gives back the quantized weights), so the mapping does not
    depend on node names or order. A weight node that matches no layer, or a layer found in no
    node, is an error: no layer is silently left out of the bit-width and cost checks.
    """
    from onnx import helper, numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    todo = {n: _match_weight(m, fmt) for n, m in quantizable_layers(model).items()}
    found: dict[str, GraphLayer] = {}
    for node in proto.graph.node:
        if node.op_type not in WEIGHT_OPS:
            continue
        values, info = _weight_source(node.input[1], producer, inits, fmt, helper)
        if values is None:
            continue  # both operands computed at run time: not a layer's weight
        cands = [values, values.T] if node.op_type == "MatMul" and values.ndim == 2 else [values]
        name = next(
            (
                n
                for n, w in todo.items()
                if any(c.shape == w.shape and np.allclose(c, w, rtol=1e-6, atol=0) for c in cands)
            ),
            None,
        )
        if name is None:
            raise ModelError(
                f"graph node {node.name or node.op_type} has weights that match no layer of the model",
                "report this model (the export changed a weight tensor)",
            )
        del todo[name]
        found[name] = GraphLayer(node.name, *info[:2], _act_bits(node.input[0], producer, inits), *info[2:])
    if todo:
        raise ModelError(
            f"layer(s) {', '.join(sorted(todo))} not found in the exported graph",
            "report this model; every quantizable layer must appear as a Conv/Gemm/MatMul node",
        )
    order = list(quantizable_layers(model))
    return dict(sorted(found.items(), key=lambda kv: order.index(kv[0])))


def _match_weight(layer: nn.Module, fmt: str) -> np.ndarray:
    """The tensor a layer's graph weight must equal: float weights (QONNX), quantized ones (QCDQ)."""
    quant = getattr(layer, "weight_quant", None)
    if fmt == "qcdq" and quant is not None and quant.is_quant_enabled:
        with torch.no_grad():
            return layer.quant_weight().value.detach().cpu().numpy()
    return layer.weight.detach().cpu().numpy()


def _weight_source(tensor: str, producer: dict, inits: dict, fmt: str, helper: Any) -> tuple[Any, tuple]:
    """``(values to match, (bits, bipolar, scale, zero_point))`` of a weight input, or ``(None, ())``."""
    if tensor in inits:
        return inits[tensor], (32, False, None, None)
    q = producer.get(tensor)
    if q is None:
        return None, ()
    if q.op_type == "BipolarQuant" and q.input[0] in inits:
        return inits[q.input[0]], (1, True, inits.get(q.input[1]), None)
    if q.op_type == "Quant" and q.input[0] in inits:
        return inits[q.input[0]], (
            int(inits[q.input[3]]),
            False,
            inits.get(q.input[1]),
            inits.get(q.input[2]),
        )
    if q.op_type == "DequantizeLinear":
        src, clip = q.input[0], producer.get(q.input[0])
        if clip is not None and clip.op_type == "Clip" and clip.input[0] in inits:
            ints, bits = inits[clip.input[0]], _int_range_bits(inits[clip.input[1]], inits[clip.input[2]])
        elif src in inits:
            ints = inits[src]
            bits = _int_range_bits(np.iinfo(ints.dtype).min, np.iinfo(ints.dtype).max)
        else:
            return None, ()
        scale = inits[q.input[1]]
        zp = inits[q.input[2]] if len(q.input) > 2 and q.input[2] else np.zeros((), ints.dtype)
        axis = next((helper.get_attribute_value(a) for a in q.attribute if a.name == "axis"), 1)
        shape = [1] * ints.ndim
        if scale.ndim == 1 and scale.size > 1:
            shape[axis] = scale.size
        values = (ints.astype(np.float32) - zp.astype(np.float32).reshape(shape if zp.size > 1 else ())) * (
            scale.reshape(shape if scale.size > 1 else ())
        )
        return values, (bits, False, scale, zp)
    return None, ()


def _act_bits(tensor: str, producer: dict, inits: dict) -> int | None:
    """Bit width of the quantizer directly feeding a layer's input (QONNX Quant or QCDQ Q[-Clip]-DQ)."""
    q = producer.get(tensor)
    if q is None:
        return None
    if q.op_type == "BipolarQuant":
        return 1
    if q.op_type == "Quant" and q.input[0] not in inits:
        return int(inits[q.input[3]])
    if q.op_type == "DequantizeLinear":
        clip = producer.get(q.input[0])
        if clip is not None and clip.op_type == "Clip":
            return _int_range_bits(inits[clip.input[1]], inits[clip.input[2]])
        if clip is not None and clip.op_type == "QuantizeLinear":
            zp = inits[clip.input[2]]
            return _int_range_bits(np.iinfo(zp.dtype).min, np.iinfo(zp.dtype).max)
    return None


# ---- weight memory: graph vs policy ---------------------------------------------------------------


def _quantizer_bits(layer: nn.Module) -> int:
    quant = getattr(layer, "weight_quant", None)
    return int(quant.bit_width()) if quant is not None and quant.is_quant_enabled else 32


def expected_weight_bits(model: nn.Module, example_input: torch.Tensor) -> tuple[dict[str, int], str]:
    """Per-layer weight bits the model should export with, and where that prediction comes from.

    With the ``aq_policy`` that :func:`aq_brevitas.quantize` attaches, it is the policy's own cost
    (``cost_of``, layers without a spec at 32 bits); for any other Brevitas model, the bit widths of
    its weight quantizers times the layer's weight count.
    """
    geometry = layer_geometry(model, example_input)
    policy = getattr(model, "aq_policy", None)
    if policy is not None:
        specs = policy.resolve(geometry)
        return {n: cost_of(specs, {n: g}).weight_bits for n, g in geometry.items()}, "policy"
    layers = quantizable_layers(model)
    return {n: _quantizer_bits(layers[n]) * g.params for n, g in geometry.items()}, "quantizers"


def _check_weight_memory(
    cost: dict[str, Any], layers: dict[str, GraphLayer], expected: dict[str, int], source: str
) -> dict[str, dict[str, int]]:
    """Graph weight bits (qonnx ``inference_cost``) against the prediction, per layer and in total."""
    rows = cost["layers"]
    table: dict[str, dict[str, int]] = {}
    for name, gl in layers.items():
        row = rows.get(gl.node)
        if row is None:
            raise ModelError(
                f"inference_cost has no entry for node {gl.node} (layer {name})", "report this model"
            )
        graph_bits = int(row.get("total_mem_w_bits", 0))
        table[name] = {"graph": graph_bits, source: expected[name]}
        if graph_bits != expected[name]:
            raise ModelError(
                f"layer {name}: the exported graph stores {graph_bits} weight bits, the {source} predicts "
                f"{expected[name]}",
                "report this model (a quantizer did not export at its bit width)",
            )
    total_graph, total_expected = int(cost["total"]["total_mem_w_bits"]), sum(expected.values())
    if total_graph != total_expected:
        raise ModelError(
            f"the exported graph stores {total_graph} weight bits in total, the {source} predicts {total_expected}",
            "report this model (a weight tensor outside the model's layers was exported)",
        )
    return table


def _qonnx_cost(mw: Any, layers: dict[str, GraphLayer] | None = None) -> dict[str, Any]:
    """qonnx ``inference_cost`` of a (copy of a) ModelWrapper, BipolarQuant weights costed at 1 bit."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.util.inference_cost import inference_cost as qonnx_cost

    res = qonnx_cost(ModelWrapper(copy.deepcopy(mw.model)), discount_sparsity=False, cost_breakdown=True)
    node_layer = {gl.node: n for n, gl in (layers or {}).items()}
    bipolar = _bipolar_consumers(mw)
    out: dict[str, dict[str, Any]] = {}
    corrected = []
    # qonnx names nodes uniquely after its preprocessing (Conv_0, Gemm_1, ...), as cleanup_model
    # already did on the exported graph: the names are those of the written file.
    for name, c in res["node_cost"].items():
        row: dict[str, Any] = {k: float(v) for k, v in c.items() if k.startswith("total_")}
        if name in bipolar:
            row["total_mem_w_bits"] = row["total_mem_w_elems"]
            corrected.append(name)
        if name in node_layer:
            row["layer"] = node_layer[name]
        out[name] = row
    total = {k: float(v) for k, v in res["total_cost"].items() if k.startswith("total_")}
    total["total_mem_w_bits"] = sum(r.get("total_mem_w_bits", 0.0) for r in out.values())
    return {"layers": out, "total": total, "bipolar_corrected": corrected}


def _bipolar_consumers(mw: Any) -> set[str]:
    """Names of the weight nodes fed by a BipolarQuant weight (names as GiveUniqueNodeNames gives them)."""
    from qonnx.transformation.general import GiveUniqueNodeNames

    named = mw.transform(GiveUniqueNodeNames())
    out = set()
    for node in named.graph.node:
        if node.op_type == "BipolarQuant" and named.get_initializer(node.input[0]) is not None:
            consumer = named.find_consumer(node.output[0])
            if consumer is not None:
                out.add(consumer.name)
    return out


# ---- torch's exporter: failures as one line -------------------------------------------------------

# Ops whose failure has a known fix: adaptive pools export only when the output size divides the input.
ADAPTIVE_POOLS = frozenset(
    {"adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_max_pool1d", "adaptive_max_pool2d"}
)
# Where torch's exporter messages stop saying what failed and start a boilerplate or a graph excerpt.
_EXPORTER_NOISE = re.compile(r"\s+(Please feel free to request support|\[Caused by)")


@contextlib.contextmanager
def _native_stdout_captured() -> Iterator[list[str]]:
    """Send the process's stdout file descriptor to a temporary file; the yielded list gets its text.

    torch 2.13's TorchScript exporter dumps the whole TorchScript graph through C++ ``std::cout``
    when an export fails (its ``setup_onnx_logging`` tests the function ``_jit_is_onnx_log_enabled``
    instead of calling it, so the log is on for every export); ``contextlib.redirect_stdout`` cannot
    catch a C++ stream, and the C library buffers it, so it is flushed before the descriptor returns.
    """
    captured: list[str] = []
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no stdout descriptor (embedded interpreters): capture nothing
        yield captured
        return
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield captured
        finally:
            sys.stdout.flush()
            _flush_c_stdio()
            os.dup2(saved, 1)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode(errors="replace"))


def _flush_c_stdio() -> None:
    """``fflush(NULL)``: write out what C code (std::cout synced with stdio) still buffers."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError, TypeError):  # no C library to load: nothing to flush
        ctypes.CDLL(None).fflush(None)


def _run_exporter(
    fmt: str, export: Callable[..., object], model: nn.Module, x: torch.Tensor, path: Path, opset: int
) -> None:
    """Brevitas ``export`` (export_qonnx or export_onnx_qcdq) to ``path`` on torch's TorchScript exporter.

    What the exporter prints is passed on when it succeeds; a failure becomes one :class:`ModelError`
    line (see :func:`_raise_exporter_failure`) and its graph dump is dropped.
    """
    failure: Exception | None = None
    with _native_stdout_captured() as dump:
        try:
            export(model, args=x, export_path=str(path), dynamo=False, opset_version=opset)
        except AqError:
            raise
        except Exception as exc:  # the boundary: whatever torch.onnx or Brevitas raise while tracing
            failure = exc
    if failure is None:
        sys.stdout.write("".join(dump))
        return
    _raise_exporter_failure(fmt, opset, failure, "".join(dump))


def _raise_exporter_failure(fmt: str, opset: int, exc: Exception, dump: str) -> NoReturn:
    """One line from an exporter failure: the op, where the model calls it (from the graph dump), the fix.

    The first line of torch's message is kept, without its boilerplate and graph excerpt; the graph
    dump (``dump``) gives the module and source line that call the op.
    """
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    reason = _EXPORTER_NOISE.split(lines[0] if lines else type(exc).__name__)[0].strip()
    found = re.search(r"operator '?(?:aten::)?(\w+)'?", reason)
    op = found.group(1) if found else None
    if op:  # "Unsupported: ONNX export of operator adaptive_avg_pool2d, output size that ...": keep the why
        reason = re.sub(rf"^Unsupported: ONNX export of operator {op},\s*", "", reason)
    reason = reason[:200]
    what = f"{op}{_call_site(dump, op)}" if op else "the model"
    if op in ADAPTIVE_POOLS:
        raise ModelError(
            f"{fmt} export: torch.onnx cannot export {what}: {reason}",
            "use an output size that divides the feature map (1 always does), or nn.AvgPool2d/nn.MaxPool2d",
        ) from exc
    raise ModelError(
        f"{fmt} export: torch.onnx cannot export {what}: {reason}",
        f"replace that op by one torch.onnx exports at opset {opset}, or pass another opset",
    ) from exc


def _call_site(dump: str, op: str) -> str:
    """`` (in conv1 (QuantConv2d), net.py:17)``: where the TorchScript graph dump calls ``aten::op``."""
    found = re.search(rf"aten::{op}\(.*?, scope: (\S*)(?: # (\S+):(\d+):\d+)?", dump)
    if found is None:
        return ""
    scope, src, line = found.groups()
    parts = [p.split("::", 1) for p in scope.split("/") if "::" in p]  # "pkg.Class::name" per module
    names = [name for _, name in parts[1:] if name]
    module = f"{'.'.join(names)} ({parts[-1][0].rsplit('.', 1)[-1]})" if names else None
    if module is None and parts:
        module = f"{parts[0][0].rsplit('.', 1)[-1]}.forward"
    in_model = src and Path(torch.__file__).parent not in Path(src).parents  # F.* report torch's own line
    where = [w for w in (module, f"{Path(src).name}:{line}" if in_model else None) if w]
    return f" (in {', '.join(where)})" if where else ""


# ---- QONNX ---------------------------------------------------------------------------------------


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
    """Export a Brevitas model to cleaned QONNX at ``path``, checked against PyTorch and its policy's cost.

    Parity: ``max |ONNX - PyTorch| <= tol * max(1, max |PyTorch output|)`` on the example input and
    each of ``images``; an input that misses it passes only if every code difference at every Quant
    node is a rounding-boundary flip (one step, both inputs within float32 noise of the boundary, at
    most ``MAX_FLIP_FRACTION`` of a node's elements) and the output meets the bound once those flips
    get PyTorch's codes (``boundary_flips``, ``flip_detail``, ``diff_without_flips``).

    Raises :class:`ModelError` (and writes nothing) when torch's ONNX exporter fails (one line naming
    the op and where it is called), when the parity check fails, when a layer cannot be found in the
    graph, or when the graph's weight memory differs from the policy's predicted cost in any layer.

    >>> import torch
    >>> from aq_brevitas import LayerSpec, LayerwisePolicy, build_model, export_qonnx, quantize
    >>> _ = torch.manual_seed(0)
    >>> q = quantize(build_model("small_cnn"), LayerwisePolicy(default=LayerSpec(4)))  # random weights
    >>> res = export_qonnx(q, "q.onnx", torch.rand(1, 1, 28, 28), images=torch.rand(4, 1, 28, 28))
    >>> res.layer_bits, res.images_checked, res.diff_without_flips <= res.allowed_diff
    ({'conv1': 4, 'conv2': 4, 'fc1': 4, 'fc2': 4}, 5, True)
    """
    from brevitas.export import export_qonnx as brevitas_export_qonnx
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.general import GiveUniqueNodeNames
    from qonnx.util.cleanup import cleanup_model

    _check_model(model)
    x = _check_input(example_input)
    model.eval()
    with _scratch_dir() as d:
        raw = d / "raw.onnx"
        _run_exporter("QONNX", brevitas_export_qonnx, model, x, raw, opset)
        mw = cleanup_model(ModelWrapper(str(raw))).transform(GiveUniqueNodeNames())
        parity = _qonnx_parity(mw, model, x, images, tol) if check else _Parity()
        layers = _graph_layers(mw.model, model, "qonnx")
        cost = _qonnx_cost(mw, layers)
        expected, source = expected_weight_bits(model, x)
        table = _check_weight_memory(cost, layers, expected, source)
        _onnx_check(mw.model)
        atomic_write_with(path, lambda tmp: mw.save(str(tmp)))
    policy = getattr(model, "aq_policy", None)
    return ExportResult(
        str(path),
        "qonnx",
        parity.max_abs_diff,
        parity.images,
        {name: gl.weight_bits for name, gl in layers.items()},
        [name for name, gl in layers.items() if gl.bipolar],
        policy.to_dict() if policy else None,
        opset,
        act_bits={name: gl.act_bits for name, gl in layers.items() if gl.act_bits is not None},
        output_scale=parity.output_scale,
        allowed_diff=parity.allowed,
        weight_bits=table,
        expected_from=source,
        cost=cost,
        boundary_flips=sum(parity.flips.values()),
        flip_detail=parity.flips,
        diff_without_flips=parity.diff_without_flips,
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


# ---- QCDQ ----------------------------------------------------------------------------------------


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

    The check runs onnxruntime at ``ORT_ENABLE_BASIC`` without ``WeightBiasQuantization`` (the one
    BASIC rewrite that changes results: it rounds float biases to int32); ``ort_basic_diff`` reports
    the difference with every BASIC rewrite on. Raises :class:`ConfigError` for quantizers outside
    2..8 bits, :class:`ModelError` when torch's ONNX exporter fails or when the outputs differ by more
    than ``tol * max(1, max |PyTorch|)``.

    Unlike :func:`export_qonnx` this check does not account for rounding-boundary flips: onnxruntime
    runs the graph as one session, so an input it quantizes cannot be compared and corrected node by
    node without cutting the graph into sessions whose optimizations (and roundings) differ from the
    one checked. A flip here fails the check; ``boundary_flips`` stays 0.
    """
    import onnx
    from brevitas.export import export_onnx_qcdq

    _check_model(model)
    x = _check_input(example_input)
    _check_qcdq_bits(model)
    model.eval()
    with _scratch_dir() as d:
        raw = d / "qcdq.onnx"
        _run_exporter("QCDQ", export_onnx_qcdq, model, x, raw, opset)
        diff, scale, n, allowed, basic = math.nan, math.nan, 0, math.nan, None
        if check:
            diff, scale, n = _parity(_ort_runner(ort_session(raw)), model, x, images)
            allowed = _enforce("QCDQ (onnxruntime BASIC)", diff, scale, tol)
            basic = _parity(_ort_runner(ort_session(raw, exact=False)), model, x, images)[0]
        proto = onnx.load(str(raw))
        layers = _graph_layers(proto, model, "qcdq")
        _onnx_check(proto)
        atomic_write_with(path, lambda tmp: tmp.write_bytes(raw.read_bytes()))
    policy = getattr(model, "aq_policy", None)
    return ExportResult(
        str(path),
        "qcdq",
        diff,
        n,
        {name: gl.weight_bits for name, gl in layers.items()},
        [],
        policy.to_dict() if policy else None,
        opset,
        basic,
        act_bits={name: gl.act_bits for name, gl in layers.items() if gl.act_bits is not None},
        output_scale=scale,
        allowed_diff=allowed,
        diff_without_flips=diff,
    )


def _ort_runner(sess: Any) -> Callable[[np.ndarray], np.ndarray]:
    name = sess.get_inputs()[0].name
    return lambda a: sess.run(None, {name: a})[0]


# ---- files ---------------------------------------------------------------------------------------


def _load_qonnx(path: str | os.PathLike[str]) -> Any:
    from qonnx.core.modelwrapper import ModelWrapper

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"ONNX file {p} does not exist", "export one first with `aq-brevitas export`")
    try:
        return ModelWrapper(str(p))
    except Exception as exc:  # onnx raises DecodeError and friends for non-ONNX bytes
        raise ModelError(f"{p} is not a readable ONNX model ({type(exc).__name__})", "re-export it") from None


def _example_for(mw: Any) -> torch.Tensor:
    shape = mw.get_tensor_shape(mw.graph.input[0].name)
    return torch.rand(*[int(s) if s else 1 for s in shape])


def inference_cost(path: str | os.PathLike[str], model: nn.Module | None = None) -> dict[str, Any]:
    """Per-layer and total BOPs, MACs and weight bits of a QONNX file (qonnx ``inference_cost``).

    qonnx 1.0.0 costs weights behind a ``BipolarQuant`` as FLOAT32; such layers are corrected to
    1 bit per weight here (``bipolar_corrected`` lists them), so weight bits equal the policy's cost.
    With ``model`` (the Brevitas model the file came from), each row names its layer and the weight
    bits are checked against the model's policy, per layer and in total (``weight_bits``); a
    mismatch raises :class:`ModelError`.
    """
    mw = _load_qonnx(path)
    if model is None:
        return _qonnx_cost(mw)
    layers = _graph_layers(mw.model, model, "qonnx")
    cost = _qonnx_cost(mw, layers)
    expected, source = expected_weight_bits(model, _example_for(mw))
    cost["weight_bits"] = _check_weight_memory(cost, layers, expected, source)
    cost["expected_from"] = source
    return cost


def cost_table(cost: dict[str, Any]) -> str:
    """The inference cost as a text table, one row per node (with its layer when known)."""
    rows = [f"{'node':<12} {'layer':<20} {'MACs':>12} {'BOPs':>14} {'weight bits':>12}"]
    for name, r in [*cost["layers"].items(), ("total", cost["total"])]:
        rows.append(
            f"{name:<12} {r.get('layer', ''):<20} {r.get('total_macs', 0):>12,.0f} {r.get('total_bops', 0):>14,.0f} {r.get('total_mem_w_bits', 0):>12,.0f}"
        )
    return "\n".join(rows)


# ---- FINN readiness ------------------------------------------------------------------------------

# Op types a cleaned QONNX graph of a CNN/MLP may contain for FINN's flow, read from FINN's sources
# (github.com/Xilinx/finn, commit 39f0c9a, src/finn/...; no FINN code is used here):
#   transformation/qonnx/convert_qonnx_to_finn.py   ConvertQONNXtoFINN: Quant/BipolarQuant/Trunc,
#       Conv (ExtractBiasFromConv), Gemm (GemmToMatMul)
#   transformation/qonnx/fold_quant_weights.py      weight Quant successors it folds into
#   transformation/qonnx/qonnx_activation_handlers.py  Quant after Relu/Selu (QuantReluHandler) or
#       after BatchNormalization/Add/Sub/Mul/Div or the graph input (QuantIdentityHandler)
#   transformation/streamline/{__init__,absorb,reorder}.py  BatchNormToAffine, Div->Mul, Sub->Add,
#       Flatten/Reshape/Transpose absorbed before the FC layers
#   transformation/fpgadataflow/convert_to_hw_layers.py  hardware layers: MatMul (MVAU), MaxPool,
#       AveragePool (as QuantAvgPool2d, via Trunc), GlobalAveragePool, Add, Mul, Concat, Resize,
#       Upsample, Gather, TopK
# Left out on purpose: ConvTranspose (foldable, but no hardware layer in convert_to_hw_layers),
# Sigmoid, Squeeze/Unsqueeze, Pad and Identity (cleanup_model removes the latter).
FINN_OP_TYPES = frozenset(
    {"Quant", "BipolarQuant", "Trunc", "Conv", "Gemm", "MatMul", "Relu", "Selu", "MaxPool", "AveragePool",
     "GlobalAveragePool", "Flatten", "Reshape", "Transpose", "Add", "Sub", "Mul", "Div", "BatchNormalization",
     "Concat", "Resize", "Upsample", "Gather", "TopK"}
)  # fmt: skip
FINN_MAX_BITS = 8  # ConvertQONNXtoFINN's default max_multithreshold_bit_width


@dataclass
class FinnCheck:
    """One FINN-readiness check: its name, whether the graph passed, and what failed where."""

    name: str
    passed: bool
    detail: str


def _is_po2(scale: Any) -> bool:
    s = np.asarray(scale, dtype=np.float64)
    return bool(np.all(s > 0) and np.all(np.exp2(np.round(np.log2(s))) == s))


def finn_check(
    path: str | os.PathLike[str], policy: Any = None, model: nn.Module | None = None
) -> list[FinnCheck]:
    """Check what FINN's QONNX→FINN flow needs; this does not run FINN (it needs Vivado).

    Checks: only FINN-supported op types; every Quant has an integer bit width in 2..8 (BipolarQuant
    is the 1-bit form); weight zero-points are 0; the graph input is quantized; and every layer whose
    spec asks for ``po2`` scaling has power-of-two weight scales. The po2 check needs the layer names,
    so it needs ``model`` (the Brevitas model the file came from; its ``aq_policy`` is used when
    ``policy`` is not given); failures name the layers.
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
    layer_of: dict[str, str] = {}
    if model is not None:
        layer_of = {gl.node: n for n, gl in _graph_layers(mw.model, model, "qonnx").items()}

    def where(q: Any) -> str:
        consumer = mw.find_consumer(q.output[0])
        cname = consumer.name if consumer is not None else ""
        return f"{layer_of[cname]} ({q.name})" if cname in layer_of else q.name

    bad_bits, nonzero_zp = [], []
    for n in nodes:
        if n.op_type != "Quant":
            continue
        bw = mw.get_initializer(n.input[3])
        if bw is None or float(bw) != int(bw) or not 1 < int(bw) <= FINN_MAX_BITS:
            bad_bits.append(f"{where(n)}={bw}")
        zp = mw.get_initializer(n.input[2])
        if zp is None or np.any(zp != 0):
            nonzero_zp.append(where(n))
    checks.append(
        FinnCheck(
            "integer_bit_widths_le_8",
            not bad_bits,
            "all Quant nodes have integer widths in 2..8" if not bad_bits else f"bad: {', '.join(bad_bits)}",
        )
    )
    checks.append(
        FinnCheck(
            "zero_zero_points",
            not nonzero_zp,
            "all Quant zero-points are 0" if not nonzero_zp else f"non-zero: {', '.join(nonzero_zp)}",
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
    policy = policy if policy is not None else getattr(model, "aq_policy", None)
    if policy is not None:
        checks.append(_po2_check(mw, policy, model))
    return checks


def _po2_check(mw: Any, policy: Any, model: nn.Module | None) -> FinnCheck:
    specs = [*policy.layers.values(), *([policy.default] if policy.default else [])]
    if not any(s.scaling == "po2" for s in specs):
        return FinnCheck("po2_scales", True, "no layer asks for po2 scaling")
    if model is None:
        raise ConfigError(
            "the po2 check needs the model to map graph nodes to the policy's layers",
            "pass model= (the Brevitas model the file was exported from)",
        )
    layers = _graph_layers(mw.model, model, "qonnx")
    resolved = policy.resolve(layers)
    bad = [
        name
        for name, gl in layers.items()
        if name in resolved and resolved[name].scaling == "po2" and not _is_po2(gl.weight_scale)
    ]
    n_po2 = sum(1 for n in layers if n in resolved and resolved[n].scaling == "po2")
    return FinnCheck(
        "po2_scales",
        not bad,
        f"power-of-two weight scales in all {n_po2} po2 layers"
        if not bad
        else f"non-po2 scales: {', '.join(bad)}",
    )


def layer_table(res: ExportResult) -> str:
    """Per-layer bit widths read from the graph, and (QONNX) graph-vs-prediction weight memory."""
    src = res.expected_from or "policy"
    head = f"{'layer':<24} {'weight bits':>11} {'input bits':>10}"
    rows = [head + (f" {'weight memory: graph / ' + src:>32}" if res.weight_bits else "")]
    for name, bits in res.layer_bits.items():
        w = f"{bits}" + (" (bipolar)" if name in res.bipolar_layers else "")
        row = f"{name:<24} {w:>11} {res.act_bits.get(name, 'float'):>10}"
        if name in res.weight_bits:
            row += f" {res.weight_bits[name]['graph']:>20,} / {res.weight_bits[name][src]:<,}"
        rows.append(row)
    if res.weight_bits:
        g = sum(r["graph"] for r in res.weight_bits.values())
        e = sum(r[src] for r in res.weight_bits.values())
        rows.append(f"{'total':<24} {'':>11} {'':>10} {g:>20,} / {e:<,} ({'equal' if g == e else 'DIFFER'})")
    return "\n".join(rows)
