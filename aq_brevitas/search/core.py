""":func:`search_policy`: score, solve, (refine,) then keep the better of the result and the best
uniform policy by robust accuracy on held-out training images -- the per-image worst case of PGD and
the fast attack suite (docs/method.md "Selection").

Each step is one function over a :class:`_Run` that carries the data, the candidate table and the
timings; :func:`search_policy` only chains them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..attacks import normalized_inputs
from ..budget import Budget, as_budget, require_within
from ..classifier import unwrap_parallel
from ..config import takes_config
from ..errors import ConfigError, warn
from ..forward import as_xy, eval_mode
from ..nnutils import layer_geometry
from ..policy import LayerSpec, layer_cost
from ..quantization.finn_layout import refuse_finn_activations
from ..workers import run_jobs
from .baselines import ROBUST_MEASURE, UniformChoice, best_uniform, measure_policy
from .calibration import (
    AdversarialCalibration,
    Representatives,
    WeightCache,
    adversarial_calibration,
    equivalent_candidates,
    reuse_calibration,
)
from .candidates import CandidateRow, CandidateTable, candidate_table, folded_copy, per_layer_candidates
from .config import METHOD_SETTINGS, LipschitzSettings, SearchConfig, as_config, scorer_for
from .costing import achieved_cost, check_feasible
from .mckp import SOLVER_NAME
from .refine import Refinement
from .result import (
    CandidateCount,
    Evidence,
    HeldOutCheck,
    SearchResult,
    SolverReport,
    Timing,
    UniformEvidence,
)
from .scorers import Scores, ScoringInputs, lipschitz_terms
from .selection import Selection, select_policy

_NO_VAL_DATA = (
    "search_policy ran without val_data: the result was not compared with the best uniform policy "
    '(result.winner = "unchecked") -- fix: pass held-out training images as val_data '
    "(the CLI does unless --val-images 0)"
)


@dataclass
class _Run:
    """One search in progress: what every step reads and writes."""

    model: nn.Module  # the BatchNorm-folded copy with fold_bn
    cfg: SearchConfig
    budget: Budget
    x: torch.Tensor
    y: torch.Tensor
    calib: AdversarialCalibration | None
    progress: bool
    timing: Timing
    cache_dir: str | os.PathLike[str] | None = None
    table: CandidateTable = dataclasses.field(init=False)
    cache: WeightCache = dataclasses.field(init=False)


@dataclass
class _Picked:
    """A method's choice before the held-out check: the policy, the scores it was judged by, the
    selection (None for uniform), the refinement record, the method's evidence."""

    choice: dict[str, LayerSpec]
    scores: Scores
    selection: Selection | None
    refinement: Refinement
    evidence: Evidence
    reps: Representatives


# ------------------------------------------------------------------------------------ the steps
def _start(model: nn.Module, calib_data: Any, budget: Budget, cfg: SearchConfig, progress: bool) -> _Run:
    """Calibration data as (x, y) (or a reused adversarial calibration), the folded model if asked."""
    refuse_finn_activations(model, cfg.target)
    lip = cfg.settings_for(LipschitzSettings)
    calib = None
    if isinstance(calib_data, AdversarialCalibration):
        calib = reuse_calibration(
            model, calib_data, eps=cfg.eps, attack=lip.attack, steps=lip.steps, seed=cfg.seed
        )
        x, y = calib.x, calib.y
    else:
        x, y = as_xy(calib_data, model=model, name="calibration data")
    if cfg.fold_bn:
        model = folded_copy(model)  # quantize(folded, fold_bn=False) is quantize(model, fold_bn=True)
    return _Run(model, cfg, budget, x, y, calib, progress, Timing())


def _precheck(run: _Run) -> None:
    """Budget feasibility from the layer geometry alone (cheap), so an impossible budget fails at once."""
    geometry = {n: g for n, g in layer_geometry(run.model, run.x[:1]).items() if g.macs > 0}
    cheapest = 0.0
    for n, specs in per_layer_candidates(run.cfg.candidates, list(geometry)).items():
        g = geometry[n]
        rows = [CandidateRow(s, 0.0, 0.0, *layer_cost(s, g.params, g.macs)) for s in specs]
        cheapest += min(r.cost(run.budget.kind) for r in rows)
    if run.budget.kind == "avg_weight_bits":
        cheapest /= max(sum(g.params for g in geometry.values()), 1)
    require_within(run.budget, cheapest)


