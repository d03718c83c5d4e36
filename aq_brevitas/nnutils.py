"""Torch utilities every stage shares: which layers are quantizable, their geometry on a forward
pass, fx leaf tracing, and the weights a forward uses outside them.

The single list of quantizable layer types lives here. Brevitas ``QuantConv*``/``QuantLinear``
subclass the torch layers, so the same test finds them in models that are already quantized.
How a model is run (its forward signature and errors, mode guards, the one data convention
:func:`~aq_brevitas.forward.as_xy`, ...) lives in :mod:`aq_brevitas.forward`; normalisation pairing
and BatchNorm folding in :mod:`aq_brevitas.folding`. Nothing here imports another module of the
package except :mod:`aq_brevitas.errors` and :mod:`aq_brevitas.forward`.

Coverage: a weight the forward uses outside a quantizable layer (an unsupported layer type, or
``F.linear``/``F.conv2d``/``@`` on a bare Parameter) stays float and is left out of a policy's cost;
:func:`warn_unsupported` names every such weight in one line. A layer called several times costs its
MACs at every call; a weight shared by several layers is stored (and costed in bits) once.
"""

from __future__ import annotations

import contextlib
import math
import operator
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .errors import ModelError, warn
from .forward import (
    eval_mode,
    example_args,
    paused_observers,
    reported_forward,
)

QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.ConvTranspose2d)
# Layers that hold weights a user may expect us to quantize, but which we do not support.
UNSUPPORTED_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose3d,
    nn.Bilinear,
    nn.RNNBase,
    nn.MultiheadAttention,
    nn.Embedding,
)
# Normalisations whose gain matters to a layer's map: only a BatchNorm (fixed running statistics)
# is a per-channel affine map that folds; the others normalise each sample by its own statistics.
NORM_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm, nn.LayerNorm, nn.GroupNorm, _InstanceNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)


