"""The plan of :func:`~aq_brevitas.evaluate.robustness.evaluate_robustness`, made before any attack
runs: the images, the report's ``(attack, ε, images)`` jobs, the suite's attacks, and what is skipped
(with why) or noted -- for the inputs' shape (Square and AutoAttack need an image view) and the model's
class count (:func:`~aq_brevitas.attacks.class_shortfall`), so that the report lists exactly what ran.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..attacks import MIN_CLASSES, autoattack_note, class_count, class_shortfall, image_grid
from ..config import SUITES, EvalConfig
from ..forward import as_xy, check_forward, require_single_input
from .accuracy import subset
from .suite import REFERENCE_QUERIES, REFERENCE_STEPS, ChainSettings, suite_names


def jobs(cfg: EvalConfig, n: int, skipped: Mapping[str, str]) -> list[tuple[str, float, torch.Tensor]]:
    """The suite's ``(attack, ε, image indices)`` after the clean pass, in report order (``skipped``
    attacks left out; PGD on the Square subset only runs next to Square)."""
    everyone, top = torch.arange(n), cfg.eps[-1]
    gf_idx = subset(n, cfg.gradient_free_images, cfg.seed)
    jobs = [(attack, e, everyone) for attack in cfg.attacks if attack != "clean" for e in cfg.eps]
    if cfg.gradient_free and "square" not in skipped:
        jobs += [("square", top, gf_idx), ("pgd-subset", top, gf_idx)]
    if cfg.autoattack == "torchattacks" and "autoattack" not in skipped:
        jobs.append(("autoattack", top, gf_idx))
    if not ("pgd" in cfg.attacks and cfg.large_eps in cfg.eps):
        jobs.append(("pgd-large-eps", cfg.large_eps, subset(n, cfg.large_eps_images, cfg.seed + 1)))
    return jobs


def grid_attacks(cfg: EvalConfig, sample_shape: tuple[int, ...]) -> tuple[dict[str, str], list[str]]:
    """Square and AutoAttack on samples of ``sample_shape``: ``(skipped, notes)``. torchattacks runs
    them on N×C×H×W images only; other samples are attacked through their :func:`image_grid` view,
    or, when they have none, the two attacks are skipped and the report says why."""
    wanted = [a for a, on in (("square", cfg.gradient_free), ("autoattack", cfg.autoattack != "off")) if on]
    wanted += ["suite"] if cfg.suite != "none" else []
    grid = image_grid(sample_shape)
    if not wanted or grid == sample_shape:
        return {}, []
    shape = "×".join(map(str, sample_shape)) or "scalar"
    if grid is None:
        why = f"torchattacks runs it on C×H×W images only, and {shape} samples have no view with H, W >= 2"
        extra = {
            "square": "; PGD on its subset (the comparison) is skipped too",
            "autoattack": "",
            "suite": "",
        }
        return {a: why + extra[a] for a in wanted}, []
    view = "×".join(map(str, grid))
    return {}, [
        f"{' and '.join(wanted)} ran on a {view} view of the {shape} samples (the model sees its own shape)"
    ]


def report_settings(cfg: EvalConfig, n: int) -> dict[str, Any]:
    """The report's record of the settings (subset sizes as actually used)."""
    norm = cfg.normalization
    return {
        "eps": list(cfg.eps),
        "attacks": list(cfg.attacks),
        "pgd_steps": cfg.pgd_steps,
        "pgd_restarts": cfg.pgd_restarts,
        "autoattack": cfg.autoattack,
        "suite": cfg.suite if isinstance(cfg.suite, str) else list(cfg.suite),
        "suite_steps": cfg.suite_steps,
        "suite_queries": cfg.suite_queries,
        "indicators": cfg.indicators,
        "gradient_free": cfg.gradient_free,
        "gradient_free_images": min(cfg.gradient_free_images, n),
        "square_queries": cfg.square_queries,
        "large_eps": cfg.large_eps,
        "large_eps_images": min(cfg.large_eps_images, n),
        "seed": cfg.seed,
        "normalization": [list(norm[0]), list(norm[1])] if norm else None,
    }


