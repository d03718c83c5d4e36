"""Attack suite benchmark (issue 16): which cheap attacks come close to reference AutoAttack?

For each model/policy, on the first ``--images`` Fashion-MNIST test images at ε = 0.1 (one thread):

* ``candidates``: every candidate attack alone on the clean-correct images (per-image outcome and
  time): PGD-20, APGD-CE, APGD-DLR, APGD-CE on temperature-scaled logits, transfer (PGD-20 on the
  float model, classified by the quantized one), Square with a bounded budget; and the reference
  AutoAttack (APGD-CE, APGD-T, FAB-T at 100 iterations, Square 5,000 queries), chained as the
  reference runs it. Any suite's per-image worst case follows from the stored outcomes.
* ``report``: the default ``evaluate_robustness`` report at ε = 0.1 (the fast suite, the float model
  as the transfer surrogate): its ``robust_accuracy(0.1)``, its time, and which indicators fired.

Quantized models use ``aq_brevitas.quantize`` with calibration images from the training split.

Usage: python benchmarks/attack_suite.py [--phase candidates|report|table] [--images 100] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from aq_brevitas.config import SUITES
from aq_brevitas.data import load_split  # noqa: E402
from aq_brevitas.evaluate.suite import ChainSettings, run_chain, suite_names
from aq_brevitas.forward import eval_mode, frozen_quant_weights
from aq_brevitas.models import load_float_model  # noqa: E402
from aq_brevitas.policy import LayerSpec, LayerwisePolicy  # noqa: E402
from aq_brevitas.quantization.convert import quantize
from common import header  # noqa: E402

EPS = 0.1
RESULTS = Path(__file__).parent / "results"
# name -> (zoo model, policy default spec or None for float, per-layer overrides)
MODELS: dict[str, tuple[str, LayerSpec | None, dict[str, LayerSpec]]] = {
    "vgg-pgd w4a2": ("vgg-pgd", LayerSpec(4, "mse", "per_channel", 2), {}),
    "cnn-pgd float": ("cnn-pgd", None, {}),
    "cnn-pgd w8a8": ("cnn-pgd", LayerSpec(8, "mse", "per_channel", 8), {}),
    "cnn-pgd w4a4": ("cnn-pgd", LayerSpec(4, "mse", "per_channel", 4), {}),
    "vgg-pgd float": ("vgg-pgd", None, {}),
    "vgg-pgd w8a8": ("vgg-pgd", LayerSpec(8, "mse", "per_channel", 8), {}),
    "vgg-pgd w4a4": ("vgg-pgd", LayerSpec(4, "mse", "per_channel", 4), {}),
    "vgg-pgd w2a2": ("vgg-pgd", LayerSpec(2, "mse", "per_channel", 2), {}),
    "vgg-pgd w4a4, 1-bit block2": (
        "vgg-pgd", LayerSpec(4, "mse", "per_channel", 4), {"block2.conv": LayerSpec(1, "mse", "per_channel", 4)}
    ),
}  # fmt: skip
CANDIDATES: dict[str, dict[str, int]] = {  # attack -> its settings
    "pgd": {"steps": 20},
    "apgd-ce": {"steps": 100},
    "apgd-dlr": {"steps": 100},
    "apgd-ce-scaled": {"steps": 100},
    "apgd-ce-25": {"steps": 25},
    "apgd-dlr-25": {"steps": 25},
    "apgd-t3": {"steps": 100},
    "apgd-t3-25": {"steps": 25},
    "transfer": {},
    "square": {"queries": 500},
}


def build(name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(model, float model) for a :data:`MODELS` entry."""
    zoo, spec, layers = MODELS[name]
    float_model, _ = load_float_model(zoo)
    float_model.eval()
    if spec is None:
        return float_model, float_model
    calib = load_split("train", limit=256)[0]
    return quantize(
        float_model, LayerwisePolicy(dict(layers), default=spec), calibration_data=calib
    ).eval(), float_model


