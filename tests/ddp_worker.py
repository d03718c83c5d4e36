"""Run by tests/test_finetune.py, under ``torchrun --nproc_per_node=2`` and as one plain process.

Each rank records the library's first fine-tuning step (:func:`first_step`), then fine-tunes for a
few steps (:func:`finetune_small`), and dumps both; the test runs :func:`first_step` in one process
too, so both sides share every setting.
"""

import sys
from pathlib import Path

import torch
from torch.nn import functional as F

from aq_brevitas.config import TrainConfig
from aq_brevitas.data import load_split
from aq_brevitas.models import build_model
from aq_brevitas.policy import LayerSpec, LayerwisePolicy
from aq_brevitas.quantization.convert import quantize
from aq_brevitas.train.finetune import adversarial_finetune, init_distributed
from aq_brevitas.train.training import GlobalBatchSampler

GLOBAL_BATCH = 64
SETTINGS = TrainConfig.finetuning(eps=0.1, steps=2, lr=2e-3, batch_size=GLOBAL_BATCH, seed=0)


def _model() -> torch.nn.Module:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    return quantize(build_model("small_cnn"), LayerwisePolicy(default=LayerSpec(4)))


def finetune_small(epochs: int = 2, images: int = 2 * GLOBAL_BATCH) -> torch.nn.Module:
    """The 4-bit small CNN PGD-fine-tuned on ``images`` val images, global batch 64: several Adam steps."""
    model = _model()
    data = load_split("val", limit=images, seed=0)
    adversarial_finetune(model, data, SETTINGS.replace(epochs=epochs), progress=False)
    return model


def _layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}


def _layer_terms(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward and backward of the mean cross-entropy on ``(x, y)``: each conv/linear layer's input and
    output gradient, the logits and the input gradient."""
    terms: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, args, output):
            terms[name + ".x"] = args[0].detach().clone()
            output.register_hook(lambda g: terms.__setitem__(name + ".g", g.detach().clone()))

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in _layers(model).items()]
    x = x.clone().requires_grad_(True)
    logits = model(x)
    F.cross_entropy(logits, y).backward()
    for h in handles:
        h.remove()
    model.zero_grad(set_to_none=True)
    return {**terms, "logits": logits.detach(), "input_grad": x.grad}


def batch_invariant(model: torch.nn.Module, inputs: list[torch.Tensor], y: torch.Tensor, parts: int) -> bool:
    """Whether this CPU's kernels give each image the same bits in a batch of ``len(y)`` as in each of
    ``parts`` slices of it: activations, logits and gradients (the slices' scaled by ``parts``, exact
    for a power of two: their mean cross-entropy divides by ``len(y) / parts``). The small CNN has no
    BatchNorm or dropout, so its train-mode forward here is the function the attack's eval-mode one is."""
    for x in inputs:
        whole = _layer_terms(model, x, y)
        sliced = [_layer_terms(model, xs, ys) for xs, ys in zip(x.tensor_split(parts), y.tensor_split(parts))]
        for k, v in whole.items():
            joined = torch.cat([s[k] for s in sliced])
            if not torch.equal(v, joined / parts if k.endswith(".g") or k == "input_grad" else joined):
                return False
    return True


def first_step(rank: int, world: int) -> dict:
    """One step of :func:`adversarial_finetune` on one global batch of 64 images, recorded by hooks.

    Returns, for this process: ``slice`` (its ``(start, end, size)`` in the global batch), ``inputs``
    (every batch the model was called on, in order, with its train flag: the PGD iterates, the clean
    eval forward, the training forward on the adversarial examples), ``layers`` (each conv/linear
    layer's input ``.x`` and output gradient ``.g`` in the training step: the terms its weight gradient
    sums), ``grad`` (each parameter's gradient in that step; under DDP, the all-reduced average),
    ``local_grad`` (the gradient of this process's loss alone, recomputed from the initial weights
    without DDP), the initial weights ``weight``, and in one process ``batch_invariant`` (see
    :func:`batch_invariant`, for the 2 slices torchrun's ranks take).
    """
    model = _model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    data = load_split("val", limit=GLOBAL_BATCH, seed=0)
    sampler = GlobalBatchSampler(GLOBAL_BATCH, GLOBAL_BATCH, rank=rank, world=world, seed=0)
    (idx,) = list(sampler)  # this process's share of the one global batch, as the library's loader draws it
    y = data[1][idx]
    inputs: list[tuple[bool, torch.Tensor]] = []
    layers: dict[str, torch.Tensor] = {}

    def record_input(module, args):
        if len(args[0]) == len(idx):  # not the library's 1-image probe of the model
            inputs.append((module.training, args[0].detach().clone()))

    def record_layer(name):
        def hook(module, args, output):
            if module.training:
                layers[name + ".x"] = args[0].detach().clone()
                output.register_hook(lambda g: layers.__setitem__(name + ".g", g.detach().clone()))

        return hook

    handles = [model.register_forward_pre_hook(record_input)]
    handles += [m.register_forward_hook(record_layer(n)) for n, m in _layers(model).items()]
    adversarial_finetune(model, data, SETTINGS.replace(epochs=1), progress=False)
    for h in handles:
        h.remove()
    grad = {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    model.load_state_dict(initial)
    model.zero_grad(set_to_none=True)
    model.train()
    F.cross_entropy(model(inputs[-1][1]), y).backward()  # what this process computed before any all-reduce
    local_grad = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    step = {
        "slice": sampler.current,
        "inputs": inputs,
        "layers": layers,
        "grad": grad,
        "local_grad": local_grad,
        "weight": {n: initial[n] for n in grad},
    }
    if world == 1:
        step["batch_invariant"] = batch_invariant(model, [x for _, x in inputs], y, 2)
    return step


if __name__ == "__main__":
    out = Path(sys.argv[1])
    rank, world = init_distributed()
    torch.save(first_step(rank, world), out / f"step_world{world}_rank{rank}.pt")
    if world > 1:
        torch.save(finetune_small().state_dict(), out / f"rank{rank}.pt")
        torch.distributed.destroy_process_group()
