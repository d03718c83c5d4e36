"""The uniform baseline: the same spec in every layer, the best one that fits the budget.

Highest bit width first, then the scaling × granularity with the best PGD accuracy of the real
Brevitas model on held-out training images (or, without them, the smallest Σ relative weight error).
It is also the reference every searched policy is checked against (docs/method.md "Never worse
than uniform").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..attacks import normalized_inputs
from ..budget import Budget, PolicyCost, achieved_cost, as_budget, fits
from ..candidates import CandidateTable
from ..errors import PolicyError
from ..nnutils import as_xy
from ..policy import LayerSpec, LayerwisePolicy
from .calibration import WeightCache, equivalent_candidates, progress_bar, seeded
from .config import SearchConfig, build_config


def quantized_pgd_accuracy(
    model: nn.Module,
    specs: Mapping[str, LayerSpec],
    val: tuple[torch.Tensor, torch.Tensor],
    calib_x: torch.Tensor,
    *,
    eps: float,
    steps: int,
    seed: int,
) -> float:
    """PGD-``steps`` accuracy (a fraction) on ``val`` = (images, labels) of the real Brevitas model
    :func:`~aq_brevitas.quantize` builds for ``specs``, calibrated on ``calib_x``."""
    from ..convert import quantize
    from ..evaluate import attack_accuracy

    q = quantize(model, LayerwisePolicy(dict(specs)), calibration_data=calib_x)
    with seeded(seed):
        return attack_accuracy(q.eval(), val[0], val[1], "pgd", eps=eps, steps=steps, seed=seed)


def uniform_options(
    table: CandidateTable, budget: Budget, cache: WeightCache | None = None
) -> list[LayerSpec]:
    """Specs in every layer's candidate list that fit the budget used everywhere, at the highest bits
    (in candidate order; with ``cache``, specs giving bit-identical networks are listed once).
    PolicyError when none fits."""
    common = [r.spec for r in next(iter(table.rows.values()))]
    common = [s for s in common if all(any(r.spec == s for r in rows) for rows in table.rows.values())]
    fitting = [s for s in common if fits(table, budget, {n: s for n in table.rows})]
    if not fitting:
        raise PolicyError(
            f"no uniform policy fits the budget {budget.kind}={budget.value:g} "
            f"({len(common)} specs are candidates in every layer)",
            "raise the budget, or give every layer a common cheap candidate",
        )
    top = max(s.weight_bit_width for s in fitting)
    options = [s for s in fitting if s.weight_bit_width == top]
    if cache is None:
        return options
    reps = equivalent_candidates(table, cache)
    seen: set[tuple[LayerSpec, ...]] = set()
    distinct = []
    for s in options:  # drop uniform specs whose quantized network is a copy of an earlier one
        key = tuple(reps[n][s] for n in table.rows)
        if key not in seen:
            seen.add(key)
            distinct.append(s)
    return distinct


@dataclass(frozen=True)
class UniformChoice:
    """The best uniform policy and why: ``spec`` (used in every layer of ``layers``), the ``options``
    it was chosen from, the ``rule`` (``"pgd_accuracy"`` on held-out images or the data-free
    ``"relative_weight_error"``), each option's PGD-``pgd_steps`` accuracy by ``LayerSpec.short()``
    (empty for the data-free rule), and its cost under ``budget``."""

    spec: LayerSpec
    layers: tuple[str, ...]
    options: tuple[LayerSpec, ...]
    rule: str
    pgd_accuracy: dict[str, float]
    pgd_steps: int
    budget: Budget
    cost: PolicyCost
    eps: float
    policy: LayerwisePolicy = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        meta = {
            "method": "uniform",
            "winner": "uniform",
            "budget": self.budget.to_dict(),
            "cost": self.cost.summary(),
            "eps": self.eps,
            "uniform": self.to_dict(),
        }
        object.__setattr__(self, "policy", LayerwisePolicy({n: self.spec for n in self.layers}, None, meta))

    @property
    def accuracy(self) -> float | None:
        """The chosen spec's held-out PGD accuracy (None for the data-free rule)."""
        return self.pgd_accuracy.get(self.spec.short())

    def to_dict(self) -> dict[str, Any]:
        """The ``uniform`` entry of a policy's meta."""
        return {
            "spec": self.spec.to_dict(),
            "options": [s.short() for s in self.options],
            "rule": self.rule,
            "pgd_accuracy": dict(self.pgd_accuracy),
            "pgd_steps": self.pgd_steps,
        }


def _relative_error(cache: WeightCache, layers: list[str], spec: LayerSpec) -> float:
    """Σ_l ‖Ŵ_l − W_l‖_F / ‖W_l‖_F with ``spec`` in every layer."""
    total = 0.0
    for n in layers:
        w = cache.modules[n].weight.detach()
        total += float((cache(n, spec) - w).norm() / w.norm().clamp_min(1e-12))
    return total


def best_uniform(
    model: nn.Module,
    table: CandidateTable,
    budget: Budget | str,
    val_data: Any = None,
    eps: float | None = None,
    *,
    calib_data: Any = None,
    config: SearchConfig | None = None,
    cache: WeightCache | None = None,
    progress: bool = False,
    **overrides: Any,
) -> UniformChoice:
    """The best uniform policy: highest bit width that fits, then the scaling × granularity with the best
    PGD-``pgd_steps`` accuracy on the first ``val_images`` of held-out ``val_data`` (training images;
    ``calib_data`` calibrates the activation quantizers, default the same images). Without
    ``val_data`` the tie is broken data-free by the smallest Σ relative weight error ‖ΔW‖_F/‖W‖_F.
    ``eps`` (default: the config's), ``config``/``overrides`` (``seed``, ``pgd_steps``,
    ``val_images``, ``normalization``) as :class:`SearchConfig`. PolicyError when no uniform policy fits.
    """
    cfg = build_config(config, {**overrides, **({} if eps is None else {"eps": eps})})
    budget = as_budget(budget)
    cache = cache or WeightCache(model)
    options = uniform_options(table, budget, cache)
    layers = table.layers
    results: dict[str, float] = {}
    if val_data is not None:
        with normalized_inputs(model, cfg.normalization):
            val = as_xy(val_data, model=model, name="validation data")
            if cfg.val_images is not None:
                val = (val[0][: cfg.val_images], val[1][: cfg.val_images])
            calib_x = (
                as_xy(calib_data, model=model, name="calibration data")[0]
                if calib_data is not None
                else val[0]
            )
            for s in progress_bar(
                options, desc="uniform candidates", disable=not progress or len(options) < 2
            ):
                results[s.short()] = quantized_pgd_accuracy(
                    model,
                    {n: s for n in layers},
                    val,
                    calib_x,
                    eps=cfg.eps,
                    steps=cfg.pgd_steps,
                    seed=cfg.seed,
                )
        best = max(options, key=lambda s: (results[s.short()], -options.index(s)))
        rule = "pgd_accuracy"
    else:
        errs = {s: _relative_error(cache, layers, s) for s in options}
        best = min(options, key=lambda s: (errs[s], options.index(s)))
        rule = "relative_weight_error"
    cost = achieved_cost(table, {n: best for n in layers})
    return UniformChoice(
        best, tuple(layers), tuple(options), rule, results, cfg.pgd_steps, budget, cost, cfg.eps
    )
