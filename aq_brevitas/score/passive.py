"""Parameter-free ops in the data-free chain gain: pooling, upsampling, constant scalings.

The spectral gain of a layer (:mod:`aq_brevitas.score.lipschitz`) multiplies the operator norms of
what runs after it. The quantizable layers carry weights; between them, ops without parameters can
scale a perturbation too: an average pool over k inputs shrinks it (‖A‖₂ = 1/√k for disjoint
windows), a nearest upsampling by s copies it (‖U‖₂ = √s), a max pool with overlapping windows can
pass one input to several outputs. :func:`passive_norms` gives each such module, in execution order,
an upper bound of its ℓ2 Lipschitz constant, from the standard ‖A‖₂ ≤ √(‖A‖₁‖A‖∞) (for a pool: each
output averages, or picks, from its window; each input sits in at most c windows, so ‖A‖₂ ≤ √(c/k)
for an average and ≤ √c for a max). What it cannot bound (a functional call the module hooks do not
see, bilinear upsampling, an average pool that divides by fewer than its window at the borders) is
named, so the gain warns instead of silently leaving it out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..forward import eval_mode, paused_observers
from ..nnutils import QUANTIZABLE_TYPES, trace_leaves

_AVG = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_MAX = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_ADAPTIVE_AVG = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_UPSAMPLE = (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
# functional calls that scale a perturbation, invisible to module hooks (named in the warning)
_FUNCTIONAL = {
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "adaptive_avg_pool3d", "interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "mean",
}  # fmt: skip


def _tuple(value: Any, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def _window_bound(kernel: Sequence[int], stride: Sequence[int]) -> int:
    """How many windows one input can sit in: Π ⌈k/s⌉."""
    return math.prod(math.ceil(k / max(s, 1)) for k, s in zip(kernel, stride, strict=True))


def module_norm(module: nn.Module, in_shape: Sequence[int], out_shape: Sequence[int]) -> float | None:
    """An upper bound of the ℓ2 Lipschitz constant of a parameter-free ``module`` on per-sample input
    shape ``in_shape`` (C, *spatial) giving ``out_shape``; 1.0 for ops that move or copy each value at
    most once; None when it is not bounded here.

    >>> module_norm(nn.AvgPool2d(2), (1, 4, 4), (1, 2, 2)), module_norm(nn.Upsample(scale_factor=2), (1, 2, 2), (1, 4, 4))
    (0.5, 2.0)
    """
    spatial_in, spatial_out = tuple(in_shape[1:]), tuple(out_shape[1:])
    dims = len(spatial_in)
    if isinstance(module, _AVG):
        kernel = _tuple(module.kernel_size, dims)
        stride = _tuple(module.stride or module.kernel_size, dims)
        padded = any(p for p in _tuple(module.padding, dims))
        if (padded and not module.count_include_pad) or getattr(module, "divisor_override", None):
            return None  # border outputs divide by fewer than the window
        return math.sqrt(_window_bound(kernel, stride) / math.prod(kernel))
    if isinstance(module, _MAX):
        kernel = _tuple(module.kernel_size, dims)
        stride = _tuple(module.stride or module.kernel_size, dims)
        dilation = _tuple(module.dilation, dims)
        span = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilation, strict=True))
        return math.sqrt(_window_bound(span, stride))
    if isinstance(module, _ADAPTIVE_AVG):
        if any(i % o for i, o in zip(spatial_in, spatial_out, strict=True)):
            return None  # windows of unequal size
        return 1.0 / math.sqrt(math.prod(i // o for i, o in zip(spatial_in, spatial_out, strict=True)))
    if isinstance(module, _UPSAMPLE):
        nearest = getattr(module, "mode", "nearest") == "nearest"
        if not nearest or any(o % i for i, o in zip(spatial_in, spatial_out, strict=True)):
            return None
        return math.sqrt(math.prod(o // i for i, o in zip(spatial_in, spatial_out, strict=True)))
    return 1.0


def passive_norms(
    model: nn.Module, args: tuple[Any, ...]
) -> tuple[list[tuple[str, bool, float | None]], list[str]]:
    """The modules ``model`` calls on ``args`` (its first sample), in execution order:
    ``(name, is_layer, norm)`` for each call of a quantizable layer (``is_layer`` True, norm None: the
    caller has its ``L``) and of each parameter-free module whose bound is not 1 (:func:`module_norm`;
    None when unknown); and the functional calls that scale a perturbation which module hooks cannot
    see (named from the fx graph; empty when it does not trace)."""
    order: list[tuple[str, bool, float | None]] = []
    leaves = {
        n: m for n, m in model.named_modules() if not list(m.children()) or isinstance(m, QUANTIZABLE_TYPES)
    }

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if isinstance(module, QUANTIZABLE_TYPES):
                order.append((name, True, None))
            elif (
                torch.is_tensor(output)
                and inputs
                and torch.is_tensor(inputs[0])
                and not any(True for _ in module.parameters(recurse=False))
            ):
                norm = module_norm(module, tuple(inputs[0].shape[1:]), tuple(output.shape[1:]))
                if norm != 1.0:
                    order.append((name, False, norm))

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in leaves.items()]
    try:
        with eval_mode(model), paused_observers(model), torch.no_grad():
            model(*(a[:1] for a in args))
    finally:
        for h in handles:
            h.remove()
    return order, _functional_scalings(model)


def _functional_scalings(model: nn.Module) -> list[str]:
    gm = trace_leaves(model)
    if gm is None:
        return []
    out = []
    for node in gm.graph.nodes:
        target = getattr(node.target, "__name__", str(node.target))
        if node.op in ("call_function", "call_method") and target in _FUNCTIONAL:
            out.append(f"{target} ({node.name})")
        elif node.op in ("call_function", "call_method") and target in ("mul", "truediv", "div"):
            if any(isinstance(a, (int, float)) and a not in (1, 1.0) for a in node.args):
                out.append(f"{target} by a constant ({node.name})")
    return out
