"""The layer swap: apply a :class:`LayerwisePolicy` to a model.

* :func:`quantize` turns a float model's quantizable layers (``Conv1d/Conv2d/ConvTranspose1d/2d/Linear``,
  as :data:`~aq_brevitas.nnutils.QUANTIZABLE_TYPES` lists them) into their Brevitas twins carrying the
  spec's weight quantizer (and, with ``act_bit_width``, an input quantizer on the layer), with the
  trained weights.
* :func:`apply_policy` re-bits a model that already uses Brevitas layers, keeping its float weights.

Per-channel scales are per output channel: weight axis 0, axis 1 for a transposed conv. A transposed
conv with ``groups > 1`` becomes a :class:`GroupedQuantConvTranspose2d` (or ``1d``) holding one scale
per output channel (see :mod:`aq_brevitas.quantization.injectors`).

Both leave the original model untouched unless ``inplace=True`` and set no attribute on it: its
quantizers say what it is (:mod:`~aq_brevitas.quantization.readback`). :func:`apply_policy` merges.

A module registered under several names is one object: the specs for those names must agree. A
module called several times in ``forward`` is quantized once and used quantized at every call. A
weight ``Parameter`` shared by several layers stays shared (the Brevitas layers hold the same
``Parameter``); each layer quantizes it with its own spec, and a ``UserWarning`` names the layers
when their specs differ (the deployed model then stores that weight once per spec).

Inputs may be Brevitas ``QuantTensor`` s (a ``QuantIdentity``/``QuantReLU`` with
``return_quant_tensor=True`` in front of a layer): their values decide input signedness. A model whose
forward takes several inputs is calibrated on tuples of them (``model(*batch)``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

import brevitas.nn as qnn
from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer as QuantWBIOL
from torch import nn

from ..classifier import unwrap_parallel
from ..errors import PolicyError, warn
from ..folding import fold_batchnorm
from ..forward import iter_x_batches
from ..nnutils import plain_tensor, quantizable_layers, shared_weights, warn_unsupported
from ..policy import LayerSpec, LayerwisePolicy, check_target
from .calibrate import calibrate, model_inputs, nonnegative_inputs
from .coverage import check_convertible, first_sample, keep_layers_called, refuse_unquantize
from .finn_layout import refuse_finn_activations
from .injectors import act_quant_for, is_grouped_transposed, weight_quant_for
from .placement import (
    PLACEMENTS,
    ActRequest,
    input_quantizers,
    install_input_quant,
    place_act_quant,
    target_layout,
)
from .readback import input_signedness


def _input_quant(spec: LayerSpec, signed: bool) -> type | None:
    if spec.act_bit_width is None:
        return None
    return act_quant_for(spec.act_bit_width, signed=signed, po2=spec.scaling == "po2")


class _WeightValueInForward:
    """Mixin for a transposed conv with ``groups > 1`` and per-output-channel weight scales.

    Brevitas forms the output scale ``s_in·s_w`` of a quantized conv by viewing the weight scale along
    weight axis 1; the ``(in, out/groups, 1, ...)`` scale such a layer needs does not fit that view,
    and the first forward with a quantized input fails. The convolution is therefore fed the
    dequantized weight (the same numbers), and the layer returns a plain tensor.
    """

    def inner_forward_impl(self, x: Any, quant_weight: Any, quant_bias: Any) -> Any:
        return super().inner_forward_impl(x, plain_tensor(quant_weight), quant_bias)


class GroupedQuantConvTranspose1d(_WeightValueInForward, qnn.QuantConvTranspose1d):
    """``QuantConvTranspose1d`` with ``groups > 1`` and per-output-channel weight scales."""


class GroupedQuantConvTranspose2d(_WeightValueInForward, qnn.QuantConvTranspose2d):
    """``QuantConvTranspose2d`` with ``groups > 1`` and per-output-channel weight scales."""


# float/Brevitas transposed conv -> (plain Brevitas class, the class for grouped per-channel weights)
_TRANSPOSED = {
    nn.ConvTranspose1d: (qnn.QuantConvTranspose1d, GroupedQuantConvTranspose1d),
    nn.ConvTranspose2d: (qnn.QuantConvTranspose2d, GroupedQuantConvTranspose2d),
}


def _grouped_per_channel(layer: nn.Module, spec: LayerSpec) -> bool:
    return spec.granularity == "per_channel" and is_grouped_transposed(layer)


def _transposed_class(layer: nn.Module, spec: LayerSpec) -> type | None:
    """The Brevitas class a transposed conv gets under ``spec`` (None for other layers)."""
    for kind, (plain, grouped) in _TRANSPOSED.items():
        if isinstance(layer, kind):
            return grouped if _grouped_per_channel(layer, spec) else plain
    return None


def brevitas_layer(layer: nn.Module, spec: LayerSpec, signed_input: bool = True) -> nn.Module:
    """A Brevitas twin of a float layer: same geometry, mode and device, holding the layer's own weight
    and bias ``Parameter`` s (so weights tied between layers stay tied), with the weight quantizer of
    ``spec`` (and, when ``spec.act_bit_width`` is set, an input quantizer, signed or not).

    ``layer`` is a ``Linear``, ``Conv1d``/``Conv2d`` or ``ConvTranspose1d``/``ConvTranspose2d``. A
    per-channel spec gives one scale per output channel: weight axis 0, or axis 1 for a transposed
    conv (with ``groups > 1`` a ``(in, out/groups, 1, ...)`` scale holding each output channel's
    value, see :mod:`aq_brevitas.quantization.injectors`). This is the quantizer :func:`quantize` installs, so
    ``brevitas_layer(layer, spec).quant_weight()`` is exactly the Ŵ that will run.
    """
    injector = weight_quant_for(spec, layer)
    common: dict[str, Any] = {
        "weight_quant": injector,
        "input_quant": _input_quant(spec, signed_input),
        "return_quant_tensor": False,
    }
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        q: nn.Module = qnn.QuantLinear(layer.in_features, layer.out_features, bias=bias, **common)
    else:
        geometry = {
            "in_channels": layer.in_channels,
            "out_channels": layer.out_channels,
            "kernel_size": layer.kernel_size,
            "stride": layer.stride,
            "padding": layer.padding,
            "dilation": layer.dilation,
            "groups": layer.groups,
            "padding_mode": layer.padding_mode,
            "bias": bias,
        }
        transposed = _transposed_class(layer, spec)
        if transposed is not None:
            q = transposed(output_padding=layer.output_padding, **geometry, **common)
        else:
            q = (qnn.QuantConv2d if isinstance(layer, nn.Conv2d) else qnn.QuantConv1d)(**geometry, **common)
    q.weight = layer.weight  # the same Parameter: a tie between layers survives the swap
    if bias:
        q.bias = layer.bias
    _install_weight_quant(q, injector)  # the quantizer tracks the Parameter it was built on
    q.train(layer.training)
    return q.to(layer.weight.device)  # the activation quantizers too


def _install_weight_quant(layer: QuantWBIOL, injector: type) -> None:
    layer.weight_quant = injector.proxy_class(layer, injector)


def _rebit(name: str, layer: QuantWBIOL, spec: LayerSpec, signed_input: bool) -> None:
    """Swap a Brevitas layer's weight (and, if asked, input) quantizer in place; float weights untouched.

    A Brevitas ``QuantConvTranspose1d/2d`` with ``groups > 1`` switches to (or back from) its
    ``GroupedQuantConvTranspose`` class with the granularity. Per-channel weights are refused
    (:class:`PolicyError`) for one whose bias quantizer or QuantTensor output needs the output scale
    ``s_in·s_w``, or whose class is a subclass we cannot switch."""
    _switch_transposed_class(name, layer, spec)
    _install_weight_quant(layer, weight_quant_for(spec, layer))
    _install_input_quant(layer, spec, signed_input)


def _install_input_quant(layer: QuantWBIOL, spec: LayerSpec, signed_input: bool) -> None:
    """The layer's own input quantizer per ``spec``; one that already quantizes as asked (bits, sign,
    po2) is kept, with its calibrated scale."""
    if spec.act_bit_width is None:
        return
    po2 = spec.scaling == "po2"
    if _has_input_quant(layer) and _quantizes_as(layer.input_quant, spec.act_bit_width, signed_input, po2):
        return
    install_input_quant(layer, spec.act_bit_width, signed_input, po2)


def _quantizes_as(proxy: Any, bits: int, signed: bool, po2: bool) -> bool:
    from brevitas.core.restrict_val import RestrictValueType

    try:
        is_po2 = proxy.quant_injector.restrict_scaling_type == RestrictValueType.POWER_OF_TWO
    except Exception:  # an injector without it (DependencyError): not a po2 one
        is_po2 = False
    return int(proxy.bit_width()) == bits and bool(proxy.is_signed) == signed and is_po2 == po2


def _has_input_quant(layer: nn.Module) -> bool:
    proxy = getattr(layer, "input_quant", None)
    return bool(getattr(proxy, "is_quant_enabled", False))


def _switch_transposed_class(name: str, layer: QuantWBIOL, spec: LayerSpec) -> None:
    target = _transposed_class(layer, spec)
    if target is None or type(layer) is target:
        return
    switchable = {c for pair in _TRANSPOSED.values() for c in pair}
    bias_quant = getattr(layer, "bias_quant", None)
    needs_output_scale = layer.return_quant_tensor or (
        getattr(bias_quant, "requires_input_scale", False) and bias_quant.is_quant_enabled
    )
    if _grouped_per_channel(layer, spec) and (needs_output_scale or type(layer) not in switchable):
        raise PolicyError(
            f"layer {name} ({type(layer).__name__}, groups={layer.groups}) cannot take per-channel weights in "
            "place: Brevitas forms no per-channel output scale for a grouped transposed conv, and its bias "
            "quantizer, QuantTensor output or class needs one",
            f"give {name} granularity='per_tensor', or use a float bias and return_quant_tensor=False",
        )
    if type(layer) in switchable:
        layer.__class__ = target  # the two classes differ only in how forward feeds the weight


def shared_weight_layers(model: nn.Module) -> list[list[str]]:
    """Groups of distinct quantizable layers that hold the same weight ``Parameter`` (tied weights),
    by name, in registration order. One module registered under several names is not a group here
    (see :func:`~aq_brevitas.nnutils.shared_layer_names`)."""
    return [list(names) for names in shared_weights(model).values()]


def convert_model(
    model: nn.Module,
    policy: LayerwisePolicy,
    *,
    inplace: bool,
    swap_float: bool,
    calibration_data: Any,
    fold_bn: bool = False,
    bias_correction: bool = False,
    input_signed: dict[str, bool] | None = None,
    replay: bool = False,
    act_placement: str | Mapping[str, str] = "producer",
) -> nn.Module:
    """The swap behind :func:`quantize`, :func:`apply_policy` and the checkpoint replay.

    ``act_placement`` is one placement for every layer, or one per layer (a checkpoint's record;
    layers it does not name: ``"producer"``). ``input_signed`` fixes input signedness per layer.
    A fresh swap (:func:`quantize`) leaves float the layers the forward never calls
    (:meth:`LayerwisePolicy.resolve` on the first calibration sample); ``replay`` (a checkpoint's
    recorded policy) swaps every layer it names, without the coverage warning given when it was made."""
    placements = _placements(act_placement)
    # A search result carries its policy: quantize(model, search_policy(...)) keeps working.
    policy = policy.policy if isinstance(getattr(policy, "policy", None), LayerwisePolicy) else policy
    check_convertible(model, policy, warn_uncovered=swap_float and not replay)
    warn_unsupported(model)
    target = model if inplace else copy.deepcopy(model)
    if fold_bn:
        fold_batchnorm(target)
    if isinstance(calibration_data, Iterator):  # a one-shot stream: read it once, use it for every pass
        calibration_data = list(calibration_data)
    if (
        swap_float and not replay
    ):  # layers the forward never calls stay float (they would never run quantized)
        resolved = policy.resolve(target, first_sample(target, calibration_data))
    else:
        resolved = policy.resolve(quantizable_layers(target))
    if not swap_float:
        refuse_unquantize(target, policy)
    specs = {n: s for n, s in resolved.items() if s is not None}
    known = {} if swap_float else input_signedness(target)  # a re-bit keeps what the quantizers say
    signed = _input_signedness(target, specs, calibration_data, input_signed, known)
    # At "producer" placement the layers get no input quantizer here: _place_activations puts it at
    # the output of the op producing their input (where FINN needs it). A Brevitas layer that
    # already quantizes its own input keeps that layout and is re-bitted there.
    producer = [n for n, s in specs.items() if placements(n) in ("producer", "finn") and s.act_bit_width]
    at_producer = {n for n in producer if not _has_input_quant(target.get_submodule(n))}
    before = {} if swap_float else _act_proxies(target, specs)
    _swap_layers(target, specs, at_producer, signed, swap_float=swap_float)
    keep_layers_called(target, specs)
    if at_producer:
        # a re-bit keeps the layout the model was built with (a GraphModule records FINN's)
        finn = any(placements(n) == "finn" for n in at_producer) or target_layout(target) == "finn"
        target = _place_activations(target, {n: specs[n] for n in at_producer}, signed, finn=finn)
    if calibration_data is not None:
        calibrate(target, calibration_data, bias_correction=bias_correction)
    elif before:
        _warn_reset_scales(before, _act_proxies(target, specs))
    return target


def _placements(act_placement: str | Mapping[str, str]) -> Any:
    """``layer -> placement`` for one placement or a per-layer mapping; a bad one is a PolicyError."""
    per_layer = isinstance(act_placement, Mapping)
    for value in act_placement.values() if per_layer else [act_placement]:  # type: ignore[union-attr]
        if value not in PLACEMENTS:
            raise PolicyError(
                f"act_placement={value!r} is not one of {', '.join(PLACEMENTS)}",
                'use act_placement="producer" (quantizers after the ReLU/input, as FINN needs) or "input"',
            )
    return (lambda n: act_placement.get(n, "producer")) if per_layer else (lambda n: act_placement)  # type: ignore[union-attr]


def _act_proxies(model: nn.Module, specs: Mapping[str, LayerSpec]) -> dict[str, Any]:
    """The activation quantizer (proxy) each layer of ``specs`` reads, where it has one."""
    return {n: found[1] for n, found in input_quantizers(model, specs).items() if found}


def _warn_reset_scales(before: dict[str, Any], after: dict[str, Any]) -> None:
    """One ``UserWarning`` naming the layers whose input quantizer was replaced (its scale is new)."""
    reset = [n for n, proxy in before.items() if after.get(n) is not None and after[n] is not proxy]
    if reset:
        warn(
            f"the input quantizers of layers {', '.join(reset)} changed bits and lost their calibrated scales "
            "-- fix: pass calibration_data to apply_policy",
            UserWarning,
        )


def _input_signedness(
    target: nn.Module,
    specs: dict[str, LayerSpec],
    calibration_data: Any,
    input_signed: dict[str, bool] | None,
    known: dict[str, bool],
) -> dict[str, bool]:
    """Whether each layer's input quantizer is signed: as given, else unsigned where the first
    calibration batch shows a non-negative input (when a spec quantizes activations), else as its
    present input quantizer is (``known``), else signed."""
    signed = {n: True for n in specs} | known
    if input_signed is not None:
        signed.update(input_signed)
    elif calibration_data is not None and any(s.act_bit_width for s in specs.values()):
        first = next(iter_x_batches(calibration_data, limit_batches=1, model=target), None)
        if first is not None:
            measured = nonnegative_inputs(target, specs, model_inputs(first))
            signed.update({n: not nonneg for n, nonneg in measured.items()})
    return signed


def _swap_layers(
    target: nn.Module,
    specs: dict[str, LayerSpec],
    at_producer: set[str],
    signed: dict[str, bool],
    *,
    swap_float: bool,
) -> None:
    """Each layer of ``specs`` swapped for its Brevitas twin (or re-bitted if it is one already)."""
    for name, spec in specs.items():
        layer = target.get_submodule(name)
        layer_spec = replace(spec, act_bit_width=None) if name in at_producer else spec
        if isinstance(layer, QuantWBIOL):
            _rebit(name, layer, layer_spec, signed.get(name, True))
        elif swap_float:
            target.set_submodule(name, brevitas_layer(layer, layer_spec, signed.get(name, True)))
        else:
            raise PolicyError(
                f"layer {name} is a plain {type(layer).__name__}, not a Brevitas layer",
                "use aq_brevitas.quantize for float models",
            )


def _place_activations(
    model: nn.Module, specs: dict[str, LayerSpec], signed: dict[str, bool], *, finn: bool = False
) -> nn.Module:
    """Activation quantizers at the producers of the layers' inputs (:mod:`aq_brevitas.quantization.placement`), or,
    for a model fx cannot trace, at the layers' inputs with a warning that the layout is not FINN-ready."""
    requests = {
        n: ActRequest(s.act_bit_width, s.scaling == "po2", signed.get(n, True)) for n, s in specs.items()
    }
    placed, _, why = place_act_quant(model, requests, finn=finn)
    if why:
        warn(
            f"activation quantizers stay at the layers' inputs (not FINN-ready): torch.fx cannot trace the "
            f"model ({why}) -- fix: make forward traceable (no data-dependent control flow) for FINN",
            UserWarning,
        )
        for n, s in specs.items():
            _install_input_quant(model.get_submodule(n), s, signed.get(n, True))
        return model
    return placed


