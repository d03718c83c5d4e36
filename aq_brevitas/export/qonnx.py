"""QONNX export for FINN: Brevitas ``export_qonnx`` then qonnx ``cleanup_model``, checked against
PyTorch (flip-aware parity), the policy's cost (weight memory per layer) and ``onnx.checker``."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..classifier import unwrap_parallel
from ..forward import eval_mode
from ..storage import atomic_write_with
from .cost import CostReport, check_weight_memory, expected_weight_bits, qonnx_cost, unexplained_weight_bits
from .exporter import check_example_input, check_model, onnx_check, run_exporter, scratch_dir
from .flips import flip_aware_parity
from .graph import GraphMap, failure_note, map_layers
from .parity import DEFAULT_TOL, ParityOutcome
from .result import ExportResult, warn_read_back


def export_qonnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_input: torch.Tensor,
    *,
    opset: int = 13,
    check: bool = True,
    images: torch.Tensor | None = None,
    tol: float = DEFAULT_TOL,
) -> ExportResult:
    """Export a Brevitas model to cleaned QONNX at ``path``, checked against PyTorch and its policy's cost.

    Brevitas ``export_qonnx(dynamo=False)`` at ``opset`` (the TorchScript path FINN's own tests use; the
    dynamo path breaks residual models carrying QuantTensors and writes ``.onnx.data`` side files),
    then qonnx ``cleanup_model``, then execution of the cleaned graph with qonnx's ``execute_onnx``.
    ``example_input`` is a float tensor with a batch dimension (its first item is used); ``images``
    (``N x ...``, optional) are checked one by one after it.

    Parity: ``max |ONNX - PyTorch| <= tol * max(1, max |PyTorch output|)`` on the example input and
    each of ``images``; an input that misses it passes only if every code difference at every Quant
    node is a rounding-boundary flip (one step, both inputs within float32 noise of the boundary, at
    most ``MAX_FLIP_FRACTION`` of a node's elements) and the output meets the bound once those flips
    get PyTorch's codes (``boundary_flips``, ``flip_detail``, ``diff_without_flips``). The weight and
    input bit widths of every layer are read back from the graph, and the weight memory qonnx's
    ``inference_cost`` finds must equal what the model's weight quantizers predict exactly
    (``weight_bits``, ``cost``: a :class:`~aq_brevitas.export.cost.CostReport`).

    Raises :class:`ModelError` (and writes nothing) when torch's ONNX exporter fails (one line naming
    the op and where it is called), when the parity check fails, or when the graph's weight memory
    differs from the policy's predicted cost in any layer. The file is written to a temporary path
    and renamed into place only after its checks passed. A graph that passed parity but cannot be
    mapped back to the model's layers (or costed per layer) is still written: that is this package's
    bug, reported as a ``RuntimeWarning`` with ``layer_table_available=False`` and
    ``readback_problem`` in the result, and weight memory is then not checked. The model comes back
    in the train/eval mode it came in; the export runs in eval mode (BatchNorm statistics untouched).

    >>> import torch
    >>> from aq_brevitas import LayerSpec, LayerwisePolicy, build_model, export_qonnx, quantize
    >>> _ = torch.manual_seed(0)
    >>> q = quantize(build_model("small_cnn"), LayerwisePolicy(default=LayerSpec(4)))  # random weights
    >>> res = export_qonnx(q, "q.onnx", torch.rand(1, 1, 28, 28), images=torch.rand(4, 1, 28, 28))
    >>> res.layer_bits, res.images_checked, res.diff_without_flips <= res.allowed_diff
    ({'conv1': 4, 'conv2': 4, 'fc1': 4, 'fc2': 4}, 5, True)
    """
    from brevitas.export import export_qonnx as brevitas_export_qonnx
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.general import GiveUniqueNodeNames
    from qonnx.util.cleanup import cleanup_model

    model = unwrap_parallel(model)
    check_model(model, "QONNX export")
    x = check_example_input(example_input)
    with eval_mode(model), scratch_dir() as d:
        raw = d / "raw.onnx"
        run_exporter("QONNX", brevitas_export_qonnx, model, x, raw, opset)
        mw = cleanup_model(ModelWrapper(str(raw))).transform(GiveUniqueNodeNames())
        parity = flip_aware_parity(mw, model, x, images, tol) if check else ParityOutcome()
        graph, cost = _read_back(mw, model)
        table, source = _weight_memory(cost, graph, model, x)
        onnx_check(mw.model)
        atomic_write_with(path, lambda tmp: mw.save(str(tmp)))
    warn_read_back("QONNX", path, graph.problem)
    return ExportResult.from_graph(
        path, "qonnx", graph, model, parity, opset=opset, weight_bits=table, expected_from=source, cost=cost
    )


def _weight_memory(
    cost: CostReport | None, graph: GraphMap, model: nn.Module, x: torch.Tensor
) -> tuple[dict[str, Any], str]:
    """Per-layer weight memory of the graph checked against the predicted cost (raises
    :class:`ModelError` on a mismatch; the table goes into ``cost`` too); nothing when the graph could
    not be read back or costed."""
    if cost is None or graph.problem:
        return {}, ""
    expected, source = expected_weight_bits(model, x)
    table = check_weight_memory(cost, graph, expected, source)
    graph.problem = unexplained_weight_bits(cost, graph, expected, source)
    cost.weight_bits, cost.expected_from = table, source
    return table, source


def _read_back(mw: Any, model: nn.Module) -> tuple[GraphMap, CostReport | None]:
    """The graph mapped to the model's layers, and its inference cost; what failed is in ``problem``.

    ``problem`` is ``""`` when every layer was found and has a cost row; otherwise it says what was
    not mapped (an aq-brevitas bug on a graph whose parity passed: reported, not raised). The cost
    is ``None`` when qonnx's cost analysis itself failed.
    """
    graph = map_layers(mw.model, model, "qonnx")
    problems = [graph.problem] if graph.problem else []
    cost = None
    try:
        cost = qonnx_cost(mw, graph)
    except Exception as exc:  # the boundary: qonnx's analysis of a graph that computes what the model does
        problems.append(failure_note("qonnx inference_cost", exc))
    uncosted = [f"{n} ({gl.node})" for n, gl in graph.layers.items() if cost and gl.node not in cost.layers]
    if uncosted:
        problems.append(f"no inference_cost row for layer(s) {', '.join(uncosted)}")
    graph.problem = "; ".join(problems)
    return graph, cost
