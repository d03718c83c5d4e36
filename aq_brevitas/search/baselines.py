"""The uniform baseline: the same spec in every layer, the best one that fits the budget.

One option per maximal (weight bits, input bits) pair that fits, each at the scaling × granularity
with the smallest Σ relative weight error; among them the best robust accuracy of the real Brevitas
model on held-out training images (the worst case of PGD and the fast attack suite).
It is also the reference every searched policy is checked against (docs/method.md "Never worse
than uniform").
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from typing import Any

import torch
from torch import nn

from ..attacks import forward_input, normalized_inputs
from ..budget import Budget, PolicyCost, as_budget
from ..config import takes_config
from ..errors import PolicyError
from ..evaluate.cache import MeasureCache, data_digest, measurement_key, model_digest
from ..evaluate.warm import AdvExamples
from ..forward import as_xy
from ..policy import LayerSpec, LayerwisePolicy
from ..workers import resolve_device, run_jobs
from .calibration import WeightCache, progress_bar
from .candidates import CandidateTable
from .config import SearchConfig, as_config
from .costing import achieved_cost, fits


def _plain(value: Any) -> Any:
    """A settings object as JSON for a cache key: a dataclass by its type and fields, a function by
    its name (never a repr with a memory address, which would differ in every process)."""
    if value is None or isinstance(value, (str, int, float)):
        return value
    if is_dataclass(value) and not isinstance(value, type):
        return {"type": type(value).__qualname__, **asdict(value)}
    if callable(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', repr(value))}"
    return repr(value)


#: what :func:`measure_policy` measures (its robust half), as the held-out check records it
ROBUST_MEASURE = (
    "worst case of PGD and the fast suite (APGD-CE, APGD-DLR, APGD-T3, transfer from the float model, Square)"
)


@dataclass(frozen=True)
class PolicyMeasurement:
    """One policy's held-out measurement (:func:`measure_policy`): ``clean`` and ``robust`` accuracy
    (fractions), ``warm`` (images the replayed seeds broke; 0 without a warm start), ``key`` (its
    :func:`~aq_brevitas.evaluate.cache.measurement_key`, which names it as another policy's seed) and
    ``examples`` (the adversarial examples of every image it broke)."""

    clean: float
    robust: float
    warm: int
    key: str
    examples: AdvExamples


def measure_policy(
    model: nn.Module,
    specs: Mapping[str, LayerSpec] | None,
    val: tuple[torch.Tensor, torch.Tensor],
    calib_x: torch.Tensor,
    *,
    eps: float,
    steps: int,
    seed: int,
    cache_dir: str | os.PathLike[str] | None = None,
    warm: PolicyMeasurement | None = None,
    device: str | None = None,
) -> PolicyMeasurement:
    """Clean and robust accuracy on ``val`` (images (N, C, H, W) in [0, 1], labels (N,)) of the
    Brevitas model :func:`~aq_brevitas.quantize` builds for ``specs`` (calibrated on ``calib_x``;
    None: the float ``model`` itself). Robust is the per-image worst case of PGD-``steps`` and the fast
    attack suite at its selection settings (:data:`~aq_brevitas.evaluate.suite.SELECTION_SUITE`) with
    the float model as the transfer source, never PGD alone. ``warm``: another policy's measurement
    of the same images, whose adversarial examples are replayed first (:mod:`aq_brevitas.evaluate.warm`;
    an extra transfer attack, so robust can only be lower than cold). With a ``cache_dir`` (a
    :class:`~aq_brevitas.evaluate.cache.MeasureCache` folder) the result and its examples are read
    back when the same weights, input normalisation, policy, images, ε, suite settings, warm seed and
    measurement version were measured before (:func:`~aq_brevitas.evaluate.cache.measurement_key`),
    and stored otherwise. ``device``: where the attacks run (:func:`~aq_brevitas.workers.resolve_device`;
    None: the model's); its type (CPU or GPU, whose arithmetic differs) is part of the key."""
    from ..evaluate.suite import SELECTION_SUITE, suite_chain, suite_names

    settings = replace(SELECTION_SUITE["settings"], seed=seed)
    policy = None if specs is None else LayerwisePolicy(dict(specs)).to_dict()
    suite = {k: _plain(v) for k, v in {**SELECTION_SUITE, "settings": settings}.items()}
    # fed: the images as the model's forward receives them, so an input normalisation counts
    key = measurement_key({
        "model": model_digest(model), "fed": data_digest(forward_input(model, val[0])), "policy": policy,
        "calibration": data_digest(calib_x) if specs is not None else None, "evaluation": data_digest(*val),
        "eps": float(eps), "pgd_steps": steps, "suite": suite, "warm": None if warm is None else warm.key,
        "device": resolve_device(device, model).type,
    })  # fmt: skip

    def measure() -> tuple[dict[str, float], AdvExamples]:
        q = model if specs is None else _quantized(model, specs, calib_x)
        surrogate = None if specs is None else model
        names = suite_names(SELECTION_SUITE["suite"], surrogate=surrogate is not None)
        acc, found = suite_chain(
            q, *val, eps, names, settings, surrogate=surrogate, pgd_steps=steps,
            warm=None if warm is None else warm.examples, device=device,
        )  # fmt: skip
        names = list(acc)  # cumulative accuracies: the warm replay comes last, before "worst case"
        warm_broke = round((acc[names[-3]] - acc["warm"]) * len(val[1])) if "warm" in acc else 0
        return {"clean": acc["clean"], "robust": acc["worst case"], "warm": warm_broke}, found

    about = {
        "policy": policy,
        "eps": eps,
        "pgd_steps": steps,
        "images": len(val[1]),
        "warm": warm is not None,
    }
    got, found = MeasureCache(cache_dir).get_or_measure_examples(key, measure, about)
    return PolicyMeasurement(got["clean"], got["robust"], int(got["warm"]), key, found)


def _quantized(model: nn.Module, specs: Mapping[str, LayerSpec], calib_x: torch.Tensor) -> nn.Module:
    from ..quantization.convert import quantize

    return quantize(model, LayerwisePolicy(dict(specs)), calibration_data=calib_x).eval()


def _pair(spec: LayerSpec) -> tuple[int, int]:
    """(weight bits, input bits) of a spec, a float input counting as 32 bits."""
    return spec.weight_bit_width, spec.act_bit_width or 32


def _common_specs(table: CandidateTable, layers: list[str]) -> list[LayerSpec]:
    first = [r.spec for r in table.rows[layers[0]]]
    return [s for s in first if all(any(r.spec == s for r in table.rows[n]) for n in layers)]


def uniform_choices(
    table: CandidateTable,
    budget: Budget,
    cache: WeightCache,
    pinned: Mapping[str, LayerSpec] | None = None,
) -> list[dict[str, LayerSpec]]:
    """Uniform policies that fit ``budget``: one per maximal (weight bits, input bits) pair -- a
    fitting pair that no other fitting pair matches or beats on both widths -- each at the scaling ×
    granularity with the smallest Σ relative weight error ‖ΔW‖_F/‖W‖_F (data-free). Layers in
    ``pinned`` keep their spec (e.g. the first and last at 8 bits). Empty when none fits."""
    pinned = dict(pinned or {})
    free = [n for n in table.layers if n not in pinned]
    if not free:
        return [pinned] if fits(table, budget, pinned) else []
    common = _common_specs(table, free)
    fitting: dict[tuple[int, int], list[LayerSpec]] = {}
    for s in common:
        if fits(table, budget, {**pinned, **{n: s for n in free}}):
            fitting.setdefault(_pair(s), []).append(s)
    top = [p for p in fitting if not any(q != p and q[0] >= p[0] and q[1] >= p[1] for q in fitting)]
    out = []
    for p in sorted(top):
        errs = {s: _relative_error(cache, free, s) for s in fitting[p]}
        best = min(fitting[p], key=lambda s: (errs[s], fitting[p].index(s)))
        out.append({**pinned, **{n: best for n in free}})
    return out


def uniform_options(
    table: CandidateTable, budget: Budget, cache: WeightCache | None = None
) -> list[LayerSpec]:
    """The uniform specs the baseline chooses between: one per maximal fitting (weight, input) bit pair
    at its best scaling × granularity (:func:`uniform_choices`); with weight-only candidates, the
    highest weight bits that fit. PolicyError when no uniform policy fits."""
    if cache is None:
        if table.model is None:
            raise PolicyError(
                "the candidate table keeps no model to read weights from",
                "pass cache=WeightCache(model, table)",
            )
        cache = WeightCache(table.model, table)
    choices = uniform_choices(table, budget, cache)
    if not choices:
        raise PolicyError(
            f"no uniform policy fits the budget {budget.kind}={budget.value:g} "
            f"({len(_common_specs(table, table.layers))} specs are candidates in every layer)",
            "raise the budget, or give every layer a common cheap candidate",
        )
    return [c[table.layers[0]] for c in choices]


@dataclass(frozen=True)
class UniformChoice:
    """The best uniform policy and why: ``spec`` (used in every layer of ``layers``), the ``options``
    it was chosen from, the ``rule`` (``"robust_accuracy"`` on held-out images or the data-free
    ``"relative_weight_error"``), each option's held-out robust accuracy by ``LayerSpec.short()`` (the
    worst case of PGD-``pgd_steps`` and the fast suite; empty for the data-free rule), and its cost
    under ``budget``."""

    spec: LayerSpec
    layers: tuple[str, ...]
    options: tuple[LayerSpec, ...]
    rule: str
    robust_accuracy: dict[str, float]
    pgd_steps: int
    budget: Budget
    cost: PolicyCost
    eps: float
    policy: LayerwisePolicy = field(init=False, repr=False, compare=False)
    #: the chosen option's held-out measurement (its adversarial examples warm-start the held-out
    #: check of the searched policy); None for the data-free rule
    measurement: PolicyMeasurement | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        meta = {
            "method": "uniform",
            "winner": "uniform",
            "budget": self.budget.to_dict(),
            "cost": self.cost.summary(),
            "eps": self.eps,
            "uniform": self.to_dict(),
        }
        object.__setattr__(self, "policy", LayerwisePolicy({n: self.spec for n in self.layers}, None, meta))

    @property
    def accuracy(self) -> float | None:
        """The chosen spec's held-out robust accuracy (None for the data-free rule)."""
        return self.robust_accuracy.get(self.spec.short())

    def to_dict(self) -> dict[str, Any]:
        """The ``uniform`` entry of a policy's meta."""
        return {
            "spec": self.spec.to_dict(),
            "options": [s.short() for s in self.options],
            "rule": self.rule,
            "robust_accuracy": dict(self.robust_accuracy),
            "measure": ROBUST_MEASURE,
            "pgd_steps": self.pgd_steps,
        }


def _relative_error(cache: WeightCache, layers: list[str], spec: LayerSpec) -> float:
    """Σ_l ‖Ŵ_l − W_l‖_F / ‖W_l‖_F with ``spec`` in every layer."""
    total = 0.0
    for n in layers:
        w = cache.modules[n].weight.detach()
        total += float((cache(n, spec) - w).norm() / w.norm().clamp_min(1e-12))
    return total


@takes_config(SearchConfig)
def best_uniform(
    model: nn.Module,
    table: CandidateTable,
    budget: Budget | str,
    val_data: Any = None,
    *,
    calib_data: Any = None,
    config: SearchConfig | None = None,
    cache: WeightCache | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> UniformChoice:
    """The best uniform policy among :func:`uniform_options` (one per maximal fitting (weight, input)
    bit pair, each at its data-free best scaling × granularity): the one with the best robust accuracy
    (:func:`measure_policy`: the worst case of PGD-``pgd_steps`` and the fast suite) on the
    first ``val_images`` of held-out ``val_data`` (training images; ``calib_data`` calibrates the
    activation quantizers, default the same images); the only option is measured too, since the
    held-out check compares with it. Without ``val_data`` the choice is data-free: the smallest Σ
    relative weight error ‖ΔW‖_F/‖W‖_F.
    ``config``: the :class:`SearchConfig` whose ``eps``, ``seed``, ``pgd_steps``, ``val_images`` and
    ``normalization`` are used. ``cache``: a ready :class:`WeightCache` of ``model``. ``cache_dir``: a
    folder of measured results read and written (:func:`measure_policy`). Under ``torchrun`` (after
    :func:`~aq_brevitas.train.finetune.init_distributed`) the options are measured on the ranks in turn
    and every rank gets every result (:func:`~aq_brevitas.workers.run_jobs`). PolicyError when no
    uniform policy fits.
    """
    cfg = as_config(config)
    budget = as_budget(budget)
    cache = cache or WeightCache(model, table)
    options = uniform_options(table, budget, cache)
    layers = table.layers
    results: dict[str, float] = {}
    if val_data is not None:
        with normalized_inputs(model, cfg.normalization):
            val = as_xy(val_data, model=model, name="validation data")
            if cfg.val_images is not None:
                val = (val[0][: cfg.val_images], val[1][: cfg.val_images])
            calib_x = (
                as_xy(calib_data, model=model, name="calibration data")[0]
                if calib_data is not None
                else val[0]
            )
            with progress_bar(
                total=len(options), desc="uniform candidates", disable=not progress or len(options) < 2
            ) as bar:
                measured = run_jobs(
                    lambda i: measure_policy(
                        model, {n: options[i] for n in layers}, val, calib_x, eps=cfg.eps,
                        steps=cfg.pgd_steps, seed=cfg.seed, cache_dir=cache_dir, device=cfg.device,
                    ),
                    len(options),
                    done=lambda _: bar.update(),
                )  # fmt: skip
            results = {s.short(): m.robust for s, m in zip(options, measured, strict=True)}
        best = max(options, key=lambda s: (results[s.short()], -options.index(s)))
        rule, measurement = "robust_accuracy", measured[options.index(best)]
    else:
        errs = {s: _relative_error(cache, layers, s) for s in options}
        best = min(options, key=lambda s: (errs[s], options.index(s)))
        rule, measurement = "relative_weight_error", None
    cost = achieved_cost(table, {n: best for n in layers})
    return UniformChoice(
        best, tuple(layers), tuple(options), rule, results, cfg.pgd_steps, budget, cost, cfg.eps, measurement
    )
