"""The last stage of :func:`~aq_brevitas.pipeline.run`: the summary rows and the report (report.md,
report.json, comparison.png), and the names of the files each quantized model of a run writes.

Importing this module does not import torch.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from ..storage import atomic_write_json, atomic_write_text, read_json
from .context import VARIANTS

if TYPE_CHECKING:
    from ..policy import LayerwisePolicy
    from ..search.result import HeldOutCheck
    from .context import RunContext


def summary_rows(ctx: RunContext) -> list[dict[str, Any]]:
    """Per model (float, uniform, aq-brevitas): average weight bits, weight KiB, clean accuracy, robust
    accuracy at ``eps`` (``robust``: the per-image worst case over every attack, the figure to trust),
    PGD accuracy alone (``pgd``), whether gradient masking is suspected and the failed checks as
    ``warnings`` (one line each, with their numbers), and for the quantized models the export parity
    (max |QONNX − PyTorch|, the same without rounding-boundary flips, the flips per node)."""
    from ..evaluate.report import RobustnessReport

    rows = []
    for key, stem in (("float", "float"), *((v.key, v.stem) for v in reversed(VARIANTS))):
        rep = RobustnessReport.load(ctx.out / f"robustness_{stem}.json")
        cost = ctx.policies[key].cost(ctx.geometry) if key in ctx.policies else None
        float_bytes = 4 * sum(g.params for g in ctx.geometry.values())
        row = {
            "name": key if key == "float" else f"{key} ({ctx.cfg.budget})",
            "avg_bits": cost.avg_weight_bits if cost else 32.0,
            "kib": (cost.weight_bytes if cost else float_bytes) / 1024,
            "clean": rep.clean_accuracy,
            "robust": rep.robust_accuracy(ctx.cfg.eps),
            "pgd": rep.accuracy("pgd", ctx.cfg.eps),
            "parity": None,
            "masking_suspected": rep.masking_suspected,
            "warnings": rep.warnings,
        }
        variant = next((v for v in VARIANTS if v.key == key), None)
        if variant is not None:
            record = read_json(ctx.out / variant.export_files[1], "export record")
            row.update(_parity(record))
            row["bops"] = cost.bops if cost else None
            if "finn" in record:
                row["finn"] = finn_fields(record["finn"])
        rows.append(row)
    return rows


def finn_fields(finn: dict[str, Any]) -> dict[str, Any]:
    """What the summary shows of a :class:`~aq_brevitas.export.FinnReport` record: whether the file is
    FINN-ready (static checks, and FINN's own steps when they ran), the first failure, and FINN's
    estimated LUT / BRAM_18K / DSP and throughput (None when FINN did not run or stopped early)."""
    run = finn.get("finn") or {}
    est = run.get("estimates") or {}
    total = est.get("total") or {}
    failed = [c for c in finn.get("checks", []) if not c["passed"]]
    step = next((st for st in run.get("steps", []) if not st["passed"]), None)
    problem = f"{failed[0]['name']}: {failed[0]['detail']}" if failed else ""
    if step is not None:
        problem = f"{step['name']}: {step['message']}"
    return {
        "passed": finn.get("passed"),
        "ran": bool(run),
        "version": run.get("version"),
        "problem": problem or finn.get("finn_skipped", ""),
        "lut": total.get("LUT"),
        "bram": total.get("BRAM_18K"),
        "dsp": total.get("DSP"),
        "fps": est.get("throughput_fps"),
        "fpga_part": est.get("fpga_part"),
    }


def finn_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per exported model: FINN-ready or not, and FINN's estimates beside BOPs and weight KiB."""
    out = []
    for r in rows:
        f = r.get("finn")
        if f is None:
            continue
        cost = (
            f"{r['bops']:.3g} BOPs, {r['kib']:.1f} weight KiB"
            if r.get("bops")
            else f"{r['kib']:.1f} weight KiB"
        )
        if f["lut"] is not None:
            est = (f"{f['lut']:,.0f} LUT, {f['bram']:,.0f} BRAM_18K, {f['dsp']:,.0f} DSP, "
                   f"{f['fps']:,.0f} FPS est. on {f['fpga_part']}")  # fmt: skip
        else:
            est = "no FINN estimates" + (f" ({f['problem']})" if f["problem"] else "")
        ready = "FINN-ready" if f["passed"] else "NOT FINN-ready"
        who = f"finn-plus {f['version']}" if f["ran"] else "static checks only"
        out.append(f"FINN ({who}): {r['name']}: {ready}; {est}; {cost}")
    return out


def _parity(export: dict[str, Any]) -> dict[str, Any]:
    """The parity figures of an :class:`~aq_brevitas.export.ExportResult` record, as summary fields."""
    return {
        "parity": export["max_abs_diff"],
        "parity_allowed": export.get("allowed_diff"),
        "parity_without_flips": export.get("diff_without_flips", export["max_abs_diff"]),
        "boundary_flips": export.get("boundary_flips", 0),
        "flip_detail": export.get("flip_detail", {}),
        "parity_images": export.get("images_checked"),
    }


def report(ctx: RunContext, rows: list[dict[str, Any]]) -> None:
    """report.md, report.json (settings, the data, summary rows, the searched policy) and comparison.png."""
    cfg = ctx.cfg
    upstream = [
        f"robustness_{s}{suffix}.json"
        for s in ("float", *(v.stem for v in VARIANTS))
        for suffix in ("", "_eps")
        if (ctx.out / f"robustness_{s}{suffix}.json").is_file()
    ]
    upstream += [v.policy_file for v in VARIANTS] + [v.export_files[1] for v in VARIANTS]
    data = ctx.data.describe()
    inputs = {"model": ctx.identity["model"], "name": ctx.name, **asdict(cfg), "data": data}
    if not ctx.log.start(
        "report", inputs | ctx.log.files(*upstream), ["report.md", "report.json", "comparison.png"]
    ):
        return
    from ..plots import plot_comparison

    title = f"{ctx.name}: {cfg.budget}, robust (worst case) and PGD-{cfg.pgd_steps} at ε={cfg.eps}"
    plot_comparison(rows, ctx.out / "comparison.png", title=title)
    policy = ctx.policies["aq-brevitas"]
    document = {
        "model": ctx.name,
        "config": asdict(cfg),
        "data": data,
        "rows": rows,
        "policy": policy.to_dict(),
    }
    atomic_write_json(ctx.out / "report.json", document)
    atomic_write_text(ctx.out / "report.md", _markdown(ctx, rows))
    ctx.log.finish("report")


def held_out_check(policy: LayerwisePolicy) -> HeldOutCheck | None:
    """The searched policy's held-out comparison with uniform, read back from its saved meta as a
    :class:`~aq_brevitas.search.result.HeldOutCheck` (None when no comparison was made)."""
    from ..search.result import HeldOutCheck

    v = policy.meta.get("validation")
    return HeldOutCheck.from_dict(v) if v else None


def _held_out_line(policy: LayerwisePolicy) -> str:
    check = held_out_check(policy)
    measured = [] if check is None else [
        f"{label} {acc:.3f}"
        for label, acc in (("searched", check.search_accuracy),
                           ("unrefined knapsack", check.unrefined_accuracy),
                           ("best uniform", check.uniform_accuracy))
        if acc is not None
    ]  # fmt: skip
    if not measured:
        return "No held-out comparison with uniform was made."
    what = "PGD accuracy" if check.measure == "pgd" else f"robust accuracy ({check.measure})"
    return f"Held-out {what}: {', '.join(measured)} ({check.images} images)."


def _warning_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One warning per failed masking check or attack-failure indicator, per model (none: nothing)."""
    warn = [f"- ⚠️ {r['name']}: `{w}`" for r in rows for w in r.get("warnings", [])]
    if not warn:
        return []
    head = "Warnings (⚠️: gradient masking or a failing attack suspected; the robust figure may be too high):"
    return ["", head, "", *warn]


def _parity_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## Export parity",
        "",
        "Largest |QONNX − PyTorch| logit difference over each exported model's check images and the bound it",
        "was held to. A rounding-boundary flip is a code that ONNX and PyTorch round to neighbouring levels",
        "because the quantizer's input lies within float32 noise of a rounding boundary; the check allows",
        'those, and "without flips" is the difference once they get PyTorch\'s codes.',
        "",
        "| model | max abs diff | allowed | boundary flips | without flips | flips per node |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("parity") is None:
            continue
        detail = ", ".join(f"{k}: {n}" for k, n in sorted(r["flip_detail"].items())) or "-"
        allowed = "-" if r["parity_allowed"] is None else f"{r['parity_allowed']:.1e}"
        lines.append(
            f"| {r['name']} | {r['parity']:.1e} | {allowed} | {r['boundary_flips']} | "
            f"{r['parity_without_flips']:.1e} | {detail} |"
        )
    return lines


def _data_lines(ctx: RunContext) -> list[str]:
    """What the run read: the source, the sample shape, each stage's images, the normalisation."""
    cfg, d = ctx.cfg, ctx.data
    shape = "×".join(map(str, d.sample_shape))
    n = {p: len(getattr(d, p)[1]) for p in ("calib", "held_out", "train", "test")}
    norm = cfg.normalization
    fed = (
        f"the model is fed (x − mean) / std with mean {list(norm[0])}, std {list(norm[1])} (ε in [0, 1] "
        "input space; the ONNX files take normalised inputs, as the model does)"
        if norm
        else "the model is fed the inputs as they are"
    )
    return [
        f"Data: {d.source}; inputs of shape N×{shape}, values in [0, 1]; {fed}.",
        "",
        f"Selection used {n['calib']} held-out images (scores) and {n['held_out']} others (the "
        f"never-worse-than-uniform check) from {d.selection_pool}; fine-tuning used {n['train']} "
        f"training images for {cfg.finetune_epochs} epoch(s) of PGD-{cfg.finetune_steps}; accuracy is "
        f"on {n['test']} test images. Robust accuracy is the per-image worst case over every attack at "
        f"ε = {cfg.eps} (FGSM, PGD-{cfg.pgd_steps} and the attack suite: APGD-CE, APGD-DLR, transfer from the "
        "float model, Square); the PGD column is PGD alone, for comparison.",
    ]


def _markdown(ctx: RunContext, rows: list[dict[str, Any]]) -> str:
    from ..evaluate.report import RobustnessReport

    cfg, policy = ctx.cfg, ctx.policies["aq-brevitas"]
    lines = [
        f"# aq-brevitas run: `{ctx.name}` at {cfg.budget}, ε = {cfg.eps}",
        "",
        *_data_lines(ctx),
        "Export parity is the largest |QONNX − PyTorch| logit difference over the exported model's check "
        "images.",
        "",
        "## Summary",
        "",
        "| model | avg weight bits | weight KiB | clean | robust (worst case) | PGD | export parity "
        "| boundary flips |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        parity = "-" if r.get("parity") is None else f"{r['parity']:.1e}"
        robust = f"{100 * r.get('robust', r['pgd']):.1f}" + (" ⚠️" if r.get("warnings") else "")
        lines.append(
            f"| {r['name']} | {r['avg_bits']:.2f} | {r['kib']:.1f} | {100 * r['clean']:.1f} | {robust} | "
            f"{100 * r['pgd']:.1f} | {parity} | {r.get('boundary_flips', '-')} |"
        )
    lines += _warning_lines(rows)
    lines += ["", "![comparison](comparison.png)", "", *_parity_lines(rows), ""]
    finn = finn_lines(rows)
    if finn:
        lines += [
            "## FINN",
            "",
            "FINN's own front end on each exported file (`finn<suffix>/summary.md` beside it):",
            "",
        ]
        lines += [f"- {ln}" for ln in finn] + [""]
    lines += [
        f"## Policy ({policy.meta.get('method')}, kept: **{policy.meta.get('winner')}**)",
        "",
        "```",
        str(policy),
        "```",
        "",
        _held_out_line(policy),
        "",
        "![policy](policy.png) ![scores](scores.png)",
        "",
        "## Robustness of the fine-tuned aq-brevitas model",
        "",
        RobustnessReport.load(ctx.out / "robustness_searched.json").to_markdown(),
        "",
    ]
    sweep = ctx.out / "robustness_searched_eps.json"
    if sweep.is_file():  # the other radii, on fewer images (RunConfig.eval_eps_images)
        rep = RobustnessReport.load(sweep)
        lines += [
            f"### Every radius, on the first {rep.images} of those test images",
            "",
            rep.to_markdown(),
            "",
        ]
    lines += ["![robustness](robustness.png)", ""]
    return "\n".join(lines)
