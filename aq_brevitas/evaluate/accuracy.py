"""Clean accuracy and accuracy under one attack, batch by batch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..attacks import (
    AdaptedAttack,
    check_input_gradient,
    make_attack,
    needs_input_gradient,
    normalized_inputs,
)
from ..forward import as_xy, check_forward, eval_mode, frozen_quant_weights, require_single_input


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size], y[i : i + batch_size]


def _data(x: Any, y: torch.Tensor | None) -> Any:
    """The data of a ``(model, x, y)`` call: ``(x, y)`` when labels are given, else ``x`` itself."""
    return x if y is None else (x, y)


# -- building blocks --------------------------------------------------------------------------------------
@torch.no_grad()
def accuracy(
    model: nn.Module,
    x: Any,
    y: torch.Tensor | None = None,
    *,
    batch_size: int = 500,
    normalization: Any = None,
) -> float:
    """Clean top-1 accuracy in [0, 1] of ``model`` (measured in eval mode) on images ``x`` with labels ``y``.

    Without ``y``, ``x`` is any data form :func:`~aq_brevitas.forward.as_xy` accepts (an ``(images,
    labels)`` pair, a Dataset, a DataLoader, an iterable of batches). Images are float, in [0, 1];
    ``normalization=(mean, std)`` feeds a model that expects normalised inputs ``(x - mean) / std``.
    The model comes back in the train/eval mode it came in. Bad data raises a one-line
    :class:`ConfigError`, a model that cannot run them a :class:`ModelError`.
    """
    require_single_input(model, "accuracy")
    x, y = as_xy(_data(x, y), name="inputs")
    with normalized_inputs(model, normalization):
        check_forward(model, x)
        with eval_mode(model), frozen_quant_weights(model):
            correct = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in batches(x, y, batch_size))
    return correct / len(y)


def attack_accuracy(
    model: nn.Module,
    x: Any,
    y: torch.Tensor | None = None,
    attack: str | Any = "pgd",
    *,
    eps: float = 0.1,
    steps: int = 20,
    batch_size: int = 250,
    seed: int = 0,
    progress: bool = False,
    normalization: Any = None,
    **attack_kwargs: Any,
) -> float:
    """Accuracy in [0, 1] on adversarial examples made by ``attack`` (a name for :func:`make_attack`
    with ``eps``, ``steps``, ``seed`` and ``attack_kwargs``, or a built attack).

    ``x``, ``y`` are as for :func:`accuracy`. ``normalization=(mean, std)`` is for a model that expects
    normalised inputs: ``x`` stays in [0, 1] (where ε is measured) and the model is fed
    ``(x - mean) / std`` (default: that of an attack built with it). The torch RNG is seeded with
    ``seed`` (the attack's random start). The model is attacked in eval mode and comes back in the
    mode it came in. A model without input gradient (a converted integer torch.ao model) is refused
    by gradient attacks with a one-line :class:`ModelError`; so is a model that cannot run ``x``.
    """
    from tqdm.auto import tqdm

    require_single_input(model, "attack_accuracy")
    x, y = as_xy(_data(x, y), name="inputs")
    if normalization is None and isinstance(attack, AdaptedAttack):  # classify as the attack saw it
        normalization = attack.normalization
    with normalized_inputs(model, normalization):
        check_forward(model, x)
        if needs_input_gradient(attack):
            check_input_gradient(model, x)
        with eval_mode(model):
            atk = (
                make_attack(attack, model, eps=eps, steps=steps, seed=seed, **attack_kwargs)
                if isinstance(attack, str)
                else attack
            )
            torch.manual_seed(seed)
            correct = 0
            with frozen_quant_weights(model):
                for xb, yb in tqdm(
                    list(batches(x, y, batch_size)),
                    desc=f"{attack if isinstance(attack, str) else type(attack).__name__} eps={eps}",
                    disable=not progress,
                    leave=False,
                ):
                    adv = atk(xb, yb)
                    with torch.no_grad():
                        correct += (model(adv).argmax(1) == yb).sum().item()
    return correct / len(y)


# -- the suite --------------------------------------------------------------------------------------------
def subset(n: int, k: int, seed: int) -> torch.Tensor:
    """A seeded subset of ``k`` of ``n`` indices (sorted), the same for the same seed."""
    if k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values
