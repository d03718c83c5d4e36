"""Refinement on the whole-network, non-linearised bound (docs/method.md "Selection").

The knapsack minimises Σ_l s_l(c_l), each score measured with one layer quantized. The bound of a
whole policy p,

    B(p) = ε·J_loc·(Π_l L̂_l/L_l − 1) + mean‖f_p(x_adv) − f(x_adv)‖₂          (jacobian)
    B(p) = ε·Π_l L_l·(Π_l L̂_l/L_l − 1) + Σ_l (Π_{k>l} L̂_k)·‖ΔW_l‖₂·A_l      (spectral, chains)

sees the interactions the sum ignores (output units, logits). :func:`refine` re-ranks the top-K
knapsack solutions by B and runs one pass of layer-wise coordinate descent on B within the budget.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..budget import Budget
from ..config import check_eps
from ..errors import ConfigError
from ..forward import eval_mode
from ..policy import LayerSpec
from .calibration import AdversarialCalibration, WeightCache, network_deviation, progress_bar
from .candidates import CandidateTable
from .config import ESTIMATES
from .costing import fits
from .mckp import MckpSolution


class WholeNetworkBound:
    """B(p) for any policy p (memoised): the measure refinement and the metric validation rank by.

    ``calib`` (from :func:`~aq_brevitas.search.adversarial_calibration`) is needed for ``jacobian``;
    ``adv_weight`` scales the adversarial term (1 is the bound).
    """

    def __init__(
        self,
        model: nn.Module,
        table: CandidateTable,
        estimate: str,
        calib: AdversarialCalibration | None,
        cache: WeightCache,
        adv_weight: float = 1.0,
    ) -> None:
        self.model, self.table, self.estimate, self.calib, self.cache = model, table, estimate, calib, cache
        self.adv_weight = adv_weight
        self.memo: dict[tuple[tuple[str, LayerSpec], ...], tuple[float, float]] = {}

    def __call__(self, specs: Mapping[str, LayerSpec], eps: float) -> float:
        return sum(self.parts(specs, eps))

    def parts(self, specs: Mapping[str, LayerSpec], eps: float) -> tuple[float, float]:
        """``(adversarial term, quantization term)`` of B(p)."""
        key = tuple(sorted(specs.items()))
        if key not in self.memo:
            self.memo[key] = self._compute(specs, eps)
        return self.memo[key]

    def _compute(self, specs: Mapping[str, LayerSpec], eps: float) -> tuple[float, float]:
        t = self.table
        ratio = math.prod(t.row(n, s).L_hat / t.scores[n].L for n, s in specs.items())
        if self.estimate == "spectral":
            # ε·Π L̂ + Σ_l (Π_{k>l} L̂_k)·‖ΔW_l‖·A_l, minus the float ε·Π: the exact chain bound.
            pi = math.prod(sc.L for sc in t.scores.values())
            downstream, quant = 1.0, 0.0
            for n in reversed(list(t.scores)):
                if n in specs:
                    row = t.row(n, specs[n])
                    quant += downstream * row.dW_norm * t.scores[n].A
                    downstream *= row.L_hat
                else:
                    downstream *= t.scores[n].L
            return self.adv_weight * eps * pi * (ratio - 1), quant
        assert self.calib is not None
        if self.estimate == "loss":
            return 0.0, network_deviation(self.model, self.calib, specs, self.cache, "loss")
        j_loc = self.calib.j_loc or 0.0
        adv = self.adv_weight * eps * j_loc * (ratio - 1)
        return adv, network_deviation(self.model, self.calib, specs, self.cache)


def policy_bound(
    model: nn.Module,
    table: CandidateTable,
    specs: Mapping[str, LayerSpec],
    calib: AdversarialCalibration | None,
    *,
    eps: float = 0.1,
    estimate: str = "jacobian",
    cache: WeightCache | None = None,
) -> dict[str, float]:
    """The lipschitz prediction for any policy (e.g. one a baseline chose), to compare methods on it.

    ``score_sum``: Σ_l s_l(c_l), what the knapsack minimises; ``bound``: the whole-network B(p) that
    refinement uses (both in logits). ``calib`` is needed for ``jacobian`` and ``loss`` (ConfigError without it).
    """
    if estimate not in ESTIMATES:
        raise ConfigError(f"unknown estimate {estimate!r}", f"use one of {', '.join(ESTIMATES)}")
    if estimate != "spectral" and calib is None:
        raise ConfigError(
            f"the {estimate} bound needs adversarial calibration", "pass adversarial_calibration(...)"
        )
    bound = WholeNetworkBound(model, table, estimate, calib, cache or WeightCache(model, table))
    eps = check_eps(eps)
    with eval_mode(model):
        return {
            "score_sum": sum(bound({n: s}, eps) for n, s in specs.items()),
            "bound": bound(dict(specs), eps),
        }


# ------------------------------------------------------------------------------------ the record
@dataclass(frozen=True)
class RankedSolution:
    """One of the top-K knapsack solutions, re-measured: ``rank`` in the knapsack's order, its
    ``objective`` Σ s, its ``bound`` B(p) and that bound's (adversarial, quantization) parts."""

    rank: int
    objective: float
    bound: float
    bound_parts: tuple[float, float]
    layers: dict[str, str]  # layer -> LayerSpec.short()

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "objective": self.objective,
            "bound": self.bound,
            "bound_parts": list(self.bound_parts),
            "layers": dict(self.layers),
        }


