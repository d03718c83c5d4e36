"""Brevitas vs torch.ao on the same weights and policy: clean accuracy of the converted models.

The zoo CNN ``cnn-pgd``, uniform max-scaled per-channel weights at 8 and 4 bits with 8-bit input
activations, calibrated on 256 held-out training images ('val'), accuracy on a seeded subset of 1,000
Fashion-MNIST test images. Brevitas ``quantize`` vs torch.ao FX (``prepare_fx_model`` + ``convert_fx``)
vs torchao PT2E (``prepare_pt2e_model`` + ``convert_pt2e_model``).

Run: python benchmarks/ao_agreement.py   (writes benchmarks/results/ao_agreement.json)
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from aq_brevitas.ao import FX_DEPRECATION_MESSAGE, convert_pt2e_model, prepare_fx_model, prepare_pt2e_model  # noqa: E402
from aq_brevitas.data import load_split  # noqa: E402
from aq_brevitas.evaluate.accuracy import accuracy
from aq_brevitas.models import load_float_model  # noqa: E402
from aq_brevitas.nnutils import quantizable_layers  # noqa: E402
from aq_brevitas.policy import LayerSpec, LayerwisePolicy  # noqa: E402
from aq_brevitas.quantization.convert import quantize
from common import header  # noqa: E402

CALIB_IMAGES, TEST_IMAGES = 256, 1000


def main() -> dict:
    from torch.ao.quantization.quantize_fx import convert_fx

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    warnings.filterwarnings("ignore", message=FX_DEPRECATION_MESSAGE, category=DeprecationWarning)
    model = load_float_model("cnn-pgd")[0]
    calib = load_split("val", limit=CALIB_IMAGES, seed=0)[0]
    x, y = load_split("test", limit=TEST_IMAGES, seed=0)
    rows = []
    for bits in (8, 4):
        policy = LayerwisePolicy.uniform(
            list(quantizable_layers(model)), LayerSpec(bits, "max", "per_channel", act_bit_width=8)
        )
        fx = prepare_fx_model(copy.deepcopy(model), policy, calib[:1])
        pe = prepare_pt2e_model(copy.deepcopy(model), policy, calib[:2])
        with torch.no_grad():
            fx(calib)
            pe(calib)
        pe.eval()
        acc = {
            "brevitas": accuracy(quantize(model, policy, calibration_data=calib), x, y),
            "fx": accuracy(convert_fx(fx), x, y),
            "pt2e": accuracy(convert_pt2e_model(pe), x, y),
        }
        rows.append({"weight_bits": bits, "act_bits": 8, **acc})
        print(rows[-1], flush=True)
    return {
        "header": header(),
        "model": "cnn-pgd",
        "calibration": f"{CALIB_IMAGES} val images (held-out training data)",
        "test_images": TEST_IMAGES,
        "float": accuracy(model, x, y),
        "rows": rows,
    }


if __name__ == "__main__":
    from aq_brevitas.storage import atomic_write_json

    result = main()
    atomic_write_json(Path(__file__).parent / "results" / "ao_agreement.json", result)
    print(result)
