"""Matplotlib figures (Agg backend, written atomically): where people would rather look than read."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import ConfigError
from .storage import atomic_write_with, check_output_file


def check_plot_path(path: str | os.PathLike[str], option: str = "--plot") -> None:
    """Refuse a plot path matplotlib cannot write (bad directory or unknown extension) before any work."""
    from matplotlib.backend_bases import FigureCanvasBase

    check_output_file(path, option, suffix=".png")
    suffix = os.path.splitext(str(path))[1].lstrip(".").lower()
    kinds = sorted(FigureCanvasBase.get_supported_filetypes())
    if suffix and suffix not in kinds:
        raise ConfigError(
            f"{option} {path}: matplotlib cannot write .{suffix} files",
            f"use one of the extensions {', '.join('.' + k for k in kinds)}",
        )


def _figure(width: float = 7.0, height: float = 3.6, ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(1, ncols, figsize=(width, height), constrained_layout=True)


def _save(plt: Any, fig: Any, path: str | os.PathLike[str]) -> None:
    suffix = os.path.splitext(str(path))[1].lstrip(".").lower() or "png"
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=120, format=suffix))
    plt.close(fig)


def plot_layer_scores(scores: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Per-layer bars: operator norm L, input norm A, and both downstream gains (log scale)."""
    import numpy as np

    plt, fig, ax = _figure(max(6.0, 1.1 * len(scores) + 2))
    names = list(scores)
    series = {
        "L (operator norm)": [scores[n].L for n in names],
        "Λ spectral": [scores[n].gain_spectral or np.nan for n in names],
        "Λ jacobian": [scores[n].gain_jacobian or np.nan for n in names],
        "A (input norm)": [scores[n].A for n in names],
    }
    width = 0.8 / len(series)
    x = np.arange(len(names))
    for i, (label, vals) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, label=label)
    ax.set_yscale("log")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_title("Per-layer Lipschitz scores")
    ax.legend(fontsize=8)
    _save(plt, fig, path)


def plot_policy(
    policy: Any, geometry: Mapping[str, Any], path: str | os.PathLike[str], title: str = "Per-layer policy"
) -> None:
    """The per-layer chart of ``policy`` (a :class:`~aq_brevitas.LayerwisePolicy`) over the layers of
    ``geometry`` (layer name -> anything with ``params``: a ``LayerGeometry``, a ``LayerScore``): one
    bar per layer at its weight bits, labelled with scaling, granularity and weight count."""
    import numpy as np

    names = list(geometry)
    specs = [policy.spec_for(n) for n in names]
    plt, fig, ax = _figure(max(6.0, 0.9 * len(names) + 2))
    x = np.arange(len(names))
    bits = [s.weight_bit_width for s in specs]
    bars = ax.bar(x, bits, color=[plt.cm.viridis(b / 8) for b in bits])
    for bar, s, n in zip(bars, specs, names, strict=True):
        ax.annotate(
            f"{s.scaling} {'pc' if s.granularity == 'per_channel' else 'pt'}\n{geometry[n].params:,} w",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("weight bits")
    ax.set_ylim(0, 9.5)
    ax.set_title(title)
    _save(plt, fig, path)


def plot_study(result: Any, path: str | os.PathLike[str]) -> None:
    """Accuracy drop vs weight bits, clean (dashed) and PGD (solid), one colour per model."""
    plt, fig, ax = _figure()
    models = sorted({r.model for r in result.rows})
    for i, name in enumerate(models):
        rows = sorted(
            (r for r in result.rows if r.model == name and r.bits is not None), key=lambda r: r.bits
        )
        bits = [r.bits for r in rows]
        color = f"C{i}"
        ax.plot(bits, [100 * r.pgd_drop for r in rows], "-o", color=color, label=f"{name}: PGD drop")
        ax.plot(bits, [100 * r.clean_drop for r in rows], "--s", color=color, label=f"{name}: clean drop")
    ax.set_xlabel("weight bits (uniform, per-channel)")
    ax.set_ylabel("accuracy drop vs float (pts)")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Claim 1: accuracy lost to quantization")
    _save(plt, fig, path)


def plot_robustness(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    clean: float | None,
    path: str | os.PathLike[str],
    title: str = "Robust accuracy",
) -> None:
    """Accuracy vs ε, one line per attack (single points for subset attacks); clean accuracy dashed."""
    plt, fig, ax = _figure(6.4, 4.0)
    for label, (eps, acc) in series.items():
        ax.plot(
            list(eps),
            [100 * a for a in acc],
            marker="o",
            linestyle="-" if len(eps) > 1 else "none",
            label=label,
        )
    if clean is not None:
        ax.axhline(100 * clean, color="grey", linestyle="--", label=f"clean ({100 * clean:.1f}%)")
    ax.set_xlabel("ε (L∞, images in [0, 1])")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=8)
    _save(plt, fig, path)


