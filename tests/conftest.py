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


# float32 unit roundoff: every rounding of a real r gives r(1 + d) with |d| <= U32.
U32 = 2.0**-24


def gamma(n: int, u: float = U32) -> float:
    """Higham's gamma_n = n·u/(1 - n·u): a sum of n products, in any order, with or without FMA, ends
    within gamma_n·Σ|products| of the exact sum; n roundings in a row stay within gamma_n relative."""
    assert n * u < 0.5
    return n * u / (1 - n * u)


def abs_map(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``|W|·|x|`` in float64: ``layer``'s linear map (conv, transposed conv or linear, no bias) with
    every weight and input replaced by its magnitude, the Σ|terms| of each output's dot product."""
    import copy

    ref = copy.deepcopy(layer).double()
    with torch.no_grad():
        ref.weight.abs_()
        ref.bias = None
        return ref(x.detach().double().abs())


def fold_bound(layer: torch.nn.Module, bn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on ``|folded layer(x) - bn(layer(x))|`` (eval mode; also after a ReLU, 1-Lipschitz).

    With s = γ/√(var + ε) per output channel, b' = β + s·(b - μ): each side is within gamma_{K+8} of the
    exact value, relative to Σ|terms| = |s|·|W|·|x| + |β| + |s|·(|b| + |μ|), where K = terms per output
    (the dot product), +1 for s·W, +4 for s (add, sqrt, divide, multiply), +3 for the BatchNorm's
    subtract, multiply and add; the two sides differ by at most twice that.
    """
    out = 1 if isinstance(layer, torch.nn.modules.conv._ConvTransposeNd) else 0
    channels = layer.weight.shape[out] * (layer.groups if out else 1)
    k = layer.weight.numel() // channels
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double()
    bias = layer.bias.detach().double().abs() if layer.bias is not None else 0.0
    rest = bn.bias.detach().double().abs() + s.abs() * (bias + bn.running_mean.double().abs())
    shape = (1, -1) + (1,) * (x.dim() - 2)
    terms = s.abs().view(shape) * abs_map(layer, x) + rest.view(shape)
    return 2 * gamma(k + 8) * terms
