"""What a search hands back: :class:`SearchResult`, typed like scipy's ``OptimizeResult``.

The result carries the policy and the evidence for it as typed fields: which candidate won and on
what held-out numbers, the solver's status, the refinement record, per-method evidence, cost and
timings. ``result.policy.meta`` is the same record as plain JSON (built from these fields, so the two
never disagree); ``policy.save()`` writes it without the timings, so the same inputs and seed give a
byte-identical policy file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import numpy as np

from ..budget import Budget, PolicyCost
from ..policy import LayerSpec, LayerwisePolicy
from .baselines import UniformChoice
from .config import SearchConfig
from .refine import Refinement


def plain(obj: Any) -> Any:
    """JSON-safe copy: str keys, lists for tuples, Python numbers for numpy ones, None for NaN/inf."""
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ------------------------------------------------------------------------------ evidence records
@dataclass(frozen=True)
class LipschitzEvidence:
    """``adv_weight`` used; with adversarial calibration, ``attack`` (e.g. ``"pgd-10"``) and the
    float network's local Jacobian norm ``j_loc`` at x_adv (None when only the attack was needed)."""

    adv_weight: float
    attack: str | None = None
    j_loc: float | None = None

    def to_meta(self) -> dict[str, Any]:
        head = {"j_loc": self.j_loc, "attack": self.attack} if self.attack is not None else {}
        return {**head, "adv_weight": self.adv_weight}


@dataclass(frozen=True)
class HessianEvidence:
    """HAWQ-V2's average Hessian trace per weight of each layer and the Hutchinson samples it took."""

    trace_per_weight: dict[str, float]
    n_samples: int

    def to_meta(self) -> dict[str, Any]:
        return {"hessian_trace_per_weight": dict(self.trace_per_weight), "hessian_samples": self.n_samples}


@dataclass(frozen=True)
class AnsEvidence:
    """QUANOS adversarial noise sensitivity of each layer's output under FGSM."""

    sensitivity: dict[str, float]

    def to_meta(self) -> dict[str, Any]:
        return {"ans": dict(self.sensitivity)}


@dataclass(frozen=True)
class UniformEvidence:
    """How the uniform baseline chose, and which estimate its per-layer scores come from
    (``"spectral"``, or None when the table has no ‖ΔW‖ and the scores are NaN)."""

    choice: UniformChoice
    score_estimate: str | None

    def to_meta(self) -> dict[str, Any]:
        return {"uniform": self.choice.to_dict(), "score_estimate": self.score_estimate}


class MethodEvidence(Protocol):
    """What a method registered with :func:`~aq_brevitas.search.register_scorer` reports: its own
    measurements, as the JSON entries they add to ``policy.meta``."""

    def to_meta(self) -> dict[str, Any]: ...


Evidence = LipschitzEvidence | HessianEvidence | AnsEvidence | UniformEvidence | MethodEvidence


# ------------------------------------------------------------------------------ other records
@dataclass(frozen=True)
class SolverReport:
    """The knapsack solver, its status on the best solution and the objectives (Σ s) of the
    solutions it returned; for ``uniform`` nothing is solved (status ``"not run"``)."""

    name: str
    status: str
    objectives: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        tail = {"objectives": list(self.objectives)} if self.objectives is not None else {}
        return {"name": self.name, "status": self.status, **tail}


@dataclass(frozen=True)
class CandidateCount:
    """Candidates a layer was given, and how many give distinct quantized weights."""

    given: int
    distinct: int

    def to_dict(self) -> dict[str, int]:
        return {"given": self.given, "distinct": self.distinct}


@dataclass(frozen=True)
class HeldOutCheck:
    """The comparison with the best uniform policy on held-out training images: the robust accuracy
    (fractions; ``measure`` says which: the per-image worst case of PGD-``pgd_steps`` and the fast
    attack suite, never PGD alone) on ``images`` of them for the searched policy, the knapsack's
    unrefined one (None unless refinement changed the policy) and the best uniform spec, plus the
    uniform options' accuracies (by ``LayerSpec.short()``) and the searched layers."""

    images: int
    pgd_steps: int
    search_accuracy: float
    unrefined_accuracy: float | None
    uniform_accuracy: float
    uniform_spec: LayerSpec
    uniform_options: dict[str, float]
    search_layers: dict[str, LayerSpec]
    measure: str

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HeldOutCheck:
        """Inverse of :meth:`to_dict`."""
        kw = dict(d)
        kw["uniform_spec"] = LayerSpec.from_dict(kw["uniform_spec"])
        kw["search_layers"] = {n: LayerSpec.from_dict(s) for n, s in kw["search_layers"].items()}
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "pgd_steps": self.pgd_steps,
            "measure": self.measure,
            "search_accuracy": self.search_accuracy,
            "unrefined_accuracy": self.unrefined_accuracy,
            "uniform_accuracy": self.uniform_accuracy,
            "uniform_spec": self.uniform_spec.to_dict(),
            "uniform_options": dict(self.uniform_options),
            "search_layers": {n: s.to_dict() for n, s in self.search_layers.items()},
        }


