"""Search cost (issue 17, "No wasted work"): how the candidate table and a whole search grow with
layers, candidates and input size, before and after batched/shared/optional candidate norms, and
the ratio of a whole ``search_policy`` to one PGD-20 evaluation of 1,000 test images.

"Before" is the table as built until issue 17 (kept here, :func:`legacy_table`): for every (layer,
candidate) its own Ŵ, then its own block power iteration for L̂ and for ‖ΔW‖ (4 vectors, the old
stopping rule, at most 300 steps). "After" is :func:`aq_brevitas.search.candidates.candidate_table`: Ŵ once
per weight part, bit-identical Ŵ sharing one norm, all of a layer's norms in one batched LOBPCG, and
``norms=False`` for methods that read none. Models: the zoo's cnn-pgd and vgg-pgd (Fashion-MNIST,
256 calibration images from the val split) and a float CNV (brevitas_examples bnn_pynq CNV's layers
as float Conv/BN/ReLU/Linear, 3×32×32, random weights and images, 64 calibration images). One run,
``torch.set_num_threads(1)``; the machine is shared, so compare ratios measured in the same run.

Usage: python benchmarks/search_cost.py [--models cnn-pgd vgg-pgd cnv] [--skip-legacy] [--out FILE]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from aq_brevitas.config import AttackConfig
from aq_brevitas.data import load_split  # noqa: E402
from aq_brevitas.evaluate.accuracy import attack_accuracy
from aq_brevitas.folding import bn_scale
from aq_brevitas.models import load_float_model  # noqa: E402
from aq_brevitas.policy import LayerSpec, layer_cost  # noqa: E402
from aq_brevitas.score.lipschitz import lipschitz_scores
from aq_brevitas.score.norms import stacked_layer_map
from aq_brevitas.search import SearchConfig, search_policy  # noqa: E402
from aq_brevitas.search.candidates import (
    CandidateRow,
    CandidateTable,
    candidate_table,
    default_candidates,
    per_layer_candidates,
    quantized_weight,
)
from aq_brevitas.storage import atomic_write_json  # noqa: E402
from common import header, selection_split  # noqa: E402

EPS = 0.1
ACT_BITS = (2, 3, 4, 8)  # issue 17's default activation candidates: 4× the candidate list


# ------------------------------------------------------------------------------------ the old table
def legacy_norm(layer, shape, weight, scale, init=None, tol=1e-5, max_iter=300):
    """The pre-issue-17 block power iteration (4 vectors, one weight): ``(sigma, iterations, block)``."""
    n = math.prod(shape)
    if isinstance(layer, nn.Linear):
        mat = weight.double() if scale is None else weight.double() * scale.double()[:, None]
        return float(torch.linalg.matrix_norm(mat, ord=2)), 1, None
    fmap = stacked_layer_map(layer, weight.double()[None], None if scale is None else scale.double())
    if init is not None:
        q = init
    else:
        q = torch.linalg.qr(
            torch.randn(n, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        )[0]
    sigma = prev = prev2 = 0.0
    for it in range(1, max_iter + 1):
        u, vjp_fn = torch.func.vjp(fmap, q.T.reshape(4, *shape))
        bq = vjp_fn(u)[0].reshape(4, n).T
        h = q.T @ bq
        sigma = math.sqrt(max(float(torch.linalg.eigvalsh((h + h.T) / 2)[-1]), 0.0))
        if sigma == 0.0:
            return 0.0, it, None
        q = torch.linalg.qr(bq)[0]
        step, last = abs(sigma - prev), abs(prev - prev2)
        remaining = step * (step / last) / (1 - step / last) if 0 < step < last else step
        if it >= 3 and max(step, remaining) <= tol * sigma:
            break
        prev2, prev = prev, sigma
    return sigma, it, q


@torch.no_grad()
def legacy_table(model, scores, candidates, dw_norms=True) -> CandidateTable:
    """The candidate table as built before issue 17: Ŵ and two power iterations per (layer, candidate)."""
    table = CandidateTable(scores, model=model)
    modules = dict(model.named_modules())
    for name, specs in per_layer_candidates(candidates, list(scores)).items():
        layer, score = modules[name], scores[name]
        scale = bn_scale(modules[score.bn]) if score.bn else None
        w, shape = layer.weight.detach(), score.input_shape
        basis = legacy_norm(layer, shape, w, scale)[2]
        rows = []
        for spec in specs:
            w_hat = table.weights[(name, spec)] = quantized_weight(layer, spec)
            l_hat = legacy_norm(layer, shape, w_hat, scale, init=basis)[0]
            d = legacy_norm(layer, shape, w_hat - w, scale)[0] if dw_norms else math.nan
            rows.append(CandidateRow(spec, l_hat, d, *layer_cost(spec, score.params, score.macs)))
        table.rows[name] = rows
    return table


# ----------------------------------------------------------------------------------------- models
def float_cnv() -> nn.Module:
    """brevitas_examples bnn_pynq CNV's layers as a float model (same shapes; ReLU for its quant acts)."""
    layers: list[nn.Module] = []
    c = 3
    for out, pool in [(64, False), (64, True), (128, False), (128, True), (256, False), (256, False)]:
        layers += [nn.Conv2d(c, out, 3, bias=False), nn.BatchNorm2d(out, eps=1e-4), nn.ReLU()]
        layers += [nn.MaxPool2d(2)] if pool else []
        c = out
    layers.append(nn.Flatten())
    for i, o in [(256, 512), (512, 512)]:
        layers += [nn.Linear(i, o, bias=False), nn.BatchNorm1d(o, eps=1e-4), nn.ReLU()]
    layers.append(nn.Linear(512, 10, bias=False))
    torch.manual_seed(0)
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.uniform_(m.weight, -1, 1)  # as CNV's own init; BN keeps its unit statistics
    return model.eval()


