"""The whole job as resumable stages: score → search → quantize → fine-tune → evaluate → export → report.

Each stage writes its outputs atomically into ``out/`` and records in ``out/stages.json`` the settings
and input files it used plus a digest of each output. The next run skips a stage only when its
recorded settings and inputs are the current ones and its outputs are still byte-identical; otherwise
it says why and redoes it (a redone stage rewrites its outputs, so the stages that read them are redone
too). ``force=True`` redoes everything. The same stages run for the searched policy and for the best
uniform policy of the same budget, so the report compares them on the same data.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .data import selection_data
from .errors import ConfigError, ModelError
from .search.config import SCORED_METHODS
from .storage import (
    atomic_write_json,
    atomic_write_text,
    check_output_file,
    load_checkpoint,
    read_json,
    save_checkpoint,
)

if TYPE_CHECKING:
    from .policy import Budget

STAGES = ("score", "search", "quantize", "finetune", "evaluate", "export", "report")
RUN_METHODS = SCORED_METHODS  # the run compares against uniform itself, so every scored method
# RunConfig field -> the `aq-brevitas run` option that sets it (0 means "all" where None is allowed).
_FLAGS = {
    "calib_images": "--calib",
    "val_images": "--val-images",
    "finetune_images": "--finetune-images",
    "finetune_epochs": "--epochs",
    "finetune_steps": "--finetune-steps",
    "test_images": "--test-images",
    "pgd_steps": "--steps",
    "seed": "--seed",
}
_FILES = {"aq-brevitas": "searched", "uniform": "uniform"}  # policy key -> file stem


@dataclass
class RunConfig:
    """Settings of one pipeline run (all JSON-serialisable); the CLI flags of ``aq-brevitas run``.

    Selection (scores, search, calibration) uses ``calib_images`` + ``val_images`` held-out training
    images; fine-tuning a ``finetune_images`` training subset (None = all); the report
    ``test_images`` test images (None = all). ``eps`` is also evaluated when ``eval_eps`` lacks it.
    """

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
    """What :func:`run` returns: the summary rows (float, uniform, aq-brevitas), skipped stages, wall time."""

    out: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary_table(self) -> str:
        """The rows as a plain-text table whose columns are as wide as their longest cell."""
        head = ("model", "avg bits", "weight KiB", "clean", "PGD", "export parity")
        cells = [
            (
                r["name"],
                f"{r['avg_bits']:.2f}",
                f"{r['kib']:.1f}",
                f"{r['clean']:.4f}",
                f"{r['pgd']:.4f}",
                "-" if r.get("parity") is None else f"{r['parity']:.1e}",
            )
            for r in self.rows
        ]
        widths = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]

        def line(c: tuple[str, ...]) -> str:
            return " ".join(
                [c[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(c[1:], widths[1:], strict=True)]
            )

        top = line(head)
        return "\n".join([top, "-" * len(top), *map(line, cells)])


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _model_digest(model: nn.Module) -> str:
    """Identity of a float model's weights, so a changed model (same name or not) redoes the stages."""
    h = hashlib.sha256(type(model).__name__.encode())
    for key, value in model.state_dict().items():
        h.update(key.encode())
        if torch.is_tensor(value):
            t = value.detach().cpu().contiguous().flatten()
            h.update(f"{t.dtype}{tuple(value.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _Stages:
    """Bookkeeping: which stages are done with which inputs, skipping them, recording them."""

    def __init__(self, out: Path, force: bool) -> None:
        self.out, self.manifest = out, out / "stages.json"
        self.done: dict[str, Any] = {} if force else self._read()
        self.skipped: list[str] = []
        self.interrupted = False  # the running stage was cut off last time with the same inputs

    def _read(self) -> dict[str, Any]:
        if not self.manifest.is_file():
            return {}
        try:
            done = read_json(self.manifest, "stage manifest")
        except ConfigError as exc:
            print(f"[run] {exc.problem}; redoing every stage", flush=True)
            return {}
        if not isinstance(done, dict) or not all(isinstance(r, dict) for r in done.values()):
            print(f"[run] stage manifest {self.manifest} is not a map of stage records; redoing every stage")
            return {}
        return done

    def files(self, *names: str) -> dict[str, str]:
        """Input files of a stage as ``{"file:name": digest}`` (they exist: an earlier stage wrote them)."""
        return {f"file:{n}": _file_digest(self.out / n) for n in names}

    def _why_redo(self, name: str, inputs: dict[str, Any], outputs: list[str]) -> str | None:
        rec = self.done.get(name)
        if rec is None:
            return "not done yet"
        old = rec.get("inputs")
        if not isinstance(old, dict):
            return "its record names no inputs"
        changed = [k for k in sorted(set(old) | set(inputs)) if old.get(k) != inputs.get(k)]
        if changed:
            files = [k[5:] for k in changed if k.startswith("file:")]
            parts = [
                "the model's weights"
                if k == "model"
                else f"{k} {_short(old.get(k))} -> {_short(inputs.get(k))}"
                for k in changed
                if not k.startswith("file:")
            ] + ([f"input file(s) {', '.join(files)}"] if files else [])
            return "changed: " + "; ".join(parts)
        if rec.get("status") != "done" or not isinstance(rec.get("outputs"), dict):
            return "it did not finish last time"
        for o in outputs:
            path = self.out / o
            if not path.is_file():
                return f"{o} is missing"
            if _file_digest(path) != rec["outputs"].get(o):
                return f"{o} changed or is corrupt since it was written"
        return None

    def run(self, name: str, inputs: dict[str, Any], outputs: list[str], fn: Callable[[], Any]) -> Any:
        inputs = json.loads(json.dumps(inputs))  # compare as stored (tuples become lists)
        reason = self._why_redo(name, inputs, outputs)
        if reason is None:
            self.skipped.append(name)
            print(f"[{name}] done already with these settings ({', '.join(outputs)}); skipping", flush=True)
            return self.done[name].get("value")
        prev = self.done.get(name) or {}
        self.interrupted = prev.get("status") == "running" and prev.get("inputs") == inputs
        print(f"[{name}] ..." if name not in self.done else f"[{name}] redoing: {reason}", flush=True)
        self.done[name] = {"status": "running", "inputs": inputs}
        atomic_write_json(self.manifest, self.done)
        t0 = time.perf_counter()
        value = fn()
        self.done[name] = {
            "status": "done",
            "inputs": inputs,
            "outputs": {o: _file_digest(self.out / o) for o in outputs},
            "seconds": time.perf_counter() - t0,
            "value": value,
        }
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


def _check_count(cfg: RunConfig, name: str, minimum: int, none_ok: bool = False) -> None:
    value = getattr(cfg, name)
    if value is None and none_ok:
        return
    flag = _FLAGS[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fix = f"pass {flag} N with N >= {minimum}" + (f" ({flag} 0 = all)" if none_ok else "")
        raise ConfigError(f"{flag} (RunConfig.{name}) must be an integer >= {minimum}, got {value!r}", fix)


def check_config(cfg: RunConfig) -> Budget:
    """Refuse a bad setting before any work or any file is written; returns the parsed Budget."""
    from .attacks import check_eps
    from .policy import Budget

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
    for name, minimum, none_ok in (
        ("calib_images", 1, False),
        ("val_images", 1, False),
        ("finetune_images", 1, True),
        ("finetune_epochs", 1, False),
        ("finetune_steps", 1, False),
        ("test_images", 2, True),  # one export input plus at least one parity image
        ("pgd_steps", 1, False),
        ("seed", 0, False),
    ):
        _check_count(cfg, name, minimum, none_ok)
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


def run(
    model: nn.Module | str,
    out: str | Path,
    config: RunConfig | None = None,
    *,
    force: bool = False,
    progress: bool = True,
) -> RunResult:
    """Run (or resume) the whole job for ``model`` (an nn.Module, a zoo name or a float checkpoint).

    Every setting, the model and the data are checked before ``out`` is touched, so a bad setting
    costs nothing and leaves an existing run folder as it was. Re-running with the same ``out``
    skips the stages whose settings, inputs and outputs are unchanged (see the module docstring);
    ``force=True`` redoes every stage, fine-tuning included, from scratch.
    """
    from tqdm.auto import tqdm

    from .convert import quantize
    from .data import load_split, resolve_data_dir
    from .evaluate import RobustnessReport, evaluate_robustness
    from .export import export_qonnx
    from .finetune import adversarial_finetune
    from .layers import layer_geometry
    from .lipschitz import lipschitz_scores
    from .models import load_float_model
    from .plots import plot_layer_scores, plot_policy
    from .policy import LayerwisePolicy
    from .search import search_policy

    cfg = config or RunConfig()
    t_start = time.perf_counter()
    budget = check_config(cfg)
    out = Path(out)
    _check_out_dir(out)
    if isinstance(model, str):
        float_model = load_float_model(model)[0]
        name = model
    elif isinstance(model, nn.Module):
        float_model, name = model.eval(), type(model).__name__
    else:
        raise ModelError(
            f"model is a {type(model).__name__}", "pass an nn.Module, a zoo name or a float checkpoint path"
        )
    calib, held_out = selection_data(cfg.calib_images, cfg.val_images, cfg.seed, cfg.data_dir)
    test = load_split("test", cfg.data_dir, limit=cfg.test_images, seed=cfg.seed)
    geometry = layer_geometry(float_model, calib[0][:1])
    eval_eps = tuple(sorted({*map(float, cfg.eval_eps), float(cfg.eps)}))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create output directory {out} ({exc.strerror})", "choose a writable --out"
        ) from None
    stages = _Stages(out, force)
    model_id = {"model": _model_digest(float_model)}
    # The directory actually read (AQ_DATA_DIR included), so pointing at other data redoes the stages.
    data = {"seed": cfg.seed, "data_dir": str(resolve_data_dir(cfg.data_dir).resolve())}
    selection = {**model_id, **data, "calib_images": cfg.calib_images}

    def score() -> None:
        with tqdm(total=2, desc="score", disable=not progress, leave=False) as bar:
            scores = lipschitz_scores(float_model, calib[0], seed=cfg.seed)
            bar.update()
            atomic_write_json(out / "scores.json", {n: s.to_dict() for n, s in scores.items()})
            plot_layer_scores(scores, out / "scores.png")
            bar.update()

    stages.run("score", selection, ["scores.json", "scores.png"], score)

    def search() -> None:
        result = search_policy(
            float_model,
            calib,
            budget,
            method=cfg.method,
            eps=cfg.eps,
            val_data=held_out,
            val_images=cfg.val_images,
            seed=cfg.seed,
            progress=progress,
        )
        policy = result.policy
        policy.save(out / "policy.json")
        assert result.validation is not None  # held-out data was given
        uniform = LayerwisePolicy.uniform(
            geometry, result.validation.uniform_spec, method="uniform", budget=budget.to_dict()
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
            title=f"{cfg.method} policy at {cfg.budget} (kept: {result.winner})",
        )

    search_inputs = {
        **selection,
        "budget": cfg.budget,
        "eps": cfg.eps,
        "method": cfg.method,
        "val_images": cfg.val_images,
    }
    stages.run("search", search_inputs, ["policy.json", "policy_uniform.json", "policy.png"], search)
    policy_files = [f"policy{'' if f == 'searched' else '_' + f}.json" for f in _FILES.values()]
    policies = {
        "aq-brevitas": LayerwisePolicy.load(out / "policy.json"),
        "uniform": LayerwisePolicy.load(out / "policy_uniform.json"),
    }

    def quantize_all() -> None:
        for key, pol in tqdm(policies.items(), desc="quantize+calibrate", disable=not progress, leave=False):
            q = quantize(float_model, pol, calibration_data=calib[0])
            save_checkpoint(out / f"{_FILES[key]}_ptq.pt", {"state_dict": q.state_dict()})

    stages.run(
        "quantize",
        {**selection, **stages.files(*policy_files)},
        [f"{f}_ptq.pt" for f in _FILES.values()],
        quantize_all,
    )

    def quantized(key: str, stage: str) -> nn.Module:
        return _load_state(quantize(float_model, policies[key]), out / f"{_FILES[key]}_{stage}.pt")

    def finetune_all() -> None:
        states = [out / f"{f}_finetune_state{s}" for f in _FILES.values() for s in (".pt", ".json")]
        resume = stages.interrupted
        if resume:
            print("[finetune] resuming the interrupted fine-tuning (same settings)", flush=True)
        else:  # another policy or setting, or --force: an old epoch state must not leak in
            for p in states:
                p.unlink(missing_ok=True)
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
                checkpoint=out / f"{_FILES[key]}_finetune_state.pt",
                resume=resume,
                progress=progress,
            )
            save_checkpoint(out / f"{_FILES[key]}_finetuned.pt", {"state_dict": q.state_dict()})
        for p in states:  # both models are saved; the epoch states are spent
            p.unlink(missing_ok=True)

    stages.run(
        "finetune",
        {
            **model_id,
            **data,
            "eps": cfg.eps,
            "finetune_images": cfg.finetune_images,
            "finetune_epochs": cfg.finetune_epochs,
            "finetune_steps": cfg.finetune_steps,
            **stages.files(*policy_files, *(f"{f}_ptq.pt" for f in _FILES.values())),
        },
        [f"{f}_finetuned.pt" for f in _FILES.values()],
        finetune_all,
    )
    finetuned = stages.files(*policy_files, *(f"{f}_finetuned.pt" for f in _FILES.values()))

    def evaluate_all() -> None:
        models = {"float": copy.deepcopy(float_model)} | {k: quantized(k, "finetuned") for k in policies}
        for key, m in models.items():
            report = evaluate_robustness(
                m, test, eps=eval_eps, pgd_steps=cfg.pgd_steps, seed=cfg.seed, name=key, progress=progress
            )
            report.save(out / f"robustness_{_FILES.get(key, key)}.json")
        RobustnessReport.load(out / "robustness_searched.json").plot(out / "robustness.png")

    stages.run(
        "evaluate",
        {**model_id, **data, "test_images": cfg.test_images, "pgd_steps": cfg.pgd_steps, "eval_eps": eval_eps}
        | finetuned,
        [f"robustness_{f}.json" for f in ("float", *_FILES.values())] + ["robustness.png"],
        evaluate_all,
    )
    onnx_files = {
        "aq-brevitas": ("model.onnx", "export.json"),
        "uniform": ("model_uniform.onnx", "export_uniform.json"),
    }

    def export() -> None:
        for key, (onnx_name, json_name) in tqdm(
            onnx_files.items(), desc="export", disable=not progress, leave=False
        ):
            q = quantized(key, "finetuned")
            res = export_qonnx(q, out / onnx_name, test[0][:1], images=test[0][1:9])
            atomic_write_json(out / json_name, res.to_dict())

    stages.run(
        "export",
        {**model_id, **data, "test_images": cfg.test_images} | finetuned,
        [f for pair in onnx_files.values() for f in pair],
        export,
    )

    result = RunResult(str(out))
    for key, label in (("float", "float"), ("uniform", "uniform"), ("aq-brevitas", "aq-brevitas")):
        rep = RobustnessReport.load(out / f"robustness_{_FILES.get(key, key)}.json")
        cost = policies[key].cost(geometry) if key in policies else None
        result.rows.append({
            "name": label if key == "float" else f"{label} ({cfg.budget})",
            "avg_bits": cost.avg_weight_bits if cost else 32.0,
            "kib": (cost.weight_bytes if cost else 4 * sum(g.params for g in geometry.values())) / 1024,
            "clean": rep.clean_accuracy,
            "pgd": rep.accuracy("pgd", cfg.eps),
            "parity": read_json(out / onnx_files[key][1])["max_abs_diff"] if key in onnx_files else None,
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

    upstream = [f"robustness_{f}.json" for f in ("float", *_FILES.values())]
    stages.run(
        "report",
        {**model_id, "name": name, **asdict(cfg)}
        | stages.files(*policy_files, *upstream, *(j for _, j in onnx_files.values())),
        ["report.md", "report.json", "comparison.png"],
        report,
    )
    # Written last, so a run that fails leaves the previous run's config.json in place.
    atomic_write_json(out / "config.json", {"model": name, **asdict(cfg)})
    result.skipped = stages.skipped
    result.seconds = time.perf_counter() - t_start
    return result


def _markdown(name: str, cfg: RunConfig, result: RunResult, policy: Any, n_test: int, out: Path) -> str:
    from .evaluate import RobustnessReport

    meta = policy.meta
    v = meta.get("validation") or {}
    measured = [
        f"{label} {v[key]:.3f}"
        for label, key in (
            ("searched", "search_pgd_accuracy"),
            ("unrefined knapsack", "unrefined_pgd_accuracy"),
            ("best uniform", "uniform_pgd_accuracy"),
        )
        if v.get(key) is not None
    ]
    held_out_line = (
        f"Held-out PGD accuracy: {', '.join(measured)} ({v.get('images')} images)."
        if measured
        else "No held-out comparison with uniform was made."
    )
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
        "Export parity is the largest |QONNX − PyTorch| logit difference over the exported model's check images.",
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
        held_out_line,
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
