"""What a candidate table costs: per-row costs, a budget's capacity in raw units, feasibility and the
achieved cost of a choice (the knapsack's side of :mod:`aq_brevitas.budget`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..budget import BUDGET_KINDS, COST_RTOL, Budget, PolicyCost, in_budget_units, min_cost, require_within
from ..errors import PolicyError
from ..policy import cost_of

if TYPE_CHECKING:
    from ..policy import LayerSpec
    from .candidates import CandidateTable


# ------------------------------------------------------------------------ a candidate table's costs
def _params(table: CandidateTable) -> int:
    return sum(table.scores[n].params for n in table.rows)


def candidate_costs(table: CandidateTable, kind: str) -> dict[str, dict[LayerSpec, float]]:
    """Per-candidate cost in the knapsack's units: weight bits (avg-bits budgets), bytes or BOPs."""
    if kind not in BUDGET_KINDS:
        raise PolicyError(f"unknown budget kind {kind!r}", f"use one of {', '.join(BUDGET_KINDS)}")
    return {n: {r.spec: r.cost(kind) for r in rows} for n, rows in table.rows.items()}


def budget_capacity(table: CandidateTable, budget: Budget) -> float:
    """The budget in the knapsack's units: avg bits × Σ params, or bytes, or BOPs as given."""
    if budget.kind == "avg_weight_bits":
        return budget.value * _params(table)
    return budget.value


def check_feasible(table: CandidateTable, budget: Budget) -> None:
    """PolicyError naming the minimum, in the budget's own units, when no policy fits."""
    cheapest = min_cost(candidate_costs(table, budget.kind))
    require_within(budget, in_budget_units(budget.kind, cheapest, _params(table)))


def fits(table: CandidateTable, budget: Budget, specs: Mapping[str, LayerSpec]) -> bool:
    """Whether ``specs`` (a candidate per layer of ``table``) costs at most the budget."""
    cap = budget_capacity(table, budget)
    return sum(table.row(n, s).cost(budget.kind) for n, s in specs.items()) <= cap * (1 + COST_RTOL)


def achieved_cost(table: CandidateTable, specs: Mapping[str, LayerSpec]) -> PolicyCost:
    """What ``specs`` costs over the table's layer geometries."""
    return cost_of(specs, table.scores)