def _prepare(run: _Run, table: CandidateTable | None) -> None:
    """Adversarial calibration (lipschitz) and the candidate table, unless given; then feasibility."""
    cfg, lip = run.cfg, run.cfg.settings_for(LipschitzSettings)
    if table is None:
        _precheck(run)  # before any attack or power iteration
    t0 = time.perf_counter()
    if (
        run.calib is None
        and cfg.method == "lipschitz"
        and (lip.estimate != "spectral" or lip.attack is not None)
    ):
        run.calib = adversarial_calibration(
            run.model, (run.x, run.y), eps=cfg.eps, attack=lip.attack, steps=lip.steps, seed=cfg.seed,
            jacobian=lip.estimate == "jacobian",
        )  # fmt: skip
        run.timing.adversarial_calibration_s = time.perf_counter() - t0
    # Operator norms only for what reads them: the lipschitz score (L̂; ‖ΔW‖ for the spectral
    # estimate) and refinement's whole-network bound. Uniform, Hessian and ANS need Ŵ and costs alone.
    norms = cfg.method == "lipschitz" or cfg.refine
    dw = cfg.method == "lipschitz" and lip.estimate == "spectral"
    t0 = time.perf_counter()
    if table is None:
        # A_l (input norms) on adversarial calibration examples when there are some
        table = candidate_table(
            run.model, run.calib.x_adv if run.calib else run.x, cfg.candidates, seed=cfg.seed,
            progress=run.progress, norms=norms, dw_norms=dw,
        )  # fmt: skip
        run.timing.candidate_table_s = time.perf_counter() - t0
    elif norms and not table.has_norms(dw_norms=dw):
        table.fill_norms(dw_norms=dw, progress=run.progress)  # a ready table gets what it lacks, once
        run.timing.candidate_table_s = time.perf_counter() - t0
    check_feasible(table, run.budget)
    run.table, run.cache = table, WeightCache(run.model, table)


def _uniform(run: _Run, val_data: Any) -> UniformChoice:
    return best_uniform(
        run.model, run.table, run.budget, val_data, calib_data=(run.x, run.y), config=run.cfg,
        cache=run.cache, cache_dir=run.cache_dir, progress=run.progress,
    )  # fmt: skip


def _pick_uniform(run: _Run, val_data: Any) -> _Picked:
    """The uniform method: enumerate, nothing solved. Its per-layer scores are its share of the
    data-free (spectral) bound, for reports."""
    t0 = time.perf_counter()
    uni = _uniform(run, val_data)
    table = run.table
    has_dw = not any(math.isnan(r.dW_norm) for rows in table.rows.values() for r in rows)
    scores = (
        lipschitz_terms(run.model, table, None, eps=run.cfg.eps, estimate="spectral").scores
        if has_dw
        else {n: {r.spec: math.nan for r in rows} for n, rows in table.rows.items()}
    )
    run.timing.scoring_s = time.perf_counter() - t0
    record = Refinement(skipped="uniform has no score")
    evidence = UniformEvidence(uni, "spectral" if has_dw else None)
    reps = equivalent_candidates(table, run.cache)
    return _Picked({n: uni.spec for n in table.layers}, scores, None, record, evidence, reps)


def _pick_scored(run: _Run) -> _Picked:
    """Score with the method's registered scorer, then the knapsack (and refinement if asked)."""
    cfg, t0 = run.cfg, time.perf_counter()
    inputs = ScoringInputs((run.x, run.y), run.calib, cfg.eps, cfg.seed, run.cache, run.progress)
    scoring = scorer_for(cfg.method)(run.model, run.table, inputs, cfg.method_settings)
    run.timing.scoring_s = time.perf_counter() - t0
    sel = select_policy(
        run.model,
        run.table,
        scoring.selectable,
        run.budget,
        config=cfg,
        cache=run.cache,
        progress=run.progress,
    )
    run.timing.solve_s = sel.solve_s
    record = sel.refinement
    if record.done:
        run.timing.refine_s = sel.refine_s
    if cfg.refine and not METHOD_SETTINGS[cfg.method].refinable:
        record = dataclasses.replace(
            record, skipped=f"{cfg.method} is additive by definition; no whole-network measure"
        )
    return _Picked(sel.choice, scoring.scores, sel, record, scoring.evidence, sel.reps)


