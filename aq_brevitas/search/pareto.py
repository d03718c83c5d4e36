"""Robust accuracy per hardware cost: every method's policies over a sweep of budgets, in one call.

:func:`search_pareto` scores once and solves the knapsack once per budget, for every method on the same
footing -- one candidate table (weight bits × scaling × granularity × input activation bits), one
adversarial calibration, one solver, one held-out set and one robust-accuracy measure:

* ``uniform``: one (weight, activation) pair in every layer, each pair with its best scaling ×
  granularity by the data-free relative weight error; the pairs that fit a budget and are not beaten on
  both widths by another fitting pair are all measured;
* ``first_last_8``: the first and last quantizable layers at 8/8 bits, the rest uniform as above (the
  heuristic of Brevitas's ImageNet example, ``--layerwise-first-last-bit-width``);
* ``hessian`` (HAWQ-V2), ``ans`` (QUANOS) and ``lipschitz`` (this project's score): the knapsack on the
  method's scores (:mod:`aq_brevitas.search.scorers`).

Every distinct policy is quantized once (:func:`~aq_brevitas.quantize`, activation quantizers at their
producers, calibrated on the calibration images) and measured once on held-out training images: clean
accuracy and the per-image worst case of PGD and the fast attack suite with the float model as the
transfer source (:func:`~aq_brevitas.evaluate.suite.worst_case_accuracy`), never PGD alone. A point is
``dominated`` when another point of the same method costs no more (in the sweep's budget kind) and is at
least as robust, one of the two strictly.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..attacks import normalized_inputs
from ..budget import Budget, as_budget
from ..config import takes_config
from ..errors import ConfigError, PolicyError
from ..forward import as_xy, eval_mode
from ..policy import LayerSpec, LayerwisePolicy
from ..storage import atomic_write_text
from ..workers import check_workers, rank_share, run_jobs
from .baselines import PolicyMeasurement, measure_policy, uniform_choices
from .calibration import AdversarialCalibration, WeightCache, adversarial_calibration, progress_bar
from .candidates import CandidateTable, candidate_table
from .config import (
    DEFAULT_ACT_BITS,
    METHOD_SETTINGS,
    PARETO_METHODS,
    LipschitzSettings,
    SearchConfig,
    as_config,
    scorer_for,
)
from .costing import achieved_cost
from .scorers import ScoringInputs
from .selection import select_policy

DEFAULT_SWEEP = (2, 3, 4, 5, 8)  # budgets: the BOPs of uniform w_b a_b for these b


@dataclass(frozen=True)
class ParetoPoint:
    """One measured policy: the ``method`` and ``budget`` that chose it, its cost (``bops``,
    ``weight_kib``, ``avg_weight_bits``), held-out ``clean_accuracy`` and ``robust_accuracy`` (fractions;
    the per-image worst case of PGD and the fast suite), whether another point of the same method
    ``dominated`` it, and its ``rank`` among the method's knapsack solutions at that budget (0: the
    optimum; more than one is measured with ``LipschitzSettings.measured_top_k``)."""

    method: str
    budget: str
    layers: dict[str, str]
    bops: int
    weight_kib: float
    avg_weight_bits: float
    clean_accuracy: float
    robust_accuracy: float
    dominated: bool = False
    policy: dict[str, Any] = field(default_factory=dict, repr=False)
    rank: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def layerwise_policy(self) -> LayerwisePolicy:
        return LayerwisePolicy.from_dict(self.policy)


@dataclass
class ParetoFront:
    """All measured points of :func:`search_pareto` and the float model's accuracies on the same images."""

    points: list[ParetoPoint]
    float_clean_accuracy: float
    float_robust_accuracy: float
    eps: float
    val_images: int
    budget_kind: str
    budgets: list[str]
    seconds: dict[str, float] = field(default_factory=dict)

    def front(self, method: str) -> list[ParetoPoint]:
        """``method``'s non-dominated points, cheapest first."""
        pts = [p for p in self.points if p.method == method and not p.dominated]
        return sorted(pts, key=lambda p: (p.bops, p.weight_kib))

    def best_at(self, method: str, budget: str, max_rank: int | None = None) -> ParetoPoint | None:
        """The most robust point ``method`` found for ``budget`` (among its knapsack solutions of rank
        ≤ ``max_rank`` when given; 0: the knapsack's optimum alone). Ties keep the lower rank."""
        pts = [p for p in self.points if p.method == method and p.budget == budget
               and (max_rank is None or p.rank <= max_rank)]  # fmt: skip
        return max(pts, key=lambda p: p.robust_accuracy, default=None)

    def table(self) -> str:
        """Markdown: per budget, each method's best robust accuracy (%) and its BOPs."""
        order = {m: i for i, m in enumerate(PARETO_METHODS)}  # registered methods after the built-in ones
        methods = sorted({p.method for p in self.points}, key=lambda m: (order.get(m, len(order)), m))
        head = "| budget | " + " | ".join(methods) + " |"
        rows = [head, "|" + "---|" * (len(methods) + 1)]
        for b in self.budgets:
            cells = []
            for m in methods:
                p = self.best_at(m, b)
                cells.append("—" if p is None else f"{100 * p.robust_accuracy:.1f} ({p.bops:.2e})")
            rows.append(f"| {b} | " + " | ".join(cells) + " |")
        rows.append(
            f"\nfloat: clean {100 * self.float_clean_accuracy:.1f} %, robust {100 * self.float_robust_accuracy:.1f} % "
            f"({self.val_images} held-out training images, eps={self.eps:g}; robust = per-image worst case "
            "of PGD and the fast suite; cells: robust % (BOPs))"
        )
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "points": [p.to_dict() for p in self.points]}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the front as JSON, atomically."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ParetoFront:
        d = json.loads(open(path, encoding="utf-8").read())
        d["points"] = [ParetoPoint(**p) for p in d["points"]]
        return cls(**d)

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Robust accuracy against BOPs and against weight KiB (see :func:`aq_brevitas.plots.plot_pareto`)."""
        from ..plots import plot_pareto

        plot_pareto(self, path)


_CLI_KIND = {"avg_weight_bits": "avg-bits", "weight_bytes": "bytes", "bops": "bops"}


def budget_text(budget: Budget) -> str:
    """A budget in its CLI form (``bops=1.1e+07``), as :meth:`Budget.parse` reads it."""
    return f"{_CLI_KIND[budget.kind]}={budget.value:.4g}"


def sweep_budgets(table: CandidateTable, widths: Sequence[int] = DEFAULT_SWEEP) -> list[Budget]:
    """BOPs budgets at the cost of uniform ``w_b a_b`` for each ``b`` of ``widths`` (8-bit inputs where
    the candidates have none): the FPGA user's yardstick."""
    budgets = []
    for b in widths:
        spec = LayerSpec(b, act_bit_width=b if b >= 2 else 2)
        bops = achieved_cost(table, {n: spec for n in table.layers}).bops
        budgets.append(Budget(bops=float(bops)))
    return budgets


