"""Budget arithmetic in one place: the units of a policy's cost and whether it fits a budget.

A :class:`Budget` is a ceiling in exactly one of three units: average weight bits (Σ bits·params /
Σ params), total weight bytes, or bit-operations (BOPs = Σ MACs · b_w · b_a, the HAWQ-V3 measure).
Weights only: biases stay at high precision and are not counted. Activations a policy leaves
unquantized are costed as 8-bit in BOPs (``DEFAULT_ACT_BITS_FOR_BOPS``); layers without a spec count
as 32-bit float. The geometry says what runs: a layer's MACs are summed over every call in one
forward, and a weight shared by several layers has its ``params`` under one of them only (0 under
the others), so bits and bytes count each stored weight once and BOPs count every use. Weights
used outside a quantizable layer are not in the geometry, hence not in any cost (they stay float;
:func:`aq_brevitas.nnutils.warn_unsupported` names them).

The knapsack works in *raw* units: total weight bits for an average-bits budget (so the
constraint stays linear), bytes or BOPs otherwise; :func:`~aq_brevitas.search.costing.budget_capacity`
converts a budget to them and :func:`in_budget_units` back. Every feasibility test allows a relative slack of ``COST_RTOL``
to absorb float rounding of ``avg · params``.

A policy's cost (:func:`~aq_brevitas.policy.cost_of`) is computed in :mod:`aq_brevitas.policy`, a
candidate table's in :mod:`aq_brevitas.search.costing`; this module imports neither.

Torch-free: the functions read only ``params``/``macs`` of layer geometries and candidate rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import PolicyError

if TYPE_CHECKING:
    pass

BUDGET_KINDS = ("avg_weight_bits", "weight_bytes", "bops")
DEFAULT_ACT_BITS_FOR_BOPS = 8  # activations the policy leaves unquantized are costed as 8-bit in BOPs
COST_RTOL = 1e-9  # a policy fits when cost <= budget·(1 + this): absorbs float rounding of avg·params
UNITS = {"avg_weight_bits": "average weight bits", "weight_bytes": "weight bytes", "bops": "BOPs"}
_CLI_KEYS = {"avg_weight_bits": "avg-bits", "weight_bytes": "bytes", "bops": "bops"}
_BUDGET_ALIASES = {"avg-bits": "avg_weight_bits", "avg_bits": "avg_weight_bits", "avg_weight_bits": "avg_weight_bits",
                   "bytes": "weight_bytes", "weight-bytes": "weight_bytes", "weight_bytes": "weight_bytes",
                   "kib": "weight_kib", "bops": "bops"}  # fmt: skip


@dataclass(frozen=True)
class PolicyCost:
    """A policy's cost under the three budget kinds (weights only; biases stay at high precision)."""

    avg_weight_bits: float
    weight_bits: int
    weight_bytes: float
    bops: int
    params: int

    def value(self, kind: str) -> float:
        """The cost in one budget kind's units (``kind`` in ``BUDGET_KINDS``)."""
        return {
            "avg_weight_bits": self.avg_weight_bits,
            "weight_bytes": self.weight_bytes,
            "bops": float(self.bops),
        }[kind]

    def summary(self) -> dict[str, float]:
        """``{avg_weight_bits, weight_bytes, bops}``: one figure per budget kind (what policy meta records)."""
        return {k: self.value(k) for k in BUDGET_KINDS}


@dataclass(frozen=True)
class Budget:
    """A cost ceiling: exactly one of average weight bits, total weight bytes, or bit-operations.

    Raises :class:`~aq_brevitas.errors.PolicyError` unless exactly one is given, as a positive number.
    """

    avg_weight_bits: float | None = None
    weight_bytes: float | None = None
    bops: float | None = None

    def __post_init__(self) -> None:
        given = [(k, getattr(self, k)) for k in BUDGET_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise PolicyError(
                f"a budget needs exactly one of {', '.join(BUDGET_KINDS)}, got {len(given)}",
                "e.g. Budget(avg_weight_bits=4) or --budget avg-bits=4",
            )
        k, v = given[0]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v <= 0:
            raise PolicyError(f"budget {k}={v!r} must be a positive number", "e.g. --budget avg-bits=4")

    @property
    def kind(self) -> str:
        return next(k for k in BUDGET_KINDS if getattr(self, k) is not None)

    @property
    def value(self) -> float:
        return float(getattr(self, self.kind))

    @classmethod
    def parse(cls, text: str) -> Budget:
        """Parse the CLI form ``avg-bits=4``, ``bytes=20000``, ``kib=20`` or ``bops=1e9``."""
        key, sep, raw = text.partition("=")
        kind = _BUDGET_ALIASES.get(key.strip().lower())
        if not sep or kind is None:
            raise PolicyError(
                f"cannot parse budget {text!r}", "write avg-bits=4, bytes=20000, kib=20 or bops=1e9"
            )
        try:
            value = float(raw)
        except ValueError:
            raise PolicyError(f"budget value {raw!r} is not a number", "write e.g. avg-bits=4") from None
        if kind == "weight_kib":
            return cls(weight_bytes=value * 1024)
        return cls(**{kind: value})

    def to_dict(self) -> dict[str, float]:
        return {self.kind: self.value}


def as_budget(budget: Budget | str | Mapping[str, float]) -> Budget:
    """A :class:`Budget` from itself, its CLI text (``"avg-bits=4"``) or its dict form."""
    if isinstance(budget, Budget):
        return budget
    if isinstance(budget, str):
        return Budget.parse(budget)
    if isinstance(budget, Mapping):
        return Budget(**budget)
    raise PolicyError(f"budget {budget!r} is not a Budget", "pass Budget(avg_weight_bits=4) or 'avg-bits=4'")


def in_budget_units(kind: str, raw: float, params: int) -> float:
    """A raw knapsack cost back in the budget's own units (``params``: Σ params, for average bits)."""
    if kind == "avg_weight_bits":
        return raw / max(params, 1)
    return raw


def require_within(budget: Budget, cheapest: float) -> None:
    """PolicyError naming the minimum when ``cheapest`` (in the budget's units) exceeds the budget."""
    if cheapest > budget.value * (1 + COST_RTOL):
        raise PolicyError(
            f"budget {budget.kind}={budget.value:g} is infeasible: the cheapest policy needs "
            f"{cheapest:.6g} {UNITS[budget.kind]}",
            f"use --budget {_CLI_KEYS[budget.kind]}={cheapest:.6g} or more, or add cheaper candidates",
        )


def min_cost(costs: Mapping[str, Mapping[Any, float]]) -> float:
    """Cost of the cheapest policy: the cheapest candidate in every layer."""
    return float(sum(min(c.values()) for c in costs.values()))
