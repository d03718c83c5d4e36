"""Render docs/benchmarks.md from benchmarks/results/*.json (so the doc shows only measured figures)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def _pm(v: Any) -> str:
    mean, std = v
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _finetune(res: dict) -> list[str]:
    s, d = res["steps"], res["ddp"]
    t, q = s["seconds"], s.get("ratio_quartiles", {})

    def cell(key: str, unit: str = "") -> str:
        lo_hi = q.get(key)
        spread = f" ({lo_hi[0]:.2f}–{lo_hi[1]:.2f})" if lo_hi else ""
        return f"{s[key]:.2f}{unit}{spread}"

    return [
        "## Fine-tuning step costs",
        "",
        f"`python benchmarks/finetune_speed.py` — {res['header']}.",
        f"Model `{s['model']}`, policy {s['spec']} (Brevitas), batch {s['batch']}, PGD-{s['k']}; each ratio is the",
        f"median over {s.get('rounds', '?')} interleaved rounds on the same batch (interquartile range in brackets), so",
        "machine noise hits all variants alike.",
        "",
        "| ratio | measured | target |",
        "|---|---|---|",
        f"| PGD-{s['k']} fine-tuning step / ({s['k']}+1) × plain Brevitas QAT step | {cell('pgd_vs_ideal')} | ≤ 1.10 |",
        f"| same, with the progress bar's clean-accuracy forward | {cell('pgd_vs_ideal_with_clean_acc')} | — |",
        f"| same, without freezing the quantized weights during the attack | {cell('pgd_vs_ideal_unfrozen')} | — |",
        f"| Brevitas QAT step / float step, calibrated activation scales kept (fine-tuning default) | {cell('qat_vs_float')} | ≤ 2.0 |",
        f"| Brevitas QAT step / float step, activation scales learned (`learn_act_scales=True`) | {cell('qat_vs_float_learned_act_scales')} | ≤ 2.0 |",
        f"| attack speed-up from quantizing weights once per step | {cell('freeze_speedup', '×')} | — |",
        f"| fine-tuning throughput, 2 torchrun processes / 1 | {d['throughput_ratio_2_vs_1']:.2f}× | (report) |",
        "",
        f"Absolute medians: float step {1000 * t['float_step']:.0f} ms, QAT step {1000 * t['qat_step']:.0f} ms, "
        f"PGD-{s['k']} step {1000 * t['pgd_step_frozen']:.0f} ms. One epoch on the benchmark subset took "
        f"{d['1']['epoch_s']:.1f} s with 1 process and {d['2']['epoch_s']:.1f} s with 2.",
        "",
        "The PGD step costs less than (k+1) plain steps because the k attack passes need input gradients only",
        "(no weight gradients, no optimizer step). The QAT overhead is Brevitas's per-forward weight and activation",
        "quantization; the profile in [finetune_and_evaluate.md](finetune_and_evaluate.md) shows that learning the",
        "activation scales makes the first conv compute a gradient for its 1-channel input, which is why",
        "fine-tuning keeps the calibrated scales by default. During attack steps the weights are constant, so",
        "`frozen_quant_weights` quantizes them once — on this small net that saves only a few percent, because",
        "the activation quantizers, which must run every step, dominate. The 2-process figure is not a",
        "speed-up on these machines: they have 2 cores, shared with other work while this ran, and the epoch is",
        "short (a few seconds), so process start-up and gloo all-reduce weigh as much as the halved compute.",
        "",
    ]


def _split_sizes(res: dict) -> tuple[int, int, str]:
    """Calibration / validation image counts: from the result file, else the benchmark's own defaults."""
    import inspect

    from common import selection_split

    if "calib_images" in res and "val_images" in res:
        return res["calib_images"], res["val_images"], ""
    d = inspect.signature(selection_split).parameters
    return (
        d["calib_images"].default,
        d["val_images"].default,
        " (the benchmark's defaults; not in this result file)",
    )


