"""FINN readiness of a QONNX file: fast static checks, and FINN's own front end when finn-plus is here.

:func:`finn_check` returns a :class:`FinnReport`. Its static checks (:class:`FinnCheck`, iterating the
report yields them) are read from FINN's sources and never pass a file FINN's front end rejects; with
finn-plus installed (``pip install -e '.[finn]'``) FINN's builder steps also run, in-process
(:mod:`.finn_build`), through the estimate reports.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ..errors import ConfigError
from .finn_build import (
    DEFAULT_FPGA_PART,
    DEFAULT_TARGET_FPS,
    FINN_INSTALL,
    FinnEstimates,
    FinnRun,
    FinnStep,
    finn_available,
    run_finn_steps,
    run_summary,
)
from .finn_checks import (
    FinnCheck,
    FinnGraph,
    dataflow_checks,
    input_check,
    op_type_check,
    po2_check,
    quant_node_checks,
)
from .graph import load_qonnx, map_layers


@dataclass
class FinnReport:
    """What :func:`finn_check` found: the static checks, and FINN's own front end when it ran.

    Iterating yields the static :class:`FinnCheck` list (``for c in finn_check(p)`` keeps working).
    ``finn`` is ``None`` when FINN did not run (``finn_skipped`` says why); otherwise it holds FINN's
    steps with FINN's own messages, the Python-exec difference per step (``allowed_diff`` is
    ``1e-5 x max(1, max |logit|)``), the nodes left outside the dataflow partition and FINN's estimates.
    """

    path: str
    checks: list[FinnCheck]
    finn: FinnRun | None = None
    finn_skipped: str = ""
    notes: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[FinnCheck]:
        return iter(self.checks)

    def __len__(self) -> int:
        return len(self.checks)

    def __getitem__(self, i: int) -> FinnCheck:
        return self.checks[i]

    @property
    def static_passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed_step(self) -> FinnStep | None:
        """FINN's first failing step (it raised, or its output differs from the QONNX file's)."""
        return next((s for s in self.finn.steps if not s.passed), None) if self.finn else None

    @property
    def finn_passed(self) -> bool | None:
        """``None`` when FINN did not run; else every step ran and passed, with ONE dataflow partition
        holding every compute node."""
        if self.finn is None:
            return None
        run = self.finn
        done = run.estimates is not None and all(s.passed for s in run.steps)
        return done and run.partitions == 1 and not run.compute_outside

    @property
    def passed(self) -> bool:
        return self.static_passed and self.finn_passed is not False

    @property
    def estimates(self) -> FinnEstimates | None:
        return self.finn.estimates if self.finn else None

    def failure(self) -> str:
        """One line on why the file is not FINN-ready ("" when it is)."""
        bad = [f"{c.name}: {c.detail}" for c in self.checks if not c.passed]
        step = self.failed_step
        if step is not None:
            bad.append(f"FINN {step.name}: {step.message}")
        elif self.finn is not None and self.finn_passed is False:
            bad.append(
                f"FINN: {self.finn.partitions} dataflow partition(s), compute nodes outside: "
                f"{', '.join(self.finn.compute_outside) or 'none'}"
            )
        return "; ".join(bad)

    def to_markdown(self) -> str:
        """The static checks, then FINN's steps, partition and estimates (when FINN ran)."""
        lines = [f"# FINN report for {os.path.basename(self.path)}", "", "| static check | result | detail |"]
        lines += ["|---|---|---|"] + [
            f"| {c.name} | {'ok' if c.passed else 'FAIL'} | {c.detail} |" for c in self
        ]
        lines += [""] + (run_summary(self.finn) if self.finn else [f"FINN not run: {self.finn_skipped}"])
        verdict = "FINN-ready" if self.passed else f"NOT FINN-ready: {self.failure()}"
        return "\n".join([*lines, "", verdict, ""])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.finn is not None and self.finn.estimates is not None:
            d["finn"]["estimates"].pop("files")  # written as FINN's own files beside this one
        return {
            **d,
            "passed": self.passed,
            "static_passed": self.static_passed,
            "finn_passed": self.finn_passed,
        }

    def write(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``summary.md``, ``finn_report.json`` and FINN's estimate JSON files into ``directory``,
        atomically (built beside it, then renamed into place; an old one is replaced)."""
        files = {"summary.md": self.to_markdown(), "finn_report.json": json.dumps(self.to_dict(), indent=2)}
        if self.estimates is not None:
            files.update({k: json.dumps(v, indent=2) for k, v in self.estimates.files.items()})
        return _write_dir(Path(directory), files)


def _write_dir(final: Path, files: dict[str, str]) -> Path:
    parent = final.parent if str(final.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"output directory {parent} of {final} does not exist", "create it first")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=parent))
    old = None
    try:
        for name, text in files.items():
            (tmp / name).write_text(text + ("" if text.endswith("\n") else "\n"))
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=parent))
            final.rename(old / final.name)
        tmp.rename(final)
    except OSError as exc:
        raise ConfigError(
            f"could not write {final}: {exc.strerror or exc}", "choose another output location"
        ) from None
    finally:
        for d in (tmp, old):
            if d is not None and d.exists():
                shutil.rmtree(d, ignore_errors=True)
    return final


def finn_check(
    path: str | os.PathLike[str],
    policy: Any = None,
    model: nn.Module | None = None,
    *,
    run_finn: bool | None = None,
    inputs: Any = None,
    target_fps: int | None = DEFAULT_TARGET_FPS,
    fpga_part: str = DEFAULT_FPGA_PART,
    progress: bool = False,
) -> FinnReport:
    """Check a QONNX file for FINN: fast static checks, then FINN's own front end if finn-plus is here.

    Static checks (each a :class:`FinnCheck`): only FINN-supported op types; every activation/weight
    Quant has an integer bit width in 2..8 (bias Quants, e.g. Brevitas ``Int32Bias``, are folded into
    constants by FINN and not checked); zero-points are 0; the graph input is quantized; every
    Conv/MatMul/Gemm data input comes from a Quant/BipolarQuant or FINN's averaging unit
    (``AveragePool -> [Mul ->] Trunc``), through value-copying ops only
    (:data:`~aq_brevitas.quantization.value_ops.VALUE_COPYING_OPS`); every Relu/Selu feeds a Quant
    directly (FINN folds only adjacent Relu+Quant into a MultiThreshold); no float op stranded between
    FINN layers (after a matrix layer: only what FINN absorbs into thresholds; after a quantizer: also
    value-copying ops, adds/concatenations of quantized inputs and FINN's averaging unit, never a float
    ``GlobalAveragePool``); no activation quantizer read by several ops (FINN's default streamlining
    moves a scale only where it has one consumer); and each layer whose spec asks for ``po2`` has
    power-of-two weight scales (needs ``model``; without ``policy``, the policy its quantizers say it
    runs, :func:`~aq_brevitas.quantization.readback.read_policy`). Failures name the nodes and, with
    ``model``, the layers.

    FINN (``run_finn=None``: when finn-plus is importable; ``True`` requires it): finn-plus's builder
    steps through ``step_generate_estimate_reports`` in this process (:func:`.finn_build.run_finn_steps`)
    on ``inputs`` (one batch, the graph's input shape; default: uniform [0, 1) noise, seed 0), at
    ``target_fps`` (frames/s; ``None`` leaves FINN's folding alone) on ``fpga_part``. 3-20 s per small
    model plus a few seconds to import FINN; ``progress`` shows a tqdm bar over the steps. With ``model``,
    FINN's streamlined model is also run against the model itself (``report.finn.streamlined_vs_model``).

    Raises :class:`ConfigError` for a missing file, for ``run_finn=True`` without finn-plus, or for a
    po2 policy without ``model``; :class:`ModelError` for a file that is not ONNX. FINN raising is not
    an exception here: the report's failed step holds FINN's message in one line.

    >>> import torch
    >>> from aq_brevitas import LayerSpec, LayerwisePolicy, build_model, export_qonnx, finn_check, quantize
    >>> _ = torch.manual_seed(0)
    >>> q = quantize(build_model("small_cnn"), LayerwisePolicy(default=LayerSpec(4)))  # weight-only
    >>> _ = export_qonnx(q, "w4.onnx", torch.rand(1, 1, 28, 28))
    >>> report = finn_check("w4.onnx", run_finn=False)
    >>> report.passed, [c.name for c in report if not c.passed]
    (False, ['input_quantized', 'matrix_inputs_quantized', 'relu_feeds_quant', 'no_stranded_float_ops'])
    """
    mw = load_qonnx(path)
    layer_of: dict[str, str] = {}
    if model is not None:  # names only: a node that cannot be mapped is named by itself
        layer_of = {gl.node: n for n, gl in map_layers(mw.model, model, "qonnx").layers.items()}
    g = FinnGraph(mw, layer_of)
    checks = [op_type_check(mw), *quant_node_checks(g), input_check(g), *dataflow_checks(g)]
    checks += _po2_checks(mw, policy, model)
    report = FinnReport(str(path), checks)
    _run_finn(
        report,
        mw,
        model,
        run_finn,
        inputs,
        dict(target_fps=target_fps, fpga_part=fpga_part, progress=progress),
    )
    return report


def _run_finn(
    report: FinnReport, mw: Any, model: nn.Module | None, run_finn: bool | None, inputs: Any, options: dict
) -> None:
    """FINN's steps into ``report.finn``, or why they did not run into ``report.finn_skipped``."""
    if run_finn is False:
        report.finn_skipped = "not asked for (run_finn=False)"
    elif not finn_available():
        if run_finn:
            raise ConfigError(
                "running FINN needs finn-plus, which is not installed",
                "pip install -e '.[finn]' && pip install --no-deps finn-plus==1.6.1 (`make setup` does both)",
            )
        report.finn_skipped = f"finn-plus is not installed: {FINN_INSTALL}"
    else:
        x = _finn_input(mw, inputs)
        report.finn = run_finn_steps(report.path, x, model_output=_model_output(model, x), **options)


def _po2_checks(mw: Any, policy: Any, model: nn.Module | None) -> list[Any]:
    """The po2 check of ``policy``, or of the policy ``model``'s quantizers say it runs; none without either."""
    if policy is None and model is not None:
        from ..quantization.readback import read_policy

        policy = read_policy(model)
    return [po2_check(mw, policy, model)] if policy is not None else []


def _model_output(model: nn.Module | None, x: np.ndarray) -> np.ndarray | None:
    """The model's output on ``x`` (numpy), to compare FINN's streamlined model with; None without a
    model or for a model whose forward does not take one tensor and return one."""
    if model is None:
        return None
    import torch

    try:
        with torch.no_grad():
            out = model(torch.from_numpy(x))
    except Exception:  # a model of several inputs: FINN is still compared with the QONNX file
        return None
    return out.detach().cpu().numpy().astype(np.float64) if isinstance(out, torch.Tensor) else None


def _finn_input(mw: Any, inputs: Any) -> np.ndarray:
    if inputs is not None:
        x = inputs.detach().cpu().numpy() if hasattr(inputs, "detach") else np.asarray(inputs)
        return x.astype(np.float32)
    shape = [int(getattr(d, "dim_value", 0)) or 1 for d in mw.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(0).random(shape, dtype=np.float32)