# ---------------------------------------------------------------------------------------- layers
def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Quantizable layers by qualified name (as in ``named_modules()``), in registration order.

    A layer inside a module of an unsupported type is not one: that module's forward decides how the
    layer's weight is used (``nn.MultiheadAttention`` reads ``out_proj.weight`` directly and never
    calls ``out_proj``), so it stays float with its owner (:func:`warn_unsupported` names the owner).
    """
    inside = [
        f"{name}." if name else "" for name, m in model.named_modules() if isinstance(m, UNSUPPORTED_TYPES)
    ]
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, QUANTIZABLE_TYPES) and not any(name.startswith(o) for o in inside)
    }


def unsupported_layers(model: nn.Module) -> dict[str, str]:
    """Weight-carrying layers this package cannot quantize, by name -> type name (layers inside them
    stay float with them)."""
    return {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, UNSUPPORTED_TYPES)}


def shared_layer_names(model: nn.Module) -> dict[int, list[str]]:
    """Quantizable modules registered under more than one name (one object, several names)."""
    seen: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, QUANTIZABLE_TYPES) and name:
            seen.setdefault(id(m), []).append(name)
    return {k: v for k, v in seen.items() if len(v) > 1}


def shared_weights(
    model: nn.Module, layers: Mapping[str, nn.Module] | None = None
) -> dict[str, tuple[str, ...]]:
    """Weights that several quantizable layers (distinct modules) use: first layer name -> all of them.

    Tied weights (``fc2.weight = fc1.weight``) are stored once, so their bits count once (under the
    first layer, in registration order); their MACs count at every layer that uses them. A policy must
    give the layers of one group one spec: they quantize the same tensor.
    """
    groups: dict[int, list[str]] = {}
    for name, m in (quantizable_layers(model) if layers is None else layers).items():
        groups.setdefault(id(m.weight), []).append(name)
    return {names[0]: tuple(names) for names in groups.values() if len(names) > 1}


def weight_owners(model: nn.Module, layers: Mapping[str, nn.Module] | None = None) -> dict[str, str]:
    """Each quantizable layer (of ``layers``, default all) that shares its weight -> the first layer
    of its :func:`shared_weights` group, under which the weight's bits are counted (the first maps to
    itself)."""
    return {n: first for first, names in shared_weights(model, layers).items() for n in names}


def warn_unsupported(model: nn.Module) -> None:
    """Warn (``UserWarning``, one line each) naming every weight that is not quantized nor costed.

    That is every layer of an unsupported type (with the quantizable layers inside it, which stay
    float with it: ``attn (MultiheadAttention, with attn.out_proj)``), and every Parameter the forward uses through a
    functional op outside a quantizable layer (see :func:`unquantized_weight_uses`).
    """
    bad = unsupported_layers(model)
    if bad:
        modules = dict(model.named_modules())
        inner = {
            n: [k for k, m in modules.items() if k.startswith(f"{n}.") and isinstance(m, QUANTIZABLE_TYPES)]
            for n in bad
        }
        listed = ", ".join(
            f"{n} ({t}{', with ' + ', '.join(inner[n]) if inner[n] else ''})" for n, t in bad.items()
        )
        warn(
            f"aq-brevitas leaves these layers in float, their type is not supported: {listed} -- fix: "
            "replace them with Conv1d/Conv2d/ConvTranspose2d/Linear if they should be quantized; "
            "otherwise nothing to do (they stay float and are left out of the policy's cost)",
        )
    uses = unquantized_weight_uses(model)
    if uses:
        warn(
            f"these weights are used outside a quantizable layer, so they stay float and are left out of "
            f"the policy's cost: {', '.join(f'{n} ({how})' for n, how in uses.items())} -- fix: apply them through an nn.Linear/nn.Conv2d module (a "
            "layer called several times is fine) if they should be quantized; otherwise nothing to do",
        )


def out_channels(layer: nn.Module) -> int:
    """Output channels (features, for Linear) of a quantizable layer."""
    return int(layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels)


def plain_tensor(value: Any) -> torch.Tensor | None:
    """A plain tensor from a tensor or a Brevitas ``QuantTensor`` (its ``.value``); else None."""
    if isinstance(value, torch.Tensor):
        return value
    inner = getattr(value, "value", None)
    return inner if isinstance(inner, torch.Tensor) else None


@dataclass(frozen=True)
class LayerGeometry:
    """Shape facts of one layer, measured on a forward pass: what cost accounting needs."""

    name: str
    type: str
    params: int  # weight elements it stores: 0 when it uses an earlier layer's weight (counted there)
    macs: int  # multiply-accumulates per sample, summed over every call in one forward
    input_shape: tuple[int, ...]  # per sample, at the first call
    output_shape: tuple[int, ...]  # per sample, at the first call
    calls: int = 1  # calls per forward (0: never called)
    weight_of: str | None = None  # the layer whose weight it uses, when it is another layer's

    def to_dict(self) -> dict:
        return asdict(self)


def layer_macs(layer: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one call per sample: every weight is used once per output (or, for a
    transposed conv, input) position."""
    w = layer.weight
    if isinstance(layer, nn.Linear):
        return math.prod(out_shape[:-1]) * w.numel()
    if getattr(layer, "transposed", False):
        return math.prod(in_shape[1:]) * w.numel()
    return math.prod(out_shape[1:]) * w.numel()


# --------------------------------------------------------------------------- the model's forward


@dataclass(frozen=True)
class LayerCalls:
    """What one forward showed of a quantizable layer: shapes and input norm at its first call,
    how many times it was called and its MACs per sample summed over the calls."""

    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    calls: int
    macs: int
    input_norm: float  # mean over samples of the L2 norm of the input at the first call


def observe_layers(
    model: nn.Module, args: tuple[torch.Tensor, ...], layers: Mapping[str, nn.Module] | None = None
) -> tuple[dict[str, LayerCalls], Any]:
    """One hooked forward ``model(*args)`` (eval mode, observers paused, no grad): every call of each
    of ``layers`` (default: all quantizable ones), in the order of their first call, and the output.

    Layers the forward never calls are absent. The model comes back in its own mode, its BatchNorm
    statistics untouched. A failing forward is the one-line error of :func:`reported_forward`.
    """
    layers = quantizable_layers(model) if layers is None else layers
    first: dict[str, tuple[tuple[int, ...], tuple[int, ...], float]] = {}
    calls: dict[str, int] = {}
    macs: dict[str, int] = {}

    def make_hook(name: str):
        def hook(mod: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            x, y = plain_tensor(inputs[0]) if inputs else None, plain_tensor(output)
            if x is None or y is None:
                return
            i, o = tuple(x.shape[1:]), tuple(y.shape[1:])
            calls[name] = calls.get(name, 0) + 1
            macs[name] = macs.get(name, 0) + layer_macs(mod, i, o)
            if name not in first:
                norm = (
                    float(x.detach().flatten(1).to(torch.float64).norm(dim=1).mean()) if x.dim() > 1 else 0.0
                )
                first[name] = (i, o, norm)

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in layers.items()]
    try:
        with eval_mode(model), paused_observers(model), torch.no_grad(), reported_forward(args):
            out = model(*args)
    finally:
        for h in handles:
            h.remove()
    return {n: LayerCalls(i, o, calls[n], macs[n], a) for n, (i, o, a) in first.items()}, out


