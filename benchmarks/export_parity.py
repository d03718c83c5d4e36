"""Export parity: QONNX (qonnx execution) and QCDQ (onnxruntime) against PyTorch, on real test images.

Mixed policies cycle 8/5/3/2/1/4-bit weights (per-channel and per-tensor; max, mse, po2, percentile)
with calibrated input quantizers over the layers of each model; "cnn-pgd large logits" is an
ordinary policy whose logits reach ~60. For the QONNX rows, ``torch_f32_vs_f64`` is the PyTorch
model's own float32-vs-float64 difference on the same images: the size of float32 summation noise.
QCDQ rows: the check runs onnxruntime at ORT_ENABLE_BASIC without WeightBiasQuantization;
``ort_basic_diff`` is with every BASIC rewrite on.
"""

from __future__ import annotations

import copy
import itertools
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from aq_brevitas.data import load_split  # noqa: E402
from aq_brevitas.export import export_qcdq, export_qonnx, inference_cost  # noqa: E402
from aq_brevitas.models import build_model, load_float_model  # noqa: E402
from aq_brevitas.nnutils import quantizable_layers  # noqa: E402
from aq_brevitas.policy import LayerSpec, LayerwisePolicy  # noqa: E402
from aq_brevitas.quantization.convert import quantize
from common import header  # noqa: E402

MIX = [
    LayerSpec(8, "max", "per_channel", act_bit_width=8),
    LayerSpec(5, "mse", "per_tensor", act_bit_width=8),
    LayerSpec(3, "po2", "per_channel", act_bit_width=8),
    LayerSpec(2, "percentile", "per_tensor", act_bit_width=6),
    LayerSpec(1, "max", "per_tensor", act_bit_width=4),
    LayerSpec(4, "po2", "per_tensor", act_bit_width=8),
]
LARGE_LOGITS = {
    "conv1": LayerSpec(8, act_bit_width=8),
    "conv2": LayerSpec(4, "po2"),
    "fc1": LayerSpec(1),
    "fc2": LayerSpec(3, "mse", "per_tensor"),
}


def _f64_gap(q: torch.nn.Module, x: torch.Tensor) -> float:
    """max |float32 - float64| of the PyTorch model itself on ``x``."""
    with torch.no_grad():
        return float((q(x).double() - copy.deepcopy(q).double()(x.double())).abs().max())


def main() -> dict:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    calib = load_split("val", limit=64, seed=0)[0]
    test = load_split("test", limit=33, seed=0)[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("cnn-pgd", "cnn-pgd large logits", "vgg-pgd", "vgg-pgd+fold", "small_resnet"):
            if name == "small_resnet":
                torch.manual_seed(0)
                model = build_model("small_resnet").train()
                with torch.no_grad():
                    model(calib)
                model.eval()
            else:
                model = load_float_model(name.split("+")[0].split()[0])[0]
            layers = list(quantizable_layers(model))
            policy = LayerwisePolicy(
                LARGE_LOGITS if "large" in name else dict(zip(layers, itertools.cycle(MIX), strict=False))
            )
            q = quantize(model, policy, calibration_data=calib, fold_bn=name.endswith("fold")).eval()
            res = export_qonnx(q, f"{tmp}/m.onnx", test[:1], images=test[1:])
            rows.append({
                "model": name, "format": "qonnx", "images": res.images_checked, "max_abs_diff": res.max_abs_diff,
                "output_scale": res.output_scale, "allowed_diff": res.allowed_diff,
                "torch_f32_vs_f64": _f64_gap(q, test),
                "layer_bits": res.layer_bits, "act_bits": res.act_bits, "weight_bits_per_layer": res.weight_bits,
                "exported_weight_bits": inference_cost(f"{tmp}/m.onnx", q).total.mem_w_bits,
                "policy_weight_bits": policy.cost(q, test[:1]).weight_bits,
            })  # fmt: skip
        model = load_float_model("cnn-pgd")[0]
        for spec in (LayerSpec(8, act_bit_width=8), LayerSpec(4, act_bit_width=8), LayerSpec(4)):
            q = quantize(model, LayerwisePolicy(default=spec), calibration_data=calib).eval()
            res = export_qcdq(q, f"{tmp}/q.onnx", test[:1], images=test[1:])
            rows.append(
                {
                    "model": f"cnn-pgd {spec.short()}",
                    "format": "qcdq",
                    "images": res.images_checked,
                    "max_abs_diff": res.max_abs_diff,
                    "output_scale": res.output_scale,
                    "allowed_diff": res.allowed_diff,
                    "ort_basic_diff": res.ort_basic_diff,
                    "layer_bits": res.layer_bits,
                    "act_bits": res.act_bits,
                }
            )
    return {"header": header(), "rows": rows}


if __name__ == "__main__":
    import json

    print(json.dumps(main(), indent=2))