def pack(mask: torch.Tensor) -> str:
    return base64.b64encode(bytes(int(v) for v in mask.tolist())).decode()


def candidates(name: str, images: int) -> dict:
    model, float_model = build(name)
    x, y = load_split("test", limit=images)
    path = RESULTS / "attack_suite_candidates.json"
    old = json.loads(path.read_text())["models"].get(name, {}) if path.exists() else {}
    out: dict = {"model": name, "images": images, "eps": EPS, "attacks": dict(old.get("attacks", {}))}
    with eval_mode(model), frozen_quant_weights(model), torch.random.fork_rng(devices=[]):
        with torch.no_grad():
            clean = model(x).argmax(1) == y
        out["clean"] = pack(clean)
        for cand, settings in CANDIDATES.items():
            attack = cand.removesuffix("-25")
            if (attack == "transfer" and float_model is model) or cand in out["attacks"]:
                continue
            kw = ChainSettings(steps=settings.get("steps", 20), queries=settings.get("queries", 500))
            (step,) = run_chain(model, x, y, EPS, [attack], alive=clean, surrogate=float_model, settings=kw)
            out["attacks"][cand] = {"survived": pack(step.survived), "seconds": step.seconds,
                                    "seen": int((step.seen & step.survived).sum())}  # fmt: skip
            print(
                f"  {name:28s} {cand:16s} {step.survived.float().mean():.3f} {step.seconds:6.1f}s", flush=True
            )
        if "reference" in old:
            out["reference"] = old["reference"]
            return out
        c0 = time.process_time()
        chain = run_chain(
            model,
            x,
            y,
            EPS,
            SUITES["reference"],
            alive=clean,
            settings=ChainSettings(),
        )
        out["reference"] = [
            {"attack": s.name, "survived": pack(s.survived), "seconds": s.seconds, "attacked": s.attacked}
            for s in chain
        ]
        out["reference_cpu_seconds"] = time.process_time() - c0
        total = sum(s.seconds for s in chain)
        print(
            f"  {name:28s} reference AA     {chain[-1].survived.float().mean():.3f} {total:6.1f}s", flush=True
        )
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--phase", choices=("paired", "candidates", "report", "schedule", "summary"), default="paired"
    )
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--seeds", action="store_true", help="schedule phase: also the fast suite at seed 1")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.phase == "summary":
        out = summary(json.loads((RESULTS / "attack_suite_paired.json").read_text()))
        (RESULTS / "attack_suite.json").write_text(json.dumps(out, indent=1) + "\n")
        print("\n".join(render_section(out)))
        return out
    path = RESULTS / f"attack_suite_{args.phase}.json"
    result = json.loads(path.read_text()) if path.exists() else {"header": header(), "models": {}}
    for name in args.only or list(MODELS):
        t0 = time.perf_counter()
        if args.phase == "schedule":  # resumable: what a row measured on these images is kept
            row = schedule(name, args.images, result["models"].get(name), seeds=args.seeds)
        else:
            row = {"paired": paired, "candidates": candidates, "report": report_phase}[args.phase](
                name, args.images
            )
        row["wall"], row["header"] = time.perf_counter() - t0, header()
        # re-read before writing: rows another run wrote meanwhile are kept
        result = json.loads(path.read_text()) if path.exists() else result
        result["models"][name] = row
        path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def report_phase(name: str, images: int) -> dict:
    """The default report at ε = 0.1 (the float model as the transfer surrogate), and what it found."""
    from aq_brevitas.config import EvalConfig
    from aq_brevitas.evaluate.robustness import evaluate_robustness

    model, float_model = build(name)
    x, y = load_split("test", limit=images)
    t0, c0 = time.perf_counter(), time.process_time()
    surrogate = None if float_model is model else float_model
    rep = evaluate_robustness(model, (x, y), EvalConfig(eps=(EPS,)), surrogate=surrogate, progress=False)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"  {name:28s} default report {rep.robust_accuracy(EPS):.3f} {seconds:6.1f}s", flush=True)
    return {
        "model": name,
        "report_seconds": seconds,
        "report_cpu_seconds": cpu,
        "suite_seconds": sum(r.seconds for r in rep.results if r.chain == "suite"),
        "robust_accuracy": rep.robust_accuracy(EPS),
        "pgd": rep.accuracy("pgd", EPS),
        "fired": [c.name for c in rep.checks if c.passed is False],
        "report": rep.to_dict(),
    }


