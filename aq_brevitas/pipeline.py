"""The whole job as resumable stages: score → search → quantize → fine-tune → evaluate → export → report.

Each stage writes its outputs atomically into ``out/`` and records itself in ``out/stages.json``; a
stage whose record and outputs exist is skipped on the next run (``force=True`` redoes everything).
The same stages run for the searched policy and for the best uniform policy of the same budget, so
the report compares them on the same data.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .storage import atomic_write_json, atomic_write_text, load_checkpoint, read_json, save_checkpoint

STAGES = ("score", "search", "quantize", "finetune", "evaluate", "export", "report")


@dataclass
class RunConfig:
    """Settings of one pipeline run (all JSON-serialisable)."""

    budget: str = "avg-bits=3"
    eps: float = 0.1
    method: str = "lipschitz"
    calib_images: int = 256
    val_images: int = 500
    finetune_images: int | None = 4096
    finetune_epochs: int = 1
    finetune_steps: int = 7
    test_images: int | None = 2000
    pgd_steps: int = 20
    eval_eps: tuple[float, ...] = (0.05, 0.1, 0.2)
    seed: int = 0
    data_dir: str | None = None


@dataclass
class RunResult:
    out: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary_table(self) -> str:
        head = (
            f"{'model':<22} {'avg bits':>8} {'weight KiB':>10} {'clean':>7} {'PGD':>7} {'export parity':>14}"
        )
        lines = [head, "-" * len(head)]
        for r in self.rows:
            parity = "-" if r.get("parity") is None else f"{r['parity']:.1e}"
            lines.append(
                f"{r['name']:<22} {r['avg_bits']:>8.2f} {r['kib']:>10.1f} {r['clean']:>7.4f} {r['pgd']:>7.4f} {parity:>14}"
            )
        return "\n".join(lines)


class _Stages:
    """Bookkeeping: which stages are done, skipping them, recording them."""

    def __init__(self, out: Path, force: bool) -> None:
        self.out, self.manifest = out, out / "stages.json"
        self.done: dict[str, Any] = (
            {} if force or not self.manifest.is_file() else read_json(self.manifest, "stage manifest")
        )
        self.skipped: list[str] = []

    def run(self, name: str, outputs: list[str], fn: Callable[[], Any]) -> Any:
        if name in self.done and all((self.out / o).exists() for o in outputs):
            self.skipped.append(name)
            print(f"[{name}] done already ({', '.join(outputs)}); skipping", flush=True)
            return self.done[name].get("value")
        print(f"[{name}] ...", flush=True)
        t0 = time.perf_counter()
        value = fn()
        self.done[name] = {"seconds": time.perf_counter() - t0, "outputs": outputs, "value": value}
        atomic_write_json(self.manifest, self.done)
        return value


def _load_state(model: nn.Module, path: Path) -> nn.Module:
    import brevitas.config

    state = load_checkpoint(path)
    old = brevitas.config.IGNORE_MISSING_KEYS
    brevitas.config.IGNORE_MISSING_KEYS = True
    try:
        model.load_state_dict(state["state_dict"])
    finally:
        brevitas.config.IGNORE_MISSING_KEYS = old
    return model.eval()


def run(
    model: nn.Module | str,
    out: str | Path,
    config: RunConfig | None = None,
    *,
    force: bool = False,
    progress: bool = True,
) -> RunResult:
    """Run (or resume) the whole job for ``model`` (an nn.Module, a zoo name or a float checkpoint)."""
    from .convert import quantize
    from .data import load_split
    from .evaluate import RobustnessReport, evaluate_robustness
    from .export import export_qonnx
    from .finetune import adversarial_finetune
    from .layers import layer_geometry
    from .lipschitz import lipschitz_scores
    from .models import load_float_model
    from .plots import plot_layer_scores, plot_policy
    from .policy import Budget, LayerSpec, LayerwisePolicy
    from .search import search_policy

    cfg = config or RunConfig()
    t_start = time.perf_counter()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file", "pass a directory (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create output directory {out} ({exc.strerror})", "choose a writable --out"
        ) from None
    budget = Budget.parse(cfg.budget)
    name = model if isinstance(model, str) else type(model).__name__
    float_model = load_float_model(model)[0] if isinstance(model, str) else model.eval()
    stages = _Stages(out, force)
    atomic_write_json(out / "config.json", {"model": name, **asdict(cfg)})

    vx, vy = load_split("val", cfg.data_dir)
    perm = torch.randperm(len(vy), generator=torch.Generator().manual_seed(cfg.seed))
    calib = (vx[perm[: cfg.calib_images]], vy[perm[: cfg.calib_images]])
    held_out = (
        vx[perm[cfg.calib_images : cfg.calib_images + cfg.val_images]],
        vy[perm[cfg.calib_images : cfg.calib_images + cfg.val_images]],
    )
    test = load_split("test", cfg.data_dir, limit=cfg.test_images, seed=cfg.seed)
    geometry = layer_geometry(float_model, calib[0][:1])

    def score() -> None:
        scores = lipschitz_scores(float_model, calib[0], seed=cfg.seed)
        atomic_write_json(out / "scores.json", {n: s.to_dict() for n, s in scores.items()})
        plot_layer_scores(scores, out / "scores.png")

    stages.run("score", ["scores.json", "scores.png"], score)

    def search() -> None:
        policy = search_policy(
            float_model,
            calib,
            budget=budget,
            method=cfg.method,
            eps=cfg.eps,
            val_data=held_out,
            val_images=cfg.val_images,
            seed=cfg.seed,
            progress=progress,
        )
        policy.save(out / "policy.json")
        v = policy.meta["validation"]
        uniform = LayerwisePolicy.uniform(
            geometry, LayerSpec.from_dict(v["uniform_spec"]), method="uniform", budget=budget.to_dict()
        )
        uniform.save(out / "policy_uniform.json")
        names = list(geometry)
        specs = [policy.spec_for(n) for n in names]
        plot_policy(
            names,
            [s.weight_bit_width for s in specs],
            [f"{s.scaling} {'pc' if s.granularity == 'per_channel' else 'pt'}" for s in specs],
            [geometry[n].params for n in names],
            out / "policy.png",
            title=f"{cfg.method} policy at {cfg.budget} (kept: {policy.meta['winner']})",
        )

    stages.run("search", ["policy.json", "policy_uniform.json", "policy.png"], search)
    policies = {
        "aq-brevitas": LayerwisePolicy.load(out / "policy.json"),
        "uniform": LayerwisePolicy.load(out / "policy_uniform.json"),
    }
    files = {"aq-brevitas": "searched", "uniform": "uniform"}

    def quantize_all() -> None:
        for key, pol in policies.items():
            q = quantize(float_model, pol, calibration_data=calib[0])
            save_checkpoint(out / f"{files[key]}_ptq.pt", {"state_dict": q.state_dict()})

    stages.run("quantize", [f"{f}_ptq.pt" for f in files.values()], quantize_all)

    def quantized(key: str, stage: str) -> nn.Module:
        return _load_state(quantize(float_model, policies[key]), out / f"{files[key]}_{stage}.pt")

    def finetune_all() -> None:
        train = load_split("train", cfg.data_dir, limit=cfg.finetune_images, seed=cfg.seed)
        for key in policies:
            q = quantized(key, "ptq")
            adversarial_finetune(
                q,
                train,
                eps=cfg.eps,
                steps=cfg.finetune_steps,
                epochs=cfg.finetune_epochs,
                seed=cfg.seed,
                checkpoint=out / f"{files[key]}_finetune_state.pt",
                resume=True,
                progress=progress,
            )
            save_checkpoint(out / f"{files[key]}_finetuned.pt", {"state_dict": q.state_dict()})

    stages.run("finetune", [f"{f}_finetuned.pt" for f in files.values()], finetune_all)

    def evaluate_all() -> None:
        models = {"float": copy.deepcopy(float_model)} | {k: quantized(k, "finetuned") for k in policies}
        for key, m in models.items():
            report = evaluate_robustness(
                m, test, eps=cfg.eval_eps, pgd_steps=cfg.pgd_steps, seed=cfg.seed, name=key, progress=progress
            )
            report.save(out / f"robustness_{files.get(key, key)}.json")
        RobustnessReport.load(out / "robustness_searched.json").plot(out / "robustness.png")

    stages.run(
        "evaluate",
        [f"robustness_{f}.json" for f in ("float", *files.values())] + ["robustness.png"],
        evaluate_all,
    )

    def export() -> float:
        q = quantized("aq-brevitas", "finetuned")
        res = export_qonnx(q, out / "model.onnx", test[0][:1], images=test[0][1:9])
        atomic_write_json(out / "export.json", res.to_dict())
        return res.max_abs_diff

    stages.run("export", ["model.onnx", "export.json"], export)

    result = RunResult(str(out))
    for key, label in (("float", "float"), ("uniform", "uniform"), ("aq-brevitas", "aq-brevitas")):
        rep = RobustnessReport.load(out / f"robustness_{files.get(key, key)}.json")
        cost = policies[key].cost(geometry) if key in policies else None
        result.rows.append({
            "name": label if key == "float" else f"{label} ({cfg.budget})",
            "avg_bits": cost.avg_weight_bits if cost else 32.0,
            "kib": (cost.weight_bytes if cost else 4 * sum(g.params for g in geometry.values())) / 1024,
            "clean": rep.clean_accuracy,
            "pgd": rep.accuracy("pgd", cfg.eps),
            "parity": read_json(out / "export.json")["max_abs_diff"] if key == "aq-brevitas" else None,
            "masking_suspected": rep.masking_suspected,
        })  # fmt: skip

    def report() -> None:
        from .plots import plot_comparison

        plot_comparison(
            result.rows,
            out / "comparison.png",
            title=f"{name}: {cfg.budget}, PGD-{cfg.pgd_steps} at ε={cfg.eps}",
        )
        atomic_write_json(
            out / "report.json",
            {
                "model": name,
                "config": asdict(cfg),
                "rows": result.rows,
                "policy": policies["aq-brevitas"].to_dict(),
            },
        )
        atomic_write_text(
            out / "report.md", _markdown(name, cfg, result, policies["aq-brevitas"], len(test[1]), out)
        )

    stages.run("report", ["report.md", "report.json", "comparison.png"], report)
    result.skipped = stages.skipped
    result.seconds = time.perf_counter() - t_start
    return result


def _markdown(name: str, cfg: RunConfig, result: RunResult, policy: Any, n_test: int, out: Path) -> str:
    from .evaluate import RobustnessReport

    meta = policy.meta
    v = meta.get("validation") or {}
    lines = [
        f"# aq-brevitas run: `{name}` at {cfg.budget}, ε = {cfg.eps}",
        "",
        f"Selection used {cfg.calib_images} held-out training images (scores) and {cfg.val_images} others (the",
        "never-worse-than-uniform check); fine-tuning used "
        + (
            f"a {cfg.finetune_images}-image subset of the training split"
            if cfg.finetune_images
            else "the training split"
        )
        + f" for {cfg.finetune_epochs} epoch(s) of PGD-{cfg.finetune_steps}; accuracy is on {n_test} test images, PGD-{cfg.pgd_steps}.",
        "",
        "## Summary",
        "",
        "| model | avg weight bits | weight KiB | clean | PGD | export parity |",
        "|---|---|---|---|---|---|",
    ]
    for r in result.rows:
        parity = "-" if r.get("parity") is None else f"{r['parity']:.1e}"
        lines.append(
            f"| {r['name']} | {r['avg_bits']:.2f} | {r['kib']:.1f} | {100 * r['clean']:.1f} | {100 * r['pgd']:.1f} | {parity} |"
        )
    lines += [
        "",
        "![comparison](comparison.png)",
        "",
        f"## Policy ({meta.get('method')}, kept: **{meta.get('winner')}**)",
        "",
        "```",
        str(policy),
        "```",
        "",
        f"Held-out PGD accuracy: searched {v.get('search_pgd_accuracy')}, unrefined knapsack {v.get('unrefined_pgd_accuracy')}, best uniform {v.get('uniform_pgd_accuracy')} ({v.get('images')} images).",
        "",
        "![policy](policy.png) ![scores](scores.png)",
        "",
        "## Robustness of the fine-tuned aq-brevitas model",
        "",
        RobustnessReport.load(out / "robustness_searched.json").to_markdown(),
        "",
        "![robustness](robustness.png)",
        "",
    ]
    return "\n".join(lines)
