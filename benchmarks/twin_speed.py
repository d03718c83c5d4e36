"""The attack twin's speed: a quantized attack step against the float step, before and after.

One PGD step is the forward and the backward to the input (cross-entropy, a batch of 250
Fashion-MNIST test images, 1 thread). Per zoo model and activation policy, in one process and
interleaved round by round (a burst of load on the shared cores hits every variant of a round):

* ``float``: the float model;
* ``frozen``: the Brevitas model inside ``frozen_quant_weights`` (weights quantized once; before);
* ``twin``: the Brevitas model inside ``attack_twin`` (weights once, activation quantizers fused; after).

A ratio is taken within a round, then the median over rounds. Also per case: a PGD-20 attack on 500
test images under the three forwards (seconds, and whether the adversarial examples are identical),
whether twin and Brevitas logits and input gradients are bit-equal, and where a step's time goes
(torch profiler, self CPU per op, ms per step). ``uptime``'s load is recorded before and after.

Resumable: each finished case is written to ``benchmarks/results/twin_speed.json`` as it ends and is
skipped on the next run (delete the file, or pass ``--fresh``, to measure again).

    python benchmarks/twin_speed.py [--rounds 15] [--fresh]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).parent))
from aq_brevitas.attacks import make_attack  # noqa: E402
from aq_brevitas.config import AttackConfig  # noqa: E402
from aq_brevitas.data import load_split  # noqa: E402
from aq_brevitas.forward import frozen_quant_weights  # noqa: E402
from aq_brevitas.models import load_float_model  # noqa: E402
from aq_brevitas.policy import LayerSpec, LayerwisePolicy  # noqa: E402
from aq_brevitas.quantization.convert import quantize  # noqa: E402
from aq_brevitas.quantization.twin import attack_twin, verified_logits  # noqa: E402
from aq_brevitas.storage import atomic_write_json  # noqa: E402
from common import header  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "twin_speed.json"
BATCH = 250
POLICIES = {"w4a4": LayerSpec(4, act_bit_width=4), "w4a8": LayerSpec(4, act_bit_width=8)}
MODELS = ("cnn-pgd", "vgg-pgd")
torch.set_num_threads(1)


def load() -> float:
    return os.getloadavg()[0]


def _step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xa = x.clone().requires_grad_(True)
    out = model(xa)
    (g,) = torch.autograd.grad(F.cross_entropy(out, y), xa)
    return out.detach(), g


def _profile(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 3) -> dict[str, float]:
    """Self CPU ms per step of the 8 costliest ops."""
    from torch.profiler import ProfilerActivity, profile

    _step(model, x, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            _step(model, x, y)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
    return {e.key: round(e.self_cpu_time_total / 1e3 / steps, 2) for e in rows}


def _pgd(model, x, y, guard) -> tuple[float, torch.Tensor]:
    """Seconds of a PGD-20 attack (ε = 0.1) on ``x`` in batches of 250, and its adversarial examples."""
    atk = make_attack(AttackConfig("pgd", 0.1, 20), model, seed=0)
    with guard(model):
        torch.manual_seed(0)
        t0 = time.perf_counter()
        adv = torch.cat([atk(xb, yb) for xb, yb in zip(x.split(BATCH), y.split(BATCH), strict=True)])
        return time.perf_counter() - t0, adv


def case(zoo: str, policy: str, rounds: int) -> dict:
    float_model, _ = load_float_model(zoo)
    float_model.eval()
    calib, _ = load_split("train", limit=256, seed=0)
    x, y = load_split("test", limit=500, seed=0)
    q = quantize(float_model, LayerwisePolicy(default=POLICIES[policy]), calibration_data=calib).eval()
    xs, ys = x[:BATCH], y[:BATCH]
    with frozen_quant_weights(q):
        ref_logits, ref_grad = _step(q, xs, ys)
        profile_frozen = _profile(q, xs, ys)
    with attack_twin(q) as twin:
        logits, grad = _step(q, xs, ys)
        judged = verified_logits(q, xs)
        profile_twin = _profile(q, xs, ys)
    profile_float = _profile(float_model, xs, ys)
    variants = {
        "float": (float_model, lambda m: torch.enable_grad()),  # no guard: a plain forward
        "frozen": (q, frozen_quant_weights),
        "twin": (q, attack_twin),
    }
    load_before = load()
    for _ in range(2):  # warm-up
        for model, guard in variants.values():
            with guard(model):
                _step(model, xs, ys)
    per_round = []
    for _ in range(rounds):
        times = {}
        for name, (model, guard) in variants.items():
            with guard(model):
                t0 = time.perf_counter()
                _step(model, xs, ys)
                times[name] = time.perf_counter() - t0
        per_round.append(times)
    pgd = {name: _pgd(model, x, y, guard) for name, (model, guard) in variants.items()}
    load_after = load()

    def ratio(a: str, b: str) -> dict[str, float]:
        r = [t[a] / t[b] for t in per_round]
        q1, _, q3 = statistics.quantiles(r, n=4)
        return {"median": round(statistics.median(r), 4), "q1": round(q1, 4), "q3": round(q3, 4)}

    return {
        "model": zoo,
        "policy": POLICIES[policy].short(),
        "batch": BATCH,
        "rounds": rounds,
        "load_1min": [round(load_before, 2), round(load_after, 2)],
        "step_ms": {k: round(1e3 * statistics.median(t[k] for t in per_round), 2) for k in variants},
        "frozen_vs_float": ratio("frozen", "float"),
        "twin_vs_float": ratio("twin", "float"),
        "twin_vs_frozen": ratio("twin", "frozen"),
        "pgd20_500_images_s": {k: round(v[0], 2) for k, v in pgd.items()},
        "pgd20_same_adversarials_twin_vs_frozen": bool(torch.equal(pgd["twin"][1], pgd["frozen"][1])),
        "twin": {
            "fused": twin.fused,
            "plain_layers": twin.layers,
            "refused": twin.refused,
            "logits_bit_equal": bool(torch.equal(logits, ref_logits) and torch.equal(judged, ref_logits)),
            "input_grad_bit_equal": bool(torch.equal(grad, ref_grad)),
            "disagreements": twin.disagreements,
            "flipped_codes": twin.flipped,
        },
        "profile_self_cpu_ms_per_step": {
            "float": profile_float,
            "frozen": profile_frozen,
            "twin": profile_twin,
        },
    }


def render_section(result: dict) -> list[str]:
    """docs/benchmarks.md: one PGD step of the quantized model against the float one, before and after the twin."""
    lines = [
        "## The attack twin: a quantized attack step against the float step (`benchmarks/twin_speed.py`)",
        "",
        f"{result['header']}. One PGD step (forward and gradient to the input, batch 250, Fashion-MNIST test "
        "images) of the float model, of the Brevitas model with weights quantized once (`frozen_quant_weights`, "
        "before) and inside `attack_twin` (after), interleaved in one run; medians over rounds of the per-round "
        "ratio (q1–q3). Target (issue 23): ≤ 1.15× the float step. Checked in the same run: the twin's logits "
        "and input gradients bit-equal to Brevitas's, the PGD-20 adversarial examples the same.",
        "",
        "| model, policy | float ms | before ms | twin ms | before / float | twin / float (q1–q3) | bit-equal | PGD-20 on 500 images: float / before / twin s | load |",
        "|---|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for key, c in result["cases"].items():
        ms, tw, fv = c["step_ms"], c["twin_vs_float"], c["frozen_vs_float"]
        equal = (
            c["twin"]["logits_bit_equal"]
            and c["twin"]["input_grad_bit_equal"]
            and c["pgd20_same_adversarials_twin_vs_frozen"]
        )
        pgd = c["pgd20_500_images_s"]
        lines.append(
            f"| {key} | {ms['float']:.0f} | {ms['frozen']:.0f} | {ms['twin']:.0f} | {fv['median']:.2f}× | "
            f"**{tw['median']:.3f}×** ({tw['q1']:.2f}–{tw['q3']:.2f}) | {'yes' if equal else 'NO'} | "
            f"{pgd['float']:.2f} / {pgd['frozen']:.2f} / {pgd['twin']:.2f} | {' → '.join(map(str, c['load_1min']))} |"
        )
    return [*lines, ""]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--fresh", action="store_true", help="measure every case again")
    args = parser.parse_args(argv)
    done = json.loads(RESULTS.read_text()) if RESULTS.exists() and not args.fresh else {}
    done.setdefault("cases", {})
    done["header"] = header()
    for zoo in MODELS:
        for policy in POLICIES:
            key = f"{zoo} {policy}"
            if key in done["cases"]:
                continue
            done["cases"][key] = case(zoo, policy, args.rounds)
            print(
                key, json.dumps({k: done["cases"][key][k] for k in ("step_ms", "twin_vs_float", "load_1min")})
            )
            atomic_write_json(RESULTS, done)  # each case kept as it is measured: a rerun resumes
    return done


if __name__ == "__main__":
    main()
