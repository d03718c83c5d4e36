"""``aq-brevitas``: a thin argparse front end over the library.

The options come from the config dataclasses (:mod:`aq_brevitas.cli_options`), so each word means one
thing in every subcommand and the defaults are the API's; each ``cmd_*`` loads, calls the library and
prints. Heavy modules (torch, Brevitas, torchattacks) are imported inside the subcommand that needs
them, so ``aq-brevitas --help`` answers at once. Every :class:`~aq_brevitas.errors.AqError` becomes
one line on stderr and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .cli_options import (
    add_options,
    command_options,
    normalization_of,
    search_config,
    train_config,
    values_for,
)
from .config import EvalConfig, TrainConfig
from .errors import AqError, ModelError, PolicyError
from .pipeline import RunConfig
from .texttable import text_table

EXIT_USER_ERROR = 2

# The files each command writes: (argparse dest, option, example suffix). ``run --out`` is a directory
# and is checked by the pipeline. ``--plot`` paths also need an extension matplotlib can write.
OUTPUT_OPTIONS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "train": (("out", "--out", ".pt"),),
    "evaluate": (("report", "--report", ".json"), ("plot", "--plot", ".png")),
    "score": (("json", "--json", ".json"), ("plot", "--plot", ".png")),
    "quantize": (("out", "--out", ".pt"),),
    "finetune": (("out", "--out", ".pt"),),
    "export": (("out", "--out", ".onnx"),),
    "search": (("out", "--out", ".json"), ("plot", "--plot", ".png")),
}
# Commands whose --out is a prefix: they write OUT + each suffix.
OUTPUT_PREFIXES: dict[str, tuple[str, ...]] = {
    "study": (".json", ".md", ".png"),
    "validate-metric": (".json", ".png"),
    "pareto": (".json", ".md", ".png"),
}


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse unwritable output paths before any work, so a typo never costs a whole run."""
    from .storage import check_output_file, sidecar_path

    for dest, option, suffix in OUTPUT_OPTIONS.get(args.command, ()):
        path = getattr(args, dest, None)
        if path is None:
            continue
        if dest == "plot":
            from .plots import check_plot_path

            check_plot_path(path, option)
        else:
            check_output_file(path, option, suffix=suffix)
        if suffix == ".pt":  # checkpoints get a JSON sidecar beside them
            check_output_file(sidecar_path(path), f"{option} sidecar", suffix=".json", probe=False)
    prefix = getattr(args, "out", None) if args.command in OUTPUT_PREFIXES else None
    if prefix is not None:
        for suffix in OUTPUT_PREFIXES[args.command]:
            check_output_file(prefix + suffix, "--out", suffix=suffix)


def _setup_torch(args: argparse.Namespace) -> None:
    import warnings

    import torch

    # Known, harmless import-time warnings of Brevitas 0.13.4 (see docs/troubleshooting.md).
    warnings.filterwarnings("ignore", message="fast_hadamard_transform package not found")
    warnings.filterwarnings("ignore", message="brevitas.fx is deprecated")
    torch.set_num_threads(max(1, args.threads))
    # Adam + weight decay leave many weights denormal; without flushing, CPU convs run ~5x slower.
    torch.set_flush_denormal(True)


def _load_any_model(spec: str) -> tuple[Any, dict[str, Any]]:
    """A float zoo/checkpoint model, or a quantized checkpoint written by `aq-brevitas quantize`."""
    from .models import load_float_model, resolve_model_path
    from .storage import read_sidecar

    if read_sidecar(resolve_model_path(spec)).get("kind") == "brevitas":
        from .convert import load_quantized

        return load_quantized(resolve_model_path(spec))
    return load_float_model(spec)


QUANTIZE_FIRST = "quantize it first with `aq-brevitas quantize` (float models train with `aq-brevitas train`)"


def _load_quantized(spec: str) -> tuple[Any, dict[str, Any]]:
    """A quantized checkpoint; a float model is refused (finetune and export need quantizers)."""
    model, meta = _load_any_model(spec)
    if meta.get("kind") != "brevitas":
        raise ModelError(f"{spec} is a float model", QUANTIZE_FIRST)
    return model, meta


def _state_path(out: str) -> Any:
    from pathlib import Path

    return Path(out).with_name(Path(out).stem + ".train-state.pt")


