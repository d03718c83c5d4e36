"""The robustness suite that flags gradient masking.

:func:`~aq_brevitas.evaluate.accuracy.accuracy` and :func:`~aq_brevitas.evaluate.accuracy.attack_accuracy`
are the building blocks; :func:`evaluate_robustness` runs the full suite (docs/finetune_and_evaluate.md): clean, FGSM and PGD-k at several ε, optionally
AutoAttack, a gradient-free Square attack, and a checklist of sanity checks that flag -- never hide
-- the signs of gradient masking. The result is a :class:`~aq_brevitas.evaluate.report.RobustnessReport`.
Attacks on Brevitas models run on their attack twin (:func:`~aq_brevitas.quantization.twin.attack_twin`:
weights quantized once, activation quantizers fused, the same numbers), and every adversarial example
is judged by the Brevitas forward (:func:`~aq_brevitas.quantization.twin.verified_logits`): the
headline counts what the Brevitas model gets wrong, and the report says where the two disagreed.

Every function here measures in eval mode and gives the model back in the mode it came in (each
module's own flag), with BatchNorm statistics and fake-quant observer ranges untouched. Inputs are in
[0, 1] and ε is measured there; ``normalization=(mean, std)`` is for a model that expects normalised
inputs (:func:`~aq_brevitas.attacks.normalized_inputs`, the package's one mechanism for it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..attacks import (
    check_input_gradient,
    image_grid,
    make_attack,
    normalized_inputs,
)
from ..classifier import unwrap_parallel
from ..config import SUITES, AttackConfig, EvalConfig, config_or_default, takes_config
from ..forward import eval_mode
from ..quantization.twin import Twin, attack_twin, brevitas_forward, verified_logits
from ..workers import on_device
from .accuracy import batches, subset
from .indicators import (
    UNCONSTRAINED_EPS,
    input_gradient_check,
    noise_stability_check,
    optimisation_check,
    silent_success_check,
    unconstrained_check,
    white_box_check,
)
from .plan import Plan, make_plan, report_settings
from .report import AttackResult, MaskingCheck, RobustnessReport, masking_checks, pack_mask
from .suite import REFERENCE_QUERIES, REFERENCE_STEPS, ChainSettings, mask_share, run_chain


class _Runner:
    """Runs attacks batch by batch on clean-correct examples, tracking ε-ball violations."""

    def __init__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, progress: bool
    ) -> None:
        self.model, self.x, self.y = model, x, y
        self.batch_size, self.progress = batch_size, progress
        self.max_violation = 0.0
        self.worst = "none"
        self.checked = 0
        self.clean_correct = torch.zeros(0, dtype=torch.bool)
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.n_classes = 10  # the width of the logits, known after the first prediction
        self.standing: dict[float, torch.Tensor] = {}  # per ε: images no attack there has broken yet

    @torch.no_grad()
    def predict(self, x: torch.Tensor, *, adversarial: bool = False) -> torch.Tensor:
        """The Brevitas forward's top-1 classes; on ``adversarial`` examples also the twin's, counted
        where they disagree."""
        if adversarial:
            logits = verified_logits(self.model, x)
        else:
            with brevitas_forward(self.model):
                logits = self.model(x)
        self.n_classes = logits.shape[1]
        return logits.argmax(1)

    def clean(self) -> torch.Tensor:
        self.clean_correct = torch.cat(
            [
                (self.predict(xb.to(self.device)) == yb.to(self.device)).cpu()
                for xb, yb in batches(self.x, self.y, self.batch_size)
            ]
        )
        return self.clean_correct

    def mask(self, idx: torch.Tensor, left: torch.Tensor, eps: float) -> torch.Tensor:
        """The images standing after an attack on ``idx`` that left ``left``; noted for ``eps``."""
        m = self.clean_correct.clone()
        m[idx] = False
        m[left] = True
        self.standing[eps] = self.standing.get(eps, self.clean_correct) & m
        return m

    def track(self, adv: torch.Tensor, x: torch.Tensor, eps: float, label: str) -> None:
        """Record how far ``adv`` strays outside the ε-ball around ``x`` or [0, 1]."""
        if not torch.isfinite(adv).all():
            violation = math.inf
        else:
            linf = (adv - x).abs().flatten(1).amax(1)
            violation = max(
                (linf - eps).clamp(min=0).max().item(),
                (-adv).clamp(min=0).max().item(),
                (adv - 1).clamp(min=0).max().item(),
            )
        self.checked += len(adv)
        if violation > self.max_violation:
            self.max_violation, self.worst = violation, label

    def robust(self, attack: AttackConfig, indices: torch.Tensor, *, seed: int) -> torch.Tensor:
        """Indices (a subset of ``indices``) still classified correctly after ``attack``."""
        from tqdm.auto import tqdm

        keep = indices[self.clean_correct[indices]]
        if len(keep) == 0 or attack.eps == 0:
            return keep
        atk = make_attack(attack, self.model, seed=seed, n_classes=self.n_classes)
        torch.manual_seed(seed)
        survived = []
        label = f"{attack.name} ε={attack.eps:g}"
        for idx in tqdm(keep.split(self.batch_size), desc=label, disable=not self.progress, leave=False):
            xb, yb = self.x[idx].to(self.device), self.y[idx].to(self.device)
            adv = atk(xb, yb)
            self.track(adv, xb, attack.eps, label)
            survived.append(idx[(self.predict(adv, adversarial=True) == yb).cpu()])
        return torch.cat(survived)

    def job(self, cfg: EvalConfig, attack: str, eps: float, idx: torch.Tensor) -> AttackResult:
        """One row of the report: ``attack`` at ``eps`` on the images ``idx``."""
        t0 = time.perf_counter()
        steps: int | None
        restarts = 1
        if attack == "fgsm":
            steps, left = 1, self.robust(AttackConfig("fgsm", eps), idx, seed=cfg.seed)
        elif attack in ("pgd", "pgd-subset", "pgd-large-eps"):
            steps, restarts, left = cfg.pgd_steps, cfg.pgd_restarts, idx
            for r in range(cfg.pgd_restarts):
                left = self.robust(AttackConfig("pgd", eps, cfg.pgd_steps), left, seed=cfg.seed + r)
        elif attack == "square":
            steps = cfg.square_queries
            left = self.robust(AttackConfig("square", eps, queries=cfg.square_queries), idx, seed=cfg.seed)
        else:  # APGD-T targets each of the other classes: robust() passes the model's class count
            steps, left = None, self.robust(AttackConfig("autoattack", eps), idx, seed=cfg.seed)
        seconds = time.perf_counter() - t0
        correct = pack_mask(self.mask(idx, left, eps))
        return AttackResult(attack, eps, len(left) / len(idx), len(idx), seconds, steps, restarts, correct)


_BLACK_BOX = ("transfer", "square")  # suite attacks that do not follow the model's own gradient


@dataclass
class _SuiteOutcome:
    """What the suite left for the indicators: per ε, silent successes, the first white-box attack's
    margin trace, and the images only the transfer/gradient-free attacks broke."""

    rows: list[AttackResult] = field(default_factory=list)
    silent: dict[float, int] = field(default_factory=dict)
    traces: dict[float, tuple[str, torch.Tensor | None]] = field(default_factory=dict)
    extra: dict[float, tuple[int, int, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what a schedule skipped, and what it could miss


def _run_suite(
    run: _Runner, cfg: EvalConfig, names: tuple[str, ...], surrogate: nn.Module | None
) -> _SuiteOutcome:
    """The suite at every ε, ascending, each on the images no attack has broken at this or a smaller ε."""
    out, n = _SuiteOutcome(), len(run.x)
    prev = run.clean_correct.clone()
    for e in cfg.eps:
        alive = prev & run.standing.get(e, run.clean_correct)
        chain = run_chain(
            run.model, run.x, run.y, e, names, alive=alive, surrogate=surrogate, on_adv=run.track,
            settings=ChainSettings(cfg.suite_steps, cfg.suite_queries, cfg.seed, cfg.batch_size,
                                   cfg.suite if isinstance(cfg.suite, str) else None),
        )  # fmt: skip
        out.notes += [f"suite at ε={e:g}: {note}" for st in chain for note in st.notes]
        for st in chain:
            acc = mask_share(st.survived)
            out.rows.append(
                AttackResult(st.name, e, acc, n, st.seconds, st.steps, 1, pack_mask(st.survived), "suite")
            )
        final = chain[-1].survived if chain else alive
        seen = torch.stack([st.seen for st in chain]).any(0) if chain else torch.zeros_like(alive)
        out.silent[e] = int((seen & final).sum())
        white = [st for st in chain if st.name not in _BLACK_BOX]
        if white:
            out.traces[e] = (white[0].name, white[0].trace)
        first_black = next((k for k, st in enumerate(chain) if st.name in _BLACK_BOX), None)
        if first_black is not None:
            before = chain[first_black - 1].survived if first_black else alive
            black = "+".join(st.name for st in chain if st.name in _BLACK_BOX)
            out.extra[e] = (int((before & ~final).sum()), int(alive.sum()), black)
        run.standing[e] = run.standing.get(e, run.clean_correct) & final
        prev = final
    return out


def _reference_autoattack(run: _Runner, cfg: EvalConfig, idx: torch.Tensor) -> list[AttackResult]:
    """The reference AutoAttack (APGD-CE, APGD-T, FAB-T, Square 5,000) at the largest ε on ``idx``, as
    chain rows whose masks cover all images (those outside ``idx`` stand)."""
    e = cfg.eps[-1]
    chain = run_chain(
        run.model, run.x[idx], run.y[idx], e, SUITES["reference"], alive=run.clean_correct[idx],
        settings=ChainSettings(REFERENCE_STEPS, REFERENCE_QUERIES, cfg.seed, cfg.batch_size), on_adv=run.track,
    )  # fmt: skip
    rows = []
    for st in chain:
        left = idx[st.survived]
        correct = pack_mask(run.mask(idx, left, e))
        rows.append(
            AttackResult(
                st.name, e, len(left) / len(idx), len(idx), st.seconds, st.steps, 1, correct, "autoattack"
            )
        )
    return rows


def _indicator_checks(
    run: _Runner, cfg: EvalConfig, outcome: _SuiteOutcome, names: tuple[str, ...]
) -> list[MaskingCheck]:
    """The attack-failure indicators of :mod:`aq_brevitas.evaluate.indicators` (the model is in eval mode)."""
    sub = subset(len(run.x), cfg.large_eps_images, cfg.seed + 2)
    xs, ys = run.x[sub].to(run.device), run.y[sub].to(run.device)
    # APGD (torchattacks) needs image-like samples; PGD attacks any shape
    fallback = ("apgd-ce",) if image_grid(tuple(run.x.shape[1:])) is not None else ("pgd",)
    white = tuple(a for a in names if a not in _BLACK_BOX) or fallback
    alive = run.clean_correct[sub]
    settings = ChainSettings(10, cfg.suite_queries, cfg.seed, cfg.batch_size)
    chain = run_chain(
        run.model, run.x[sub], run.y[sub], UNCONSTRAINED_EPS, white, alive=alive, settings=settings
    )
    left = mask_share(chain[-1].survived if chain else alive)
    return [
        input_gradient_check(run.model, xs, ys, batch_size=cfg.batch_size),
        noise_stability_check(
            run.model, xs, amplitude=cfg.eps[0] / 20, batch_size=cfg.batch_size, seed=cfg.seed
        ),
        silent_success_check(outcome.silent, len(run.x)),
        optimisation_check(outcome.traces),
        white_box_check(outcome.extra),
        unconstrained_check(left, len(sub), " then ".join(f"{a} (10 steps)" for a in white)),
    ]


@dataclass
class _Measured:
    """What the attacks gave: the report's rows, the attack-failure indicators, the attack twin's record."""

    results: list[AttackResult]
    indicators: list[MaskingCheck]
    twin: Twin


def _attack(run: _Runner, plan: Plan, surrogate: nn.Module | None) -> _Measured:
    """The clean pass, FGSM and PGD at every ε, the suite, the subsets and large ε, the reference
    AutoAttack and the indicators, in that order (the model is fed normalised inputs already)."""
    from tqdm.auto import tqdm

    cfg, model, names = plan.cfg, run.model, plan.names
    with (
        eval_mode(model), eval_mode(surrogate or model), torch.random.fork_rng(devices=[]),
        attack_twin(model) as twin,
    ):  # fmt: skip
        t0 = time.perf_counter()
        clean = run.clean()
        results = [AttackResult("clean", 0.0, mask_share(clean), len(clean), time.perf_counter() - t0,
                                correct=pack_mask(clean))]  # fmt: skip
        bar = tqdm(
            total=len(plan.jobs) + len(cfg.eps) * bool(names), desc="robustness", disable=not run.progress
        )
        for job in [j for j in plan.jobs if j[0] in cfg.attacks]:  # FGSM and PGD at every ε first
            results.append(run.job(cfg, *job))
            bar.update()
        outcome = _run_suite(run, cfg, names, surrogate) if names else _SuiteOutcome()
        results += outcome.rows
        plan.notes += outcome.notes
        bar.update(len(cfg.eps) * bool(names))
        for job in [j for j in plan.jobs if j[0] not in cfg.attacks]:  # the subsets, then large ε
            results.append(run.job(cfg, *job))
            bar.update()
        if cfg.autoattack == "standard" and "autoattack" not in plan.skipped:
            results += _reference_autoattack(
                run, cfg, subset(len(plan.x), cfg.gradient_free_images, cfg.seed)
            )
        bar.close()
        indicators = _indicator_checks(run, cfg, outcome, names) if cfg.indicators else []
    return _Measured(results, indicators, twin)


def _report(
    plan: Plan, run: _Runner, measured: _Measured, *, name: str, meta: Mapping[str, Any] | None
) -> RobustnessReport:
    """The :class:`RobustnessReport` of a finished evaluation, its checks included."""
    report = RobustnessReport(
        model=name,
        images=len(plan.x),
        clean_accuracy=measured.results[0].accuracy,
        results=measured.results,
        max_violation=run.max_violation,
        meta={
            **dict(meta or {}),
            "frozen_quant_layers": measured.twin.frozen,
            "attack_twin": measured.twin.summary(),
        },
        settings=report_settings(plan.cfg, len(plan.x)),
        skipped=plan.skipped,
        notes=plan.notes + measured.twin.notes(),
    )
    report.checks = masking_checks(report, checked=run.checked, worst=run.worst) + measured.indicators
    return report


@takes_config(EvalConfig)
def evaluate_robustness(
    model: nn.Module,
    data: Any,
    config: EvalConfig | None = None,
    *,
    progress: bool = True,
    name: str | None = None,
    meta: Mapping[str, Any] | None = None,
    surrogate: nn.Module | None = None,
) -> RobustnessReport:
    """Clean, FGSM and PGD-k accuracy and the attack suite at each ε, Square (and PGD on its subset),
    optionally AutoAttack, the gradient-masking checklist and the attack-failure indicators.

    ``data`` is any form :func:`~aq_brevitas.forward.as_xy` accepts (images in [0, 1], integer
    labels). ``config``: an :class:`~aq_brevitas.config.EvalConfig` (None: its defaults), whose fields
    the rest of this paragraph names. ``name`` and ``meta`` label the report. ``surrogate``: the float
    model ``model`` was quantized from, for the suite's transfer attack (skipped without it; noted).

    An example counts as robust only if it is classified correctly both clean and under attack;
    attacks run on clean-correct examples only. The headline is ``report.robust_accuracy(eps)``: per
    image, the worst case over every attack run at ``eps``. The ``suite`` (default ``"fast"``;
    :mod:`aq_brevitas.evaluate.suite`) runs at every ε, ascending, on the images FGSM, PGD and the
    smaller ε left standing. PGD uses a random start; with ``pgd_restarts > 1`` an example must
    survive every restart. Square, PGD on its subset and AutoAttack run on a seeded subset of
    ``gradient_free_images`` images at the largest ε; PGD at ``large_eps`` on a seeded subset of
    ``large_eps_images`` images, where the indicators also run. Other samples than images get Square,
    AutoAttack and the suite on their C×H×W view (:func:`~aq_brevitas.attacks.image_grid`;
    ``report.notes``), or skip them (``report.skipped``); so do attacks whose loss needs more classes
    than the model scores (a single logit scores 2, :mod:`aq_brevitas.classifier`). With
    ``normalization``, data and ε stay in [0, 1] and model and surrogate are fed normalised inputs;
    a ``DataParallel`` model is measured as its network; RNG, modes and BatchNorm statistics are kept. Raises :class:`ConfigError`
    for bad settings or data, :class:`ModelError` for a model that cannot run the images or has no
    input gradient (a converted integer torch.ao model: attack the prepared one).

    >>> import torch
    >>> from torch import nn
    >>> from aq_brevitas import EvalConfig, evaluate_robustness
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    >>> x = torch.rand(40, 1, 8, 8)
    >>> y = model(x).argmax(1)  # labels the model gets right
    >>> cfg = EvalConfig(eps=(0.05, 0.1), pgd_steps=5, square_queries=20, gradient_free_images=10,
    ...                  large_eps_images=20, suite_steps=10, suite_queries=20)
    >>> report = evaluate_robustness(model, (x, y), cfg, progress=False)
    >>> report.images, report.clean_accuracy, report.result("pgd", 0.1).steps
    (40, 1.0, 5)
    >>> report.robust_accuracy(0.1) <= report.accuracy("pgd", 0.1)  # the worst case over every attack
    True
    >>> [c.name for c in report.checks][:3]
    ['pgd_not_above_fgsm', 'monotone_in_eps', 'large_eps_near_zero']
    """
    t_start = time.perf_counter()
    cfg = config_or_default(config, EvalConfig())
    model, surrogate = unwrap_parallel(model), unwrap_parallel(surrogate)
    norm = cfg.normalization
    with on_device((model, surrogate), cfg.device), normalized_inputs(model, norm):
        with normalized_inputs(surrogate or model, norm):
            plan = make_plan(model, data, cfg, surrogate)
            check_input_gradient(model, plan.x)  # every suite runs PGD: refuse a converted model at once
            run = _Runner(model, plan.x, plan.y, batch_size=plan.cfg.batch_size, progress=progress)
            measured = _attack(run, plan, surrogate)
    label = name or str((meta or {}).get("name", type(model).__name__))
    report = _report(plan, run, measured, name=label, meta=meta)
    report.seconds = time.perf_counter() - t_start
    return report
