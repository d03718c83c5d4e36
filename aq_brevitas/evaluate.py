"""Accuracy under attack.

:func:`accuracy` and :func:`attack_accuracy` are the building blocks; the full robustness suite
(:func:`evaluate_robustness`) builds on them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .attacks import make_attack
from .errors import ConfigError


def _check_inputs(x: torch.Tensor) -> None:
    if not torch.is_floating_point(x):
        raise ConfigError(
            f"inputs have dtype {x.dtype}, expected floating point images", "convert with x.float() / 255"
        )
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ConfigError(
            f"inputs span [{x.min().item():.3g}, {x.max().item():.3g}], outside [0, 1]",
            "pass un-normalised images in [0, 1]; normalise inside the model",
        )


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int):
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size], y[i : i + batch_size]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 500) -> float:
    """Clean top-1 accuracy of ``model`` (in eval mode) on ``(x, y)``."""
    _check_inputs(x)
    model.eval()
    correct = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in _batches(x, y, batch_size))
    return correct / max(len(y), 1)


def attack_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: str | Any = "pgd",
    *,
    eps: float = 0.1,
    steps: int = 20,
    batch_size: int = 250,
    seed: int = 0,
    progress: bool = False,
    **attack_kwargs: Any,
) -> float:
    """Accuracy on adversarial examples made by ``attack`` (a name for :func:`make_attack`, or an attack)."""
    from tqdm.auto import tqdm

    _check_inputs(x)
    model.eval()
    atk = (
        make_attack(attack, model, eps=eps, steps=steps, seed=seed, **attack_kwargs)
        if isinstance(attack, str)
        else attack
    )
    torch.manual_seed(seed)
    correct = 0
    for xb, yb in tqdm(
        list(_batches(x, y, batch_size)),
        desc=f"{attack if isinstance(attack, str) else type(attack).__name__} eps={eps}",
        disable=not progress,
        leave=False,
    ):
        adv = atk(xb, yb)
        with torch.no_grad():
            correct += (model(adv).argmax(1) == yb).sum().item()
    return correct / max(len(y), 1)