def quantize(
    model: nn.Module,
    policy: LayerwisePolicy,
    *,
    inplace: bool = False,
    calibration_data: Any = None,
    fold_bn: bool = False,
    bias_correction: bool = False,
    act_placement: str = "producer",
    target: str = "generic",
) -> nn.Module:
    """Swap every layer the policy covers for its Brevitas twin; calibrate if data is given.

    ``policy`` is a :class:`LayerwisePolicy`, or a search result carrying one as ``.policy``.
    ``calibration_data`` is any form :func:`calibrate` accepts (for a model whose forward takes two
    inputs, a tuple ``(images, vectors)`` or an iterable of such tuples); with ``act_bit_width`` in the
    policy its first batch also decides whether each input quantizer is signed (a layer whose input is
    non-negative gets an unsigned one). A one-shot iterator (a generator) is read once into a list.
    With ``act_bit_width``, ``act_placement="producer"`` (the default) quantizes each layer's input at the
    output of the op producing it (a ``QuantReLU`` after a ReLU, a ``QuantIdentity`` after the input, an
    add or a pool), as FINN needs (:mod:`aq_brevitas.quantization.placement`); the result is then a
    ``torch.fx.GraphModule`` unless the model's own modules could hold every quantizer.
    ``act_placement="input"`` puts a Brevitas ``input_quant`` on the layer itself (not FINN-ready when
    pooling or flattening sits in between). ``target="finn"`` refuses a policy FINN cannot build
    (a layer without ``act_bit_width`` 2..8, or input placement) and lays the quantizers out as FINN
    builds them (``act_placement="finn"``, :data:`~aq_brevitas.quantization.placement.PLACEMENTS`).
    ``fold_bn=True`` folds conv-following BatchNorms into the conv first (what FINN-style integer
    deployment wants); by default BatchNorm stays a float module after the quantized conv.
    Layers the policy does not cover (no entry and no default) stay float, with a ``UserWarning``
    naming them; so do layers the policy keeps float (a ``None`` spec, silently) and layers the
    model's forward never calls (on the first calibration sample, or as ``torch.fx`` traces it), with
    a ``UserWarning`` naming them: a swapped layer that never runs would be reported as quantized.
    Policy keys may name layers, parent modules or ``re:`` patterns (:class:`LayerwisePolicy`). Returns the quantized model (a copy unless ``inplace``), with no attribute added:
    :func:`~aq_brevitas.quantization.readback.read_policy` reads its policy back from its quantizers,
    :func:`~aq_brevitas.quantization.readback.layer_changes` what changed; raises :class:`PolicyError`
    for a policy that does not fit the model.

    >>> import torch
    >>> from torch import nn
    >>> from aq_brevitas import LayerSpec, LayerwisePolicy, quantize
    >>> from aq_brevitas.quantization.readback import layer_changes
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    >>> q = quantize(model, LayerwisePolicy(default=LayerSpec(4)), calibration_data=torch.rand(8, 1, 8, 8))
    >>> [c.new for c in layer_changes(model, q)]
    ['QuantConv2d 4b max pc', 'QuantLinear 4b max pc']
    >>> q(torch.rand(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """
    model = unwrap_parallel(model)  # a DataParallel's network: plain layer names, a plain model back
    inner = policy.policy if isinstance(getattr(policy, "policy", None), LayerwisePolicy) else policy
    if isinstance(inner, LayerwisePolicy):
        check_target(inner, list(quantizable_layers(model)), target, act_placement)
    refuse_finn_activations(model, target)
    if target == "finn" and act_placement == "producer":
        act_placement = "finn"  # FINN's own layout of pools, joins and forks
    return convert_model(
        model,
        policy,
        inplace=inplace,
        swap_float=True,
        calibration_data=calibration_data,
        fold_bn=fold_bn,
        bias_correction=bias_correction,
        act_placement=act_placement,
    )


