"""Adversarial (Madry) training: the one training loop, for float and for quantized models.

The inner maximisation is torchattacks PGD. The attack runs with the model in eval mode
(torchattacks' default): BatchNorm then uses its running statistics while the k attack steps search,
so the attack sees the same function evaluation will see, and the k extra forward passes do not
pollute the running statistics. The outer step is in ``train()`` mode as usual.

Resuming is exact: each epoch's shuffle and attack noise are seeded from ``(seed, epoch)``, so a run
resumed from the epoch-``e`` checkpoint replays epochs ``e+1..`` as the uninterrupted run would.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset, Sampler, TensorDataset

from .attacks import check_eps, default_alpha, make_attack
from .errors import CheckpointError, ConfigError
from .storage import load_checkpoint, save_checkpoint


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


def as_dataset(data: Any) -> Dataset:
    """Accept a Dataset, a DataLoader (its dataset is used) or an ``(images, labels)`` pair."""
    if isinstance(data, tuple) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        return TensorDataset(*data)
    if isinstance(data, torch.utils.data.DataLoader):
        return data.dataset
    if isinstance(data, Dataset):
        return data
    raise ConfigError(
        f"training data of type {type(data).__name__} is not supported",
        "pass a Dataset, a DataLoader or (images, labels)",
    )


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


def _make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}", "use 'sgd' or 'adam'")


def adversarial_train(
    model: nn.Module,
    train_data: Any,
    *,
    eps: float = 0.1,
    steps: int = 7,
    alpha: float | None = None,
    random_start: bool = True,
    epochs: int = 1,
    lr: float = 0.05,
    optimizer: str = "sgd",
    weight_decay: float = 5e-4,
    batch_size: int = 128,
    clean_weight: float = 0.0,
    trades_beta: float | None = None,
    seed: int = 0,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    checkpoint_meta: dict[str, Any] | None = None,
    freeze_quant_weights: bool = True,
) -> TrainHistory:
    """Train ``model`` in place on PGD examples (``eps=0`` gives plain training).

    ``clean_weight`` mixes in the clean cross-entropy: loss = (1-w)·CE(adv) + w·CE(clean).
    ``trades_beta`` switches to TRADES: CE(clean) + β·KL(f(x_adv) ‖ f(x)) with a KL-maximising attack.
    ``checkpoint`` is written atomically after every epoch; ``resume=True`` continues from it.
    Under ``torchrun`` (an initialised process group) the model is wrapped in DDP, each rank takes
    its slice of every global batch, and only rank 0 writes checkpoints and shows progress.
    ``freeze_quant_weights`` quantizes a Brevitas model's weights once per step for the k attack
    steps (they do not change between them) instead of once per attack forward.
    ``alpha`` is the PGD step (default 2.5·ε/steps); ``random_start=False`` starts PGD at the clean
    image instead of a uniform point in the ε-ball (Madry et al. use the random start); TRADES always
    starts from a small Gaussian, as its KL gradient is zero at the clean image.
    The progress bar and :class:`EpochStats` report clean accuracy in every mode; in plain Madry mode
    it comes from one extra no-grad eval-mode forward of the clean batch (with the weights already
    quantized for the attack), which costs a fraction of one of the k attack steps.
    """
    import contextlib

    from tqdm.auto import tqdm

    from .evaluate import frozen_quant_weights

    eps = check_eps(eps)
    if epochs < 1 or steps < 0 or lr <= 0 or batch_size < 1:
        raise ConfigError(
            f"bad training settings (epochs={epochs}, steps={steps}, lr={lr}, batch_size={batch_size})",
            "use epochs>=1, steps>=0, lr>0, batch_size>=1",
        )
    if not 0.0 <= clean_weight <= 1.0:
        raise ConfigError(f"clean_weight={clean_weight} is outside [0, 1]", "pass a mixing weight in [0, 1]")
    if alpha is not None and not (isinstance(alpha, (int, float)) and 0 < alpha <= 1):
        raise ConfigError(
            f"alpha={alpha!r} is not a PGD step in (0, 1]", "pass e.g. --alpha 0.01, or omit it"
        )
    alpha = alpha or default_alpha(eps, steps)
    adversarial = eps > 0 and steps > 0
    rank, world = _dist_info()
    dataset = as_dataset(train_data)
    if batch_size < world:
        raise ConfigError(
            f"batch_size={batch_size} is smaller than the {world} processes", "raise --batch-size"
        )
    sampler = GlobalBatchSampler(len(dataset), batch_size, rank=rank, world=world, seed=seed)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler)

    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(model)
    opt = _make_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad], lr, weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * max(1, len(loader)))
    history = TrainHistory()
    start_epoch = 0
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    if resume:
        if ckpt_path is None:
            raise ConfigError(
                "resume=True needs a checkpoint path", "pass checkpoint=... (CLI: --checkpoint)"
            )
        if ckpt_path.is_file():
            state = load_checkpoint(ckpt_path)
            try:
                model.load_state_dict(state["model"])
                opt.load_state_dict(state["optimizer"])
                sched.load_state_dict(state["scheduler"])
                start_epoch = int(state["epoch"])
                history = TrainHistory.from_dict(state.get("history", {}))
            except (KeyError, RuntimeError, ValueError) as exc:
                raise CheckpointError(
                    f"checkpoint {ckpt_path} does not match this model/run ({str(exc).splitlines()[0][:100]})",
                    "delete it or drop --resume",
                ) from None
            history.resumed_from_epoch = start_epoch

    attack = None
    if adversarial:
        # The attack needs input gradients only, so it runs on the bare module, outside DDP's reducer.
        attack = make_attack("pgd", model, eps=eps, steps=steps, alpha=alpha, random_start=random_start)
    for epoch in range(start_epoch, epochs):
        torch.manual_seed(seed * 10007 + epoch)
        sampler.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        tot_loss = tot_clean = tot_adv = seen = 0.0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress or rank != 0, leave=False)
        for x, y in bar:
            x_adv = clean_correct = None
            if attack is not None:
                with frozen_quant_weights(model) if freeze_quant_weights else contextlib.nullcontext():
                    if trades_beta is None:
                        start, end, total = sampler.current
                        per_image = x[0].numel() if random_start else 0
                        _skip_uniform(start * per_image, x.device)
                        x_adv = attack(x, y)
                        _skip_uniform((total - end) * per_image, x.device)
                        if clean_weight == 0:  # Madry: the outer step sees no clean forward
                            model.eval()
                            with torch.no_grad():
                                clean_correct = (model(x).argmax(1) == y).sum().item()
                    else:
                        x_adv = _trades_adversary(model, x, eps, steps, alpha)
            model.train()
            if x_adv is None:
                logits = train_model(x)
                loss = F.cross_entropy(logits, y)
                clean_logits, adv_logits = logits, None
            elif trades_beta is not None:
                both = train_model(torch.cat([x, x_adv]))
                clean_logits, adv_logits = both[: len(x)], both[len(x) :]
                kl = F.kl_div(F.log_softmax(adv_logits, 1), F.softmax(clean_logits, 1), reduction="batchmean")
                loss = F.cross_entropy(clean_logits, y) + trades_beta * kl
            elif clean_weight > 0:
                both = train_model(torch.cat([x, x_adv]))
                clean_logits, adv_logits = both[: len(x)], both[len(x) :]
                loss = (1 - clean_weight) * F.cross_entropy(adv_logits, y) + clean_weight * F.cross_entropy(
                    clean_logits, y
                )
            else:
                adv_logits = train_model(x_adv)
                clean_logits = None
                loss = F.cross_entropy(adv_logits, y)
            if not torch.isfinite(loss):
                raise ConfigError(f"training loss became {loss.item()} at epoch {epoch + 1}", "lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            n = len(y)
            seen += n
            tot_loss += loss.item() * n
            if clean_logits is not None:
                tot_clean += (clean_logits.argmax(1) == y).sum().item()
            elif clean_correct is not None:
                tot_clean += clean_correct
            if adv_logits is not None:
                tot_adv += (adv_logits.argmax(1) == y).sum().item()
            bar.set_postfix(
                loss=f"{tot_loss / seen:.3f}",
                clean=f"{tot_clean / seen:.3f}",
                adv=f"{tot_adv / seen:.3f}" if adversarial else "-",
            )
        stats = EpochStats(
            epoch=epoch + 1,
            loss=tot_loss / max(seen, 1),
            clean_acc=tot_clean / seen if seen else None,
            adv_acc=tot_adv / seen if adversarial and seen else None,
            lr=opt.param_groups[0]["lr"],
            seconds=time.perf_counter() - t0,
            images=int(seen * world),
        )
        history.epochs.append(stats)
        if ckpt_path is not None and rank == 0:
            save_checkpoint(
                ckpt_path,
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "epoch": epoch + 1,
                    "history": history.to_dict(),
                },
                meta={
                    **(checkpoint_meta or {}),
                    "epoch": epoch + 1,
                    "epochs": epochs,
                    "kind": "training-state",
                },
            )
        if world > 1:
            torch.distributed.barrier()
    model.eval()
    return history


def _skip_uniform(n: int, device: torch.device) -> None:
    """Advance the global RNG past ``n`` uniform draws.

    torchattacks PGD draws its random start with one ``uniform_`` over the batch, and the CPU
    generator fills sequentially: a rank that skips the draws of the slices before its own (and after
    it, to stay in step) gets exactly the noise one process would give its images. (CUDA's Philox
    offsets do not split that way; there the ranks stay in step but the noise differs.)
    """
    if n > 0:
        torch.empty(n, device=device).uniform_()


def _trades_adversary(
    model: nn.Module, x: torch.Tensor, eps: float, steps: int, alpha: float
) -> torch.Tensor:
    """TRADES inner maximisation: PGD on KL(f(x') ‖ f(x)), projected to the ε-ball and [0, 1].

    It always starts from TRADES's small Gaussian (σ=0.001): at x itself the KL gradient is zero.
    """
    was_training = model.training
    model.eval()
    with torch.no_grad():
        p_clean = F.softmax(model(x), 1)
    x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0, 1).detach()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(x_adv), 1), p_clean, reduction="sum")
        (grad,) = torch.autograd.grad(kl, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
    model.train(was_training)
    return x_adv.detach()
