"""The stages of :func:`~aq_brevitas.run`, one function each, over a shared :class:`~aq_brevitas.pipeline.context.RunContext`."""

from __future__ import annotations

import copy
from typing import Any

from ..storage import atomic_write_json
from .context import VARIANTS, RunContext


# -- the stages ----------------------------------------------------------------------------------------------
def score(ctx: RunContext) -> None:
    """Per-layer Lipschitz scores of the float model on the calibration images: scores.json, scores.png."""
    outputs = ["scores.json", "scores.png"]
    if not ctx.log.start("score", ctx.selection, outputs):
        return
    from tqdm.auto import tqdm

    from ..attacks import normalized_inputs
    from ..plots import plot_layer_scores
    from ..score.lipschitz import lipschitz_scores

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
    from ..plots import plot_policy
    from ..policy import LayerwisePolicy
    from ..search import SearchConfig, search_policy

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
        cache_dir=ctx.out / "cache",  # a redone search re-measures no held-out candidate it measured
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

    from ..attacks import normalized_inputs
    from ..quantization import checkpoint, convert

    for v in tqdm(VARIANTS, desc="quantize+calibrate", disable=not ctx.progress, leave=False):
        with normalized_inputs(ctx.model, ctx.normalization):  # calibrate on what the model is fed
            q = convert.quantize(
                ctx.model, ctx.policies[v.key], calibration_data=ctx.data.calib[0], target=ctx.cfg.target
            )
        checkpoint.save_quantized(q, ctx.out / v.checkpoint("ptq")[0])  # weights only: no input hook
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
    from ..config import TrainConfig
    from ..quantization.checkpoint import save_quantized
    from ..train.training import adversarial_train

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
        adversarial_train(q, train, settings, checkpoint=state, resume=resume, progress=ctx.progress)
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

    from ..config import EvalConfig
    from ..evaluate.report import RobustnessReport
    from ..evaluate.robustness import evaluate_robustness
    from ..workers import run_jobs

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
            m, (x[:n], y[:n]), config=settings, name=key, progress=ctx.progress and not parallel,
            surrogate=surrogate,
        )  # fmt: skip
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
    from ..config import EvalConfig

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

    from ..attacks import normalize
    from ..export import export_qonnx, finn_available, finn_check

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
