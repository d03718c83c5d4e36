"""Shared test setup: one torch thread (the machines have 2 noisy cores) and small real-data fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
torch.set_flush_denormal(True)
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]


class ConvBNDropNet(torch.nn.Module):
    """conv3x3 -> BatchNorm -> ReLU [-> 2x2 max-pool] -> Dropout -> linear, on 1-channel ``side`` x ``side``
    images: a small model whose train/eval flags and BatchNorm statistics the mode tests watch."""

    def __init__(self, channels: int, side: int, classes: int, pool: bool = False) -> None:
        super().__init__()
        self.pool = pool
        self.conv = torch.nn.Conv2d(1, channels, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(channels)
        self.drop = torch.nn.Dropout(0.5)
        self.fc = torch.nn.Linear(channels * (side // 2 if pool else side) ** 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        if self.pool:
            x = torch.nn.functional.max_pool2d(x, 2)
        return self.fc(self.drop(x.flatten(1)))


@pytest.fixture(scope="session")
def fmnist_test_1k():
    from aq_brevitas.data import load_split

    return load_split("test", limit=1000, seed=0)


@pytest.fixture(scope="session")
def fmnist_val_512():
    from aq_brevitas.data import load_split

    return load_split("val", limit=512, seed=0)


def run_cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run ``aq-brevitas ARGS`` in a subprocess, as a user would."""
    full_env = {**os.environ, "TQDM_DISABLE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "aq_brevitas.cli", *args],
        cwd=cwd or REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