def paired(name: str, images: int) -> dict:
    """On one build of the model and the same images: PGD-20, the reference AutoAttack and the default
    report, each timed in wall and CPU seconds (CPU: this process's own time, robust to other load)."""
    from aq_brevitas.config import EvalConfig
    from aq_brevitas.evaluate.robustness import evaluate_robustness

    model, float_model = build(name)
    x, y = load_split("test", limit=images)
    out: dict = {"model": name, "images": images}
    with eval_mode(model), frozen_quant_weights(model), torch.random.fork_rng(devices=[]):
        with torch.no_grad():
            clean = model(x).argmax(1) == y
        for key, names, settings in (
            ("pgd", ["pgd"], ChainSettings(steps=20)),
            ("reference", SUITES["reference"], ChainSettings()),
        ):
            t0, c0 = time.perf_counter(), time.process_time()
            chain = run_chain(model, x, y, EPS, names, alive=clean, settings=settings)
            out[key] = {
                "accuracy": int(chain[-1].survived.sum()) / images,
                "seconds": time.perf_counter() - t0,
                "cpu_seconds": time.process_time() - c0,
                "parts": {s.name: int(s.survived.sum()) / images for s in chain},
            }
    out["clean"] = int(clean.sum()) / images
    t0, c0 = time.perf_counter(), time.process_time()
    surrogate = None if float_model is model else float_model
    rep = evaluate_robustness(model, (x, y), EvalConfig(eps=(EPS,)), surrogate=surrogate, progress=False)
    out["report"] = {
        "accuracy": rep.robust_accuracy(EPS),
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "suite_seconds": sum(r.seconds for r in rep.results if r.chain == "suite"),
        "pgd": rep.accuracy("pgd", EPS),
        "fired": [c.name for c in rep.checks if c.passed is False],
        "warnings": rep.warnings,
    }
    print(f"  {name:28s} pgd {out['pgd']['accuracy']:.2f} ref {out['reference']['accuracy']:.2f} "
          f"({out['reference']['cpu_seconds']:.0f} cpu s) report {out['report']['accuracy']:.2f} "
          f"({out['report']['cpu_seconds']:.0f} cpu s) fired {out['report']['fired']}", flush=True)  # fmt: skip
    return out