def _held_out(run: _Run, picked: _Picked, val_data: Any) -> tuple[str, dict[str, LayerSpec], HeldOutCheck]:
    """Keep the best of the searched policy, the knapsack's unrefined one (if refinement changed it)
    and the best uniform policy by robust accuracy on held-out images (the worst case of PGD and the
    fast suite, never PGD alone); ties keep the earlier."""
    assert picked.selection is not None
    cfg, t0, reps, choice = run.cfg, time.perf_counter(), picked.reps, picked.choice
    uni = _uniform(run, val_data)
    u_acc = uni.accuracy
    assert u_acc is not None
    val = as_xy(val_data, model=run.model, name="validation data")
    n_val = len(val[0]) if cfg.val_images is None else min(cfg.val_images, len(val[0]))
    held = (val[0][:n_val], val[1][:n_val])

    same_as_uniform = all(reps[n][s] == reps[n][uni.spec] for n, s in choice.items())
    # The candidates are measured on the torchrun ranks in turn (one process: here, in order).
    # The refined policy is judged on held-out data too: if the knapsack's own solution does
    # better there, refinement over-fitted the calibration images and is dropped.
    milp = picked.selection.milp_choice
    changed = picked.refinement.done and any(reps[n][milp[n]] != reps[n][choice[n]] for n in run.table.layers)
    todo = ([] if same_as_uniform else [choice]) + ([milp] if changed else [])
    # measured_top_k: the knapsack's next-best solutions compete on the same held-out images
    k = cfg.settings_for(LipschitzSettings).measured_top_k if cfg.method == "lipschitz" else 1
    ranked = [(i, dict(sol.choice)) for i, sol in enumerate(picked.selection.solutions[1:k], 1)]
    ranked = [(i, c) for i, c in ranked if c != choice and c != milp]
    todo += [c for _, c in ranked]
    # the best uniform policy's adversarial examples are replayed first (a transfer attack)
    measured = run_jobs(
        lambda i: measure_policy(  # the robust half
            run.model, todo[i], held, run.x, eps=cfg.eps, steps=cfg.pgd_steps, seed=cfg.seed,
            cache_dir=run.cache_dir, warm=uni.measurement if cfg.warm_start else None, device=cfg.device,
        ).robust,
        len(todo),
    )  # fmt: skip
    s_acc = u_acc if same_as_uniform else measured[0]
    m_acc = measured[len(todo) - len(ranked) - 1] if changed else None
    options = [("search", s_acc, choice)]
    if m_acc is not None:
        options.append(("search-unrefined", m_acc, milp))
    for (i, c), acc in zip(ranked, measured[len(todo) - len(ranked) :]):
        options.append((f"search-rank-{i}", acc, c))  # the knapsack's i-th next-best solution
    options.append(("uniform", u_acc, dict(uni.policy.layers)))
    winner, _, final = max(options, key=lambda o: o[1])  # ties keep the earlier option
    check = HeldOutCheck(
        n_val,
        cfg.pgd_steps,
        s_acc,
        m_acc,
        u_acc,
        uni.spec,
        dict(uni.robust_accuracy),
        dict(choice),
        ROBUST_MEASURE,
    )
    run.timing.validation_s = time.perf_counter() - t0
    return winner, final, check


def _result(
    run: _Run, picked: _Picked, winner: str, final: dict[str, LayerSpec], check: HeldOutCheck | None
) -> SearchResult:
    cfg, table, sel = run.cfg, run.table, picked.selection
    solver = (
        SolverReport(SOLVER_NAME, sel.solutions[0].status, tuple(s.objective for s in sel.solutions))
        if sel is not None
        else SolverReport("none: uniform policies are enumerated, not solved", "not run")
    )
    counts = {
        n: CandidateCount(len(r), len({picked.reps[n][s.spec] for s in r})) for n, r in table.rows.items()
    }
    return SearchResult(
        layers=final,
        method=cfg.method,
        estimate=getattr(cfg.method_settings, "estimate", None),
        budget=run.budget,
        cost=achieved_cost(table, final),
        layer_scores={n: picked.scores[n][s] for n, s in final.items()},
        solver=solver,
        candidates=counts,
        refinement=picked.refinement,
        winner=winner,
        validation=check,
        evidence=picked.evidence,
        calib_images=len(run.x),
        config=cfg,
        timing=run.timing,
        input_shape=tuple(run.x.shape[1:]) if torch.is_tensor(run.x) else None,
    )


