"""The attack twin: a Brevitas model's forward, fused for attacking, giving the same numbers.

An attack runs the model hundreds of times on inputs near one image; every Brevitas forward
re-derives what the policy fixed (weight quantization, activation scales, bit widths, ``QuantTensor``
metadata) in dozens of small ops. Inside :func:`attack_twin`:

* each Brevitas layer's weights are quantized once (:func:`~aq_brevitas.forward.frozen_quant_weights`)
  and the layer runs its plain op (conv, linear) on them;
* each activation and input quantizer runs as one fused op, ``clamp(round(x / s), lo, hi) · s``
  (a preceding ReLU folded in where the range starts at 0), with Brevitas's own straight-through
  gradient: the round passes the gradient, the clamp passes it where the rounded code lies in
  ``[lo, hi]``, and the value is ``(g · s) / s`` as Brevitas's mul and div backwards compute it.
  The clamp's mask is an open interval of the input, found once per quantizer from the same
  arithmetic (the input side of each rounding boundary), so the backward is one fused kernel.

The arithmetic is Brevitas's, op for op: logits, integer codes and input gradients are bit-equal to
the Brevitas forward's (``tests/test_twin.py``). Brevitas stays the model users get and export
from; the twin patches module forwards only until exit (also on exceptions), adding no parameter,
buffer or attribute that outlives the block. What the twin cannot run the same way keeps its
Brevitas forward, named with the reason in :attr:`Twin.refused`.

Every adversarial example is to be judged by Brevitas: :func:`verified_logits` runs both forwards
and counts where they disagree (top-1 class, and integer codes on the other side of a rounding
boundary), :func:`brevitas_forward` switches the twin off for a block.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..forward import frozen_quant_weights, instance_overrides

_BITS = {
    torch.float32: ("f", "i", 0x7FFFFFFF, 0x7F7FFFFF),
    torch.float64: ("d", "q", (1 << 63) - 1, 0x7FEFFFFFFFFFFFFF),
}


# --------------------------------------------------------------------------------- rounding edges
def _key(x: float, dtype: torch.dtype) -> int:
    """An integer that orders floats of ``dtype`` as their values (both zeros share 0)."""
    f, i, mask, _ = _BITS[dtype]
    bits = struct.unpack(i, struct.pack(f, x))[0]
    return bits if bits >= 0 else -(bits & mask)


def _value(key: int, dtype: torch.dtype) -> float:
    f, i, mask, _ = _BITS[dtype]
    bits = key if key >= 0 else -key | ~mask
    return struct.unpack(f, struct.pack(i, bits))[0]


def _first_true(pred: Callable[[float], bool], dtype: torch.dtype) -> float | None:
    """The smallest finite float of ``dtype`` where a monotone (False then True) ``pred`` holds; None
    where it holds nowhere. Bisects the floats themselves, so the edge is exact."""
    top = _BITS[dtype][3]
    lo, hi = -top, top
    if not pred(_value(hi, dtype)):
        return None
    if pred(_value(lo, dtype)):
        return _value(lo, dtype)
    while hi - lo > 1:  # pred(lo) is False, pred(hi) is True
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if pred(_value(mid, dtype)) else (mid, hi)
    return _value(hi, dtype)


# ------------------------------------------------------------------------------ the fused quantizer
@dataclass(eq=False)
class _Quantizer:
    """One Brevitas activation/input quantizer, fused: ``act``, then ``clamp(round(x / s + z), lo, hi)``,
    minus ``z``, times ``s``. The gradient passes where ``x_lo < x < x_hi`` (the codes in range; with a
    folded ReLU, also ``x > 0``)."""

    name: str
    scale: torch.Tensor
    zero_point: torch.Tensor | None  # None: zero (then +0 and -0 are skipped; only the sign of 0 differs)
    lo: float
    hi: float
    act: nn.Module | None  # an activation applied first, unfused (None: identity or a folded ReLU)
    x_lo: float = -float("inf")
    x_hi: float = float("inf")
    twin: Twin | None = field(default=None, repr=False)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The rounded codes (before clamping) of inputs ``x``, by the fused forward's own arithmetic."""
        t = x / self.scale
        if self.zero_point is not None:
            t = t + self.zero_point
        return torch.round(t)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        out = _FusedQuant.apply(x, self)
        if self.twin is not None and self.twin.recording is not None:
            self.twin.recording.setdefault(self.name, []).append(out.detach())
        return out


