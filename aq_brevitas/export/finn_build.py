"""FINN's own front end, run in-process: finn-plus's builder steps through the estimate reports.

finn-plus (``pip install -e '.[finn]'``) is a maintained FINN fork on PyPI. Its builder steps
(``finn.builder.build_dataflow_steps.build_dataflow_step_lookup``) run here unchanged, one by one, up to
and including ``step_generate_estimate_reports`` (FINN's ``estimate_only_dataflow_steps``). After each
step up to the dataflow partition the model is executed in Python (``finn.core.onnx_exec.execute_onnx``;
after the partition the parent model runs the partition's child file) and compared with the QONNX
file's own output on the same input. After ``step_specialize_layers`` only FINN's cppsim/rtlsim could
execute the model, and both need Vitis HLS / Vivado, which are not here.

Two things FINN needs without Vivado (../shared/NOTES.md): ``finn.util.settings.initialize_dummy_settings``
with ``FINN_BUILD_DIR`` in a temporary directory, and ``finn.xsi.SimEngine = None`` before
``finn.builder.build_dataflow_steps`` is imported (that import otherwise raises ``OSError: XILINX_VIVADO
environment variable not set``). FINN's settings are process-global; the environment variables FINN
sets are restored after each run, and each run gets its own build directory.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata, util
from pathlib import Path
from typing import Any

import numpy as np

# finn-plus itself is not in the [finn] extra: its brevitas==0.13.0 pin would make pip replace torch.
FINN_INSTALL = "pip install -e '.[finn]' && pip install --no-deps finn-plus==1.6.1 (`make setup` does both)"
DEFAULT_FPGA_PART = "xczu3eg-sbva484-1-e"  # a ZCU104-class Zynq UltraScale+ part, as in FINN's examples
DEFAULT_TARGET_FPS = 10_000
CLOCK_NS = 10.0  # FINN's default synth_clk_period_ns (100 MHz)
PARTITION_STEP = "step_create_dataflow_partition"
# Op types that do work in hardware: one of these left outside the dataflow partition runs on the host.
COMPUTE_OPS = frozenset(
    {"Conv", "MatMul", "Gemm", "MultiThreshold", "MaxPool", "MaxPoolNHWC", "AveragePool", "GlobalAveragePool",
     "QuantAvgPool2d", "Im2Col", "BatchNormalization", "Relu", "XnorPopcountMatMul", "Concat", "Quant",
     "BipolarQuant", "Trunc"}
)  # fmt: skip
_FINN_ENV = ("FINN_BUILD_DIR", "FINN_DEPS", "FINN_DEPS_DEFINITIONS", "NUM_DEFAULT_WORKERS")


@dataclass
class FinnStep:
    """One FINN builder step: whether it ran, how long it took (s), and the Python-exec difference.

    ``max_diff`` is ``max |FINN model - QONNX file|`` on the logits after the step, ``None`` after the
    dataflow partition (nothing but cppsim/rtlsim executes there). ``message`` is FINN's own message
    when the step raised (or why the step failed), and ``log`` FINN's warnings and printed lines.
    """

    name: str
    passed: bool
    seconds: float
    max_diff: float | None = None
    message: str = ""
    log: list[str] = field(default_factory=list)


@dataclass
class FinnEstimates:
    """FINN's estimate reports: per-layer LUT/BRAM_18K/URAM/DSP, cycles, and the network's throughput.

    ``layers`` maps FINN's hardware node names (``MVAU_hls_0``...) to its resource estimate;
    ``throughput_fps`` is FINN's ``estimated_throughput_fps`` at the ``clock_ns`` clock, ``bottleneck``
    the slowest node. ``files`` holds FINN's JSON report files by name, as FINN wrote them.
    """

    layers: dict[str, dict[str, float]]
    total: dict[str, float]
    cycles: dict[str, int]
    throughput_fps: float
    latency_ns: float
    bottleneck: str
    fpga_part: str
    target_fps: int | None
    clock_ns: float
    files: dict[str, Any]


@dataclass
class FinnRun:
    """What running FINN's front end found: its steps, the partition, the estimates."""

    version: str
    steps: list[FinnStep]
    allowed_diff: float
    partitions: int | None = None
    outside_partition: list[str] = field(default_factory=list)
    estimates: FinnEstimates | None = None
    # max |FINN's streamlined model - the PyTorch model| on the same input, when the model was given
    streamlined_vs_model: float | None = None

    @property
    def compute_outside(self) -> list[str]:
        """Nodes outside the dataflow partition that do work in hardware (:data:`COMPUTE_OPS`)."""
        return [n for n in self.outside_partition if n.split(" ", 1)[0] in COMPUTE_OPS]


def finn_available() -> bool:
    """Whether finn-plus is installed (``import finn.builder`` would find it)."""
    return util.find_spec("finn") is not None and util.find_spec("finn.builder") is not None


def finn_version() -> str:
    return metadata.version("finn-plus")


