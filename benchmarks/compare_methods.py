"""Method comparison (METHOD.md "Baselines"): uniform / hessian / ans / lipschitz at equal budget.

Models: the PGD-trained zoo nets. Budgets: avg 4 bits, avg 3 bits, and BOPs equal to uniform 4-bit's.
Selection and calibration use the held-out `val` split only; accuracy is measured on the test split:
PTQ (calibrated) clean + PGD-20 on `--ptq-images` test images (default: all 10,000), then 1 epoch of
PGD-7 fine-tuning on `--ft-images` training images and clean + PGD-20 on `--ft-eval-images`.
Identical policies are evaluated once (the table shows which methods coincided).

Usage: python benchmarks/compare_methods.py [--models cnn-pgd vgg-pgd] [--seeds 0 1 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from aq_brevitas.budget import Budget
from aq_brevitas.config import AttackConfig, TrainConfig
from aq_brevitas.data import load_split  # noqa: E402
from aq_brevitas.evaluate.accuracy import accuracy, attack_accuracy
from aq_brevitas.models import load_float_model  # noqa: E402
from aq_brevitas.nnutils import quantizable_layers  # noqa: E402
from aq_brevitas.policy import LayerSpec, LayerwisePolicy
from aq_brevitas.quantization.convert import quantize
from aq_brevitas.search import COMPARE_ORDER, SearchConfig, search_policy  # noqa: E402
from aq_brevitas.search.candidates import candidate_table
from aq_brevitas.train.finetune import adversarial_finetune
from common import header, selection_split  # noqa: E402

METHODS = COMPARE_ORDER  # the method registry: baselines first, lipschitz last
EPS = 0.1


def budgets_for(model: torch.nn.Module) -> dict[str, Budget]:
    w4 = LayerwisePolicy.uniform(quantizable_layers(model), LayerSpec(4))
    return {
        "avg-4": Budget(avg_weight_bits=4),
        "avg-3": Budget(avg_weight_bits=3),
        "bops=w4": Budget(bops=w4.cost(model).bops),
    }


def _evaluate(model, policy, calib_x, test, ft_train, ft_test, seed):
    torch.manual_seed(seed)
    q = quantize(model, policy, calibration_data=calib_x).eval()
    out = {
        "ptq_clean": accuracy(q, *test),
        "ptq_pgd": attack_accuracy(q, *test, AttackConfig("pgd", EPS, 20), seed=seed),
    }
    t0 = time.perf_counter()
    cfg = TrainConfig.finetuning(eps=EPS, steps=7, epochs=1, lr=5e-4, batch_size=128, seed=seed)
    adversarial_finetune(q, ft_train, cfg, progress=False)
    out["ft_seconds"] = time.perf_counter() - t0
    out["ft_clean"] = accuracy(q, *ft_test)
    out["ft_pgd"] = attack_accuracy(q, *ft_test, AttackConfig("pgd", EPS, 20), seed=seed)
    return out


def run_model(name: str, seeds, ptq_images, ft_images, ft_eval_images) -> dict:
    model, _ = load_float_model(name)
    test = load_split("test", limit=ptq_images, seed=0)
    ft_test = load_split("test", limit=ft_eval_images, seed=1)
    rows, evaluated = [], {}
    for seed in seeds:
        calib, val = selection_split(seed)
        t0 = time.perf_counter()
        table = candidate_table(model, calib[0], seed=seed)
        table_s = time.perf_counter() - t0
        ft_train = load_split("train", limit=ft_images, seed=seed)
        for bname, budget in budgets_for(model).items():
            for method in METHODS:
                t0 = time.perf_counter()
                result = search_policy(
                    model,
                    calib,
                    budget,
                    config=SearchConfig(method=method, eps=EPS, seed=seed),
                    val_data=val,
                    table=table,
                    progress=False,
                )
                pol = result.policy
                search_s = time.perf_counter() - t0 + table_s
                key = json.dumps({n: s.to_dict() for n, s in sorted(pol.layers.items())}, sort_keys=True)
                if (seed, key) not in evaluated:
                    evaluated[(seed, key)] = _evaluate(model, pol, calib[0], test, ft_train, ft_test, seed)
                res = evaluated[(seed, key)]
                rows.append({"model": name, "seed": seed, "budget": bname, "method": method, "winner": result.winner,
                             "policy": {n: s.short() for n, s in pol.layers.items()}, "cost": result.cost.summary(),
                             "search_s": search_s, "timing": result.timing.to_dict(), **res})  # fmt: skip
                print(
                    f"{name} seed={seed} {bname:8s} {method:9s} winner={result.winner} ptq_pgd={res['ptq_pgd']:.4f} ft_pgd={res['ft_pgd']:.4f}",
                    flush=True,
                )
    return {
        "rows": rows,
        "ptq_images": len(test[1]),
        "ft_images": ft_images,
        "ft_eval_images": len(ft_test[1]),
    }


def search_cost(name: str = "cnn-pgd") -> dict:
    """Whole search (candidate table included) vs one PGD-20 evaluation of 1,000 images vs Hessian.

    Each method runs ``search_policy`` from scratch (no shared table, no validation against uniform):
    the cost a user pays for a policy. Interleaved with a PGD-20 timing so machine noise hits both.
    """
    import warnings

    model, _ = load_float_model(name)
    model.eval()
    calib, _ = selection_split(0)
    x, y = load_split("test", limit=1000, seed=0)
    out: dict = {"model": name, "budget": "avg-4", "calib_images": len(calib[1]), "pgd_images": len(y)}
    t0 = time.perf_counter()
    attack_accuracy(model, x, y, AttackConfig("pgd", EPS, 20))
    out["pgd20_1k_s"] = time.perf_counter() - t0
    runs = {
        "lipschitz_jacobian": SearchConfig(method="lipschitz"),
        "lipschitz_jacobian_refined": SearchConfig(method="lipschitz", refine=True),
        "lipschitz_spectral": SearchConfig(method="lipschitz").replace(estimate="spectral"),
        "hessian": SearchConfig(method="hessian"),
    }
    for label, config in runs.items():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="search_policy ran without val_data")
            result = search_policy(model, calib, Budget(avg_weight_bits=4), config=config, progress=False)
        out[label] = result.timing.to_dict()
        out["candidates_per_layer"] = next(iter(result.candidates.values())).given
    pgd = out["pgd20_1k_s"]
    lip, hes = out["lipschitz_jacobian"]["total_s"], out["hessian"]["total_s"]
    out["ratios"] = {
        "jacobian_vs_pgd20_1k": lip / pgd,
        "jacobian_refined_vs_pgd20_1k": out["lipschitz_jacobian_refined"]["total_s"] / pgd,
        "spectral_vs_pgd20_1k": out["lipschitz_spectral"]["total_s"] / pgd,
        "hessian_over_jacobian": hes / lip,
        "hessian_over_spectral": hes / out["lipschitz_spectral"]["total_s"],
        # scoring alone (the table and the MILP are the same for every method)
        "hessian_over_jacobian_scoring": out["hessian"]["scoring_s"]
        / (
            out["lipschitz_jacobian"]["scoring_s"]
            + out["lipschitz_jacobian"].get("adversarial_calibration_s", 0.0)
        ),
    }
    return out


def summarise(rows: list[dict]) -> list[dict]:
    """Mean ± std over seeds per (model, budget, method)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["budget"], r["method"]), []).append(r)
    out = []
    for (m, b, meth), rs in groups.items():

        def ms(k, rs=rs):
            vals = [r[k] for r in rs]
            return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

        out.append({"model": m, "budget": b, "method": meth, "n": len(rs), "winners": [r["winner"] for r in rs],
                    **{k: ms(k) for k in ("ptq_clean", "ptq_pgd", "ft_clean", "ft_pgd", "search_s")},
                    "avg_bits": statistics.mean(r["cost"]["avg_weight_bits"] for r in rs)})  # fmt: skip
    return out