@dataclass
class Plan:
    """What an evaluation will run: the images, the settings, the report's ``(attack, ε, images)``
    jobs, the suite's attacks, and what is skipped (with why) or noted."""

    cfg: EvalConfig
    x: torch.Tensor
    y: torch.Tensor
    jobs: list[tuple[str, float, torch.Tensor]]
    names: tuple[str, ...]
    skipped: dict[str, str]
    notes: list[str]


def make_plan(model: nn.Module, data: Any, cfg: EvalConfig, surrogate: nn.Module | None) -> Plan:
    """The evaluation's plan, after one forward (inside the caller's :func:`normalized_inputs`): refuses a
    model with several inputs, bad data and a model that cannot run them; reads the class count."""
    require_single_input(model, "evaluate_robustness")
    x, y = as_xy(data, limit=cfg.limit, name="inputs")
    check_forward(model, x)
    skipped, notes = grid_attacks(cfg, tuple(x.shape[1:]))
    names = (
        ()
        if cfg.suite == "none" or "suite" in skipped
        else suite_names(cfg.suite, surrogate=surrogate is not None)
    )
    k = class_count(model, x)
    for name in names:  # the report lists what ran: what the class count rules out is skipped, and why
        why = class_shortfall(name, k)
        if why is not None:
            skipped[name] = f"left out of the attack suite: {why}"
    names = tuple(n for n in names if n not in skipped)
    notes += suite_notes(cfg, names, surrogate, k)
    if cfg.autoattack == "standard" and "autoattack" not in skipped and k < MIN_CLASSES["apgd-t"]:
        skipped["autoattack apgd-t"] = f"left out of the reference AutoAttack: {class_shortfall('apgd-t', k)}"
    if cfg.autoattack == "torchattacks" and "autoattack" not in skipped and k < MIN_CLASSES["apgd-t"]:
        notes.append(f"AutoAttack (torchattacks): {autoattack_note(k)}")
    return Plan(cfg, x, y, jobs(cfg, len(x), skipped), names, skipped, notes)


def suite_notes(cfg: EvalConfig, names: tuple[str, ...], surrogate: nn.Module | None, k: int) -> list[str]:
    """What the report says about its suite (``names``: the attacks that run) and its AutoAttack, for a
    model of ``k`` classes."""
    notes = []
    if names:
        what = ", ".join(f"{a} ({cfg.suite_queries} queries)" if a == "square" else a for a in names)
        notes.append(f"attack suite {cfg.suite if isinstance(cfg.suite, str) else 'custom'}: {what}; "
                     f"APGD with {cfg.suite_steps} iterations; each on the images still standing")  # fmt: skip
        schedule = ChainSettings(schedule=cfg.suite).schedule if isinstance(cfg.suite, str) else None
        notes += [f"attack suite {cfg.suite}'s schedule: {schedule.describe()}"] if schedule else []
    wanted = SUITES.get(cfg.suite, cfg.suite) if cfg.suite != "none" else ()
    if "transfer" in wanted and surrogate is None:
        notes.append("transfer attack skipped: no surrogate (float) model was given (surrogate=...)")
    targets = f"{k - 1} target class{'es' if k > 2 else ''}"
    if cfg.autoattack == "standard":
        apgd_t = f"APGD-T ({targets}), " if k >= MIN_CLASSES["apgd-t"] else ""
        notes.append(f"AutoAttack: the reference version (Croce & Hein 2020): APGD-CE, {apgd_t}FAB-T ({targets}) "
                     f"at {REFERENCE_STEPS} iterations and Square with {REFERENCE_QUERIES:,} "
                     "queries, built from torchattacks classes")  # fmt: skip
    elif cfg.autoattack == "torchattacks":
        notes.append("AutoAttack: torchattacks' own version (APGD, APGD-T and FAB at 10 iterations, not the "
                     "reference's 100): weaker than the reference; use autoattack='standard' for that")  # fmt: skip
    return notes