def _compare(res: dict) -> list[str]:
    calib_n, val_n, note = _split_sizes(res.get("settings", {}))
    out = [
        '## Method comparison (METHOD.md "Baselines")',
        "",
        f"`python benchmarks/compare_methods.py` — {res['header']}.",
        f"Selection/calibration: {calib_n} held-out `val` images (scores) + {val_n} other `val` images "
        f"(never-worse-than-uniform check){note};",
        f"accuracy on the test split. ε = {res.get('eps', 0.1)}, PGD-20 (L∞, random start). Mean ± std over the seeds listed per model",
        "(a seed changes the calibration/validation draw, the attack noise and the fine-tuning order).",
        f"Measured with the code of commit {res['commit']}."
        if res.get("commit")
        else "Measured with the code of commit 7f5456d, before the search speed-ups (warm-started norms, replayed "
        'forwards, ‖ΔW‖ only for the spectral estimate) and before `meta["winner"]` could be `unchecked`; '
        "one default differs: refinement was on then and is off now (it lost held-out accuracy in every case of "
        "the ablation below); the candidates (36), the jacobian estimate and the held-out check are unchanged.",
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
    return out


def _search_cost(sc: dict) -> list[str]:
    r = sc["ratios"]

    def tot(k: str) -> float:
        return sc[k]["total_s"]

    def part(k: str, name: str) -> float:
        return sc[k].get(name, 0.0)

    return [
        f"## Search cost (`{sc['model']}`, {sc['budget']}, {sc['candidates_per_layer']} candidates per layer, "
        f"{sc['calib_images']} calibration images)",
        "",
        f"`python benchmarks/compare_methods.py --search-cost-only` — {sc['header']}. Each row is a whole",
        "`search_policy` call from scratch — adversarial calibration, candidate table, scoring and MILP, no",
        "comparison with uniform — so the candidate table is counted, not left out.",
        "",
        "| run | adv. calibration s | candidate table s | scoring s | MILP s | refinement s | total s |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {k} | {part(k, 'adversarial_calibration_s'):.1f} | {part(k, 'candidate_table_s'):.1f} | "
            f"{part(k, 'scoring_s'):.1f} | {part(k, 'solve_s'):.2f} | {part(k, 'refine_s'):.1f} | {tot(k):.1f} |"
            for k in ("lipschitz_jacobian", "lipschitz_jacobian_refined", "lipschitz_spectral", "hessian")
        ],
        f"| PGD-20 evaluation of {sc['pgd_images']:,} test images (float model) | | | | | | {sc['pgd20_1k_s']:.1f} |",
        "",
        "| ratio | measured | target |",
        "|---|---|---|",
        f"| lipschitz (jacobian) search / PGD-20 on 1k | {r['jacobian_vs_pgd20_1k']:.2f}× | ≤ 0.2× |",
        f"| same, with refinement (`--refine`; off by default since the ablation) | {r['jacobian_refined_vs_pgd20_1k']:.2f}× | — |",
        f"| lipschitz (spectral) search / PGD-20 on 1k | {r['spectral_vs_pgd20_1k']:.2f}× | ≤ 0.2× |",
        f"| hessian search / lipschitz (jacobian) search | {r['hessian_over_jacobian']:.2f}× | ≥ 20× |",
        f"| hessian scoring / jacobian scoring incl. its PGD calibration (table excluded) | "
        f"{r['hessian_over_jacobian_scoring']:.2f}× | — |",
        f"| hessian search / lipschitz (spectral) search | {r['hessian_over_spectral']:.2f}× | ≥ 20× |",
        "",
    ]


