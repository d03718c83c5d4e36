"""Search a robustness-aware policy for the zoo CNN, quantize it with Brevitas, fine-tune, evaluate.

Run: python examples/search_quantize_finetune.py [--fast]
"""

import argparse

import torch

import aq_brevitas as aq

parser = argparse.ArgumentParser()
parser.add_argument("--fast", action="store_true", help="tiny subsets, for tests")
args = parser.parse_args()
torch.set_num_threads(1)
torch.set_flush_denormal(True)
n_calib, n_val, n_train, n_test = (64, 50, 256, 100) if args.fast else (256, 500, 4096, 2000)

model, meta = aq.load_float_model("cnn-pgd")
val_x, val_y = aq.load_split("val", seed=0)
calib, held_out = (
    (val_x[:n_calib], val_y[:n_calib]),
    (val_x[n_calib : n_calib + n_val], val_y[n_calib : n_calib + n_val]),
)
candidates = [aq.LayerSpec(b, s, "per_channel") for b in (2, 3, 4, 8) for s in ("max", "mse")]

result = aq.search_policy(
    model,
    calib,
    aq.Budget(avg_weight_bits=3.5),
    config=aq.SearchConfig(candidates=candidates),
    val_data=held_out,
    progress=False,
)
policy = result.policy
print(policy)
print("kept:", result.winner, "cost:", result.cost.summary())

qmodel = aq.quantize(model, policy, calibration_data=calib[0])
tuning = aq.TrainConfig.finetuning(eps=0.1, steps=3, epochs=1)
aq.adversarial_finetune(qmodel, aq.load_split("train", limit=n_train, seed=0), tuning, progress=False)
suite = aq.EvalConfig(
    eps=[0.1],
    pgd_steps=10,
    gradient_free_images=50,
    square_queries=100,
    large_eps_images=50,
    suite_steps=25 if args.fast else 100,  # APGD iterations of the attack suite
)
report = aq.evaluate_robustness(qmodel, aq.load_split("test", limit=n_test), suite, progress=False)
print(report.to_markdown())
