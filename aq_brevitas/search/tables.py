"""Text tables of search results: a policy per layer (:func:`policy_table`) and several methods side
by side (:func:`compare_methods` / :class:`MethodComparison`, what ``aq-brevitas search --compare``
prints)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..attacks import normalized_inputs
from ..budget import Budget, PolicyCost, as_budget
from ..config import takes_config
from ..forward import as_xy
from ..policy import LayerwisePolicy, cost_of
from .calibration import AdversarialCalibration, adversarial_calibration
from .candidates import CandidateTable, candidate_table, folded_copy
from .config import COMPARE_ORDER, LipschitzSettings, SearchConfig, as_config
from .core import search_policy
from .refine import policy_bound
from .result import SearchResult, UniformEvidence


def _footer_of(
    policy: LayerwisePolicy | SearchResult,
) -> tuple[LayerwisePolicy, dict[str, float], str | None]:
    """The policy, its per-layer scores and the method line, from a result or from a policy's meta
    (a policy loaded from JSON has only its meta)."""
    if isinstance(policy, SearchResult):
        line = f"method: {policy.method} ({policy.estimate or '-'}), winner: {policy.winner}"
        return policy.policy, dict(policy.layer_scores), line
    meta = policy.meta
    scores = {n: v for n, v in (meta.get("layer_scores") or {}).items() if v is not None}
    winner = meta.get("winner")
    line = (
        f"method: {meta.get('method')} ({meta.get('estimate') or '-'}), winner: {winner}" if winner else None
    )
    return policy, scores, line


def policy_table(
    policy: LayerwisePolicy | SearchResult, table_or_geometry: CandidateTable | Mapping[str, Any]
) -> str:
    """Per layer: bits, scaling, granularity, share of the chosen score, and weight cost (KiB, % of
    all weight bits); then the totals and, for a searched policy, its method and winner.
    ``table_or_geometry``: the candidate table or a ``layer_geometry`` dict."""
    geometry = (
        table_or_geometry.scores if isinstance(table_or_geometry, CandidateTable) else table_or_geometry
    )
    policy, scores, footer = _footer_of(policy)
    specs = policy.resolve(geometry)
    total_score = sum(scores.values()) or float("nan")
    c = cost_of(specs, geometry)
    head = f"{'layer':<24} {'bits':>4} {'scaling':<10} {'granularity':<11} {'score share':>11} {'weight KiB':>10} {'% bits':>6}"
    rows = [head, "-" * len(head)]
    for name, g in geometry.items():
        s = specs.get(name)
        bits = (s.weight_bit_width if s else 32) * g.params
        share = (
            f"{100 * scores[name] / total_score:.1f}%"
            if name in scores and math.isfinite(total_score)
            else "-"
        )
        rows.append(
            f"{name:<24} {s.weight_bit_width if s else 'fp32':>4} {s.scaling if s else '-':<10} "
            f"{s.granularity if s else '-':<11} {share:>11} {bits / 8 / 1024:>10.2f} {100 * bits / max(c.weight_bits, 1):>5.1f}%"
        )
    rows.append(
        f"total: {c.avg_weight_bits:.3f} avg weight bits, {c.weight_bytes / 1024:.2f} KiB, {c.bops:.3e} BOPs"
    )
    if footer:
        rows.append(footer)
    return "\n".join(rows)


# --------------------------------------------------------------------------------- side by side
@dataclass(frozen=True)
class ComparisonRow:
    """One method's policy: its cost, the lipschitz prediction for it (Σ s_l and the whole-network
    bound B, logits), the held-out robust accuracy (the per-image worst case of PGD and the fast
    attack suite) of the searched and of the best uniform policy (NaN when not measured) and which
    one was kept."""

    method: str
    cost: PolicyCost
    score_sum: float
    bound: float
    searched_robust: float
    uniform_robust: float
    kept: str


@dataclass(frozen=True)
class MethodComparison:
    """Every method's search on the same data and candidate table, predicted by one estimate."""

    estimate: str
    budget: Budget
    rows: tuple[ComparisonRow, ...]
    results: dict[str, SearchResult]

    def to_text(self) -> str:
        """The 9-column table, one row per method, and a line saying what the predictions are."""
        lines = [
            f"{'method':<10} {'avg bits':>8} {'KiB':>8} {'BOPs':>10} {'Σ s_l':>9} {'bound B':>9} {'searched robust':>16} {'uniform robust':>15} {'kept':>16}"
        ]
        for r in self.rows:
            c = r.cost
            lines.append(
                f"{r.method:<10} {c.avg_weight_bits:8.3f} {c.weight_bytes / 1024:8.2f} {float(c.bops):10.3e} {r.score_sum:9.4g} {r.bound:9.4g} {r.searched_robust:16.4f} {r.uniform_robust:15.4f} {r.kept:>16}"
            )
        lines.append(
            f"Σ s_l and B: lipschitz ({self.estimate}) prediction of each policy's output deviation; lower is better. "
            "Robust: held-out accuracy, per-image worst case of PGD and the fast suite."
        )
        return "\n".join(lines)


