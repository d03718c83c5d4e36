"""Adversarial fine-tuning of a quantized model, in one process or under ``torchrun`` (DDP).

Quantization-aware training goes through Brevitas's straight-through estimators; the inner
maximisation is torchattacks PGD (Madry), TRADES optional. The loop itself is
:func:`aq_brevitas.train.training.adversarial_train`; this module adds the defaults suited to a trained
model (:meth:`~aq_brevitas.config.TrainConfig.finetuning`: Adam, small LR, activation scales kept at
their calibrated values) and process-group set-up for ``torchrun``.

BatchNorm: the attack runs with the model in eval mode (torchattacks' default), so it searches
against the running statistics that evaluation uses and its k forward passes do not update them.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig, config_or_default, takes_config
from ..errors import ConfigError
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


def close_distributed() -> None:
    """Leave the process group :func:`init_distributed` joined (nothing when none was joined)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@takes_config(TrainConfig)
def adversarial_finetune(
    model: nn.Module, train_data: Any, config: TrainConfig | None = None, *, progress: bool = True
) -> TrainHistory:
    """PGD fine-tuning (quantization-aware for Brevitas models) of ``model`` in place.

    :func:`~aq_brevitas.train.training.adversarial_train` with the fine-tuning defaults: ``config``
    (a :class:`~aq_brevitas.config.TrainConfig`) defaults to :meth:`TrainConfig.finetuning()
    <aq_brevitas.config.TrainConfig.finetuning>` (Adam at lr 5e-4, no weight decay, Brevitas
    activation scales kept at their calibrated values so only the weights train;
    ``learn_act_scales=True`` learns them too, LSQ-style); ``TrainConfig.finetuning(eps=0.2, ...)``
    changes some. To write a checkpoint after every epoch and resume from it, call
    ``adversarial_train(model, data, TrainConfig.finetuning(...), checkpoint=..., resume=True)``:
    the same run. The config's ``normalization=(mean, std)`` is for a model that expects normalised
    inputs: data and ε stay in [0, 1] pixel space and the model is fed ``(x - mean) / std``. Returns
    the :class:`TrainHistory`; the model comes back in the train/eval mode it came in. Errors as
    :func:`~aq_brevitas.train.training.adversarial_train`'s.

    Works on models from :func:`aq_brevitas.quantize`, on float models, and on torch.ao prepared
    (fake-quant) models. Call :func:`init_distributed` first under ``torchrun``; then each process
    passes the same arguments and ``batch_size`` is the global batch.

    >>> import torch
    >>> from torch import nn
    >>> from aq_brevitas import LayerSpec, LayerwisePolicy, TrainConfig, adversarial_finetune, quantize
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    >>> q = quantize(model, LayerwisePolicy(default=LayerSpec(4)))
    >>> x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    >>> cfg = TrainConfig.finetuning(eps=0.1, steps=2, epochs=2, batch_size=32)
    >>> history = adversarial_finetune(q, (x, y), cfg, progress=False)
    >>> [e.epoch for e in history.epochs], history.epochs[-1].images, history.epochs[-1].adv_acc is not None
    ([1, 2], 64, True)
    """
    return adversarial_train(
        model, train_data, config_or_default(config, TrainConfig.finetuning()), progress=progress
    )
