"""The train stage: adversarial training of a float model and adversarial fine-tuning of a quantized one.

===============  ================================================================================
module           holds
===============  ================================================================================
``training``     :func:`adversarial_train`, checkpoints and resume
``finetune``     :func:`adversarial_finetune` of a quantized model, distributed if asked
===============  ================================================================================
"""

from __future__ import annotations

from .finetune import adversarial_finetune, init_distributed
from .training import TrainHistory, adversarial_train

__all__ = ["TrainHistory", "adversarial_finetune", "adversarial_train", "init_distributed"]
