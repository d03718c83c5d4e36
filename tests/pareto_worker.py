"""A tiny Pareto sweep, run by tests/test_measure_cache.py in one process, under ``torchrun
--nproc_per_node=2`` and as a subprocess killed with ``kill -9`` part-way.

``python tests/pareto_worker.py OUT_JSON [CACHE_DIR] [--pause S]``: joins the process group torchrun
describes (nothing outside torchrun), sweeps, and rank 0 writes the front's points as JSON
(:func:`front_json`). ``--pause S`` sleeps S seconds after each measured policy, so a test can kill
the sweep between two measurements.
"""

import json
import sys
import time

import torch

from aq_brevitas.data import load_split
from aq_brevitas.models import load_float_model
from aq_brevitas.policy import LayerSpec
from aq_brevitas.search import SearchConfig, search_pareto, with_act_bits
from aq_brevitas.search import pareto as pareto_module

FEW = [LayerSpec(b, "max", "per_channel") for b in (2, 4, 8)]
CONFIG = SearchConfig(candidates=with_act_bits(FEW, (2, 4, 8)), val_images=16, pgd_steps=2)


def sweep(cache_dir=None, workers=1):
    """The uniform method's policies at the BOPs of uniform w2a2 and w8a8 on cnn-pgd: 16
    held-out images, 64 calibration images."""
    torch.set_num_threads(1)
    model = load_float_model("cnn-pgd")[0]
    x, y = load_split("val", limit=80, seed=0)
    return search_pareto(
        model, (x[:64], y[:64]), (x[64:], y[64:]), budgets=(2, 8), methods=["uniform", "first_last_8"],
        config=CONFIG, cache_dir=cache_dir, workers=workers, progress=False,
    )  # fmt: skip


def front_json(front) -> str:
    """The front as :meth:`ParetoFront.save` writes it, less its wall-clock ``seconds``."""
    return json.dumps({k: v for k, v in front.to_dict().items() if k != "seconds"}, indent=1)


def _pause_after_each(seconds: float) -> None:
    measure = pareto_module.measure_policy

    def slow(*args, **kwargs):
        out = measure(*args, **kwargs)
        time.sleep(seconds)
        return out

    pareto_module.measure_policy = slow


if __name__ == "__main__":
    from aq_brevitas.train.finetune import init_distributed

    args = sys.argv[1:]
    if "--pause" in args:
        i = args.index("--pause")
        _pause_after_each(float(args[i + 1]))
        del args[i : i + 2]
    rank, world = init_distributed()
    front = sweep(args[1] if len(args) > 1 else None)
    if rank == 0:
        with open(args[0], "w", encoding="utf-8") as fh:
            fh.write(front_json(front))
    if world > 1:
        torch.distributed.destroy_process_group()