def layer_geometry(model: nn.Module, example_input: Any) -> dict[str, LayerGeometry]:
    """Run one forward pass (eval mode) on the first sample with hooks and record every quantizable
    layer's geometry, in registration order.

    ``example_input``: a tensor, or a tuple of tensors for a multi-input model (:func:`example_args`).
    MACs count every call of a layer in the forward; a weight shared by several layers has its
    ``params`` under the first of them only (the others have 0 and name it in ``weight_of``).
    Layers the forward never calls are left out (:func:`quantize` leaves them float), named in a
    warning (:func:`warn_never_called`); so are weights the forward uses that are not quantized nor
    costed (:func:`warn_unsupported`). Raises :class:`ModelError` for a model without quantizable
    layers or a failing forward.
    """
    args = example_args(model, example_input)
    layers = quantizable_layers(model)
    if not layers:
        raise ModelError(
            "model has no quantizable layers (Conv1d/Conv2d/ConvTranspose2d/Linear)",
            "pass a model with at least one such layer",
        )
    warn_unsupported(model)
    seen, _ = observe_layers(model, tuple(a[:1] for a in args), layers)
    warn_never_called([n for n in layers if n not in seen])
    called = {n: m for n, m in layers.items() if n in seen}
    owners = weight_owners(model, called)
    found = {}
    for n, layer in called.items():
        owner = owners.get(n, n)
        c = seen[n]
        found[n] = LayerGeometry(
            n,
            type(layer).__name__,
            int(layer.weight.numel()) if owner == n else 0,
            c.macs,
            c.input_shape,
            c.output_shape,
            c.calls,
            None if owner == n else owner,
        )
    return found


def warn_never_called(names: list[str]) -> None:
    """One ``UserWarning`` naming the quantizable layers a forward never called (none: no warning)."""
    if names:
        warn(
            f"layers {', '.join(names)} are never called by the model's forward (their weights, if used, "
            "are read directly): they stay float and are left out of the cost -- fix: call them as modules "
            "in forward if they should be quantized; otherwise nothing to do",
        )


