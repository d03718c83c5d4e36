"""``aq-brevitas``: a thin argparse front end.

Heavy modules (torch, Brevitas, torchattacks) are imported inside the subcommand that needs them, so
``aq-brevitas --help`` answers at once. Every :class:`~aq_brevitas.errors.AqError` becomes one line
on stderr and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import AqError
from .search.config import DEFAULT_METHOD, METHODS, SCORED_METHODS  # torch-free: the method registry

EXIT_USER_ERROR = 2


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        default=None,
        help="directory of IDX files (default: $AQ_DATA_DIR or /usr/share/datasets/fashion-mnist)",
    )


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: fastest on small shared machines)",
    )


def _setup_torch(args: argparse.Namespace) -> None:
    import warnings

    import torch

    # Known, harmless import-time warnings of Brevitas 0.13.4 (see docs/troubleshooting.md).
    warnings.filterwarnings("ignore", message="fast_hadamard_transform package not found")
    warnings.filterwarnings("ignore", message="brevitas.fx is deprecated")
    torch.set_num_threads(max(1, args.threads))
    # Adam + weight decay leave many weights denormal; without flushing, CPU convs run ~5x slower.
    torch.set_flush_denormal(True)


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


def cmd_train(args: argparse.Namespace) -> int:
    _setup_torch(args)
    import json
    from pathlib import Path

    import torch

    from .data import load_split, resolve_data_dir
    from .evaluate import accuracy, attack_accuracy
    from .models import build_model, save_model
    from .training import adversarial_train

    out = Path(args.out)
    state_path = out.with_name(out.stem + ".train-state.pt")
    torch.manual_seed(args.seed)
    model = build_model(args.arch)
    x, y = load_split("train", args.data_dir, limit=args.limit, seed=args.seed)
    meta = {
        "arch": args.arch,
        "dataset": resolve_data_dir(args.data_dir).name,
        "train_split": "train" if args.limit is None else f"train[limit={args.limit}, seed={args.seed}]",
        "eps": args.eps,
        "attack_steps": args.steps if args.eps > 0 else 0,
        "alpha": args.alpha,
        "random_start": not args.no_random_start,
        "epochs": args.epochs,
        "lr": args.lr,
        "optimizer": args.optimizer,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "command": "aq-brevitas " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("aq-brevitas") else None,
    }
    history = adversarial_train(
        model,
        (x, y),
        eps=args.eps,
        steps=args.steps,
        alpha=args.alpha,
        random_start=not args.no_random_start,
        epochs=args.epochs,
        lr=args.lr,
        optimizer=args.optimizer,
        batch_size=args.batch_size,
        seed=args.seed,
        checkpoint=state_path,
        resume=args.resume,
        checkpoint_meta=meta,
    )
    xt, yt = load_split("test", args.data_dir, limit=args.eval_limit, seed=0)
    clean = accuracy(model, xt, yt)
    eval_eps = args.eval_eps if args.eval_eps is not None else (args.eps if args.eps > 0 else 0.1)
    pgd = attack_accuracy(model, xt, yt, "pgd", eps=eval_eps, steps=args.eval_steps, progress=True)
    meta.update(
        history=history.to_dict(),
        test_images=len(yt),
        clean_acc=round(clean, 4),
        pgd_acc=round(pgd, 4),
        pgd_eval={
            "eps": eval_eps,
            "steps": args.eval_steps,
            "random_start": True,
            "alpha": f"2.5*eps/{args.eval_steps}",
        },
    )
    save_model(model, out, meta)
    print(
        json.dumps(
            {
                "out": str(out),
                "clean_acc": meta["clean_acc"],
                "pgd_acc": meta["pgd_acc"],
                "test_images": len(yt),
            }
        )
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    _setup_torch(args)
    from .data import load_split
    from .evaluate import evaluate_robustness

    model, meta = _load_any_model(args.model)
    data = load_split(args.split, args.data_dir, limit=args.limit, seed=args.seed)
    report = evaluate_robustness(
        model,
        data,
        eps=args.eps,
        pgd_steps=args.steps,
        pgd_restarts=args.restarts,
        autoattack=args.autoattack,
        gradient_free=not args.no_gradient_free,
        gradient_free_images=args.gradient_free_images,
        seed=args.seed,
        name=args.model,
        meta={"arch": meta.get("arch"), "split": args.split},
    )
    print(report.to_markdown())
    if args.report:
        report.save(args.report)
        print(f"wrote {args.report}")
    if args.plot:
        report.plot(args.plot)
        print(f"wrote {args.plot}")
    return 0


def _load_any_model(spec: str):
    """A float zoo/checkpoint model, or a quantized checkpoint written by `aq-brevitas quantize`."""
    from .models import resolve_model_path
    from .storage import read_sidecar

    meta = read_sidecar(resolve_model_path(spec))
    if meta.get("kind") == "brevitas":
        from .convert import load_quantized

        return load_quantized(resolve_model_path(spec))
    from .models import load_float_model

    return load_float_model(spec)


def cmd_score(args: argparse.Namespace) -> int:
    _setup_torch(args)
    from .data import load_split
    from .lipschitz import lipschitz_scores
    from .storage import atomic_write_json

    model, _ = _load_any_model(args.model)
    x, _ = load_split(args.split, args.data_dir, limit=args.limit, seed=args.seed)
    scores = lipschitz_scores(model, x, seed=args.seed)
    print(
        f"{'layer':<22} {'type':<12} {'weight shape':<18} {'L':>9} {'Λ spectral':>11} {'Λ jacobian':>11} {'A':>9}"
    )
    for n, s in scores.items():
        shape = "x".join(map(str, s.weight_shape))
        spec = f"{s.gain_spectral:11.4g}" if s.gain_spectral is not None else f"{'-':>11}"
        jac = f"{s.gain_jacobian:11.4g}" if s.gain_jacobian is not None else f"{'-':>11}"
        print(f"{n:<22} {s.type:<12} {shape:<18} {s.L:9.4g} {spec} {jac} {s.A:9.4g}")
    if args.json:
        atomic_write_json(args.json, {n: s.to_dict() for n, s in scores.items()})
        print(f"wrote {args.json}")
    if args.plot:
        from .plots import plot_layer_scores

        plot_layer_scores(scores, args.plot)
        print(f"wrote {args.plot}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    _setup_torch(args)
    from .convert import changes_table, quantize, save_quantized
    from .data import load_split
    from .errors import PolicyError
    from .layers import quantizable_layers
    from .models import load_float_model
    from .policy import LayerwisePolicy

    model, meta = load_float_model(args.model)
    policy = LayerwisePolicy.load(args.policy)
    policy.check(model)
    uncovered = policy.matches(model).uncovered
    if uncovered and not policy.resolve(quantizable_layers(model)):
        raise PolicyError(
            f"policy {args.policy} covers none of the model's layers ({', '.join(uncovered)})",
            'add a "default" spec, e.g. "default": {"weight_bit_width": 8}, or "layers" entries',
        )
    if uncovered and not args.allow_partial:
        raise PolicyError(
            f"policy {args.policy} has no spec and no default for layers {', '.join(uncovered)}",
            'add them to "layers" or add a "default" spec; --allow-partial keeps them float',
        )
    calib = (
        load_split("train", args.data_dir, limit=args.calibrate, seed=args.seed)[0]
        if args.calibrate
        else None
    )
    q = quantize(
        model, policy, calibration_data=calib, fold_bn=args.fold_bn, bias_correction=args.bias_correction
    )
    save_quantized(
        q,
        args.out,
        {
            "arch": meta["arch"],
            "source": args.model,
            "fold_bn": args.fold_bn,
            "calibration_images": args.calibrate or 0,
        },
    )
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
    model, meta = _load_any_model(args.model)
    if meta.get("kind") != "brevitas":
        from .errors import ModelError

        raise ModelError(
            f"{args.model} is a float model",
            "quantize it first with `aq-brevitas quantize` (or use `aq-brevitas train`)",
        )
    data = load_split("train", args.data_dir, limit=args.limit, seed=args.seed)
    out = Path(args.out)
    state = out.with_name(out.stem + ".train-state.pt")
    history = adversarial_finetune(
        model,
        data,
        eps=args.eps,
        steps=args.steps,
        alpha=args.alpha,
        random_start=not args.no_random_start,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        clean_weight=args.clean_weight,
        trades_beta=args.trades,
        seed=args.seed,
        checkpoint=state,
        resume=args.resume,
        progress=rank == 0,
        learn_act_scales=args.learn_act_scales,
    )
    if rank == 0:
        source = read_sidecar(args.model) if Path(args.model).is_file() else {}
        save_quantized(
            model,
            out,
            {
                **{k: v for k, v in source.items() if k in ("arch", "fold_bn", "source")},
                "arch": meta["arch"],
                "finetune": {
                    "eps": args.eps,
                    "steps": args.steps,
                    "alpha": args.alpha,
                    "random_start": not args.no_random_start,
                    "learn_act_scales": args.learn_act_scales,
                    "epochs": args.epochs,
                    "lr": args.lr,
                    "world_size": world,
                    "train_images": len(data[1]),
                    "history": history.to_dict(),
                },
            },
        )
        nan = float("nan")
        print(f"{'epoch':>5} {'loss':>8} {'clean acc':>9} {'adv acc':>8} {'seconds':>8}")
        for e in history.epochs:
            clean, adv = (nan if v is None else v for v in (e.clean_acc, e.adv_acc))
            print(f"{e.epoch:>5} {e.loss:8.4f} {clean:9.4f} {adv:8.4f} {e.seconds:8.1f}")
        print(f"wrote {out} ({world} process{'es' if world > 1 else ''})")
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    _setup_torch(args)
    from .data import load_split
    from .models import load_float_model
    from .storage import atomic_write_json, atomic_write_text
    from .study import run_study

    models = {name: load_float_model(name)[0] for name in args.models}
    test = load_split("test", args.data_dir, limit=args.limit, seed=args.seed)
    calib = load_split("train", args.data_dir, limit=args.calibrate, seed=args.seed)[0]
    result = run_study(
        models, test, calib, bits=tuple(args.bits), eps=args.eps, pgd_steps=args.steps, seed=args.seed
    )
    table = result.to_markdown()
    print(table)
    if args.out:
        atomic_write_json(args.out + ".json", result.to_dict())
        atomic_write_text(args.out + ".md", table + "\n")
        result.plot(args.out + ".png")
        print(f"wrote {args.out}.json, {args.out}.md, {args.out}.png")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    _setup_torch(args)
    from .pipeline import RunConfig, run

    cfg = RunConfig(
        budget=args.budget, eps=args.eps, method=args.method, calib_images=args.calib, val_images=args.val_images,
        finetune_images=args.finetune_images or None, finetune_epochs=args.epochs, finetune_steps=args.finetune_steps,
        test_images=args.test_images or None, pgd_steps=args.steps, seed=args.seed, data_dir=args.data_dir,
    )  # fmt: skip
    result = run(args.model, args.out, cfg, force=args.force)
    print()
    print(result.summary_table())
    print(
        f"\nreport: {result.out}/report.md ({result.seconds:.0f} s"
        + (f"; skipped done stages: {', '.join(result.skipped)})" if result.skipped else ")")
    )
    return 0


def _selection_data(args: argparse.Namespace):
    """Calibration and validation images, both from the held-out `val` split (never the test split)."""
    from .data import selection_data

    return selection_data(args.calib, args.val_images, args.seed, args.data_dir)


def _candidates_from_args(args: argparse.Namespace):
    from .candidates import default_candidates

    return default_candidates(
        bits=args.bits, scalings=args.scalings, granularities=args.granularities, act_bit_width=args.act_bits
    )


def cmd_search(args: argparse.Namespace) -> int:
    _setup_torch(args)
    from .candidates import candidate_table
    from .policy import Budget
    from .search import SearchConfig, compare_methods, policy_table, search_policy

    model, meta = _load_any_model(args.model)
    calib, val = _selection_data(args)
    budget = Budget.parse(args.budget)
    table = candidate_table(model, calib[0], _candidates_from_args(args), seed=args.seed, progress=True)
    config = SearchConfig(
        method=args.method,
        eps=args.eps,
        seed=args.seed,
        refine=args.refine,
        val_images=args.val_images or None,
    ).replace(estimate=args.estimate)
    val_data = val if args.val_images else None
    if args.compare:
        comparison = compare_methods(model, calib, budget, config=config, val_data=val_data, table=table)
        results = comparison.results
    else:
        results = {
            args.method: search_policy(model, calib, budget, config=config, val_data=val_data, table=table)
        }
    for method, result in results.items():
        print(f"\n== {method}")
        print(policy_table(result, table))
    if args.compare:
        print("\n" + comparison.to_text())
    chosen = results[args.method].policy
    if args.out:
        chosen.save(args.out)
        print(f"wrote {args.out}")
    if args.plot:
        from .plots import plot_policy

        names = list(table.scores)
        specs = [chosen.spec_for(n) for n in names]
        plot_policy(
            names,
            [s.weight_bit_width for s in specs],
            [f"{s.scaling} {'pc' if s.granularity == 'per_channel' else 'pt'}" for s in specs],
            [table.scores[n].params for n in names],
            args.plot,
            title=f"{results[args.method].method} policy at {args.budget}",
        )
        print(f"wrote {args.plot}")
    return 0


def cmd_validate_metric(args: argparse.Namespace) -> int:
    _setup_torch(args)
    from .policy import Budget
    from .search import validate_metric
    from .storage import atomic_write_json

    model, _ = _load_any_model(args.model)
    calib, val = _selection_data(args)
    result = validate_metric(
        model,
        calib,
        val,
        budget=Budget.parse(args.budget),
        n_policies=args.n,
        eps=args.eps,
        tolerance=args.tolerance,
        seed=args.seed,
        pgd_steps=args.pgd_steps,
        candidates=_candidates_from_args(args),
        estimate=args.estimate,
    )
    print(result.to_markdown())
    if args.out:
        atomic_write_json(args.out + ".json", result.to_dict())
        result.plot(args.out + ".png")
        print(f"wrote {args.out}.json and {args.out}.png")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    _setup_torch(args)
    from .data import load_split
    from .errors import ModelError
    from .export import cost_table, export_qcdq, export_qonnx, finn_check, layer_table

    model, meta = _load_any_model(args.model)
    if meta.get("kind") != "brevitas":
        raise ModelError(f"{args.model} is a float model", "quantize it first with `aq-brevitas quantize`")
    x, _ = load_split("test", args.data_dir, limit=args.images + 1, seed=0)
    export = export_qonnx if args.format == "qonnx" else export_qcdq
    res = export(model, args.out, x[:1], images=x[1:], tol=args.tol)
    print(
        f"wrote {res.path} ({res.format}); max |ONNX - PyTorch| = {res.max_abs_diff:.3g} on {res.images_checked}"
        f" real images (allowed {res.allowed_diff:.3g} = tol {args.tol:g} x output scale {max(1.0, res.output_scale):.3g})"
    )
    if res.ort_basic_diff is not None:
        print(
            "  checked in onnxruntime ORT_ENABLE_BASIC without WeightBiasQuantization;"
            f" with it (float biases rounded to int32): {res.ort_basic_diff:.3g}"
        )
    print(layer_table(res))
    if res.cost is not None:
        print(cost_table(res.cost))
        for c in finn_check(res.path, model=model):
            print(f"FINN check {c.name:<26} {'ok' if c.passed else 'FAIL'}  {c.detail}")
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from .models import ZOO_DIR, zoo_names
    from .storage import read_sidecar

    print(f"{'name':<12} {'arch':<12} {'eps':>5} {'epochs':>6} {'clean':>7} {'PGD-20':>7}")
    for name in zoo_names():
        m = read_sidecar(ZOO_DIR / f"{name}.pt")
        print(
            f"{name:<12} {m.get('arch', '?'):<12} {m.get('eps', 0):>5} {m.get('epochs', '?'):>6} {m.get('clean_acc', float('nan')):>7.4f} {m.get('pgd_acc', float('nan')):>7.4f}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aq-brevitas", description="Layer-wise adversarial-aware quantization for Brevitas."
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a float reference model, plainly or with PGD (Madry)")
    p.add_argument("--arch", required=True, help="small_cnn, vgg_bn or small_resnet")
    p.add_argument("--out", required=True, help="checkpoint path (.pt); a .json sidecar is written beside it")
    p.add_argument("--eps", type=float, default=0.1, help="L-inf PGD radius for training; 0 = plain training")
    p.add_argument("--steps", type=int, default=7, help="PGD steps for training")
    p.add_argument("--alpha", type=float, default=None, help="PGD step size (default 2.5*eps/steps)")
    p.add_argument(
        "--no-random-start", action="store_true", help="start PGD at the clean image, not a random point"
    )
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="train on a seeded subset of N images")
    p.add_argument("--resume", action="store_true", help="continue from <out>.train-state.pt")
    p.add_argument(
        "--eval-limit", type=int, default=None, help="test images for the final measurement (default: all)"
    )
    p.add_argument(
        "--eval-eps",
        type=float,
        default=None,
        help="PGD radius for the final measurement (default: --eps, or 0.1)",
    )
    p.add_argument("--eval-steps", type=int, default=20)
    _add_data_args(p)
    _add_threads_arg(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "evaluate", help="robustness report: clean, FGSM, PGD-k per eps, Square, masking checklist"
    )
    p.add_argument("--model", required=True, help="zoo name, float checkpoint or quantized checkpoint")
    p.add_argument(
        "--eps", type=float, nargs="+", default=[0.05, 0.1, 0.2], help="L-inf radii on [0, 1] images"
    )
    p.add_argument("--steps", type=int, default=20, help="PGD steps")
    p.add_argument("--restarts", type=int, default=1, help="PGD random restarts")
    p.add_argument("--autoattack", action="store_true", help="also run torchattacks AutoAttack (slow on CPU)")
    p.add_argument("--no-gradient-free", action="store_true", help="skip the Square attack check")
    p.add_argument("--gradient-free-images", type=int, default=100)
    p.add_argument("--split", default="test", help="test (default, for reporting), val or train")
    p.add_argument("--limit", type=int, default=None, help="evaluate on a seeded subset of N images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", default=None, help="write the report as JSON")
    p.add_argument("--plot", default=None, help="write accuracy-vs-eps plot (PNG)")
    _add_data_args(p)
    _add_threads_arg(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("score", help="per-layer Lipschitz scores: operator norm L, gains Λ, input norm A")
    p.add_argument("--model", required=True, help="zoo name or checkpoint path")
    p.add_argument("--split", default="val", help="images to score on (default: val, never test)")
    p.add_argument("--limit", type=int, default=256, help="number of images (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the scores as JSON")
    p.add_argument("--plot", default=None, help="write a bar chart (PNG/SVG/PDF)")
    _add_data_args(p)
    _add_threads_arg(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("quantize", help="apply a policy JSON: swap layers for Brevitas ones, calibrate, save")
    p.add_argument("--model", required=True, help="float zoo name or checkpoint path")
    p.add_argument("--policy", required=True, help="policy JSON (schema aq-brevitas/policy/v1)")
    p.add_argument("--out", required=True, help="quantized checkpoint path (.pt)")
    p.add_argument(
        "--calibrate", type=int, default=512, help="training images for activation calibration (0 = none)"
    )
    p.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into the preceding conv first")
    p.add_argument(
        "--bias-correction", action="store_true", help="run Brevitas bias correction after calibration"
    )
    p.add_argument(
        "--allow-partial",
        action="store_true",
        help="keep layers the policy does not cover (no entry, no default) in float instead of refusing",
    )
    p.add_argument("--seed", type=int, default=0)
    _add_data_args(p)
    _add_threads_arg(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("finetune", help="PGD fine-tune a quantized model (QAT); works under torchrun")
    p.add_argument("--model", required=True, help="quantized checkpoint from `aq-brevitas quantize`")
    p.add_argument("--out", required=True, help="fine-tuned checkpoint path (.pt)")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=7, help="PGD steps of the inner maximisation")
    p.add_argument("--alpha", type=float, default=None, help="PGD step size (default 2.5*eps/steps)")
    p.add_argument(
        "--no-random-start", action="store_true", help="start PGD at the clean image, not a random point"
    )
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument(
        "--batch-size", type=int, default=128, help="global batch (split across torchrun processes)"
    )
    p.add_argument(
        "--clean-weight", type=float, default=0.0, help="mix in clean cross-entropy with this weight"
    )
    p.add_argument(
        "--trades", type=float, default=None, metavar="BETA", help="use the TRADES loss with this beta"
    )
    p.add_argument(
        "--learn-act-scales",
        action="store_true",
        help="also train activation-quantizer scales (default: keep the calibrated ones; faster)",
    )
    p.add_argument(
        "--limit", type=int, default=None, help="fine-tune on a seeded subset of N training images"
    )
    p.add_argument("--resume", action="store_true", help="continue from <out>.train-state.pt")
    p.add_argument("--seed", type=int, default=0)
    _add_data_args(p)
    _add_threads_arg(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("study", help="claim 1: plain vs PGD-trained models under uniform quantization")
    p.add_argument("--models", nargs="+", default=["cnn-plain", "cnn-pgd"], help="zoo names or checkpoints")
    p.add_argument("--bits", type=int, nargs="+", default=[8, 6, 4, 3, 2])
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--limit", type=int, default=None, help="test images (default: all 10k)")
    p.add_argument("--calibrate", type=int, default=512, help="training images for calibration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write OUT.json, OUT.md and OUT.png")
    _add_data_args(p)
    _add_threads_arg(p)
    p.set_defaults(func=cmd_study)

    def selection_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="zoo name or checkpoint path")
        p.add_argument("--budget", required=True, help="avg-bits=4, bytes=N, kib=N or bops=N")
        p.add_argument("--eps", type=float, default=0.1, help="L-inf radius the policy should resist")
        p.add_argument(
            "--estimate",
            choices=["jacobian", "spectral"],
            default="jacobian",
            help="lipschitz estimate: measured (default) or the loose data-free bound",
        )
        p.add_argument(
            "--bits", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8], help="candidate weight bit widths"
        )
        p.add_argument(
            "--scalings", nargs="+", default=["max", "percentile", "mse"], help="candidate scaling rules"
        )
        p.add_argument("--granularities", nargs="+", default=["per_tensor", "per_channel"])
        p.add_argument(
            "--act-bits", type=int, default=None, help="add input quantizers of this width to every candidate"
        )
        p.add_argument("--calib", type=int, default=256, help="held-out (val) images for scoring")
        p.add_argument(
            "--val-images",
            type=int,
            default=500,
            help="other val images for the uniform comparison (0 = skip)",
        )
        p.add_argument("--seed", type=int, default=0)
        _add_data_args(p)
        _add_threads_arg(p)

    p = sub.add_parser(
        "search", help="search a per-layer policy under a budget (lipschitz, hessian, ans, uniform)"
    )
    selection_args(p)
    p.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD)
    p.add_argument(
        "--refine",
        action="store_true",
        help="re-rank the top-5 MILP policies and run coordinate descent on the whole-network bound "
        "(off by default, see docs/method.md)",
    )
    p.add_argument("--compare", action="store_true", help="run all four methods and print them side by side")
    p.add_argument("--out", default=None, help="write the policy JSON")
    p.add_argument("--plot", default=None, help="write the per-layer policy chart")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser(
        "validate-metric",
        help="Spearman rank check: does the bound order random equal-cost policies like PGD error?",
    )
    selection_args(p)
    p.add_argument("--n", type=int, default=20, help="number of random policies")
    p.add_argument("--tolerance", type=float, default=0.05, help="relative cost tolerance around the budget")
    p.add_argument("--pgd-steps", type=int, default=10)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.png (scatter)")
    p.set_defaults(func=cmd_validate_metric)

    p = sub.add_parser(
        "export", help="export a quantized checkpoint to QONNX (FINN) or QCDQ (onnxruntime), parity-checked"
    )
    p.add_argument(
        "--model", required=True, help="quantized checkpoint from `aq-brevitas quantize` or `finetune`"
    )
    p.add_argument("--format", choices=["qonnx", "qcdq"], default="qonnx")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--images", type=int, default=8, help="real test images for the parity check")
    p.add_argument(
        "--tol",
        type=float,
        default=1e-5,
        help="max allowed |ONNX - PyTorch| on the logits, relative to max(1, max |logit|)",
    )
    _add_data_args(p)
    _add_threads_arg(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "run", help="the whole job: score, search, quantize, fine-tune, evaluate, export, report (resumable)"
    )
    p.add_argument("--model", required=True, help="float zoo name or checkpoint")
    p.add_argument("--budget", default="avg-bits=3", help="avg-bits=N, bytes=N, kib=N or bops=N")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument(
        "--out",
        required=True,
        help="output directory (created; re-running skips stages whose settings, inputs and outputs are unchanged)",
    )
    p.add_argument("--method", choices=SCORED_METHODS, default=DEFAULT_METHOD)
    p.add_argument("--calib", type=int, default=256, help="held-out training images for scoring")
    p.add_argument(
        "--val-images", type=int, default=500, help="other held-out images for the uniform comparison"
    )
    p.add_argument(
        "--finetune-images", type=int, default=4096, help="training subset for fine-tuning (0 = all)"
    )
    p.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs")
    p.add_argument("--finetune-steps", type=int, default=7, help="PGD steps during fine-tuning")
    p.add_argument("--test-images", type=int, default=2000, help="test images for the report (0 = all 10k)")
    p.add_argument("--steps", type=int, default=20, help="PGD steps for evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="redo every stage, fine-tuning from scratch")
    _add_data_args(p)
    _add_threads_arg(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("zoo", help="list the shipped models and their measured accuracy")
    p.set_defaults(func=cmd_zoo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
