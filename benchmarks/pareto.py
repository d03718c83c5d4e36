"""Robust accuracy per BOPs: every method's Pareto front on cnn-pgd and vgg-pgd (issue 17's benchmark).

Per model and seed: search_pareto (selection on held-out *training* images: calibration 256, val
--val-images), then the best point of every method at every budget re-measured on --test-images TEST
images with the per-image worst case of APGD-CE (100 steps) and Square (--queries queries), the measure
of the issue's target. Writes benchmarks/results/pareto.json (and a plot per model under docs/img/).
The sweep's held-out measurements are kept in --cache-dir, so a killed benchmark resumes.

    python benchmarks/pareto.py [--models cnn-pgd vgg-pgd] [--seeds 0] [--test-images 500]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import header, selection_split

HERE = Path(__file__).parent


def _test_worst_case(model, float_model, policy, calib_x, x, y, eps, queries, seed):
    from aq_brevitas import quantize
    from aq_brevitas.evaluate.suite import ChainSettings, suite_accuracies

    q = model if policy is None else quantize(float_model, policy, calibration_data=calib_x).eval()
    acc = suite_accuracies(
        q, x, y, eps=eps, suite=["apgd-ce", "square"], settings=ChainSettings(100, queries, seed)
    )
    return acc["clean"], acc["worst case"]


def run_model(name: str, seed: int, args: argparse.Namespace) -> dict:
    from aq_brevitas import load_float_model, load_split
    from aq_brevitas.search import SearchConfig, search_pareto

    model, _ = load_float_model(name)
    calib, val = selection_split(seed, 256, args.val_images)
    xt, yt = load_split("test", limit=args.test_images, seed=seed)[:2]
    t0 = time.perf_counter()
    config = SearchConfig(seed=seed, val_images=args.val_images)
    cache = args.cache_dir or HERE / "results" / "cache"  # a rerun reads every finished point back
    front = search_pareto(model, calib, val, config=config, cache_dir=cache, progress=False)
    search_s = time.perf_counter() - t0
    front.plot(HERE.parent / "docs" / "img" / f"pareto_{name}_seed{seed}.png")
    rows, seen = [], {}
    float_clean, float_robust = _test_worst_case(
        model, model, None, None, xt, yt, front.eps, args.queries, seed
    )
    for budget in front.budgets:
        for method in ("uniform", "first_last_8", "hessian", "ans", "lipschitz"):
            p = front.best_at(method, budget)
            if p is None:
                continue
            key = tuple(sorted(p.layers.items()))
            if key not in seen:
                seen[key] = _test_worst_case(
                    None, model, p.layerwise_policy, calib[0], xt, yt, front.eps, args.queries, seed
                )
            clean, robust = seen[key]
            rows.append({"budget": budget, "method": method, "layers": p.layers, "bops": p.bops,
                         "kib": p.weight_kib, "val_robust": p.robust_accuracy, "test_clean": clean,
                         "test_robust": robust})  # fmt: skip
    return {
        "model": name, "seed": seed, "search_s": search_s, "seconds": front.seconds,
        "float": {"test_clean": float_clean, "test_robust": float_robust,
                  "val_robust": front.float_robust_accuracy},
        "budgets": front.budgets, "rows": rows, "front": front.to_dict(),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["cnn-pgd", "vgg-pgd"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--val-images", type=int, default=100)
    parser.add_argument("--test-images", type=int, default=500)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--cache-dir", help="measured points (default benchmarks/results/cache)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs = [run_model(m, s, args) for m in args.models for s in args.seeds]
    return {"header": header(), "settings": vars(args), "runs": runs}


def render_section(result: dict) -> list[str]:
    """docs/benchmarks.md: per model, per budget, every method's test robust accuracy, and the targets."""
    s = result["settings"]
    lines = [
        "## Robust accuracy per BOPs: the Pareto comparison (`benchmarks/pareto.py`)",
        "",
        f"{result['header']}. Selection on held-out training images ({s['val_images']} per point, robust = worst "
        "case of PGD-10 and the fast suite at 25 steps / 100 queries); each method's best point per budget then "
        f"re-measured on {s['test_images']} Fashion-MNIST test images: robust = per-image worst case of APGD-CE "
        f"(100 steps) and Square ({s['queries']} queries), ε = 0.1. Seeds: {', '.join(map(str, s['seeds']))}. "
        "Budgets: the BOPs of uniform w2a2, w3a3, w4a4, w5a5, w8a8. Candidates: weight bits 2-8 × "
        "max/percentile/mse × per-tensor/per-channel × input bits 2, 3, 4, 8 (quantized at the producer).",
        "",
    ]
    methods = ("uniform", "first_last_8", "hessian", "ans", "lipschitz")
    for run in result["runs"]:
        fl = run["float"]
        lines += [
            f"### {run['model']}, seed {run['seed']} (float: clean {100 * fl['test_clean']:.1f} %, "
            f"robust {100 * fl['test_robust']:.1f} %; whole sweep {run['search_s']:.0f} s)",
            "",
            "| budget (BOPs) | " + " | ".join(methods) + " | ours − uniform | ours − max(Hessian, ANS) |",
            "|---|" + "---|" * (len(methods) + 2),
        ]
        for b in run["budgets"]:
            got = {r["method"]: r for r in run["rows"] if r["budget"] == b}
            cells = [f"{100 * got[m]['test_robust']:.1f}" if m in got else "—" for m in methods]
            ours, uni = got.get("lipschitz"), got.get("uniform")
            base = [got[m]["test_robust"] for m in ("hessian", "ans") if m in got]
            d_uni = f"{100 * (ours['test_robust'] - uni['test_robust']):+.1f}" if ours and uni else "—"
            d_base = f"{100 * (ours['test_robust'] - max(base)):+.1f}" if ours and base else "—"
            lines.append(f"| {b.split('=')[1]} | " + " | ".join(cells) + f" | {d_uni} | {d_base} |")
        lines += ["", f"![Pareto {run['model']}](img/pareto_{run['model']}_seed{run['seed']}.png)", ""]
    return lines


if __name__ == "__main__":
    from aq_brevitas.storage import atomic_write_json

    atomic_write_json(HERE / "results" / "pareto.json", main())
