"""What a quantized model is, read from its Brevitas quantizers (as Brevitas's own exporters read them).

Nothing is stored on the user's model: a layer's weight bits come from its weight quantizer's
``bit_width()`` (a stateful constant, so a loaded checkpoint says the same), its scaling rule and
granularity from the ``aq_spec`` that :mod:`~aq_brevitas.quantization.injectors` gives every
injector it makes, and its input bits and signedness from the activation quantizer whose output the
layer reads -- its own ``input_quant``, or the ``QuantReLU``/``QuantIdentity`` at the producer of its
input (:func:`~aq_brevitas.quantization.placement.input_quantizers`). A hand-made Brevitas model has
no ``aq_spec``: its scaling is read from the injector (``restrict_scaling_type``, ``scaling_stats_op``,
an MSE base) and its granularity from the size of the weight scale.

>>> import torch
>>> from torch import nn
>>> from aq_brevitas import LayerSpec, LayerwisePolicy, apply_policy, quantize
>>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
>>> q = quantize(net, LayerwisePolicy(default=LayerSpec(4, act_bit_width=8)), calibration_data=torch.rand(4, 1, 8, 8))
>>> r = apply_policy(q, LayerwisePolicy({"3": LayerSpec(2, "mse", act_bit_width=8)}))
>>> {n: s.short() for n, s in read_policy(r).layers.items()}
{'0': '4b max pc a8', '3': '2b mse pc a8'}
>>> input_signedness(r), act_placement_of(r)
({'0': False, '3': False}, {'0': 'input', '3': 'producer'})
>>> [(c.name, c.old, c.new) for c in layer_changes(q, r)]
[('3', 'QuantLinear 4b max pc a8', 'QuantLinear 2b mse pc a8')]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from ..errors import PolicyError
from ..nnutils import quantizable_layers
from ..policy import ACT_BITS, WEIGHT_BITS, LayerSpec, LayerwisePolicy
from .placement import input_quantizers


@dataclass(frozen=True)
class LayerChange:
    """One layer's change: its name, what it was, what it became."""

    name: str
    old: str
    new: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _injector_value(injector: Any, name: str) -> Any:
    """An injector's value for ``name``, or None where it has none (injectors raise DependencyError)."""
    try:
        return getattr(injector, name)
    except Exception:  # DependencyError: not declared, or not resolvable without the module
        return None


def quantizer_bit_width(proxy: Any) -> int:
    """A Brevitas quantizer proxy's bit width, read from its bit-width module where it has one
    (``msb_clamp_bit_width_impl``, a binary quantizer's ``bit_width``): that runs no quantization, so
    an MSE weight quantizer not yet initialised (a fresh ``deepcopy``) is read without its search,
    which would recurse; else ``proxy.bit_width()``."""
    tensor_quant = getattr(proxy, "tensor_quant", None)
    for name in ("msb_clamp_bit_width_impl", "bit_width"):
        impl = getattr(tensor_quant, name, None)
        if isinstance(impl, nn.Module):
            return int(impl())
    return int(proxy.bit_width())


def _weight_proxy(layer: nn.Module) -> Any:
    proxy = getattr(layer, "weight_quant", None)
    return proxy if getattr(proxy, "is_quant_enabled", False) else None


def _generic_scaling(injector: Any) -> str:
    from brevitas.core.restrict_val import RestrictValueType
    from brevitas.core.stats import StatsOp

    if _injector_value(injector, "restrict_scaling_type") == RestrictValueType.POWER_OF_TWO:
        return "po2"
    if _injector_value(injector, "scaling_stats_op") == StatsOp.PERCENTILE:
        return "percentile"
    if any("MSE" in c.__name__ for c in injector.__mro__):  # brevitas.quant.base's MSE mixins
        return "mse"
    return "max"


def weight_spec(name: str, layer: nn.Module) -> tuple[int, str, str] | None:
    """``(bits, scaling, granularity)`` of a layer's enabled weight quantizer; None for a float weight.

    Raises :class:`PolicyError` for bits no :class:`LayerSpec` can hold (a hand-made model's)."""
    proxy = _weight_proxy(layer)
    if proxy is None:
        return None
    bits = quantizer_bit_width(proxy)
    if bits not in WEIGHT_BITS:
        raise PolicyError(
            f"layer {name} quantizes its weights at {bits} bits, outside the {WEIGHT_BITS.start}..{WEIGHT_BITS.stop - 1} "
            "a LayerSpec holds",
            "quantize it with aq_brevitas.quantize/apply_policy at 1..8 bits",
        )
    injector = proxy.quant_injector
    tag = _injector_value(injector, "aq_spec")
    if isinstance(tag, tuple) and len(tag) == 3:
        return bits, str(tag[1]), str(tag[2])
    granularity = "per_channel" if proxy.scale().numel() > 1 else "per_tensor"
    return bits, _generic_scaling(injector), granularity