def schedule(name: str, images: int, old: dict | None = None, seeds: bool = False) -> dict:
    """Today's fast suite and the adaptive one on one build of the model and the same images
    (clean-correct, then PGD-20 first, as the report runs them), fixed seeds: per suite its robust
    accuracy, wall and CPU seconds, per-image survivors, the schedule's notes and the chain indicators
    (silent successes, optimisation, white-box strongest). ``old``: this row's cached result; a suite
    measured on the same images with the same schedule is kept (an adaptive result of another
    schedule moves to ``trials``). ``seeds``: also the fast suite with its attacks seeded 1 (its own
    spread), kept as ``fast_seed1``."""
    from aq_brevitas.evaluate.suite import SCHEDULES

    model, float_model = build(name)
    x, y = load_split("test", limit=images)
    surrogate = None if float_model is model else float_model
    old = old if old and old.get("images") == images else {}
    out: dict = {"model": name, "images": images, "trials": old.get("trials", [])}
    with eval_mode(model), frozen_quant_weights(model), torch.random.fork_rng(devices=[]):
        with torch.no_grad():
            clean = model(x).argmax(1) == y
        (pgd,) = run_chain(model, x, y, EPS, ["pgd"], alive=clean, settings=ChainSettings(steps=20))
        out.update(clean=pack(clean), pgd=pack(pgd.survived))
        if seeds and "fast_seed1" not in old:  # the fast suite's own spread over its attacks' seed
            out["fast_seed1"] = _measure_suite(model, x, y, pgd.survived, "fast", surrogate, seed=1)
            print(f"  {name:28s} fast seed 1 {out['fast_seed1']['accuracy']:.3f}", flush=True)
        elif "fast_seed1" in old:
            out["fast_seed1"] = old["fast_seed1"]
        for suite in ("fast", "adaptive"):
            tag = repr(SCHEDULES.get(suite))
            if suite in old and old[suite].get("schedule", tag) == tag:
                out[suite] = old[suite]
                continue
            if suite in old:
                out["trials"].append(old[suite])
            out[suite] = _measure_suite(model, x, y, pgd.survived, suite, surrogate)
            print(f"  {name:28s} {suite:9s} {out[suite]['accuracy']:.3f} {out[suite]['cpu_seconds']:6.1f} cpu s "
                  f"fired {out[suite]['fired']}", flush=True)  # fmt: skip
    return out


def _measure_suite(model, x, y, alive, suite: str, surrogate, seed: int = 0) -> dict:
    """One suite's chain from the images ``alive``: its result, timing, indicators and notes."""
    from aq_brevitas.evaluate.indicators import optimisation_check, silent_success_check, white_box_check
    from aq_brevitas.evaluate.suite import SCHEDULES

    names = suite_names(suite, surrogate=surrogate is not None)
    settings = ChainSettings(100, 500, seed=seed, schedule=SCHEDULES.get(suite))
    load, t0, c0 = os.getloadavg()[0], time.perf_counter(), time.process_time()
    chain = run_chain(model, x, y, EPS, names, alive=alive, surrogate=surrogate, settings=settings)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    final, images = chain[-1].survived, len(x)
    white = [s for s in chain if s.name not in ("transfer", "square")]
    k = next(i for i, s in enumerate(chain) if s.name in ("transfer", "square"))
    checks = [
        silent_success_check({EPS: int((torch.stack([s.seen for s in chain]).any(0) & final).sum())}, images),
        optimisation_check({EPS: (white[0].name, white[0].trace)}),
        white_box_check({EPS: (int((chain[k - 1].survived & ~final).sum()), int(alive.sum()), "transfer+square")}),
    ]  # fmt: skip
    return {
        "schedule": repr(SCHEDULES.get(suite)), "accuracy": int(final.sum()) / images, "seconds": wall,
        "cpu_seconds": cpu, "load": load, "survived": pack(final), "notes": [n for s in chain for n in s.notes],
        "parts": {s.name: [int(s.survived.sum()) / images, s.seconds, s.attacked] for s in chain},
        "fired": [c.name for c in checks if c.passed is False],
    }  # fmt: skip


def summary(result: dict) -> dict:
    """One row per model of the paired results (what the docs table shows)."""
    rows = []
    for name, m in result["models"].items():
        rows.append({
            "model": name, "images": m["images"], "clean": m["clean"],
            "pgd": m["pgd"]["accuracy"], "pgd_seconds": m["pgd"]["cpu_seconds"],
            "fast": m["report"]["accuracy"], "fast_seconds": m["report"]["cpu_seconds"],
            "reference": m["reference"]["accuracy"], "reference_seconds": m["reference"]["cpu_seconds"],
            "reference_parts": m["reference"]["parts"], "fired": m["report"]["fired"],
            "measured": m.get("header", result.get("header", "")).split(" · ")[0],
        })  # fmt: skip
    return {"header": result.get("header", ""), "eps": EPS, "rows": rows}


