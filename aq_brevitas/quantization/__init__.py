"""The quantize stage: a float model and a :class:`~aq_brevitas.policy.LayerwisePolicy` in, a Brevitas model out.

(The folder is not called ``quantize`` because :func:`aq_brevitas.quantize` is a public function.)

===============  ================================================================================
module           holds
===============  ================================================================================
``injectors``    the Brevitas quantizer types a :class:`LayerSpec` asks for
``placement``    where activation quantizers go (:func:`place_act_quant`)
``calibrate``    :func:`calibrate`: activation scales from data, input signedness
``convert``      :func:`quantize`, :func:`apply_policy`: layers swapped for Brevitas twins
``readback``     what a quantized model is, read from its quantizers: :func:`read_policy`, ...
``checkpoint``   :func:`save_quantized`, :func:`load_quantized` (sidecar: :class:`QuantizedSidecar`)
===============  ================================================================================

:func:`~aq_brevitas.quantization.calibrate.calibrate` is not re-exported here (its module has the same
name): import it from :mod:`aq_brevitas.quantization.calibrate`.
"""

from __future__ import annotations

from .checkpoint import QuantizedSidecar, load_quantized, save_quantized
from .convert import apply_policy, brevitas_layer, quantize, shared_weight_layers
from .placement import PLACEMENTS, ActQuantSite, input_quantizer, place_act_quant
from .readback import (
    LayerChange,
    act_placement_of,
    changes_table,
    input_signedness,
    layer_changes,
    read_policy,
)

__all__ = [
    "ActQuantSite",
    "LayerChange",
    "PLACEMENTS",
    "QuantizedSidecar",
    "act_placement_of",
    "apply_policy",
    "brevitas_layer",
    "changes_table",
    "input_quantizer",
    "input_signedness",
    "layer_changes",
    "load_quantized",
    "place_act_quant",
    "quantize",
    "read_policy",
    "save_quantized",
    "shared_weight_layers",
]
