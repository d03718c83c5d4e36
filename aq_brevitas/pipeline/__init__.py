"""The whole job as resumable stages: score → search → quantize → fine-tune → evaluate → export → report.

It runs on the user's model and data (:class:`~aq_brevitas.pipeline.data.RunData`: tensors, a Dataset or
DataLoader, or a directory of IDX files of any sample shape; Fashion-MNIST by default); every stage
reads the draws :func:`~aq_brevitas.pipeline.data.prepare_data` makes from it. A model that expects
normalised inputs gets ``RunConfig.normalization=(mean, std)``: every stage feeds it
``(x - mean) / std`` while data and ε stay in [0, 1].

Each stage is one function over a :class:`~aq_brevitas.pipeline.context.RunContext`. It writes its outputs atomically into
``out/`` and records in ``out/stages.json`` the settings and input files it used plus a digest of
each output. The next run skips a stage only when its recorded settings and inputs are the current
ones (the model's weights and a digest of the data it reads included) and its outputs are still
byte-identical; otherwise it says why and redoes it (a redone stage rewrites its outputs, so the
stages that read them are redone too). ``force=True`` redoes everything. The same stages run for the
searched policy and for the best uniform policy of the same budget, so the report compares them on
the same data. Quantized models are saved and loaded with :func:`~aq_brevitas.save_quantized` /
:func:`~aq_brevitas.load_quantized`; the summary and the report are :mod:`~aq_brevitas.pipeline.report`'s.

Importing this package does not import torch, so the CLI can build ``aq-brevitas run``'s options
from :class:`RunConfig`.

(The folder is not called ``run`` because :func:`aq_brevitas.run` is a public function.)

=============  ====================================================================================
module         holds
=============  ====================================================================================
``stagelog``   ``out/stages.json``: what each stage used and wrote, and whether it can be skipped
``config``     :class:`RunConfig`, :data:`STAGES`, :func:`check_config` (torch-free)
``data``       :class:`RunData` and the draws :func:`prepare_data` makes from it
``context``    :class:`RunContext`: what the stages share; the model variants reported
``rows``       :class:`SummaryRow` (+ :class:`ParityRow`, :class:`FinnRow`): one model of the summary
``report``     the summary rows, the summary table and ``report.md``
``stages``     one function per stage
``job``        :func:`run` -> :class:`RunResult`
=============  ====================================================================================
"""

from __future__ import annotations

from .config import RUN_METHODS, STAGES, RunConfig, check_config, flag_of
from .context import RunContext
from .data import RunData
from .job import RunResult, run
from .rows import FinnRow, ParityRow, SummaryRow

__all__ = [
    "RUN_METHODS",
    "STAGES",
    "FinnRow",
    "ParityRow",
    "RunConfig",
    "RunContext",
    "RunData",
    "RunResult",
    "SummaryRow",
    "check_config",
    "flag_of",
    "run",
]