@contextlib.contextmanager
def _finn_session(build_dir: str) -> Iterator[dict[str, Any]]:
    """FINN's globals set for a CPU-only run in ``build_dir``; FINN's environment variables restored after."""
    saved = {k: os.environ.get(k) for k in _FINN_ENV}
    os.environ["FINN_BUILD_DIR"] = build_dir
    try:
        import finn.util.settings as finn_settings
        import finn.xsi

        finn_settings.initialize_dummy_settings()
        finn.xsi.SimEngine = None  # no Vivado: build_dataflow_steps must not look for XSI
        from finn.builder import build_dataflow_config as cfg_mod
        from finn.builder.build_dataflow_steps import build_dataflow_step_lookup
        from finn.core.onnx_exec import execute_onnx

        yield {"lookup": build_dataflow_step_lookup, "cfg": cfg_mod, "execute": execute_onnx}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def _captured() -> Iterator[_LogCapture]:
    """FINN's printed lines, its logger's warnings and qonnx's Python warnings kept off the console."""
    log = logging.getLogger("finn_logger")
    handler, propagate = _LogCapture(), log.propagate
    log.addHandler(handler)
    log.propagate = False
    out = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            warnings.simplefilter("ignore")
            yield handler
    finally:
        log.removeHandler(handler)
        log.propagate = propagate
        handler.lines += [ln.strip() for ln in out.getvalue().splitlines() if ln.strip()]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {text}"


def _run_model(execute: Any, mw: Any, x: np.ndarray) -> np.ndarray:
    out = execute(mw, {mw.graph.input[0].name: x})
    return np.asarray(out[mw.graph.output[0].name], dtype=np.float64)


def _diff(got: np.ndarray, ref: np.ndarray) -> float:
    if got.size != ref.size:
        return float("inf")
    return float(np.max(np.abs(got.reshape(-1) - ref.reshape(-1))))


def _build_config(cfg_mod: Any, out_dir: str, fpga_part: str, target_fps: int | None) -> Any:
    return cfg_mod.DataflowBuildConfig(
        output_dir=out_dir,
        synth_clk_period_ns=CLOCK_NS,
        fpga_part=fpga_part,
        target_fps=target_fps,
        generate_outputs=[cfg_mod.DataflowOutputType.ESTIMATE_REPORTS],
    )


def run_finn_steps(
    path: str | os.PathLike[str],
    x: np.ndarray,
    *,
    tol: float = 1e-5,
    fpga_part: str = DEFAULT_FPGA_PART,
    target_fps: int | None = DEFAULT_TARGET_FPS,
    progress: bool = False,
    model_output: np.ndarray | None = None,
) -> FinnRun:
    """Run FINN's ``estimate_only_dataflow_steps`` on the QONNX file at ``path``, in this process.

    ``x`` is one input batch (numpy, the graph's input shape). The QONNX file's own output on ``x``
    (qonnx ``execute_onnx``) is the reference; a step passes when FINN does not raise and, up to the
    dataflow partition, ``max |FINN - QONNX| <= tol * max(1, max |QONNX output|)``. A step that raises
    stops the run; its :class:`FinnStep` holds FINN's message in one line. Needs finn-plus
    (:func:`finn_available`); a ``tqdm`` bar over the steps when ``progress``. With ``model_output``
    (the PyTorch model's output on ``x``), the streamlined model's Python execution is compared with it
    too (:attr:`FinnRun.streamlined_vs_model`).
    """
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from tqdm.auto import tqdm

    with tempfile.TemporaryDirectory(prefix="aq-finn-") as tmp:
        with _captured():
            ref = _run_model(execute_onnx, ModelWrapper(str(path)), x)
        run = FinnRun(finn_version(), [], tol * max(1.0, float(np.max(np.abs(ref)))))
        out_dir = os.path.join(tmp, "out")
        with contextlib.ExitStack() as session:
            with _captured():  # importing FINN prints and warns
                finn = session.enter_context(_finn_session(os.path.join(tmp, "build")))
                cfg = _build_config(finn["cfg"], out_dir, fpga_part, target_fps)
            names = list(finn["cfg"].estimate_only_dataflow_steps)
            last_exec = names.index(PARTITION_STEP)
            model = ModelWrapper(str(path))
            bar = tqdm(names, desc="FINN steps", disable=not progress, leave=False)
            for i, name in enumerate(bar):
                bar.set_postfix_str(name.removeprefix("step_"))
                with _captured() as cap:
                    model, step = _one_step(finn, name, model, cfg, x, ref, run, executable=i <= last_exec)
                step.log = cap.lines
                run.steps.append(step)
                if name == "step_streamline" and model is not None and model_output is not None:
                    with _captured():
                        run.streamlined_vs_model = _diff(_run_model(finn["execute"], model, x), model_output)
                if model is None:
                    break
            bar.close()
        if run.steps and run.steps[-1].passed and run.steps[-1].name == names[-1]:
            run.estimates = _read_estimates(Path(out_dir) / "report", fpga_part, target_fps)
    return run