def merge(paths: list[str]) -> dict:
    """Combine runs made separately (e.g. one process per seed) into one result with fresh summaries."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    res = {"header": parts[0]["header"], "settings": dict(parts[0]["settings"]), "models": {}}
    res["settings"]["seeds"] = sorted({s for p in parts for s in p["settings"]["seeds"]})
    for part in parts:
        for name, m in part["models"].items():
            tgt = res["models"].setdefault(
                name, {k: v for k, v in m.items() if k not in ("rows", "summary")} | {"rows": []}
            )
            tgt["rows"] += m["rows"]
        if "search_cost" in part:
            res["search_cost"] = part["search_cost"]
    for m in res["models"].values():
        m["rows"].sort(key=lambda r: (r["seed"], r["budget"], METHODS.index(r["method"])))
        m["summary"] = summarise(m["rows"])
    return res


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--merge", nargs="+", default=None, help="merge result files instead of running")
    p.add_argument("--models", nargs="+", default=["cnn-pgd", "vgg-pgd"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--ptq-images", type=int, default=None, help="test images for PTQ numbers (default all 10k)"
    )
    p.add_argument("--ft-images", type=int, default=4096)
    p.add_argument("--ft-eval-images", type=int, default=2000)
    p.add_argument("--no-search-cost", action="store_true")
    p.add_argument(
        "--search-cost-only", action="store_true", help="only time the search; write results/search_cost.json"
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv if argv is not None else sys.argv[1:] if __name__ == "__main__" else [])
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    if args.search_cost_only:
        res = {"header": header(), **search_cost()}
        from aq_brevitas.storage import atomic_write_json

        atomic_write_json(Path(__file__).parent / "results" / "search_cost.json", res)
        return res
    if args.merge:
        res = merge(args.merge)
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=2, default=str))
        return res
    import inspect
    import subprocess

    split = inspect.signature(selection_split).parameters
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    settings = {
        **vars(args),
        "calib_images": split["calib_images"].default,
        "val_images": split["val_images"].default,
    }
    res = {"header": header(), "settings": settings, "commit": commit or None, "eps": EPS, "models": {}}
    for name in args.models:
        res["models"][name] = run_model(
            name, args.seeds, args.ptq_images, args.ft_images, args.ft_eval_images
        )
        res["models"][name]["summary"] = summarise(res["models"][name]["rows"])
    if not args.no_search_cost:
        res["search_cost"] = search_cost()
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2, default=str))
    return res


if __name__ == "__main__":
    main()
