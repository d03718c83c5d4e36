"""What one Pareto point costs, measured once, and spread over torchrun ranks (issue 23, items 4-5).

On cnn-pgd with held-out *training* images (the selection split's val images), ε = 0.1:

* ``per_policy``: the Pareto sweep's measurement of each of a few policies (``_Measure``: quantize,
  calibrate on 256 training images, clean accuracy and the per-image worst case of PGD-10 and the
  selection suite), timed with the cache cold (an empty folder) and then warm (the same folder, a new
  sweep), against one PGD-20 evaluation of the same images on the same quantized model and on the float
  model, back to back in this process;
* ``ranks``: the same measurements under ``torchrun --nproc_per_node=1`` and ``=2`` (gloo, no cache),
  back to back in one run, their measuring seconds (rank 0's wall clock around the sharded
  measurement, start-up excluded) and throughput ratio, with ``uptime``'s load before each;
  and whether the two wrote byte-identical results.

Resumable: every finished section is written to benchmarks/results/sweep_cost.json at once and
skipped on the next run (``--fresh`` redoes all).

    python benchmarks/sweep_cost.py [--images 200] [--policies 6] [--rank-images 100] [--rank-policies 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
OUT = HERE / "results" / "sweep_cost.json"
EPS, PGD_STEPS, SEED = 0.1, 10, 0


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _setup(images: int, policies: int):
    """cnn-pgd, 256 calibration and ``images`` held-out training images, and ``policies`` policies:
    uniform w2a2, w3a3, w4a4, w5a5, w8a8, then w4a4 with the first and last layers at 8/8."""
    from aq_brevitas import LayerSpec, load_float_model
    from aq_brevitas.nnutils import layer_geometry
    from common import selection_split

    torch.set_num_threads(1)
    model = load_float_model("cnn-pgd")[0].eval()
    (cx, _), (vx, vy) = selection_split(SEED, 256, images)
    layers = list(layer_geometry(model, cx[:1]))
    specs = [{n: LayerSpec(b, act_bit_width=b) for n in layers} for b in (2, 3, 4, 5, 8)]
    eight = LayerSpec(8, act_bit_width=8)
    specs.append({**specs[2], layers[0]: eight, layers[-1]: eight})
    return model, cx, (vx[:images], vy[:images]), specs[:policies]


def _measurer(model, cx, val, cache_dir):
    from aq_brevitas.search import SearchConfig
    from aq_brevitas.search.pareto import _Measure

    return _Measure(model, cx, val, SearchConfig(eps=EPS, pgd_steps=PGD_STEPS, seed=SEED), cache_dir)


def _timed(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` and its wall seconds."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def per_policy(args: argparse.Namespace) -> dict:
    """Cold and warm measurement of each policy, and PGD-20 on the same images."""
    from aq_brevitas import AttackConfig, attack_accuracy, quantize
    from aq_brevitas.policy import LayerwisePolicy

    model, cx, val, specs = _setup(args.images, args.policies)
    pgd20 = AttackConfig("pgd", EPS, 20)
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for i, s in enumerate(specs):
            load = _uptime()
            cold, cold_s = _timed(_measurer(model, cx, val, cache), s)  # a new sweep, an empty folder
            warm, warm_s = _timed(_measurer(model, cx, val, cache), s)  # a new sweep, the same folder
            q = quantize(model, LayerwisePolicy(dict(s)), calibration_data=cx).eval()
            _, pgd_q = _timed(attack_accuracy, q, *val, pgd20)
            _, pgd_f = _timed(attack_accuracy, model, *val, pgd20)
            rows.append({
                "policy": sorted({v.short() for v in s.values()}), "clean_robust": cold, "same_when_warm": cold == warm,
                "cold_s": cold_s, "warm_s": warm_s, "pgd20_quantized_s": pgd_q, "pgd20_float_s": pgd_f,
                "cold_over_pgd20_quantized": cold_s / pgd_q, "cold_over_pgd20_float": cold_s / pgd_f,
                "warm_over_pgd20_quantized": warm_s / pgd_q, "uptime_before": load,
            })  # fmt: skip
            print(f"policy {i}: cold {cold_s:.1f} s, warm {warm_s:.3f} s, PGD-20 q {pgd_q:.1f} s", flush=True)
    return {"images": args.images, "policies": len(specs), "rows": rows}


def _as_sweep(specs: list) -> list:
    """The policies of :func:`_setup` as a sweep's ``(method, budget, specs)``: the uniform ones each
    at a budget of its own, the first/last-8 one at the w4a4 budget (so warm starts seed it from w4a4)."""
    from aq_brevitas.budget import as_budget

    budgets = [as_budget(f"bops={i + 1}") for i in range(5)] + [as_budget("bops=3")]
    return [("uniform" if i < 5 else "first_last_8", budgets[i], s) for i, s in enumerate(specs)]


def warm_starts(args: argparse.Namespace) -> dict:
    """Each policy measured cold and warm-started (the float model's examples seed the uniform
    policies, uniform w4a4's the first/last-8 one: the sweep's waves), alternating, on the same images;
    PGD-20 of the quantized model beside it."""
    from aq_brevitas import AttackConfig, attack_accuracy, quantize
    from aq_brevitas.policy import LayerwisePolicy
    from aq_brevitas.search import SearchConfig
    from aq_brevitas.search.pareto import _Measure

    model, cx, val, specs = _setup(args.images, args.policies)
    chosen = _as_sweep(specs)
    pgd20, rows = AttackConfig("pgd", EPS, 20), []
    cfgs = {w: SearchConfig(eps=EPS, pgd_steps=PGD_STEPS, seed=SEED, warm_start=w) for w in (False, True)}
    seeds = _Measure(model, cx, val, cfgs[True], None)
    seeds.prefetch([c for c in chosen if c[0] == "uniform" and c[2] is specs[2]], 1, False)  # float, w4a4
    waves = seeds.waves(chosen)
    for method, _, s in chosen:
        seed = seeds.seen[next(w[seeds._key(s)][1] for w in waves if seeds._key(s) in w)]
        load = _uptime()
        cold, cold_s = _timed(_Measure(model, cx, val, cfgs[False], None)._measure, s)
        warm, warm_s = _timed(_Measure(model, cx, val, cfgs[True], None)._measure, s, seed)
        q = quantize(model, LayerwisePolicy(dict(s)), calibration_data=cx).eval()
        _, pgd_q = _timed(attack_accuracy, q, *val, pgd20)
        rows.append({
            "policy": sorted({v.short() for v in s.values()}), "seeded_by": "float" if method == "uniform" else "w4a4",
            "cold": [cold.clean, cold.robust], "warm": [warm.clean, warm.robust], "warm_broke": warm.warm,
            "cold_s": cold_s, "warm_s": warm_s, "pgd20_quantized_s": pgd_q, "uptime_before": load,
        })  # fmt: skip
        print(f"{method} {rows[-1]['policy']}: cold {cold.robust:.3f} {cold_s:.1f} s, warm {warm.robust:.3f} "
              f"{warm_s:.1f} s (seed broke {warm.warm}), PGD-20 {pgd_q:.1f} s", flush=True)  # fmt: skip
    return {"images": args.images, "policies": len(specs), "rows": rows}


def rank_worker(out: str, images: int, policies: int) -> None:
    """Under torchrun: measure the policies sharded over the ranks; rank 0 writes the results and
    the seconds around the measurement."""
    from aq_brevitas.train.finetune import init_distributed

    rank, world = init_distributed()
    model, cx, val, specs = _setup(images, policies)
    measure = _measurer(model, cx, val, None)
    if world > 1:
        torch.distributed.barrier()  # both ranks loaded: time the measurement alone
    _, seconds = _timed(measure.prefetch, _as_sweep(specs), 1, False)
    if rank == 0:
        results = [measure(s) for s in specs]
        Path(out).write_text(json.dumps({"results": results, "seconds": seconds, "world": world}))
    if world > 1:
        torch.distributed.destroy_process_group()


def ranks(args: argparse.Namespace) -> dict:
    """1 then 2 gloo ranks, back to back, on the same policies and images."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out: dict = {"images": args.rank_images, "policies": args.rank_policies}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 2):
            path = Path(tmp) / f"ranks{n}.json"
            out[f"uptime_before_{n}"] = _uptime()
            cmd = [torchrun, f"--nproc_per_node={n}", "--master_port=29561", __file__, "--rank-worker", str(path),
                   "--rank-images", str(args.rank_images), "--rank-policies", str(args.rank_policies)]  # fmt: skip
            _, wall = _timed(
                subprocess.run, cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=HERE
            )
            got = json.loads(path.read_text())
            out[f"measure_s_{n}"], out[f"wall_s_{n}"] = got["seconds"], wall
            out[f"results_{n}"] = json.dumps(got["results"])
            print(f"{n} rank(s): measuring {got['seconds']:.1f} s (process wall {wall:.1f} s)", flush=True)
    out["throughput_2_over_1"] = out["measure_s_1"] / out["measure_s_2"]
    out["identical_1_vs_2"] = out["results_1"] == out["results_2"]
    return out


