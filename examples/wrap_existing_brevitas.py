"""Bring your own Brevitas model: search a robustness-aware policy for it, re-bit it, fine-tune, export.

The model below is written by hand with Brevitas layers (an input quantizer, two QuantConv2d with a
float BatchNorm and QuantReLU after each, a QuantLinear head), the way a Brevitas user already has
one. It is trained briefly (plain QAT), then aq-brevitas picks per-layer weight quantizers for it
(``search_policy`` works on Brevitas models: QuantConv2d/QuantLinear subclass nn.Conv2d/nn.Linear),
swaps only the weight quantizers with ``apply_policy`` (weights are kept), PGD fine-tunes, measures
PGD accuracy on the test split and exports parity-checked QONNX.

Run: python examples/wrap_existing_brevitas.py [--fast]
"""

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import aq_brevitas as aq

warnings.filterwarnings("ignore", message="fast_hadamard_transform package not found")
warnings.filterwarnings("ignore", message="brevitas.fx is deprecated")
import brevitas.nn as qnn  # noqa: E402  (after the filters: Brevitas warns at import time)

from aq_brevitas.quantization.readback import layer_changes  # noqa: E402


class MyBrevitasNet(nn.Module):
    """8-bit input, conv16-BN-ReLU-pool, conv32-BN-ReLU-pool, linear10; all weights 8 bits to start."""

    def __init__(self) -> None:
        super().__init__()
        self.quant_inp = qnn.QuantIdentity(bit_width=8, return_quant_tensor=False)
        self.conv1 = qnn.QuantConv2d(1, 16, 3, padding=1, bias=False, weight_bit_width=8)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = qnn.QuantReLU(bit_width=8)
        self.conv2 = qnn.QuantConv2d(16, 32, 3, padding=1, bias=False, weight_bit_width=8)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu2 = qnn.QuantReLU(bit_width=8)
        self.fc = qnn.QuantLinear(32 * 7 * 7, 10, bias=True, weight_bit_width=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant_inp(x)
        x = F.max_pool2d(self.relu1(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(self.relu2(self.bn2(self.conv2(x))), 2)
        return self.fc(torch.flatten(x, 1))


parser = argparse.ArgumentParser()
parser.add_argument("--fast", action="store_true", help="tiny subsets, for tests")
args = parser.parse_args()
torch.set_num_threads(1)
torch.set_flush_denormal(True)
torch.manual_seed(0)
fast = args.fast
n_train, epochs = (4096, 1) if fast else (16384, 2)
n_calib, n_val, n_ft, n_test = (64, 100, 1024, 200) if fast else (256, 500, 8192, 2000)
t_start = time.perf_counter()

# 1. The user's model, trained briefly with plain QAT (eps=0: no attack), so it is not random.
model = MyBrevitasNet()
qat = aq.TrainConfig.finetuning(eps=0.0, epochs=epochs, lr=3e-3, batch_size=64)
aq.adversarial_finetune(model, aq.load_split("train", limit=n_train, seed=1), qat, progress=False)
x_test, y_test = aq.load_split("test", limit=n_test)
print(f"trained 8-bit model: clean {aq.accuracy(model, x_test, y_test):.3f} on {n_test} test images")

# 2. Search a policy on held-out training images (val split): calibration + selection.
val_x, val_y = aq.load_split("val", seed=0)
calib = (val_x[:n_calib], val_y[:n_calib])
held_out = (val_x[n_calib : n_calib + n_val], val_y[n_calib : n_calib + n_val])
candidates = [aq.LayerSpec(b, s, "per_channel") for b in (2, 3, 4, 8) for s in ("max", "mse")]
config = aq.SearchConfig(candidates=candidates, val_images=n_val)
result = aq.search_policy(
    model, calib, aq.Budget(avg_weight_bits=3.5), config=config, val_data=held_out, progress=False
)
policy = result.policy
print(policy)
print("kept:", result.winner, "cost:", result.cost.summary())

# 3. Re-bit the existing Brevitas layers (only their weight quantizers change; weights are kept).
qmodel = aq.apply_policy(model, policy)
for change in layer_changes(model, qmodel):  # read from the two models' quantizers
    print(f"  {change.name:6s} {change.old} -> {change.new}")


def report(label: str) -> None:
    clean = aq.accuracy(qmodel, x_test, y_test)
    pgd = aq.attack_accuracy(qmodel, x_test, y_test, aq.AttackConfig("pgd", eps=0.1, steps=10))
    print(f"{label:<22} test ({n_test} images): clean {clean:.3f}  PGD-10 eps=0.1 {pgd:.3f}")


report("re-bitted (PTQ)")

# 4. PGD fine-tuning (quantization-aware), then PGD-10 accuracy on the test split.
tuning = aq.TrainConfig.finetuning(eps=0.1, steps=3, epochs=1, batch_size=64)
history = aq.adversarial_finetune(qmodel, aq.load_split("train", limit=n_ft, seed=0), tuning, progress=False)
print(f"fine-tuned: train adv acc {history.epochs[-1].adv_acc:.3f}")
report("PGD fine-tuned")

# 5. QONNX export, checked against PyTorch on real test images.
with tempfile.TemporaryDirectory() as d:
    res = aq.export_qonnx(qmodel, Path(d) / "my_net.onnx", x_test[:1], images=x_test[1:9])
    print(f"QONNX parity: max |ONNX - PyTorch| = {res.max_abs_diff:.2g} on {res.images_checked} images")
    print("weight bits in the graph:", res.layer_bits)
print(f"total {time.perf_counter() - t_start:.1f} s")
