"""BatchNorm folding: which normalisation folds into which layer, the arithmetic of folding it, and
writing the folded weights back.

* :func:`bn_scale` and :func:`folded_weight`: ``bn(layer(x))`` as one layer, in eval semantics.
* :func:`write_folded`: put the folded ``(W, b)`` into the layer without changing any other module
  that holds the same ``Parameter`` (tied weights): such a Parameter is replaced by the layer's own
  copy, so the others keep computing what they computed (:func:`parameter_holders` finds them).

* :func:`norm_folding`, :func:`find_conv_bn_pairs`: which BatchNorm folds into which layer, read
  from the model's graph (fx leaf tracing of :mod:`aq_brevitas.nnutils`), and why others do not.
* :func:`fold_batchnorm`: fold every foldable pair in place.

Nothing here imports another module of the package except :mod:`aq_brevitas.errors` and
:mod:`aq_brevitas.nnutils`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import ModelError, warn
from .forward import (
    example_args,
)
from .nnutils import NORM_TYPES, observe_layers, op_name, out_channels, trace_leaves

# Layers a BatchNorm applied directly to their output folds into (per output channel: weight axis 0,
# or axis 1 of a transposed conv's weight). ConvTranspose1d is not quantized, but folding is exact.
BN_PAIRED_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.Linear,
)


def bn_scale(bn: nn.Module) -> torch.Tensor:
    """Per-channel factor gamma/sqrt(running_var + eps) of a BatchNorm in eval mode (detached, float).

    The linear part of the BatchNorm: pass it as ``operator_norm(..., out_scale=bn_scale(bn))`` to score
    an unfolded (e.g. quantized) layer weight as if the BatchNorm were folded into it.
    Raises :class:`ModelError` for a non-BatchNorm or one without running statistics.
    """
    if not isinstance(bn, _BatchNorm):
        raise ModelError(
            f"{type(bn).__name__} is not a BatchNorm", "pass the BatchNorm that follows the layer"
        )
    if bn.running_var is None:
        raise ModelError(
            "BatchNorm has no running statistics (track_running_stats=False), so it cannot be folded",
            "use track_running_stats=True, or leave the BatchNorm out of the pairs",
        )
    var = bn.running_var.detach()
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(var)
    return gamma / torch.sqrt(var + bn.eps)


def folded_weight(conv: nn.Module, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, b)`` of ``bn(layer(x))`` as one layer, with the BatchNorm in eval semantics (running stats).

    W is scaled per output channel by gamma/sqrt(var + eps); b = (b_layer - mean) * scale + beta.
    Handles Conv1d/Conv2d/Linear (weight axis 0 is out) and ConvTranspose1d/2d (out is axis 1, per group).
    """
    if not isinstance(conv, BN_PAIRED_TYPES) or not isinstance(bn, _BatchNorm):
        raise ModelError(
            f"cannot fold {type(bn).__name__} into {type(conv).__name__}",
            "pass a Conv1d/Conv2d/ConvTranspose1d/ConvTranspose2d/Linear and the BatchNorm that follows it",
        )
    w = conv.weight.detach()
    transposed = getattr(conv, "transposed", False)
    out = w.shape[1] * conv.groups if transposed else w.shape[0]
    if bn.num_features != out:
        raise ModelError(
            f"BatchNorm has {bn.num_features} features but the layer {out} output channels",
            "pair each layer with the BatchNorm applied to its output",
        )
    scale = bn_scale(bn).to(w.dtype)
    mean = bn.running_mean.detach().to(w.dtype)
    beta = bn.bias.detach().to(w.dtype) if bn.bias is not None else torch.zeros_like(mean)
    spatial = [1] * (w.dim() - 2)
    if transposed:  # weight (in, out / groups, *k): output channel g·(out/groups) + j is [g-th block, j]
        g = conv.groups
        cin, cout_g = w.shape[0], w.shape[1]
        w_f = (w.reshape(g, cin // g, cout_g, *w.shape[2:]) * scale.reshape(g, 1, cout_g, *spatial)).reshape(
            w.shape
        )
    else:
        w_f = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    b = conv.bias.detach() if conv.bias is not None else torch.zeros_like(mean)
    return w_f, (b - mean) * scale + beta


def parameter_holders(model: nn.Module) -> dict[int, list[str]]:
    """``id(Parameter) -> names of the distinct modules that hold it`` as their own parameter, in
    registration order. A module registered under several names is one holder (its first name);
    ``""`` is the model itself."""
    holders: dict[int, dict[int, str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            holders.setdefault(id(p), {}).setdefault(id(module), name)
    return {k: list(v.values()) for k, v in holders.items()}


@torch.no_grad()
def write_folded(model: nn.Module, name: str, weight: torch.Tensor, bias: torch.Tensor) -> list[str]:
    """Write a folded ``(weight, bias)`` (e.g. from :func:`folded_weight`) into layer ``name``, in place.

    A weight or bias ``Parameter`` the layer shares with other modules (tied) gets replaced by a new
    Parameter of the layer's own, so those modules keep the unfolded values and compute what they
    computed; returns their names (empty when nothing was tied; ``""`` is the model itself). An
    unshared Parameter is overwritten in place (it stays the same object). A layer without bias gets
    one.
    """
    layer = model.get_submodule(name)
    holders = parameter_holders(model)
    untied: list[str] = []
    for attr, value in (("weight", weight), ("bias", bias)):
        param = getattr(layer, attr)
        others = [] if param is None else holders.get(id(param), [])
        others = [n for n in others if model.get_submodule(n) is not layer]
        if param is not None and not others:
            param.copy_(value)
            continue
        grad = True if param is None else param.requires_grad
        setattr(layer, attr, nn.Parameter(value.detach().clone(), requires_grad=grad))
        untied += [n for n in others if n not in untied]
    return untied


# --------------------------------------------------------------------------- normalisation folding
@dataclass(frozen=True)
class NormFolding:
    """Which normalisations fold into the layer before them, and why the others do not.

    ``pairs``: layer name -> the BatchNorm applied directly (and only) to its output, which folds
    into it. ``unfolded``: every other normalisation the forward calls -> why it does not fold (a
    phrase). ``after``: for those of ``unfolded`` applied directly to a Conv/ConvTranspose/Linear's
    output, that layer (its map, hence its ``L``, leaves the normalisation out).
    """

    pairs: dict[str, str]
    unfolded: dict[str, str]
    after: dict[str, str]


def _producer(node: Any) -> str:
    """How a warning names the node a normalisation is applied to."""
    if not isinstance(node, fx.Node):
        return "a constant"
    if node.op == "placeholder":
        return "the model input"
    if node.op == "call_module":
        return str(node.target)
    return op_name(node)


def _unfoldable(norm: nn.Module) -> str | None:
    """Why a normalisation cannot fold into any layer, whatever it follows; None for a foldable one."""
    if not isinstance(norm, _BatchNorm):
        return f"{type(norm).__name__} normalises each sample by its own statistics, which no weight can fold"
    if norm.running_var is None:
        return "it has no running statistics (track_running_stats=False)"
    return None


def _why_not_paired(
    gm: fx.GraphModule, norm: nn.Module, norm_nodes: list[fx.Node], layer_nodes: dict[str, list[fx.Node]]
) -> tuple[str | None, str | None]:
    """``(layer it follows, why it does not fold into it or None)`` for one normalisation module."""
    modules = dict(gm.named_modules())
    producers = [n.args[0] if n.args else None for n in norm_nodes]
    first = producers[0]
    layer = (
        str(first.target)
        if isinstance(first, fx.Node)
        and first.op == "call_module"
        and isinstance(modules.get(str(first.target)), BN_PAIRED_TYPES)
        else None
    )
    reason = _unfoldable(norm)
    if reason is not None:
        return layer, reason
    if layer is None:
        return None, f"it follows {_producer(first)}, not a Conv/ConvTranspose/Linear directly"
    if any(not isinstance(p, fx.Node) or p.target != layer for p in producers):
        return layer, "it is also applied to something else than the output of " + layer
    for call in layer_nodes[layer]:
        if len(call.users) != 1 or next(iter(call.users)) not in norm_nodes:
            return layer, f"{layer}'s output also feeds other operations"
    if norm.num_features != out_channels(modules[layer]):
        return (
            layer,
            f"it has {norm.num_features} features and {layer} {out_channels(modules[layer])} outputs",
        )
    return layer, None


def norm_folding(model: nn.Module, layer_outputs: Mapping[str, tuple[int, ...]] | None = None) -> NormFolding:
    """Pair every BatchNorm that folds with the Conv/ConvTranspose/Linear whose output it normalises.

    A BatchNorm (with running statistics) folds into a layer when every call of the layer feeds only
    it and every call of it normalises that layer's output, its features matching the layer's output
    channels. Read from the fx graph (:func:`trace_leaves`). ``layer_outputs`` (layer name -> per-sample
    output shape, e.g. from :func:`layer_geometry`) rules out a Linear whose output is not ``(N, C)``:
    a BatchNorm1d normalises dim 1, which is then not the Linear's features. Without it a Linear
    feeding a BatchNorm is taken to output ``(N, C)``. Where tracing fails, a layer pairs with the
    BatchNorm registered right after it (leaf modules in ``named_modules()`` order) when the channels
    match, and every other normalisation is reported unfolded.
    """
    named = dict(model.named_modules())
    norms = {n: m for n, m in named.items() if isinstance(m, NORM_TYPES)}
    gm = trace_leaves(model)
    if gm is None:
        leaves = [(n, m) for n, m in named.items() if n and not any(True for _ in m.children())]
        pairs = {
            name: nxt_name
            for (name, m), (nxt_name, nxt) in zip(leaves, leaves[1:])
            if isinstance(m, BN_PAIRED_TYPES)
            and isinstance(nxt, _BatchNorm)
            and _unfoldable(nxt) is None
            and nxt.num_features == out_channels(m)
        }
        folded = set(pairs.values())
        unfolded = {
            n: _unfoldable(m)
            or "the model does not trace with torch.fx and it is not registered right after "
            "a Conv/ConvTranspose/Linear of matching channels"
            for n, m in norms.items()
            if n not in folded
        }
        return NormFolding(pairs, unfolded, {})
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(str(node.target), []).append(node)
    params = dict(gm.named_parameters())  # a get_attr node reads a Parameter outside its module
    read = {
        id(params[str(n.target)]) for n in gm.graph.nodes if n.op == "get_attr" and str(n.target) in params
    }
    pairs, unfolded, after = {}, {}, {}
    for name, norm in norms.items():
        if name not in calls:
            continue  # never called: it changes nothing
        layer, reason = _why_not_paired(gm, norm, calls[name], calls)
        shape = (layer_outputs or {}).get(layer or "")
        if reason is None and isinstance(named[layer], nn.Linear) and shape is not None and len(shape) != 1:
            reason = f"it normalises dim 1 of {layer}'s {tuple(shape)} output per sample, not its features"
        if reason is None and any(id(p) in read for p in named[layer].parameters(recurse=False)):
            reason = f"the forward also uses {layer}'s weight or bias outside it, which folding would change"
        if reason is None:
            pairs[layer] = name
        else:
            unfolded[name] = reason
            if layer is not None:
                after[name] = layer
    return NormFolding(pairs, unfolded, after)


def find_conv_bn_pairs(model: nn.Module) -> dict[str, str]:
    """Map layer name -> BatchNorm name for each Conv/ConvTranspose/Linear whose output feeds only a
    BatchNorm that folds into it: the ``pairs`` of :func:`norm_folding`."""
    return norm_folding(model).pairs


def fold_batchnorm(model: nn.Module, example_input: Any = None) -> dict[str, str]:
    """Fold, in place, every BatchNorm that directly follows a Conv/ConvTranspose/Linear into it
    (eval semantics) and warn, in one line, naming each normalisation left unfolded and why.

    Each folded BatchNorm is replaced by ``nn.Identity``; returns the pairs, layer name -> bn name.
    A layer whose weight (or bias) ``Parameter`` another module also holds (tied weights) gets its own
    folded copy, the others keep the unfolded one (:func:`write_folded`), named in one warning: the
    model's function is kept, the tie is not. A BatchNorm after a layer whose weight the forward also
    uses outside it (``F.linear(x, self.fc.weight)``) is left unfolded, with the reason in the warning.
    ``example_input`` (optional, what :func:`example_args` accepts) lets :func:`norm_folding` check
    that a Linear's output is ``(N, C)`` before folding a BatchNorm1d into it.
    """
    outputs = None
    if example_input is not None:
        args = example_args(model, example_input)
        outputs = {n: c.output_shape for n, c in observe_layers(model, tuple(a[:1] for a in args))[0].items()}
    folding = norm_folding(model, outputs)
    untied: dict[str, list[str]] = {}
    for conv_name, bn_name in folding.pairs.items():
        w, b = folded_weight(model.get_submodule(conv_name), model.get_submodule(bn_name))
        others = write_folded(model, conv_name, w, b)
        if others:
            untied[conv_name] = others
        model.set_submodule(bn_name, nn.Identity())
    if untied:
        listed = "; ".join(
            f"{n} from {', '.join(o or 'the model' for o in others)}" for n, others in untied.items()
        )
        warn(
            f"BatchNorm folding unties weights shared between layers: {listed} (the folded layer gets its own "
            "folded copy, the others keep the unfolded weight: the model computes the same, but that weight is "
            "now stored, quantized and costed twice) -- fix: nothing to do if that is intended; to keep the "
            "weights tied, leave BatchNorm unfolded (fold_bn=False)",
        )
    if folding.unfolded:
        listed = "; ".join(f"{n} ({why})" for n, why in folding.unfolded.items())
        warn(
            f"BatchNorm folding leaves these normalisations in float, unfolded: {listed} -- fix: apply each "
            "BatchNorm (with running statistics) directly to its Conv/ConvTranspose/Linear's output, before "
            "the activation, and use that layer's weight only through the layer, to have it folded; a "
            "LayerNorm/GroupNorm/InstanceNorm cannot be folded",
        )
    return folding.pairs
