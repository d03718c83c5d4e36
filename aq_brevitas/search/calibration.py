"""Adversarial calibration and the forward passes the scores are measured with.

:func:`adversarial_calibration` attacks the float model once (PGD by default) on training-split
calibration images and keeps ``x_adv``, ``f(x_adv)`` and the local Jacobian norm ``J_loc`` there
(docs/method.md "Scores"). :func:`network_deviation` is the quantization term:
``mean over x_adv of ‖f_p(x_adv) − f(x_adv)‖₂`` (output units, logits) for a policy ``p`` whose
quantized weights Ŵ come from the swap's own Brevitas quantizer (:class:`WeightCache`), recomputing
only the part of an fx graph downstream of the swapped layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F

from ..attacks import forward_input, make_attack
from ..config import AttackConfig, check_eps
from ..errors import ConfigError
from ..forward import as_xy, eval_mode
from ..nnutils import trace_leaves
from ..policy import LayerSpec, LayerwisePolicy
from .candidates import CandidateRow, CandidateTable, quantized_weight

_BATCH = 256  # images per attack call


def progress_bar(iterable: Any = None, **kw: Any) -> Any:
    """A tqdm bar that disappears when done; ``kw`` (``total``, ``desc``, ``disable=True`` for none...)
    are passed on to :class:`tqdm.auto.tqdm`."""
    from tqdm.auto import tqdm

    return tqdm(iterable, leave=False, **kw)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch inside, leave the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def swapped_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily put ``weights[name]`` in place of each named layer's weight (restored on exit)."""
    modules = dict(model.named_modules())
    saved: list[tuple[nn.Module, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for name, w in weights.items():
                m = modules[name]
                saved.append((m, m.weight.data))
                m.weight.data = w
        yield
    finally:
        with torch.no_grad():
            for m, w in reversed(saved):
                m.weight.data = w


class WeightCache:
    """Ŵ_l(c) from the swap's own Brevitas quantizer, computed once per (layer, spec).

    With ``table``, starts from the Ŵ the candidate table already computed (same quantizer, same
    weights), so scoring does not run Brevitas's MSE scale search a second time.
    """

    def __init__(self, model: nn.Module, table: CandidateTable | None = None) -> None:
        self.modules = dict(model.named_modules())
        self._w: dict[tuple[str, LayerSpec], torch.Tensor] = (
            {(n, weight_part(s)): w for (n, s), w in table.weights.items()} if table is not None else {}
        )

    def __call__(self, layer: str, spec: LayerSpec) -> torch.Tensor:
        key = (layer, weight_part(spec))  # candidates differing in input bits share one Ŵ
        if key not in self._w:
            self._w[key] = quantized_weight(self.modules[layer], spec)
        return self._w[key]


def weight_part(spec: LayerSpec) -> LayerSpec:
    """``spec`` without its input activation bits: what decides Ŵ."""
    return spec if spec.act_bit_width is None else dataclasses.replace(spec, act_bit_width=None)


class ActivationProbe:
    """Each layer's input quantized alone, at every ``(bits, po2)`` asked for, on the float model.

    The quantizer is the one :func:`~aq_brevitas.quantize` installs (a Brevitas ``QuantIdentity`` with
    :func:`~aq_brevitas.quantization.injectors.act_quant_for`, unsigned when the layer's input is non-negative on
    the clean calibration images), calibrated with Brevitas's ``calibration_mode`` on those images'
    layer inputs, and applied by a forward pre-hook at the layer's input: the values match the
    quantizer at the producer (:mod:`aq_brevitas.quantization.placement`), since it commutes with max-pooling and
    reshapes. ``deviation`` is the quantization term for that quantizer alone: mean over ``x_adv`` of
    ‖f_{l←a}(x_adv) − f(x_adv)‖₂ (logits); ``relative_error`` is E‖Q(x)−x‖²/E‖x‖² on the clean inputs
    and ``squared_error`` the mean per-image ‖Q(x)−x‖² (for the Hessian and ANS baselines).
    """

    def __init__(self, model: nn.Module, calib: AdversarialCalibration | tuple[torch.Tensor, Any]) -> None:
        self.model = model
        self.calib = calib if isinstance(calib, AdversarialCalibration) else None
        self.x = calib.x if isinstance(calib, AdversarialCalibration) else calib[0]
        self.modules = dict(model.named_modules())
        self._inputs: dict[str, torch.Tensor] = {}
        self._quant: dict[tuple[str, int, bool], nn.Module] = {}
        self._dev: dict[tuple[str, int, bool, str], float] = {}

    def inputs(self, layer: str) -> torch.Tensor:
        """The layer's input on the clean calibration images (its first call per forward)."""
        if layer not in self._inputs:
            got: list[torch.Tensor] = []

            def grab(_m: nn.Module, args: tuple[Any, ...]) -> None:
                if not got:
                    got.append(getattr(args[0], "value", args[0]).detach())

            h = self.modules[layer].register_forward_pre_hook(grab)
            try:
                with torch.no_grad(), eval_mode(self.model):
                    self.model(self.x)
            finally:
                h.remove()
            self._inputs[layer] = got[0]
        return self._inputs[layer]

    def quantizer(self, layer: str, bits: int, po2: bool) -> nn.Module:
        """The calibrated Brevitas ``QuantIdentity`` for ``layer``'s input at ``bits`` (eval mode)."""
        key = (layer, bits, po2)
        if key not in self._quant:
            import brevitas.nn as qnn
            from brevitas.graph.calibrate import calibration_mode

            from ..quantization.injectors import act_quant_for

            x = self.inputs(layer)
            signed = bool(x.min() < 0)
            q = qnn.QuantIdentity(
                act_quant=act_quant_for(bits, signed=signed, po2=po2), return_quant_tensor=False
            )
            with torch.no_grad(), calibration_mode(q):
                q(x)
            self._quant[key] = q.eval()
        return self._quant[key]

    @contextlib.contextmanager
    def applied(self, layer: str, bits: int, po2: bool) -> Iterator[None]:
        """Inside: ``layer``'s input goes through its quantizer at every call."""
        q = self.quantizer(layer, bits, po2)
        h = self.modules[layer].register_forward_pre_hook(lambda _m, args: (q(args[0]), *args[1:]))
        try:
            yield
        finally:
            h.remove()

    def deviation(self, layer: str, bits: int, po2: bool, kind: str = "deviation") -> float:
        """Mean ‖f_{l←a}(x_adv) − f(x_adv)‖₂ over the adversarial calibration images (logits); with
        ``kind="loss"`` the increase of the mean cross-entropy there instead (:func:`network_deviation`)."""
        key = (layer, bits, po2, kind)
        if key not in self._dev:
            if self.calib is None:
                raise ConfigError("activation deviations need an adversarial calibration", "pass one")
            with eval_mode(self.model), self.applied(layer, bits, po2):
                self._dev[key] = _deviation(self.model, self.calib, kind=kind)
        return self._dev[key]

    @torch.no_grad()
    def relative_error(self, layer: str, bits: int, po2: bool) -> float:
        """E‖Q(x) − x‖² / E‖x‖² on the layer's clean inputs."""
        x = self.inputs(layer)
        return float(
            (self.quantizer(layer, bits, po2)(x) - x).square().sum() / x.square().sum().clamp_min(1e-12)
        )

    @torch.no_grad()
    def squared_error(self, layer: str, bits: int, po2: bool) -> float:
        """Mean per image of ‖Q(x) − x‖² on the layer's clean inputs."""
        x = self.inputs(layer)
        return float((self.quantizer(layer, bits, po2)(x) - x).square().sum() / max(len(x), 1))


def act_key(spec: LayerSpec) -> tuple[int, bool] | None:
    """``(bits, po2)`` of a spec's input quantizer (power-of-two scales go with po2 weights, as in
    :func:`~aq_brevitas.quantize`), or None for a float input."""
    return None if spec.act_bit_width is None else (spec.act_bit_width, spec.scaling == "po2")


Representatives = dict[str, dict[LayerSpec, LayerSpec]]


def equivalent_candidates(table: CandidateTable, cache: WeightCache) -> Representatives:
    """Per layer, each candidate -> the first candidate with a bit-identical Ŵ and the same cost.

    At 8 bits the MSE search lands on the max scale, so '8b max' and '8b mse' are the same network;
    solving over one representative each keeps the top-K list (and the uniform baseline) from spending
    its slots on copies.
    """
    out: Representatives = {}
    for name, rows in table.rows.items():
        reps: list[CandidateRow] = []
        out[name] = {}
        for r in rows:
            same = next(
                (
                    q
                    for q in reps
                    if (q.weight_bits, q.bops, q.spec.act_bit_width)
                    == (r.weight_bits, r.bops, r.spec.act_bit_width)
                    and torch.equal(cache(name, q.spec), cache(name, r.spec))
                ),
                None,
            )
            if same is None:
                reps.append(r)
            out[name][r.spec] = (same or r).spec
    return out


def distinct_specs(reps: Representatives) -> dict[str, list[LayerSpec]]:
    """Per layer, the representatives alone (one candidate per distinct Ŵ), in candidate order."""
    return {n: [s for s, r in m.items() if s == r] for n, m in reps.items()}


class _Downstream:
    """Forward passes that recompute only what a weight swap changes.

    The float model's fx graph runs once on x_adv and keeps every node's value; with layers S swapped,
    only nodes downstream of a call to a layer in S are recomputed, the rest are read back. For a
    chain that skips everything before the first swapped layer; for residual graphs it also skips
    branches that do not depend on S. Untraceable models fall back to a full forward.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor) -> None:
        self.model, self.x = model, x
        self.gm = trace_leaves(model)
        self.gm_x = forward_input(model, x)  # the graph is model.forward's: no normalising hook on it
        self.cache: dict[Any, Any] | None = None
        if self.gm is None:
            return
        cache: dict[Any, Any] = {}

        class _Record(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                cache[n] = out = super().run_node(n)
                return out

        try:
            with torch.no_grad():
                _Record(self.gm).run(self.gm_x)
        except Exception:  # a graph that traces but does not run as traced: use the model itself
            self.gm = None
            return
        self.cache = cache

    def __call__(self, changed: Sequence[str]) -> torch.Tensor:
        if self.gm is None or self.cache is None:
            with torch.no_grad():
                return self.model(self.x)
        cache, targets = self.cache, set(changed)
        dirty: set[fx.Node] = set()
        for n in self.gm.graph.nodes:
            if (n.op == "call_module" and n.target in targets) or any(a in dirty for a in n.all_input_nodes):
                dirty.add(n)

        class _Replay(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                return super().run_node(n) if n in dirty or n.op == "output" else cache[n]

        with torch.no_grad():
            return _Replay(self.gm).run(self.gm_x)


@dataclass
class AdversarialCalibration:
    """PGD examples on the float model, its logits there and ``J_loc``: what the jacobian scores need.

    ``x``/``x_adv``: (N, *input_shape) images in [0, 1]; ``y``: (N,) labels; ``base_logits``: f(x_adv),
    (N, classes); ``j_loc``: the float network's local input-output Jacobian norm at x_adv (None when
    not measured); ``attack``: how x_adv was made, e.g. ``"pgd-10"``.
    """

    x: torch.Tensor
    y: torch.Tensor
    x_adv: torch.Tensor
    eps: float
    base_logits: torch.Tensor  # f(x_adv)
    j_loc: float | None
    attack: str
    _runner: Any = field(default=None, init=False, repr=False, compare=False)

    def downstream(self, model: nn.Module) -> _Downstream:
        """The cached float forward on x_adv for ``model`` (built on first use, with float weights)."""
        if self._runner is None or self._runner.model is not model:
            with eval_mode(model):
                self._runner = _Downstream(model, self.x_adv)
        return self._runner

    @property
    def images(self) -> int:
        return len(self.x)


def adversarial_calibration(
    model: nn.Module,
    calib_data: Any,
    *,
    eps: float = 0.1,
    attack: Any = None,
    steps: int = 10,
    seed: int = 0,
    jacobian: bool = True,
) -> AdversarialCalibration:
    """x_adv = attack(float model, calibration images); ``attack`` is None (PGD-``steps``), an attack
    name for :func:`~aq_brevitas.attacks.make_attack`, or a ready torchattacks attack. ``calib_data``
    in any form :func:`~aq_brevitas.forward.as_xy` accepts (images alone are labelled by the model).
    ``jacobian``: also measure ``J_loc`` (power iteration). Seeded: same seed, same x_adv."""
    from ..score.jacobian import local_jacobian_norm

    eps = check_eps(eps)
    x, y = as_xy(calib_data, model=model, name="calibration data")
    with eval_mode(model):
        if eps == 0:
            x_adv, name = x.clone(), "none (eps=0)"
        else:
            if attack is None or isinstance(attack, str):
                name = attack or "pgd"
                atk = make_attack(AttackConfig(name, eps, steps), model, seed=seed)
                name = f"{name}-{steps}" if name in ("pgd", "pgdl2") else name
            else:
                atk, name = attack, type(attack).__name__
            with seeded(seed):
                x_adv = torch.cat([atk(xb, yb) for xb, yb in zip(x.split(_BATCH), y.split(_BATCH))]).detach()
        with torch.no_grad():
            base = model(x_adv).detach()
        j_loc = local_jacobian_norm(model, x_adv, tol=1e-4, max_iter=200, seed=seed) if jacobian else None
    return AdversarialCalibration(x, y, x_adv, eps, base, j_loc, name)


def reuse_calibration(
    model: nn.Module, calib: Any, *, eps: float, attack: Any = None, steps: int = 10, seed: int = 0
) -> AdversarialCalibration:
    """``calib`` itself when it is an :class:`AdversarialCalibration` made at ``eps`` (ConfigError
    otherwise), else a new one from the images in ``calib``."""
    if isinstance(calib, AdversarialCalibration):
        if not math.isclose(calib.eps, eps):
            raise ConfigError(
                f"the adversarial calibration was made at eps={calib.eps:g}, not {eps:g}", "rebuild it"
            )
        return calib
    return adversarial_calibration(model, calib, eps=eps, attack=attack, steps=steps, seed=seed)


def _deviation(
    model: nn.Module, calib: AdversarialCalibration, changed: Sequence[str] = (), kind: str = "deviation"
) -> float:
    """mean over x_adv of ‖f_p(x_adv) − f(x_adv)‖₂ for the model as it currently is (only layers
    ``changed`` differ from the float model: then only their downstream part is recomputed); with
    ``kind="loss"``, CE(f_p(x_adv), y) − CE(f(x_adv), y), the mean cross-entropies."""
    if changed:
        out = calib.downstream(model)(changed)
    else:
        with torch.no_grad():
            out = model(calib.x_adv)
    out = getattr(out, "value", out)
    if kind == "loss":
        return float(F.cross_entropy(out, calib.y) - F.cross_entropy(calib.base_logits, calib.y))
    return float((out - calib.base_logits).flatten(1).norm(dim=1).mean())


def network_deviation(
    model: nn.Module,
    calib: AdversarialCalibration,
    specs: Mapping[str, LayerSpec],
    cache: WeightCache | None = None,
    kind: str = "deviation",
) -> float:
    """Output deviation of the whole quantized network on x_adv, all layers' Ŵ in place at once.

    Returns mean over x_adv of ‖f_p(x_adv) − f(x_adv)‖₂ in logits; with ``kind="loss"`` the increase
    of the mean cross-entropy at x_adv, CE(f_p(x_adv), y) − CE(f(x_adv), y) (the ``loss`` estimate).
    Weight-only specs swap Ŵ into the float model (bit-identical to :func:`~aq_brevitas.quantize`'s layers); specs with an activation
    bit width need the input quantizer too, so those go through :func:`~aq_brevitas.quantize` itself.
    """
    if any(s.act_bit_width for s in specs.values()):
        from ..quantization.convert import quantize

        q = quantize(model, LayerwisePolicy(dict(specs)), calibration_data=calib.x)
        with eval_mode(q):
            return _deviation(q, calib, kind=kind)
    cache = cache or WeightCache(model)
    calib.downstream(model)  # record the float forward before any weight is swapped
    with eval_mode(model), swapped_weights(model, {n: cache(n, s) for n, s in specs.items()}):
        return _deviation(model, calib, list(specs), kind)
