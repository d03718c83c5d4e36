"""The whole job as resumable stages: score → search → quantize → fine-tune → evaluate → export → report.

It runs on the user's model and data (:class:`~aq_brevitas.rundata.RunData`: tensors, a Dataset or
DataLoader, or a directory of IDX files of any sample shape; Fashion-MNIST by default); every stage
reads the draws :func:`~aq_brevitas.rundata.prepare_data` makes from it. A model that expects
normalised inputs gets ``RunConfig.normalization=(mean, std)``: every stage feeds it
``(x - mean) / std`` while data and ε stay in [0, 1].

Each stage is one function over a :class:`RunContext`. It writes its outputs atomically into
``out/`` and records in ``out/stages.json`` the settings and input files it used plus a digest of
each output. The next run skips a stage only when its recorded settings and inputs are the current
ones (the model's weights and a digest of the data it reads included) and its outputs are still
byte-identical; otherwise it says why and redoes it (a redone stage rewrites its outputs, so the
stages that read them are redone too). ``force=True`` redoes everything. The same stages run for the
searched policy and for the best uniform policy of the same budget, so the report compares them on
the same data. Quantized models are saved and loaded with :func:`~aq_brevitas.save_quantized` /
:func:`~aq_brevitas.load_quantized`; the summary and the report are :mod:`~aq_brevitas.runreport`'s.

Importing this module does not import torch, so the CLI can build ``aq-brevitas run``'s options
from :class:`RunConfig`.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, ModelError
from .rundata import RunData, RunInputs, prepare_data  # RunData: importable from here, with run
from .runreport import VARIANTS, finn_lines, report, summary_rows
from .search.config import DEFAULT_METHOD, SCORED_METHODS
from .stagelog import StageLog, model_digest
from .storage import atomic_write_json, check_output_file
from .texttable import text_table

if TYPE_CHECKING:
    from torch import nn

    from .budget import Budget
    from .policy import LayerwisePolicy
    from .runreport import Variant

STAGES = ("score", "search", "quantize", "finetune", "evaluate", "export", "report")
RUN_METHODS = SCORED_METHODS  # the run compares against uniform itself, so every scored method


def _setting(default: Any, flag: str, help: str, *, minimum: int | None = None, **argparse: Any) -> Any:
    """A RunConfig field with the ``aq-brevitas run`` option that sets it (read by the CLI and by the
    error messages here) and, for a count, its smallest allowed value."""
    return field(default=default, metadata={"flag": flag, "help": help, "minimum": minimum, **argparse})


@dataclass
class RunConfig:
    """Settings of one pipeline run (all JSON-serialisable); each field's metadata names the option
    of ``aq-brevitas run`` that sets it.

    Selection (scores, search, calibration) uses ``calib_images`` + ``val_images`` held-out images
    (see :class:`~aq_brevitas.rundata.RunData`); fine-tuning a ``finetune_images`` training subset
    (None = all) for ``finetune_epochs`` epochs of PGD-``finetune_steps``; the report ``test_images``
    test images (None = all) under PGD-``pgd_steps``. ``eps`` (L-inf, inputs in [0, 1]) is also
    evaluated when ``eval_eps`` lacks it; the other radii of ``eval_eps`` on the first
    ``eval_eps_images`` of those test images (None: all of them), in a report of their own. ``data_dir``: the IDX directory to read when ``run`` is
    given no data (None: ``$AQ_DATA_DIR`` or Fashion-MNIST). ``normalization=(mean, std)`` (one value,
    or one per input channel, dim 1) for a model that expects ``(x - mean) / std``: the search,
    calibration, fine-tuning and evaluation feed it that while the data and ε stay in [0, 1] (the
    export's ONNX takes normalised inputs, as the model does). ``workers``: forked processes the
    evaluation's independent reports run on (:func:`~aq_brevitas.workers.run_jobs`; same results).
    """

    budget: str = _setting("avg-bits=3", "--budget", "avg-bits=N, bytes=N, kib=N or bops=N")
    eps: float = _setting(0.1, "--eps", "L-inf radius the policy is searched, fine-tuned and evaluated for")
    method: str = _setting(DEFAULT_METHOD, "--method", "search method", choices=RUN_METHODS)
    target: str = _setting(
        "finn", "--target", "finn: integer inputs on every layer (quantized after each ReLU), FINN's front end "
        "and estimates at export; generic: any policy", choices=("finn", "generic"),
    )  # fmt: skip
    calib_images: int = _setting(256, "--calib-images", "held-out (val) images for scoring", minimum=1)
    val_images: int = _setting(
        500, "--val-images", "other held-out images for the comparison with uniform", minimum=1
    )
    finetune_images: int | None = _setting(
        4096, "--train-images", "training subset for fine-tuning (0 = all)", minimum=1
    )
    finetune_epochs: int = _setting(1, "--epochs", "fine-tuning epochs", minimum=1)
    finetune_steps: int = _setting(7, "--train-steps", "PGD steps of the fine-tuning attack", minimum=1)
    # One export input plus at least one parity image.
    test_images: int | None = _setting(
        2000, "--test-images", "test images for the report (0 = all 10k)", minimum=2
    )
    pgd_steps: int = _setting(20, "--pgd-steps", "PGD steps of the evaluation", minimum=1)
    eval_eps: tuple[float, ...] = _setting(
        (0.05, 0.1, 0.2), "--eval-eps", "L-inf radii evaluated besides --eps"
    )
    eval_eps_images: int | None = _setting(
        None, "--eval-eps-images", "test images for the --eval-eps radii besides --eps (0 = --test-images)",
        minimum=1,
    )  # fmt: skip
    seed: int = _setting(0, "--seed", "seed of every random draw", minimum=0)
    workers: int = _setting(
        1, "--workers", "processes the evaluation's reports are spread over (the results are the same; "
        "2 on a 2-core machine)", minimum=1,
    )  # fmt: skip
    data_dir: str | None = _setting(None, "--data-dir", "directory of the IDX files")
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = _setting(
        None, "--mean/--std", "per-channel mean and std the model expects its inputs normalised with"
    )


def flag_of(name: str) -> str:
    """The ``aq-brevitas run`` option that sets RunConfig field ``name``."""
    return next(f.metadata["flag"] for f in fields(RunConfig) if f.name == name)


@dataclass
class RunResult:
    """What :func:`run` returns: the summary rows (float, uniform, aq-brevitas), skipped stages, wall time."""

    out: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary_table(self) -> str:
        """The rows as a plain-text table whose columns are as wide as their longest cell: ``robust`` is
        the per-image worst case over the attack suite (the figure to trust), ``PGD`` PGD alone; each
        model's failed masking checks and attack-failure indicators follow as warning lines."""
        head = ("model", "avg bits", "weight KiB", "clean", "robust", "PGD", "export parity")
        cells = [
            (r["name"], f"{r['avg_bits']:.2f}", f"{r['kib']:.1f}", f"{r['clean']:.4f}",
             f"{r.get('robust', r['pgd']):.4f}" + (" (!)" if r.get("warnings") else ""), f"{r['pgd']:.4f}",
             "-" if r.get("parity") is None else f"{r['parity']:.1e}")
            for r in self.rows
        ]  # fmt: skip
        warn = [f"warning: {r['name']}: {w}" for r in self.rows for w in r.get("warnings", [])]
        return "\n".join([text_table(head, cells), *warn, *finn_lines(self.rows)])


# -- checks before any work ----------------------------------------------------------------------------
def _check_count(name: str, value: Any, flag: str, minimum: int, none_ok: bool) -> None:
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fix = f"pass {flag} N with N >= {minimum}" + (f" ({flag} 0 = all)" if none_ok else "")
        raise ConfigError(f"{flag} (RunConfig.{name}) must be an integer >= {minimum}, got {value!r}", fix)


def check_config(cfg: RunConfig) -> Budget:
    """Refuse a bad setting before any work or any file is written; returns the parsed Budget."""
    from .attacks import check_eps, check_normalization
    from .budget import Budget

    if not isinstance(cfg, RunConfig):
        raise ConfigError(f"config is a {type(cfg).__name__}, not a RunConfig", "pass RunConfig(...)")
    if not isinstance(cfg.budget, str):
        raise ConfigError(f"budget {cfg.budget!r} is not a string", "write e.g. --budget avg-bits=3")
    budget = Budget.parse(cfg.budget)
    check_eps(cfg.eps, "eps")
    for e in cfg.eval_eps:
        check_eps(e, "eval_eps")
    if cfg.method not in RUN_METHODS:
        raise ConfigError(f"unknown search method {cfg.method!r}", f"use one of {', '.join(RUN_METHODS)}")
    if cfg.normalization is not None:
        check_normalization(cfg.normalization)  # its length is checked against the data's channels later
    for f in fields(RunConfig):
        if f.metadata["minimum"] is not None:
            none_ok = "None" in str(f.type)
            _check_count(f.name, getattr(cfg, f.name), f.metadata["flag"], f.metadata["minimum"], none_ok)
    return budget


def _check_out_dir(out: Path) -> None:
    """Refuse an --out that is a file or cannot be written, without creating anything."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file", "pass a directory (it is created if missing)")
    if out.is_dir():
        check_output_file(out / "stages.json", "--out", suffix=".json")
        return
    parent = next(p for p in out.absolute().parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(
            f"cannot create output directory {out} ({parent} is not a writable directory)",
            "choose a writable --out",
        )


# -- the run context ----------------------------------------------------------------------------------------
@dataclass
class RunContext:
    """What every stage reads: the settings, the float model and the draws of its data
    (:class:`~aq_brevitas.rundata.RunInputs`), the run folder and its stage log."""

    cfg: RunConfig
    out: Path
    name: str
    model: nn.Module
    budget: Budget
    data: RunInputs
    geometry: dict[str, Any]
    log: StageLog
    progress: bool
    identity: dict[str, Any]  # the float model's digest, the seed and the normalisation

    @property
    def eval_eps(self) -> tuple[float, ...]:
        return tuple(sorted({*map(float, self.cfg.eval_eps), float(self.cfg.eps)}))

    def reading(self, *parts: str) -> dict[str, Any]:
        """The identity plus the digest of each data ``part`` a stage reads ("calib", "test"...)."""
        return {**self.identity, **{f"data:{p}": self.data.digests[p] for p in parts}}

    @property
    def selection(self) -> dict[str, Any]:
        return {**self.reading("calib"), "calib_images": self.cfg.calib_images}

    @property
    def normalization(self) -> Any:
        return self.cfg.normalization

    @cached_property
    def policies(self) -> dict[str, LayerwisePolicy]:
        """The searched and the uniform policy, as the search stage wrote them."""
        from .policy import LayerwisePolicy

        return {v.key: LayerwisePolicy.load(self.out / v.policy_file) for v in VARIANTS}

    def quantized(self, variant: Variant, stage: str) -> nn.Module:
        """The ``stage`` checkpoint ("ptq" or "finetuned") of ``variant``, rebuilt on the float model."""
        from .convert import load_quantized

        return load_quantized(self.out / variant.checkpoint(stage)[0], float_model=self.model)[0]

    def checkpoint_files(self, stage: str) -> dict[str, str]:
        """Every policy file and every ``stage`` checkpoint, as stage inputs."""
        names = [v.policy_file for v in VARIANTS] + [f for v in VARIANTS for f in v.checkpoint(stage)]
        return self.log.files(*names)


def _context(
    model: nn.Module | str, out: Path, cfg: RunConfig, data: Any, force: bool, progress: bool
) -> RunContext:
    """Check everything, load the model and the data; only then create ``out``."""
    from torch import nn

    from .models import load_float_model
    from .nnutils import layer_geometry

    budget = check_config(cfg)
    _check_out_dir(out)
    if isinstance(model, str):
        float_model, name = load_float_model(model)[0], model
    elif isinstance(model, nn.Module):
        float_model, name = model, type(model).__name__  # in eval mode: run() holds it there
    else:
        raise ModelError(
            f"model is a {type(model).__name__}", "pass an nn.Module, a zoo name or a float checkpoint path"
        )
    inputs = prepare_data(float_model, data, cfg)
    geometry = layer_geometry(float_model, inputs.calib[0][:1])
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create output directory {out} ({exc.strerror})", "choose a writable --out"
        ) from None
    identity = {"model": model_digest(float_model), "seed": cfg.seed, "normalization": cfg.normalization}
    return RunContext(
        cfg, out, name, float_model, budget, inputs, geometry, StageLog(out, force), progress, identity
    )


# -- the stages ----------------------------------------------------------------------------------------------
def score(ctx: RunContext) -> None:
    """Per-layer Lipschitz scores of the float model on the calibration images: scores.json, scores.png."""
    outputs = ["scores.json", "scores.png"]
    if not ctx.log.start("score", ctx.selection, outputs):
        return
    from tqdm.auto import tqdm

    from .attacks import normalized_inputs
    from .lipschitz import lipschitz_scores
    from .plots import plot_layer_scores

    with tqdm(total=2, desc="score", disable=not ctx.progress, leave=False) as bar:
        with normalized_inputs(ctx.model, ctx.normalization):
            scores = lipschitz_scores(ctx.model, ctx.data.calib[0], seed=ctx.cfg.seed)
        bar.update()
        atomic_write_json(ctx.out / "scores.json", {n: s.to_dict() for n, s in scores.items()})
        plot_layer_scores(scores, ctx.out / "scores.png")
        bar.update()
    ctx.log.finish("score")


def search(ctx: RunContext) -> None:
    """The searched policy and the best uniform one of the same budget (policy.json,
    policy_uniform.json) and the policy chart (policy.png)."""
    cfg = ctx.cfg
    inputs = {**ctx.selection, **ctx.reading("held_out"), "budget": cfg.budget, "eps": cfg.eps,
              "method": cfg.method, "val_images": cfg.val_images, "target": cfg.target}  # fmt: skip
    if not ctx.log.start("search", inputs, [v.policy_file for v in VARIANTS] + ["policy.png"]):
        return
    from .plots import plot_policy
    from .policy import LayerwisePolicy
    from .search import SearchConfig, search_policy

    config = SearchConfig(
        method=cfg.method,
        eps=cfg.eps,
        seed=cfg.seed,
        val_images=cfg.val_images,
        normalization=ctx.normalization,
        target=cfg.target,
    )
    result = search_policy(
        ctx.model,
        ctx.data.calib,
        ctx.budget,
        config=config,
        val_data=ctx.data.held_out,
        progress=ctx.progress,
    )
    result.policy.save(ctx.out / "policy.json")
    assert result.validation is not None  # held-out data was given
    uniform = LayerwisePolicy.uniform(
        ctx.geometry, result.validation.uniform_spec, method="uniform", budget=ctx.budget.to_dict()
    )
    uniform.save(ctx.out / "policy_uniform.json")
    title = f"{cfg.method} policy at {cfg.budget} (kept: {result.winner})"
    plot_policy(result.policy, ctx.geometry, ctx.out / "policy.png", title)
    ctx.log.finish("search")


def quantize(ctx: RunContext) -> None:
    """Both policies applied to the float model and calibrated: {searched,uniform}_ptq.pt (+ sidecars)."""
    inputs = ctx.selection | ctx.log.files(*(v.policy_file for v in VARIANTS))
    if not ctx.log.start("quantize", inputs, [f for v in VARIANTS for f in v.checkpoint("ptq")]):
        return
    from tqdm.auto import tqdm

    from . import convert
    from .attacks import normalized_inputs

    for v in tqdm(VARIANTS, desc="quantize+calibrate", disable=not ctx.progress, leave=False):
        with normalized_inputs(ctx.model, ctx.normalization):  # calibrate on what the model is fed
            q = convert.quantize(
                ctx.model, ctx.policies[v.key], calibration_data=ctx.data.calib[0], target=ctx.cfg.target
            )
        convert.save_quantized(q, ctx.out / v.checkpoint("ptq")[0])  # weights only: no input hook
    ctx.log.finish("quantize")


def finetune(ctx: RunContext) -> None:
    """PGD fine-tuning of both quantized models: {searched,uniform}_finetuned.pt (+ sidecars). An
    interrupted fine-tuning with the same inputs resumes from its last finished epoch."""
    cfg = ctx.cfg
    inputs = {**ctx.reading("train"), "eps": cfg.eps, "finetune_images": cfg.finetune_images,
              "finetune_epochs": cfg.finetune_epochs, "finetune_steps": cfg.finetune_steps}  # fmt: skip
    outputs = [f for v in VARIANTS for f in v.checkpoint("finetuned")]
    if not ctx.log.start("finetune", inputs | ctx.checkpoint_files("ptq"), outputs):
        return
    from .config import TrainConfig
    from .convert import save_quantized
    from .finetune import adversarial_finetune  # looked up now: tests replace it

    states = [ctx.out / f"{v.stem}_finetune_state{s}" for v in VARIANTS for s in (".pt", ".json")]
    resume = ctx.log.interrupted
    if resume:
        print("[finetune] resuming the interrupted fine-tuning (same settings)", flush=True)
    else:  # another policy or setting, or --force: an old epoch state must not leak in
        for p in states:
            p.unlink(missing_ok=True)
    train = ctx.data.train
    settings = TrainConfig.finetuning(
        eps=cfg.eps, steps=cfg.finetune_steps, epochs=cfg.finetune_epochs, seed=cfg.seed,
        normalization=ctx.normalization,
    )  # fmt: skip
    for v in VARIANTS:
        q = ctx.quantized(v, "ptq")
        state = ctx.out / f"{v.stem}_finetune_state.pt"
        adversarial_finetune(q, train, settings, checkpoint=state, resume=resume, progress=ctx.progress)
        save_quantized(q, ctx.out / v.checkpoint("finetuned")[0])
    for p in states:  # both models are saved; the epoch states are spent
        p.unlink(missing_ok=True)
    ctx.log.finish("finetune")


def _eval_plan(ctx: RunContext) -> list[tuple[str, tuple[float, ...], int]]:
    """The evaluate stage's reports: ``(file suffix, radii, test images)``. The headline radius on every
    test image; with ``eval_eps_images`` below that, the radii of ``eval_eps`` (the headline one included,
    so the ε curve is on one image set) on that many images, in ``robustness_<model>_eps.json``."""
    n_test, n_eps = len(ctx.data.test[1]), ctx.cfg.eval_eps_images
    if n_eps is None or n_eps >= n_test or ctx.eval_eps == (float(ctx.cfg.eps),):
        return [("", ctx.eval_eps, n_test)]
    return [("", (float(ctx.cfg.eps),), n_test), ("_eps", ctx.eval_eps, n_eps)]


def evaluate(ctx: RunContext) -> None:
    """Robustness reports of the float and both fine-tuned models on the test images:
    robustness_{float,searched,uniform}.json at ``eps`` (plus ``_eps.json`` at every radius on fewer
    images, see :func:`_eval_plan`) and the searched model's robustness.png."""
    cfg = ctx.cfg
    plan = _eval_plan(ctx)
    inputs = {**ctx.reading("test"), "test_images": cfg.test_images, "pgd_steps": cfg.pgd_steps,
              "plan": plan, "suite": _suite_settings()} | ctx.checkpoint_files("finetuned")  # fmt: skip
    stems = ("float", *(v.stem for v in VARIANTS))
    outputs = [f"robustness_{s}{suffix}.json" for suffix, _, _ in plan for s in stems] + ["robustness.png"]
    if not ctx.log.start("evaluate", inputs, outputs):
        return
    from tqdm.auto import tqdm

    from .config import EvalConfig
    from .evaluate import evaluate_robustness
    from .report import RobustnessReport
    from .workers import run_jobs

    float_model = copy.deepcopy(ctx.model)
    models = [("float", "float", float_model)]
    models += [(v.key, v.stem, ctx.quantized(v, "finetuned")) for v in VARIANTS]
    for stem in stems:  # a report of an earlier plan must not reach this run's report
        (ctx.out / f"robustness_{stem}_eps.json").unlink(missing_ok=True)
    jobs = [(suffix, eps, n, model) for suffix, eps, n in plan for model in models]
    x, y = ctx.data.test
    parallel = cfg.workers > 1

    def job(i: int) -> None:
        suffix, eps, n, (key, stem, m) = jobs[i]
        settings = EvalConfig(
            eps=eps, pgd_steps=cfg.pgd_steps, seed=cfg.seed, normalization=ctx.normalization
        )
        surrogate = None if m is float_model else float_model  # quantized models: also transfer from float
        robustness = evaluate_robustness(
            m, (x[:n], y[:n]), settings, name=key, progress=ctx.progress and not parallel, surrogate=surrogate
        )
        robustness.save(ctx.out / f"robustness_{stem}{suffix}.json")

    longest_first = sorted(range(len(jobs)), key=lambda i: -jobs[i][2] * len(jobs[i][1]))
    with tqdm(
        total=len(jobs), desc=f"evaluate ({cfg.workers} workers)", disable=not (ctx.progress and parallel)
    ) as bar:
        run_jobs(job, len(jobs), cfg.workers, order=longest_first, done=lambda _: bar.update())
    curve = ctx.out / f"robustness_searched{plan[-1][0]}.json"
    RobustnessReport.load(curve).plot(ctx.out / "robustness.png")
    ctx.log.finish("evaluate")


def _suite_settings() -> dict[str, Any]:
    """The evaluation's attack-suite defaults, part of the evaluate stage's record (a new suite redoes it)."""
    from .config import EvalConfig

    ev = EvalConfig()
    return {
        "suite": ev.suite,
        "steps": ev.suite_steps,
        "queries": ev.suite_queries,
        "indicators": ev.indicators,
    }


def export(ctx: RunContext) -> None:
    """QONNX of both fine-tuned models (model.onnx, model_uniform.onnx), each parity-checked on test
    images, with its :class:`~aq_brevitas.export.ExportResult` (export.json, export_uniform.json).
    The ONNX graph is the model's own: with ``normalization`` it takes normalised inputs, and its
    example and parity inputs are the test images normalised."""
    inputs = {**ctx.reading("test"), "test_images": ctx.cfg.test_images, "target": ctx.cfg.target}
    inputs |= ctx.checkpoint_files("finetuned")
    if not ctx.log.start("export", inputs, [f for v in VARIANTS for f in v.export_files]):
        return
    from tqdm.auto import tqdm

    from .attacks import normalize
    from .export import export_qonnx, finn_available, finn_check

    x = ctx.data.test[0][:9]
    x = x if ctx.normalization is None else normalize(x, ctx.normalization)
    for v in tqdm(VARIANTS, desc="export", disable=not ctx.progress, leave=False):
        onnx_name, json_name = v.export_files
        q = ctx.quantized(v, "finetuned")
        record = export_qonnx(q, ctx.out / onnx_name, x[:1], images=x[1:9]).to_dict()
        if (
            ctx.cfg.target == "finn"
        ):  # FINN's own front end and its estimates (static checks without finn-plus)
            finn = finn_check(ctx.out / onnx_name, model=q, run_finn=finn_available(), progress=ctx.progress)
            finn.write(ctx.out / f"finn{v.suffix}")
            record["finn"] = finn.to_dict()
        atomic_write_json(ctx.out / json_name, record)
    ctx.log.finish("export")


def run(
    model: nn.Module | str,
    out: str | os.PathLike[str],
    config: RunConfig | None = None,
    *,
    data: RunData | str | os.PathLike[str] | None = None,
    force: bool = False,
    progress: bool = True,
) -> RunResult:
    """Run (or resume) the whole job for ``model`` (an nn.Module, a zoo name or a float checkpoint).

    ``data``: the model's own data, a :class:`~aq_brevitas.rundata.RunData` (``train``, ``test`` and
    optionally ``held_out``: ``(x, y)`` tensors, Datasets or DataLoaders of any sample shape, values
    in [0, 1]) or a directory of IDX files; None reads ``config.data_dir`` (Fashion-MNIST by default).
    Every stage reads it in the model's input shape: scores, the search's calibration and held-out
    comparison (from the held-out data, else from the training data; never the test data), fine-tuning
    (the training data), evaluation and the export (the test data). A model that expects normalised
    inputs gets ``config.normalization=(mean, std)``; ε stays in [0, 1] input space.

    Every setting, the model and the data are checked before ``out`` is touched, so a bad setting
    (:class:`ConfigError`, :class:`~aq_brevitas.errors.PolicyError` for the budget), a bad model
    (:class:`ModelError`, :class:`~aq_brevitas.errors.CheckpointError`: also a forward that refuses
    the data, or a model with several inputs), or bad data (:class:`ConfigError` for its kind,
    lengths or range; :class:`~aq_brevitas.errors.DataError` for missing files, samples of different
    shapes, labels beyond the model's classes) costs nothing and leaves an existing run folder as it
    was. Re-running with the same ``out`` skips the stages whose settings, inputs and outputs are
    unchanged (see the module docstring); ``force=True`` redoes every stage, fine-tuning included,
    from scratch. Returns the :class:`RunResult`; ``out/report.md`` and ``out/report.json`` hold the
    full report.

    >>> import torch
    >>> from torch import nn
    >>> from aq_brevitas.pipeline import RunConfig, RunData, run
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14, 3))
    >>> x, y = torch.rand(40, 2, 16), torch.randint(0, 3, (40,))  # 40 signals of 2×16, 3 classes
    >>> tiny = RunConfig(calib_images=4, val_images=4, finetune_images=8, finetune_steps=1,
    ...                  test_images=4, pgd_steps=1, eval_eps=(0.1,))
    >>> data = RunData(train=(x[:32], y[:32]), test=(x[32:], y[32:]))
    >>> result = run(model, "signals", tiny, data=data, progress=False)
    [score] ...
    [search] ...
    [quantize] ...
    [finetune] ...
    [evaluate] ...
    [export] ...
    [report] ...
    >>> [row["name"] for row in result.rows]
    ['float', 'uniform (avg-bits=3)', 'aq-brevitas (avg-bits=3)']
    """
    from contextlib import nullcontext

    from torch import nn

    from .nnutils import eval_mode

    t_start = time.perf_counter()
    # The user's model is run in eval mode and given back in the mode(s) it came in.
    with eval_mode(model) if isinstance(model, nn.Module) else nullcontext():
        ctx = _context(model, Path(out), config or RunConfig(), data, force, progress)
        for stage in (score, search, quantize, finetune, evaluate, export):
            stage(ctx)
        result = RunResult(str(ctx.out), summary_rows(ctx))
        report(ctx, result.rows)
    # Written last, so a run that fails leaves the previous run's config.json in place.
    atomic_write_json(ctx.out / "config.json", {"model": ctx.name, **asdict(ctx.cfg)})
    result.skipped = ctx.log.skipped
    result.seconds = time.perf_counter() - t_start
    return result
