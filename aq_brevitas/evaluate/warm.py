"""Warm starts: one policy's adversarial examples tried on the next policy (issue 23, item 3).

Policies of one sweep or search differ in a few layers' bits, so an image one policy gets wrong
under attack is often wrong for its neighbour at the same point. :class:`AdvExamples` holds the
adversarial examples a chain found (the images it broke, by index into the evaluated images);
:func:`replay` classifies them with the next model. The replay is an attack of its own (``"warm"``,
the last step of a chain: a transfer attack from the earlier policy, one forward per image still
standing), part of the per-image worst case and never the headline by itself. It runs last because
the attacks' random starts are drawn per batch: taking the images a replay broke out of the batches
first changed the other images' starts, and measured robust accuracy *above* the cold one on 3 of 6
policies (docs/benchmarks.md); last, every other attack runs exactly as without it, so a warm
measurement is never above the cold one. Each example is projected onto the ε-ball of its image and
[0, 1] before it is classified, so a seed from other settings can never count an out-of-budget point.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..quantization.twin import verified_logits
from ..storage import atomic_write_with


@dataclass(frozen=True)
class AdvExamples:
    """Adversarial examples of some of the evaluated images: ``index`` (int64, shape (k,)) into the
    images, ``images`` (shape (k, C, H, W), in [0, 1]) the example found for each, on the CPU.

    >>> ex = AdvExamples.empty((1, 2, 2)).merge(torch.tensor([3]), torch.zeros(1, 1, 2, 2))
    >>> ex.index.tolist(), tuple(ex.images.shape)
    ([3], (1, 1, 2, 2))
    """

    index: torch.Tensor
    images: torch.Tensor

    @classmethod
    def empty(cls, image_shape: tuple[int, ...]) -> AdvExamples:
        """No examples, for images of shape ``image_shape`` (C, H, W)."""
        return cls(torch.zeros(0, dtype=torch.int64), torch.zeros(0, *image_shape))

    def merge(self, index: torch.Tensor, images: torch.Tensor) -> AdvExamples:
        """These examples and ``images`` for ``index`` (a later example of an index replaces an earlier one)."""
        keep = ~torch.isin(self.index, index.cpu())
        return AdvExamples(
            torch.cat([self.index[keep], index.cpu().to(torch.int64)]),
            torch.cat([self.images[keep], images.detach().cpu().to(self.images.dtype)]),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically as a tensor file that :meth:`load` reads with ``weights_only=True``."""
        atomic_write_with(path, lambda p: torch.save({"index": self.index, "images": self.images}, p))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AdvExamples:
        """Read what :meth:`save` wrote (tensors only, never pickled objects)."""
        data = torch.load(path, map_location="cpu", weights_only=True)
        return cls(data["index"], data["images"])


@torch.no_grad()
def replay(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    seeds: AdvExamples,
    alive: torch.Tensor,
    batch_size: int = 250,
) -> tuple[torch.Tensor, AdvExamples]:
    """Classify the seeds of the images still ``alive`` with ``model`` (its Brevitas forward: the
    verdict users get), each projected onto the L-inf ``eps``-ball of its image ``x[i]`` and [0, 1].
    Returns (``alive`` with the images a seed broke cleared, the seeds that broke them).

    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    >>> x = torch.zeros(2, 1, 2, 2)
    >>> y = model(x).argmax(1)
    >>> seeds = AdvExamples(torch.tensor([1]), torch.ones(1, 1, 2, 2))  # projected back to x: no change
    >>> replay(model, x, y, 0.0, seeds, torch.ones(2, dtype=torch.bool))[0].tolist()
    [True, True]
    """
    alive = alive.clone().cpu()
    pick = alive[seeds.index] if len(seeds.index) else torch.zeros(0, dtype=torch.bool)
    index, images = seeds.index[pick], seeds.images[pick]
    broke = AdvExamples.empty(tuple(x.shape[1:]))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for idx, adv in zip(index.split(batch_size), images.split(batch_size), strict=True):
        xb = x[idx].to(device)
        adv = torch.minimum(torch.maximum(adv.to(device), xb - eps), xb + eps).clamp(0.0, 1.0)
        wrong = (verified_logits(model, adv).argmax(1) != y[idx].to(device)).cpu()
        alive[idx[wrong]] = False
        broke = broke.merge(idx[wrong], adv[wrong])
    return alive, broke
