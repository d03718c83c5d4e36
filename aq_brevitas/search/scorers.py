"""Scores ``s_l(c)`` for every (layer, candidate) of a :class:`~aq_brevitas.search.candidates.CandidateTable`:
what the knapsack minimises, lower is better, all behind one signature.

- ``lipschitz`` (this project's formulation, docs/method.md "Scores"), estimate ``jacobian``: with
  ``x_adv`` = PGD on the float model and ``J_loc`` its local input-output Jacobian norm there,
  ``s_l(c) = ε·J_loc·(L̂_l(c)/L_l − 1) + mean‖f_{l←c}(x_adv) − f(x_adv)‖₂``, where ``f_{l←c}`` is the
  float network with only layer l's weight replaced by Ŵ_l(c) from the swap's own Brevitas quantizer.
  Estimate ``spectral`` (data-free apart from A_l, exact for chains only):
  ``s = ε·Π·(L̂/L − 1) + Λ_spectral·‖ΔW‖₂·A``.
- ``hessian`` (HAWQ-V2, Dong et al. 2020): Hutchinson trace of the clean cross-entropy Hessian per
  weight × ‖ΔW‖_F².
- ``ans`` (QUANOS, Panda 2020): adversarial noise sensitivity of the layer's output under FGSM ×
  ‖ΔW‖_F²/‖W‖_F². QUANOS gives more bits to high-ANS layers; scaling the relative weight error by ANS
  makes that rule a score, so it runs through the same solver and budget as the others.

Each scorer is a function ``(model, table, inputs: ScoringInputs, settings) -> Scoring``, registered
for its method with :func:`~aq_brevitas.search.config.register_scorer` (``SCORERS``); :func:`score`
dispatches. ``score_lipschitz``/``score_hessian``/``score_ans`` are the same call with the method
fixed, returning the scores alone. All scorers use eval mode and training-split calibration images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..attacks import make_attack
from ..config import AttackConfig, check_eps, takes_config
from ..errors import ConfigError
from ..forward import as_xy, eval_mode
from ..nnutils import math_attention
from ..policy import LayerSpec
from .calibration import (
    ActivationProbe,
    AdversarialCalibration,
    WeightCache,
    act_key,
    network_deviation,
    progress_bar,
    reuse_calibration,
    seeded,
    weight_part,
)
from .candidates import CandidateTable
from .config import (
    ESTIMATES,
    AnsSettings,
    HessianSettings,
    LipschitzSettings,
    SearchConfig,
    as_config,
    scorer_for,
)
from .result import AnsEvidence, Evidence, HessianEvidence, LipschitzEvidence

Scores = dict[str, dict[LayerSpec, float]]


# ----------------------------------------------------------------------------------- lipschitz
@dataclass
class LipschitzTerms:
    """The two parts of the lipschitz score, kept apart for reporting, refinement and ablations."""

    adversarial: Scores
    quantization: Scores
    calibration: AdversarialCalibration | None
    estimate: str

    @property
    def scores(self) -> Scores:
        return self.weighted(1.0)

    def weighted(self, adv_weight: float) -> Scores:
        """``adv_weight``·adversarial + quantization (1 is the bound; other values are for ablations)."""
        return {
            n: {s: adv_weight * self.adversarial[n][s] + self.quantization[n][s] for s in specs}
            for n, specs in self.quantization.items()
        }


def _spectral_terms(table: CandidateTable, eps: float) -> LipschitzTerms:
    if any(math.isnan(r.dW_norm) for rows in table.rows.values() for r in rows):
        raise ConfigError(
            "the candidate table has no ‖ΔW‖ norms (built with dw_norms=False)",
            "build it with candidate_table(..., dw_norms=True) for the spectral estimate",
        )
    pi = math.prod(s.L for s in table.scores.values())
    downstream, gains = 1.0, {}
    for name in reversed(list(table.scores)):  # execution order: Π of L after the layer
        gains[name] = downstream
        downstream *= table.scores[name].L
    adv: Scores = {}
    quant: Scores = {}
    for name, rows in table.rows.items():
        sc = table.scores[name]
        adv[name] = {r.spec: eps * pi * (r.L_hat / sc.L - 1) for r in rows}
        quant[name] = {r.spec: gains[name] * r.dW_norm * sc.A for r in rows}
    return LipschitzTerms(adv, quant, None, "spectral")


def lipschitz_terms(
    model: nn.Module,
    table: CandidateTable,
    calib_data: Any,
    *,
    eps: float = 0.1,
    estimate: str = "jacobian",
    attack: Any = None,
    steps: int = 10,
    seed: int = 0,
    cache: WeightCache | None = None,
    progress: bool = False,
) -> LipschitzTerms:
    """Adversarial and quantization terms of the lipschitz score for every (layer, candidate).

    ``calib_data``: an :class:`AdversarialCalibration` made at ``eps``, or images to attack with
    ``attack``/``steps`` (unused by ``spectral``, which needs a table built with ``dw_norms=True``).
    One forward pass (downstream part only) per candidate for ``jacobian``.
    """
    eps = check_eps(eps)
    if estimate not in ESTIMATES:
        raise ConfigError(f"unknown estimate {estimate!r}", f"use one of {', '.join(ESTIMATES)}")
    if estimate == "spectral":
        return _spectral_terms(table, eps)
    calib = reuse_calibration(model, calib_data, eps=eps, attack=attack, steps=steps, seed=seed)
    cache = cache or WeightCache(model)
    # "loss": the measured robust-loss increase alone; the first-order adversarial term is left out
    # (it ranked layers against the measured robust loss, benchmarks/layer_ranking.py)
    kind, j_loc = ("loss", 0.0) if estimate == "loss" else ("deviation", calib.j_loc or 0.0)
    adv: Scores = {}
    quant: Scores = {}
    bar = progress_bar(
        total=sum(map(len, table.rows.values())), desc="lipschitz scores", disable=not progress
    )
    probe = ActivationProbe(model, calib)
    for name, rows in table.rows.items():
        sc = table.scores[name]
        adv[name], quant[name] = {}, {}
        weight_dev: dict[LayerSpec, float] = {}
        for r in rows:
            adv[name][r.spec] = eps * j_loc * (r.L_hat / sc.L - 1)
            # Ŵ and the input quantizer measured one at a time and added (first order): candidates that
            # differ only in input bits share one weight measurement
            w = weight_part(r.spec)
            if w not in weight_dev:
                weight_dev[w] = network_deviation(model, calib, {name: w}, cache, kind)
            act = act_key(r.spec)
            quant[name][r.spec] = weight_dev[w] + (probe.deviation(name, *act, kind) if act else 0.0)
            bar.update()
    bar.close()
    return LipschitzTerms(adv, quant, calib, estimate)


# --------------------------------------------------------------------------------- sensitivities
@math_attention()  # Hv takes a double backward, which fused attention kernels lack
def hessian_traces(
    model: nn.Module, calib_data: Any, layers: Sequence[str], *, n_samples: int = 16, seed: int = 0
) -> dict[str, float]:
    """Average Hessian trace per weight, Tr(H_l)/n_l, of the clean cross-entropy (HAWQ-V2).

    Hutchinson: E[vᵀHv] over Rademacher v, Hv by double backward; all layers in one pass per sample.
    """
    if n_samples < 1:
        raise ConfigError(f"n_samples must be >= 1, got {n_samples}", "pass e.g. n_samples=16")
    x, y = as_xy(calib_data, model=model, name="calibration data")
    modules = dict(model.named_modules())
    weights = [modules[n].weight for n in layers]
    flags = [w.requires_grad for w in weights]
    gen = torch.Generator().manual_seed(seed)
    traces = [0.0] * len(weights)
    try:
        for w in weights:
            w.requires_grad_(True)
        with eval_mode(model), torch.enable_grad():
            loss = F.cross_entropy(model(x), y)
            grads = torch.autograd.grad(loss, weights, create_graph=True)
            for _ in range(n_samples):
                vs = [
                    (torch.randint(0, 2, w.shape, generator=gen) * 2 - 1).to(w.device, w.dtype)
                    for w in weights
                ]
                hvs = torch.autograd.grad(grads, weights, vs, retain_graph=True)
                for i, (v, hv) in enumerate(zip(vs, hvs)):
                    traces[i] += float((v * hv).sum()) / n_samples
    finally:
        for w, f in zip(weights, flags):
            w.requires_grad_(f)
    return {n: t / w.numel() for n, t, w in zip(layers, traces, weights)}


def ans_sensitivity(
    model: nn.Module, calib_data: Any, layers: Sequence[str], *, eps: float = 0.1, seed: int = 0
) -> dict[str, float]:
    """QUANOS ANS_l: mean over examples of ‖a_l(x) − a_l(x_fgsm)‖ / ‖a_l(x)‖ at the layer's output."""
    eps = check_eps(eps)
    x, y = as_xy(calib_data, model=model, name="calibration data")
    modules = dict(model.named_modules())
    with eval_mode(model):
        atk = make_attack(AttackConfig("fgsm", eps), model, seed=seed)
        with seeded(seed):
            x_adv = atk(x, y).detach() if eps > 0 else x.clone()
        acts: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
        state = {"calls": 0}  # one activation per forward: a layer called twice keeps its first call

        def hook(name: str) -> Callable[..., None]:
            def fn(_m: nn.Module, _a: Any, out: Any) -> None:
                if len(acts[name]) < state["calls"]:
                    acts[name].append(getattr(out, "value", out).detach().flatten(1))

            return fn

        handles = [modules[n].register_forward_hook(hook(n)) for n in layers]
        try:
            with torch.no_grad():
                for inp in (x, x_adv):
                    state["calls"] += 1
                    model(inp)
        finally:
            for h in handles:
                h.remove()
    out = {}
    for n in layers:
        clean, adv = acts[n]
        out[n] = float(((clean - adv).norm(dim=1) / clean.norm(dim=1).clamp_min(1e-12)).mean())
    return out


