"""The Pareto benchmark's verdicts, table and plots, recomputed from the result files alone.

Schema (``benchmarks/results/*pareto*.json``): ``{"runs": [run, ...]}`` (extra top-level keys are
context). A run is one model, seed and stage::

    {"model": "cnn-pgd", "seed": 0, "split": "test" | "heldout", "test_images": 1000,
     "stage": "ptq" | "finetuned", "float_clean_accuracy": 0.83, "float_robust_accuracy": 0.70,
     "points": [{"method": "lipschitz", "budget": "bops=1.1e+07", "feasible": true,
                 "robust_accuracy": 0.61, "clean_accuracy": 0.80, "policy": {...}}, ...]}

Accuracies are fractions; ``robust_accuracy`` is the per-image worst case of PGD-20 and the default
attack suite, None while not yet measured; a point with ``feasible: false`` (no policy of the method
fits the budget) is left out of that budget's comparison. ``split: "heldout"`` runs (selection data)
are listed but never judged. The verdicts judge a (model, budget) cell on the mean over the seeds
measured there, and give the standard error over seeds (n ≥ 2) beside each mean.
"""

from __future__ import annotations

import io
import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

METHODS = ("uniform", "first_last_8", "hessian", "ans", "lipschitz", "lipschitz+check", "lipschitz-top4+check",
           "combined")  # fmt: skip
LABELS = {"uniform": "uniform", "first_last_8": "first/last-8", "hessian": "Hessian", "ans": "ANS",
          "lipschitz": "ours: knapsack", "lipschitz+check": "ours: knapsack + uniform check",
          "lipschitz-top4+check": "ours: measured top-4 + uniform check", "combined": "all combined"}  # fmt: skip
#: the rows judged as "ours" (benchmarks/pareto.py ROWS): what search_policy delivers by default, the
#: measured top-4 variant, and the knapsack's policy alone
JUDGED = ("lipschitz+check", "lipschitz-top4+check", "lipschitz")
MODEL_ORDER = ("cnn-pgd", "tfc-pgd", "vgg-pgd", "resnet-pgd")
GAP_POINTS = 5.0  # "wherever uniform loses >= 5 points to float"
MARGIN_POINTS = 3.0  # "... ours >= uniform + 3 points there"
SHARE_TARGET = 0.8  # "ours >= the better of Hessian/ANS at >= 80 % of budgets"
EXPECTED_RUNS = 12  # 4 models x 3 seeds