def _history_table(history: Any) -> str:
    nan = float("nan")
    rows = [
        (e.epoch, f"{e.loss:.4f}", *(f"{nan if v is None else v:.4f}" for v in (e.clean_acc, e.adv_acc)),
         f"{e.seconds:.1f}")
        for e in history.epochs
    ]  # fmt: skip
    return text_table(("epoch", "loss", "clean acc", "adv acc", "seconds"), rows, left=0)


# -- the commands ---------------------------------------------------------------------------------------
def _train_meta(args: argparse.Namespace, cfg: TrainConfig) -> dict[str, Any]:
    """The sidecar of a trained model: where its data came from and how it was trained."""
    from .data import resolve_data_dir

    record = cfg.to_dict()
    record["attack_steps"] = record.pop("steps") if cfg.eps > 0 else 0
    n = args.train_images
    return {
        "arch": args.arch,
        "dataset": resolve_data_dir(args.data_dir).name,
        "train_split": "train" if n is None else f"train[limit={n}, seed={cfg.seed}]",
        **record,
        "command": "aq-brevitas " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("aq-brevitas") else None,
    }


def _final_measurement(model: Any, args: argparse.Namespace, cfg: TrainConfig) -> dict[str, Any]:
    """Clean and PGD accuracy of a trained model on the test split, as its sidecar records them."""
    from .data import load_split
    from .evaluate import accuracy, attack_accuracy

    x, y = load_split("test", args.data_dir, limit=args.test_images, seed=0)
    eps = args.eval_eps if args.eval_eps is not None else (cfg.eps if cfg.eps > 0 else 0.1)
    steps = args.pgd_steps
    return {
        "test_images": len(y),
        "clean_acc": round(accuracy(model, x, y), 4),
        "pgd_acc": round(attack_accuracy(model, x, y, "pgd", eps=eps, steps=steps, progress=True), 4),
        "pgd_eval": {"eps": eps, "steps": steps, "random_start": True, "alpha": f"2.5*eps/{steps}"},
    }


