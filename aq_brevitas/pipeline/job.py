"""The whole job in one call: :func:`run` chains the stages of :mod:`.stages` and returns a :class:`RunResult`."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..storage import atomic_write_json
from ..texttable import text_table
from .config import RunConfig
from .context import RunContext, make_context
from .data import RunData
from .report import finn_lines, report, summary_rows
from .rows import SummaryRow
from .stages import evaluate, export, finetune, quantize, score, search

if TYPE_CHECKING:
    from torch import nn


@dataclass
class RunResult:
    """What :func:`run` returns: the folder written (``out``), one :class:`~aq_brevitas.pipeline.rows.SummaryRow`
    per model (float, uniform, aq-brevitas), the stages skipped as done, and the wall time in seconds."""

    out: str
    rows: list[SummaryRow] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary_table(self) -> str:
        """The rows as a plain-text table whose columns are as wide as their longest cell: ``robust`` is
        the per-image worst case over the attack suite (the figure to trust), ``PGD`` PGD alone; each
        model's failed masking checks and attack-failure indicators follow as warning lines."""
        head = ("model", "avg bits", "weight KiB", "clean", "robust", "PGD", "export parity")
        cells = [
            (r.name, f"{r.avg_bits:.2f}", f"{r.kib:.1f}", f"{r.clean:.4f}",
             f"{r.robust:.4f}" + (" (!)" if r.warnings else ""), f"{r.pgd:.4f}",
             "-" if r.parity is None else f"{r.parity.max_abs_diff:.1e}")
            for r in self.rows
        ]  # fmt: skip
        warn = [f"warning: {r.name}: {w}" for r in self.rows for w in r.warnings]
        return "\n".join([text_table(head, cells), *warn, *finn_lines(self.rows)])


def _run_stages(
    model: nn.Module | str, out: Path, config: RunConfig, data: Any, force: bool, progress: bool
) -> tuple[RunContext, RunResult]:
    """Every stage over one context, then the summary rows and the report. The user's model is run in
    eval mode and given back in the mode(s) it came in."""
    from contextlib import nullcontext

    from torch import nn

    from ..forward import eval_mode

    with eval_mode(model) if isinstance(model, nn.Module) else nullcontext():
        ctx = make_context(model, out, config, data, force, progress)
        for stage in (score, search, quantize, finetune, evaluate, export):
            stage(ctx)
        result = RunResult(str(ctx.out), summary_rows(ctx))
        report(ctx, result.rows)
    return ctx, result


def run(
    model: nn.Module | str,
    out: str | os.PathLike[str],
    config: RunConfig | None = None,
    *,
    data: RunData | str | os.PathLike[str] | None = None,
    force: bool = False,
    progress: bool = True,
) -> RunResult:
    """Run (or resume) the whole job for ``model`` (an nn.Module, a zoo name or a float checkpoint).

    ``data``: the model's own data, a :class:`~aq_brevitas.pipeline.data.RunData` (``train``, ``test`` and
    optionally ``held_out``: ``(x, y)`` tensors, Datasets or DataLoaders of any sample shape, values
    in [0, 1]) or a directory of IDX files; None reads ``config.data_dir`` (Fashion-MNIST by default).
    Every stage reads it in the model's input shape: scores, the search's calibration and held-out
    comparison (from the held-out data, else from the training data; never the test data), fine-tuning
    (the training data), evaluation and the export (the test data). A model that expects normalised
    inputs gets ``config.normalization=(mean, std)``; ε stays in [0, 1] input space.

    Every setting, the model and the data are checked before ``out`` is touched, so a bad setting
    (:class:`ConfigError`, :class:`~aq_brevitas.errors.PolicyError` for the budget), a bad model
    (:class:`ModelError`, :class:`~aq_brevitas.errors.CheckpointError`: also a forward that refuses
    the data, or a model with several inputs), or bad data (:class:`ConfigError` for its kind,
    lengths or range; :class:`~aq_brevitas.errors.DataError` for missing files, samples of different
    shapes, labels beyond the model's classes) costs nothing and leaves an existing run folder as it
    was. Re-running with the same ``out`` skips the stages whose settings, inputs and outputs are
    unchanged (see :mod:`aq_brevitas.pipeline`); ``force=True`` redoes every stage, fine-tuning included,
    from scratch. Returns the :class:`RunResult`; ``out/report.md`` and ``out/report.json`` hold the
    full report.

    >>> import torch
    >>> from torch import nn
    >>> from aq_brevitas.pipeline import RunConfig, RunData, run
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14, 3))
    >>> x, y = torch.rand(40, 2, 16), torch.randint(0, 3, (40,))  # 40 signals of 2×16, 3 classes
    >>> tiny = RunConfig(calib_images=4, val_images=4, finetune_images=8, finetune_steps=1,
    ...                  test_images=4, pgd_steps=1, eval_eps=(0.1,))
    >>> data = RunData(train=(x[:32], y[:32]), test=(x[32:], y[32:]))
    >>> result = run(model, "signals", tiny, data=data, progress=False)
    [score] ...
    [search] ...
    [quantize] ...
    [finetune] ...
    [evaluate] ...
    [export] ...
    [report] ...
    >>> [row.name for row in result.rows]
    ['float', 'uniform (avg-bits=3)', 'aq-brevitas (avg-bits=3)']
    """
    t_start = time.perf_counter()
    ctx, result = _run_stages(model, Path(out), config or RunConfig(), data, force, progress)
    # Written last, so a run that fails leaves the previous run's config.json in place.
    atomic_write_json(ctx.out / "config.json", {"model": ctx.name, **asdict(ctx.cfg)})
    result.skipped = ctx.log.skipped
    result.seconds = time.perf_counter() - t_start
    return result
