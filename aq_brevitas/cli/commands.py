"""The handlers of the stage subcommands: train, evaluate, score, quantize, finetune, study, run, zoo."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..config import AttackConfig, EvalConfig, TrainConfig
from ..errors import ModelError, PolicyError
from ..pipeline.config import RunConfig
from ..texttable import text_table
from .options import normalization_of, train_config, values_for


def setup_torch(args: argparse.Namespace) -> None:
    import warnings

    import torch

    # Known, harmless import-time warnings of Brevitas 0.13.4 (see docs/troubleshooting.md).
    warnings.filterwarnings("ignore", message="fast_hadamard_transform package not found")
    warnings.filterwarnings("ignore", message="brevitas.fx is deprecated")
    torch.set_num_threads(max(1, args.threads))
    # Adam + weight decay leave many weights denormal; without flushing, CPU convs run ~5x slower.
    torch.set_flush_denormal(True)


def load_any_model(spec: str) -> tuple[Any, dict[str, Any]]:
    """A float zoo/checkpoint model, or a quantized checkpoint written by `aq-brevitas quantize`."""
    from ..models import load_float_model, resolve_model_path
    from ..storage import read_sidecar

    if read_sidecar(resolve_model_path(spec)).get("kind") == "brevitas":
        from ..quantization.checkpoint import load_quantized

        return load_quantized(resolve_model_path(spec))
    return load_float_model(spec)


QUANTIZE_FIRST = "quantize it first with `aq-brevitas quantize` (float models train with `aq-brevitas train`)"


def load_quantized_spec(spec: str) -> tuple[Any, dict[str, Any]]:
    """A quantized checkpoint; a float model is refused (finetune and export need quantizers)."""
    model, meta = load_any_model(spec)
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
    from ..data import resolve_data_dir

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
    from ..data import load_split
    from ..evaluate.accuracy import accuracy, attack_accuracy

    x, y = load_split("test", args.data_dir, limit=args.test_images, seed=0)
    eps = args.eval_eps if args.eval_eps is not None else (cfg.eps if cfg.eps > 0 else 0.1)
    steps = args.pgd_steps
    return {
        "test_images": len(y),
        "clean_acc": round(accuracy(model, x, y), 4),
        "pgd_acc": round(attack_accuracy(model, x, y, AttackConfig("pgd", eps, steps), progress=True), 4),
        "pgd_eval": {"eps": eps, "steps": steps, "random_start": True, "alpha": f"2.5*eps/{steps}"},
    }


def cmd_train(args: argparse.Namespace) -> int:
    setup_torch(args)
    import json
    from pathlib import Path

    import torch

    from ..data import load_split
    from ..models import build_model, save_model
    from ..train.training import adversarial_train

    cfg = train_config(args, TrainConfig())
    torch.manual_seed(cfg.seed)
    model = build_model(args.arch)
    data = load_split("train", args.data_dir, limit=args.train_images, seed=cfg.seed)
    meta = _train_meta(args, cfg)
    history = adversarial_train(
        model, data, config=cfg, checkpoint=_state_path(args.out), resume=args.resume, checkpoint_meta=meta
    )
    meta.update(history=history.to_dict(), **_final_measurement(model, args, cfg))
    save_model(model, args.out, meta)
    printed = {"out": str(Path(args.out)), **{k: meta[k] for k in ("clean_acc", "pgd_acc", "test_images")}}
    print(json.dumps(printed))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    setup_torch(args)
    from ..data import load_split
    from ..evaluate.robustness import evaluate_robustness

    model, meta = load_any_model(args.model)
    data = load_split(args.split, args.data_dir, limit=args.images, seed=args.seed)
    label = {"arch": meta.get("arch"), "split": args.split}
    config = EvalConfig(**values_for(args, EvalConfig))
    report = evaluate_robustness(model, data, config=config, name=args.model, meta=label)
    print(report.to_markdown())
    if args.report:
        report.save(args.report)
        print(f"wrote {args.report}")
    if args.plot:
        report.plot(args.plot)
        print(f"wrote {args.plot}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    setup_torch(args)
    from ..data import load_split
    from ..score.lipschitz import lipschitz_scores
    from ..storage import atomic_write_json

    model, _ = load_any_model(args.model)
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
        from ..plots import plot_layer_scores

        plot_layer_scores(scores, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _check_coverage(model: Any, policy: Any, source: str, allow_partial: bool) -> None:
    """Refuse a policy that covers none of the model's layers, or not all of them without --allow-partial."""
    from ..nnutils import quantizable_layers

    policy.check(model)
    uncovered = policy.matches(model).uncovered
    if uncovered and not any(policy.resolve(quantizable_layers(model)).values()):
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
    setup_torch(args)
    from ..data import load_split
    from ..policy import LayerwisePolicy
    from ..quantization.checkpoint import save_quantized
    from ..quantization.convert import apply_policy, quantize
    from ..quantization.readback import changes_table, layer_changes

    model, meta = load_any_model(args.model)
    policy = LayerwisePolicy.load(args.policy)
    rebit = (
        meta.get("kind") == "brevitas"
    )  # a quantized checkpoint: re-bit what the policy names, keep the rest
    if rebit:
        policy.check(model)
    else:
        _check_coverage(model, policy, args.policy, args.allow_partial)
    n = args.calib_images
    calib = load_split("train", args.data_dir, limit=n, seed=args.seed)[0] if n else None
    # in place: a copy of a loaded checkpoint whose mse weight scales are not yet re-derived recurses in
    # Brevitas' MSE search (its stats keep a reference to the original proxy) at its first forward
    if rebit:
        q, model = (
            apply_policy(model, policy, calibration_data=calib, inplace=True),
            load_any_model(args.model)[0],
        )
    else:
        q = quantize(
            model, policy, calibration_data=calib, fold_bn=args.fold_bn, bias_correction=args.bias_correction,
            target=args.target,
        )  # fmt: skip
    record = {
        "arch": meta.get("arch", ""),
        "source": args.model,
        "fold_bn": bool(meta.get("fold_bn")) if rebit else args.fold_bn,
        "calibration_images": n or 0,
    }
    save_quantized(q, args.out, record)
    print(changes_table(layer_changes(model, q)))
    print(f"wrote {args.out}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    setup_torch(args)
    from pathlib import Path

    from ..data import load_split
    from ..quantization.checkpoint import save_quantized
    from ..storage import read_sidecar
    from ..train.finetune import close_distributed, init_distributed
    from ..train.training import adversarial_train

    rank, world = init_distributed()
    model, meta = load_quantized_spec(args.model)
    cfg = train_config(args, TrainConfig.finetuning())
    data = load_split("train", args.data_dir, limit=args.train_images, seed=cfg.seed)
    history = adversarial_train(
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
    close_distributed()
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    setup_torch(args)
    from ..data import load_split
    from ..evaluate.study import run_study
    from ..models import load_float_model

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
    setup_torch(args)
    from ..pipeline.job import run

    cfg = RunConfig(**values_for(args, RunConfig), normalization=normalization_of(args))
    result = run(args.model, args.out, cfg, force=args.force)
    skipped = f"; skipped done stages: {', '.join(result.skipped)}" if result.skipped else ""
    print(f"\n{result.summary_table()}\n\nreport: {result.out}/report.md ({result.seconds:.0f} s{skipped})")
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from ..models import ZOO_DIR, zoo_names
    from ..storage import read_sidecar

    rows = []
    for name in zoo_names():
        m = read_sidecar(ZOO_DIR / f"{name}.pt")
        accs = (f"{m.get(k, float('nan')):.4f}" for k in ("clean_acc", "pgd_acc"))
        rows.append((name, m.get("arch", "?"), m.get("eps", 0), m.get("epochs", "?"), *accs))
    print(text_table(("name", "arch", "eps", "epochs", "clean", "PGD-20"), rows, left=2))
    return 0
