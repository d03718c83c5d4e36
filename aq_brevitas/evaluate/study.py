"""Claim 1 as a reproducible study: do adversarially trained models lose more to quantization?

A plainly trained and a PGD-trained model of the same architecture are quantized uniformly at each
bit width (weights per-channel abs-max, 8-bit activations calibrated on training images), and
clean / PGD accuracy are measured on the test split. The drop is relative to each float model.
A thin entry over library calls (:func:`quantize`, :func:`accuracy`, :func:`attack_accuracy`);
``aq-brevitas study`` is its command line, docs/study.md its measured result.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import AttackConfig
from ..forward import as_xy, iter_x_batches
from ..nnutils import quantizable_layers
from ..policy import LayerSpec, LayerwisePolicy
from ..quantization.convert import quantize
from ..storage import atomic_write_json, atomic_write_text
from .accuracy import accuracy, attack_accuracy

STUDY_BITS = (8, 6, 4, 3, 2)


@dataclass
class StudyRow:
    """One model at one weight bit width. Accuracies are fractions in [0, 1]; a drop is the float
    model's accuracy minus this row's (positive = accuracy lost to quantization)."""

    model: str
    bits: int | None  # None = float
    clean_acc: float
    pgd_acc: float
    clean_drop: float
    pgd_drop: float


@dataclass
class StudyResult:
    """The study's rows (per model: the float row first, then one per bit width) and its settings."""

    rows: list[StudyRow] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [asdict(r) for r in self.rows], "settings": self.settings}

    def to_markdown(self) -> str:
        """The rows as a Markdown table, accuracies and drops in percentage points."""
        lines = [
            "| model | weight bits | clean acc | PGD acc | clean drop (pts) | PGD drop (pts) |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            b = "float" if r.bits is None else str(r.bits)
            cells = (r.clean_acc, r.pgd_acc, r.clean_drop, r.pgd_drop)
            lines.append(f"| {r.model} | {b} | " + " | ".join(f"{100 * v:.1f}" for v in cells) + " |")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Accuracy drop against weight bits, as a PNG at ``path``."""
        from ..plots import plot_study

        plot_study(self, path)

    def save(self, prefix: str) -> list[str]:
        """Write ``PREFIX.json``, ``PREFIX.md`` and ``PREFIX.png`` (each atomically); returns the paths."""
        paths = [prefix + ext for ext in (".json", ".md", ".png")]
        atomic_write_json(paths[0], self.to_dict())
        atomic_write_text(paths[1], self.to_markdown() + "\n")
        self.plot(paths[2])
        return paths


def uniform_policy(model: nn.Module, bits: int, act_bits: int | None = 8) -> LayerwisePolicy:
    """Every quantizable layer at ``bits`` (per-channel abs-max), with ``act_bits`` input quantizers."""
    return LayerwisePolicy.uniform(
        quantizable_layers(model), LayerSpec(bits, "max", "per_channel", act_bits), method="uniform"
    )


def run_study(
    models: dict[str, nn.Module],
    test_data: Any,
    calibration_images: Any,
    *,
    bits: tuple[int, ...] = STUDY_BITS,
    eps: float = 0.1,
    pgd_steps: int = 20,
    seed: int = 0,
    progress: bool = True,
) -> StudyResult:
    """Quantize each model uniformly at every bit width; measure clean and PGD accuracy and their drops.

    ``models`` maps a row label to a float model (put in eval mode). ``test_data`` is labelled images
    in any form the package accepts (an ``(x, y)`` pair, a Dataset, a DataLoader, an iterable of
    batches); ``calibration_images`` are the images the activation quantizers are calibrated on
    (a tensor (N, C, H, W) in [0, 1], or any of those forms; labels are ignored). PGD is L-inf with
    radius ``eps`` (pixel units, images in [0, 1]) and ``pgd_steps`` steps, seeded by ``seed``.
    Bad data raises :class:`ConfigError`.

    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    >>> x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    >>> result = run_study({"tiny": model}, (x, y), x, bits=(4,), pgd_steps=1, progress=False)
    >>> [(r.model, r.bits) for r in result.rows]
    [('tiny', None), ('tiny', 4)]
    >>> result.rows[0].clean_drop
    0.0
    """
    from tqdm.auto import tqdm

    x, y = as_xy(test_data, name="test_data")
    calib = torch.cat(list(iter_x_batches(calibration_images, name="calibration_images")))
    result = StudyResult(
        settings={
            "eps": eps,
            "pgd_steps": pgd_steps,
            "bits": list(bits),
            "test_images": len(y),
            "calibration_images": len(calib),
            "seed": seed,
        }
    )
    jobs = [(name, b) for name in models for b in (None, *bits)]
    base: dict[str, tuple[float, float]] = {}
    for name, b in tqdm(jobs, desc="study", disable=not progress):
        model = models[name].eval()
        q = model if b is None else quantize(model, uniform_policy(model, b), calibration_data=calib).eval()
        clean = accuracy(q, x, y)
        pgd = attack_accuracy(q, x, y, AttackConfig("pgd", eps, pgd_steps), seed=seed)
        if b is None:  # the float row comes first for each model: the reference for the drops
            base[name] = (clean, pgd)
        result.rows.append(StudyRow(name, b, clean, pgd, base[name][0] - clean, base[name][1] - pgd))
    return result