def render_section(result: dict) -> list[str]:
    """The docs/benchmarks.md section of this benchmark (for benchmarks/render_docs.py)."""
    lines = [
        "## Attack suite: the fast suite against reference AutoAttack",
        "",
        f"`python benchmarks/attack_suite.py` — {result['header']}. First {result['rows'][0]['images']} "
        f"Fashion-MNIST test images, ε = {result['eps']}; quantized models calibrated on 256 training images "
        "(mse, per-channel; wXaY = X weight bits, Y activation bits). **fast** is the default report's "
        "`robust_accuracy(0.1)`: the per-image worst case over FGSM, PGD-20, the fast suite and the masking "
        "checks' own attacks, and its time is the whole report's (indicators included). **reference** is "
        "AutoAttack as Croce & Hein define it (APGD-CE, APGD-T with 9 targets, FAB-T at 100 iterations, "
        "Square with 5,000 queries), built from torchattacks classes and chained on the images still "
        "standing. Times are CPU seconds of the benchmark process (one thread; the 2-core machine was shared, so wall "
        "times were up to 5× longer and are not compared).",
        "",
        "| model | clean | PGD-20 | s | fast (report) | s | reference AA | s | gap (pts) | time ratio "
        "| indicators that fired | measured |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in result["rows"]:
        gap = 100 * (r["fast"] - r["reference"])
        lines.append(
            f"| {r['model']} | {100 * r['clean']:.0f}% | {100 * r['pgd']:.0f}% | {r['pgd_seconds']:.1f} "
            f"| {100 * r['fast']:.0f}% | {r['fast_seconds']:.0f} | {100 * r['reference']:.0f}% "
            f"| {r['reference_seconds']:.0f} | {gap:+.0f} | {r['fast_seconds'] / r['reference_seconds']:.2f} "
            f"| {', '.join(f'`{f}`' for f in r['fired']) or 'none'} | {r.get('measured', '')} |"
        )
    return [*lines, "", *render_schedule()]


def unpack(text: str) -> torch.Tensor:
    return torch.tensor(list(base64.b64decode(text)), dtype=torch.bool)


def schedule_rows(result: dict) -> list[dict]:
    """Per row of the schedule phase: both suites' accuracy and CPU seconds, their ratio, the stored
    reference AutoAttack on the 100 images of ``--images 100`` (attack_suite_paired.json, seed 0; among
    these) next to both suites' accuracy on those 100, the indicators that fired and the schedule's notes."""
    paired_path = RESULTS / "attack_suite_paired.json"
    paired = json.loads(paired_path.read_text())["models"] if paired_path.exists() else {}
    rows = []
    for name, m in result["models"].items():
        ref = paired.get(name, {}).get("reference")
        n_ref = paired.get(name, {}).get("images", 0)
        load = "/".join(f"{m[k]['load']:.1f}" if m[k].get("load") else "?" for k in ("fast", "adaptive"))
        row = {"model": name, "images": m["images"], "load": load,
               "clean": float(unpack(m["clean"]).float().mean()), "pgd": float(unpack(m["pgd"]).float().mean())}  # fmt: skip
        for suite in ("fast", "adaptive"):
            row[suite] = m[suite]["accuracy"]
            row[f"{suite}_seconds"] = m[suite]["cpu_seconds"]
            row[f"{suite}_fired"] = m[suite]["fired"]
            at = _positions(n_ref, m["images"]) if ref else None
            row[f"{suite}_first"] = float(unpack(m[suite]["survived"])[at].float().mean()) if ref else None
        row.update(ratio=row["adaptive_seconds"] / row["fast_seconds"], notes=m["adaptive"]["notes"],
                   reference_first=ref["accuracy"] if ref else None, reference_images=n_ref if ref else None)  # fmt: skip
        rows.append(row)
    return rows


def _positions(small: int, large: int, test_images: int = 10_000) -> torch.Tensor:
    """Where the images of ``load_split("test", limit=small)`` sit in ``limit=large`` (same seed 0):
    both are the first draws of one seeded permutation, kept in dataset order."""
    perm = torch.randperm(test_images, generator=torch.Generator().manual_seed(0))
    return torch.searchsorted(perm[:large].sort().values, perm[:small].sort().values)


def render_schedule() -> list[str]:
    """The docs section of the schedule phase (attack_suite_schedule.json), empty until it ran."""
    from aq_brevitas.evaluate.suite import SCHEDULES

    path = RESULTS / "attack_suite_schedule.json"
    if not path.exists():
        return []
    result = json.loads(path.read_text())
    rows = schedule_rows(result)
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lines = [
        "## Attack suite: the adaptive schedule against the fast suite and the reference",
        "",
        f"`python benchmarks/attack_suite.py --phase schedule --images 500` — {result['header']}. "
        "500 Fashion-MNIST test images (`load_split('test', limit=500)`, a seeded random subset), ε = 0.1, seed 0; per row one build of the model, then PGD-20 on "
        "the clean-correct images and, from the images it left standing, today's **fast** suite and the "
        "**adaptive** one (selectable; the default stays fast) back to back in one process (on rows with an earlier schedule below, "
        "the adaptive one was measured again in a later process; the last column gives the 1-minute load average "
        "at each suite's start); seconds are the chain's CPU seconds "
        "(one thread; wall times on the shared machine are noisier), accuracies the per-image worst case of "
        "PGD-20 and the chain. **reference** is the stored reference AutoAttack on the 100 images of "
        "`--images 100` (attack_suite_paired.json: seed 0, same calibration), which are among these 500, next "
        "to both suites on the same 100. "
        "Indicators: no_silent_success, optimisation_complete and white_box_strongest read from each chain. "
        f"The adaptive schedule: {SCHEDULES['adaptive'].describe()} (`{SCHEDULES['adaptive']!r}`); the last "
        "column says, per sampled attack, whether it skipped images (sampled) or escalated to all of them.",
        "",
        "| model | clean | PGD-20 | fast | s | adaptive | s | time ratio | Δ (pts) | reference, 100 images "
        "| fast / adaptive on them | fired (fast / adaptive) | adaptive's sampled attacks | load (fast / adaptive) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        sampled = (
            ", ".join(f"{n.split()[0]} {'all' if 'ran on all' in n else 'sampled'}" for n in r["notes"])
            or "all on all"
        )
        fired = f"{', '.join(r['fast_fired']) or 'none'} / {', '.join(r['adaptive_fired']) or 'none'}"
        lines.append(
            f"| {r['model']} | {pct(r['clean'])} | {pct(r['pgd'])} | {pct(r['fast'])} | {r['fast_seconds']:.0f} "
            f"| {pct(r['adaptive'])} | {r['adaptive_seconds']:.0f} | {r['ratio']:.2f} "
            f"| {100 * (r['adaptive'] - r['fast']):+.1f} | {pct(r['reference_first'])} "
            f"| {pct(r['fast_first'])} / {pct(r['adaptive_first'])} | {fired} | {sampled} | {r['load']} |"
        )
    mean = sum(r["ratio"] for r in rows) / len(rows)
    worst = max(rows, key=lambda r: r["adaptive"] - r["fast"])
    over = ", ".join(
        f"{r['model']} ({100 * (r['adaptive'] - r['fast']):+.1f})"
        for r in rows
        if r["adaptive"] - r["fast"] > 0.005
    )
    refs = [r for r in rows if r["reference_first"] is not None]
    masked = [
        r["model"]
        for r in rows
        if all("white_box_strongest" in r[f"{k}_fired"] for k in ("fast", "adaptive"))
    ]

    def ref_gaps(suite: str) -> str:
        """Points above the reference per row, and the rows past 1 point (2 on masked rows)."""
        gaps = {r["model"]: round(100 * (r[f"{suite}_first"] - r["reference_first"])) for r in refs}
        miss = [m for m, g in gaps.items() if g > (2 if m in masked else 1)]
        return (
            ", ".join(f"{m} {g:+d}" for m, g in gaps.items())
            + f" (past the target: {', '.join(miss) or 'none'})"
        )

    lines += [
        "",
        f"Mean time ratio (adaptive / fast) over these {len(rows)} rows: **{mean:.2f}** (target ≤ 0.25); largest "
        f"excess over the fast suite {100 * (worst['adaptive'] - worst['fast']):+.1f} points ({worst['model']}; "
        "target ≤ +0.5).",
        "",
        f"Rows above the fast suite by more than 0.5 points: {over or 'none'}. Against the stored reference on "
        f"those 100 images (one image is one point), in points above it: adaptive {ref_gaps('adaptive')}; fast "
        f"{ref_gaps('fast')}. Masked rows where white_box_strongest fired for both suites: "
        f"{', '.join(masked) or 'none'}. Rows defined but not run at 500 images: "
        f"{', '.join(m for m in MODELS if m not in result['models']) or 'none'}.",
        "",
    ]
    spread = [
        f"{name} {pct(m['fast']['accuracy'])} → {pct(m['fast_seed1']['accuracy'])} "
        f"({100 * (m['fast_seed1']['accuracy'] - m['fast']['accuracy']):+.1f})"
        for name, m in result["models"].items()
        if "fast_seed1" in m
    ]
    if spread:
        lines += [
            "The fast suite's own spread: the same chain with its attacks seeded 1 instead of 0 (same model, "
            f"images and PGD-20), seed 0 → seed 1: {'; '.join(spread)}.",
            "",
        ]
    lines += [
        "What this says. The time target (≤ 0.25× the fast suite on average) is **missed**: 0.31–0.43× "
        "the fast suite's time on the rows where no sample lost an image, but on the masked rows (vgg-pgd w4a2, "
        "w2a2) a sample lost images and the attacks after it ran everywhere, and on the 1-bit row (which breaks "
        "the model: 9.4% clean, so timing only) fewer images stand than a sample holds. Halving APGD-CE's "
        "iterations (the v2 trial below) reached about 0.26× on the unmasked rows but cost up to 1.4 points on "
        "masked ones. The +0.5-point target is **missed** on four rows by 0.6–1.2 points; the fast suite's "
        "own change from seed 0 to seed 1 is of the same size on three of them (+0.6, +0.6, +1.2), not on "
        "cnn-pgd float (0.0). The indicators fire on the masked rows as they do for the fast suite "
        "(white_box_strongest on vgg-pgd w4a2 and w2a2). The reference AutoAttack was not re-run at 500 "
        "images (about 300 CPU s per 100 images and row); the stored 100-image runs are the comparison.",
        "",
    ]
    trials = [(name, t) for name, m in result["models"].items() for t in m.get("trials", [])]
    if trials:
        by: dict[str, list[tuple[float, float]]] = {}
        for name, t in trials:
            fast = result["models"][name]["fast"]
            by.setdefault(t["schedule"], []).append(
                (t["cpu_seconds"] / fast["cpu_seconds"], t["accuracy"] - fast["accuracy"])
            )
        lines += ["Earlier schedules measured on the same rows and images (replaced), each with its mean time ratio "
                  "and largest excess over the fast suite over the rows it ran on:", ""]  # fmt: skip
        lines += [
            f"- `{tag}`: {len(v)} rows, mean time ratio {sum(r for r, _ in v) / len(v):.2f}, largest excess "
            f"{100 * max(d for _, d in v):+.1f} points."
            for tag, v in by.items()
        ]
        lines += ["", "Per row:", ""]
        for name, t in trials:
            fast = result["models"][name]["fast"]
            lines.append(
                f"- {name}: `{t['schedule']}`: {pct(t['accuracy'])} against the fast suite's {pct(fast['accuracy'])}, "
                f"{t['cpu_seconds'] / fast['cpu_seconds']:.2f}× its time."
            )
        lines.append("")
    return lines


if __name__ == "__main__":
    main()
