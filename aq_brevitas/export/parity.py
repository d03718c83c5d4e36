"""The parity bound every export format is held to: the exported graph computes what the model does.

``max |ONNX - PyTorch| <= tol * max(1, max |PyTorch output|)`` over the example input and each checked
image. Both sides compute in float32 with different summation orders, so the noise grows with the
logits' magnitude (measured: 1-3.5 float32 ulps of the largest logit); below logits of 1 this is the
absolute ``tol``. A QONNX export also forgives rounding-boundary flips (:mod:`.flips`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import ModelError
from ..forward import eval_mode

DEFAULT_TOL = 1e-5

Runner = Callable[[np.ndarray], np.ndarray]  # one input batch (numpy) -> the exported graph's output


@dataclass
class ParityOutcome:
    """The outcome of a parity check (see :class:`ExportResult` for the fields' meaning)."""

    max_abs_diff: float = math.nan
    output_scale: float = math.nan
    images: int = 0
    allowed: float = math.nan
    diff_without_flips: float = math.nan
    flips: dict[str, int] = field(default_factory=dict)


def torch_output(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """The model's output for ``x`` in eval mode, as a numpy array (a QuantTensor's value); the model's
    train/eval flags are restored afterwards."""
    with eval_mode(model), torch.no_grad():
        out = model(x)
    return getattr(out, "value", out).detach().cpu().numpy()


def checked_inputs(x: torch.Tensor, images: torch.Tensor | None) -> list[torch.Tensor]:
    """The checked inputs: the example input (image 0), then each of ``images`` on its own."""
    return [x] + ([images[i : i + 1] for i in range(len(images))] if images is not None else [])


def output_diffs(run: Runner, model: nn.Module, batch: list[torch.Tensor]) -> tuple[list[float], float]:
    """Per input, ``max |ONNX - PyTorch|``; and ``max |PyTorch|`` over all of them."""
    diffs, scale = [], 0.0
    for xb in batch:
        ref = torch_output(model, xb)
        diffs.append(float(np.abs(run(xb.numpy()) - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
    return diffs, scale


def measure_parity(
    run: Runner, model: nn.Module, x: torch.Tensor, images: torch.Tensor | None
) -> tuple[float, float, int]:
    """``(max |ONNX - PyTorch|, max |PyTorch|, images)`` over the example input and each image."""
    batch = checked_inputs(x, images)
    diffs, scale = output_diffs(run, model, batch)
    return float(np.max(diffs)), scale, len(batch)  # np.max: a NaN difference stays NaN (and fails)


def enforce_bound(what: str, diff: float, scale: float, tol: float) -> float:
    """Raise :class:`ModelError` unless ``diff <= tol * max(1, scale)``; return that bound."""
    allowed = tol * max(1.0, scale)
    if not diff <= allowed:
        raise ModelError(
            f"{what} output differs from PyTorch by {diff:.3g} (> tol {tol:g} x output scale {max(1.0, scale):.3g})",
            "report this model; or pass tol= if the difference is expected",
        )
    return allowed