def model_and_data(name: str):
    """``(model, calib (x, y), val (x, y), test (x, y) of 1,000)``."""
    if name == "cnv":
        model = float_cnv()
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(64 + 200 + 1000, 3, 32, 32, generator=gen)  # no CIFAR-10 here: random images
        with torch.no_grad():
            y = torch.cat([model(x[i : i + 250]).argmax(1) for i in range(0, len(x), 250)])
        return model, (x[:64], y[:64]), (x[64:264], y[64:264]), (x[264:], y[264:])
    model, _ = load_float_model(name)
    calib, val = selection_split(0)
    return model.eval(), calib, val, load_split("test", limit=1000, seed=0)


# ------------------------------------------------------------------------------------- measurements
def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def table_costs(model, x, candidates, skip_legacy: bool) -> dict:
    """Candidate-table seconds: before (legacy), after (norms, L̂ only, none), and the largest
    relative difference between the two tables' norms."""
    scores = lipschitz_scores(model, x, gains=())
    out = {"candidates_per_layer": len(candidates), "layers": len(scores)}
    new, out["after_all_norms_s"] = timed(lambda: candidate_table(model, x, candidates, scores=scores))
    out["after_norm_count"] = new.norm_count
    _, out["after_l_hat_only_s"] = timed(
        lambda: candidate_table(model, x, candidates, scores=scores, dw_norms=False)
    )
    _, out["after_no_norms_s"] = timed(
        lambda: candidate_table(model, x, candidates, scores=scores, norms=False)
    )
    if not skip_legacy:
        old, out["before_all_norms_s"] = timed(lambda: legacy_table(model, scores, candidates))
        _, out["before_l_hat_only_s"] = timed(lambda: legacy_table(model, scores, candidates, dw_norms=False))
        out["max_rel_diff_l_hat"] = max(
            abs(a.L_hat / b.L_hat - 1) for n in new.rows for a, b in zip(new.rows[n], old.rows[n])
        )
        out["max_rel_diff_dw"] = max(
            abs(a.dW_norm / b.dW_norm - 1) for n in new.rows for a, b in zip(new.rows[n], old.rows[n])
        )
    return out