def apply_policy(
    model: nn.Module,
    policy: LayerwisePolicy,
    *,
    inplace: bool = False,
    calibration_data: Any = None,
    act_placement: str = "producer",
) -> nn.Module:
    """Re-configure the weight (and input) quantizers of an existing Brevitas model per ``policy``,
    keeping its float weights; a copy unless ``inplace``. Plain float layers raise :class:`PolicyError`
    (use :func:`quantize` for those).

    It merges: layers ``policy`` does not resolve keep their quantizers (a ``None`` spec for a
    quantized layer is refused, :class:`PolicyError`: quantize the float model instead), an input quantizer keeps its
    signedness, and one whose bits do not change keeps its calibrated scale. Where an input
    quantizer is replaced without ``calibration_data``, a ``UserWarning`` names the layers (their new
    scales are uncalibrated).

    >>> from torch import nn
    >>> from aq_brevitas import LayerSpec, LayerwisePolicy, apply_policy, quantize, read_policy
    >>> from aq_brevitas.quantization.readback import layer_changes
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    >>> q = quantize(model, LayerwisePolicy(default=LayerSpec(4)))
    >>> rebit = apply_policy(q, LayerwisePolicy({"3": LayerSpec(2)}))
    >>> [(c.old, c.new) for c in layer_changes(q, rebit)]
    [('QuantLinear 4b max pc', 'QuantLinear 2b max pc')]
    >>> {n: s.short() for n, s in read_policy(rebit).layers.items()}
    {'0': '4b max pc', '3': '2b max pc'}
    """
    # swap_float=False: only Brevitas layers are re-configured; nothing is folded or corrected again
    return convert_model(
        unwrap_parallel(model),
        policy,
        inplace=inplace,
        swap_float=False,
        calibration_data=calibration_data,
        act_placement=act_placement,
    )
