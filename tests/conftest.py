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
