"""The arithmetic of folding a BatchNorm into the layer before it, and writing the folded weights back.

* :func:`bn_scale` and :func:`folded_weight`: ``bn(layer(x))`` as one layer, in eval semantics.
* :func:`write_folded`: put the folded ``(W, b)`` into the layer without changing any other module
  that holds the same ``Parameter`` (tied weights): such a Parameter is replaced by the layer's own
  copy, so the others keep computing what they computed (:func:`parameter_holders` finds them).

Which BatchNorm folds into which layer is read from the model's graph in :mod:`aq_brevitas.nnutils`
(``norm_folding``, ``fold_batchnorm``), which re-exports the names here. Nothing here imports another
module of the package except :mod:`aq_brevitas.errors`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import ModelError

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
