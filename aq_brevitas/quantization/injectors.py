"""From a :class:`LayerSpec` to Brevitas quantizer injectors, composed from Brevitas's own classes.

Each scaling rule picks a Brevitas base quantizer (the ``Int8Weight*`` family: float scales from
abs-max or MSE, power-of-two scales from the ``*FixedPoint`` family, percentile via the stats op);
:class:`AnyBitWidth` then makes the bit width a stateful constant -- so it is saved in, and restored
from, ``state_dict()`` -- and switches to a binary quantizer at 1 bit, which exports as QONNX
``BipolarQuant``. Injectors are cached: one class per distinct spec. Each weight injector carries the
``(bits, scaling, granularity)`` it was made from as its ``aq_spec`` (state on the Brevitas quantizer,
not on the user's model), which :mod:`~aq_brevitas.quantization.readback` reads back.

Transposed convolutions keep their output channels on weight axis 1 (``(in, out/groups, *k)``);
Brevitas's ``QuantConvTranspose*`` knows that, but sizes a per-channel scale as ``out`` entries on
that axis, which holds ``out/groups``: with ``groups > 1`` its first forward fails. Output channel
``g·(out/groups) + j`` is block ``g`` of axis 0 times column ``j`` of axis 1, so no scale along one
axis can hold it. :class:`GroupedTransposedPerChannel` gives such layers a broadcastable
``(in, out/groups, 1, ...)`` scale whose entries are each output channel's own statistic, repeated
over the ``in/groups`` rows of its group: per-output-channel quantization, exactly.
"""

from __future__ import annotations

from functools import cache

import torch
from brevitas.core.bit_width import BitWidthImplType
from brevitas.core.quant import QuantType
from brevitas.core.stats import StatsOp
from brevitas.inject import ExtendedInjector, value
from brevitas.quant import fixed_point, scaled_int
from torch import nn

from ..policy import LayerSpec

PERCENTILE_Q = 99.0  # high percentile of |w| used as the clipping threshold by the 'percentile' rule

_WEIGHT_BASES = {
    ("max", "per_tensor"): scaled_int.Int8WeightPerTensorFloat,
    ("max", "per_channel"): scaled_int.Int8WeightPerChannelFloat,
    ("percentile", "per_tensor"): scaled_int.Int8WeightPerTensorFloat,
    ("percentile", "per_channel"): scaled_int.Int8WeightPerChannelFloat,
    ("mse", "per_tensor"): scaled_int.Int8WeightPerTensorFloatMSE,
    ("mse", "per_channel"): scaled_int.Int8WeightPerChannelFloatMSE,
    ("po2", "per_tensor"): fixed_point.Int8WeightPerTensorFixedPoint,
    ("po2", "per_channel"): fixed_point.Int8WeightPerChannelFixedPoint,
}


class AnyBitWidth(ExtendedInjector):
    """Mixin: bit width as a stateful constant (survives state_dict), binary quantization at 1 bit."""

    bit_width_impl_type = BitWidthImplType.STATEFUL_CONST

    @value
    def quant_type(bit_width):  # noqa: N805 -- an injector value, resolved by name
        return QuantType.BINARY if bit_width == 1 else QuantType.INT


class PercentileScaling(ExtendedInjector):
    """Mixin: clip at a high percentile of |w| instead of its maximum."""

    scaling_stats_op = StatsOp.PERCENTILE
    high_percentile_q = PERCENTILE_Q


def is_grouped_transposed(layer: nn.Module) -> bool:
    """Whether ``layer`` is a transposed convolution with ``groups > 1`` (Brevitas ones included)."""
    return isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d)) and layer.groups > 1


class GroupedOutputChannelRows(nn.Module):
    """The stats view of a grouped transposed-conv weight ``(in, out/g, *k)``: ``in·out/g`` rows,
    row ``(i, j)`` holding every weight of output channel ``(i // (in/g))·(out/g) + j``.

    A per-row statistic (abs-max, percentile, MSE loss) is then that output channel's, repeated
    over the ``in/g`` rows of its group, and it reshapes to the weight's ``(in, out/g, 1, ...)``.
    """

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        g, cin, cout_g = self.groups, w.shape[0], w.shape[1]
        per_channel = w.reshape(g, cin // g, cout_g, -1).transpose(1, 2).reshape(g, 1, cout_g, -1)
        return per_channel.expand(g, cin // g, cout_g, per_channel.shape[-1]).reshape(cin * cout_g, -1)


class GroupedTransposedPerChannel(ExtendedInjector):
    """Mixin: per-output-channel scales for a transposed conv with ``groups > 1`` (see the module doc)."""

    @value
    def scaling_per_output_channel_shape(module):  # noqa: N805 -- an injector value, resolved by name
        return tuple(module.weight.shape[:2]) + (1,) * (module.weight.dim() - 2)

    @value
    def scaling_stats_input_view_shape_impl(module):  # noqa: N805
        return GroupedOutputChannelRows(module.groups)


class GroupedTransposedPerChannelMSE(GroupedTransposedPerChannel):
    """The same for MSE scaling, whose search reads the weight through its *inner* view."""

    scaling_stats_input_view_shape_impl = nn.Identity()

    @value
    def inner_stats_input_view_shape_impl(module):  # noqa: N805
        return GroupedOutputChannelRows(module.groups)


@cache
def _weight_quant(bits: int, scaling: str, granularity: str, grouped_transposed: bool = False) -> type:
    base = _WEIGHT_BASES[(scaling, granularity)]
    mixins: tuple[type, ...] = (AnyBitWidth, PercentileScaling) if scaling == "percentile" else (AnyBitWidth,)
    name = f"AqWeight{bits}b_{scaling}_{granularity}"
    if grouped_transposed and granularity == "per_channel":
        grouped = GroupedTransposedPerChannelMSE if scaling == "mse" else GroupedTransposedPerChannel
        mixins, name = (grouped, *mixins), f"{name}_grouped_transposed"
    attrs = {
        "bit_width": bits,
        "aq_spec": (bits, scaling, granularity),  # what it was made from: read back by readback.read_policy
        "__doc__": f"{bits}-bit {scaling} {granularity} weights.",
    }
    return type(name, (*mixins, base), attrs)


def weight_quant_for(spec: LayerSpec, layer: nn.Module | None = None) -> type:
    """The Brevitas weight-quantizer injector class for ``spec`` on ``layer``.

    ``layer`` matters only for a per-channel spec on a transposed conv with ``groups > 1``, which gets
    :class:`GroupedTransposedPerChannel` (one scale per output channel; the default Brevitas sizing
    fails there). Without ``layer`` the plain quantizer is returned.
    """
    grouped = layer is not None and is_grouped_transposed(layer)
    return _weight_quant(spec.weight_bit_width, spec.scaling, spec.granularity, grouped)


@cache
def act_quant_for(bit_width: int, *, signed: bool = True, po2: bool = False) -> type:
    """A per-tensor activation quantizer injector (unsigned for non-negative inputs such as images or ReLU outputs)."""
    if po2:
        base = fixed_point.Int8ActPerTensorFixedPoint if signed else fixed_point.Uint8ActPerTensorFixedPoint
    else:
        base = scaled_int.Int8ActPerTensorFloat if signed else scaled_int.Uint8ActPerTensorFloat
    name = f"AqAct{bit_width}b_{'int' if signed else 'uint'}{'_po2' if po2 else ''}"
    return type(
        name, (base,), {"bit_width": bit_width, "bit_width_impl_type": BitWidthImplType.STATEFUL_CONST}
    )