def _load(uptime: str) -> str:
    """The 1-minute load average of an ``uptime`` line."""
    return uptime.split("load average: ")[-1].split(",")[0]


def render_section(result: dict) -> list[str]:
    """docs/benchmarks.md: a Pareto point's cost against PGD-20, cold and warm, and 2 ranks against 1."""
    p, r = result["per_policy"], result["ranks"]
    rows = p["rows"]

    def mean(key: str) -> float:
        return sum(row[key] for row in rows) / len(rows)

    lines = [
        "## A Pareto point's cost, measured once, over torchrun ranks (`benchmarks/sweep_cost.py`)",
        "",
        f"{result['header']}. cnn-pgd, {p['images']} held-out training images, ε = 0.1, {p['policies']} policies "
        "(uniform w2a2 … w8a8, w4a4 with first/last 8/8): each policy measured as the Pareto sweep does "
        "(quantize, calibrate on 256 images, clean + worst case of PGD-10 and the selection suite), with the "
        "cache folder empty (cold) and again from a new sweep on the same folder (warm), against one PGD-20 "
        "evaluation of the same images, back to back. Target (issue 23, on 1,000 images): ≤ 4× PGD-20. "
        f"1-minute load before each policy: {', '.join(_load(row['uptime_before']) for row in rows)} (2 cores).",
        "",
        "| policy | cold s | warm s | PGD-20 s: quantized, float | cold / PGD-20: quantized, float | warm / PGD-20 q |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {', '.join(row['policy'])} | {row['cold_s']:.1f} | {row['warm_s']:.3f} | {row['pgd20_quantized_s']:.1f}, "
            f"{row['pgd20_float_s']:.1f} | {row['cold_over_pgd20_quantized']:.1f}×, {row['cold_over_pgd20_float']:.1f}× "
            f"| {row['warm_over_pgd20_quantized']:.4f}× |"
        )
    lines += [
        f"| mean | {mean('cold_s'):.1f} | {mean('warm_s'):.3f} | {mean('pgd20_quantized_s'):.1f}, "
        f"{mean('pgd20_float_s'):.1f} | {mean('cold_s') / mean('pgd20_quantized_s'):.1f}×, "
        f"{mean('cold_s') / mean('pgd20_float_s'):.1f}× | {mean('warm_s') / mean('pgd20_quantized_s'):.4f}× |",
        "",
        f"torchrun, gloo, {r['policies']} policies on {r['images']} images, no cache, 1 then 2 ranks in one run: "
        f"measuring took {r['measure_s_1']:.1f} s on 1 rank and {r['measure_s_2']:.1f} s on 2, "
        f"**{r['throughput_2_over_1']:.2f}×** the throughput (goal ≥ 1.6×; load before: "
        f"{_load(r['uptime_before_1'])} and {_load(r['uptime_before_2'])} (1 minute) on 2 cores). Results byte-identical 1 vs 2 ranks: **{'yes' if r['identical_1_vs_2'] else 'NO'}**.",
        "",
    ]
    return lines + _warm_section(result)


