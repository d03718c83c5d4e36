"""Brevitas calibration of a quantized model on data, and the input signedness a layer's inputs show."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..forward import eval_mode, iter_x_batches, reported_forward
from ..nnutils import plain_tensor


def model_inputs(batch: Any) -> tuple[Any, ...]:
    """The positional arguments of one batch of :func:`~aq_brevitas.forward.iter_x_batches`: a tensor
    for a single-input model, a tuple of tensors for a model whose forward takes several."""
    return batch if isinstance(batch, tuple) else (batch,)


@torch.no_grad()
def nonnegative_inputs(model: nn.Module, names: Iterable[str], args: tuple[Any, ...]) -> dict[str, bool]:
    """Whether each layer's input is non-negative on ``model(*args)`` (then an unsigned quantizer
    wastes no level).

    A layer fed a Brevitas ``QuantTensor`` is judged on its values."""
    layers = {n: model.get_submodule(n) for n in names}
    out: dict[str, bool] = {}

    def record(name: str, inputs: tuple[Any, ...]) -> None:
        x = plain_tensor(inputs[0]) if inputs else None
        out[name] = out.get(name, True) and (x is None or bool(x.min() >= 0))

    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: record(n, inp)) for n, m in layers.items()]
    try:
        with eval_mode(model), reported_forward(args):
            model(*args)
    finally:
        for h in hooks:
            h.remove()
    return out


def calibrate(
    model: nn.Module, data: Any, *, bias_correction: bool = False, max_batches: int | None = None
) -> None:
    """Brevitas calibration (activation scales from data), optionally followed by bias correction.

    ``data`` is any form :func:`~aq_brevitas.forward.iter_x_batches` streams for ``model`` (images, an
    ``(images, labels)`` pair, a Dataset, a DataLoader, an iterable of batches); labels are unused.
    For a model whose forward takes k > 1 inputs it is a tuple of k tensors (then anything else, such as
    labels), or an iterable of such tuples; a wrong number of inputs is a one-line error.
    ``max_batches`` stops each pass early. The passes run in eval mode, so BatchNorm statistics are
    untouched; every module's train/eval flag is restored afterwards. A failing forward is the one-line
    :class:`~aq_brevitas.errors.ModelError` of :func:`~aq_brevitas.forward.reported_forward`.
    """
    from brevitas.graph.calibrate import bias_correction_mode, calibration_mode

    modes = [calibration_mode] + ([bias_correction_mode] if bias_correction else [])
    with torch.no_grad(), eval_mode(model):
        for mode in modes:  # one pass over the data per mode, in order
            with mode(model):
                for batch in iter_x_batches(data, limit_batches=max_batches, model=model):
                    args = model_inputs(batch)
                    with reported_forward(args):
                        model(*args)