def _held_out_accuracies(result: SearchResult) -> tuple[float, float]:
    """(searched, uniform) held-out robust accuracy; for the uniform method both are its own."""
    if isinstance(result.evidence, UniformEvidence):
        acc = result.evidence.choice.accuracy
        return (acc, acc) if acc is not None else (math.nan, math.nan)
    v = result.validation
    return (v.search_accuracy, v.uniform_accuracy) if v is not None else (math.nan, math.nan)


def _bound_inputs(
    model: nn.Module, calib_data: Any, cfg: SearchConfig
) -> tuple[nn.Module, AdversarialCalibration | None]:
    """The model the bound is measured on (folded with ``fold_bn``) and, for ``jacobian``, one
    adversarial calibration of ``calib_data`` (reused when it is one)."""
    lip = cfg.settings_for(LipschitzSettings)
    if cfg.fold_bn:
        model = folded_copy(model)
    if lip.estimate == "spectral":
        return model, None
    if isinstance(calib_data, AdversarialCalibration):
        return model, calib_data
    data = as_xy(calib_data, model=model, name="calibration data")
    return model, adversarial_calibration(
        model, data, eps=cfg.eps, attack=lip.attack, steps=lip.steps, seed=cfg.seed
    )


@takes_config(SearchConfig)
def compare_methods(
    model: nn.Module,
    calib_data: Any,
    budget: Budget | str,
    methods: Sequence[str] = COMPARE_ORDER,
    *,
    table: CandidateTable | None = None,
    val_data: Any = None,
    config: SearchConfig | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> MethodComparison:
    """:func:`search_policy` with each of ``methods`` on the same data, config and candidate table
    (built once from ``calib_data`` when not given), then every method's final policy under the
    config's lipschitz estimate (``jacobian``: on one adversarial calibration of ``calib_data``), so
    the methods are compared on one measure. Arguments and errors as :func:`search_policy`; with a
    ``cache_dir`` the uniform options every method's held-out check compares with are measured once.
    """
    cfg = as_config(config)
    budget = as_budget(budget)
    with normalized_inputs(model, cfg.normalization):
        if table is None:
            x = (
                calib_data.x
                if isinstance(calib_data, AdversarialCalibration)
                else as_xy(calib_data, model=model)[0]
            )
            table = candidate_table(
                model, x, cfg.candidates, seed=cfg.seed, progress=progress, fold_bn=cfg.fold_bn
            )
        results = {
            m: search_policy(
                model,
                calib_data,
                budget,
                config=cfg.replace(method=m),
                val_data=val_data,
                table=table,
                cache_dir=cache_dir,
                progress=progress,
            )  # fmt: skip
            for m in methods
        }
        bound_model, adv = _bound_inputs(model, calib_data, cfg)
        estimate = cfg.settings_for(LipschitzSettings).estimate
        rows = []
        for m, res in results.items():
            b = policy_bound(bound_model, table, res.layers, adv, eps=cfg.eps, estimate=estimate)
            searched, uniform = _held_out_accuracies(res)
            rows.append(ComparisonRow(m, res.cost, b["score_sum"], b["bound"], searched, uniform, res.winner))
    return MethodComparison(estimate, budget, tuple(rows), results)
