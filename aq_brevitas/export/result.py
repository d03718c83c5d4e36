"""What an export produced: :class:`ExportResult` and its per-layer text table."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import warn

if TYPE_CHECKING:
    from torch import nn

    from .cost import CostReport
    from .graph import GraphLayer, GraphMap
    from .parity import ParityOutcome


@dataclass
class ExportResult:
    """What an export produced and how well it matched PyTorch."""

    path: str
    format: str
    max_abs_diff: float
    images_checked: int
    layer_bits: dict[str, int] = field(default_factory=dict)  # weight bits per layer found in the graph
    bipolar_layers: list[str] = field(default_factory=list)
    policy: dict[str, Any] | None = None  # the policy the model's quantizers say it runs (read_policy)
    opset: int = 13
    ort_basic_diff: float | None = None  # QCDQ only: the same check with every BASIC rewrite enabled
    act_bits: dict[str, int] = field(default_factory=dict)  # input-quantizer bits per layer in the graph
    output_scale: float = math.nan  # max |PyTorch output| over the checked images
    allowed_diff: float = math.nan  # tol * max(1, output_scale): the parity bound that was enforced
    weight_bits: dict[str, dict[str, int]] = field(default_factory=dict)  # per layer: graph vs expected
    expected_from: str = ""  # "quantizers": where the expected weight bits came from
    cost: CostReport | None = None  # QONNX only: inference_cost of the written graph
    # QONNX only: codes that ONNX and PyTorch round to neighbouring levels because the quantizer's
    # input sits within float32 noise of a rounding boundary, summed over the checked images, and
    # per "node (quantizer)". max_abs_diff includes their effect and may then exceed allowed_diff;
    # diff_without_flips (the same difference once they get PyTorch's codes) may not.
    boundary_flips: int = 0
    flip_detail: dict[str, int] = field(default_factory=dict)
    diff_without_flips: float = math.nan  # equals max_abs_diff when nothing flipped
    # False when the written graph (parity passed) could not be mapped back to the model's layers or
    # costed per layer: an aq-brevitas bug, named in readback_problem; layer_bits, bipolar_layers,
    # act_bits and weight_bits are then empty and weight memory was not checked against the policy.
    layer_table_available: bool = True
    readback_problem: str = ""
    # Parameters the forward uses outside the quantizable layers (F.linear/F.conv2d on them, layers of
    # unsupported types) -> the graph node that uses them: float in the graph, in no policy's cost
    float_weights: dict[str, str] = field(default_factory=dict)
    # layers the forward calls more than once -> the number of graph nodes carrying their weights
    layer_calls: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_graph(
        cls,
        path: str | os.PathLike[str],
        fmt: str,
        graph: GraphMap,
        model: nn.Module,
        parity: ParityOutcome,
        **fields: Any,
    ) -> ExportResult:
        """The result of writing ``path`` in format ``fmt`` (``"qonnx"`` or ``"qcdq"``).

        ``graph`` is the written graph read back against ``model``: its layers' weight and input bits
        fill ``layer_bits``, ``bipolar_layers``, ``act_bits``, ``layer_calls``, ``float_weights``; when
        it has a ``problem`` (what the read-back could not map) those are left empty and
        ``layer_table_available`` is False. The policy is what ``model``'s quantizers say
        (:func:`~aq_brevitas.quantization.readback.read_policy`; None where no LayerSpec holds them); ``parity`` gives the measured differences and flips;
        ``fields``, the format's own fields (``opset``, ``cost``, ...), are passed on to the constructor.
        """
        policy = _policy_of(model)
        layers: Mapping[str, GraphLayer] = {} if graph.problem else graph.layers
        found = {
            "layer_bits": {name: gl.weight_bits for name, gl in layers.items()},
            "bipolar_layers": [name for name, gl in layers.items() if gl.bipolar],
            "act_bits": {name: gl.act_bits for name, gl in layers.items() if gl.act_bits is not None},
            "layer_calls": {name: 1 + len(gl.more_nodes) for name, gl in layers.items() if gl.more_nodes},
            "float_weights": {} if graph.problem else dict(graph.float_weights),
            "policy": policy.to_dict() if policy is not None else None,
        }
        measured = {
            "max_abs_diff": parity.max_abs_diff,
            "images_checked": parity.images,
            "output_scale": parity.output_scale,
            "allowed_diff": parity.allowed,
            "boundary_flips": sum(parity.flips.values()),
            "flip_detail": parity.flips,
            "diff_without_flips": parity.diff_without_flips,
        }
        read_back = {"layer_table_available": not graph.problem, "readback_problem": graph.problem}
        return cls(path=str(path), format=fmt, **found, **measured, **read_back, **fields)


def _policy_of(model: nn.Module) -> Any:
    from ..errors import PolicyError
    from ..quantization.readback import read_policy

    try:
        return read_policy(model)
    except PolicyError:  # a hand-made model quantized at bits no LayerSpec holds: the graph says them
        return None


def warn_read_back(fmt: str, path: str | os.PathLike[str], problem: str) -> None:
    """Warn (``RuntimeWarning``) that ``path`` was written (its parity passed) but not read back per layer.

    The caller of the export sees the warning at its own line (:func:`~aq_brevitas.errors.warn`).
    """
    if problem:
        warn(
            f"{fmt} export wrote {path} (parity passed), but could not read it back per layer: {problem}; "
            "the per-layer bit table is unavailable (an aq-brevitas bug) -- fix: use the file as it is (its "
            "outputs match PyTorch), and please report the model so the read-back can be fixed",
            RuntimeWarning,
        )


def layer_table(res: ExportResult) -> str:
    """Per-layer bit widths read from the graph, and (QONNX) graph-vs-prediction weight memory."""
    if not res.layer_table_available:
        return (
            f"per-layer bit table unavailable: {res.readback_problem} "
            "(an aq-brevitas bug: please report it; the file's parity check passed)"
        )
    src = res.expected_from or "policy"
    head = f"{'layer':<24} {'weight bits':>11} {'input bits':>10}"
    rows = [head + (f" {'weight memory: graph / ' + src:>32}" if res.weight_bits else "")]
    for name, bits in res.layer_bits.items():
        w = f"{bits}" + (" (bipolar)" if name in res.bipolar_layers else "")
        shown = f"{name} (x{res.layer_calls[name]} calls)" if name in res.layer_calls else name
        row = f"{shown:<24} {w:>11} {res.act_bits.get(name, 'float'):>10}"
        if name in res.weight_bits:
            row += f" {res.weight_bits[name]['graph']:>20,} / {res.weight_bits[name][src]:<,}"
        rows.append(row)
    if res.weight_bits:
        g = sum(r["graph"] for r in res.weight_bits.values())
        e = sum(r[src] for r in res.weight_bits.values())
        rows.append(f"{'total':<24} {'':>11} {'':>10} {g:>20,} / {e:<,} ({'equal' if g == e else 'DIFFER'})")
    if res.float_weights:
        listed = ", ".join(f"{p} ({node})" for p, node in res.float_weights.items())
        rows.append(f"float weights outside the quantizable layers (in no policy's cost): {listed}")
    return "\n".join(rows)