def _first_last_pinned(table: CandidateTable) -> dict[str, LayerSpec]:
    first, last = table.layers[0], table.layers[-1]
    out = {}
    for n in (first, last):
        eight = [
            r.spec
            for r in table.rows[n]
            if r.spec.weight_bit_width == 8 and r.spec.act_bit_width in (8, None)
        ]
        if eight:
            out[n] = eight[0]
    return out


def _width(specs: Mapping[str, LayerSpec] | None) -> float:
    """A policy's mean weight + input bits (the float model: 64): wider policies stay robust on more
    images, so the suite attacks them longer; measuring them first balances workers and ranks."""
    if not specs:
        return 64.0
    return sum(s.weight_bit_width + (s.act_bit_width or 32) for s in specs.values()) / len(specs)


_PolicyKey = tuple[tuple[str, str], ...]


class _Measure:
    """Clean and robust held-out accuracy of a policy (None: the float model), each distinct policy
    measured once per sweep, and once per ``cache_dir`` across sweeps (:func:`measure_policy`).

    Warm starts (``cfg.warm_start``): the sweep is measured in three waves -- the float model; each
    budget's uniform policy, seeded with the float model's adversarial examples; every other policy,
    seeded with its budget's uniform policy's (the float model's when uniform is not swept). A
    policy's seed is fixed by the sweep, never by which process measured what first, so ranks and
    workers give the same numbers as one process."""

    def __init__(
        self,
        model: nn.Module,
        calib_x: torch.Tensor,
        val: tuple[torch.Tensor, torch.Tensor],
        cfg: SearchConfig,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.model, self.calib_x, self.val, self.cfg, self.cache_dir = model, calib_x, val, cfg, cache_dir
        self.seen: dict[_PolicyKey, PolicyMeasurement] = {}

    @staticmethod
    def _key(specs: Mapping[str, LayerSpec] | None) -> _PolicyKey:
        return tuple(sorted((n, s.short()) for n, s in (specs or {}).items()))

    def _measure(
        self, specs: Mapping[str, LayerSpec] | None, seed: PolicyMeasurement | None = None
    ) -> PolicyMeasurement:
        cfg = self.cfg
        return measure_policy(
            self.model, specs, self.val, self.calib_x, eps=cfg.eps, steps=cfg.pgd_steps, seed=cfg.seed,
            cache_dir=self.cache_dir, warm=seed if cfg.warm_start else None, device=cfg.device,
        )  # fmt: skip

    def waves(
        self, chosen: Sequence[tuple[str, Budget, Mapping[str, LayerSpec], int]]
    ) -> list[dict[_PolicyKey, tuple[Mapping[str, LayerSpec] | None, _PolicyKey | None]]]:
        """The sweep's policies in measuring order: waves of ``{policy: (specs, its seed's policy)}``,
        each policy in the first wave that holds it, seeded from an earlier wave."""
        float_key = self._key(None)
        uniform = {budget_text(b): self._key(specs) for m, b, specs, *_ in chosen if m == "uniform"}
        out: list[dict[_PolicyKey, tuple[Mapping[str, LayerSpec] | None, _PolicyKey | None]]] = [
            {float_key: (None, None)},
            {},
            {},
        ]
        for method, budget, specs, *_ in sorted(chosen, key=lambda c: c[0] != "uniform"):
            key, wave = self._key(specs), 1 if method == "uniform" else 2
            if not any(key in w for w in out):
                out[wave][key] = (
                    specs,
                    float_key if wave == 1 else uniform.get(budget_text(budget), float_key),
                )
        return out

    def prefetch(
        self, chosen: Sequence[tuple[str, Budget, Mapping[str, LayerSpec], int]], workers: int, progress: bool
    ) -> None:
        """Measure the float model and every policy of ``chosen`` not measured yet, wave by wave
        (:meth:`waves`), on ``workers`` forked processes and over the ``torchrun`` ranks
        (:func:`~aq_brevitas.workers.run_jobs`: the same numbers as one process, on every rank)."""
        waves = [{k: v for k, v in w.items() if k not in self.seen} for w in self.waves(chosen)]
        total = sum(rank_share(len(w)) for w in waves)
        with progress_bar(total=total, desc="pareto points", disable=not progress) as bar:
            for wave in waves:
                self._measure_wave(wave, workers, bar)

    def _measure_wave(
        self,
        wave: Mapping[_PolicyKey, tuple[Mapping[str, LayerSpec] | None, _PolicyKey | None]],
        workers: int,
        bar: Any,
    ) -> None:
        keys = list(wave)
        jobs = [(wave[k][0], None if wave[k][1] is None else self.seen[wave[k][1]]) for k in keys]
        measured = run_jobs(
            lambda i: self._measure(*jobs[i]), len(keys), workers, done=lambda _: bar.update(),
            order=sorted(range(len(keys)), key=lambda i: -_width(jobs[i][0])),
        )  # fmt: skip
        self.seen.update(zip(keys, measured, strict=True))

    def __call__(self, specs: Mapping[str, LayerSpec] | None) -> tuple[float, float]:
        key = self._key(specs)
        if key not in self.seen:
            self.seen[key] = self._measure(specs)
        return self.seen[key].clean, self.seen[key].robust


@takes_config(SearchConfig)
def search_pareto(
    model: nn.Module,
    calib_data: Any,
    val_data: Any,
    *,
    budgets: Sequence[Budget | str | int] = DEFAULT_SWEEP,
    methods: Sequence[str] = PARETO_METHODS,
    config: SearchConfig | None = None,
    table: CandidateTable | None = None,
    workers: int = 1,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> ParetoFront:
    """Every method's policy at every budget of a sweep, measured on held-out images (module docstring).

    ``calib_data``: training-split images (and labels) for scoring and quantizer calibration; ``val_data``:
    held-out training images and labels (never the test split), its first ``val_images`` used.
    ``budgets``: a list of :class:`~aq_brevitas.Budget`, their text, or bit widths ``b`` standing for
    the BOPs of uniform ``w_b a_b`` (:func:`sweep_budgets`), all of one kind (default: w2a2, w3a3,
    w4a4, w5a5, w8a8).
    ``methods``: any of :data:`PARETO_METHODS` and of the scored methods registered with
    :func:`~aq_brevitas.search.register_scorer`. ``config``: a :class:`SearchConfig` (its ``method``
    is not read: ``methods`` says which run); without candidates the default ones are crossed with
    input activation bits (2, 3, 4, 8). Raises :class:`ConfigError` for an unknown method or mixed
    budget kinds. Cost: one adversarial calibration, one candidate table, one scoring per method, one
    knapsack per (method, budget), one robust evaluation per distinct policy (the dominant cost; spread
    over ``workers`` forked processes, with the same results). ``cache_dir``: a folder of measured
    results (:class:`~aq_brevitas.evaluate.cache.MeasureCache`): a policy measured there before on the
    same weights, images, ε and suite is read back, each new one is written as soon as it is measured,
    so a killed sweep resumes where it stopped. Under ``torchrun`` (after
    :func:`~aq_brevitas.train.finetune.init_distributed`) the policies are split over the ranks and
    every rank returns the whole front, the same as one process gives.

    >>> import torch
    >>> from aq_brevitas import LayerSpec, SearchConfig, build_model
    >>> from aq_brevitas.search import search_pareto
    >>> _ = torch.manual_seed(0)
    >>> model = build_model("small_cnn").eval()  # random weights: about half a minute on a CPU
    >>> x, y = torch.rand(48, 1, 28, 28), torch.randint(0, 10, (48,))
    >>> specs = [LayerSpec(2, act_bit_width=2), LayerSpec(4, act_bit_width=4)]
    >>> front = search_pareto(model, (x[:32], y[:32]), (x[32:], y[32:]), budgets=["bops=2e7"],
    ...     methods=["uniform", "lipschitz"], config=SearchConfig(candidates=specs, pgd_steps=2), progress=False)
    >>> sorted({p.method for p in front.points})
    ['lipschitz', 'uniform']
    """
    cfg = _sweep_config(methods, config)
    check_workers(workers)
    t0, seconds = time.perf_counter(), {}
    with normalized_inputs(model, cfg.normalization), eval_mode(model):
        (x, y), val = _sweep_data(model, calib_data, val_data, cfg.val_images)
        calib, table = _calibration_and_table(model, (x, y), table, methods, cfg, progress, seconds)
        budgets_ = _sweep(table, budgets)
        cache = WeightCache(model, table)
        chosen = _choose(model, table, cache, budgets_, methods, cfg, (x, y), calib, progress)
        seconds["selection"] = time.perf_counter() - t0 - seconds["calibration"] - seconds["table"]
        measure = _Measure(model, x, val, cfg, cache_dir)
        measure.prefetch(chosen, workers, progress)
        float_clean, float_robust = measure(None)
        points = [_point(measure, table, *choice) for choice in chosen]
        seconds["measure"] = time.perf_counter() - t0 - sum(seconds.values())
    kind = budgets_[0].kind
    return ParetoFront(
        _mark_dominated(points, kind), float_clean, float_robust, cfg.eps, len(val[0]), kind,
        [budget_text(b) for b in budgets_], seconds,
    )  # fmt: skip


def _sweep_config(methods: Sequence[str], config: SearchConfig | None) -> SearchConfig:
    """The sweep's settings (:class:`ConfigError` for an unknown method); without candidates the
    default ones are crossed with the default input activation bits."""
    known = (
        *PARETO_METHODS,
        *(m for m, c in METHOD_SETTINGS.items() if c.scored and m not in PARETO_METHODS),
    )
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ConfigError(f"unknown Pareto method {unknown[0]!r}", f"use some of {', '.join(known)}")
    cfg = as_config(config)
    if cfg.candidates is None and cfg.act_bits is None:
        cfg = cfg.replace(act_bits=DEFAULT_ACT_BITS)
    return cfg


def _calibration_and_table(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    table: CandidateTable | None,
    methods: Sequence[str],
    cfg: SearchConfig,
    progress: bool,
    seconds: dict[str, float],
) -> tuple[AdversarialCalibration | None, CandidateTable]:
    """One adversarial calibration (when ``lipschitz`` runs) and the candidate table (unless given),
    built on its adversarial images; their seconds written to ``seconds``."""
    t0 = time.perf_counter()
    scored = "lipschitz" in methods
    calib = adversarial_calibration(model, data, eps=cfg.eps, seed=cfg.seed) if scored else None
    seconds["calibration"] = time.perf_counter() - t0
    if table is None:
        x = calib.x_adv if calib else data[0]
        table = candidate_table(model, x, cfg.candidates, seed=cfg.seed, progress=progress)
    seconds["table"] = time.perf_counter() - t0 - seconds["calibration"]
    return calib, table


def _sweep_data(
    model: nn.Module, calib_data: Any, val_data: Any, val_images: int | None
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The calibration pair and the held-out pair (its first ``val_images``) as tensors."""
    x, y = as_xy(calib_data, model=model, name="calibration data")
    val = as_xy(val_data, model=model, name="validation data")
    if val_images is not None:
        val = (val[0][:val_images], val[1][:val_images])
    return (x, y), val


def _sweep(table: CandidateTable, budgets: Sequence[Budget | str | int]) -> list[Budget]:
    """The budgets of the sweep (a bit width: the BOPs of uniform ``w_b a_b``), all of one kind."""
    budgets_ = [
        sweep_budgets(table, [b])[0] if isinstance(b, int) and not isinstance(b, bool) else as_budget(b)
        for b in budgets
    ]
    if len({b.kind for b in budgets_}) > 1:
        raise ConfigError(
            "the budgets of one sweep must be of one kind", "pass only bops=..., or only kib=..."
        )
    return budgets_


def _point(
    measure: _Measure,
    table: CandidateTable,
    method: str,
    budget: Budget,
    specs: Mapping[str, LayerSpec],
    rank: int,
) -> ParetoPoint:
    """One method's policy at one budget, measured."""
    clean, robust = measure(specs)
    cost = achieved_cost(table, specs)
    return ParetoPoint(
        method, budget_text(budget), {n: s.short() for n, s in specs.items()}, int(cost.bops),
        cost.weight_bytes / 1024, cost.avg_weight_bits, clean, robust,
        policy=LayerwisePolicy(dict(specs), meta={"method": method}).to_dict(), rank=rank,
    )  # fmt: skip


def _choose(
    model: nn.Module,
    table: CandidateTable,
    cache: WeightCache,
    budgets: list[Budget],
    methods: Sequence[str],
    cfg: SearchConfig,
    data: tuple[torch.Tensor, torch.Tensor],
    calib: Any,
    progress: bool,
) -> list[tuple[str, Budget, dict[str, LayerSpec], int]]:
    """(method, budget, specs, rank) for every policy to measure: scores once per method, a knapsack
    per budget (rank: the solution's place in the knapsack's order, 0 for its optimum)."""
    out: list[tuple[str, Budget, dict[str, LayerSpec], int]] = []
    scorings = {}
    for method in methods:
        if method in METHOD_SETTINGS and METHOD_SETTINGS[method].scored:
            m_cfg = cfg.replace(method=method)
            inputs = ScoringInputs(data, calib, cfg.eps, cfg.seed, cache, progress)
            scorings[method] = scorer_for(method)(model, table, inputs, m_cfg.method_settings)
    pinned = _first_last_pinned(table)
    for budget in budgets:
        for method in methods:
            if method in scorings:
                try:
                    sel = select_policy(
                        model,
                        table,
                        scorings[method].selectable,
                        budget,
                        config=cfg.replace(method=method),
                        cache=cache,
                    )
                except PolicyError:
                    continue  # this budget is below the method's cheapest policy
                out.append((method, budget, dict(sel.choice), 0))
                if scorings[method].terms is not None:  # measured_top_k: the next-best solutions too
                    k = cfg.settings_for(LipschitzSettings).measured_top_k
                    out += [(method, budget, dict(s.choice), i) for i, s in enumerate(sel.solutions[1:k], 1)]
            else:
                for specs in uniform_choices(
                    table, budget, cache, pinned if method == "first_last_8" else None
                ):
                    out.append((method, budget, specs, 0))
    return out


def _mark_dominated(points: list[ParetoPoint], kind: str) -> list[ParetoPoint]:
    def cost(p: ParetoPoint) -> float:
        return {"bops": p.bops, "weight_bytes": p.weight_kib, "avg_weight_bits": p.avg_weight_bits}[kind]

    out = []
    for p in points:
        beaten = any(
            q is not p
            and q.method == p.method
            and cost(q) <= cost(p)
            and q.robust_accuracy >= p.robust_accuracy
            and (cost(q) < cost(p) or q.robust_accuracy > p.robust_accuracy)
            for q in points
        )
        out.append(ParetoPoint(**{**p.to_dict(), "dominated": beaten}))
    return out
