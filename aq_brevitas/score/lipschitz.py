"""Per-layer Lipschitz quantities for the bound of docs/method.md ("One bound, two losses").

For every quantizable layer l this module measures

- ``L``: the operator norm ‖W_l‖₂ of the linear map the layer computes (BatchNorm folded in where one
  follows). For a conv this is the norm of the convolution operator on the layer's real input shape,
  with its real stride, padding, dilation and groups -- not the norm of the reshaped kernel matrix;
- ``A``: the mean L2 norm of the layer's input on example (calibration) inputs;
- ``Λ`` (the gain of the network downstream of l), two ways: ``spectral`` (the product of the
  downstream ``L``, data-free, exact only for chains) and ``jacobian`` (power iteration on the
  Jacobian of the output with respect to the layer's output, on the example inputs).

The list of quantizable layer types, the MAC count, fx tracing and BatchNorm folding live in
:mod:`aq_brevitas.nnutils`; running the model (inputs, errors, mode guards) lives in
:mod:`aq_brevitas.forward`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ModelError, warn
from ..folding import folded_weight, norm_folding
from ..forward import eval_mode, example_args, paused_observers
from ..nnutils import (
    QUANTIZABLE_TYPES,
    LayerCalls,
    observe_layers,
    quantizable_layers,
    warn_never_called,
    weight_owners,
)
from .jacobian import is_chain, layer_jacobian, output_tensor
from .norms import operator_norm
from .passive import passive_norms

GAINS = ("spectral", "jacobian")
NON_CHAIN_WARNING = (
    "model is not a chain (residual or branching graph): gain_spectral, the product of downstream "
    "operator norms in execution order, is only a heuristic upper-bound estimate there; prefer gain_jacobian"
)
_NO_LAYERS = "model has no quantizable layers (Conv1d/Conv2d/ConvTranspose2d/Linear)"


# ------------------------------------------------------------------------------------------ scores
@dataclass
class LayerScore:
    """What the selection needs to know about one quantizable layer (see the module docstring)."""

    name: str
    type: str
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]  # per sample, at the first call
    output_shape: tuple[int, ...]  # per sample, at the first call
    params: int  # weight elements it stores (not the bias); 0 when it uses an earlier layer's weight
    macs: int  # multiply-accumulates per sample, summed over every call in one forward
    L: float  # operator norm of the (BN-folded) linear map
    bn: str | None  # the BatchNorm folded into L, if any
    A: float  # mean per-sample L2 norm of the layer's input (first call)
    gain_spectral: float | None  # Π of L over the quantizable layers after this one (execution order)
    gain_jacobian: float | None  # RMS over examples of ‖∂y/∂h_l‖₂ (h_l after the BN, if folded)
    iterations: int  # power iterations spent on L
    jacobian_iterations: int | None = None
    calls: int = 1  # calls per forward
    weight_of: str | None = None  # the layer whose weight it uses (tied weights), whose params count it

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("weight_shape", "input_shape", "output_shape"):
            d[k] = list(d[k])
        return d


def _observe(
    model: nn.Module, layers: dict[str, nn.Module], args: tuple[torch.Tensor, ...]
) -> dict[str, LayerCalls]:
    """One hooked no-grad forward: per layer called, in execution order, what :func:`observe_layers`
    records; warns about layers never called or called more than once."""
    seen, out = observe_layers(model, args, layers)
    output_tensor(out)
    warn_never_called([n for n in layers if n not in seen])
    repeated = [f"{n} ({c.calls} calls)" for n, c in seen.items() if c.calls > 1]
    if repeated:
        warn(
            f"layers called more than once per forward: {', '.join(repeated)}; their cost (MACs, BOPs) "
            "counts every call, their L, A and gain are measured at the first call -- fix: if the calls "
            "see different inputs, give each call its own module (copy.deepcopy) so each gets its own score",
        )
    if not seen:
        raise ModelError(_NO_LAYERS + " is called by forward", "check the model's forward")
    return seen


def _warn_norms_left_out(unfolded: dict[str, str], after: dict[str, str], scored: Iterable[str]) -> None:
    """One line naming each scored layer whose output goes through a normalisation L leaves out."""
    scored = set(scored)
    left = [f"{layer} ({norm}: {unfolded[norm]})" for norm, layer in after.items() if layer in scored]
    if left:
        warn(
            f"L of these layers leaves out the normalisation applied to their output, which does not fold: "
            f"{'; '.join(left)} -- fix: nothing to do with gain_jacobian, which includes it; to have L "
            "include a BatchNorm, give it running statistics and apply it to the layer's output alone",
        )


def _float_score(
    name: str, layer: nn.Module, bn: nn.Module | None, bn_name: str | None, seen: LayerCalls, *,
    tol: float, max_iter: int, seed: int,
) -> LayerScore:  # fmt: skip
    """The :class:`LayerScore` of one layer, gains not yet set; ``tol``, ``max_iter``, ``seed`` are
    :func:`operator_norm`'s."""
    weight = folded_weight(layer, bn)[0] if bn is not None else None
    L, iters, _ = operator_norm(layer, seen.input_shape, weight=weight, tol=tol, max_iter=max_iter, seed=seed)
    return LayerScore(
        name=name, type=type(layer).__name__, weight_shape=tuple(layer.weight.shape),
        input_shape=seen.input_shape, output_shape=seen.output_shape, calls=seen.calls,
        params=layer.weight.numel(), macs=seen.macs, A=seen.input_norm,
        L=L, bn=bn_name, iterations=iters, gain_spectral=None, gain_jacobian=None,
    )  # fmt: skip