def called_layers(model: nn.Module, example_input: Any = None) -> set[str] | None:
    """The quantizable layers the model's forward calls: seen by a hooked forward on the first sample
    of ``example_input`` (a tensor or a tuple of them), else read from the fx graph (a layer is called
    when it, or a leaf module holding it, is a ``call_module``); None when neither can tell (no input
    and the model does not trace)."""
    layers = quantizable_layers(model)
    if example_input is not None:
        args = example_args(model, example_input)
        return set(observe_layers(model, tuple(a[:1] for a in args), layers)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing user code may warn (TracerWarning...): not ours to show
        gm = trace_leaves(model)
    if gm is None:
        return None
    modules = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    return {n for n in layers if n in modules or any(n.startswith(f"{m}.") for m in modules)}


def math_attention() -> contextlib.AbstractContextManager:
    """A context (or decorator) running scaled-dot-product attention (``nn.MultiheadAttention``,
    ``F.scaled_dot_product_attention``) on torch's math kernel. The fused kernels (flash, memory-
    efficient) have a backward but no double backward, which the Jacobian gains and Hessian scores
    take; the math kernel is made of differentiable ops. A no-op for models without attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


# ------------------------------------------------------------------------------------- fx tracing
class LeafTracer(fx.Tracer):
    """Keeps quantizable layers and BatchNorms (Brevitas ones included) as single call_module nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, QUANTIZABLE_TYPES + (_BatchNorm,)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace_with(tracer: fx.Tracer, model: nn.Module, class_name: str = "GraphModule") -> fx.GraphModule:
    """``model`` traced by ``tracer`` into a GraphModule, leaving ``model`` as it was: fx parks the
    tensor constants it meets on the traced root (``_tensor_constant0``...); they are moved off it.
    Raises what tracing raises."""
    own = set(vars(model))
    try:
        graph = tracer.trace(model)  # sets tracer.root
        return fx.GraphModule(tracer.root, graph, class_name=class_name)
    finally:
        for name in set(vars(model)) - own:
            delattr(model, name)


def trace_leaves(model: nn.Module) -> fx.GraphModule | None:
    """``model`` as an fx graph with :class:`LeafTracer`, or None when symbolic tracing fails
    (data-dependent control flow...)."""
    try:
        return trace_with(LeafTracer(), model)
    except Exception:  # tracing fails in many ways (TraceError, TypeError, NotImplementedError...)
        return None


# Functional ops that multiply by a weight, and the positions of their weight operand(s).
_WEIGHT_OPS: dict[Any, tuple[int, ...]] = {
    F.linear: (1,),
    F.bilinear: (2,),
    F.conv1d: (1,),
    F.conv2d: (1,),
    F.conv3d: (1,),
    F.conv_transpose1d: (1,),
    F.conv_transpose2d: (1,),
    F.conv_transpose3d: (1,),
    F.embedding: (1,),
    torch.matmul: (0, 1),
    torch.mm: (0, 1),
    torch.bmm: (0, 1),
    torch.addmm: (1, 2),
    operator.matmul: (0, 1),
    torch.einsum: (1, 2, 3, 4),
}
_WEIGHT_METHODS = {"matmul": (0, 1), "mm": (0, 1), "bmm": (0, 1), "__matmul__": (0, 1), "__rmatmul__": (0, 1)}


def op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f".{node.target}()"
    if node.target is operator.matmul:
        return "@"
    name = getattr(node.target, "__name__", str(node.target))
    return ("F." if getattr(F, name, None) is node.target else "torch.") + name


def _source_parameter(gm: fx.GraphModule, node: Any, depth: int = 8) -> str | None:
    """The get_attr target of the Parameter ``node`` is computed from through one-input ops (``w.t()``,
    ``w * 2``, ``w.view(...)``), or None."""
    while isinstance(node, fx.Node) and depth > 0:
        if node.op == "get_attr":
            try:
                gm.get_parameter(str(node.target))
            except AttributeError:  # a buffer or a plain tensor attribute: not a trained weight
                return None
            return str(node.target)
        ins = node.all_input_nodes
        if node.op not in ("call_method", "call_function") or len(ins) != 1:
            return None
        node, depth = ins[0], depth - 1
    return None


def unquantized_weight_uses(model: nn.Module) -> dict[str, str]:
    """Parameters the forward multiplies by through a functional op outside any quantizable layer.

    ``name -> op`` (e.g. ``{"proj": "F.linear"}``), read from the fx graph (:func:`trace_leaves`):
    every ``F.linear``/``F.conv*``/``F.embedding``/``matmul``/``@``/``einsum`` whose weight operand is
    (derived through one-input ops from) a Parameter. Such a use is never quantized, even when the
    Parameter is a quantizable layer's own weight used outside that layer (named with ``outside``),
    and its MACs are not in the cost. Empty for models fx cannot trace (nothing can be said).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing user code may warn (TracerWarning...): not ours to show
        gm = trace_leaves(model)
    if gm is None:
        return {}
    layers = quantizable_layers(model)
    owned = {id(m.weight): n for n, m in layers.items()}
    found: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            positions = _WEIGHT_OPS.get(node.target, ())
        elif node.op == "call_method":
            positions = _WEIGHT_METHODS.get(str(node.target), ())
        else:
            continue
        operands = [node.args[i] for i in positions if i < len(node.args)] + [node.kwargs.get("weight")]
        for arg in operands:
            target = _source_parameter(gm, arg)
            if target is None or target in found:
                continue
            owner = owned.get(id(gm.get_parameter(target)))
            found[target] = op_name(node) + (f", outside {owner}" if owner else "")
    return found
