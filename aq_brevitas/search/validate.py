"""The consistency check of docs/method.md (claim 3): does the bound rank equal-cost policies the way
real robust error does?

Random policies of (near-)equal cost each get the additive score Σ s_l, the whole-network bound
B(p) and the robust accuracy of the real Brevitas model -- the per-image worst case over PGD and
the fast attack suite (:mod:`aq_brevitas.evaluate.suite`), never PGD alone, which quantized nets can fool by
masking gradients; the answer is a Spearman rank correlation
(``scipy.stats.spearmanr``) between each prediction and robust error (ρ > 0: the bound ranks policies
like robust accuracy does; ρ < 0 would mean it misleads).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..attacks import normalized_inputs
from ..budget import Budget, as_budget
from ..config import takes_config
from ..errors import ConfigError
from ..evaluate.suite import SELECTION_SUITE
from ..forward import as_xy, eval_mode
from ..policy import LayerSpec, LayerwisePolicy
from .calibration import (
    WeightCache,
    adversarial_calibration,
    distinct_specs,
    equivalent_candidates,
    progress_bar,
)
from .candidates import CandidateTable, candidate_table
from .config import LipschitzSettings, SearchConfig, as_config
from .costing import achieved_cost, budget_capacity, candidate_costs
from .refine import WholeNetworkBound
from .result import plain
from .scorers import lipschitz_terms


def _signed(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:+.3f}"


def _p(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.3g}"


@dataclass
class MetricValidation:
    """Random equal-cost policies, their predicted bound and measured robust accuracy, and Spearman ρ.

    ``policies``: one dict per policy (``layers`` by short spec, ``cost``, ``score_sum`` Σ s_l,
    ``bound`` B(p), ``robust_accuracy``: the per-image worst case over PGD-``pgd_steps`` and the
    fast suite, ``pgd_accuracy``: PGD alone, both fractions). Robust error is 1 − ``robust_accuracy``
    (``attack`` says so). ``rho``/``p_value``: Spearman(B, robust error);
    ``rho_additive``/``p_value_additive``: Spearman(Σ s_l, robust error), what the knapsack
    optimises; NaN when fewer than two policies or no spread in robust error.
    """

    budget: dict[str, float]
    eps: float
    tolerance: float
    pgd_steps: int
    images: int
    policies: list[dict[str, Any]] = field(default_factory=list)
    rho: float = float("nan")  # Spearman(B(p), robust error): the whole-network bound
    p_value: float = float("nan")
    rho_additive: float = float("nan")  # Spearman(Σ s_l, robust error): what the MILP optimises
    p_value_additive: float = float("nan")
    seconds: float = 0.0
    attack: str = "worst case of PGD and the fast suite"

    def to_dict(self) -> dict[str, Any]:
        return plain(asdict(self))

    def to_markdown(self) -> str:
        lines = [
            f"### Metric validation: {len(self.policies)} random policies at {self.budget} "
            f"(±{100 * self.tolerance:g}%), ε={self.eps:g}, robust accuracy = {self.attack} "
            f"(PGD-{self.pgd_steps}, APGD-CE, APGD-DLR, APGD-T3, transfer, Square) on {self.images} images",
            "",
            f"- Spearman ρ(whole-network bound B(p), robust error) = {_signed(self.rho)} (p = {_p(self.p_value)})",
            f"- Spearman ρ(additive score Σ s_l, robust error) = {_signed(self.rho_additive)} "
            f"(p = {_p(self.p_value_additive)})",
            "",
            "| # | avg bits | Σ s_l | B(p) | robust acc | PGD acc | policy |",
            "|---:|---:|---:|---:|---:|---:|---|",
        ]
        for i, r in enumerate(self.policies):
            pol = ", ".join(f"{n}: {s}" for n, s in r["layers"].items())
            lines.append(
                f"| {i} | {r['cost']['avg_weight_bits']:.3f} | {r['score_sum']:.4g} | {r['bound']:.4g} "
                f"| {100 * r['robust_accuracy']:.1f}% | {100 * r['pgd_accuracy']:.1f}% | {pol} |"
            )
        return "\n".join(lines) + "\n"

    def plot(self, path: Any) -> None:
        """Scatter of the bound (and Σ s) against measured robust error, written to ``path``."""
        from ..plots import plot_metric_validation

        plot_metric_validation(
            [r["bound"] for r in self.policies],
            [r["score_sum"] for r in self.policies],
            [1 - r["robust_accuracy"] for r in self.policies],
            path,
            title=f"bound vs robust error: ρ = {self.rho:+.2f} (Σs: {self.rho_additive:+.2f})",
        )


def sample_policies(
    table: CandidateTable,
    budget: Budget,
    n: int,
    *,
    tolerance: float = 0.05,
    seed: int = 0,
    max_tries: int = 200_000,
    specs: Mapping[str, Sequence[LayerSpec]] | None = None,
) -> list[dict[str, LayerSpec]]:
    """``n`` distinct random policies with cost within ±``tolerance`` (relative) of the budget (rejection);
    ``specs`` restricts each layer's draw (e.g. to one representative of equivalent candidates).
    ConfigError when fewer than ``n`` are found in ``max_tries`` draws."""
    if n < 1:
        raise ConfigError(f"n_policies must be >= 1, got {n}", "pass e.g. n_policies=20")
    if not 0 <= tolerance < 1:
        raise ConfigError(f"tolerance={tolerance} must be in [0, 1)", "pass e.g. tolerance=0.05")
    rng = np.random.default_rng(seed)
    specs = (
        dict(specs) if specs is not None else {n: [r.spec for r in rows] for n, rows in table.rows.items()}
    )
    costs = candidate_costs(table, budget.kind)
    cap = budget_capacity(table, budget)
    found: dict[tuple[tuple[str, LayerSpec], ...], dict[str, LayerSpec]] = {}
    for _ in range(max_tries):
        p = {layer: opts[int(rng.integers(len(opts)))] for layer, opts in specs.items()}
        cost = sum(costs[layer][s] for layer, s in p.items())
        if abs(cost - cap) <= tolerance * cap:
            found.setdefault(tuple(sorted(p.items())), p)
            if len(found) == n:
                break
    if len(found) < n:
        raise ConfigError(
            f"only {len(found)} of {n} random policies landed within ±{100 * tolerance:g}% of the budget",
            "widen the tolerance, change the budget, or ask for fewer policies",
        )
    return list(found.values())


def _spearman(predicted: list[float], err: list[float]) -> tuple[float, float]:
    from scipy.stats import spearmanr

    r = spearmanr(predicted, err)
    return float(r.statistic), float(r.pvalue)


@takes_config(SearchConfig)
def validate_metric(
    model: nn.Module,
    calib_data: Any,
    eval_data: Any,
    budget: Budget | str,
    *,
    n_policies: int = 20,
    tolerance: float = 0.05,
    config: SearchConfig | None = None,
    table: CandidateTable | None = None,
    progress: bool = True,
) -> MetricValidation:
    """Does the bound rank equal-cost policies like robust error? (docs/method.md "Consistency check")

    ``n_policies`` random policies (seeded rejection sampling over distinct candidates) within
    ±``tolerance`` of ``budget``; each gets Σ s_l(c_l), the whole-network bound B(p), and its robust
    accuracy on ``eval_data`` measured on the real Brevitas model (:func:`~aq_brevitas.quantize` +
    :func:`~aq_brevitas.evaluate.suite.suite_accuracies`): the per-image worst case over PGD-``pgd_steps`` and
    the fast suite at the selection settings (:data:`~aq_brevitas.evaluate.suite.SELECTION_SUITE`: APGD-CE,
    APGD-DLR, APGD-T3, transfer from ``model``, Square), never PGD alone (PGD's own accuracy is kept
    too). One number per policy is all a rank correlation needs. ``config``: the
    :class:`SearchConfig` whose ``eps``, ``seed``, ``pgd_steps``, ``candidates``, ``estimate`` and
    ``normalization`` are used; data in any form :func:`~aq_brevitas.forward.as_xy` accepts.
    """
    t_start = time.perf_counter()
    cfg = as_config(config)
    eps, seed, estimate = cfg.eps, cfg.seed, cfg.settings_for(LipschitzSettings).estimate
    budget = as_budget(budget)
    with normalized_inputs(model, cfg.normalization), eval_mode(model):
        x, y = as_xy(calib_data, model=model, name="calibration data")
        ex, ey = as_xy(eval_data, model=model, name="evaluation data")
        calib = adversarial_calibration(model, (x, y), eps=eps, seed=seed) if estimate != "spectral" else None
        if table is None:
            table = candidate_table(model, calib.x_adv if calib else x, cfg.candidates, seed=seed)
        cache = WeightCache(model)
        scores = lipschitz_terms(
            model, table, calib or (x, y), eps=eps, estimate=estimate, seed=seed, cache=cache
        ).scores
        bound = WholeNetworkBound(model, table, estimate, calib, cache)
        distinct = distinct_specs(equivalent_candidates(table, cache))
        drawn = sample_policies(table, budget, n_policies, tolerance=tolerance, seed=seed, specs=distinct)
        rows = [
            _measure(model, p, x, (ex, ey), cfg, table, scores, bound)
            for p in progress_bar(drawn, desc="policies", disable=not progress)
        ]
    err = [1 - r["robust_accuracy"] for r in rows]
    out = MetricValidation(budget.to_dict(), eps, tolerance, cfg.pgd_steps, len(ex), rows)
    if len(rows) >= 2 and len(set(err)) > 1:
        out.rho, out.p_value = _spearman([r["bound"] for r in rows], err)
        out.rho_additive, out.p_value_additive = _spearman([r["score_sum"] for r in rows], err)
    out.seconds = time.perf_counter() - t_start
    return out


def _measure(
    model: nn.Module,
    p: Mapping[str, LayerSpec],
    x: torch.Tensor,
    eval_xy: tuple[torch.Tensor, torch.Tensor],
    cfg: SearchConfig,
    table: CandidateTable,
    scores: Mapping[str, Any],
    bound: WholeNetworkBound,
) -> dict[str, Any]:
    """One drawn policy's row: its cost, Σ s_l(c_l), the bound B(p), and the robust accuracy of the
    real Brevitas model (calibrated on ``x``) over the selection suite."""
    from ..evaluate.suite import suite_accuracies
    from ..quantization.convert import quantize

    q = quantize(model, LayerwisePolicy(dict(p)), calibration_data=x)
    settings = dataclasses.replace(SELECTION_SUITE["settings"], seed=cfg.seed)
    acc = suite_accuracies(
        q.eval(), *eval_xy, eps=cfg.eps, suite=SELECTION_SUITE["suite"], surrogate=model, settings=settings,
        pgd_steps=cfg.pgd_steps,
    )  # fmt: skip
    return {
        "layers": {n: s.short() for n, s in p.items()},
        "cost": achieved_cost(table, p).summary(),
        "score_sum": sum(scores[n][s] for n, s in p.items()),
        "bound": bound(p, cfg.eps),
        "robust_accuracy": acc["worst case"],
        "pgd_accuracy": acc["pgd"],
    }
