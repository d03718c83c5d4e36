"""The same policy in torch.ao: an FX ``QConfigMapping`` (built into torch) and a PT2E ``Quantizer`` (torchao).

How each :class:`LayerSpec` field is honoured (see docs/torch_ao.md):

* ``weight_bit_width`` 2..8: narrow signed range ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` on (q)int8, kept
  by ``convert_fx`` and ``convert_pt2e``. 1 bit cannot be expressed (no binary dtype) and is refused.
* ``granularity``: per-channel or per-tensor symmetric observers. Per-channel scales sit on the
  weight axis of the output channels: 0, or 1 for a transposed conv (``(in, out/groups, *k)``).
  Where torch.ao cannot hold them the layer gets per-tensor weights, with a warning naming it: FX
  has no per-channel transposed conv (its ``QConfig`` check and fbgemm/qnnpack refuse one), and
  with ``groups > 1`` a transposed conv's output channels span two weight axes, which one
  per-channel axis cannot hold (PT2E too).
* ``scaling``: ``max`` → MinMax observers (exact). PT2E, per-tensor ``mse``/``percentile`` →
  ``HistogramObserver`` (torch.ao's clipping search minimising quantization error: the nearest
  torch.ao has to both; ``convert_pt2e`` clamps to the narrow range). FX gets MinMax there, because
  ``convert_fx`` clamps weights only to the qint8 range (a clipping observer gives -8 at 4 bits).
  Per-channel ``mse``/``percentile`` and ``po2`` have no torch.ao observer: MinMax. Every
  approximation warns with the layer names (never silent).
* ``act_bit_width`` 2..8: the layer's INPUT activation, affine quint8 range ``[0, 2^b - 1]``. PT2E
  annotates the input edge. FX attaches ``QConfig.activation`` to a layer's output, so
  :func:`prepare_fx_model` re-targets the observers after ``prepare_fx`` (each one gets the bits of
  the layer that reads it). torch.ao's static quantization needs quantized activations, so other
  quantized tensors (layers without ``act_bit_width``, the model output) get 8 bits; more than 8
  bits is refused.

torchao is an optional extra (``pip install aq-brevitas[pt2e]``); only :class:`PolicyQuantizer`,
:func:`prepare_pt2e_model` and :func:`convert_pt2e_model` need it.

=========  ========================================================================================
module     holds
=========  ========================================================================================
``fx``     :func:`to_qconfig_mapping`, :func:`prepare_fx_model`: the FX ``QConfigMapping`` route
``pt2e``   :class:`PolicyQuantizer`, :func:`prepare_pt2e_model`, :func:`convert_pt2e_model` (torchao)
=========  ========================================================================================
"""

from __future__ import annotations

from .fx import (
    DEFAULT_ACT_BITS,
    FX_DEPRECATION_MESSAGE,
    act_range,
    check_transposed_bn,
    place_input_activations,
    prepare_fx_model,
    to_qconfig_mapping,
    transposed_kernel_error,
    weight_channel_axis,
    weight_range,
)
from .pt2e import PolicyQuantizer, convert_pt2e_model, prepare_pt2e_model

__all__ = [
    "DEFAULT_ACT_BITS",
    "FX_DEPRECATION_MESSAGE",
    "PolicyQuantizer",
    "act_range",
    "check_transposed_bn",
    "convert_pt2e_model",
    "place_input_activations",
    "prepare_fx_model",
    "prepare_pt2e_model",
    "to_qconfig_mapping",
    "transposed_kernel_error",
    "weight_channel_axis",
    "weight_range",
]
