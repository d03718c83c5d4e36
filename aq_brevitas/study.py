"""Claim 1 as a reproducible study: do adversarially trained models lose more to quantization?

A plainly trained and a PGD-trained model of the same architecture are quantized uniformly at each
bit width (weights per-channel abs-max, 8-bit activations calibrated on training images), and
clean / PGD accuracy are measured on the test split. The drop is relative to each float model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .convert import quantize
from .evaluate import accuracy, attack_accuracy
from .layers import quantizable_layers
from .policy import LayerSpec, LayerwisePolicy

STUDY_BITS = (8, 6, 4, 3, 2)


@dataclass
class StudyRow:
    model: str
    bits: int | None  # None = float
    clean_acc: float
    pgd_acc: float
    clean_drop: float
    pgd_drop: float


@dataclass
class StudyResult:
    rows: list[StudyRow] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [asdict(r) for r in self.rows], "settings": self.settings}

    def to_markdown(self) -> str:
        lines = [
            "| model | weight bits | clean acc | PGD acc | clean drop (pts) | PGD drop (pts) |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            b = "float" if r.bits is None else str(r.bits)
            lines.append(
                f"| {r.model} | {b} | {100 * r.clean_acc:.1f} | {100 * r.pgd_acc:.1f} | {100 * r.clean_drop:.1f} | {100 * r.pgd_drop:.1f} |"
            )
        return "\n".join(lines)

    def plot(self, path: Any) -> None:
        from .plots import plot_study

        plot_study(self, path)


def uniform_policy(model: nn.Module, bits: int, act_bits: int | None = 8) -> LayerwisePolicy:
    """Every quantizable layer at ``bits`` (per-channel abs-max), with ``act_bits`` input quantizers."""
    return LayerwisePolicy.uniform(
        quantizable_layers(model), LayerSpec(bits, "max", "per_channel", act_bits), method="uniform"
    )


def run_study(
    models: dict[str, nn.Module],
    test_data: tuple[torch.Tensor, torch.Tensor],
    calibration_images: torch.Tensor,
    *,
    bits: tuple[int, ...] = STUDY_BITS,
    eps: float = 0.1,
    pgd_steps: int = 20,
    seed: int = 0,
    progress: bool = True,
) -> StudyResult:
    """Quantize each model uniformly at every bit width; measure clean and PGD accuracy and their drops."""
    from tqdm.auto import tqdm

    x, y = test_data
    result = StudyResult(
        settings={
            "eps": eps,
            "pgd_steps": pgd_steps,
            "bits": list(bits),
            "test_images": len(y),
            "calibration_images": len(calibration_images),
            "seed": seed,
        }
    )
    jobs = [(name, b) for name in models for b in (None, *bits)]
    base: dict[str, tuple[float, float]] = {}
    for name, b in tqdm(jobs, desc="study", disable=not progress):
        model = models[name].eval()
        q = (
            model
            if b is None
            else quantize(model, uniform_policy(model, b), calibration_data=calibration_images).eval()
        )
        clean = accuracy(q, x, y)
        pgd = attack_accuracy(q, x, y, "pgd", eps=eps, steps=pgd_steps, seed=seed)
        if b is None:
            base[name] = (clean, pgd)
        result.rows.append(StudyRow(name, b, clean, pgd, base[name][0] - clean, base[name][1] - pgd))
    return result