def _ablation(res: dict) -> list[str]:
    out = [
        "## Ablation of the lipschitz score (why the +3-point target is missed)",
        "",
        f"`python benchmarks/ablation.py` — {res['header']}. ε = {res['eps']}; one seed ({res['settings']['seed']}).",
        "Selection evidence: PGD-10 accuracy on held-out `val` images (training data); the test subset is for",
        "reporting only and nothing was tuned on it. Variants: estimate / data the deviation (or A_l) is measured",
        "on / weight of the adversarial term / refinement. Identical policies were evaluated once.",
        "",
    ]
    for name, m in res["models"].items():
        out += [
            f"### `{name}` — {m['calib_images']} calibration images, val PGD-10 on {m['val_images']} `val` images, "
            f"test clean and PGD-20 on {m['test_images']} test images; J_loc {m['j_loc_adv']:.3g} at x_adv, "
            f"{m['j_loc_clean']:.3g} at x",
            "",
            "| budget | variant | avg bits | val PGD-10 | test clean | test PGD-20 | policy |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in m["rows"]:
            pol = ", ".join(f"{n}: {s}" for n, s in r["policy"].items())
            out.append(
                f"| avg-{r['budget']:g} | {r['variant']} | {r['avg_bits']:.2f} | {100 * r['val_pgd10']:.1f} | "
                f"{100 * r['test_clean']:.1f} | {100 * r['test_pgd20']:.1f} | {pol} |"
            )
        out.append("")
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


def _ao_agreement(res: dict) -> list[str]:
    out = [
        "## torch.ao agreement with Brevitas",
        "",
        f"`python benchmarks/ao_agreement.py` — {res['header']}. Model `{res['model']}` (float "
        f"{100 * res['float']:.1f} %), the same weights and policy (max-scaled per-channel weights,",
        f"{res['rows'][0]['act_bits']}-bit activations) through Brevitas, torch.ao FX and torchao PT2E; calibration on "
        f"{res['calibration']}; clean accuracy on {res['test_images']:,} test images.",
        "",
        "| weight bits | Brevitas | FX | PT2E | FX − Brevitas | PT2E − Brevitas |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        b, fx, pt = (100 * r[k] for k in ("brevitas", "fx", "pt2e"))
        out.append(f"| {r['weight_bits']} | {b:.1f} | {fx:.1f} | {pt:.1f} | {fx - b:+.1f} | {pt - b:+.1f} |")
    return out + [""]


def _search_scaling(res: dict) -> list[str]:
    """The candidate table's cost before/after batched, deduplicated, on-demand norms, and its growth."""
    lines = [
        "## Search cost: the candidate table and the whole search (`benchmarks/search_cost.py`)",
        "",
        f'{res["header"]}. Budget {res["budget"]}, ε = {res["eps"]}. "before": one power iteration per '
        'candidate and norm; "after": one Ŵ and one norm per distinct weight part, all of a layer\'s '
        "candidates in one batched block iteration, norms only for the methods that read them.",
        "",
        "| model | PGD-20, 1k images (s) | table, all norms: before → after (s) | no norms (s) | "
        "search uniform (× PGD-20) | search lipschitz (× PGD-20) |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in res["models"].items():
        t = m.get("table", {}).get("36", {})
        srch = m.get("search", {})

        def ratio(method: str, srch: dict = srch) -> str:
            r = srch.get(method)
            return "—" if r is None else f"{r['total_s']:.0f} s ({r['ratio_to_pgd20_1k']:.2f}×)"

        before, after = t.get("before_all_norms_s"), t.get("after_all_norms_s")
        cell = f"{before:.1f} → {after:.1f}" if before is not None and after is not None else "—"
        no_norms = t.get("after_no_norms_s")
        lines.append(
            f"| {name} | {m['pgd20_1k_s']:.1f} | {cell} | {'—' if no_norms is None else f'{no_norms:.1f}'} | "
            f"{ratio('uniform')} | {ratio('lipschitz')} |"
        )
    lines += [
        "",
        "The whole-search ratios above were measured while the never-worse-than-uniform check still ran "
        "PGD-10 alone on 500 held-out images. It now runs the per-image worst case of PGD-10 and the fast "
        'suite (about 10× PGD-10\'s time on the same images, see "Attack suite"), and uniform enumerates '
        "one option per maximal (weight, input) bit pair instead of six scaling × granularity variants, so "
        "on the zoo nets a whole search still costs more than one PGD-20 evaluation of 1,000 images: the "
        "≤ 1× target is **missed** there (met on CNV).",
    ]
    lines += ["", "Growth of the table (36 candidates per layer, all norms; seconds, after vs before):", ""]
    for key, label, unit in (
        ("growth_layers", "layers", "layers"),
        ("growth_input_size", "input size", "hw"),
    ):
        pts = res.get(key, [])
        cells = ", ".join(
            f"{p[unit]}: {p['after_all_norms_s']:.1f} vs {p['before_all_norms_s']:.1f}" for p in pts
        )
        lines.append(f"- by {label} ({unit}): {cells}")
    return [*lines, ""]


def _search_whole(res: dict) -> list[str]:
    """The whole search today (attack twin, selection suite, warm starts) against PGD-20 of 1,000 images."""
    lines = [
        "### The whole search today (`benchmarks/search_cost.py --no-growth`)",
        "",
        f"{res['header']}. Budget {res['budget']}, ε = {res['eps']}; `search_policy` from scratch with "
        "held-out images (its never-worse-than-uniform check: PGD-10 + the selection suite, the best uniform "
        "policy's examples replayed on the searched one), against one PGD-20 evaluation of 1,000 test images "
        "of the float model, in the same run. Target (issue 23): ≤ 1× on cnn-pgd, vgg-pgd and CNV (CNV: "
        "random weights and images, timing only).",
        "",
        "| model | held-out images | PGD-20, 1k images (s) | search uniform: s (× PGD-20) | "
        "search lipschitz: s (× PGD-20) | of which held-out check (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in res["models"].items():
        srch = m.get("search", {})

        def cell(method: str, srch: dict = srch) -> str:
            r = srch.get(method, {})
            return f"{r['total_s']:.0f} ({r['ratio_to_pgd20_1k']:.1f}×)" if "total_s" in r else "—"

        val = srch.get("lipschitz", {}).get("timing", {}).get("validation_s")
        lines.append(
            f"| {name} | {m.get('val_images', '—')} | {m['pgd20_1k_s']:.1f} | {cell('uniform')} | "
            f"{cell('lipschitz')} | {'—' if val is None else f'{val:.0f}'} |"
        )
    worst = max(
        (
            r["ratio_to_pgd20_1k"]
            for m in res["models"].values()
            for r in m.get("search", {}).values()
            if "total_s" in r
        ),
        default=float("nan"),
    )
    met = worst <= 1.0
    return lines + [
        "",
        f"Worst ratio {worst:.1f}×: the ≤ 1× target is **{'met' if met else 'missed'}**. The held-out robust "
        "check (the worst case of PGD-10 and the fast suite on every uniform option and the searched policy) "
        "is most of a search on the zoo nets; a cheaper honest check would need the adaptive suite to meet "
        'its accuracy targets first ("Attack suite").',
        "",
    ]


# result name -> its section: a function here, or the benchmark module whose render_section draws it
SECTIONS: list[tuple[str, Callable[[dict], list[str]] | str]] = [
    ("finetune_speed", _finetune),
    ("export_parity", _export),
    ("ao_agreement", _ao_agreement),
    ("compare_methods", _compare),
    ("search_cost", _search_cost),
    ("ablation", _ablation),
    ("search_cost_scaling", _search_scaling),
    ("search_cost_whole", _search_whole),
    ("attack_suite", "attack_suite"),
    ("layer_ranking", "layer_ranking"),
    ("method_variants", "method_variants"),
    ("twin_speed", "twin_speed"),
    ("sweep_cost", "sweep_cost"),
]


def render_benchmarks(results: dict[str, dict]) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Every figure here is regenerated by `make bench` (`python benchmarks/run_all.py`), which saves raw results",
        "under `benchmarks/results/` and rewrites this page. Timings are ratios measured in one run on the same",
        "data, one torch thread (the machines have 2 noisy cores).",
        "",
    ]
    pareto_runs = [run for name, r in results.items() if "pareto" in name for run in r.get("runs", [])]
    if pareto_runs:  # the benchmark that says whether the method works comes first
        lines += importlib.import_module("pareto_verdict").render_section(pareto_runs)
    for name, renderer in SECTIONS:
        if name in results:
            render = (
                importlib.import_module(renderer).render_section if isinstance(renderer, str) else renderer
            )
            lines += render(results[name])
    return "\n".join(lines) + "\n"
