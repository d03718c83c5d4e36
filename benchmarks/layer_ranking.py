"""Which term of the score ranks layers wrongly? (issue 25 §3's ablation, held-out data only.)

Per zoo model: the search's own calibration (256 ``val`` images, PGD-10 at ε = 0.1), candidate table
and scorers (lipschitz's adversarial and quantization terms, Hessian, ANS). Then --pairs (layer,
candidate) pairs are drawn (seeded, every layer alike) and each is measured alone: only that layer
quantized (PTQ, calibrated on the same images), the rest float, on --images *other* held-out ``val``
images. The measured quantity is the increase of the robust loss over the float model's -- the mean
cross-entropy at PGD-10 examples made against that model (same seed) -- and of the PGD-10 error.
Each score is compared with it by Spearman's rank correlation (scipy), over all pairs of a model and
within each layer's candidates (the ranking the knapsack trades on). Measured increases are cached in
``results/cache/layer_ranking`` (a killed run resumes). Writes results/layer_ranking.json.

    python benchmarks/layer_ranking.py [--models cnn-pgd vgg-pgd tfc-pgd resnet-pgd] [--pairs 48]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from common import header, selection_split

HERE = Path(__file__).parent
TERMS = ("adversarial", "quantization", "lipschitz", "hessian", "ans", "calib_ce")


def robust_loss(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int
) -> tuple[float, float]:
    """(mean cross-entropy, error) at PGD-10 examples made against ``model`` (its own attack, seeded)."""
    from aq_brevitas import AttackConfig, make_attack

    model.eval()
    attack = make_attack(AttackConfig("pgd", eps, 10), model, seed=seed)
    torch.manual_seed(seed)
    x_adv = attack(x, y)
    with torch.no_grad():
        logits = model(x_adv)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) != y).float().mean().item()


def scores(model: torch.nn.Module, calib: tuple, eps: float, seed: int) -> tuple[Any, dict[str, dict], Any]:
    """The candidate table and every method's score per (layer, spec), as the search computes them."""
    from aq_brevitas.search import SearchConfig, WeightCache, adversarial_calibration
    from aq_brevitas.search.candidates import candidate_table
    from aq_brevitas.search.config import DEFAULT_ACT_BITS, scorer_for
    from aq_brevitas.search.scorers import ScoringInputs

    cfg = SearchConfig(seed=seed, act_bits=DEFAULT_ACT_BITS, eps=eps)
    adv = adversarial_calibration(model, calib, eps=eps, seed=seed)
    table = candidate_table(model, adv.x_adv, cfg.candidates, seed=seed)
    cache = WeightCache(model, table)
    out: dict[str, dict] = {}
    for method in ("lipschitz", "hessian", "ans"):
        inputs = ScoringInputs(calib, adv if method == "lipschitz" else None, eps, seed, cache)
        scoring = scorer_for(method)(model, table, inputs, cfg.replace(method=method).method_settings)
        out[method] = scoring.scores
        if scoring.terms is not None:
            out["adversarial"], out["quantization"] = scoring.terms.adversarial, scoring.terms.quantization
    return table, out, adv


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from scipy.stats import spearmanr

    from aq_brevitas import LayerwisePolicy, load_float_model, quantize
    from aq_brevitas.evaluate.cache import MeasureCache, data_digest, measurement_key, model_digest

    model = load_float_model(name)[0].eval()
    calib, val = selection_split(args.seed, 256, args.images)
    t0 = time.perf_counter()
    table, by_term, adv = scores(model, calib, args.eps, args.seed)
    score_s = time.perf_counter() - t0
    rng = random.Random(args.seed)
    layers = list(table.rows)
    drawn = (layers[i % len(layers)] for i in range(args.pairs))  # every layer alike
    pairs = [(layer, rng.choice(table.rows[layer]).spec) for layer in drawn]
    pairs = list(dict.fromkeys(pairs))
    cache = MeasureCache(HERE / "results" / "cache" / "layer_ranking")
    base = {"model": model_digest(model), "val": data_digest(*val), "calib": data_digest(calib[0]),
            "eps": args.eps, "seed": args.seed, "attack": "pgd-10"}  # fmt: skip

    def measure(policy: LayerwisePolicy | None) -> dict[str, float]:
        q = model if policy is None else quantize(model, policy, calibration_data=calib[0])
        loss, err = robust_loss(q, *val, args.eps, args.seed)
        with torch.no_grad():  # a candidate score: the loss at the calibration's fixed PGD examples
            calib_ce = F.cross_entropy(q.eval()(adv.x_adv), adv.y).item()
        return {"loss": loss, "error": err, "calib_ce": calib_ce}

    float_ = cache.get_or_measure(measurement_key({**base, "policy": None}), lambda: measure(None))
    rows = []
    for layer, spec in pairs:
        policy = LayerwisePolicy({layer: spec})  # the rest float (quantize warns so, once per pair)
        got = cache.get_or_measure(
            measurement_key({**base, "policy": policy.to_dict()}), lambda p=policy: measure(p)
        )
        rows.append({"layer": layer, "spec": spec.short(), "d_loss": got["loss"] - float_["loss"],
                     "d_error": got["error"] - float_["error"], "calib_ce": got["calib_ce"] - float_["calib_ce"],
                     **{t: float(by_term[t][layer][spec]) for t in TERMS if t != "calib_ce"}})  # fmt: skip
    return {"model": name, "pairs": len(rows), "score_s": score_s, "float": float_, "rows": rows,
            "spearman": _correlations(rows, spearmanr)}  # fmt: skip