def _act_bits(name: str, proxy: Any) -> int:
    bits = quantizer_bit_width(proxy)
    if bits not in ACT_BITS:
        raise PolicyError(
            f"layer {name} reads {bits}-bit activations, outside the {ACT_BITS.start}..{ACT_BITS.stop - 1} a LayerSpec holds",
            "quantize its input with aq_brevitas.quantize/apply_policy at 2..16 bits",
        )
    return bits


def _quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in quantizable_layers(model).items() if _weight_proxy(m) is not None}


def read_policy(model: nn.Module) -> LayerwisePolicy:
    """The policy ``model`` runs: one :class:`LayerSpec` per layer with an enabled weight quantizer
    (weight bits, scaling rule, granularity, and the bits of the activation quantizer feeding it, at
    the layer or at the producer of its input). Layers with float weights are not in it."""
    layers = _quantized_layers(model)
    inputs = input_quantizers(model, layers)
    specs = {}
    for name, layer in layers.items():
        bits, scaling, granularity = weight_spec(name, layer)  # type: ignore[misc]
        found = inputs[name]
        act = _act_bits(name, found[1]) if found else None
        specs[name] = LayerSpec(bits, scaling, granularity, act)
    return LayerwisePolicy(specs)


def input_signedness(model: nn.Module) -> dict[str, bool]:
    """Per quantized layer whose input is quantized: whether that input quantizer is signed."""
    found = input_quantizers(model, _quantized_layers(model))
    return {n: bool(f[1].is_signed) for n, f in found.items() if f}


def act_placement_of(model: nn.Module) -> dict[str, str]:
    """Per quantized layer whose input is quantized: ``"input"`` (its own ``input_quant``),
    ``"producer"`` (a QuantReLU/QuantIdentity at the op producing its input) or ``"finn"`` (the same,
    in FINN's layout: :data:`~aq_brevitas.quantization.placement.PLACEMENTS`)."""
    from .placement import target_layout

    found = input_quantizers(model, _quantized_layers(model))
    producer = target_layout(model)
    return {n: "input" if f[0] == f"{n}.input_quant" else producer for n, f in found.items() if f}


def _act_description(proxy: Any, consumers: list[str]) -> str:
    from brevitas.core.restrict_val import RestrictValueType

    po2 = _injector_value(proxy.quant_injector, "restrict_scaling_type") == RestrictValueType.POWER_OF_TWO
    sign = "int" if proxy.is_signed else "uint"
    return f"a{quantizer_bit_width(proxy)} {sign}{' po2' if po2 else ''} (input of {', '.join(consumers)})"


def _describe_layers(model: nn.Module) -> dict[str, str]:
    """Each quantizable layer's and each activation quantizer's description, by module name."""
    layers = quantizable_layers(model)
    policy = read_policy(model)
    out = {
        n: f"{type(m).__name__} {policy.layers[n].short()}"
        if n in policy.layers
        else f"{type(m).__name__} float"
        for n, m in layers.items()
    }
    sites: dict[str, tuple[Any, list[str]]] = {}
    for layer, found in input_quantizers(model, policy.layers).items():
        if found:
            sites.setdefault(found[0], (found[1], []))[1].append(layer)
    for where, (proxy, consumers) in sites.items():
        kind = "input_quant" if where.endswith(".input_quant") else type(model.get_submodule(where)).__name__
        out[where] = f"{kind} {_act_description(proxy, consumers)}"
    return out


def _module_kind(model: nn.Module, name: str) -> str:
    if name.endswith(".input_quant"):
        return "float input"
    try:
        return type(model.get_submodule(name)).__name__
    except AttributeError:
        return "-"


def layer_changes(before: nn.Module, after: nn.Module) -> list[LayerChange]:
    """What quantizing (or re-bitting) ``before`` into ``after`` changed, read from both models: each
    quantizable layer whose quantization differs, each layer left float (``"(kept float)"``), and each
    activation quantizer that is new or differs; layers first, in registration order."""
    old, new = _describe_layers(before), _describe_layers(after)
    changes = []
    for name, now in new.items():
        was = old.get(name, _module_kind(before, name))
        if now == was and now.endswith(" float"):
            changes.append(LayerChange(name, was, f"{now} (kept float)"))
        elif now != was:
            changes.append(LayerChange(name, was, now))
    return changes


def changes_table(changes: list[LayerChange]) -> str:
    """The changes as a text table (what ``aq-brevitas quantize`` prints)."""
    rows = [f"{'layer':<28} {'before':<24} after"]
    rows += [f"{c.name:<28} {c.old:<24} {c.new}" for c in changes]
    return "\n".join(rows)