def activation_hessian_traces(
    model: nn.Module, calib_data: Any, layers: Sequence[str], *, n_samples: int = 16, seed: int = 0
) -> dict[str, float]:
    """Average Hessian trace per element of each layer's input activation, Tr(H_a)/n_a, of the clean
    cross-entropy over the calibration batch (HAWQ-V2, Dong et al. 2020, applies the weight rule to
    activations): Hutchinson over Rademacher v, Hv by double backward, all layers in one pass."""
    if n_samples < 1:
        raise ConfigError(f"n_samples must be >= 1, got {n_samples}", "pass e.g. n_samples=16")
    x, y = as_xy(calib_data, model=model, name="calibration data")
    modules = dict(model.named_modules())
    acts: dict[str, torch.Tensor] = {}

    def leaf(name: str) -> Callable[..., Any]:
        def fn(_m: nn.Module, args: tuple[Any, ...]) -> Any:
            if name in acts:  # a layer called again keeps its first input as the measured one
                return None
            # a zero perturbation as the leaf: the graph through the layer input stays connected, so
            # upstream layers' perturbations still reach the loss
            a = getattr(args[0], "value", args[0])
            acts[name] = torch.zeros_like(a, requires_grad=True)
            return (a + acts[name], *args[1:])

        return fn

    handles = [modules[n].register_forward_pre_hook(leaf(n)) for n in layers]
    gen = torch.Generator().manual_seed(seed)
    try:
        with eval_mode(model), torch.enable_grad():
            loss = F.cross_entropy(model(x), y)
            inputs = [acts[n] for n in layers]
            grads = torch.autograd.grad(loss, inputs, create_graph=True)
            traces = [0.0] * len(inputs)
            for _ in range(n_samples):
                vs = [(torch.randint(0, 2, a.shape, generator=gen) * 2 - 1).to(a.dtype) for a in inputs]
                hvs = torch.autograd.grad(grads, inputs, vs, retain_graph=True, allow_unused=True)
                for i, (v, hv) in enumerate(zip(vs, hvs)):
                    traces[i] += 0.0 if hv is None else float((v * hv).sum()) / n_samples
    finally:
        for h in handles:
            h.remove()
    return {n: t / a.numel() for n, t, a in zip(layers, traces, inputs)}


