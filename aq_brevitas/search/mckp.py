"""The multiple-choice knapsack, solved exactly as an integer program with ``scipy.optimize.milp``
(HiGHS), as HAWQ-V3 (Yao et al. 2021) does; numpy and scipy only.

    min Σ_{l,c} s_{l,c} x_{l,c}   s.t.   Σ_c x_{l,c} = 1 per layer,   Σ cost_{l,c} x_{l,c} ≤ budget,
    x binary.

Options are any hashable keys (``LayerSpec`` in the search); scores and costs are plain floats in any
units (costs in the budget's raw units, see :mod:`aq_brevitas.budget`).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..budget import COST_RTOL, min_cost
from ..errors import ConfigError, PolicyError

Table = Mapping[str, Mapping[Any, float]]


@dataclass(frozen=True)
class MckpSolution:
    """One knapsack solution: an option per layer, its objective Σ s and cost Σ cost (raw units), and
    HiGHS's status (``"optimal"``, or ``"feasible (...)"`` when the time limit stopped it)."""

    choice: dict[str, Any]
    objective: float
    cost: float
    status: str


def _check_instance(scores: Table, costs: Table) -> None:
    if not scores:
        raise PolicyError("nothing to choose: no layers have scores", "score at least one layer")
    for name, opts in scores.items():
        if not opts:
            raise PolicyError(f"layer {name!r} has no candidates", "give it at least one LayerSpec")
        if name not in costs or set(costs[name]) != set(opts):
            raise PolicyError(
                f"layer {name!r}: scores and costs list different candidates", "pass both for the same specs"
            )
        bad = [s for s, v in opts.items() if not math.isfinite(v)]
        if bad:
            label = bad[0].short() if hasattr(bad[0], "short") else repr(bad[0])
            raise PolicyError(f"layer {name!r}: score of {label} is not finite", "check the scorer's inputs")


def _one_hot(index: list[tuple[str, Hashable]], layers: list[str]) -> Any:
    """Rows: layers; columns: variables; 1 where the variable is one of that layer's options."""
    from scipy.sparse import csr_array

    rows = [[i for i, (n, _) in enumerate(index) if n == name] for name in layers]
    return csr_array(
        (
            np.ones(len(index)),
            (np.concatenate([[r] * len(ix) for r, ix in enumerate(rows)]), np.concatenate(rows)),
        ),
        shape=(len(layers), len(index)),
    )


def solve_top_k(
    scores: Table, costs: Table, budget_value: float, k: int = 1, *, time_limit: float = 60.0
) -> list[MckpSolution]:
    """The ``k`` best distinct policies, exactly, in non-decreasing objective (no-good cuts).

    Scores are shifted per layer (which leaves the argmin alone) and scaled to [0, 1], costs divided by
    the budget, so HiGHS works on O(1) numbers whatever the units. Fewer than ``k`` come back when
    fewer feasible policies exist. ``time_limit``: seconds per MILP. Raises PolicyError for an empty,
    mismatched or non-finite instance and for a budget below the cheapest policy (naming its cost).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    _check_instance(scores, costs)
    if not (budget_value > 0 and math.isfinite(budget_value)):
        raise PolicyError(f"budget {budget_value!r} must be a positive number", "pass e.g. 4 average bits")
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}", "pass k=1 or more")
    cheapest = min_cost(costs)
    if cheapest > budget_value * (1 + COST_RTOL):
        raise PolicyError(
            f"budget {budget_value:g} is below the cheapest policy, which costs {cheapest:g}",
            f"raise the budget to at least {cheapest:g} or add cheaper candidates",
        )
    layers = list(scores)
    index = [(n, s) for n in layers for s in scores[n]]
    s_raw = np.array([scores[n][s] for n, s in index], dtype=np.float64)
    c_raw = np.array([costs[n][s] for n, s in index], dtype=np.float64)
    shift = np.array([min(scores[n].values()) for n, _ in index])
    s_norm = s_raw - shift
    s_norm = s_norm / (s_norm.max() if s_norm.max() > 0 else 1.0)
    c_norm = c_raw / budget_value
    n_var = len(index)
    constraints = [LinearConstraint(_one_hot(index, layers), 1, 1)]  # one option per layer, then cuts
    solutions: list[MckpSolution] = []
    rhs = 1.0
    while len(solutions) < k:
        res = milp(
            s_norm,
            constraints=[LinearConstraint(c_norm[None, :], -np.inf, rhs), *constraints],
            integrality=np.ones(n_var),
            bounds=Bounds(0, 1),
            options={"mip_rel_gap": 0.0, "time_limit": time_limit, "presolve": True},
        )
        if res.x is None:
            break
        picked = [i for i in range(n_var) if res.x[i] > 0.5]
        cost = float(c_raw[picked].sum())
        if cost > budget_value * (1 + COST_RTOL):  # within HiGHS's tolerance but over budget: tighten
            rhs -= (cost - budget_value) / budget_value + 1e-12
            continue
        choice = {index[i][0]: index[i][1] for i in picked}
        status = "optimal" if res.status == 0 else f"feasible ({res.message})"
        solutions.append(MckpSolution(choice, float(s_raw[picked].sum()), cost, status))
        cut = np.zeros(n_var)
        cut[picked] = 1.0
        constraints.append(LinearConstraint(cut[None, :], -np.inf, len(layers) - 1))
    if not solutions:
        raise PolicyError(
            f"no policy fits the budget {budget_value:g} (cheapest costs {cheapest:g})",
            "raise the budget or add cheaper candidates",
        )
    return solutions


def solve_mckp(scores: Table, costs: Table, budget_value: float) -> tuple[dict[str, Any], str]:
    """The exact optimum of the multiple-choice knapsack: ``(choice per layer, solver status)``."""
    best = solve_top_k(scores, costs, budget_value, 1)[0]
    return best.choice, best.status


SOLVER_NAME = "scipy.optimize.milp (HiGHS)"