def lipschitz_scores(
    model: nn.Module,
    example_inputs: Any,
    *,
    gains: Sequence[str] = GAINS,
    max_iter: int = 500,
    tol: float = 1e-6,
    jacobian_tol: float = 1e-5,
    seed: int = 0,
) -> dict[str, LayerScore]:
    """Score every quantizable layer the forward pass calls, in execution order.

    ``example_inputs`` is a float batch ``(N, *input_shape)``, or for a model whose forward takes
    several inputs a tuple of such batches (same N), see :func:`~aq_brevitas.forward.example_args`.
    One hooked forward on it (eval mode, no grad) gives shapes, ``A``, MACs (summed over every call of
    a layer) and the order; ``L`` is the operator norm on the real input shape of the layer's map with
    the BatchNorm applied to its output folded in (Conv/ConvTranspose/Linear, see
    :func:`~aq_brevitas.folding.norm_folding`; a normalisation that cannot fold is named in a warning);
    ``gains`` picks which of ``gain_spectral`` / ``gain_jacobian`` to compute (the other stays None).
    A layer whose weight is an earlier layer's (tied) has ``params`` 0 and ``weight_of`` set. Layers
    never called are left out with a warning (they stay float, :func:`~aq_brevitas.nnutils.warn_never_called`); layers called several times are scored at their first
    call, with a warning. Warns once when the spectral gain is asked for on a non-chain graph. The
    model comes back in its own mode, BatchNorm statistics untouched. Raises :class:`ConfigError`
    for bad inputs or gains, :class:`ModelError` for a model without quantizable layers or a failing
    forward (with the forward's own error, see :func:`~aq_brevitas.forward.reported_forward`).

    >>> import torch
    >>> from torch import nn
    >>> from aq_brevitas import lipschitz_scores
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    >>> scores = lipschitz_scores(model, torch.rand(8, 1, 8, 8))
    >>> [(s.type, s.input_shape, s.macs) for s in scores.values()]
    [('Conv2d', (1, 8, 8), 1296), ('Linear', (144,), 1440)]
    >>> scores["3"].gain_spectral, scores["3"].gain_jacobian  # the logits layer: nothing downstream
    (1.0, 1.0)
    """
    args = tuple(a.detach() for a in example_args(model, example_inputs, "example_inputs"))
    gains = tuple(gains)
    layers = _scored_layers(model, gains)
    modules = dict(model.named_modules())
    with eval_mode(model), paused_observers(model):
        seen = _observe(model, layers, args)
        owners = weight_owners(model, {n: layers[n] for n in seen})  # a never-called layer owns nothing
        folding = norm_folding(model, {n: c.output_shape for n, c in seen.items()})
        _warn_norms_left_out(folding.unfolded, folding.after, seen)
        scores = {}
        for name, calls in seen.items():
            bn_name = folding.pairs.get(name)
            bn = modules[bn_name] if bn_name else None
            s = _float_score(name, layers[name], bn, bn_name, calls, tol=tol, max_iter=max_iter, seed=seed)
            if owners.get(name, name) != name:  # a tied weight is stored, and costed in bits, once
                s.params, s.weight_of = 0, owners[name]
            scores[name] = s
        if "spectral" in gains:
            _spectral_gains(model, args, scores)
        if "jacobian" in gains:
            targets = {s.name: modules[s.bn] if s.bn else layers[s.name] for s in scores.values()}
            _jacobian_gains(model, args, scores, targets, tol=jacobian_tol, max_iter=max_iter, seed=seed)
    return scores