# ------------------------------------------------------------------------------------ the search
@takes_config(SearchConfig)
def search_policy(
    model: nn.Module,
    calib_data: Any,
    budget: Budget | str,
    *,
    config: SearchConfig | None = None,
    val_data: Any = None,
    table: CandidateTable | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> SearchResult:
    """Search a per-layer policy under ``budget`` (docs/method.md "Selection") and say why it won.

    ``calib_data``: training-split images (never the test split) in any form
    :func:`~aq_brevitas.forward.as_xy` accepts (images alone are labelled by the model), or a ready
    :class:`AdversarialCalibration` (reused across budgets and methods; its eps must be the config's).
    ``budget``: a :class:`~aq_brevitas.Budget` or its CLI text (``"avg-bits=4"``, ``"kib=20"``...).
    ``config``: a :class:`SearchConfig` (default: its defaults): the method, candidates, ε, seed,
    refinement, the held-out check's settings and each method's settings. ``val_data``: held-out
    training images, e.g. ``load_split("val")``: the result is compared with the best uniform policy
    by robust accuracy -- the per-image worst case of PGD-``pgd_steps`` and the fast attack suite --
    on its first ``val_images`` and the better one kept; without it no comparison is made, ``winner``
    is ``"unchecked"`` and a ``UserWarning`` says so. ``table``: a ready candidate table (its
    ``fold_bn`` must be the config's). Apply the policy with the same ``fold_bn``. With the config's
    ``normalization=(mean, std)`` the model expects normalised inputs; the data and ε stay in [0, 1]
    pixel space and every forward -- adversarial calibration, scores, quantizer calibration, the
    held-out check -- feeds it ``(x - mean) / std``. A ready ``table`` must have been built the same
    way (inside :func:`~aq_brevitas.attacks.normalized_inputs`). ``cache_dir``: a folder of measured
    held-out results (:class:`~aq_brevitas.evaluate.cache.MeasureCache`), read and written, shared with
    :func:`~aq_brevitas.search.search_pareto`; under ``torchrun`` the held-out candidates are measured
    on the ranks in turn. ``progress``: progress bars.

    Raises :class:`~aq_brevitas.errors.ConfigError` for bad settings or data and
    :class:`~aq_brevitas.errors.PolicyError` for an infeasible budget (naming the minimum). Same
    inputs and seed give the same policy; timings live only in ``result.timing``.

    >>> import torch
    >>> from aq_brevitas import LayerSpec, SearchConfig, build_model, search_policy
    >>> _ = torch.manual_seed(0)
    >>> model = build_model("small_cnn").eval()  # random weights: a second or two on a CPU
    >>> x = torch.rand(32, 1, 28, 28)
    >>> config = SearchConfig(method="hessian", candidates=[LayerSpec(2), LayerSpec(4), LayerSpec(8)])
    >>> result = search_policy(  # without val_data: a UserWarning, and the result is "unchecked"
    ...     model, (x, model(x).argmax(1)), "avg-bits=4", config=config, progress=False
    ... )
    >>> result.winner, result.cost.avg_weight_bits <= 4
    ('unchecked', True)
    >>> result.policy.save("policy.json")  # doctest: +SKIP
    """
    t_start = time.perf_counter()
    model, cfg, budget = unwrap_parallel(model), as_config(config), as_budget(budget)
    if table is None:
        cfg = cfg.for_budget(budget.kind)  # BOPs count input bits: let the search choose them
    if table is not None and table.fold_bn != cfg.fold_bn:
        raise ConfigError(
            f"the candidate table was built with fold_bn={table.fold_bn}, the search asks fold_bn={cfg.fold_bn}",
            "build the table with the same fold_bn the policy will be applied with",
        )
    with normalized_inputs(model, cfg.normalization):  # copies made inside (fold_bn, quantize) inherit it
        run = _start(model, calib_data, budget, cfg, progress)
        run.cache_dir = cache_dir
        picked, winner, final, check = _search(run, table, val_data)
    run.timing.total_s = time.perf_counter() - t_start
    return _result(run, picked, winner, final, check)


def _search(
    run: _Run, table: CandidateTable | None, val_data: Any
) -> tuple[_Picked, str, dict[str, LayerSpec], HeldOutCheck | None]:
    """Prepare, pick and (with ``val_data``) check: the steps of :func:`search_policy` after :func:`_start`."""
    cfg, check = run.cfg, None
    with eval_mode(run.model):
        _prepare(run, table)
        if cfg.method == "uniform":
            picked = _pick_uniform(run, val_data)
            winner, final = "uniform", picked.choice
        else:
            picked = _pick_scored(run)
            winner, final = "unchecked", picked.choice
            if val_data is None:
                warn(_NO_VAL_DATA)
            else:
                winner, final, check = _held_out(run, picked, val_data)
    return picked, winner, final, check
