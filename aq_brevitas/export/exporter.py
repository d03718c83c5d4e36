"""Running torch's ONNX exporter through Brevitas: the model and input checks, a scratch directory,
failures as one line (the op, where the model calls it, the fix), and ``onnx.checker`` on the result.

A model torch's exporter cannot export fails with one :class:`ModelError` line, not torch's
TorchScript graph dump.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from ..errors import AqError, ConfigError, ModelError
from ..forward import require_single_input

# Ops whose failure has a known fix: adaptive pools export only when the output size divides the input.
ADAPTIVE_POOLS = frozenset(
    {"adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_max_pool1d", "adaptive_max_pool2d"}
)
# Where torch's exporter messages stop saying what failed and start a boilerplate or a graph excerpt.
_EXPORTER_NOISE = re.compile(r"\s+(Please feel free to request support|\[Caused by)")


def check_model(model: nn.Module, what: str = "export") -> None:
    """Raise :class:`ModelError` unless ``model`` is a single-input ``nn.Module`` with Brevitas
    quantized layers (``what`` names the export in the message)."""
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer as QuantWBIOL

    if not isinstance(model, nn.Module):
        raise ModelError(
            f"cannot export a {type(model).__name__}", "pass the nn.Module returned by aq_brevitas.quantize"
        )
    if not any(isinstance(m, QuantWBIOL) for m in model.modules()):
        raise ModelError(
            "model has no Brevitas quantized layers to export",
            "quantize it first: aq_brevitas.quantize(model, policy)",
        )
    require_single_input(model, what)


def check_example_input(x: Any) -> torch.Tensor:
    """``x[:1]`` detached, for a float tensor ``x`` with a batch dimension; else :class:`ConfigError`."""
    if not torch.is_tensor(x) or not torch.is_floating_point(x) or x.dim() < 2:
        got = f"a {x.dtype} tensor of shape {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
        raise ConfigError(
            f"example input must be a float tensor with a batch dimension, got {got}",
            "pass one batch-first example, e.g. x[:1] (shape 1 x ...), or x[None] for a single sample",
        )
    return x[:1].detach()


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    """A temporary directory for the raw exported file, removed on exit whatever happens."""
    with tempfile.TemporaryDirectory(prefix="aq-export-") as d:
        yield Path(d)


def onnx_check(model_proto: Any) -> None:
    """``onnx.checker`` on what is about to be written (QONNX custom ops live in their own domain)."""
    import onnx

    try:
        onnx.checker.check_model(model_proto)
    except onnx.checker.ValidationError as exc:
        raise ModelError(
            f"exported graph fails onnx.checker ({str(exc).splitlines()[0][:120]})", "report this model"
        ) from None


def run_exporter(
    fmt: str, export: Callable[..., object], model: nn.Module, x: torch.Tensor, path: Path, opset: int
) -> None:
    """Brevitas ``export`` (export_qonnx or export_onnx_qcdq) to ``path`` on torch's TorchScript exporter.

    What the exporter prints is passed on when it succeeds; a failure becomes one :class:`ModelError`
    line (see :func:`_raise_exporter_failure`) and its graph dump is dropped.
    """
    failure: Exception | None = None
    with _native_stdout_captured() as dump:
        try:
            export(model, args=x, export_path=str(path), dynamo=False, opset_version=opset)
        except AqError:
            raise
        except Exception as exc:  # the boundary: whatever torch.onnx or Brevitas raise while tracing
            failure = exc
    if failure is None:
        sys.stdout.write("".join(dump))
        return
    _raise_exporter_failure(fmt, opset, failure, "".join(dump))


@contextlib.contextmanager
def _native_stdout_captured() -> Iterator[list[str]]:
    """Send the process's stdout file descriptor to a temporary file; the yielded list gets its text.

    torch 2.13's TorchScript exporter dumps the whole TorchScript graph through C++ ``std::cout``
    when an export fails (its ``setup_onnx_logging`` tests the function ``_jit_is_onnx_log_enabled``
    instead of calling it, so the log is on for every export); ``contextlib.redirect_stdout`` cannot
    catch a C++ stream, and the C library buffers it, so it is flushed before the descriptor returns.
    """
    captured: list[str] = []
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no stdout descriptor (embedded interpreters): capture nothing
        yield captured
        return
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield captured
        finally:
            sys.stdout.flush()
            _flush_c_stdio()
            os.dup2(saved, 1)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode(errors="replace"))


def _flush_c_stdio() -> None:
    """``fflush(NULL)``: write out what C code (std::cout synced with stdio) still buffers."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError, TypeError):  # no C library to load: nothing to flush
        ctypes.CDLL(None).fflush(None)


def _raise_exporter_failure(fmt: str, opset: int, exc: Exception, dump: str) -> NoReturn:
    """One line from an exporter failure: the op, where the model calls it (from the graph dump), the fix.

    The first line of torch's message is kept, without its boilerplate and graph excerpt; the graph
    dump (``dump``) gives the module and source line that call the op.
    """
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    reason = _EXPORTER_NOISE.split(lines[0] if lines else type(exc).__name__)[0].strip()
    found = re.search(r"operator '?(?:aten::)?(\w+)'?", reason)
    op = found.group(1) if found else None
    if op:  # "Unsupported: ONNX export of operator adaptive_avg_pool2d, output size that ...": keep the why
        reason = re.sub(rf"^Unsupported: ONNX export of operator {op},\s*", "", reason)
    reason = reason[:200]
    what = f"{op}{_call_site(dump, op)}" if op else "the model"
    if op in ADAPTIVE_POOLS:
        raise ModelError(
            f"{fmt} export: torch.onnx cannot export {what}: {reason}",
            "use an output size that divides the feature map (1 always does), or a fixed-size "
            f"nn.AvgPool{op[-2:]}/nn.MaxPool{op[-2:]}",
        ) from exc
    if op and "attention" in op:  # MultiheadAttention's fused kernel: no opset exports it as QONNX/FINN
        raise ModelError(
            f"{fmt} export: torch.onnx cannot export {what}: {reason}",
            "attention has no QONNX/FINN mapping at any opset (FINN builds no attention): export the part of "
            "the model without nn.MultiheadAttention, or the float model with torch.onnx itself",
        ) from exc
    raise ModelError(
        f"{fmt} export: torch.onnx cannot export {what}: {reason}",
        f"replace that op by one torch.onnx exports at opset {opset}, or pass another opset",
    ) from exc


def _call_site(dump: str, op: str) -> str:
    """`` (in conv1 (QuantConv2d), net.py:17)``: where the TorchScript graph dump calls ``aten::op``."""
    found = re.search(rf"aten::{op}\(.*?, scope: (\S*)(?: # (\S+):(\d+):\d+)?", dump)
    if found is None:
        return ""
    scope, src, line = found.groups()
    parts = [p.split("::", 1) for p in scope.split("/") if "::" in p]  # "pkg.Class::name" per module
    names = [name for _, name in parts[1:] if name]
    module = f"{'.'.join(names)} ({parts[-1][0].rsplit('.', 1)[-1]})" if names else None
    if module is None and parts:
        module = f"{parts[0][0].rsplit('.', 1)[-1]}.forward"
    in_model = src and Path(torch.__file__).parent not in Path(src).parents  # F.* report torch's own line
    where = [w for w in (module, f"{Path(src).name}:{line}" if in_model else None) if w]
    return f" (in {', '.join(where)})" if where else ""
