"""Independent jobs spread over local worker processes, for the stages whose jobs share nothing.

The robustness reports of a run (one per model and radius set) are independent and single-threaded
(the project runs torch with one intra-op thread: on small shared machines that is fastest), so on a
2-core machine two processes finish them in a little over half the time. Workers are forked: they
inherit the models and data the parent holds, nothing is pickled but the job's index and its (small)
result, and each job runs exactly the code and seeds it would run in the parent, so the results are
the same as with one process.

Under ``torchrun`` (once the process group is joined, e.g. by
:func:`~aq_brevitas.train.finetune.init_distributed`) the same call also splits the jobs over the
ranks (dealt in their start order, back and forth), and the results are gathered with
``torch.distributed.all_gather_object`` so every rank returns all of them, in index order. The code
is the same on gloo (CPU) and nccl (GPUs), and on one process it does nothing else.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

T = TypeVar("T")

_JOB: Callable[[int], Any] | None = None  # set in the parent before the fork; inherited by the workers


def _run(index: int) -> Any:
    assert _JOB is not None
    return _JOB(index)


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def check_workers(workers: Any, flag: str = "workers") -> int:
    """``workers`` as a positive int, or :class:`ConfigError` naming ``flag``."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"{flag} must be an integer >= 1, got {workers!r}", f"pass {flag} 1 or 2")
    return workers


def distributed_rank() -> tuple[int, int]:
    """``(rank, world size)`` of the joined ``torch.distributed`` process group; ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(device: str | None, model: nn.Module | None = None) -> torch.device:
    """The device attacks run on. ``"auto"`` (the configs' default): the model's own device when it is
    on a GPU already, else this rank's GPU (``cuda:$LOCAL_RANK`` under ``torchrun``) when CUDA is
    available, else the CPU; None: the model's device (the CPU without a model); otherwise a torch
    device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``). Raises a one-line :class:`ConfigError` for a
    malformed device or a GPU this machine does not have.

    >>> import torch
    >>> str(resolve_device("cpu")), resolve_device("auto").type in ("cpu", "cuda")
    ('cpu', True)
    """
    import torch

    own = (
        next((t.device for t in (*model.parameters(), *model.buffers())), None) if model is not None else None
    )
    if device is None:
        return own or torch.device("cpu")
    if device == "auto":
        if own is not None and own.type == "cuda":
            return own
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        out = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {device!r} ({exc})", "pass auto, cpu, cuda or cuda:N") from None
    if out.type == "cuda" and (
        not torch.cuda.is_available() or (out.index or 0) >= torch.cuda.device_count()
    ):
        raise ConfigError(f"device {device!r} is not available on this machine", "pass device auto or cpu")
    if out.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} cannot run attacks here", "pass auto, cpu, cuda or cuda:N")
    return out


@contextmanager
def on_device(modules: Iterable[nn.Module | None], device: str | None) -> Iterator[torch.device]:
    """Until exit, every module of ``modules`` (None entries skipped) is on ``device``
    (:func:`resolve_device`, read from the first module); each goes back to the device its first
    parameter or buffer was on. Yields the device. Data stays where it is: the attack code moves each
    batch to the model's device.

    >>> from torch import nn
    >>> with on_device([nn.Linear(2, 2), None], "cpu") as where:
    ...     str(where)
    'cpu'
    """
    mods = [m for m in modules if m is not None]
    target = resolve_device(device, mods[0] if mods else None)
    with ExitStack() as stack:
        for m in mods:
            home = next((t.device for t in (*m.parameters(), *m.buffers())), None)
            if home is not None and home != target:
                m.to(target)
                stack.callback(m.to, home)
        yield target


def _dealt_to(position: int, world: int) -> int:
    """The rank the job at ``position`` of the start order goes to: dealt back and forth, so with the
    longest jobs first no rank takes the longest of every round."""
    lap, seat = divmod(position, world)
    return seat if lap % 2 == 0 else world - 1 - seat


def rank_share(count: int) -> int:
    """How many of ``count`` jobs :func:`run_jobs` runs on this rank (``count`` outside torchrun).

    >>> rank_share(5)
    5
    """
    rank, world = distributed_rank()
    return sum(_dealt_to(k, world) == rank for k in range(count))


def _gather(mine: dict[int, T]) -> dict[int, T]:
    """Every rank's ``{index: result}`` joined, on every rank."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":  # its object collectives run on this rank's own GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    parts: list[dict[int, T] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return {i: r for part in parts if part for i, r in part.items()}


def run_jobs(
    job: Callable[[int], T],
    count: int,
    workers: int = 1,
    *,
    done: Callable[[int], None] | None = None,
    order: Sequence[int] | None = None,
) -> list[T]:
    """``[job(0), ..., job(count - 1)]``, run on ``workers`` forked processes (1: in this process),
    and under ``torchrun`` split over the ranks (module docstring): every rank must call it with the
    same ``count``, and gets every result.

    ``order``: the indices in the order to start them, longest first where known: that balances the
    workers, and the ranks, to which they are dealt back and forth (0, 1, 1, 0, 0, ...); ``done``
    is called in this process with each index it finished (a progress bar). A job's exception is
    raised here. Results are returned by index, whatever order they finished in.

    >>> run_jobs(lambda i: i * i, 4, workers=2)
    [0, 1, 4, 9]
    """
    rank, world = distributed_rank()
    order = list(range(count) if order is None else order)
    order = [i for k, i in enumerate(order) if _dealt_to(k, world) == rank]
    results = _run_local(job, order, workers, done)
    if world > 1:
        results = _gather(results)
    return [results[i] for i in range(count)]


def _cuda_started() -> bool:
    """Whether this process has initialised CUDA: a forked child could not use it, so jobs then run
    here, one after another (spread GPU work over ``torchrun`` ranks instead)."""
    import sys

    return "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized()


def _run_local(
    job: Callable[[int], T], order: list[int], workers: int, done: Callable[[int], None] | None
) -> dict[int, T]:
    """``{i: job(i)}`` for the indices of ``order``, on ``workers`` forked processes."""
    global _JOB
    results: dict[int, T] = {}
    if (
        workers <= 1
        or len(order) <= 1
        or "fork" not in multiprocessing.get_all_start_methods()
        or _cuda_started()
    ):
        for i in order:
            results[i] = job(i)
            if done:
                done(i)
        return results
    _JOB = job
    try:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(
            min(workers, len(order)), mp_context=context, initializer=_one_thread
        ) as pool:
            futures = {pool.submit(_run, i): i for i in order}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                if done:
                    done(futures[future])
    finally:
        _JOB = None
    return results