def whole_searches(model, calib, val) -> dict:
    """``search_policy`` from scratch (its own table) with val_data, per method: seconds and parts."""
    out = {}
    for method in ("uniform", "lipschitz"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                config = SearchConfig(method=method, eps=EPS, seed=0)
                res = search_policy(model, calib, "avg-bits=4", config=config, val_data=val, progress=False)
                s = time.perf_counter() - t0
            out[method] = {"total_s": s, "timing": res.timing.to_dict(), "winner": res.winner}
        except Exception as e:  # the search is being changed concurrently: record, do not stop the run
            out[method] = {"error": f"{type(e).__name__}: {e}"}
    return out


def growth_input_size(skip_legacy: bool) -> list[dict]:
    """One Conv2d(16, 16, 3, padding=1) at H = W = 8, 16, 32: table seconds for 36 candidates."""
    rows = []
    for hw in (8, 16, 32):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1)).eval()
        r = table_costs(model, torch.rand(4, 16, hw, hw), default_candidates(), skip_legacy)
        rows.append({"hw": hw, **r})
        print("input", hw, r, flush=True)
    return rows


def growth_layers(skip_legacy: bool) -> list[dict]:
    """A chain of L Conv2d(16, 16, 3, padding=1)+ReLU on 16×16, L = 1..8: table seconds, 36 candidates."""
    rows = []
    for depth in (1, 2, 4, 8):
        torch.manual_seed(0)
        model = nn.Sequential(
            *[m for _ in range(depth) for m in (nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())]
        )
        r = table_costs(model.eval(), torch.rand(4, 16, 16, 16), default_candidates(), skip_legacy)
        rows.append({"layers": depth, **r})
        print("layers", depth, r, flush=True)
    return rows


def run_model(name: str, skip_legacy: bool) -> dict:
    model, calib, val, test = model_and_data(name)
    out: dict = {
        "calib_images": len(calib[1]),
        "val_images": len(val[1]),
        "input_shape": list(calib[0].shape[1:]),
    }
    _, out["pgd20_1k_s"] = timed(lambda: attack_accuracy(model, *test, AttackConfig("pgd", EPS, 20)))
    print(name, "pgd20", out["pgd20_1k_s"], flush=True)
    cands = {"36": default_candidates(), "144_act_bits": default_candidates()}
    cands["144_act_bits"] = [
        LayerSpec(s.weight_bit_width, s.scaling, s.granularity, a)
        for a in ACT_BITS
        for s in default_candidates()
    ]
    out["table"] = {}
    for label, specs in cands.items():
        out["table"][label] = table_costs(model, calib[0], specs, skip_legacy or label != "36")
        print(name, label, out["table"][label], flush=True)
    out["search"] = whole_searches(model, calib, val)
    for r in out["search"].values():
        if "total_s" in r:
            r["ratio_to_pgd20_1k"] = r["total_s"] / out["pgd20_1k_s"]
    print(name, "search", out["search"], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["cnn-pgd", "vgg-pgd", "cnv"])
    ap.add_argument("--skip-legacy", action="store_true", help="do not time the pre-issue-17 table")
    ap.add_argument("--no-growth", action="store_true", help="skip the synthetic layer/input-size sweeps")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "search_cost_scaling.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    res: dict = {"header": header(), "eps": EPS, "budget": "avg-bits=4", "models": {}}
    for name in args.models:
        res["models"][name] = run_model(name, args.skip_legacy)
        atomic_write_json(Path(args.out), res)
    if not args.no_growth:
        res["growth_input_size"] = growth_input_size(args.skip_legacy)
        res["growth_layers"] = growth_layers(args.skip_legacy)
    atomic_write_json(Path(args.out), res)


if __name__ == "__main__":
    main()
