"""QONNX export for FINN: Brevitas ``export_qonnx`` then qonnx ``cleanup_model``, checked against
PyTorch (flip-aware parity), the policy's cost (weight memory per layer) and ``onnx.checker``."""

from __future__ import annotations

import os

import torch
from torch import nn

from ..storage import atomic_write_with
from .cost import check_weight_memory, expected_weight_bits, qonnx_cost
from .exporter import check_example_input, check_model, onnx_check, run_exporter, scratch_dir
from .flips import flip_aware_parity
from .graph import graph_layers
from .parity import DEFAULT_TOL, ParityOutcome
from .result import ExportResult


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
    ``inference_cost`` finds must equal the policy's predicted cost exactly (``weight_bits``, ``cost``).

    Raises :class:`ModelError` (and writes nothing) when torch's ONNX exporter fails (one line naming
    the op and where it is called), when the parity check fails, when a layer cannot be found in the
    graph, or when the graph's weight memory differs from the policy's predicted cost in any layer.
    The file is written to a temporary path and renamed into place only after its checks passed.

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

    check_model(model)
    x = check_example_input(example_input)
    model.eval()
    with scratch_dir() as d:
        raw = d / "raw.onnx"
        run_exporter("QONNX", brevitas_export_qonnx, model, x, raw, opset)
        mw = cleanup_model(ModelWrapper(str(raw))).transform(GiveUniqueNodeNames())
        parity = flip_aware_parity(mw, model, x, images, tol) if check else ParityOutcome()
        layers = graph_layers(mw.model, model, "qonnx")
        cost = qonnx_cost(mw, layers)
        expected, source = expected_weight_bits(model, x)
        table = check_weight_memory(cost, layers, expected, source)
        onnx_check(mw.model)
        atomic_write_with(path, lambda tmp: mw.save(str(tmp)))
    return ExportResult.from_graph(
        path, "qonnx", layers, model, parity, opset=opset, weight_bits=table, expected_from=source, cost=cost
    )