def load_runs(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every run of every ``*pareto*.json`` file under ``results_dir``."""
    runs = []
    for path in sorted(Path(results_dir).glob("*pareto*.json")):
        runs += json.loads(path.read_text()).get("runs", [])
    return runs


def complete(run: Mapping[str, Any]) -> bool:
    """Whether every row of :data:`METHODS` has a point at every budget of the run (the w3a3 budget
    for a fine-tuned run) that is measured or infeasible, and the float model is measured."""
    budgets = run["budgets"] if run["stage"] == "ptq" else run["budgets"][1:2]
    have = {(p["method"], p["budget"]) for p in run["points"]
            if p["robust_accuracy"] is not None or not p["feasible"]}  # fmt: skip
    return run.get("float_robust_accuracy") is not None and all(
        (m, b) in have for m in METHODS for b in budgets
    )


def _mean_se(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error over seeds (None for a single seed), in points (×100)."""
    pts = [100 * v for v in values]
    se = statistics.stdev(pts) / math.sqrt(len(pts)) if len(pts) > 1 else None
    return statistics.fmean(pts), se


def _fmt(mean_se: tuple[float, float | None] | None, signed: bool = False) -> str:
    if mean_se is None:
        return "—"
    mean, se = mean_se
    text = f"{mean:+.1f}" if signed else f"{mean:.1f}"
    return text if se is None else f"{text} ± {se:.1f}"


def _robust(run: Mapping[str, Any], method: str, budget: str) -> float | None:
    """The method's measured robust accuracy at ``budget`` in ``run``; None if unmeasured or infeasible."""
    for p in run["points"]:
        if p["method"] == method and p["budget"] == budget and p["feasible"]:
            return p["robust_accuracy"]
    return None


def runs_on_test(runs: Iterable[Mapping[str, Any]], stage: str) -> dict[str, list[Mapping[str, Any]]]:
    """Test-split runs of ``stage`` with the float model measured, per model (zoo order), by seed."""
    by_model: dict[str, list[Mapping[str, Any]]] = {}
    for run in runs:
        if run["split"] == "test" and run["stage"] == stage and run.get("float_robust_accuracy") is not None:
            by_model.setdefault(run["model"], []).append(run)
    order = {m: i for i, m in enumerate(MODEL_ORDER)}
    return {
        m: sorted(by_model[m], key=lambda r: r["seed"])
        for m in sorted(by_model, key=lambda m: (order.get(m, 99), m))
    }


def cell(runs: Sequence[Mapping[str, Any]], budget: str, ours: str = JUDGED[0]) -> dict[str, Any]:
    """One (model, budget): each method's robust accuracies over the seeds where it was measured, the
    float model's, and the per-seed differences the targets are judged on (``ours``: which row)."""
    out: dict[str, Any] = {"float": [r["float_robust_accuracy"] for r in runs]}
    for m in METHODS:
        out[m] = [v for r in runs if (v := _robust(r, m, budget)) is not None]
    pairs = [
        (
            r["float_robust_accuracy"],
            *(_robust(r, m, budget) for m in ("uniform", ours, "hessian", "ans")),
        )
        for r in runs
    ]
    out["ours-uniform"] = [o - u for _, u, o, _, _ in pairs if u is not None and o is not None]
    out["float-uniform"] = [f - u for f, u, _, _, _ in pairs if u is not None]
    out["ours-rivals"] = [o - max(v for v in (h, a) if v is not None) for _, _, o, h, a in pairs
                          if o is not None and (h is not None or a is not None)]  # fmt: skip
    return out


def verdicts(runs: Iterable[Mapping[str, Any]], ours: str = JUDGED[0]) -> dict[str, Any]:
    """The issue's three targets for the row ``ours`` over every (model, budget) cell of the PTQ test runs."""
    cells = []
    for model, rs in runs_on_test(runs, "ptq").items():
        for budget in rs[0]["budgets"]:
            c = cell(rs, budget, ours)
            if c["ours-uniform"]:
                cells.append((model, budget, c))
    vs_uniform = [(m, b, _mean_se(c["ours-uniform"])) for m, b, c in cells]
    gap = [(m, b, _mean_se(c["ours-uniform"])) for m, b, c in cells
           if c["float-uniform"] and _mean_se(c["float-uniform"])[0] >= GAP_POINTS]  # fmt: skip
    rivals = [(m, b, _mean_se(c["ours-rivals"])) for m, b, c in cells if c["ours-rivals"]]
    won = [x for x in rivals if x[2][0] >= 0]
    return {
        "cells": len(cells),
        "vs_uniform": {"misses": [x for x in vs_uniform if x[2][0] < 0], "of": len(vs_uniform),
                       "met": bool(vs_uniform) and all(x[2][0] >= 0 for x in vs_uniform)},
        "gap": {"misses": [x for x in gap if x[2][0] < MARGIN_POINTS], "of": len(gap),
                "met": all(x[2][0] >= MARGIN_POINTS for x in gap)},
        "rivals": {"won": len(won), "of": len(rivals), "misses": [x for x in rivals if x[2][0] < 0],
                   "met": bool(rivals) and len(won) >= SHARE_TARGET * len(rivals)},
    }  # fmt: skip


def _names(run: Mapping[str, Any]) -> dict[str, str]:
    return dict(zip(run["budgets"], run.get("budget_names") or run["budgets"]))


def _misses(items: list) -> str:
    return "; ".join(f"{m} {b}: {_fmt(d, signed=True)}" for m, b, d in items) or "none"


def _verdict_lines(runs: list[Mapping[str, Any]], ours: str) -> list[str]:
    v = verdicts(runs, ours)
    names = {b: n for r in runs if r["split"] == "test" for b, n in _names(r).items()}

    def named(items: list) -> list:
        return [(m, names.get(b, b), d) for m, b, d in items]

    def word(ok: bool) -> str:
        return "**met**" if ok else "**missed**"

    u, g, r = v["vs_uniform"], v["gap"], v["rivals"]
    share = f" ({r['won'] / r['of']:.0%})" if r["of"] else ""
    return [
        f"**{LABELS[ours]}**, judged on {v['cells']} (model, budget) cells, each on the mean over its seeds "
        "(differences in points, ± standard error over seeds):",
        "",
        f"- ours ≥ uniform at every budget: {word(u['met'])}, {u['of'] - len(u['misses'])} of {u['of']} cells "
        f"(below: {_misses(named(u['misses']))}).",
        f"- ours ≥ uniform + {MARGIN_POINTS:g} points wherever uniform loses ≥ {GAP_POINTS:g} points to float: "
        f"{word(g['met'])}, {g['of'] - len(g['misses'])} of {g['of']} such cells (short: {_misses(named(g['misses']))}).",
        f"- ours ≥ the better of Hessian/ANS at ≥ {SHARE_TARGET:.0%} of budgets: {word(r['met'])}, "
        f"{r['won']} of {r['of']} cells{share} "
        f"(behind: {_misses(named(r['misses']))}).",
        "",
    ]


def _model_lines(model: str, rs: list[Mapping[str, Any]], finetuned: list[Mapping[str, Any]]) -> list[str]:
    seeds = ", ".join(str(r["seed"]) for r in rs)
    fl_clean = _mean_se([r["float_clean_accuracy"] for r in rs])
    fl_rob = _mean_se([r["float_robust_accuracy"] for r in rs])
    lines = [
        f"### {model} (seeds {seeds}; float: clean {_fmt(fl_clean)} %, robust {_fmt(fl_rob)} %)",
        "",
        "| budget | "
        + " | ".join(LABELS[m] for m in METHODS)
        + " | ours (checked) − uniform | ours (checked) − max(Hessian, ANS) |",
        "|---|" + "---|" * (len(METHODS) + 2),
    ]
    share = ["", "Share of the float − uniform gap each method recovers ((method − uniform) / (float − uniform), "
             "on the means; — where the gap is under 1 point):", "",
             "| budget | float − uniform | " + " | ".join(LABELS[m] for m in METHODS[1:]) + " |",
             "|---|---|" + "---|" * (len(METHODS) - 1)]  # fmt: skip
    names = _names(rs[0])
    for budget in rs[0]["budgets"]:
        c = cell(rs, budget)
        means = {m: _mean_se(c[m]) if c[m] else None for m in METHODS}
        cells = [
            _fmt(means[m]) + (f" ({len(c[m])})" if c[m] and len(c[m]) < len(rs) else "") for m in METHODS
        ]
        d_uni = _mean_se(c["ours-uniform"]) if c["ours-uniform"] else None
        d_riv = _mean_se(c["ours-rivals"]) if c["ours-rivals"] else None
        lines.append(
            f"| {names[budget]} | " + " | ".join(cells) + f" | {_fmt(d_uni, True)} | {_fmt(d_riv, True)} |"
        )
        gap = _mean_se(c["float-uniform"])[0] if c["float-uniform"] else None
        recovered = []
        for m in METHODS[1:]:
            ok = gap is not None and gap >= 1.0 and means[m] is not None and means["uniform"] is not None
            recovered.append(f"{(means[m][0] - means['uniform'][0]) / gap:+.0%}" if ok else "—")
        share.append(
            f"| {names[budget]} | {'—' if gap is None else f'{gap:.1f}'} | " + " | ".join(recovered) + " |"
        )
    lines += share
    if finetuned:
        budget = finetuned[0]["budgets"][1]
        lines += ["", f"At the BOPs of uniform w3a3, after PGD-7 fine-tuning of each method's policy "
                  f"(seeds {', '.join(str(r['seed']) for r in finetuned)}):", "",
                  "| stage | " + " | ".join(LABELS[m] for m in METHODS) + " |", "|---|" + "---|" * len(METHODS)]  # fmt: skip
        for stage, group in (("PTQ", rs), ("fine-tuned", finetuned)):
            c = cell(group, budget)
            lines.append(
                f"| {stage} | " + " | ".join(_fmt(_mean_se(c[m])) if c[m] else "—" for m in METHODS) + " |"
            )
    return lines + ["", f"![robust accuracy per BOPs, {model}](img/pareto_{model}_test.png)", ""]


def render_section(runs: list[Mapping[str, Any]]) -> list[str]:
    """docs/benchmarks.md: the verdicts, then per model the PTQ table, the gap recovered and the
    fine-tuned column; every figure from the run files."""
    ptq = runs_on_test(runs, "ptq")
    done = [(m, r["seed"]) for m, rs in ptq.items() for r in rs if complete(r)]
    partial = [(m, r["seed"]) for m, rs in ptq.items() for r in rs if not complete(r)]
    images = sorted({r["test_images"] for rs in ptq.values() for r in rs})
    held = sorted({r["heldout"]["val_images"] for rs in ptq.values() for r in rs if "heldout" in r})
    lines = [
        "## Does the method work? Robust accuracy per BOPs on the test split (`benchmarks/pareto.py`)",
        "",
        f"Fashion-MNIST test images ({', '.join(map(str, images)) or '—'} per run, one seeded draw for every seed), "
        "ε = 0.1. Robust = per-image worst case of PGD-20 and the default attack suite (APGD-CE, APGD-DLR, "
        "APGD-T, transfer from the float model, Square; 100 iterations, 500 queries). Each seed draws the "
        f"calibration (256) and held-out ({', '.join(map(str, held)) or '—'}) training images the methods select "
        "on, and the attacks' noise. "
        "Budgets: the BOPs of uniform w2a2 … w8a8; every method on the same candidates, solver and held-out data. "
        "Cells: mean ± standard error over seeds, in %; a count in brackets where fewer seeds are measured.",
        "",
        "Rows: uniform (the best (w, a) pair that fits, on held-out), first/last-8, Hessian (HAWQ-V2) and ANS "
        "(QUANOS) are one policy per budget each, as published; *ours: knapsack* is our knapsack's optimum "
        "alone; *ours: knapsack + uniform check* is what `search_policy` delivers by default (that policy or "
        "the best uniform one, whichever is more robust on the held-out images); *ours: measured top-4 + "
        "uniform check* measures the knapsack's 4 best policies too (`measured_top_k=4`); *all combined* "
        "lets every method's policies compete on the held-out images. Every choice between policies is "
        "made on held-out training images, never on test.",
        "",
        f"Runs complete: {', '.join(f'{m} seed {s}' for m, s in done) or 'none yet'}"
        + (f"; partial: {', '.join(f'{m} seed {s}' for m, s in partial)}" if partial else "")
        + ".",
        "",
    ]
    if ptq and len(done) < EXPECTED_RUNS:
        lines += [f"**Provisional**: {len(done)} of the {EXPECTED_RUNS} (model, seed) runs are complete; the "
                  "verdicts below judge only the cells measured so far.", ""]  # fmt: skip
    for ours in JUDGED if ptq else ():
        lines += _verdict_lines(runs, ours)
    finetuned = runs_on_test(runs, "finetuned")
    for model, rs in ptq.items():
        ft = [
            r for r in finetuned.get(model, []) if any(p["robust_accuracy"] is not None for p in r["points"])
        ]
        lines += _model_lines(model, rs, ft)
    return lines


def plot_figures(runs: list[Mapping[str, Any]], img_dir: str | Path | None = None) -> list[Path]:
    """docs/img/pareto_<model>_test.png: mean robust accuracy (± standard error) against BOPs per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from aq_brevitas.storage import atomic_write_bytes

    out = Path(img_dir or Path(__file__).parent.parent / "docs" / "img")
    written = []
    for model, rs in runs_on_test(runs, "ptq").items():
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for m in METHODS:
            xs, ys, es = [], [], []
            for budget in rs[0]["budgets"]:
                c = cell(rs, budget)[m]
                if c:
                    mean, se = _mean_se(c)
                    xs.append(float(budget.split("=")[1]))
                    ys.append(mean)
                    es.append(se or 0.0)
            if xs:
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=LABELS[m])
        ax.axhline(
            _mean_se([r["float_robust_accuracy"] for r in rs])[0], color="k", ls="--", lw=1, label="float"
        )
        ax.set(xscale="log", xlabel="BOPs", ylabel="robust accuracy (%)",
               title=f"{model}: test split, {rs[0]['test_images']} images, {len(rs)} seed(s)")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        path = out / f"pareto_{model}_test.png"
        atomic_write_bytes(path, buf.getvalue())
        written.append(path)
    return written
