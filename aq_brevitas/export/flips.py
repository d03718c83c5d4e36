"""QONNX parity with rounding-boundary flips: the parity bound of :mod:`.parity`, node by node.

ONNX and PyTorch compute a quantizer's input (conv sums, BatchNorm) in float32 in different orders,
so it can differ by an ulp or two. Where that input sits within such noise of a rounding boundary
k + 0.5 (in code units t = x / scale + zero_point), the two sides round to codes k and k + 1: a
"flip". One flip moves every logit that depends on it by a quantization step times the weights
downstream (measured: 8.5e-4 on logits of 11.7), far above the float32 tolerance, and it cascades:
the next quantizer's inputs then differ by a whole step, not by noise. So an image whose output
misses the plain bound is re-run node by node (:func:`forced_run`): at each Quant node, in graph
order, the ONNX codes are compared with those of the PyTorch quantizer that made the same tensor,
the legitimate flips are given PyTorch's codes (so nothing cascades), and the final output must
then meet the plain bound. Every other code difference is an error. See docs/export.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ModelError
from .parity import ParityOutcome, checked_inputs, enforce_bound, output_diffs, torch_output

# At most this fraction of a quantizer's elements (and at least one) may flip on one image: float32
# noise puts an element within ~1e-5 code units of a boundary about once in 1e5.
MAX_FLIP_FRACTION = 1e-3
# Slack, in float32 ulps of the boundary, for the rounding of x / scale + zero_point itself (at most
# one ulp each for the division and the addition).
BOUNDARY_ULPS = 2

QuantParams = tuple[np.ndarray, ...]  # a Quant node's (scale, zero_point, bit_width) initializers


@dataclass
class QuantCall:
    """One call of a Brevitas integer quantizer (``IntQuant``) during a PyTorch forward."""

    quantizer: str  # the quant proxy that made the call, e.g. "relu2.act_quant"
    x: np.ndarray  # its float input
    y: np.ndarray  # its (dequantized) output
    scale: np.ndarray
    zero_point: np.ndarray
    bit_width: float


def quant_calls(model: nn.Module, xb: torch.Tensor) -> tuple[np.ndarray, list[QuantCall]]:
    """PyTorch's output for ``xb`` and every integer-quantizer call the forward made, in call order.

    Hooks sit on Brevitas' ``IntQuant`` (where every integer quantizer divides, rounds and clamps),
    so weights, inputs and activations are seen alike, whatever proxy or layer wraps them.
    """
    from brevitas.core.quant.int_base import IntQuant
    from brevitas.proxy.quant_proxy import QuantProxyFromInjector

    modules = dict(model.named_modules())
    proxies = [n for n, m in modules.items() if isinstance(m, QuantProxyFromInjector)]
    calls: list[QuantCall] = []

    def hook(quantizer: str) -> Callable[..., None]:
        def record(_mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if len(args) == 4:  # (scale, zero_point, bit_width, x): IntQuant.forward's positional call
                scale, zp, bw, x = (torch.as_tensor(a).detach().cpu() for a in args)
                arrays = (x.numpy(), out.detach().cpu().numpy(), scale.numpy(), zp.numpy())
                calls.append(QuantCall(quantizer, *(a.copy() for a in arrays), float(bw)))

        return record

    handles = []
    for name, mod in modules.items():
        if isinstance(mod, IntQuant):
            owner = max((p for p in proxies if name.startswith(p + ".")), key=len, default=name)
            # a TorchScript IntQuant (BREVITAS_JIT=1) takes no hooks: its nodes stay unmatched
            with contextlib.suppress(RuntimeError):
                handles.append(mod.register_forward_hook(hook(owner)))
    try:
        return torch_output(model, xb), calls
    finally:
        for h in handles:
            h.remove()


def _codes(y: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """Integer codes of a dequantized tensor ``y = (code - zero_point) * scale`` (exact after rounding)."""
    return np.round(y.astype(np.float64) / scale.astype(np.float64) + zero_point.astype(np.float64))


def matching_call(y: np.ndarray, params: QuantParams, calls: list[QuantCall]) -> QuantCall | None:
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


def boundary_flips(
    x_onnx: np.ndarray, y_onnx: np.ndarray, params: QuantParams, call: QuantCall, tol: float
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


def check_flips(node: Any, image: int, call: QuantCall, differs: np.ndarray, legit: np.ndarray) -> int:
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


def forced_run(
    mw: Any, model: nn.Module, xb: torch.Tensor, image: int, tol: float
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """``(ONNX output, PyTorch output, flips per node)`` for one input, flips given PyTorch's codes.

    The graph runs in segments ending at each Quant node; a node's output is compared with the
    PyTorch quantizer call that made the same tensor (:func:`matching_call`), and its legitimate
    flips are replaced by PyTorch's values before the next segment runs. A Quant node that matches
    no PyTorch call is left as it is: whatever it changes stays in the output, which the caller
    holds to the plain bound.
    """
    ref, calls = quant_calls(model, xb)
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
        call = matching_call(y, params, calls)
        if call is None:
            continue
        differs, legit = boundary_flips(ctx[node.input[0]], y, params, call, tol)
        if differs.any():
            flips[f"{node.name} ({call.quantizer})"] = check_flips(node, image, call, differs, legit)
            ctx[node.output[0]] = np.where(differs, call.y, y).astype(y.dtype)
    if start < len(nodes):
        ctx = _run_segment(mw, ctx, nodes[start], nodes[-1])
    return ctx[mw.graph.output[0].name], ref, flips


def _run_segment(mw: Any, ctx: dict[str, Any], first: Any, last: Any) -> dict[str, np.ndarray]:
    """Nodes ``first..last`` of the graph on the tensors computed so far; the full context after them."""
    from qonnx.core.onnx_exec import execute_onnx

    known = {k: v for k, v in ctx.items() if v is not None}  # the context holds None for unset optionals
    return execute_onnx(mw, known, return_full_exec_context=True, start_node=first, end_node=last)


def flip_aware_parity(
    mw: Any, model: nn.Module, x: torch.Tensor, images: torch.Tensor | None, tol: float
) -> ParityOutcome:
    """QONNX parity: the plain bound, or the same bound once rounding-boundary flips are accounted for.

    Every input runs through qonnx ``execute_onnx`` on the ModelWrapper ``mw``; one whose output
    misses ``tol * max(1, max |PyTorch|)`` is re-run by :func:`forced_run`. Raises
    :class:`ModelError` for a code difference that is not a legitimate flip, for too many flips at
    one node, or when the output, flips given PyTorch's codes, still misses the bound.
    """
    from qonnx.core.onnx_exec import execute_onnx

    inp, out = mw.graph.input[0].name, mw.graph.output[0].name
    batch = checked_inputs(x, images)
    diffs, scale = output_diffs(lambda a: execute_onnx(mw, {inp: a})[out], model, batch)
    allowed = tol * max(1.0, scale)
    residual, flips = list(diffs), {}
    for i, xb in enumerate(batch):
        if not diffs[i] <= allowed:
            forced, ref, found = forced_run(mw, model, xb, i, tol)
            residual[i] = float(np.abs(forced - ref).max())
            for where, n in found.items():
                flips[where] = flips.get(where, 0) + n
    worst = float(np.max(residual))  # np.max, not max(): a NaN stays NaN and fails
    forced = f" (with {sum(flips.values())} rounding-boundary flips given PyTorch's codes)" if flips else ""
    enforce_bound("QONNX" + forced, worst, scale, tol)
    return ParityOutcome(float(np.max(diffs)), scale, len(batch), allowed, worst, flips)
