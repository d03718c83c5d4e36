"""One layer-wise policy, three back ends: Brevitas, torch.ao FX (QConfigMapping) and torchao PT2E.

For the PGD-trained zoo CNN ``cnn-pgd`` a hand-written policy (the kind ``aq-brevitas search`` writes)
is applied three ways: Brevitas ``quantize`` (the reference), an FX ``QConfigMapping`` from
``to_qconfig_mapping`` with ``prepare_qat_fx``/``convert_fx``, and a PT2E ``Quantizer`` with
``prepare_pt2e_model``/``convert_pt2e_model``. Each is calibrated on held-out training images; clean
and PGD accuracy are measured on test images. PGD runs on the fake-quant (prepared) models, since
converted models have no input gradient; clean accuracy is also given for the converted ones.
The PT2E part needs torchao (the ``pt2e`` extra, which ``make install`` installs); without it the
script stops with the package's one-line error naming the extra.

Run: python examples/torch_ao_policy.py [--fast]
"""

import argparse
import copy
import time
import warnings

import torch
from torch.ao.quantization.quantize_fx import convert_fx

import aq_brevitas as aq
from aq_brevitas.ao import FX_DEPRECATION_MESSAGE, convert_pt2e_model, prepare_fx_model, prepare_pt2e_model

parser = argparse.ArgumentParser()
parser.add_argument("--fast", action="store_true", help="tiny subsets, for tests")
args = parser.parse_args()
torch.set_num_threads(1)
torch.set_flush_denormal(True)
# torch 2.13 emits this DeprecationWarning on every FX quantization call; Brevitas one UserWarning at import.
warnings.filterwarnings("ignore", category=DeprecationWarning, message=FX_DEPRECATION_MESSAGE)
warnings.filterwarnings("ignore", category=UserWarning, message="fast_hadamard_transform package not found")
n_test, pgd_steps = (300, 10) if args.fast else (1000, 20)
t_start = time.perf_counter()

model, _ = aq.load_float_model("cnn-pgd")
calib_x, _ = aq.load_split("val", limit=256)
x, y = aq.load_split("test", limit=n_test)
policy = aq.LayerwisePolicy(
    {
        "conv1": aq.LayerSpec(8),
        "conv2": aq.LayerSpec(4, granularity="per_tensor"),
        "fc1": aq.LayerSpec(3),
        "fc2": aq.LayerSpec(8),
    }
)
print(policy)


def report(label: str, fake_quant: torch.nn.Module, converted: torch.nn.Module | None = None) -> None:
    clean = aq.accuracy(fake_quant, x, y)
    pgd = aq.attack_accuracy(fake_quant, x, y, aq.AttackConfig("pgd", eps=0.1, steps=pgd_steps))
    line = f"{label:<10} clean {clean:.3f}  PGD-{pgd_steps} eps=0.1 {pgd:.3f}"
    if converted is not None:
        line += f"  | converted: clean {aq.accuracy(converted, x, y):.3f}"
    print(line)


print(f"accuracy on {n_test} test images:")
report("float", model)

# Brevitas (8-bit activations, as torch.ao static quantization always uses them) as the reference.
brevitas_policy = aq.LayerwisePolicy(
    {n: aq.LayerSpec(**{**s.to_dict(), "act_bit_width": 8}) for n, s in policy.layers.items()}
)
report("Brevitas", aq.quantize(model, brevitas_policy, calibration_data=calib_x))

# FX graph mode: the policy as a QConfigMapping (fake-quant for QAT; conv-relu pairs are fused), with
# each layer's activation bits moved onto its input (torch.ao's QConfig would put them on its output).
prepared = prepare_fx_model(copy.deepcopy(model), policy, calib_x[:1], qat=True)
with torch.no_grad():
    prepared(calib_x)  # observers see the calibration images
# Freeze the ranges: otherwise the observers keep updating on the test and attack images.
prepared.apply(torch.ao.quantization.disable_observer).eval()
int_fx = convert_fx(copy.deepcopy(prepared))
print("FX fc1 weight integers:", int_fx.fc1.weight().int_repr().unique().tolist())
report("FX", prepared, int_fx)

# PT2E: torch.export + torchao prepare_qat_pt2e with the policy as a Quantizer. torchao is required
# here: without it prepare_pt2e_model raises ConfigError naming the `pt2e` extra.
from torchao.quantization.pt2e import disable_observer  # noqa: E402

# qat=True gives fake-quant modules; PTQ's prepare_pt2e only inserts observers, and that model
# computes in float until convert (attacking it would attack the float model).
pt2e = prepare_pt2e_model(copy.deepcopy(model), policy, calib_x[:2], qat=True)
with torch.no_grad():
    pt2e(calib_x)  # calibration
pt2e.apply(disable_observer).eval()
report("PT2E", pt2e, convert_pt2e_model(copy.deepcopy(pt2e)))
print(f"total {time.perf_counter() - t_start:.1f} s")
