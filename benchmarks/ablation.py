"""Ablation of the lipschitz score (issue 5 §3: why the "+3 pts over uniform" target is missed).

Per model and average-bits budget, one adversarial calibration (PGD-10 on 256 held-out `val` images)
and one candidate table are shared by every variant:

- estimate: ``jacobian`` (measured deviation) vs ``spectral`` (data-free bound, A_l from data);
- calibration data for the deviation / A_l: adversarial (x_adv) vs clean (x);
- weight of the adversarial term ε·J_loc·(L̂/L − 1): 0, 1 (the default) and 4;
- with vs without refinement (top-5 re-ranking + coordinate descent on the whole-network bound);
- references: best uniform, hessian, ans (same table, same solver).

Selection evidence is PGD-10 accuracy on 500 *other* `val` images (training data); the test subset
(``--test-images``, seeded) is for reporting only. Nothing is tuned on it. Identical policies are
evaluated once. Writes benchmarks/results/ablation.json (incrementally, so a partial run is usable).

Usage: python benchmarks/ablation.py [--models cnn-pgd vgg-pgd] [--budgets 3 2.5] [--test-images 1000]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from aq_brevitas.budget import Budget
from aq_brevitas.config import AttackConfig
from aq_brevitas.data import load_split  # noqa: E402
from aq_brevitas.evaluate.accuracy import accuracy, attack_accuracy
from aq_brevitas.models import load_float_model  # noqa: E402
from aq_brevitas.policy import LayerwisePolicy
from aq_brevitas.quantization.convert import quantize
from aq_brevitas.score.jacobian import local_jacobian_norm
from aq_brevitas.score.lipschitz import lipschitz_scores
from aq_brevitas.search import (  # noqa: E402
    AdversarialCalibration,
    SearchConfig,
    WeightCache,
    adversarial_calibration,
    lipschitz_terms,
    search_policy,
    select_policy,
)
from aq_brevitas.search.candidates import CandidateTable, candidate_table
from aq_brevitas.storage import atomic_write_json  # noqa: E402
from common import header, selection_split  # noqa: E402

EPS = 0.1
RESULTS = Path(__file__).parent / "results" / "ablation.json"


def _clean_calibration(model: torch.nn.Module, adv: AdversarialCalibration) -> AdversarialCalibration:
    """The same images, unattacked: the deviation and J_loc measured at x instead of x_adv."""
    with torch.no_grad():
        base = model(adv.x).detach()
    j_loc = local_jacobian_norm(model, adv.x, tol=1e-4, max_iter=200, seed=0)
    return dataclasses.replace(adv, x_adv=adv.x.clone(), base_logits=base, j_loc=j_loc, attack="none (clean)")


def run_model(name: str, budgets: list[float], test_images: int, seed: int, out: dict) -> None:
    model, _ = load_float_model(name)
    model.eval()
    calib, val = selection_split(seed)
    test = load_split("test", limit=test_images, seed=0)
    t0 = time.perf_counter()
    adv = adversarial_calibration(model, calib, eps=EPS, seed=seed)
    clean = _clean_calibration(model, adv)
    table_adv = candidate_table(model, adv.x_adv, seed=seed)
    # A_l on clean images for the spectral variant: same candidate rows, other input norms.
    table_clean = CandidateTable(lipschitz_scores(model, adv.x, seed=seed), table_adv.rows)
    cache = WeightCache(model, table_adv)
    terms = {
        ("jacobian", "adv"): lipschitz_terms(model, table_adv, adv, eps=EPS, cache=cache),
        ("jacobian", "clean"): lipschitz_terms(model, table_adv, clean, eps=EPS, cache=cache),
        ("spectral", "adv"): lipschitz_terms(model, table_adv, None, eps=EPS, estimate="spectral"),
        ("spectral", "clean"): lipschitz_terms(model, table_clean, None, eps=EPS, estimate="spectral"),
    }
    prep_s = time.perf_counter() - t0
    res = out["models"].setdefault(
        name,
        {"calib_images": len(calib[1]), "val_images": len(val[1]), "test_images": len(test[1]),
         "j_loc_adv": adv.j_loc, "j_loc_clean": clean.j_loc, "prep_s": prep_s, "rows": []},
    )  # fmt: skip
    evaluated: dict[str, dict] = {}
    for bits in budgets:
        budget = Budget(avg_weight_bits=bits)
        variants: dict[str, tuple[LayerwisePolicy, float]] = {}  # label -> (policy, its objective)
        for (estimate, data), t in terms.items():
            weights = (0.0, 1.0, 4.0) if estimate == "jacobian" and data == "adv" else (1.0,)
            for w in weights:
                for refine in (True, False):
                    label = f"{estimate}/{data}/adv-weight={w:g}/{'refine' if refine else 'no-refine'}"
                    table = table_clean if (estimate, data) == ("spectral", "clean") else table_adv
                    config = SearchConfig(eps=EPS, refine=refine).replace(adv_weight=w)
                    sel = select_policy(model, table, t, budget, config=config, cache=cache)
                    done = sel.refinement.done
                    bound = sel.refinement.bound_final if done else sel.solutions[0].objective
                    variants[label] = (LayerwisePolicy(sel.choice), bound)
        for method in ("uniform", "hessian", "ans"):
            result = search_policy(
                model, calib, budget, config=SearchConfig(method=method, eps=EPS, seed=seed), table=table_adv,
                val_data=val if method == "uniform" else None, progress=False,
            )  # fmt: skip
            variants[method] = (result.policy, result.objective)
        for label, (pol, objective) in variants.items():
            key = json.dumps({n: s.short() for n, s in sorted(pol.layers.items())})
            if key not in evaluated:
                torch.manual_seed(seed)
                q = quantize(model, pol, calibration_data=calib[0]).eval()
                t1 = time.perf_counter()
                evaluated[key] = {
                    "val_pgd10": attack_accuracy(q, *val, AttackConfig("pgd", EPS, 10), seed=seed),
                    "test_clean": accuracy(q, *test),
                    "test_pgd20": attack_accuracy(q, *test, AttackConfig("pgd", EPS, 20), seed=seed),
                    "eval_s": time.perf_counter() - t1,
                }
            r = evaluated[key]
            res["rows"].append(
                {"budget": bits, "variant": label, "policy": {n: s.short() for n, s in pol.layers.items()},
                 "avg_bits": pol.cost(model).avg_weight_bits, "bound": objective, **r}
            )  # fmt: skip
            print(
                f"{name} avg-{bits:g} {label:42s} val {r['val_pgd10']:.3f} test clean {r['test_clean']:.3f} "
                f"pgd20 {r['test_pgd20']:.3f}",
                flush=True,
            )
            atomic_write_json(RESULTS, out)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["cnn-pgd", "vgg-pgd"])
    p.add_argument("--budgets", type=float, nargs="+", default=[3.0, 2.5])
    p.add_argument("--test-images", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv if argv is not None else sys.argv[1:] if __name__ == "__main__" else [])
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    out = {"header": header(), "settings": vars(args), "eps": EPS, "models": {}}
    for name in args.models:
        run_model(name, args.budgets, args.test_images, args.seed, out)
    return out


if __name__ == "__main__":
    main()
