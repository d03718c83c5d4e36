"""The last stage of :func:`~aq_brevitas.pipeline.run`: the summary rows (:mod:`.rows`), read from the
evaluate and export stages' files, and the report (report.md, report.json, comparison.png).

Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import TYPE_CHECKING

from ..storage import atomic_write_json, atomic_write_text, read_json
from .context import VARIANTS
from .rows import FinnRow, ParityRow, SummaryRow

if TYPE_CHECKING:
    from ..policy import LayerwisePolicy
    from ..search.result import HeldOutCheck
    from .context import RunContext


def summary_rows(ctx: RunContext) -> list[SummaryRow]:
    """One :class:`SummaryRow` per model (float, uniform, aq-brevitas), read from the evaluate stage's
    reports and, for the quantized models, the export records."""
    from ..evaluate.report import RobustnessReport

    rows = []
    for key, stem in (("float", "float"), *((v.key, v.stem) for v in reversed(VARIANTS))):
        rep = RobustnessReport.load(ctx.out / f"robustness_{stem}.json")
        cost = ctx.policies[key].cost(ctx.geometry) if key in ctx.policies else None
        float_bytes = 4 * sum(g.params for g in ctx.geometry.values())
        row = SummaryRow(
            name=key if key == "float" else f"{key} ({ctx.cfg.budget})",
            avg_bits=cost.avg_weight_bits if cost else 32.0,
            kib=(cost.weight_bytes if cost else float_bytes) / 1024,
            clean=rep.clean_accuracy,
            robust=rep.robust_accuracy(ctx.cfg.eps),
            pgd=rep.accuracy("pgd", ctx.cfg.eps),
            masking_suspected=rep.masking_suspected,
            warnings=tuple(rep.warnings),
        )
        variant = next((v for v in VARIANTS if v.key == key), None)
        if variant is not None:
            record = read_json(ctx.out / variant.export_files[1], "export record")
            finn = FinnRow.from_report(record["finn"]) if "finn" in record else None
            parity = ParityRow.from_export(record)
            row = replace(row, bops=cost.bops if cost else None, parity=parity, finn=finn)
        rows.append(row)
    return rows


def finn_lines(rows: Sequence[SummaryRow]) -> list[str]:
    """One line per exported model: FINN-ready or not, and FINN's estimates beside BOPs and weight KiB."""
    return [r.finn.line(r.name, r.cost_text()) for r in rows if r.finn is not None]


def report(ctx: RunContext, rows: Sequence[SummaryRow]) -> None:
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
    plot_comparison([r.to_dict() for r in rows], ctx.out / "comparison.png", title=title)
    policy = ctx.policies["aq-brevitas"]
    document = {
        "model": ctx.name,
        "config": asdict(cfg),
        "data": data,
        "rows": [r.to_dict() for r in rows],
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


def _warning_lines(rows: Sequence[SummaryRow]) -> list[str]:
    """One warning per failed masking check or attack-failure indicator, per model (none: nothing)."""
    warn = [f"- ⚠️ {r.name}: `{w}`" for r in rows for w in r.warnings]
    if not warn:
        return []
    head = "Warnings (⚠️: gradient masking or a failing attack suspected; the robust figure may be too high):"
    return ["", head, "", *warn]


def _parity_lines(rows: Sequence[SummaryRow]) -> list[str]:
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
        p = r.parity
        if p is None:
            continue
        detail = ", ".join(f"{k}: {n}" for k, n in sorted(p.flip_detail.items())) or "-"
        allowed = "-" if p.allowed is None else f"{p.allowed:.1e}"
        without = "-" if p.without_flips is None else f"{p.without_flips:.1e}"
        lines.append(
            f"| {r.name} | {p.max_abs_diff:.1e} | {allowed} | {p.boundary_flips} | {without} | {detail} |"
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


def _markdown(ctx: RunContext, rows: Sequence[SummaryRow]) -> str:
    """report.md: the data, the summary table, warnings, export parity, FINN, the policy, robustness."""
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
        parity = "-" if r.parity is None else f"{r.parity.max_abs_diff:.1e}"
        flips = "-" if r.parity is None else r.parity.boundary_flips
        robust = f"{100 * r.robust:.1f}" + (" ⚠️" if r.warnings else "")
        lines.append(
            f"| {r.name} | {r.avg_bits:.2f} | {r.kib:.1f} | {100 * r.clean:.1f} | {robust} | "
            f"{100 * r.pgd:.1f} | {parity} | {flips} |"
        )
    lines += _warning_lines(rows)
    lines += ["", "![comparison](comparison.png)", "", *_parity_lines(rows), ""]
    lines += _finn_section(rows)
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
        *_robustness_lines(ctx),
    ]
    return "\n".join(lines)


def _finn_section(rows: Sequence[SummaryRow]) -> list[str]:
    """The FINN section of report.md: one line per exported model (none when FINN was not the target)."""
    finn = finn_lines(rows)
    if not finn:
        return []
    head = [
        "## FINN",
        "",
        "FINN's own front end on each exported file (`finn<suffix>/summary.md` beside it):",
        "",
    ]
    return [*head, *(f"- {ln}" for ln in finn), ""]


def _robustness_lines(ctx: RunContext) -> list[str]:
    """The fine-tuned aq-brevitas model's robustness report, then its other radii on fewer images."""
    from ..evaluate.report import RobustnessReport

    lines = [
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
    return [*lines, "![robustness](robustness.png)", ""]