@dataclass
class Timing:
    """Wall seconds per phase (None: the phase did not run). Never written to the policy file."""

    adversarial_calibration_s: float | None = None
    candidate_table_s: float | None = None
    scoring_s: float | None = None
    solve_s: float | None = None
    refine_s: float | None = None
    validation_s: float | None = None
    total_s: float | None = None

    def to_dict(self) -> dict[str, float]:
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}


# ------------------------------------------------------------------------------------ the result
@dataclass(frozen=True)
class SearchResult:
    """A searched policy and the evidence for it.

    ``policy``: the :class:`~aq_brevitas.LayerwisePolicy` to quantize with (``layers``: its spec per
    layer). ``winner``: which candidate policy was kept: ``"search"``, ``"search-unrefined"``, ``"search-rank-<i>"``
    (the knapsack's i-th next-best solution, with ``measured_top_k``) or
    ``"uniform"`` by held-out robust accuracy, the per-image worst case of PGD and the fast attack
    suite (``validation``), ``"uniform"`` for the uniform method,
    ``"unchecked"`` when no held-out data was given. ``cost`` is the policy's achieved
    :class:`~aq_brevitas.budget.PolicyCost` under every budget kind; ``layer_scores``/``objective``: each layer's score of its chosen candidate and
    their sum (the knapsack's objective); ``solver``, ``refinement``, ``candidates`` (given/distinct
    per layer), ``evidence`` (the method's own measurements) and ``timing`` say how it was found;
    ``config`` is what was asked. ``policy.meta`` holds the same record as JSON.

    >>> import torch
    >>> from aq_brevitas import LayerSpec, SearchConfig, build_model, search_policy
    >>> _ = torch.manual_seed(0)
    >>> model = build_model("small_cnn").eval()          # random weights: a few seconds on a CPU
    >>> x = torch.rand(32, 1, 28, 28)
    >>> data, specs = (x, model(x).argmax(1)), [LayerSpec(2), LayerSpec(4), LayerSpec(8)]
    >>> config = SearchConfig(candidates=specs, pgd_steps=2).replace(steps=2)
    >>> result = search_policy(model, data, "avg-bits=4", config=config, val_data=data, progress=False)
    >>> result.cost.avg_weight_bits <= 4, result.winner in ("search", "uniform"), result.solver.status
    (True, True, 'optimal')
    >>> sorted(result.policy.layers) == sorted(result.layer_scores)
    True
    """

    layers: dict[str, LayerSpec]
    method: str
    estimate: str | None
    budget: Budget
    cost: PolicyCost
    layer_scores: dict[str, float]
    solver: SolverReport
    candidates: dict[str, CandidateCount]
    refinement: Refinement
    winner: str
    validation: HeldOutCheck | None
    evidence: Evidence
    calib_images: int
    config: SearchConfig
    timing: Timing = field(default_factory=Timing, compare=False)
    input_shape: tuple[int, ...] | None = None  # per sample, of the calibration data (single-input models)
    policy: LayerwisePolicy = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", LayerwisePolicy(dict(self.layers), None, plain(self.to_meta())))

    @property
    def objective(self) -> float:
        """Σ of the chosen candidates' scores (NaN when the method has none)."""
        return sum(self.layer_scores.values())

    @property
    def eps(self) -> float:
        return self.config.eps

    @property
    def seed(self) -> int:
        return self.config.seed

    def to_meta(self) -> dict[str, Any]:
        """The record as ``policy.meta`` holds it (before JSON cleaning); ``timing`` included."""
        return {
            "method": self.method,
            "estimate": self.estimate,
            "budget": self.budget.to_dict(),
            "cost": self.cost.summary(),
            "layer_scores": dict(self.layer_scores),
            "objective": self.objective,
            "solver": self.solver.to_dict(),
            "eps": self.config.eps,
            "seed": self.config.seed,
            "fold_bn": self.config.fold_bn,
            # only when set, so the policy JSON of a model without normalisation stays as it was
            **({"normalization": self.config.normalization} if self.config.normalization else {}),
            "calib_images": self.calib_images,
            # lets policy.cost(model) run the model when its input shape is not otherwise known
            **({"input_shape": list(self.input_shape)} if self.input_shape else {}),
            "candidates": {n: c.to_dict() for n, c in self.candidates.items()},
            "refine": self.refinement.to_dict(),
            "winner": self.winner,
            "validation": self.validation.to_dict() if self.validation is not None else None,
            **self.evidence.to_meta(),
            "timing": self.timing.to_dict(),
        }

    def summary(self) -> str:
        """One line: method, winner, achieved cost."""
        c = self.cost
        return (
            f"{self.method} ({self.estimate or '-'}), winner: {self.winner}, {c.avg_weight_bits:.3f} avg weight "
            f"bits, {c.weight_bytes / 1024:.2f} KiB, {c.bops:.3e} BOPs"
        )

    def __str__(self) -> str:
        return f"{self.summary()}\n{self.policy}"
