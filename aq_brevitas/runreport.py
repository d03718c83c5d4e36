"""The last stage of :func:`~aq_brevitas.pipeline.run`: the summary rows and the report (report.md,
report.json, comparison.png), and the names of the files each quantized model of a run writes.

Importing this module does not import torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .storage import atomic_write_json, atomic_write_text, read_json

if TYPE_CHECKING:
    from .pipeline import RunContext
    from .policy import LayerwisePolicy
    from .search.result import HeldOutCheck


@dataclass(frozen=True)
class Variant:
    """One quantized model of the run: its summary label and the names of its files."""

    key: str  # "aq-brevitas" or "uniform": the label in the summary
    stem: str  # of its checkpoints and robustness report: searched_ptq.pt, robustness_searched.json
    suffix: str  # of its policy, ONNX and export record: policy_uniform.json, model_uniform.onnx

    @property
    def policy_file(self) -> str:
        return f"policy{self.suffix}.json"

    def checkpoint(self, stage: str) -> list[str]:
        """The checkpoint of ``stage`` ("ptq" or "finetuned") and its sidecar (save_quantized's pair)."""
        return [f"{self.stem}_{stage}.pt", f"{self.stem}_{stage}.json"]

    @property
    def export_files(self) -> tuple[str, str]:
        return f"model{self.suffix}.onnx", f"export{self.suffix}.json"


VARIANTS = (Variant("aq-brevitas", "searched", ""), Variant("uniform", "uniform", "_uniform"))


def summary_rows(ctx: RunContext) -> list[dict[str, Any]]:
    """Per model (float, uniform, aq-brevitas): average weight bits, weight KiB, clean and PGD accuracy
    at ``eps``, whether gradient masking is suspected, and for the quantized models the export parity
    (max |QONNX − PyTorch|, the same without rounding-boundary flips, the flips per node)."""
    from .report import RobustnessReport

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
            "pgd": rep.accuracy("pgd", ctx.cfg.eps),
            "parity": None,
            "masking_suspected": rep.masking_suspected,
        }
        variant = next((v for v in VARIANTS if v.key == key), None)
        if variant is not None:
            row.update(_parity(read_json(ctx.out / variant.export_files[1], "export record")))
        rows.append(row)
    return rows


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
    upstream = [f"robustness_{s}.json" for s in ("float", *(v.stem for v in VARIANTS))]
    upstream += [v.policy_file for v in VARIANTS] + [v.export_files[1] for v in VARIANTS]
    data = ctx.data.describe()
    inputs = {"model": ctx.identity["model"], "name": ctx.name, **asdict(cfg), "data": data}
    if not ctx.log.start(
        "report", inputs | ctx.log.files(*upstream), ["report.md", "report.json", "comparison.png"]
    ):
        return
    from .plots import plot_comparison

    title = f"{ctx.name}: {cfg.budget}, PGD-{cfg.pgd_steps} at ε={cfg.eps}"
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
    from .policy import LayerSpec
    from .search.result import HeldOutCheck

    v = policy.meta.get("validation")
    if not v:
        return None
    layers = {n: LayerSpec.from_dict(s) for n, s in v["search_layers"].items()}
    return HeldOutCheck(
        **{**v, "uniform_spec": LayerSpec.from_dict(v["uniform_spec"]), "search_layers": layers}
    )


def _held_out_line(policy: LayerwisePolicy) -> str:
    check = held_out_check(policy)
    measured = [] if check is None else [
        f"{label} {acc:.3f}"
        for label, acc in (("searched", check.search_pgd_accuracy),
                           ("unrefined knapsack", check.unrefined_pgd_accuracy),
                           ("best uniform", check.uniform_pgd_accuracy))
        if acc is not None
    ]  # fmt: skip
    if not measured:
        return "No held-out comparison with uniform was made."
    return f"Held-out PGD accuracy: {', '.join(measured)} ({check.images} images)."


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
        f"on {n['test']} test images, PGD-{cfg.pgd_steps}.",
    ]


def _markdown(ctx: RunContext, rows: list[dict[str, Any]]) -> str:
    from .report import RobustnessReport

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
        "| model | avg weight bits | weight KiB | clean | PGD | export parity | boundary flips |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        parity = "-" if r.get("parity") is None else f"{r['parity']:.1e}"
        lines.append(
            f"| {r['name']} | {r['avg_bits']:.2f} | {r['kib']:.1f} | {100 * r['clean']:.1f} | "
            f"{100 * r['pgd']:.1f} | {parity} | {r.get('boundary_flips', '-')} |"
        )
    lines += ["", "![comparison](comparison.png)", "", *_parity_lines(rows), ""]
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
        "![robustness](robustness.png)",
        "",
    ]
    return "\n".join(lines)