@dataclass(frozen=True)
class Move:
    """One accepted coordinate-descent step: ``layer`` from one spec to another, B after it."""

    layer: str
    from_spec: str
    to_spec: str
    bound: float

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "from": self.from_spec, "to": self.to_spec, "bound": self.bound}


@dataclass(frozen=True)
class Refinement:
    """What refinement did. ``done`` False: not run, with ``skipped`` saying why when it was asked
    for. Otherwise the re-ranked ``top_k``, the rank chosen, B of the knapsack's optimum
    (``bound_milp``), of the best top-K solution and of the final policy, the descent ``moves`` and
    how many distinct policies B was measured on."""

    done: bool = False
    skipped: str | None = None
    measure: str | None = None
    top_k: tuple[RankedSolution, ...] = ()
    chosen_rank: int | None = None
    bound_milp: float | None = None
    bound_top_k: float | None = None
    moves: tuple[Move, ...] = ()
    bound_final: float | None = None
    bound_final_parts: tuple[float, float] | None = None
    bound_evaluations: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The ``refine`` entry of a searched policy's meta."""
        if not self.done:
            return {"done": False, **({"skipped": self.skipped} if self.skipped is not None else {})}
        return {
            "done": True,
            "measure": self.measure,
            "top_k": [r.to_dict() for r in self.top_k],
            "chosen_rank": self.chosen_rank,
            "bound_milp": self.bound_milp,
            "bound_top_k": self.bound_top_k,
            "coordinate_descent_moves": [m.to_dict() for m in self.moves],
            "bound_final": self.bound_final,
            "bound_final_parts": list(self.bound_final_parts or ()),  # [adversarial term, quantization term]
            "bound_evaluations": self.bound_evaluations,
        }


def _descend(
    bound: WholeNetworkBound,
    budget: Budget,
    start: dict[str, LayerSpec],
    eps: float,
    specs: Mapping[str, Sequence[LayerSpec]],
    progress: bool,
) -> tuple[dict[str, LayerSpec], float, list[Move]]:
    """One pass of layer-wise coordinate descent on B within the budget, from ``start``."""
    table = bound.table
    current, b_cur = dict(start), bound(start, eps)
    moves = []
    bar = progress_bar(total=sum(map(len, specs.values())), desc="coordinate descent", disable=not progress)
    for layer in table.layers:
        for spec in specs[layer]:
            bar.update()
            if spec == current[layer]:
                continue
            trial = {**current, layer: spec}
            if not fits(table, budget, trial):
                continue
            b = bound(trial, eps)
            if b < b_cur - 1e-12 * max(1.0, abs(b_cur)):
                moves.append(Move(layer, current[layer].short(), spec.short(), b))
                current, b_cur = trial, b
    bar.close()
    return current, b_cur, moves


def refine(
    bound: WholeNetworkBound,
    budget: Budget,
    solutions: list[MckpSolution],
    eps: float,
    specs: Mapping[str, Sequence[LayerSpec]],
    *,
    progress: bool = False,
) -> tuple[dict[str, LayerSpec], Refinement]:
    """Best of the top-K ``solutions`` by B(p), then one pass of coordinate descent on B over
    ``specs`` (per layer, the candidates to try) within ``budget``: ``(policy, record)``."""
    ranked = [(bound(s.choice, eps), i, s) for i, s in enumerate(solutions)]
    b0, rank, best = min(ranked, key=lambda t: (t[0], t[1]))
    current, b_cur, moves = _descend(bound, budget, dict(best.choice), eps, specs, progress)
    record = Refinement(
        done=True,
        measure=f"whole-network bound ({bound.estimate})",
        top_k=tuple(
            RankedSolution(
                i, s.objective, b, bound.parts(s.choice, eps), {n: c.short() for n, c in s.choice.items()}
            )
            for b, i, s in ranked
        ),
        chosen_rank=rank,
        bound_milp=ranked[0][0],
        bound_top_k=b0,
        moves=tuple(moves),
        bound_final=b_cur,
        bound_final_parts=bound.parts(current, eps),
        bound_evaluations=len(bound.memo),
    )
    return current, record
