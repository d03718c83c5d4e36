"""Your own plain PyTorch model: PGD-train it, quantize it with a hand-written policy, export QONNX.

The model is an ordinary ``nn.Module`` defined here (no zoo class, no Brevitas). It is trained briefly
with PGD (Madry, eps=0.1) by ``adversarial_train``, then ``quantize`` swaps its conv/linear layers for
Brevitas ones per a policy written by hand as JSON (the format ``aq-brevitas search --out`` writes),
and the result is exported to QONNX with a parity check and costed with qonnx's inference_cost.

Run: python examples/plain_torch_model.py [--fast]
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
from aq_brevitas import LayerwisePolicy


class TinyCNN(nn.Module):
    """conv8-relu-pool, conv16-relu-pool, fc64, fc10."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.ModuleDict(
            {"conv1": nn.Conv2d(1, 8, 3, padding=1), "conv2": nn.Conv2d(8, 16, 3, padding=1)}
        )
        self.hidden = nn.Linear(16 * 7 * 7, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.features["conv1"](x)), 2)
        x = F.max_pool2d(F.relu(self.features["conv2"](x)), 2)
        return self.head(F.relu(self.hidden(torch.flatten(x, 1))))


# Layer names are those of model.named_modules(). The first layer quantizes its input to 8 bits and
# uses power-of-two scales (what FINN's integer dataflow wants); the wide hidden layer gets 3 bits.
POLICY_JSON = """
{
  "schema": "aq-brevitas/policy/v1",
  "default": {"weight_bit_width": 8, "scaling": "max", "granularity": "per_tensor"},
  "layers": {
    "features.conv1": {"weight_bit_width": 8, "scaling": "po2", "granularity": "per_channel", "act_bit_width": 8},
    "features.conv2": {"weight_bit_width": 4, "scaling": "mse", "granularity": "per_channel"},
    "hidden":         {"weight_bit_width": 3, "scaling": "mse", "granularity": "per_channel"}
  },
  "meta": {"note": "written by hand"}
}
"""

parser = argparse.ArgumentParser()
parser.add_argument("--fast", action="store_true", help="tiny subsets, for tests")
args = parser.parse_args()
warnings.filterwarnings("ignore", message="fast_hadamard_transform package not found")  # Brevitas import
torch.set_num_threads(1)
torch.set_flush_denormal(True)
torch.manual_seed(0)
n_train, n_test = (8192, 200) if args.fast else (20000, 2000)
t_start = time.perf_counter()

model = TinyCNN()
training = aq.TrainConfig(
    eps=0.1, steps=3, epochs=1 if args.fast else 3, optimizer="adam", lr=3e-3, batch_size=64
)
history = aq.adversarial_train(model, aq.load_split("train", limit=n_train, seed=0), training, progress=False)
print(f"PGD-trained float model: train adv acc {history.epochs[-1].adv_acc:.3f}")

policy = LayerwisePolicy.from_json(POLICY_JSON)
print(policy)
qmodel = aq.quantize(model, policy, calibration_data=aq.load_split("val", limit=256)[0])
x_test, y_test = aq.load_split("test", limit=n_test)
cost = policy.cost(model, x_test[:1])  # MACs, hence BOPs, depend on the input size
print(f"policy cost: {cost.avg_weight_bits:.2f} average weight bits, {cost.weight_bits} weight bits")

for label, m in (("float", model), ("quantized", qmodel)):
    clean = aq.accuracy(m, x_test, y_test)
    pgd = aq.attack_accuracy(m, x_test, y_test, aq.AttackConfig("pgd", eps=0.1, steps=10))
    print(f"{label:9s} test ({n_test} images): clean {clean:.3f}  PGD-10 eps=0.1 {pgd:.3f}")

with tempfile.TemporaryDirectory() as d:
    path = Path(d) / "tiny_cnn.onnx"
    res = aq.export_qonnx(qmodel, path, x_test[:1], images=x_test[1:9])
    print(f"QONNX parity: max |ONNX - PyTorch| = {res.max_abs_diff:.2g}; weight bits {res.layer_bits}")
    # Weight bits match the policy's cost exactly. qonnx's BOPs count the float (unquantized)
    # activations as 32 bits, the policy's BOP estimate counts them as 8, so those two differ.
    total = aq.inference_cost(path).total
    print("inference cost:", {k: int(v) for k, v in total.to_dict().items() if k != "layer"})
    print("weight bits: QONNX", int(total.mem_w_bits), "policy", cost.weight_bits)
    # static checks only (fast); `aq-brevitas export --format finn` also runs FINN's own steps
    report = aq.finn_check(path, policy, model=qmodel, run_finn=False)
    print("FINN checks:", {c.name: c.passed for c in report})
print(f"total {time.perf_counter() - t_start:.1f} s")
