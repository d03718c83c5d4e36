"""Four ways to pick per-layer bit widths at one budget: uniform, HAWQ-style Hessian, QUANOS ANS, Lipschitz.

All four search the PGD-trained zoo CNN ``cnn-pgd`` at an average of 3 weight bits over one shared
candidate table (built once, passed as ``table=``). Selection uses held-out training images (the
``val`` split) only; each policy is then quantized (PTQ, no fine-tuning) and measured on the test
split: clean and PGD-10 accuracy at eps=0.1. ``result.winner`` says whether the searched policy or the
best uniform policy did best on the held-out images.
For the full comparison (more budgets, seeds, fine-tuning) see benchmarks/compare_methods.py.

Run: python examples/compare_methods.py [--fast]
"""

import argparse
import time
import warnings

import torch

import aq_brevitas as aq
from aq_brevitas.search import COMPARE_ORDER

parser = argparse.ArgumentParser()
parser.add_argument("--fast", action="store_true", help="tiny subsets, for tests")
args = parser.parse_args()
torch.set_num_threads(1)
torch.set_flush_denormal(True)
warnings.filterwarnings("ignore", message="fast_hadamard_transform package not found")  # Brevitas import
n_calib, n_val, n_test = (64, 50, 100) if args.fast else (256, 500, 2000)
if args.fast:
    candidates = [aq.LayerSpec(b, s, "per_channel") for b in (2, 3, 4, 8) for s in ("max", "mse")]
else:
    candidates = None  # the 36 defaults: bits {2,3,4,5,6,8} x {max, percentile, mse} x granularity
t_start = time.perf_counter()

model, _ = aq.load_float_model("cnn-pgd")
val_x, val_y = aq.load_split("val", seed=0)
calib = (val_x[:n_calib], val_y[:n_calib])
held_out = (val_x[n_calib : n_calib + n_val], val_y[n_calib : n_calib + n_val])
x_test, y_test = aq.load_split("test", limit=n_test)
budget = aq.Budget(avg_weight_bits=3)

t0 = time.perf_counter()
table = aq.candidate_table(model, calib[0], candidates)  # shared by all four methods
print(f"candidate table: {sum(map(len, table.rows.values()))} rows in {time.perf_counter() - t0:.1f} s")

measured: dict[str, tuple[float, float]] = {}  # identical policies are evaluated once
rows = []
for method in COMPARE_ORDER:  # the method registry: baselines first, lipschitz last
    t0 = time.perf_counter()
    config = aq.SearchConfig(method=method, val_images=n_val)
    result = aq.search_policy(
        model, calib, budget, config=config, val_data=held_out, table=table, progress=False
    )
    search_s = time.perf_counter() - t0
    policy = result.policy
    short = ", ".join(f"{n}={s.short()}" for n, s in policy.layers.items())
    if short not in measured:
        q = aq.quantize(model, policy, calibration_data=calib[0])
        measured[short] = (
            aq.accuracy(q, x_test, y_test),
            aq.attack_accuracy(q, x_test, y_test, aq.AttackConfig("pgd", eps=0.1, steps=10)),
        )
    clean, pgd = measured[short]
    winner = result.winner  # "uniform" for the uniform baseline itself
    rows.append((method, result.cost.avg_weight_bits, winner, clean, pgd, search_s))
    print(f"{method:9s} {short}")

print(f"\nbudget: avg 3 weight bits; PTQ accuracy on {n_test} test images")
print(f"{'method':9s} {'avg bits':>8s} {'winner':>16s} {'clean':>6s} {'PGD-10':>6s} {'search s':>8s}")
for method, bits, winner, clean, pgd, search_s in rows:
    print(f"{method:9s} {bits:8.3f} {winner:>16s} {clean:6.3f} {pgd:6.3f} {search_s:8.1f}")
print(f"total {time.perf_counter() - t_start:.1f} s")
