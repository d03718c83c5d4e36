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
from ..classifier import unwrap_parallel
from ..config import AttackConfig, config_or_default, takes_config
from ..errors import ConfigError, warn
from ..forward import as_xy, check_forward, eval_mode, frozen_quant_weights, require_single_input
from ..quantization.twin import attack_twin, verified_logits


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
    The model comes back in the train/eval mode it came in. Its output is read as class logits: a
    single-logit binary model (output ``(N, 1)`` or ``(N,)``) predicts class 1 where its logit is
    positive (:mod:`aq_brevitas.classifier`); a ``DataParallel`` model is measured as the network it
    holds. Bad data raises a one-line :class:`ConfigError`, a model that cannot run them a
    :class:`ModelError`.
    """
    model = unwrap_parallel(model)
    require_single_input(model, "accuracy")
    x, y = as_xy(_data(x, y), name="inputs")
    with normalized_inputs(model, normalization):
        check_forward(model, x)
        with eval_mode(model), frozen_quant_weights(model):
            correct = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in batches(x, y, batch_size))
    return correct / len(y)


@takes_config(AttackConfig)
def attack_accuracy(
    model: nn.Module,
    x: Any,
    y: torch.Tensor | None = None,
    config: AttackConfig | None = None,
    *,
    attack: AdaptedAttack | None = None,
    batch_size: int = 250,
    seed: int = 0,
    progress: bool = False,
) -> float:
    """Accuracy in [0, 1] on the adversarial examples of the attack ``config`` describes (an
    :class:`~aq_brevitas.config.AttackConfig`; None: ``AttackConfig()``, PGD-10 at ε = 0.1), built by
    :func:`make_attack` with ``seed``, or of ``attack``, one :func:`make_attack` built already (not both).

    ``x``, ``y`` are as for :func:`accuracy`. A Brevitas model is attacked on its attack twin
    (:func:`~aq_brevitas.quantization.twin.attack_twin`) and every adversarial example is judged by
    its Brevitas forward; where the two classify one differently, a ``UserWarning`` says how often.
    ``x`` stays in [0, 1], where ε is measured; the model is
    fed ``(x - mean) / std`` when the config (or the built attack) has ``normalization=(mean,
    std)``. The torch RNG is seeded with ``seed`` (the attack's random start). The model is attacked
    in eval mode and comes back in the mode it came in. The attack reads the model's class count
    (a single logit: the two classes ``[0, z]``; :func:`~aq_brevitas.attacks.make_attack`); autoattack
    on fewer than 4 classes runs without APGD-T and warns so. Raises :class:`ConfigError` for bad data or
    settings, and for an attack the model has too few classes for (apgd-dlr: 3, apgd-t: 4); a model without input gradient (a converted integer torch.ao model) is refused by
    gradient attacks with a one-line :class:`ModelError`, and so is a model that cannot run ``x``.

    >>> import torch
    >>> from aq_brevitas import AttackConfig, attack_accuracy
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    >>> x = torch.rand(8, 1, 4, 4)
    >>> y = model(x).argmax(1)  # labels the model gets right
    >>> attack_accuracy(model, x, y, AttackConfig("fgsm", eps=0.0))
    1.0
    """
    from tqdm.auto import tqdm

    if attack is not None and config is not None:
        raise ConfigError("attack_accuracy got both config and a built attack", "pass one of them")
    cfg = config_or_default(config, AttackConfig())
    model = unwrap_parallel(model)
    require_single_input(model, "attack_accuracy")
    x, y = as_xy(_data(x, y), name="inputs")
    name = cfg.name if attack is None else attack.name
    # a built attack brings its own normalisation: classify as the attack saw it
    with normalized_inputs(model, cfg.normalization if attack is None else attack.normalization):
        check_forward(model, x)
        if needs_input_gradient(name):
            check_input_gradient(model, x)
        with eval_mode(model):
            atk = make_attack(cfg, model, seed=seed) if attack is None else attack
            torch.manual_seed(seed)
            correct = 0
            with attack_twin(model) as twin:
                chunks = list(batches(x, y, batch_size))
                for xb, yb in tqdm(chunks, desc=f"{name} eps={atk.eps}", disable=not progress, leave=False):
                    correct += (verified_logits(model, atk(xb, yb)).argmax(1) == yb).sum().item()
    _warn_after(atk, twin)
    return correct / len(y)


def _warn_after(atk: AdaptedAttack, twin: Any) -> None:
    """What :func:`attack_accuracy` says after attacking: what the class count changed in the attack,
    and where the attack twin and the Brevitas forward disagreed."""
    if atk.note:
        warn(
            f"attack_accuracy: {atk.note} -- fix: nothing to do (the model has too few classes for the rest)"
        )
    if twin.disagreements:
        warn(
            f"attack_accuracy: {twin.notes()[0]} -- fix: nothing to do for this number (the Brevitas "
            "model decided every point); please report the model: the twin should agree with it"
        )


# -- the suite --------------------------------------------------------------------------------------------
def subset(n: int, k: int, seed: int) -> torch.Tensor:
    """A seeded subset of ``k`` of ``n`` indices (sorted), the same for the same seed."""
    if k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values