def _one_step(
    finn: dict[str, Any],
    name: str,
    model: Any,
    cfg: Any,
    x: np.ndarray,
    ref: np.ndarray,
    run: FinnRun,
    *,
    executable: bool,
) -> tuple[Any, FinnStep]:
    """One builder step, timed; the Python-exec difference when the model can still run in Python.
    Returns ``(None, step)`` when FINN raised."""
    t0 = time.perf_counter()
    try:
        model = finn["lookup"][name](model, cfg)
    except Exception as exc:  # FINN's message is the result: FINNUserError, AssertionError, KeyError...
        return None, FinnStep(name, False, time.perf_counter() - t0, message=_one_line(exc))
    seconds = time.perf_counter() - t0
    if not executable:
        return model, FinnStep(name, True, seconds)
    runnable = model
    if name == PARTITION_STEP:
        runnable = _partition_parent(cfg, run)
    try:
        d = _diff(_run_model(finn["execute"], runnable, x), ref)
    except Exception as exc:
        return model, FinnStep(name, False, seconds, message=f"Python execution failed: {_one_line(exc)}")
    ok = d <= run.allowed_diff
    why = "" if ok else f"max |FINN - QONNX| = {d:.3g} > allowed {run.allowed_diff:.3g}"
    return model, FinnStep(name, ok, seconds, max_diff=d, message=why)


def _partition_parent(cfg: Any, run: FinnRun) -> Any:
    """The parent model FINN saved at the partition step; records the partitions and what stayed out."""
    from qonnx.core.modelwrapper import ModelWrapper

    parent = ModelWrapper(str(Path(cfg.get_intermediate_models_directory()) / "dataflow_parent.onnx"))
    nodes = parent.graph.node
    run.partitions = sum(n.op_type == "StreamingDataflowPartition" for n in nodes)
    run.outside_partition = [
        f"{n.op_type} {n.name}" for n in nodes if n.op_type != "StreamingDataflowPartition"
    ]
    return parent


def _read_estimates(report: Path, fpga_part: str, target_fps: int | None) -> FinnEstimates:
    files = {p.name: json.loads(p.read_text()) for p in sorted(report.glob("*.json"))}
    res = dict(files.get("estimate_layer_resources.json", {}))
    total = res.pop("total", {})
    perf = files.get("estimate_network_performance.json", {})
    keep = ("LUT", "BRAM_18K", "URAM", "DSP")
    return FinnEstimates(
        layers={n: {k: r[k] for k in keep if k in r} for n, r in res.items()},
        total={k: total[k] for k in keep if k in total},
        cycles={k: int(v) for k, v in files.get("estimate_layer_cycles.json", {}).items()},
        throughput_fps=float(perf.get("estimated_throughput_fps", float("nan"))),
        latency_ns=float(perf.get("estimated_latency_ns", float("nan"))),
        bottleneck=str(perf.get("max_cycles_node_name", "")),
        fpga_part=fpga_part,
        target_fps=target_fps,
        clock_ns=CLOCK_NS,
        files=files,
    )


def run_summary(run: FinnRun) -> list[str]:
    """Markdown lines: FINN's steps (time, Python-exec difference, message), the partition, the estimates."""
    lines = [
        f"FINN (finn-plus {run.version}): builder steps run in-process; Python-exec difference allowed "
        f"{run.allowed_diff:.3g}",
        "",
        "| step | result | time (s) | max diff | FINN's message |",
        "|---|---|---:|---:|---|",
    ]
    for s in run.steps:
        diff = "-" if s.max_diff is None else f"{s.max_diff:.3g}"
        lines.append(
            f"| {s.name} | {'ok' if s.passed else 'FAIL'} | {s.seconds:.2f} | {diff} | {s.message} |"
        )
    if run.streamlined_vs_model is not None:
        lines += ["", f"Streamlined model vs the PyTorch model: max diff {run.streamlined_vs_model:.3g}"]
    if run.partitions is not None:
        outside = ", ".join(run.outside_partition) or "nothing"
        lines += ["", f"Dataflow partitions: {run.partitions}; outside the partition: {outside}"]
    e = run.estimates
    if e is not None:
        lines += [
            "",
            f"FINN estimates ({e.fpga_part}, {1e3 / e.clock_ns:.0f} MHz, target {e.target_fps} FPS): "
            f"{e.throughput_fps:,.0f} FPS, latency {e.latency_ns / 1e3:,.1f} us, bottleneck {e.bottleneck}",
            "",
            "| layer | LUT | BRAM_18K | URAM | DSP | cycles |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, r in [*e.layers.items(), ("total", e.total)]:
            cells = " | ".join(f"{r.get(k, 0):,.0f}" for k in ("LUT", "BRAM_18K", "URAM", "DSP"))
            lines.append(f"| {name} | {cells} | {e.cycles.get(name, '')} |")
    return lines