def _weighted_error(
    cache: WeightCache,
    table: CandidateTable,
    weight: Mapping[str, float],
    relative: bool,
    act_error: Callable[[str, tuple[int, bool]], float] | None = None,
) -> Scores:
    """``weight_l · ‖Ŵ_l(c) − W_l‖_F²`` per (layer, candidate), divided by ‖W_l‖_F² when ``relative``;
    plus ``act_error(layer, (bits, po2))`` for a candidate that quantizes its input."""
    out: Scores = {}
    for name, rows in table.rows.items():
        w = cache.modules[name].weight.detach()
        norm = (float(w.square().sum()) or 1.0) if relative else 1.0
        out[name] = {}
        for r in rows:
            act = act_key(r.spec)
            extra = act_error(name, act) if act and act_error else 0.0
            out[name][r.spec] = weight[name] * float((cache(name, r.spec) - w).square().sum()) / norm + extra
    return out


def _has_act_candidates(table: CandidateTable) -> bool:
    return any(r.spec.act_bit_width for rows in table.rows.values() for r in rows)


# ---------------------------------------------------------------------------- one signature
@dataclass(frozen=True)
class ScoringInputs:
    """What every scorer gets besides the table: the calibration ``data`` (training-split images and
    labels, any form :func:`~aq_brevitas.forward.as_xy` accepts), the adversarial calibration when one
    was made, ε, the seed, the Ŵ cache."""

    data: Any
    calibration: AdversarialCalibration | None
    eps: float
    seed: int
    cache: WeightCache
    progress: bool = False


