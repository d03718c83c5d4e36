"""From a :class:`LayerSpec` to Brevitas quantizer injectors, composed from Brevitas's own classes.

Each scaling rule picks a Brevitas base quantizer (the ``Int8Weight*`` family: float scales from
abs-max or MSE, power-of-two scales from the ``*FixedPoint`` family, percentile via the stats op);
:class:`AnyBitWidth` then makes the bit width a stateful constant -- so it is saved in, and restored
from, ``state_dict()`` -- and switches to a binary quantizer at 1 bit, which exports as QONNX
``BipolarQuant``. Injectors are cached: one class per distinct spec.
"""

from __future__ import annotations

from functools import cache

from brevitas.core.bit_width import BitWidthImplType
from brevitas.core.quant import QuantType
from brevitas.core.stats import StatsOp
from brevitas.inject import ExtendedInjector, value
from brevitas.quant import fixed_point, scaled_int

from .policy import LayerSpec

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


@cache
def _weight_quant(bits: int, scaling: str, granularity: str) -> type:
    base = _WEIGHT_BASES[(scaling, granularity)]
    mixins: tuple[type, ...] = (AnyBitWidth, PercentileScaling) if scaling == "percentile" else (AnyBitWidth,)
    name = f"AqWeight{bits}b_{scaling}_{granularity}"
    return type(
        name, (*mixins, base), {"bit_width": bits, "__doc__": f"{bits}-bit {scaling} {granularity} weights."}
    )


def weight_quant_for(spec: LayerSpec) -> type:
    """The Brevitas weight-quantizer injector class for ``spec``."""
    return _weight_quant(spec.weight_bit_width, spec.scaling, spec.granularity)


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