def _correlations(rows: list[dict], spearmanr: Any) -> dict[str, dict[str, float | None]]:
    """Spearman's rho of each term with the measured loss increase: over all pairs, and the mean over
    layers of the within-layer rho (layers with ≥ 4 pairs)."""
    out = {}
    by_layer: dict[str, list[dict]] = {}
    for r in rows:
        by_layer.setdefault(r["layer"], []).append(r)
    for term in TERMS:
        rho = spearmanr([r[term] for r in rows], [r["d_loss"] for r in rows]).statistic
        within = [spearmanr([r[term] for r in rs], [r["d_loss"] for r in rs]).statistic
                  for rs in by_layer.values() if len(rs) >= 4]  # fmt: skip
        within = [w for w in within if w == w]  # a layer whose term is constant has no rank order
        out[term] = {"all": None if rho != rho else float(rho),
                     "within_layer": statistics.fmean(within) if within else None}  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["cnn-pgd", "tfc-pgd", "vgg-pgd", "resnet-pgd"])
    parser.add_argument("--pairs", type=int, default=48, help="(layer, candidate) pairs per model")
    parser.add_argument("--images", type=int, default=500, help="held-out val images per measurement")
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    return {"header": header(), "settings": vars(args), "models": [run_model(m, args) for m in args.models]}


LABELS = {"adversarial": "adversarial term ε·J·(L̂/L − 1)", "quantization": "quantization term (measured deviation)",
          "lipschitz": "ours (sum)", "hessian": "Hessian (HAWQ-V2)", "ans": "ANS (QUANOS)",
          "calib_ce": "variant: cross-entropy increase at the calibration's PGD examples"}  # fmt: skip


def render_section(result: dict[str, Any]) -> list[str]:
    """docs/benchmarks.md: Spearman's rho of each term with the measured per-layer robust-loss increase."""
    s = result["settings"]
    models = result["models"]
    lines = [
        "## Which term ranks layers wrongly? (`benchmarks/layer_ranking.py`)",
        "",
        f"{result['header']}. Held-out training data only: per model, {s['pairs']} seeded (layer, candidate) "
        f"pairs, each quantized alone (the rest float) and measured on {s['images']} held-out `val` images: the "
        "increase of the robust loss (mean cross-entropy at PGD-10 examples, ε = 0.1) over the float model's. "
        "Cells: Spearman's ρ of the term with that increase, over all pairs / mean within a layer (higher is better).",
        "",
        "| term | " + " | ".join(m["model"] for m in models) + " |",
        "|---|" + "---|" * len(models),
    ]

    def f(v: float | None) -> str:
        return "—" if v is None else f"{v:+.2f}"

    for term in TERMS:
        cells = [
            f"{f(m['spearman'][term]['all'])} / {f(m['spearman'][term]['within_layer'])}" for m in models
        ]
        lines.append(f"| {LABELS[term]} | " + " | ".join(cells) + " |")
    return lines + [""]


if __name__ == "__main__":
    from aq_brevitas.storage import atomic_write_json

    atomic_write_json(HERE / "results" / "layer_ranking.json", main())