@dataclass
class Scoring:
    """A scorer's answer: ``scores`` (what the knapsack minimises), the lipschitz ``terms`` when the
    method has a whole-network measure, and ``evidence``: the method's own measurements (``J_loc``,
    Hessian traces, ANS...; for a registered method any object with ``to_meta() -> dict``), as
    :class:`~aq_brevitas.search.SearchResult` reports them."""

    scores: Scores
    terms: LipschitzTerms | None
    evidence: Evidence

    @property
    def selectable(self) -> Scores | LipschitzTerms:
        """What :func:`~aq_brevitas.search.selection.select_policy` takes: the terms when there are some."""
        return self.terms if self.terms is not None else self.scores


Scorer = Callable[[nn.Module, CandidateTable, ScoringInputs, Any], Scoring]


def lipschitz_scorer(
    model: nn.Module, table: CandidateTable, inp: ScoringInputs, s: LipschitzSettings
) -> Scoring:
    """The ``lipschitz`` method's scorer (module docstring), its terms kept for refinement."""
    data = inp.calibration if inp.calibration is not None else inp.data
    terms = lipschitz_terms(
        model, table, data, eps=inp.eps, estimate=s.estimate, attack=s.attack, steps=s.steps, seed=inp.seed,
        cache=inp.cache, progress=inp.progress,
    )  # fmt: skip
    calib = inp.calibration
    evidence = (
        LipschitzEvidence(s.adv_weight, calib.attack, calib.j_loc)
        if calib
        else LipschitzEvidence(s.adv_weight)
    )
    return Scoring(terms.weighted(s.adv_weight), terms, evidence)


def hessian_scorer(
    model: nn.Module, table: CandidateTable, inp: ScoringInputs, s: HessianSettings
) -> Scoring:
    """The ``hessian`` method's scorer (HAWQ-V2, on weights and, for input-bit candidates, activations)."""
    traces = hessian_traces(model, inp.data, table.layers, n_samples=s.n_samples, seed=inp.seed)
    act_error = None
    if _has_act_candidates(table):  # HAWQ-V2's rule on the input activations: Tr(H_a)/n_a · ‖ΔA‖²
        a_traces = activation_hessian_traces(
            model, inp.data, table.layers, n_samples=s.n_samples, seed=inp.seed
        )
        probe = ActivationProbe(model, as_xy(inp.data, model=model, name="calibration data"))
        batch = len(probe.x)

        def act_error(name: str, key: tuple[int, bool]) -> float:
            return max(a_traces[name], 0.0) * probe.squared_error(name, *key) * batch

    scores = _weighted_error(inp.cache, table, {n: max(t, 0.0) for n, t in traces.items()}, False, act_error)
    return Scoring(scores, None, HessianEvidence(traces, s.n_samples))