def _scored_layers(model: nn.Module, gains: tuple[str, ...]) -> dict[str, nn.Module]:
    """The quantizable layers; :class:`ConfigError` for an unknown gain, :class:`ModelError` for none."""
    bad = [g for g in gains if g not in GAINS]
    if bad:
        raise ConfigError(f"unknown gain(s) {', '.join(map(repr, bad))}", f"use a subset of {GAINS}")
    layers = quantizable_layers(model)
    if not layers:
        raise ModelError(
            _NO_LAYERS,
            f"pass a model with {', '.join(t.__name__ for t in QUANTIZABLE_TYPES)} layers (Brevitas ones count)",
        )
    return layers


def _spectral_gains(model: nn.Module, args: tuple[Any, ...], scores: dict[str, LayerScore]) -> None:
    """``gain_spectral``: the product of the downstream layers' ``L`` and of the bounds of the
    parameter-free ops between them (:mod:`aq_brevitas.score.passive`: pooling, upsampling) in
    execution order. Warns on a model that is not a chain, where it is only a heuristic, and names the
    ops that scale a perturbation but that it cannot bound."""
    order, functional = passive_norms(model, args)
    first = {name: i for i, (name, is_layer, _) in reversed(list(enumerate(order))) if is_layer}
    start = min(first.values(), default=len(order))  # ops before the first layer scale nothing scored
    downstream, unbounded = 1.0, list(functional)
    for i, (name, is_layer, norm) in reversed(list(enumerate(order))):
        if is_layer and first[name] == i and name in scores:
            scores[name].gain_spectral = downstream
            downstream *= scores[name].L
        elif not is_layer and i > start:
            if norm is None:
                unbounded.append(name)
            else:
                downstream *= norm
    if unbounded:
        warn(
            f"gain_spectral leaves out {', '.join(unbounded)}: parameter-free ops that scale a perturbation "
            "by a factor it does not bound -- fix: prefer gain_jacobian (estimate='jacobian'), which includes them"
        )
    if not is_chain(model, args):
        warn(NON_CHAIN_WARNING)


def _jacobian_gains(
    model: nn.Module,
    args: tuple[Any, ...],
    scores: dict[str, LayerScore],
    targets: dict[str, nn.Module],
    *,
    tol: float,
    max_iter: int,
    seed: int,
) -> None:
    """``gain_jacobian`` of each layer at ``targets[name]`` (the layer, or the BatchNorm folded into it)."""
    x0 = args[0]
    for s in scores.values():
        s.gain_jacobian, s.jacobian_iterations = layer_jacobian(
            model, targets[s.name], args, (x0.shape[0], *s.output_shape), dtype=x0.dtype, device=x0.device,
            tol=tol, max_iter=max_iter, seed=seed,
        )  # fmt: skip
