"""Adversarial (Madry or TRADES) training: the one training loop, for float and for quantized models.

The inner maximisation is torchattacks PGD, or TPGD for TRADES, built by
:func:`~aq_brevitas.attacks.make_attack`; the settings are a :class:`~aq_brevitas.config.TrainConfig`.
The attack runs with the model in eval mode
(torchattacks' default): BatchNorm then uses its running statistics while the k attack steps search,
so the attack sees the same function evaluation will see, and the k extra forward passes do not
pollute the running statistics. The outer step is in ``train()`` mode as usual.

The model comes back in the train/eval mode it came in (each module's own flag). With the config's
``normalization=(mean, std)`` the data and ε stay in [0, 1] pixel space and the model is fed
``(x - mean) / std`` (:func:`~aq_brevitas.attacks.normalized_inputs`), in the attack and the step alike.

Resuming is exact: each epoch's shuffle and attack noise are seeded from ``(seed, epoch)``, so a run
resumed from the epoch-``e`` checkpoint replays epochs ``e+1..`` as the uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Sampler

from ..attacks import make_attack, normalized_inputs
from ..config import TrainConfig, config_or_default, takes_config
from ..errors import CheckpointError, ConfigError
from ..forward import as_dataset, eval_mode, frozen_activation_scales, frozen_quant_weights
from ..storage import load_checkpoint, save_checkpoint


@dataclass
class EpochStats:
    epoch: int
    loss: float
    clean_acc: float | None
    adv_acc: float | None
    lr: float
    seconds: float
    images: int


@dataclass
class TrainHistory:
    """Per-epoch statistics of a training run (JSON-serialisable)."""

    epochs: list[EpochStats] = field(default_factory=list)
    resumed_from_epoch: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"epochs": [asdict(e) for e in self.epochs], "resumed_from_epoch": self.resumed_from_epoch}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainHistory:
        return cls([EpochStats(**e) for e in d.get("epochs", [])], int(d.get("resumed_from_epoch", 0)))


class GlobalBatchSampler(Sampler[list[int]]):
    """Each rank's share of the *same* global batches a single process would draw.

    Epoch ``e`` permutes the dataset with seed ``(seed, e)``; global batch ``t`` is
    ``perm[t·B:(t+1)·B]`` and rank ``r`` takes the ``r``-th of ``world`` near-equal slices. With DDP's
    gradient averaging, N processes then take the same steps as one process with batch ``B`` (up to
    BatchNorm batch statistics and float summation order; the PGD random start is made to match, see
    :func:`_skip_uniform`). A last batch smaller than ``world`` is dropped.
    """

    def __init__(self, n: int, batch_size: int, *, rank: int = 0, world: int = 1, seed: int = 0) -> None:
        self.n, self.batch_size, self.rank, self.world, self.seed, self.epoch = (
            n,
            batch_size,
            rank,
            world,
            seed,
            0,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_batches(self) -> list[torch.Tensor]:
        perm = torch.randperm(
            self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        )
        return [b for b in perm.split(self.batch_size) if len(b) >= self.world]

    def __iter__(self):
        for batch in self._global_batches():
            parts = batch.tensor_split(self.world)
            start = sum(len(p) for p in parts[: self.rank])
            #: ``(start, end, size)`` of the slice just yielded within its global batch
            self.current = (start, start + len(parts[self.rank]), len(batch))
            yield parts[self.rank].tolist()

    def __len__(self) -> int:
        return len(self._global_batches())


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _make_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)


@takes_config(TrainConfig)
def adversarial_train(
    model: nn.Module,
    train_data: Any,
    config: TrainConfig | None = None,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    checkpoint_meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> TrainHistory:
    """Train ``model`` in place on adversarial examples (``eps=0`` or ``steps=0``: plain training).

    ``train_data`` is any form :func:`~aq_brevitas.forward.as_dataset` accepts (an ``(images,
    labels)`` pair, a Dataset, a DataLoader -- its dataset is used -- or an iterable of batches);
    images in [0, 1]. ``config`` is a :class:`~aq_brevitas.config.TrainConfig` (None: its defaults;
    change one with ``TrainConfig(eps=0.2, epochs=3)`` or ``config.replace(...)``). The inner
    maximisation is torchattacks PGD (Madry), or TPGD (TRADES) with ``trades_beta``; a Brevitas
    model's weights are quantized once per step for the k attack steps
    (:func:`~aq_brevitas.forward.frozen_quant_weights`).
    ``checkpoint`` is written atomically after every epoch (with ``checkpoint_meta`` in its sidecar);
    ``resume=True`` continues from it. Under ``torchrun`` (an initialised process group) the model is
    wrapped in DDP, each rank takes its slice of every global batch, and only rank 0 writes
    checkpoints and shows progress. The progress bar and :class:`EpochStats` report clean accuracy in
    every mode; in plain Madry mode it comes from one extra no-grad eval-mode forward of the clean
    batch. The config's ``normalization=(mean, std)`` is for a model that expects normalised
    inputs: data and ε stay in [0, 1] and the model is fed ``(x - mean) / std``.
    Returns the per-epoch :class:`TrainHistory`; ``model`` comes back in the train/eval mode it came
    in (each module's own flag; its BatchNorm statistics are trained, as training does).
    Raises :class:`ConfigError` for bad settings or data (a mean/std of the wrong length too),
    :class:`CheckpointError` for a checkpoint that does not fit, :class:`ModelError` for a model
    without input gradient when the training attacks it.

    >>> import torch
    >>> from torch import nn
    >>> from aq_brevitas import TrainConfig, adversarial_train
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    >>> x, y = torch.rand(32, 1, 4, 4), torch.randint(0, 3, (32,))
    >>> history = adversarial_train(model, (x, y), TrainConfig(steps=2, batch_size=16), progress=False)
    >>> len(history.epochs), history.epochs[0].images
    (1, 32)
    """
    cfg = config_or_default(config, TrainConfig())
    # eval_mode restores every module's own train/eval flag on exit; the epochs set train() themselves.
    with (
        eval_mode(model),
        normalized_inputs(model, cfg.normalization),
        contextlib.nullcontext() if cfg.learn_act_scales else frozen_activation_scales(model),
    ):
        run = _Run.build(model, train_data, cfg)  # the optimizer sees only what still trains
        history = TrainHistory()
        ckpt_path = Path(checkpoint) if checkpoint is not None else None
        if resume:
            history = run.resume(ckpt_path)
        for epoch in range(history.resumed_from_epoch, cfg.epochs):
            history.epochs.append(run.epoch(epoch, progress=progress and run.rank == 0))
            if ckpt_path is not None and run.rank == 0:
                run.save(ckpt_path, epoch + 1, history, checkpoint_meta)
            if run.world > 1:
                torch.distributed.barrier()
    return history


@dataclass
class _Run:
    """The moving parts of one training run, and its epoch, step and checkpoint logic."""

    model: nn.Module
    train_model: nn.Module  # ``model``, or its DDP wrapper
    cfg: TrainConfig
    sampler: GlobalBatchSampler
    loader: torch.utils.data.DataLoader
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    attack: Any
    rank: int
    world: int

    @classmethod
    def build(cls, model: nn.Module, train_data: Any, cfg: TrainConfig) -> _Run:
        rank, world = _dist_info()
        dataset = as_dataset(train_data)
        if cfg.batch_size < world:
            raise ConfigError(
                f"batch_size={cfg.batch_size} is smaller than the {world} processes", "raise --batch-size"
            )
        sampler = GlobalBatchSampler(len(dataset), cfg.batch_size, rank=rank, world=world, seed=cfg.seed)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler)
        train_model = nn.parallel.DistributedDataParallel(model) if world > 1 else model
        opt = _make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * max(1, len(loader)))
        attack = None
        if cfg.adversarial:
            # The attack needs input gradients only, so it runs on the bare module, outside DDP's reducer.
            attack = make_attack(cfg.attack(), model)
        return cls(model, train_model, cfg, sampler, loader, opt, sched, attack, rank, world)

    def resume(self, path: Path | None) -> TrainHistory:
        """Restore model, optimizer, schedule and history from ``path`` (a fresh history if absent)."""
        if path is None:
            raise ConfigError(
                "resume=True needs a checkpoint path", "pass checkpoint=... (CLI: --checkpoint)"
            )
        if not path.is_file():
            return TrainHistory()
        state = load_checkpoint(path)
        try:
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            epoch = int(state["epoch"])
            history = TrainHistory.from_dict(state.get("history", {}))
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(
                f"checkpoint {path} does not match this model/run ({str(exc).splitlines()[0][:100]})",
                "delete it or drop --resume",
            ) from None
        history.resumed_from_epoch = epoch
        return history

    def save(self, path: Path, epoch: int, history: TrainHistory, meta: dict[str, Any] | None) -> None:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "epoch": epoch,
            "history": history.to_dict(),
        }
        extra = {"epoch": epoch, "epochs": self.cfg.epochs, "kind": "training-state"}
        save_checkpoint(path, state, meta={**(meta or {}), **extra})

    def epoch(self, epoch: int, *, progress: bool) -> EpochStats:
        """One pass over the data: attack, step, and the epoch's statistics."""
        from tqdm.auto import tqdm

        torch.manual_seed(self.cfg.seed * 10007 + epoch)
        self.sampler.set_epoch(epoch)
        self.model.train()
        t0 = time.perf_counter()
        tot_loss = tot_clean = tot_adv = seen = 0.0
        bar = tqdm(
            self.loader, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", disable=not progress, leave=False
        )
        for x, y in bar:
            loss, clean, adv = self.step(x, y, epoch)
            seen += len(y)
            tot_loss += loss * len(y)
            tot_clean += clean or 0
            tot_adv += adv or 0
            bar.set_postfix(
                loss=f"{tot_loss / seen:.3f}",
                clean=f"{tot_clean / seen:.3f}",
                adv=f"{tot_adv / seen:.3f}" if self.attack is not None else "-",
            )
        return EpochStats(
            epoch=epoch + 1,
            loss=tot_loss / max(seen, 1),
            clean_acc=tot_clean / seen if seen else None,
            adv_acc=tot_adv / seen if self.attack is not None and seen else None,
            lr=self.opt.param_groups[0]["lr"],
            seconds=time.perf_counter() - t0,
            images=int(seen * self.world),
        )

    def step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> tuple[float, int | None, int | None]:
        """One optimizer step; ``(loss, clean-correct count, adversarial-correct count)``."""
        x_adv, clean_correct = self.adversary(x, y)
        self.model.train()
        loss, clean_logits, adv_logits = self.loss(x, y, x_adv)
        if not torch.isfinite(loss):
            raise ConfigError(f"training loss became {loss.item()} at epoch {epoch + 1}", "lower --lr")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        if clean_logits is not None:
            clean_correct = (clean_logits.argmax(1) == y).sum().item()
        adv_correct = (adv_logits.argmax(1) == y).sum().item() if adv_logits is not None else None
        return loss.item(), clean_correct, adv_correct

    def adversary(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor | None, int | None]:
        """Adversarial examples of the batch (None in plain training) and, in Madry mode without a clean
        loss term, the clean-correct count from one no-grad eval-mode forward."""
        if self.attack is None:
            return None, None
        with frozen_quant_weights(self.model):
            if self.cfg.trades_beta is not None:
                return self.attack(x, y), None
            start, end, total = self.sampler.current
            per_image = x[0].numel() if self.cfg.random_start else 0
            _skip_uniform(start * per_image, x.device)
            x_adv = self.attack(x, y)
            _skip_uniform((total - end) * per_image, x.device)
            if self.cfg.clean_weight > 0:  # the outer step's clean forward counts them
                return x_adv, None
            self.model.eval()
            with torch.no_grad():
                return x_adv, (self.model(x).argmax(1) == y).sum().item()

    def loss(
        self, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The training loss, with the clean and adversarial logits it saw (None where not computed)."""
        cfg = self.cfg
        if x_adv is None:
            logits = self.train_model(x)
            return F.cross_entropy(logits, y), logits, None
        if cfg.trades_beta is None and cfg.clean_weight == 0:
            adv_logits = self.train_model(x_adv)
            return F.cross_entropy(adv_logits, y), None, adv_logits
        both = self.train_model(torch.cat([x, x_adv]))
        clean_logits, adv_logits = both[: len(x)], both[len(x) :]
        if cfg.trades_beta is not None:
            kl = F.kl_div(F.log_softmax(adv_logits, 1), F.softmax(clean_logits, 1), reduction="batchmean")
            loss = F.cross_entropy(clean_logits, y) + cfg.trades_beta * kl
        else:
            w = cfg.clean_weight
            loss = (1 - w) * F.cross_entropy(adv_logits, y) + w * F.cross_entropy(clean_logits, y)
        return loss, clean_logits, adv_logits


def _skip_uniform(n: int, device: torch.device) -> None:
    """Advance the global RNG past ``n`` uniform draws.

    torchattacks PGD draws its random start with one ``uniform_`` over the batch, and the CPU
    generator fills sequentially: a rank that skips the draws of the slices before its own (and after
    it, to stay in step) gets exactly the noise one process would give its images. (CUDA's Philox
    offsets do not split that way; there the ranks stay in step but the noise differs.)
    """
    if n > 0:
        torch.empty(n, device=device).uniform_()
