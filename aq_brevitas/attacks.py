"""The one place that builds torchattacks objects from plain settings.

Every attack has the torchattacks interface ``attack(images, labels) -> adv_images`` on inputs in
[0, 1]. Models that normalise their inputs internally need nothing; for models that expect normalised
inputs, pass ``normalization=(mean, std)`` to the evaluation functions, which wrap the model so the
attack still works (and ε is still measured) on [0, 1] images. torchattacks' own
``set_normalization_used`` is not used: in 3.5.1 it expects already-normalised inputs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:  # torch is imported by make_attack's caller; keep this module light for the CLI
    from torch import nn

    from .config import AttackConfig

ATTACKS = ("fgsm", "pgd", "pgdl2", "tpgd", "square", "autoattack")


def check_eps(eps: float, name: str = "eps") -> float:
    """An L-inf budget on [0, 1] images as a float; :class:`ConfigError` unless a number in [0, 1]."""
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
    name: str | AttackConfig,
    model: nn.Module,
    *,
    eps: float | None = None,
    steps: int = 10,
    alpha: float | None = None,
    random_start: bool = True,
    seed: int = 0,
    n_classes: int = 10,
    **extra: Any,
):
    """Build a torchattacks attack by name: fgsm, pgd, pgdl2, tpgd, square or autoattack.

    ``name`` may also be an :class:`~aq_brevitas.config.AttackConfig`, whose settings then replace
    ``eps``, ``steps``, ``alpha`` and ``random_start``. ``eps`` is the budget on [0, 1] images (L-inf;
    L2 for pgdl2); ``alpha`` the step (default 2.5·ε/steps); ``random_start`` applies to pgd/pgdl2.
    ``tpgd`` is TRADES's inner maximisation (Zhang et al. 2019): PGD on KL(f(x') ‖ f(x)) from
    x + 0.001·N(0, 1), labels unused. ``n_queries`` (square, default 1000) goes in ``extra``.
    Returns the attack, called as ``attack(images, labels) -> adversarial images``.
    Raises :class:`ConfigError` for an unknown name or an ε outside [0, 1].
    """
    import torchattacks

    if not isinstance(name, str):  # an AttackConfig
        cfg = name
        name, eps, steps, alpha, random_start = cfg.name, cfg.eps, cfg.steps, cfg.alpha, cfg.random_start
    if eps is None:
        raise ConfigError("make_attack needs eps", "pass eps=..., e.g. eps=0.1")
    eps = check_eps(eps)
    name = name.lower()
    step = alpha or default_alpha(eps, steps)
    if name == "fgsm":
        atk = torchattacks.FGSM(model, eps=eps)
    elif name in ("pgd", "pgdl2"):
        cls = torchattacks.PGD if name == "pgd" else torchattacks.PGDL2
        atk = cls(model, eps=eps, alpha=step, steps=steps, random_start=random_start)
    elif name == "tpgd":
        atk = torchattacks.TPGD(model, eps=eps, alpha=step, steps=steps)
    elif name == "square":
        atk = torchattacks.Square(model, eps=eps, n_queries=extra.pop("n_queries", 1000), seed=seed, **extra)
    elif name == "autoattack":
        atk = torchattacks.AutoAttack(
            model, norm="Linf", eps=eps, version="standard", n_classes=n_classes, seed=seed
        )
    else:
        raise ConfigError(f"unknown attack {name!r}", f"use one of {', '.join(ATTACKS)}")
    return atk
