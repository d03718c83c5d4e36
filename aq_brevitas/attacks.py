"""The one place that builds torchattacks objects from plain settings.

Every attack has the torchattacks interface ``attack(images, labels) -> adv_images`` on inputs in
[0, 1]. Models that normalise their inputs internally need nothing; for models that expect normalised
inputs, pass ``normalization=(mean, std)`` to the evaluation functions, which wrap the model so the
attack still works (and ε is still measured) on [0, 1] images. torchattacks' own
``set_normalization_used`` is not used: in 3.5.1 it expects already-normalised inputs.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from .errors import ConfigError

ATTACKS = ("fgsm", "pgd", "pgdl2", "square", "autoattack")


def check_eps(eps: float, name: str = "eps") -> float:
    """Validate an L-inf budget on [0, 1] images."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or math.isnan(eps):
        raise ConfigError(f"{name} must be a number, got {eps!r}", f"pass e.g. --{name} 0.1")
    if not 0.0 <= float(eps) <= 1.0:
        raise ConfigError(
            f"{name}={eps} is outside [0, 1] (inputs are images in [0, 1])", f"pass e.g. --{name} 0.1"
        )
    return float(eps)


def default_alpha(eps: float, steps: int) -> float:
    """Step size 2.5·ε/steps (Madry et al.), so steps can walk across the ball and back."""
    return 2.5 * eps / max(steps, 1)


def make_attack(
    name: str,
    model: nn.Module,
    *,
    eps: float,
    steps: int = 10,
    alpha: float | None = None,
    random_start: bool = True,
    seed: int = 0,
    n_classes: int = 10,
    **extra: Any,
):
    """Build a torchattacks attack by name: fgsm, pgd, pgdl2, square or autoattack."""
    import torchattacks

    eps = check_eps(eps)
    name = name.lower()
    if name == "fgsm":
        atk = torchattacks.FGSM(model, eps=eps)
    elif name == "pgd":
        atk = torchattacks.PGD(
            model, eps=eps, alpha=alpha or default_alpha(eps, steps), steps=steps, random_start=random_start
        )
    elif name == "pgdl2":
        atk = torchattacks.PGDL2(
            model, eps=eps, alpha=alpha or default_alpha(eps, steps), steps=steps, random_start=random_start
        )
    elif name == "square":
        atk = torchattacks.Square(model, eps=eps, n_queries=extra.pop("n_queries", 1000), seed=seed, **extra)
    elif name == "autoattack":
        atk = torchattacks.AutoAttack(
            model, norm="Linf", eps=eps, version="standard", n_classes=n_classes, seed=seed
        )
    else:
        raise ConfigError(f"unknown attack {name!r}", f"use one of {', '.join(ATTACKS)}")
    return atk
