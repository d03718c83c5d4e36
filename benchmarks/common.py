"""Shared benchmark helpers: machine/version header, median timing, Markdown output."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable


def header() -> str:
    import brevitas
    import torch

    return (
        f"{datetime.date.today().isoformat()} · {platform.processor() or platform.machine()} · {os.cpu_count()} cores · "
        f"Python {platform.python_version()} · torch {torch.__version__} · brevitas {brevitas.__version__} · "
        f"torch threads {torch.get_num_threads()}"
    )


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int = 5) -> dict[str, float]:
    """Median times of several functions, run interleaved so machine noise hits them alike."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def selection_split(seed: int, calib_images: int = 256, val_images: int = 500):
    """The benchmarks' calibration/validation draw: aq_brevitas.data.selection_data with their defaults."""
    from aq_brevitas.data import selection_data

    return selection_data(calib_images, val_images, seed)
