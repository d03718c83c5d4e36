"""Render docs/benchmarks.md from benchmarks/results/*.json (so the doc shows only measured figures)."""

from __future__ import annotations

from typing import Any


def _pm(v: Any) -> str:
    mean, std = v
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _finetune(res: dict) -> list[str]:
    s, d = res["steps"], res["ddp"]
    t = s["seconds"]
    return [
        "## Fine-tuning step costs",
        "",
        f"`python benchmarks/finetune_speed.py` — {res['header']}.",
        f"Model `{s['model']}`, policy {s['spec']} (Brevitas), batch {s['batch']}, PGD-{s['k']}; times are medians of",
        "interleaved runs on the same batch, so machine noise hits all variants alike.",
        "",
        "| ratio | measured | target |",
        "|---|---|---|",
        f"| PGD-{s['k']} fine-tuning step / ({s['k']}+1) × plain Brevitas QAT step | {s['pgd_vs_ideal']:.2f} | ≤ 1.10 |",
        f"| same, without freezing the quantized weights during the attack | {s['pgd_vs_ideal_unfrozen']:.2f} | — |",
        f"| Brevitas QAT step / float step (same architecture) | {s['qat_vs_float']:.2f} | ≤ 2.0 |",
        f"| attack speed-up from quantizing weights once per step | {s['freeze_speedup']:.2f}× | — |",
        f"| fine-tuning throughput, 2 torchrun processes / 1 | {d['throughput_ratio_2_vs_1']:.2f}× | (report) |",
        "",
        f"Absolute medians: float step {1000 * t['float_step']:.0f} ms, QAT step {1000 * t['qat_step']:.0f} ms, "
        f"PGD-{s['k']} step {1000 * t['pgd_step_frozen']:.0f} ms. One epoch on the benchmark subset took "
        f"{d['1']['epoch_s']:.1f} s with 1 process and {d['2']['epoch_s']:.1f} s with 2.",
        "",
        "The PGD step costs less than (k+1) plain steps because the k attack passes need input gradients only",
        "(no weight gradients, no optimizer step). The QAT overhead is Brevitas's per-forward weight and activation",
        "quantization (scale statistics, round/clamp, QuantTensor bookkeeping); during attack steps the weights are",
        "constant, so `frozen_quant_weights` quantizes them once — on this small net that saves only a few percent,",
        "because the activation quantizers, which must run every step, dominate. The 2-process figure is not a",
        "speed-up on these machines: they have 2 cores, shared with other work while this ran, and the epoch is",
        "short (a few seconds), so process start-up and gloo all-reduce weigh as much as the halved compute.",
        "",
    ]


