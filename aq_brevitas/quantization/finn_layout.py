"""FINN's own layout for the ops between quantized layers: average pooling in FINN's averaging unit,
re-quantized residual adds and concatenations, and the activations FINN cannot map refused.

FINN's end-to-end MobileNet-v1 (Brevitas ``brevitas_examples/imagenet_classification/models/
mobilenetv1.py``) puts a quantizer before its pool and averages with ``TruncAvgPool2d``: exported as
``AveragePool -> Mul -> Trunc``, which FINN's ``AvgPoolAndTruncToQuantAvgPool`` turns into its own
``QuantAvgPool2d`` unit. A float ``GlobalAveragePool`` leaves a float ``Mul`` after FINN's
``GlobalAccPool`` and never reaches one dataflow partition. FINN's ResNets reach it with re-quantized
residual adds: both inputs of the ``Add`` go through one quantizer, so streamlining moves the one
scale past the add (``MoveLinearPastEltwiseAdd``) and the add runs on integers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F

from ..errors import PolicyError
from .act_sites import trace_for_placement

# Activations FINN's QONNX front end cannot turn into thresholds (only Relu and Selu become a
# MultiThreshold with the Quant after them), with the fix the refusal names.
_USE_RELU = "use nn.ReLU (FINN folds ReLU + its quantizer into thresholds)"
FINN_UNMAPPED_ACTIVATIONS: dict[type[nn.Module], str] = {
    nn.SiLU: _USE_RELU,
    nn.Hardswish: _USE_RELU,
    nn.Sigmoid: _USE_RELU + ", or leave the sigmoid out of the model and apply it after FINN's output",
    nn.GELU: _USE_RELU,
    nn.Hardsigmoid: _USE_RELU,
    nn.Mish: _USE_RELU,
    nn.Tanh: _USE_RELU,
    nn.ELU: _USE_RELU,
    nn.LeakyReLU: _USE_RELU,
    nn.ReLU6: "use nn.ReLU (the quantizer after it clips the range, as ReLU6 would)",
    nn.Softplus: _USE_RELU,
}
_FUNCTIONAL = {
    F.silu: nn.SiLU, F.hardswish: nn.Hardswish, torch.sigmoid: nn.Sigmoid, F.sigmoid: nn.Sigmoid,
    F.gelu: nn.GELU, F.hardsigmoid: nn.Hardsigmoid, F.mish: nn.Mish, torch.tanh: nn.Tanh, F.tanh: nn.Tanh,
    F.elu: nn.ELU, F.leaky_relu: nn.LeakyReLU, F.relu6: nn.ReLU6, F.softplus: nn.Softplus,
}  # fmt: skip
_METHODS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def refuse_finn_activations(model: nn.Module, target: str = "finn") -> None:
    """For ``target="finn"``, raise :class:`PolicyError` (one line, naming the module and the fix) when
    ``model`` uses an activation FINN cannot map (:data:`FINN_UNMAPPED_ACTIVATIONS`: SiLU, Hardswish,
    sigmoid, GELU...), as a module or as a functional call fx can see; any other target takes them.
    ``quantize`` and ``search_policy`` call it with their ``target``.

    >>> from torch import nn
    >>> refuse_finn_activations(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    >>> refuse_finn_activations(nn.Sequential(nn.Linear(4, 4), nn.SiLU()))
    Traceback (most recent call last):
    ...
    aq_brevitas.errors.PolicyError: target='finn': module 1 is a SiLU, which FINN cannot map to hardware -- fix: use nn.ReLU (FINN folds ReLU + its quantizer into thresholds), or use target='generic'
    """
    if target != "finn":
        return
    found = [
        (f"module {n}", type(m)) for n, m in model.named_modules() if type(m) in FINN_UNMAPPED_ACTIVATIONS
    ]
    if not found:
        gm, _ = trace_for_placement(model)
        for node in gm.graph.nodes if gm is not None else ():
            kind = _FUNCTIONAL.get(node.target) if node.op == "call_function" else None
            kind = _METHODS.get(node.target) if node.op == "call_method" else kind
            if kind is not None:
                found.append((f"forward's call {node.name}", kind))
    if found:
        name, kind = found[0]
        others = [f"{n} a {k.__name__}" for n, k in found[1:4]] + (["..."] if len(found) > 4 else [])
        more = f" ({', '.join(others)} too)" if others else ""
        raise PolicyError(
            f"target='finn': {name} is a {kind.__name__}{more}, which FINN cannot map to hardware",
            f"{FINN_UNMAPPED_ACTIVATIONS[kind]}, or use target='generic'",
        )


def avg_pool_kernel(gm: fx.GraphModule, node: fx.Node) -> tuple[bool, int | None]:
    """``(True, kernel)`` for a 2-D average pool FINN's unit can run: a global one (adaptive to 1x1:
    kernel None) or a square ``AvgPool2d`` with stride = kernel and no padding; ``(False, None)``
    for anything else."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return _is_one(m.output_size), None
        if type(m) is nn.AvgPool2d:
            return _square(m.kernel_size, m.stride, m.padding)
        return False, None
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return _is_one(size), None
    if node.op == "call_function" and node.target is F.avg_pool2d:
        k = node.args[1] if len(node.args) > 1 else node.kwargs.get("kernel_size")
        s = node.args[2] if len(node.args) > 2 else node.kwargs.get("stride")
        p = node.args[3] if len(node.args) > 3 else node.kwargs.get("padding", 0)
        return _square(k, s if s is not None else k, p)
    return False, None


def _is_one(size: Any) -> bool:
    return size == 1 or (isinstance(size, (tuple, list)) and all(s == 1 for s in size))


def _square(k: Any, s: Any, p: Any) -> tuple[bool, int | None]:
    ks = {k} if isinstance(k, int) else set(k or ())
    ss = {s} if isinstance(s, int) else set(s or ())
    ps = {p} if isinstance(p, int) else set(p or (0,))
    ok = len(ks) == 1 and ks == ss and ps == {0} and all(isinstance(v, int) for v in ks)
    return ok, (next(iter(ks)) if ok else None)


def is_merge(node: fx.Node) -> bool:
    """An add of two tensors (a residual add): FINN runs it on integers only when one quantizer
    feeds both inputs."""
    import operator

    if node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add):
        return sum(isinstance(a, fx.Node) for a in node.args[:2]) == 2
    return node.op == "call_method" and node.target in ("add", "add_") and len(node.args) >= 2