def cmd_train(args: argparse.Namespace) -> int:
    _setup_torch(args)
    import json
    from pathlib import Path

    import torch

    from .data import load_split
    from .models import build_model, save_model
    from .training import adversarial_train

    cfg = train_config(args, TrainConfig())
    torch.manual_seed(cfg.seed)
    model = build_model(args.arch)
    data = load_split("train", args.data_dir, limit=args.train_images, seed=cfg.seed)
    meta = _train_meta(args, cfg)
    history = adversarial_train(
        model, data, cfg, checkpoint=_state_path(args.out), resume=args.resume, checkpoint_meta=meta
    )
    meta.update(history=history.to_dict(), **_final_measurement(model, args, cfg))
    save_model(model, args.out, meta)
    printed = {"out": str(Path(args.out)), **{k: meta[k] for k in ("clean_acc", "pgd_acc", "test_images")}}
    print(json.dumps(printed))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    _setup_torch(args)
    from .data import load_split
    from .evaluate import evaluate_robustness

    model, meta = _load_any_model(args.model)
    data = load_split(args.split, args.data_dir, limit=args.images, seed=args.seed)
    label = {"arch": meta.get("arch"), "split": args.split}
    report = evaluate_robustness(
        model, data, EvalConfig(**values_for(args, EvalConfig)), name=args.model, meta=label
    )
    print(report.to_markdown())
    if args.report:
        report.save(args.report)
        print(f"wrote {args.report}")
    if args.plot:
        report.plot(args.plot)
        print(f"wrote {args.plot}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    _setup_torch(args)
    from .data import load_split
    from .lipschitz import lipschitz_scores
    from .storage import atomic_write_json

    model, _ = _load_any_model(args.model)
    x, _ = load_split(args.split, args.data_dir, limit=args.images, seed=args.seed)
    scores = lipschitz_scores(model, x, seed=args.seed)

    def gain(v: float | None) -> str:
        return "-" if v is None else f"{v:.4g}"

    rows = [
        (n, s.type, "x".join(map(str, s.weight_shape)), f"{s.L:.4g}", gain(s.gain_spectral),
         gain(s.gain_jacobian), f"{s.A:.4g}")
        for n, s in scores.items()
    ]  # fmt: skip
    print(text_table(("layer", "type", "weight shape", "L", "Λ spectral", "Λ jacobian", "A"), rows, left=3))
    if args.json:
        atomic_write_json(args.json, {n: s.to_dict() for n, s in scores.items()})
        print(f"wrote {args.json}")
    if args.plot:
        from .plots import plot_layer_scores

        plot_layer_scores(scores, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _check_coverage(model: Any, policy: Any, source: str, allow_partial: bool) -> None:
    """Refuse a policy that covers none of the model's layers, or not all of them without --allow-partial."""
    from .nnutils import quantizable_layers

    policy.check(model)
    uncovered = policy.matches(model).uncovered
    if uncovered and not policy.resolve(quantizable_layers(model)):
        raise PolicyError(
            f"policy {source} covers none of the model's layers ({', '.join(uncovered)})",
            'add a "default" spec, e.g. "default": {"weight_bit_width": 8}, or "layers" entries',
        )
    if uncovered and not allow_partial:
        raise PolicyError(
            f"policy {source} has no spec and no default for layers {', '.join(uncovered)}",
            'add them to "layers" or add a "default" spec; --allow-partial keeps them float',
        )


def cmd_quantize(args: argparse.Namespace) -> int:
    _setup_torch(args)
    from .convert import changes_table, quantize, save_quantized
    from .data import load_split
    from .models import load_float_model
    from .policy import LayerwisePolicy

    model, meta = load_float_model(args.model)
    policy = LayerwisePolicy.load(args.policy)
    _check_coverage(model, policy, args.policy, args.allow_partial)
    n = args.calib_images
    calib = load_split("train", args.data_dir, limit=n, seed=args.seed)[0] if n else None
    q = quantize(
        model, policy, calibration_data=calib, fold_bn=args.fold_bn, bias_correction=args.bias_correction
    )
    record = {
        "arch": meta["arch"],
        "source": args.model,
        "fold_bn": args.fold_bn,
        "calibration_images": n or 0,
    }
    save_quantized(q, args.out, record)
    print(changes_table(q.aq_changes))
    print(f"wrote {args.out}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    _setup_torch(args)
    from pathlib import Path

    from .convert import save_quantized
    from .data import load_split
    from .finetune import adversarial_finetune, init_distributed
    from .storage import read_sidecar

    rank, world = init_distributed()
    model, meta = _load_quantized(args.model)
    cfg = train_config(args, TrainConfig.finetuning())
    data = load_split("train", args.data_dir, limit=args.train_images, seed=cfg.seed)
    history = adversarial_finetune(
        model, data, cfg, checkpoint=_state_path(args.out), resume=args.resume, progress=rank == 0
    )
    if rank == 0:
        source = read_sidecar(args.model) if Path(args.model).is_file() else {}
        kept = {k: v for k, v in source.items() if k in ("arch", "fold_bn", "source")}
        run = {
            **cfg.to_dict(),
            "world_size": world,
            "train_images": len(data[1]),
            "history": history.to_dict(),
        }
        save_quantized(model, args.out, {**kept, "arch": meta["arch"], "finetune": run})
        print(_history_table(history))
        print(f"wrote {args.out} ({world} process{'es' if world > 1 else ''})")
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    _setup_torch(args)
    from .data import load_split
    from .models import load_float_model
    from .study import run_study

    models = {name: load_float_model(name)[0] for name in args.models}
    test = load_split("test", args.data_dir, limit=args.test_images, seed=args.seed)
    calib = load_split("train", args.data_dir, limit=args.calib_images, seed=args.seed)[0]
    result = run_study(
        models, test, calib, bits=tuple(args.bits), eps=args.eps, pgd_steps=args.pgd_steps, seed=args.seed
    )
    print(result.to_markdown())
    if args.out:
        print(f"wrote {', '.join(result.save(args.out))}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    _setup_torch(args)
    from .pipeline import run

    cfg = RunConfig(**values_for(args, RunConfig), normalization=normalization_of(args))
    result = run(args.model, args.out, cfg, force=args.force)
    skipped = f"; skipped done stages: {', '.join(result.skipped)}" if result.skipped else ""
    print(f"\n{result.summary_table()}\n\nreport: {result.out}/report.md ({result.seconds:.0f} s{skipped})")
    return 0


def _selection(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """The model, its calibration and validation images (both from the held-out val split, never
    test), and the candidate specs of ``search`` and ``validate-metric``."""
    from .budget import Budget
    from .candidates import default_candidates
    from .data import selection_data
    from .search.config import with_act_bits

    for budget in [] if args.budget is None else args.budget.split(","):  # pareto: a list, optional
        Budget.parse(budget)  # a typo fails before the model and the data are loaded
    model, _ = _load_any_model(args.model)
    calib, val = selection_data(args.calib_images, args.val_images, args.seed, args.data_dir)
    given = {"bits": args.bits, "scalings": args.scalings, "granularities": args.granularities}
    chosen = {k: v for k, v in given.items() if v is not None}  # the rest: the library's defaults
    if not chosen and not args.act_bits:
        return model, calib, val, None  # the search config's defaults (input bits with bops or FINN)
    specs = default_candidates(**chosen)
    return model, calib, val, with_act_bits(specs, args.act_bits) if args.act_bits else specs


def cmd_search(args: argparse.Namespace) -> int:
    _setup_torch(args)
    from .budget import Budget
    from .candidates import candidate_table
    from .search import compare_methods, policy_table, search_policy

    model, calib, val, candidates = _selection(args)
    config = search_config(args).replace(candidates=candidates).for_budget(Budget.parse(args.budget).kind)
    val_data = val if args.val_images else None
    # one table for every method compared; norms are filled only for the methods that read them
    table = candidate_table(model, calib[0], config.candidates, seed=args.seed, progress=True, norms=False)
    common = {"config": config, "val_data": val_data, "table": table}
    if args.compare:
        comparison = compare_methods(model, calib, args.budget, **common)
        results = comparison.results
    else:
        results = {config.method: search_policy(model, calib, args.budget, **common)}
    for method, result in results.items():
        print(f"\n== {method}\n{policy_table(result, table)}")
    if args.compare:
        print("\n" + comparison.to_text())
    chosen = results[config.method]
    if args.out:
        chosen.policy.save(args.out)
        print(f"wrote {args.out}")
    if args.plot:
        from .plots import plot_policy

        plot_policy(chosen.policy, table.scores, args.plot, title=f"{chosen.method} policy at {args.budget}")
        print(f"wrote {args.plot}")
    return 0


def cmd_pareto(args: argparse.Namespace) -> int:
    _setup_torch(args)
    from .search import search_pareto
    from .storage import atomic_write_text

    model, calib, val, candidates = _selection(args)
    budgets = args.budget.split(",") if args.budget else None
    config = search_config(args).replace(candidates=candidates)  # no candidates: input bits crossed in
    sweep = {"budgets": budgets, "widths": args.widths, "methods": args.methods, "workers": args.workers}
    front = search_pareto(model, calib, val, config=config, **sweep)
    print(front.table())
    if args.out:
        front.save(args.out + ".json")
        atomic_write_text(args.out + ".md", front.table() + "\n")
        front.plot(args.out + ".png")
        print(f"wrote {args.out}.json, {args.out}.md and {args.out}.png")
    return 0


def cmd_validate_metric(args: argparse.Namespace) -> int:
    _setup_torch(args)
    from .search import validate_metric

    model, calib, val, candidates = _selection(args)
    config = search_config(args).replace(candidates=candidates)
    result = validate_metric(
        model, calib, val, args.budget, n_policies=args.n, tolerance=args.tolerance, config=config
    )
    print(result.to_markdown())
    if args.out:
        from .storage import atomic_write_json

        atomic_write_json(args.out + ".json", result.to_dict())
        result.plot(args.out + ".png")
        print(f"wrote {args.out}.json and {args.out}.png")
    return 0


def _parity_lines(res: Any, tol: float) -> list[str]:
    """What the export check measured: the largest difference, its bound, and (QONNX) the
    rounding-boundary flips it allowed with the difference once they are undone."""
    scale = max(1.0, res.output_scale)
    lines = [
        f"wrote {res.path} ({res.format}); max |ONNX - PyTorch| = {res.max_abs_diff:.3g} on "
        f"{res.images_checked} real images (allowed {res.allowed_diff:.3g} = tol {tol:g} x output scale "
        f"{scale:.3g})"
    ]
    if res.format == "qonnx":
        detail = ", ".join(f"{where}: {n}" for where, n in sorted(res.flip_detail.items()))
        lines.append(
            f"  rounding-boundary flips allowed by the check: {res.boundary_flips}"
            + (
                f" ({detail}); max |ONNX - PyTorch| without them = {res.diff_without_flips:.3g}"
                if detail
                else ""
            )
        )
    if res.ort_basic_diff is not None:
        lines.append(
            "  checked in onnxruntime ORT_ENABLE_BASIC without WeightBiasQuantization;"
            f" with it (float biases rounded to int32): {res.ort_basic_diff:.3g}"
        )
    return lines


def cmd_export(args: argparse.Namespace) -> int:
    _setup_torch(args)
    from pathlib import Path

    from .data import load_split
    from .errors import ConfigError
    from .export import (
        DEFAULT_TOL,
        cost_table,
        export_qcdq,
        export_qonnx,
        finn_available,
        finn_check,
        layer_table,
    )
    from .export.finn_build import FINN_INSTALL, run_summary

    if args.format == "finn" and not finn_available():
        raise ConfigError(
            "--format finn runs FINN's own front end, which needs finn-plus (not installed)",
            f"{FINN_INSTALL}, or use --format qonnx",
        )
    model, _ = _load_quantized(args.model)
    x, _ = load_split("test", args.data_dir, limit=args.images + 1, seed=0)
    export = export_qcdq if args.format == "qcdq" else export_qonnx
    tol = DEFAULT_TOL if args.tol is None else args.tol
    res = export(model, args.out, x[:1], images=x[1:], tol=tol)
    print("\n".join([*_parity_lines(res, tol), layer_table(res)]))
    if res.cost is None:
        return 0
    print(cost_table(res.cost))
    finn = args.format == "finn"
    report = finn_check(res.path, model=model, run_finn=finn, inputs=x[:1], progress=finn)
    for c in report:
        print(f"FINN check {c.name:<26} {'ok' if c.passed else 'FAIL'}  {c.detail}")
    if not finn:
        return 0
    out_dir = report.write(Path(args.out).with_suffix(".finn"))
    print("\n".join(["", *run_summary(report.finn)]))
    print(f"wrote {res.path} and FINN's reports in {out_dir}/ (summary.md, estimate_*.json)")
    if not report.passed:
        raise ModelError(
            f"{res.path} is not FINN-ready: {report.failure()}", f"see {out_dir}/summary.md for every step"
        )
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from .models import ZOO_DIR, zoo_names
    from .storage import read_sidecar

    rows = []
    for name in zoo_names():
        m = read_sidecar(ZOO_DIR / f"{name}.pt")
        accs = (f"{m.get(k, float('nan')):.4f}" for k in ("clean_acc", "pgd_acc"))
        rows.append((name, m.get("arch", "?"), m.get("eps", 0), m.get("epochs", "?"), *accs))
    print(text_table(("name", "arch", "eps", "epochs", "clean", "PGD-20"), rows, left=2))
    return 0


Handler = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[str, Handler]] = {
    "train": ("train a float reference model, plainly or with PGD (Madry)", cmd_train),
    "evaluate": ("robustness report: clean, FGSM, PGD-k per eps, Square, masking checklist", cmd_evaluate),
    "score": ("per-layer Lipschitz scores: operator norm L, gains Λ, input norm A", cmd_score),
    "quantize": ("apply a policy JSON: swap layers for Brevitas ones, calibrate, save", cmd_quantize),
    "finetune": ("PGD fine-tune a quantized model (QAT); works under torchrun", cmd_finetune),
    "study": ("claim 1: plain vs PGD-trained models under uniform quantization", cmd_study),
    "search": ("search a per-layer policy under a budget (lipschitz, hessian, ans, uniform)", cmd_search),
    "validate-metric": (
        "Spearman rank check: does the bound order random equal-cost policies like PGD error?",
        cmd_validate_metric,
    ),
    "pareto": (
        "robust accuracy against BOPs/KiB for every method over a sweep of budgets, with a plot",
        cmd_pareto,
    ),
    "export": (
        "export a quantized checkpoint to QONNX (FINN) or QCDQ (onnxruntime), parity-checked",
        cmd_export,
    ),
    "run": (
        "the whole job: score, search, quantize, fine-tune, evaluate, export, report (resumable)",
        cmd_run,
    ),
    "zoo": ("list the shipped models and their measured accuracy", cmd_zoo),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``aq-brevitas`` parser: one subparser per entry of :data:`COMMANDS`, options from
    :func:`~aq_brevitas.cli_options.command_options`."""
    parser = argparse.ArgumentParser(
        prog="aq-brevitas", description="Layer-wise adversarial-aware quantization for Brevitas."
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    options = command_options()
    for name, (summary, handler) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, formatter_class=argparse.RawDescriptionHelpFormatter)
        add_options(p, name, options[name])
        p.set_defaults(func=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would print the top-level usage; say it in one line, for the command
        where = f"aq-brevitas {args.command}" if args.command else "aq-brevitas"
        print(
            f"aq-brevitas: error: {where} does not take {' '.join(unknown)} -- fix: see `{where} --help`",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        check_outputs(args)
        return int(args.func(args) or 0)
    except AqError as exc:
        if args.debug:
            raise
        print(f"aq-brevitas: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(
            "aq-brevitas: interrupted; completed outputs are intact, partial files were removed",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
