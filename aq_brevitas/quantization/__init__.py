"""The quantize stage: a float model and a :class:`~aq_brevitas.policy.LayerwisePolicy` in, a Brevitas model out.

(The folder is not called ``quantize`` because :func:`aq_brevitas.quantize` is a public function.)

===============  ================================================================================
module           holds
===============  ================================================================================
``injectors``    the Brevitas quantizer types a :class:`LayerSpec` asks for
``placement``    where activation quantizers go (:func:`place_act_quant`)
``calibrate``    :func:`calibrate`: activation scales from data, input signedness
``convert``      :func:`quantize`, :func:`apply_policy`: layers swapped for Brevitas twins
``checkpoint``   :func:`save_quantized`, :func:`load_quantized`
===============  ================================================================================

:func:`~aq_brevitas.quantization.calibrate.calibrate` is not re-exported here (its module has the same
name): import it from :mod:`aq_brevitas.quantization.calibrate`.
"""

from __future__ import annotations

from .checkpoint import load_quantized, save_quantized
from .convert import LayerChange, apply_policy, brevitas_layer, changes_table, quantize, shared_weight_layers
from .placement import PLACEMENTS, ActQuantSite, input_quantizer, place_act_quant

__all__ = [
    "ActQuantSite",
    "LayerChange",
    "PLACEMENTS",
    "apply_policy",
    "brevitas_layer",
    "changes_table",
    "input_quantizer",
    "load_quantized",
    "place_act_quant",
    "quantize",
    "save_quantized",
    "shared_weight_layers",
]
