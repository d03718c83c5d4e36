"""The handlers of the delivery subcommands: search, pareto, validate-metric, export."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import ModelError
from .commands import load_any_model, load_quantized_spec, setup_torch
from .options import search_config


def _selection(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """The model, its calibration and validation images (both from the held-out val split, never
    test), and the candidate specs of ``search`` and ``validate-metric``."""
    from ..budget import Budget
    from ..data import selection_data
    from ..search.candidates import default_candidates
    from ..search.config import with_act_bits

    for budget in [] if args.budget is None else args.budget.split(","):  # pareto: a list, optional
        Budget.parse(budget)  # a typo fails before the model and the data are loaded
    model, _ = load_any_model(args.model)
    calib, val = selection_data(args.calib_images, args.val_images, args.seed, args.data_dir)
    given = {"bits": args.bits, "scalings": args.scalings, "granularities": args.granularities}
    chosen = {k: v for k, v in given.items() if v is not None}  # the rest: the library's defaults
    if not chosen and not args.act_bits:
        return model, calib, val, None  # the search config's defaults (input bits with bops or FINN)
    specs = default_candidates(**chosen)
    return model, calib, val, with_act_bits(specs, args.act_bits) if args.act_bits else specs


def _cache_dir(args: argparse.Namespace) -> str | None:
    """``--cache-dir``, else ``cache/`` beside ``--out``, else None (nothing kept)."""
    return args.cache_dir or (str(Path(args.out).parent / "cache") if args.out else None)


def cmd_search(args: argparse.Namespace) -> int:
    setup_torch(args)
    from ..budget import Budget
    from ..search import compare_methods, policy_table, search_policy
    from ..search.candidates import candidate_table

    model, calib, val, candidates = _selection(args)
    config = search_config(args).replace(candidates=candidates).for_budget(Budget.parse(args.budget).kind)
    val_data = val if args.val_images else None
    # one table for every method compared; norms are filled only for the methods that read them
    table = candidate_table(model, calib[0], config.candidates, seed=config.seed, progress=True, norms=False)
    common = {"config": config, "val_data": val_data, "table": table, "cache_dir": _cache_dir(args)}
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
        from ..plots import plot_policy

        plot_policy(chosen.policy, table.scores, args.plot, title=f"{chosen.method} policy at {args.budget}")
        print(f"wrote {args.plot}")
    return 0


def cmd_pareto(args: argparse.Namespace) -> int:
    setup_torch(args)

    from ..search import search_pareto
    from ..storage import atomic_write_text
    from ..train.finetune import close_distributed, init_distributed

    rank, world = init_distributed()  # under torchrun the points are split over the ranks
    cache = _cache_dir(args)
    model, calib, val, candidates = _selection(args)
    budgets = args.budget.split(",") if args.budget else args.widths
    config = search_config(args).replace(candidates=candidates)  # no candidates: input bits crossed in
    sweep = {"budgets": budgets, "methods": args.methods, "workers": args.workers, "cache_dir": cache}
    front = search_pareto(model, calib, val, config=config, progress=rank == 0, **sweep)
    if rank == 0:  # every rank holds the whole front; one writes it
        print(front.table())
        if args.out:
            front.save(args.out + ".json")
            atomic_write_text(args.out + ".md", front.table() + "\n")
            front.plot(args.out + ".png")
            print(f"wrote {args.out}.json, {args.out}.md and {args.out}.png")
    close_distributed()
    return 0


def cmd_validate_metric(args: argparse.Namespace) -> int:
    setup_torch(args)
    from ..search import validate_metric

    model, calib, val, candidates = _selection(args)
    config = search_config(args).replace(candidates=candidates)
    result = validate_metric(
        model, calib, val, args.budget, n_policies=args.n, tolerance=args.tolerance, config=config
    )
    print(result.to_markdown())
    if args.out:
        from ..storage import atomic_write_json

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
    setup_torch(args)
    from pathlib import Path

    from ..data import load_split
    from ..errors import ConfigError
    from ..export import (
        DEFAULT_TOL,
        cost_table,
        export_qcdq,
        export_qonnx,
        finn_available,
        finn_check,
        layer_table,
    )
    from ..export.finn_build import FINN_INSTALL, run_summary

    if args.format == "finn" and not finn_available():
        raise ConfigError(
            "--format finn runs FINN's own front end, which needs finn-plus (not installed)",
            f"{FINN_INSTALL}, or use --format qonnx",
        )
    model, _ = load_quantized_spec(args.model)
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
