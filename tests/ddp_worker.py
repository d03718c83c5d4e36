"""Run by tests/test_finetune.py under `torchrun --nproc_per_node=2`: fine-tune, dump this rank's weights.

:func:`finetune_small` is also what the test runs in one process, so both sides share every setting.
"""

import json
import sys
from pathlib import Path

import torch

from aq_brevitas.data import load_split
from aq_brevitas.models import build_model
from aq_brevitas.policy import LayerSpec, LayerwisePolicy
from aq_brevitas.quantization.convert import quantize
from aq_brevitas.train.finetune import adversarial_finetune, init_distributed

GLOBAL_BATCH = 64


def finetune_small() -> tuple[torch.nn.Module, list[float]]:
    """A 4-bit small CNN PGD-fine-tuned for 3 epochs on 256 val images, global batch 64, seed 0."""
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    model = quantize(build_model("small_cnn"), LayerwisePolicy(default=LayerSpec(4)))
    data = load_split("val", limit=256, seed=0)
    hist = adversarial_finetune(
        model, data, eps=0.1, steps=2, epochs=3, lr=2e-3, batch_size=GLOBAL_BATCH, progress=False, seed=0
    )
    return model, [e.loss for e in hist.epochs]


if __name__ == "__main__":
    out = Path(sys.argv[1])
    rank, world = init_distributed()
    model, losses = finetune_small()
    torch.save(model.state_dict(), out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({"world": world, "loss": losses}))
    torch.distributed.destroy_process_group()