class _FusedQuant(torch.autograd.Function):
    """Brevitas's ``IntQuant`` forward (div, add zero point, round, clamp, sub, mul) in place on one
    buffer; its backward, Brevitas's STE chain, as ``(g · s) / s`` masked by one ``hardtanh_backward``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, q: _Quantizer) -> torch.Tensor:
        t = x / q.scale
        if q.zero_point is not None:
            t.add_(q.zero_point)
        t.round_().clamp_(q.lo, q.hi)
        if q.zero_point is not None:
            t.sub_(q.zero_point)
        t.mul_(q.scale)
        ctx.save_for_backward(x)
        ctx.q = q
        return t

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        q = ctx.q
        gx = g * q.scale
        gx.div_(q.scale)
        return torch.ops.aten.hardtanh_backward.grad_input(gx, x, q.x_lo, q.x_hi, grad_input=gx), None


def _edges(q: _Quantizer, clamp_masks: bool, relu_folded: bool, dtype: torch.dtype) -> None:
    """Set ``q.x_lo``/``q.x_hi``: the open interval of inputs whose gradient Brevitas passes."""
    if relu_folded:
        q.x_lo = 0.0  # ReLU's own backward: the gradient passes where x > 0 (codes are then >= 0 = lo)
    if not clamp_masks:
        return

    def code(v: float) -> float:
        return float(q.codes(torch.tensor([v], dtype=dtype, device=q.scale.device))[0])

    above = _first_true(lambda v: code(v) > q.hi, dtype)
    q.x_hi = float("inf") if above is None else above
    if not relu_folded:
        first = _first_true(lambda v: code(v) >= q.lo, dtype)
        q.x_lo = float("inf") if first is None else _value(_key(first, dtype) - 1, dtype)


def fusable_quantizer(proxy: nn.Module, name: str) -> _Quantizer | str:
    """The fused form of a Brevitas activation quantizer proxy named ``name``, or why it has none.

    Fusable: an enabled, eval-mode ``ActQuantProxyFromInjector`` whose tensor quantizer is Brevitas's
    ``RescalingIntQuant`` over ``IntQuant`` with round-to-nearest (``RoundSte``), a plain or STE clamp,
    no quantization delay, and a per-tensor scale and zero point that do not depend on the input
    (a parameter, a calibrated statistic, a constant), on a float32 or float64 model. A ReLU in front
    (``QuantReLU``) is folded into the clamp when the range starts at 0.
    """
    from brevitas.core.function_wrapper import Identity, RoundSte, TensorClamp, TensorClampSte
    from brevitas.core.quant import IntQuant, RescalingIntQuant
    from brevitas.core.quant.delay import _NoDelay
    from brevitas.core.scaling import ConstScaling, ParameterFromRuntimeStatsScaling, ParameterScaling
    from brevitas.proxy.runtime_quant import ActQuantProxyFromInjector

    if not isinstance(proxy, ActQuantProxyFromInjector) or not proxy.is_quant_enabled:
        return f"{type(proxy).__name__} is not an enabled activation quantizer"
    if proxy.training:
        return "in training mode (its scale may follow the input): enter the twin in eval mode"
    fused = proxy.fused_activation_quant_proxy
    tq, act = fused.tensor_quant, fused.activation_impl
    if type(tq) is not RescalingIntQuant or type(tq.int_quant) is not IntQuant or tq.observer_only:
        return f"its tensor quantizer {type(tq).__name__} is not Brevitas's RescalingIntQuant/IntQuant"
    iq = tq.int_quant
    rounding, clamp = type(iq.float_to_int_impl), type(iq.tensor_clamp_impl)
    if rounding is not RoundSte or clamp not in (TensorClamp, TensorClampSte):
        return f"it rounds with {rounding.__name__} and clamps with {clamp.__name__}"
    view = isinstance(iq.input_view_impl, (Identity, nn.Identity))
    if type(iq.delay_wrapper.delay_impl) is not _NoDelay or not view:
        return "it delays quantization or reshapes its input"
    if type(tq.scaling_impl) not in (ParameterFromRuntimeStatsScaling, ParameterScaling, ConstScaling):
        return f"its scale comes from {type(tq.scaling_impl).__name__}, which may follow the input"
    dtype = next((p.dtype for p in proxy.parameters()), torch.get_default_dtype())
    if dtype not in _BITS:
        return f"the twin runs float32/float64 quantizers, not {dtype}"
    with torch.no_grad():
        probe = torch.zeros(1, dtype=dtype, device=next((b.device for b in proxy.parameters()), None))
        _, scale, zero_point, bit_width = tq(probe)
        lo, hi = float(iq.min_int(bit_width)), float(iq.max_int(bit_width))
    if scale.numel() != 1 or zero_point.numel() != 1 or not bool(scale.reshape(()) > 0):
        return "its scale or zero point is not one positive number (per-channel activations)"
    zp = None if float(zero_point) == 0.0 else zero_point.detach().clone()
    folded = isinstance(act, nn.ReLU) and lo == 0.0 and zp is None
    other = None if folded or isinstance(act, (Identity, nn.Identity)) else act
    q = _Quantizer(name, scale.detach().clone(), zp, lo, hi, other)
    _edges(q, clamp is TensorClamp, folded, dtype)
    return q


# ------------------------------------------------------------------------------------- the twin
@dataclass(eq=False)
class Twin:
    """What :func:`attack_twin` runs fused, what it leaves to Brevitas, and the checks made so far.

    ``fused``: the quantizers running fused (module names of their proxies); ``layers``: the Brevitas
    layers running their plain op on weights quantized once; ``refused``: module name -> why it keeps
    its Brevitas forward; ``frozen``: layers whose weights are quantized once (fused or not).
    ``checked``: points judged by :meth:`verify`; ``disagreements``: of those, where the twin's top-1
    class differs from Brevitas's; ``flipped``: integer codes on the other side of a rounding boundary
    from Brevitas's; ``max_logit_gap``: the largest absolute logit difference seen.
    """

    model: nn.Module = field(repr=False)
    frozen: int = 0
    fused: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    on: bool = True
    checked: int = 0
    disagreements: int = 0
    flipped: int = 0
    max_logit_gap: float = 0.0
    recording: dict[str, list[torch.Tensor]] | None = field(default=None, repr=False)
    # the Brevitas proxy of each fused quantizer, and its fused form
    proxies: dict[str, nn.Module] = field(default_factory=dict, repr=False)
    quantizers: dict[str, _Quantizer] = field(default_factory=dict, repr=False)

    @contextlib.contextmanager
    def exact(self) -> Iterator[None]:
        """The Brevitas forward (weights still quantized once) until exit."""
        on, self.on = self.on, False
        try:
            yield
        finally:
            self.on = on

    @torch.no_grad()
    def verify(self, x: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """Brevitas's logits on ``x`` (the judgement), after comparing them with the twin's: counts
        the points, their top-1 disagreements and the flipped codes. ``model``: the module to call
        (default: the twin's; a wrapper around it works too)."""
        model = self.model if model is None else model
        on, self.on = self.on, True
        try:
            self.recording = {}
            twin_logits = model(x)
            twin_codes, self.recording = self.recording, {}
            with self.exact(), _recorded(self.proxies, self.recording):
                logits = model(x)
            codes = self.recording
        finally:
            self.recording, self.on = None, on
        self.checked += len(logits)
        self.disagreements += int((twin_logits.argmax(1) != logits.argmax(1)).sum())
        self.flipped += sum(_differ(a, b) for n in codes for a, b in zip(codes[n], twin_codes.get(n, [])))
        gap = (twin_logits - logits).abs().nan_to_num(0.0)
        self.max_logit_gap = max(self.max_logit_gap, float(gap.max()) if gap.numel() else 0.0)
        return logits

    def notes(self) -> list[str]:
        """What a report says about the twin: what ran fused, where it and Brevitas disagreed, and what
        kept its Brevitas forward (none for a float model)."""
        if not self.fused and not self.layers:
            return []
        head = (
            f"attacks ran on the attack twin ({len(self.fused)} quantizers fused, {len(self.layers)} layers on "
            f"weights quantized once); every adversarial example was judged by the Brevitas forward: "
            f"{self.disagreements} of {self.checked} points classified differently, {self.flipped} integer "
            "codes across a rounding boundary"
        )
        return [head] + [
            f"attack twin: {n} keeps its Brevitas forward: {why}" for n, why in self.refused.items()
        ]

    def summary(self) -> dict[str, Any]:
        """The twin's record as plain data (for a report's ``meta``)."""
        return {
            "fused_quantizers": len(self.fused),
            "plain_layers": len(self.layers),
            "refused": dict(self.refused),
            "checked": self.checked,
            "disagreements": self.disagreements,
            "flipped_codes": self.flipped,
            "max_logit_gap": self.max_logit_gap,
        }


def _differ(a: torch.Tensor, b: torch.Tensor) -> int:
    if a.shape != b.shape:
        return max(a.numel(), b.numel())
    return int(((a != b) & ~(a.isnan() & b.isnan())).sum())


@contextlib.contextmanager
def _recorded(proxies: dict[str, nn.Module], into: dict[str, list[torch.Tensor]]) -> Iterator[None]:
    """Record each proxy's dequantized output while the Brevitas forward runs."""

    def hook(name: str) -> Callable[..., None]:
        return lambda module, args, out: into.setdefault(name, []).append(getattr(out, "value", out).detach())

    handles = [p.register_forward_hook(hook(n)) for n, p in proxies.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------ the patches
def _brevitas_defined(method: Any) -> bool:
    return getattr(method, "__module__", "").startswith("brevitas.")


def _one_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The input of a one-input Brevitas forward (``forward(input)``, positional or by name), if it is
    a plain tensor (a QuantTensor, or anything else, goes to the Brevitas forward)."""
    x = args[0] if len(args) == 1 and not kwargs else None
    x = kwargs.get("input") if not args and len(kwargs) == 1 else x
    return x if type(x) is torch.Tensor or isinstance(x, nn.Parameter) else None


def _quantizers(twin: Twin, layer: nn.Module, name: str, which: tuple[str, ...]) -> list[Any] | str:
    """The fused form of the layer's proxies ``which`` (None where disabled), or why not."""
    out: list[Any] = []
    for attr in which:
        proxy = getattr(layer, attr)
        if not proxy.is_quant_enabled:
            out.append(None)
            continue
        q = fusable_quantizer(proxy, f"{name}.{attr}" if name else attr)
        if isinstance(q, str):
            return f"{attr}: {q}"
        q.twin = twin
        twin.quantizers[q.name] = q
        out.append(q)
    return out


def _weight_layer(twin: Twin, layer: nn.Module, name: str) -> Callable[..., Any] | str:
    """The fused forward of a Brevitas weight layer (conv, linear...), or why it has none."""
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer as QuantWBIOL

    if type(layer).forward_impl is not QuantWBIOL.forward_impl or not _brevitas_defined(type(layer).forward):
        return f"{type(layer).__name__} overrides Brevitas's forward"
    if layer.return_quant_tensor or layer.export_mode:
        return "it returns a QuantTensor (or is in export mode)"
    if layer.weight_quant.requires_quant_input:
        return "its weight quantizer needs the quantized input"
    if layer.bias is not None and layer.bias_quant.is_quant_enabled:
        return "its bias is quantized (its scale follows the input's)"
    qs = _quantizers(twin, layer, name, ("input_quant", "output_quant"))
    if isinstance(qs, str):
        return qs
    qin, qout = qs
    with torch.no_grad():
        weight = getattr(layer.quant_weight(), "value", layer.weight)  # constant: frozen on entry
    bias, original = layer.bias, layer.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        x = _one_tensor(args, kwargs)
        if not twin.on or layer.training or x is None:
            return original(*args, **kwargs)
        out = layer.inner_forward_impl(x if qin is None else qin(x), weight, bias)
        return out if qout is None else qout(out)

    return forward


def _act_layer(twin: Twin, layer: nn.Module, name: str) -> Callable[..., Any] | str | None:
    """The fused forward of a Brevitas activation layer (QuantReLU, QuantIdentity...), or why it has
    none; None for one that quantizes nothing."""
    from brevitas.nn.quant_layer import QuantNonLinearActLayer as QuantNLAL

    if not layer.act_quant.is_quant_enabled:
        return None
    if type(layer).forward is not QuantNLAL.forward:
        return f"{type(layer).__name__} overrides Brevitas's forward"
    if layer.return_quant_tensor or layer.export_mode:
        return "it returns a QuantTensor (or is in export mode)"
    qs = _quantizers(twin, layer, name, ("input_quant", "act_quant"))
    if isinstance(qs, str):
        return qs
    qin, qact = qs
    original = layer.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        x = _one_tensor(args, kwargs)
        if not twin.on or layer.training or x is None:
            return original(*args, **kwargs)
        return qact(x if qin is None else qin(x))

    return forward


def _plan(model: nn.Module, twin: Twin) -> list[tuple[nn.Module, Callable[..., Any]]]:
    """The module forwards to patch; fills the twin's ``fused``, ``layers``, ``refused`` and ``proxies``."""
    from brevitas.nn.quant_layer import QuantNonLinearActLayer as QuantNLAL
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer as QuantWBIOL
    from brevitas.proxy.runtime_quant import ActQuantProxyFromInjector

    patches, covered = [], set()
    for name, m in model.named_modules():
        if isinstance(m, QuantWBIOL):
            fwd = _weight_layer(twin, m, name)
        elif isinstance(m, QuantNLAL):
            fwd = _act_layer(twin, m, name)
        else:
            continue
        if isinstance(fwd, str):
            twin.refused[name or type(m).__name__] = fwd
        elif fwd is not None:
            fwd.aq_twin = twin  # type: ignore[attr-defined]  # how active_twin finds it
            patches.append((m, fwd))
            twin.layers += [name] if isinstance(m, QuantWBIOL) else []
            covered.add(m)
    for name, m in model.named_modules():
        if isinstance(m, ActQuantProxyFromInjector) and m.is_quant_enabled:
            owner = name.rsplit(".", 1)[0] if "." in name else ""
            if model.get_submodule(owner) in covered:
                twin.fused.append(name)
                twin.proxies[name] = m
            elif not any(name.startswith(f"{r}.") for r in twin.refused):
                twin.refused[name] = "the twin fuses quantizers of Brevitas weight and activation layers only"
    twin.quantizers = {n: q for n, q in twin.quantizers.items() if n in twin.proxies}
    return patches


def active_twin(model: nn.Module) -> Twin | None:
    """The :class:`Twin` whose block ``model`` (or a module in it) is in, if any."""
    for m in model.modules():
        twin = getattr(m.__dict__.get("forward"), "aq_twin", None)
        if twin is not None:
            return twin
    return None


@contextlib.contextmanager
def attack_twin(model: nn.Module) -> Iterator[Twin]:
    """Run ``model`` as its attack twin until exit; yields the :class:`Twin` (its record).

    Enter it in eval mode, around attacks: weights are constants (they get no gradient), and a module
    in training mode inside the block runs its Brevitas forward. Logits, input gradients and integer
    codes equal the Brevitas forward's; judge adversarial examples with :func:`verified_logits`.
    Modules the twin cannot run the same way keep their Brevitas forward (``twin.refused`` says why);
    float models pass through untouched. On exit (also on exceptions) every module gets its own
    forward back. Nested blocks share the outer twin.

    >>> import torch
    >>> from torch import nn
    >>> from aq_brevitas import LayerSpec, LayerwisePolicy, quantize
    >>> from aq_brevitas.quantization.twin import attack_twin, verified_logits
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    >>> x = torch.rand(16, 1, 8, 8)
    >>> q = quantize(net, LayerwisePolicy(default=LayerSpec(4, act_bit_width=4)), calibration_data=x).eval()
    >>> with attack_twin(q) as twin:
    ...     same = torch.equal(q(x), verified_logits(q, x))
    >>> same, len(twin.fused), twin.disagreements, twin.flipped
    (True, 2, 0, 0)
    """
    outer = active_twin(model)
    if outer is not None:
        yield outer
        return
    with frozen_quant_weights(model) as frozen, instance_overrides() as override:
        twin = Twin(model, frozen)
        for m, fwd in _plan(model, twin):
            override(m, "forward", fwd)
        yield twin


@contextlib.contextmanager
def brevitas_forward(model: nn.Module) -> Iterator[None]:
    """The Brevitas forward until exit, inside an :func:`attack_twin` block (anywhere else, nothing)."""
    twin = active_twin(model)
    with twin.exact() if twin is not None else contextlib.nullcontext():
        yield


def verified_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model``'s logits on ``x`` by the Brevitas forward, without gradients: how adversarial examples
    are judged. Inside an :func:`attack_twin` block the twin's logits are compared with them and the
    twin counts the points, top-1 disagreements and flipped codes (:class:`Twin`)."""
    twin = active_twin(model)
    if twin is None or not twin.on:
        with torch.no_grad():
            return model(x)
    return twin.verify(x, model)
