"""The classifier contract: which network the package works on, and how it reads that network's output.

* **Wrapped models.** ``nn.DataParallel`` and ``DistributedDataParallel`` only replicate the network
  they hold; every public entry point works on that network (:func:`unwrap_parallel`), so layer names,
  policies and exports carry no ``module.`` prefix.
* **Class logits.** Every prediction, accuracy and attack reads the model's output as class logits
  ``(N, C)`` through :func:`class_logits`. A model with ``C >= 2`` outputs is read as it is. A
  single-logit binary model, output ``(N, 1)`` or ``(N,)`` -- trained with ``BCEWithLogitsLoss``, as
  FINN's own cybersecurity MLP -- is read as the two class logits ``[0, z]``: class 1 when ``z > 0``
  (the sign of the logit, sigmoid > 0.5), and cross-entropy on ``[0, z]`` *is* the binary
  cross-entropy of ``z``. So accuracy, the cross-entropy attacks (PGD, APGD-CE, FAB, Square's margin)
  and training are those of the binary model. Only the softmax-invariant difference ``z`` matters:
  ``[-z/2, z/2]`` would give the same losses and predictions.
* :func:`logit_view` reads the model's output that way, and it is entered by
  :func:`~aq_brevitas.attacks.normalized_inputs`, the block every entry point runs the model in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .errors import ModelError


def unwrap_parallel(model: Any) -> Any:
    """The network a ``nn.DataParallel`` / ``DistributedDataParallel`` holds (nested wrappers too);
    anything else as it is. Public entry points call it on the model they are given.

    >>> from torch import nn
    >>> from aq_brevitas.classifier import unwrap_parallel
    >>> net = nn.Linear(4, 2)
    >>> unwrap_parallel(nn.DataParallel(net)) is net, unwrap_parallel(net) is net
    (True, True)
    """
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, (nn.DataParallel, DistributedDataParallel)):
        model = model.module
    return model


def class_logits(out: Any) -> torch.Tensor:
    """The class logits ``(N, C)`` of a model's output: ``(N, C >= 2)`` as it is; a single logit
    ``(N, 1)`` or ``(N,)`` as ``[0, z]`` (two classes, class 1 when ``z > 0``). A Brevitas
    ``QuantTensor`` is read by its value. Raises a one-line :class:`ModelError` for other shapes.

    >>> import torch
    >>> from aq_brevitas.classifier import class_logits
    >>> class_logits(torch.tensor([[2.0], [-1.0]])).tolist()
    [[0.0, 2.0], [0.0, -1.0]]
    >>> class_logits(torch.tensor([2.0, -1.0])).argmax(1).tolist()  # the sign of the logit
    [1, 0]
    """
    out = getattr(out, "value", out)
    if not isinstance(out, torch.Tensor) or out.dim() not in (1, 2) or (out.dim() == 2 and out.shape[1] == 0):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(
            f"the model's output {shape} is not class logits (N, classes) or one binary logit (N, 1)/(N,)",
            "make forward return one tensor of logits, one row per sample",
        )
    if out.dim() == 2 and out.shape[1] >= 2:
        return out
    z = out.reshape(-1, 1)
    return torch.cat([torch.zeros_like(z), z], dim=1)


def n_classes(out: Any) -> int:
    """How many classes a model's output ``out`` scores: its width, 2 for a single logit."""
    return int(class_logits(out).shape[1])


class _LogitReader:
    """A forward hook reading the output through :func:`class_logits` while ``on``. Copies of the model
    share it (so a model deep-copied inside a :func:`logit_view` block reads the same), and it does
    nothing once its block has ended."""

    def __init__(self) -> None:
        self.on = True

    def __deepcopy__(self, memo: dict[int, Any]) -> _LogitReader:
        return self

    def __call__(self, module: nn.Module, args: Any, out: Any) -> Any:
        if not self.on or not isinstance(out, torch.Tensor) or out.dim() not in (1, 2) or out.shape[-1] == 0:
            return None  # not a classifier's output: let the caller's own checks name it
        return class_logits(out)


@contextlib.contextmanager
def logit_view(model: nn.Module) -> Iterator[nn.Module]:
    """Until exit, ``model``'s output is read as class logits (:func:`class_logits`): a single-logit
    model returns ``[0, z]``, ``(N, 2)``; any other model is unchanged. Nested blocks read once.

    >>> import torch
    >>> from aq_brevitas.classifier import logit_view
    >>> net = torch.nn.Linear(3, 1)
    >>> with logit_view(net):
    ...     inside = net(torch.rand(5, 3)).shape
    >>> inside, net(torch.rand(5, 3)).shape
    (torch.Size([5, 2]), torch.Size([5, 1]))
    """
    if any(isinstance(h, _LogitReader) and h.on for h in model._forward_hooks.values()):
        yield model
        return
    reader = _LogitReader()
    handle = model.register_forward_hook(reader)
    try:
        yield model
    finally:
        reader.on = False
        handle.remove()