def _compare(res: dict) -> list[str]:
    out = [
        '## Method comparison (METHOD.md "Baselines")',
        "",
        f"`python benchmarks/compare_methods.py` — {res['header']}.",
        "Selection/calibration: 256 held-out `val` images (scores) + 500 other `val` images (never-worse-than-uniform check);",
        "accuracy on the test split. ε = 0.1, PGD-20 (L∞, random start). Mean ± std over the seeds listed per model",
        "(a seed changes the calibration/validation draw, the attack noise and the fine-tuning order).",
        "",
    ]
    for name, m in res["models"].items():
        out += [
            f"### `{name}` — seeds {sorted({r['seed'] for r in m['rows']})}; PTQ on {m['ptq_images']} test images; "
            f"fine-tuning: 1 epoch PGD-7 on {m['ft_images']} training images, evaluated on {m['ft_eval_images']} test images",
            "",
            "| budget | method | avg bits | PTQ clean | PTQ PGD-20 | FT clean | FT PGD-20 | kept (per seed) | search s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        summary = {(r["budget"], r["method"]): r for r in m["summary"]}
        for r in m["summary"]:
            out.append(
                f"| {r['budget']} | {r['method']} | {r['avg_bits']:.2f} | {_pm(r['ptq_clean'])} | {_pm(r['ptq_pgd'])} | "
                f"{_pm(r['ft_clean'])} | {_pm(r['ft_pgd'])} | {', '.join(str(w or 'uniform') for w in r['winners'])} | "
                f"{r['search_s'][0]:.0f} |"
            )
        out += [
            "",
            "Against the compass target (lipschitz ≥ uniform + 3 pts PGD and ≥ hessian, ans), mean PGD points:",
            "",
        ]
        out += [
            "| budget | lipschitz − uniform (PTQ) | lipschitz − best of hessian/ans (PTQ) | lipschitz − uniform (FT) | target met (PTQ) |",
            "|---|---|---|---|---|",
        ]
        for budget in sorted({b for b, _ in summary}):
            lip, uni = summary[(budget, "lipschitz")], summary[(budget, "uniform")]
            rival = max(summary[(budget, "hessian")]["ptq_pgd"][0], summary[(budget, "ans")]["ptq_pgd"][0])
            d_uni = 100 * (lip["ptq_pgd"][0] - uni["ptq_pgd"][0])
            d_riv = 100 * (lip["ptq_pgd"][0] - rival)
            d_ft = 100 * (lip["ft_pgd"][0] - uni["ft_pgd"][0])
            met = "yes" if d_uni >= 3 and d_riv >= 0 else "no"
            out.append(f"| {budget} | {d_uni:+.1f} | {d_riv:+.1f} | {d_ft:+.1f} | {met} |")
        out.append("")
    sc = res.get("search_cost")
    if sc:
        out += [
            "### Search cost (one run, `"
            + sc["model"]
            + "`, avg-4, 36 candidates per layer, 256 calibration images)",
            "",
            "| quantity | seconds / ratio | target |",
            "|---|---|---|",
            f"| candidate table (L̂, ‖ΔW‖ for 36 candidates × layers; shared by all methods) | {sc['candidate_table_s']:.1f} s | — |",
            f"| one PGD-20 evaluation of 1,000 images (float model) | {sc['pgd20_1k_s']:.1f} s | — |",
            f"| lipschitz (jacobian) scoring + MILP | {sc['lipschitz_jacobian_s']:.1f} s | — |",
            f"| lipschitz (spectral) scoring + MILP | {sc['lipschitz_spectral_s']:.2f} s | — |",
            f"| hessian scoring + MILP | {sc['hessian_s']:.1f} s | — |",
            f"| jacobian scoring / PGD-20 on 1k | {sc['lipschitz_vs_pgd20_1k']:.2f}× | ≤ 0.2× |",
            f"| spectral scoring / PGD-20 on 1k | {sc['spectral_vs_pgd20_1k']:.3f}× | ≤ 0.2× |",
            f"| hessian / jacobian scoring | {sc['hessian_over_lipschitz']:.2f}× | ≥ 20× |",
            f"| hessian / spectral scoring | {sc['hessian_over_spectral']:.1f}× | ≥ 20× |",
            "",
        ]
    return out


def _export(res: dict) -> list[str]:
    out = [
        "## Export parity",
        "",
        f"`python benchmarks/export_parity.py` — {res['header']}. Mixed policies (8/5/3/2/1/4 bits cycling over the layers,",
        "per-channel and per-tensor, max/mse/po2/percentile, calibrated input quantizers); real test images.",
        "",
        "| model | format | images | max abs diff vs PyTorch | onnxruntime BASIC | weight bits in file / policy |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        bits = (
            f"{r['exported_weight_bits']:.0f} / {r['policy_weight_bits']}"
            if "policy_weight_bits" in r
            else "-"
        )
        basic = f"{r['ort_basic_diff']:.1e}" if r.get("ort_basic_diff") is not None else "-"
        out.append(
            f"| {r['model']} | {r['format']} | {r['images']} | {r['max_abs_diff']:.1e} | {basic} | {bits} |"
        )
    return out + [""]


def render_benchmarks(results: dict[str, dict]) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Every figure here is regenerated by `make bench` (`python benchmarks/run_all.py`), which saves raw results",
        "under `benchmarks/results/` and rewrites this page. Timings are ratios measured in one run on the same",
        "data, one torch thread (the machines have 2 noisy cores).",
        "",
    ]
    if "finetune_speed" in results:
        lines += _finetune(results["finetune_speed"])
    if "export_parity" in results:
        lines += _export(results["export_parity"])
    if "compare_methods" in results:
        lines += _compare(results["compare_methods"])
    return "\n".join(lines) + "\n"
