"""Adversarial fine-tuning of a quantized model, in one process or under ``torchrun`` (DDP).

Quantization-aware training goes through Brevitas's straight-through estimators; the inner
maximisation is torchattacks PGD (Madry), TRADES optional. The loop itself is
:func:`aq_brevitas.training.adversarial_train`; this module adds what fine-tuning needs on top:
defaults suited to a trained model (Adam, small LR), the one-time weight quantization during attack
steps, activation scales kept at their calibrated values, and process-group set-up for ``torchrun``.

BatchNorm: the attack runs with the model in eval mode (torchattacks' default), so it searches
against the running statistics that evaluation uses and its k forward passes do not update them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .training import TrainHistory, adversarial_train


def init_distributed() -> tuple[int, int]:
    """Join the process group ``torchrun`` describes in the environment; ``(rank, world)``.

    Uses gloo on CPU and nccl when CUDA is available. Outside torchrun this is ``(0, 1)``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise ConfigError(
                    f"WORLD_SIZE={world} but {key} is not set", "launch with torchrun --nproc_per_node=N"
                )
        rank = os.environ["RANK"]
        if not rank.isdigit() or int(rank) >= world:
            raise ConfigError(
                f"RANK={rank} is not a rank of WORLD_SIZE={world} (expected 0..{world - 1})",
                "launch every rank with the same torchrun --nproc_per_node=N command",
            )
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    if dist.get_world_size() != world:
        raise ConfigError(
            f"process group has {dist.get_world_size()} ranks but WORLD_SIZE={world}",
            "launch every rank with the same torchrun command",
        )
    return dist.get_rank(), dist.get_world_size()


def adversarial_finetune(
    model: nn.Module,
    train_data: Any,
    *,
    eps: float = 0.1,
    steps: int = 7,
    alpha: float | None = None,
    random_start: bool = True,
    epochs: int = 1,
    lr: float = 5e-4,
    optimizer: str = "adam",
    batch_size: int = 128,
    clean_weight: float = 0.0,
    trades_beta: float | None = None,
    seed: int = 0,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    learn_act_scales: bool = False,
) -> TrainHistory:
    """PGD fine-tuning (quantization-aware for Brevitas models) of ``model`` in place.

    Works on models from :func:`aq_brevitas.quantize`, on float models, and on torch.ao prepared
    (fake-quant) models. Call :func:`init_distributed` first under ``torchrun``; then each process
    passes the same arguments and ``batch_size`` is the global batch.

    ``learn_act_scales=False`` keeps Brevitas activation scales at their calibrated values and trains
    the weights only. Learning them made a W4A8 QAT step of the zoo CNN ~16% slower in
    benchmarks/finetune_speed.py, mostly because the first conv then also needs the gradient with
    respect to its (quantized image) input. Pass ``True`` to learn them (LSQ-style).
    """
    with contextlib.nullcontext() if learn_act_scales else frozen_activation_scales(model):
        return adversarial_train(
            model,
            train_data,
            eps=eps,
            steps=steps,
            alpha=alpha,
            random_start=random_start,
            epochs=epochs,
            lr=lr,
            optimizer=optimizer,
            batch_size=batch_size,
            clean_weight=clean_weight,
            trades_beta=trades_beta,
            seed=seed,
            checkpoint=checkpoint,
            resume=resume,
            progress=progress,
            weight_decay=0.0,
            freeze_quant_weights=True,
        )


@contextlib.contextmanager
def frozen_activation_scales(model: nn.Module) -> Iterator[int]:
    """Stop gradients to Brevitas activation-quantizer parameters until exit; yields how many.

    Their ``requires_grad`` flags are restored on exit, also on exceptions.
    """
    from brevitas.proxy.runtime_quant import ActQuantProxyFromInjector

    params = {
        id(p): p
        for m in model.modules()
        if isinstance(m, ActQuantProxyFromInjector)
        for p in m.parameters()
        if p.requires_grad
    }
    try:
        for p in params.values():
            p.requires_grad_(False)
        yield len(params)
    finally:
        for p in params.values():
            p.requires_grad_(True)
