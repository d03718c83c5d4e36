"""Independent jobs spread over local worker processes, for the stages whose jobs share nothing.

The robustness reports of a run (one per model and radius set) are independent and single-threaded
(the project runs torch with one intra-op thread: on small shared machines that is fastest), so on a
2-core machine two processes finish them in a little over half the time. Workers are forked: they
inherit the models and data the parent holds, nothing is pickled but the job's index and its (small)
result, and each job runs exactly the code and seeds it would run in the parent, so the results are
the same as with one process.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")

_JOB: Callable[[int], Any] | None = None  # set in the parent before the fork; inherited by the workers


def _run(index: int) -> Any:
    assert _JOB is not None
    return _JOB(index)


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_workers(workers: Any, flag: str = "workers") -> int:
    """``workers`` as a positive int, or :class:`ConfigError` naming ``flag``."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"{flag} must be an integer >= 1, got {workers!r}", f"pass {flag} 1 or 2")
    return workers


def run_jobs(
    job: Callable[[int], T],
    count: int,
    workers: int = 1,
    *,
    done: Callable[[int], None] | None = None,
    order: Sequence[int] | None = None,
) -> list[T]:
    """``[job(0), ..., job(count - 1)]``, run on ``workers`` forked processes (1: in this process).

    ``order``: the indices in the order to start them (longest first balances the workers); ``done``
    is called in this process with each finished index (a progress bar). A job's exception is raised
    here. Results are returned by index, whatever order they finished in.

    >>> run_jobs(lambda i: i * i, 4, workers=2)
    [0, 1, 4, 9]
    """
    global _JOB
    order = list(range(count)) if order is None else list(order)
    results: dict[int, T] = {}
    if workers <= 1 or count <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        for i in order:
            results[i] = job(i)
            if done:
                done(i)
        return [results[i] for i in range(count)]
    _JOB = job
    try:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(min(workers, count), mp_context=context, initializer=_one_thread) as pool:
            futures = {pool.submit(_run, i): i for i in order}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                if done:
                    done(futures[future])
    finally:
        _JOB = None
    return [results[i] for i in range(count)]
