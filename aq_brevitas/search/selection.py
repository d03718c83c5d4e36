"""The selection step on ready scores: the exact knapsack over distinct candidates, then (optionally)
refinement on the whole-network bound.

:func:`~aq_brevitas.search.search_policy` scores and then calls :func:`select_policy`; ablations call
it directly to try several settings (``adv_weight``, ``refine``) on one set of measured terms.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from ..budget import Budget, as_budget
from ..config import takes_config
from ..policy import LayerSpec
from .calibration import Representatives, WeightCache, distinct_specs, equivalent_candidates
from .candidates import CandidateTable
from .config import LipschitzSettings, SearchConfig, as_config
from .costing import budget_capacity, candidate_costs
from .mckp import MckpSolution, solve_top_k
from .refine import Refinement, WholeNetworkBound, refine
from .scorers import LipschitzTerms, Scores


@dataclass
class Selection:
    """What :func:`select_policy` found: the (refined) ``choice``, the knapsack's own optimum
    ``milp_choice``, all knapsack ``solutions`` (objective order), the refinement record, the
    candidate representatives (``reps``: candidate -> first one with an identical Ŵ; ``distinct``:
    the representatives per layer) and the seconds spent solving and refining."""

    choice: dict[str, LayerSpec]
    milp_choice: dict[str, LayerSpec]
    solutions: list[MckpSolution]
    refinement: Refinement
    reps: Representatives
    distinct: dict[str, list[LayerSpec]]
    solve_s: float
    refine_s: float


def _restrict(values: Mapping[str, Mapping[LayerSpec, float]], reps: Representatives) -> Scores:
    """Only each layer's representative candidates."""
    return {n: {s: v for s, v in vals.items() if reps[n][s] == s} for n, vals in values.items()}


def tied_layers(table: CandidateTable) -> dict[str, str]:
    """Layer -> the earlier layer whose weight Parameter it uses (tied weights, ``LayerScore.weight_of``)."""
    return {
        n: sc.weight_of for n, sc in table.scores.items() if sc.weight_of in table.rows and n in table.rows
    }


def _merge_tied(values: Scores, ties: Mapping[str, str], full: Scores) -> Scores:
    """One knapsack item per tied group: a weight stored once is quantized once, with one spec, so the
    owner's options (its representative candidates in ``values``) carry the sum of both layers'
    scores, or costs (bits once, MACs at every use), the tied layer's taken from ``full``."""
    merged = {n: dict(v) for n, v in values.items() if n not in ties}
    for layer, owner in ties.items():
        merged[owner] = {s: v + full[layer][s] for s, v in merged[owner].items() if s in full[layer]}
    return merged


def _untie(solution: MckpSolution, ties: Mapping[str, str]) -> MckpSolution:
    choice = {**solution.choice, **{layer: solution.choice[owner] for layer, owner in ties.items()}}
    return MckpSolution(choice, solution.objective, solution.cost, solution.status)


@takes_config(SearchConfig)
def select_policy(
    model: nn.Module,
    table: CandidateTable,
    scores: Scores | LipschitzTerms,
    budget: Budget | str,
    *,
    config: SearchConfig | None = None,
    cache: WeightCache | None = None,
    progress: bool = False,
) -> Selection:
    """Knapsack and, for :class:`LipschitzTerms` with ``refine``, refinement: the selection step alone.

    ``scores``: per (layer, candidate) of ``table``, or the lipschitz terms (then weighted by the
    config's ``adv_weight``). With ``refine`` the config's ``top_k`` knapsack solutions are re-ranked
    by the whole-network bound at its ``eps`` and one pass of coordinate descent runs on it (off by
    default, as in ``search_policy``); for the lipschitz terms ``solutions`` holds at least
    ``measured_top_k`` of the knapsack's best, for the caller to measure. ``config``: the
    :class:`SearchConfig` whose ``eps``, ``refine``, ``top_k``, ``adv_weight`` and ``measured_top_k`` are used. Layers that share one weight Parameter get one spec
    (one knapsack item; refinement is skipped for such models, as it moves one layer at a time).
    Raises PolicyError when no policy fits ``budget``.
    """
    cfg = as_config(config)
    lip = cfg.settings_for(LipschitzSettings)
    eps, adv_weight = cfg.eps, lip.adv_weight
    budget = as_budget(budget)
    cache = cache or WeightCache(model, table)
    terms = scores if isinstance(scores, LipschitzTerms) else None
    values = terms.weighted(adv_weight) if terms is not None else scores
    reps = equivalent_candidates(table, cache)
    distinct = distinct_specs(reps)
    costs = candidate_costs(table, budget.kind)
    ties = tied_layers(table)
    do_refine = cfg.refine and terms is not None and not ties
    t0 = time.perf_counter()
    solutions = solve_top_k(
        _merge_tied(_restrict(values, reps), ties, values),
        _merge_tied(_restrict(costs, reps), ties, costs),
        budget_capacity(table, budget),
        max(cfg.top_k if do_refine else 1, lip.measured_top_k if terms is not None else 1),
    )
    solutions = [_untie(sol, ties) for sol in solutions]
    solve_s = time.perf_counter() - t0
    choice = dict(solutions[0].choice)
    record = Refinement()
    t0 = time.perf_counter()
    if do_refine:
        assert terms is not None
        bound = WholeNetworkBound(model, table, terms.estimate, terms.calibration, cache, adv_weight)
        choice, record = refine(bound, budget, solutions, eps, distinct, progress=progress)
    order = table.layers
    return Selection(
        {n: choice[n] for n in order}, {n: solutions[0].choice[n] for n in order}, solutions, record, reps,
        distinct, solve_s, time.perf_counter() - t0,
    )  # fmt: skip
