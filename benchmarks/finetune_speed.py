"""Fine-tuning step costs, as ratios measured in one run (1 thread, same batch, interleaved).

* PGD-k fine-tuning step vs the ideal (k+1) × one plain Brevitas training step (target ≤ 1.10);
* Brevitas QAT step vs float step of the same architecture (target ≤ 2.0), as fine-tuning runs it
  (activation scales kept at their calibrated values) and with learned activation scales;
* the weight-freezing speed-up of an attack on a quantized model;
* the cost of the no-grad clean forward that gives the progress bar its clean accuracy;
* fine-tuning throughput with 2 torchrun processes vs 1.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).parent))
from aq_brevitas.attacks import make_attack  # noqa: E402
from aq_brevitas.config import AttackConfig  # noqa: E402
from aq_brevitas.data import load_split  # noqa: E402
from aq_brevitas.forward import frozen_activation_scales, frozen_quant_weights
from aq_brevitas.models import load_float_model  # noqa: E402
from aq_brevitas.policy import LayerSpec, LayerwisePolicy  # noqa: E402
from aq_brevitas.quantization.convert import quantize
from common import header, interleaved_times  # noqa: E402

K = 7
ROUNDS = int(os.environ.get("AQ_BENCH_ROUNDS", "15"))
torch.set_num_threads(1)
torch.set_flush_denormal(True)


def _train_step(model, opt, x, y, attack=None, freeze=True, clean_forward=False):
    if attack is not None:
        if freeze:
            with frozen_quant_weights(model):
                x_adv = attack(x, y)
                if clean_forward:  # what adversarial_train adds for the clean-accuracy readout
                    model.eval()
                    with torch.no_grad():
                        model(x)
            x = x_adv
        else:
            x = attack(x, y)
    model.train()
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


W4A8 = LayerSpec(4, "max", "per_channel", act_bit_width=8)


def step_ratios(zoo: str = "cnn-pgd", spec: LayerSpec = W4A8) -> dict:
    float_model, _ = load_float_model(zoo)
    x, y = load_split("train", limit=128, seed=0)
    q = quantize(float_model, LayerwisePolicy(default=spec), calibration_data=x)
    q_learn = quantize(float_model, LayerwisePolicy(default=spec), calibration_data=x)
    f = load_float_model(zoo)[0]
    atk = make_attack(AttackConfig("pgd", eps=0.1, steps=K), q)
    with frozen_activation_scales(q):  # as adversarial_finetune runs by default
        opt_q = torch.optim.SGD([p for p in q.parameters() if p.requires_grad], lr=1e-6)
        opt_l = torch.optim.SGD(q_learn.parameters(), lr=1e-6)
        opt_f = torch.optim.SGD(f.parameters(), lr=1e-6)
        fns = {
            "float_step": lambda: _train_step(f, opt_f, x, y),
            "qat_step": lambda: _train_step(q, opt_q, x, y),
            "qat_step_learned_act_scales": lambda: _train_step(q_learn, opt_l, x, y),
            "pgd_step_frozen": lambda: _train_step(q, opt_q, x, y, atk, freeze=True),
            "pgd_step_frozen_clean_acc": lambda: _train_step(
                q, opt_q, x, y, atk, freeze=True, clean_forward=True
            ),
            "pgd_step_unfrozen": lambda: _train_step(q, opt_q, x, y, atk, freeze=False),
        }
        # Each round runs every variant back to back (after a warm-up call); a ratio is taken within
        # a round, so a burst of load from other work on the shared cores hits both of its terms.
        rounds = [interleaved_times(fns, repeats=1) for _ in range(ROUNDS)]
    ratios = {
        "pgd_vs_ideal": ("pgd_step_frozen", "qat_step", K + 1),
        "pgd_vs_ideal_with_clean_acc": ("pgd_step_frozen_clean_acc", "qat_step", K + 1),
        "pgd_vs_ideal_unfrozen": ("pgd_step_unfrozen", "qat_step", K + 1),
        "qat_vs_float": ("qat_step", "float_step", 1),
        "qat_vs_float_learned_act_scales": ("qat_step_learned_act_scales", "float_step", 1),
        "freeze_speedup": ("pgd_step_unfrozen", "pgd_step_frozen", 1),
        "clean_acc_cost": ("pgd_step_frozen_clean_acc", "pgd_step_frozen", 1),
    }
    return {
        "model": zoo,
        "spec": spec.short(),
        "batch": 128,
        "k": K,
        "rounds": ROUNDS,
        "seconds": {k: statistics.median(r[k] for r in rounds) for k in fns},
        **{name: statistics.median(r[a] / (n * r[b]) for r in rounds) for name, (a, b, n) in ratios.items()},
        "ratio_quartiles": {
            name: statistics.quantiles([r[a] / (n * r[b]) for r in rounds], n=4)[::2]
            for name, (a, b, n) in ratios.items()
        },
    }


def ddp_scaling(images: int = 2048) -> dict:
    """Wall time of one fine-tuning epoch with 1 and with 2 torchrun processes (same global batch)."""
    torchrun = str(Path(sys.executable).parent / "torchrun")
    with tempfile.TemporaryDirectory() as tmp:
        pol = Path(tmp) / "p.json"
        pol.write_text(LayerwisePolicy(default=LayerSpec(4)).to_json())
        cli = [sys.executable, "-m", "aq_brevitas.cli"]
        env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
        subprocess.run(
            [
                *cli,
                "quantize",
                "--model",
                "cnn-pgd",
                "--policy",
                str(pol),
                "--out",
                f"{tmp}/q.pt",
                "--calib-images",
                "0",
            ],
            check=True,
            env=env,
            capture_output=True,
        )
        out = {}
        for n in (1, 2):
            args = [
                "finetune",
                "--model",
                f"{tmp}/q.pt",
                "--out",
                f"{tmp}/ft{n}.pt",
                "--train-images",
                str(images),
                "--train-steps",
                "3",
                "--batch-size",
                "128",
            ]
            t0 = time.perf_counter()
            subprocess.run(
                [torchrun, f"--nproc_per_node={n}", "--master_port=29533", "-m", "aq_brevitas.cli", *args],
                check=True,
                env=env,
                capture_output=True,
            )
            wall = time.perf_counter() - t0
            meta = json.loads(Path(f"{tmp}/ft{n}.json").read_text())
            out[n] = {"wall_s": wall, "epoch_s": meta["finetune"]["history"]["epochs"][0]["seconds"]}
        out["throughput_ratio_2_vs_1"] = out[1]["epoch_s"] / out[2]["epoch_s"]
        return out


def main() -> dict:
    res = {"header": header(), "steps": step_ratios(), "ddp": ddp_scaling()}
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
