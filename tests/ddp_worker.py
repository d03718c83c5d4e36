"""Run by tests/test_finetune.py under `torchrun --nproc_per_node=2`: fine-tune, dump this rank's weights."""

import json
import sys
from pathlib import Path

import torch

from aq_brevitas.convert import quantize
from aq_brevitas.data import load_split
from aq_brevitas.finetune import adversarial_finetune, init_distributed
from aq_brevitas.models import build_model
from aq_brevitas.policy import LayerSpec, LayerwisePolicy

torch.set_num_threads(1)
out = Path(sys.argv[1])
rank, world = init_distributed()
torch.manual_seed(0)
model = quantize(build_model("small_cnn"), LayerwisePolicy(default=LayerSpec(4)))
data = load_split("val", limit=256, seed=0)
hist = adversarial_finetune(
    model, data, eps=0.1, steps=2, epochs=3, lr=2e-3, batch_size=64, progress=False, seed=0
)
torch.save(model.state_dict(), out / f"rank{rank}.pt")
(out / f"rank{rank}.json").write_text(json.dumps({"world": world, "loss": [e.loss for e in hist.epochs]}))
torch.distributed.destroy_process_group()