def ans_scorer(model: nn.Module, table: CandidateTable, inp: ScoringInputs, s: AnsSettings) -> Scoring:
    """The ``ans`` method's scorer (QUANOS's sensitivity times the relative weight and input error)."""
    ans = ans_sensitivity(model, inp.data, table.layers, eps=inp.eps, seed=inp.seed)
    act_error = None
    if _has_act_candidates(table):  # QUANOS's sensitivity times the relative input error, as for weights
        probe = ActivationProbe(model, as_xy(inp.data, model=model, name="calibration data"))

        def act_error(name: str, key: tuple[int, bool]) -> float:
            return ans[name] * probe.relative_error(name, *key)

    return Scoring(_weighted_error(inp.cache, table, ans, True, act_error), None, AnsEvidence(ans))


@takes_config(SearchConfig)
def score(
    method: str,
    model: nn.Module,
    table: CandidateTable,
    calib_data: Any,
    *,
    config: SearchConfig | None = None,
    cache: WeightCache | None = None,
    progress: bool = False,
) -> Scoring:
    """Score every (layer, candidate) of ``table`` with ``method`` (a registered scored method).

    ``calib_data``: an :class:`AdversarialCalibration` (lipschitz reuses it; its eps must be the
    config's) or training-split images in any form :func:`~aq_brevitas.forward.as_xy` accepts.
    ``config``: the :class:`SearchConfig` whose ``eps``, ``seed`` and settings of ``method`` are used
    (``method`` replaces its own). ``cache``: a ready :class:`WeightCache` of ``model``. Raises
    ConfigError for a method without a scorer.
    """
    cfg = as_config(config).replace(method=method)
    scorer = scorer_for(method)
    calib = calib_data if isinstance(calib_data, AdversarialCalibration) else None
    data = (calib.x, calib.y) if calib is not None else calib_data
    inputs = ScoringInputs(data, calib, cfg.eps, cfg.seed, cache or WeightCache(model, table), progress)
    with eval_mode(model), math_attention():  # attention with the double backward scorers take
        return scorer(model, table, inputs, cfg.method_settings)


def _one_method(method: str, doc: str) -> Callable[..., Scores]:
    """The ``score_<method>`` shorthands: :func:`score` for one method, only its scores (the full
    form takes a ready weight cache and a progress bar)."""

    def scores(
        model: nn.Module, table: CandidateTable, calib_data: Any, config: SearchConfig | None = None
    ) -> Scores:
        return score(method, model, table, calib_data, config=config).scores

    scores.__name__ = scores.__qualname__ = f"score_{method}"
    scores.__doc__ = doc
    return takes_config(SearchConfig)(scores)


score_lipschitz = _one_method(
    "lipschitz",
    """This method's score ``s_l(c)`` (module docstring): :func:`score` with ``"lipschitz"``, its
    ``estimate``, ``attack``, ``steps`` and ``adv_weight`` from ``config``.""",
)
score_hessian = _one_method(
    "hessian",
    """HAWQ-V2: ``max(Tr(H_l)/n_l, 0) · ‖Ŵ_l(c) − W_l‖_F²`` (a negative trace estimate counts as flat):
    :func:`score` with ``"hessian"``, its ``n_samples`` from ``config``.""",
)
score_ans = _one_method(
    "ans",
    """QUANOS as a score: ``ANS_l · ‖Ŵ_l(c) − W_l‖_F² / ‖W_l‖_F²`` at the config's ``eps``: :func:`score`
    with ``"ans"``.""",
)