def _warm_section(result: dict) -> list[str]:
    """docs/benchmarks.md: each policy cold and warm-started, and the rejected replay-first trial."""
    if "warm_starts" not in result:
        return []
    w = result["warm_starts"]
    lines = [
        f"Warm starts (issue 23, item 3), {w['images']} held-out training images, the same policies, each "
        "measured cold and then warm (its sweep seed's adversarial examples replayed last, as a transfer "
        "attack), back to back; load before each: "
        f"{', '.join(_load(row['uptime_before']) for row in w['rows'])}.",
        "",
        "| policy | seeded by | robust cold | robust warm | images the seeds broke | cold s | warm s | PGD-20 q s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in w["rows"]:
        lines.append(
            f"| {', '.join(row['policy'])} | {row['seeded_by']} | {100 * row['cold'][1]:.1f} % | "
            f"{100 * row['warm'][1]:.1f} % | {row['warm_broke']} | {row['cold_s']:.1f} | {row['warm_s']:.1f} | "
            f"{row['pgd20_quantized_s']:.1f} |"
        )
    trial = result.get("warm_starts_replay_first_trial")
    if trial:
        above = sum(r["warm"][1] > r["cold"][1] for r in trial["rows"])
        lines += [
            "",
            f"A first design replayed the seeds *first* and dropped the images they broke from every later "
            f"attack: it saved no time and measured robust accuracy above the cold figure on {above} of "
            f"{len(trial['rows'])} policies (by up to "
            f"{100 * max(r['warm'][1] - r['cold'][1] for r in trial['rows']):.1f} points), because the attacks "
            "draw their random starts per batch and the batches changed. Replayed last, the warm figure can "
            "only be at or below the cold one.",
        ]
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--policies", type=int, default=6)
    parser.add_argument("--rank-images", type=int, default=100)
    parser.add_argument("--rank-policies", type=int, default=4)
    parser.add_argument("--fresh", action="store_true", help="redo every section")
    parser.add_argument("--out", type=Path, default=OUT, help="the results JSON")
    parser.add_argument("--rank-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.rank_worker:
        return rank_worker(args.rank_worker, args.rank_images, args.rank_policies)
    from aq_brevitas.storage import atomic_write_json
    from common import header

    done = {} if args.fresh or not args.out.exists() else json.loads(args.out.read_text())
    done.setdefault("header", header())
    for name, section in (("per_policy", per_policy), ("ranks", ranks), ("warm_starts", warm_starts)):
        if name not in done:
            done[name] = section(args)
            atomic_write_json(args.out, done)  # resumable: a finished section is kept
    print(json.dumps({k: v for k, v in done.items() if k != "per_policy"}, indent=1))


if __name__ == "__main__":
    main()