def plot_metric_validation(
    bound: Sequence[float],
    score_sum: Sequence[float],
    robust_error: Sequence[float],
    path: str | os.PathLike[str],
    title: str = "Bound vs robust error",
) -> None:
    """Random equal-cost policies: predicted bound B(p) (and the additive Σ s) against robust error,
    1 − the per-image worst case of PGD and the fast attack suite."""
    plt, fig, ax = _figure(6.4, 4.0)
    err = [100 * e for e in robust_error]
    ax.scatter(list(bound), err, marker="o", label="whole-network bound B(p)")
    ax.scatter(list(score_sum), err, marker="x", label="additive score Σ s_l")
    ax.set_xlabel("predicted output deviation (logit units)")
    ax.set_ylabel("robust error, 1 − worst-case accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    _save(plt, fig, path)


def plot_comparison(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], title: str = "") -> None:
    """Clean, robust (per-image worst case over every attack; ``pgd`` for rows without it) and PGD
    accuracy bars per model (float, uniform, aq-brevitas); a model with warnings gets "(!)"."""
    import numpy as np

    plt, fig, ax = _figure(6.5, 3.6)
    x = np.arange(len(rows))
    ax.bar(x - 0.27, [100 * r["clean"] for r in rows], 0.27, label="clean")
    ax.bar(x, [100 * r.get("robust", r["pgd"]) for r in rows], 0.27, label="robust (worst case)")
    ax.bar(x + 0.27, [100 * r["pgd"] for r in rows], 0.27, label="PGD alone")
    for i, r in enumerate(rows):
        ax.annotate(f"{r['avg_bits']:.2f} b", (i, 2), ha="center", fontsize=8, color="white")
    ax.set_xticks(x, [r["name"] + (" (!)" if r.get("warnings") else "") for r in rows], rotation=10)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.set_title(title, fontsize=9)
    _save(plt, fig, path)


_PARETO_STYLE = {  # method -> (marker, label)
    "uniform": ("s", "uniform (w, a)"),
    "first_last_8": ("^", "first/last at 8 bits"),
    "hessian": ("v", "Hessian (HAWQ-V2)"),
    "ans": ("D", "ANS (QUANOS)"),
    "lipschitz": ("o", "aq-brevitas (lipschitz)"),
}


def plot_pareto(front: Any, path: str | os.PathLike[str]) -> None:
    """Robust accuracy (%) against BOPs (left) and weight KiB (right) for every method of a
    :class:`~aq_brevitas.search.ParetoFront`: each method's non-dominated points joined by a line,
    its dominated ones faint, the uniform (w, a) points labelled, and the float model's robust
    accuracy as a dashed line. Both cost axes are logarithmic."""
    plt, fig, axes = _figure(10.0, 4.0, ncols=2)
    for ax, (attr, unit) in zip(axes, (("bops", "BOPs"), ("weight_kib", "weight KiB"))):
        for method, (marker, label) in _PARETO_STYLE.items():
            pts = [p for p in front.points if p.method == method]
            if not pts:
                continue
            best = sorted((p for p in pts if not p.dominated), key=lambda p: getattr(p, attr))
            line = ax.plot([getattr(p, attr) for p in best], [100 * p.robust_accuracy for p in best],
                           marker=marker, label=label)[0]  # fmt: skip
            faint = [p for p in pts if p.dominated]
            ax.scatter([getattr(p, attr) for p in faint], [100 * p.robust_accuracy for p in faint],
                       marker=marker, color=line.get_color(), alpha=0.3)  # fmt: skip
            if method == "uniform":
                for p in pts:
                    w = next(iter(p.layers.values())).split()
                    tag = f"w{w[0].rstrip('b')}" + (w[3] if len(w) > 3 else "")
                    ax.annotate(tag, (getattr(p, attr), 100 * p.robust_accuracy), fontsize=7,
                                xytext=(3, -8), textcoords="offset points")  # fmt: skip
        ax.axhline(100 * front.float_robust_accuracy, color="k", ls="--", lw=1, label="float")
        ax.set_xscale("log")
        ax.set_xlabel(unit)
        ax.set_ylabel("robust accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(
        f"robust accuracy per hardware cost (eps={front.eps:g}, {front.val_images} held-out images)",
        fontsize=9,
    )
    _save(plt, fig, path)
