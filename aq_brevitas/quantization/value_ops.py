"""The value-copying ops: the ONE list that placement, the export read-back and FINN's static checks follow.

An op in :data:`VALUE_COPYING_OPS` only moves, repeats or selects its input's elements (max-pooling
selects the largest), so a per-tensor, zero-point-0 activation quantizer commutes with it: quantizing
before or after gives the same values. Three readers walk through these ops:

* :mod:`~aq_brevitas.quantization.placement` looks back from a layer's input, through these ops (torch
  modules, functions and tensor methods), for the op whose output gets the quantizer;
* :mod:`~aq_brevitas.export.graph` looks back from a Conv/Gemm/MatMul node, through their ONNX forms,
  for the ``Quant`` that feeds it (the input bits of the export's table);
* :mod:`~aq_brevitas.export.finn_checks` treats their ONNX forms as keeping an integer tensor integer.

Concatenation copies several inputs: placement gives all of them ONE shared quantizer (FINN's
``StreamingConcat`` needs one scale), and a walk back through it follows its first input.
Padding copies values in every mode (``constant`` only with the value 0: a quantizer maps 0 to 0);
upsampling copies them only in ``nearest`` mode.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F


@dataclass(frozen=True)
class ValueCopyingOp:
    """One kind of value-copying op in its torch forms (modules, functions, tensor methods) and ONNX forms."""

    kind: str
    modules: tuple[type[nn.Module], ...] = ()
    functions: tuple[Any, ...] = ()
    methods: tuple[str, ...] = ()
    onnx: tuple[str, ...] = ()


_PADS = tuple(
    getattr(nn, n)
    for n in (
        "ZeroPad1d", "ZeroPad2d", "ConstantPad1d", "ConstantPad2d", "ReflectionPad1d", "ReflectionPad2d",
        "ReplicationPad1d", "ReplicationPad2d", "CircularPad1d", "CircularPad2d",
    )
    if hasattr(nn, n)
)  # fmt: skip

VALUE_COPYING_OPS: tuple[ValueCopyingOp, ...] = (
    ValueCopyingOp(
        "max-pool",
        (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d),
        (F.max_pool1d, F.max_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d),
        (),
        ("MaxPool", "MaxPoolNHWC"),
    ),
    ValueCopyingOp("flatten", (nn.Flatten, nn.Unflatten), (torch.flatten,), ("flatten",), ("Flatten",)),
    ValueCopyingOp(
        "reshape",
        (),
        (torch.reshape, torch.squeeze, torch.unsqueeze),
        ("view", "reshape", "squeeze", "unsqueeze", "contiguous"),
        ("Reshape", "Squeeze", "Unsqueeze"),
    ),
    ValueCopyingOp(
        "transpose", (), (torch.transpose, torch.permute), ("permute", "transpose"), ("Transpose",)
    ),
    ValueCopyingOp("pad", _PADS, (F.pad,), (), ("Pad",)),
    # getitem: x[:, :4] and F.max_pool2d(..., return_indices=True)[0]
    ValueCopyingOp("slice", (), (operator.getitem, torch.narrow), ("narrow",), ("Slice",)),
    ValueCopyingOp("concat", (), (torch.cat, torch.concat), (), ("Concat",)),
    ValueCopyingOp(
        "nearest upsampling",
        (nn.Upsample, nn.UpsamplingNearest2d),
        (F.interpolate,),
        (),
        ("Resize", "Upsample"),
    ),
    ValueCopyingOp(
        "identity",
        (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d),
        (F.dropout,),
        (),
        ("Identity", "Dropout"),
    ),
)

COPYING_MODULES = tuple(m for op in VALUE_COPYING_OPS for m in op.modules)
COPYING_FUNCTIONS = frozenset(f for op in VALUE_COPYING_OPS for f in op.functions)
COPYING_METHODS = frozenset(m for op in VALUE_COPYING_OPS for m in op.methods)
COPYING_ONNX = tuple(o for op in VALUE_COPYING_OPS for o in op.onnx)
CONCAT_FUNCTIONS = frozenset(next(op for op in VALUE_COPYING_OPS if op.kind == "concat").functions)


def _copies_values(module_or_call: Any, args: tuple, kwargs: dict) -> bool:
    """The mode checks: a pad copies values unless it pads with a non-zero constant; an upsampling only
    in ``nearest`` mode."""
    if isinstance(module_or_call, nn.Upsample) or module_or_call is F.interpolate:
        mode = (
            module_or_call.mode if isinstance(module_or_call, nn.Upsample) else kwargs.get("mode", "nearest")
        )
        return mode == "nearest"
    if isinstance(module_or_call, (nn.ConstantPad1d, nn.ConstantPad2d)):
        return float(module_or_call.value) == 0.0
    if module_or_call is F.pad:
        mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
        value = kwargs.get("value", args[3] if len(args) > 3 else None)
        return mode != "constant" or not value
    return True


def copies_values(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether the fx ``node`` is a value-copying op (:data:`VALUE_COPYING_OPS`, modes checked)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, COPYING_MODULES) and _copies_values(module, node.args, node.kwargs)
    if node.op == "call_function":
        return node.target in COPYING_FUNCTIONS and _copies_values(node.target, node.args, node.kwargs)
    return node.op == "call_method" and node.target in COPYING_METHODS


def is_concat(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in CONCAT_FUNCTIONS


def onnx_copies_values(node: Any) -> bool:
    """Whether an ONNX node is the ONNX form of a value-copying op (``Resize`` only in nearest mode,
    ``Pad`` only in a mode that copies: a constant pad's value input is checked by the caller's graph)."""
    if node.op_type not in COPYING_ONNX:
        return False
    if node.op_type in ("Resize", "Upsample"):
        mode = next((a.s for a in node.attribute if a.name == "mode"), b"nearest")
        return mode in (b"nearest", "nearest")
    return True
