"""Operator norms of a layer's linear map: the exact stacked map of a small layer, a power/Lanczos
estimate of its top singular values for a large one, and the input-shape check both need."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError, ModelError
from ..nnutils import (
    QUANTIZABLE_TYPES,
    out_channels,
)

_BLOCK = 4  # vectors per block: near-equal top singular values do not stall the iteration


# ------------------------------------------------------------------------------------ operator norm
def check_input_shape(layer: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Raise :class:`ConfigError` unless ``input_shape`` (per sample) fits ``layer``."""
    if isinstance(layer, nn.Linear):
        ok = len(input_shape) >= 1 and input_shape[-1] == layer.in_features
        want = f"(..., {layer.in_features})"
    else:
        n_spatial = 1 if isinstance(layer, nn.Conv1d) else 2
        ok = len(input_shape) == n_spatial + 1 and input_shape[0] == layer.in_channels
        want = f"({layer.in_channels}, {', '.join(['*'] * n_spatial)})"
    if not ok:
        raise ConfigError(
            f"input_shape {tuple(input_shape)} does not fit {type(layer).__name__} (expects {want})",
            "pass the per-sample input shape, without the batch dimension",
        )


def _linear_map(
    layer: nn.Module, weight: torch.Tensor, out_scale: torch.Tensor | None, copies: int = 1
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The layer's forward without bias, on batched inputs, with ``weight`` in place of its own;
    ``copies`` > 1: a conv with ``copies``·groups groups (see :func:`stacked_layer_map`)."""
    groups, channel = getattr(layer, "groups", 1) * copies, 1
    if isinstance(layer, nn.ConvTranspose2d):
        geometry = (layer.stride, layer.padding, layer.output_padding, groups, layer.dilation)

        def fmap(x: torch.Tensor) -> torch.Tensor:
            return F.conv_transpose2d(x, weight, None, *geometry)

    elif isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        conv = F.conv1d if isinstance(layer, nn.Conv1d) else F.conv2d
        # As nn.Conv*d does: pad explicitly (reflect/replicate/circular are linear too), then no padding.
        pad, mode = layer._reversed_padding_repeated_twice, layer.padding_mode
        padding = layer.padding if mode == "zeros" else 0

        def fmap(x: torch.Tensor) -> torch.Tensor:
            x = x if mode == "zeros" else F.pad(x, pad, mode=mode)
            return conv(x, weight, None, layer.stride, padding, layer.dilation, groups)

    elif isinstance(layer, nn.Linear):
        channel = -1

        def fmap(x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, weight)

    else:
        raise ModelError(
            f"operator_norm does not support {type(layer).__name__}",
            f"pass one of {', '.join(t.__name__ for t in QUANTIZABLE_TYPES)}",
        )
    if out_scale is None:
        return fmap

    def scaled(x: torch.Tensor) -> torch.Tensor:
        y = fmap(x)
        shape = [1] * y.dim()
        shape[channel] = -1
        return y * out_scale.reshape(shape)

    return scaled


def stacked_layer_map(
    layer: nn.Module, weights: torch.Tensor, out_scale: torch.Tensor | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """K bias-free maps of one conv layer in one call, ``weights`` ``(K, *layer.weight.shape)``: the
    layer's own conv (stride, padding and its mode, dilation, output_padding) with K·groups groups;
    input ``(B, K·C_in, *spatial)``, map k applies ``weights[k]`` (then ``out_scale`` per output
    channel) to channel group k. :class:`ModelError` for a Linear layer (exact SVD, nothing to stack)."""
    if isinstance(layer, nn.Linear) or not isinstance(layer, QUANTIZABLE_TYPES):
        raise ModelError(f"stacked_layer_map does not support {type(layer).__name__}", "pass a conv layer")
    k = weights.shape[0]
    scale = None if out_scale is None else out_scale.reshape(-1).repeat(k)
    return _linear_map(layer, weights.reshape(-1, *weights.shape[2:]), scale, copies=k)


class OperatorNorm(NamedTuple):
    """What :func:`operator_norm` found: ``sigma`` (the largest singular value), the ``iterations``
    spent (``max_iter``: ``tol`` not reached; 1 for a Linear layer's exact SVD), and ``basis``, the
    final block of right singular vectors to warm-start a nearby map with (None for Linear layers)."""

    sigma: float
    iterations: int
    basis: torch.Tensor | None


def operator_norm(
    layer: nn.Module,
    input_shape: Sequence[int],
    *,
    weight: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
    tol: float = 1e-6,
    max_iter: int = 500,
    seed: int = 0,
    init: torch.Tensor | None = None,
) -> OperatorNorm:
    """Largest singular value of the linear map ``layer`` computes (bias excluded), by block LOBPCG
    (:func:`top_singular_values`), stopping when the estimated remaining change is below ``tol``.

    The map runs on one sample of per-sample shape ``input_shape`` ((C, L), (C, H, W) or (..., features))
    with the layer's real stride, padding (and mode), dilation, groups and output_padding; its adjoint
    is autograd's. ``weight`` replaces the layer's weight (same shape) to score a quantized Ŵ on the
    same geometry; ``out_scale`` (one factor per output channel) multiplies the output (an unfolded
    BatchNorm scale). Float64 from a seeded start block, so one seed gives comparable ``L`` and ``L̂``;
    ``init`` (a ``basis`` of the same layer geometry) replaces the seeded start, so a quantized Ŵ ≈ W
    converges in a few steps from W's. A Linear layer's norm is an exact SVD. Returns an
    :class:`OperatorNorm`. Raises :class:`ModelError` for a layer of another type,
    :class:`ConfigError` for a misfit shape or weight, or ``max_iter < 1``/``tol <= 0``.

    >>> import torch
    >>> from aq_brevitas.score.norms import operator_norm
    >>> layer = torch.nn.Linear(3, 2, bias=False)
    >>> with torch.no_grad():
    ...     _ = layer.weight.copy_(torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]]))
    >>> operator_norm(layer, (3,))
    OperatorNorm(sigma=4.0, iterations=1, basis=None)
    """
    if not isinstance(layer, QUANTIZABLE_TYPES):
        raise ModelError(
            f"operator_norm does not support {type(layer).__name__}",
            f"pass one of {', '.join(t.__name__ for t in QUANTIZABLE_TYPES)}",
        )
    shape = tuple(int(s) for s in input_shape)
    check_input_shape(layer, shape)
    w = layer.weight if weight is None else weight
    if tuple(w.shape) != tuple(layer.weight.shape):
        raise ConfigError(
            f"weight of shape {tuple(w.shape)} does not fit the layer's {tuple(layer.weight.shape)}",
            "pass a weight with the layer's own shape (BatchNorm folded per output channel)",
        )
    if max_iter < 1 or not tol > 0:
        raise ConfigError(f"max_iter={max_iter}, tol={tol} are out of range", "use max_iter >= 1 and tol > 0")
    device, w64 = w.device, w.detach().to(torch.float64)
    scale64 = None if out_scale is None else out_scale.detach().to(device, torch.float64).reshape(-1)
    if scale64 is not None and scale64.numel() != out_channels(layer):
        raise ConfigError(
            f"out_scale has {scale64.numel()} entries, the layer {out_channels(layer)} output channels",
            "pass one factor per output channel",
        )
    if isinstance(layer, nn.Linear):
        mat = w64 if scale64 is None else w64 * scale64[:, None]
        return OperatorNorm(float(torch.linalg.matrix_norm(mat, ord=2)), 1, None)
    q = start_block(math.prod(shape), seed, init).to(device)
    gram = stacked_gram(layer, shape, w64[None], scale64)
    sigma, its, basis = top_singular_values(gram, q[None], tol=tol, max_iter=max_iter)
    return OperatorNorm(float(sigma[0]), int(its[0]), basis[0] if sigma[0] > 0 else None)


def start_block(n: int, seed: int, init: torch.Tensor | None = None) -> torch.Tensor:
    """The ``(n, k)`` orthonormal float64 start block: ``init`` when it has that shape, else seeded."""
    k = min(_BLOCK, n)
    if init is not None and tuple(init.shape) == (n, k):
        return init.to(torch.float64)
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0]


def stacked_gram(
    layer: nn.Module, shape: tuple[int, ...], weights: torch.Tensor, out_scale: torch.Tensor | None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``gram(v, active)``: AₖᵀAₖ applied to ``v[i]`` (``(n, j)`` vectors of per-sample ``shape``) for
    each map ``k = active[i]`` of :func:`stacked_layer_map` over ``weights``; the adjoint is
    autograd's vector-Jacobian product of the same map, so the two cannot disagree."""
    state: dict[str, Any] = {}

    def gram(v: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        key = tuple(active.tolist())
        if state.get("key") != key:
            state["key"], state["map"] = key, stacked_layer_map(layer, weights[active], out_scale)
        m, n, j = v.shape
        u, vjp_fn = torch.func.vjp(state["map"], v.permute(2, 0, 1).reshape(j, m * shape[0], *shape[1:]))
        return vjp_fn(u)[0].reshape(j, m, n).permute(1, 2, 0)

    return gram


def top_singular_values(
    gram: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor, *, tol: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """σ_max of K maps at once by block LOBPCG on their Gram maps (:func:`stacked_gram`) from
    orthonormal ``x0`` ``(K, n, k)``: Rayleigh-Ritz on span[block, residual, last step], one Gram
    product a step; tens of steps where power iteration needs hundreds on the near-equal top singular
    values of convs. Ritz values only grow (lower bounds on σ_max²); a map stops when the change still
    to come (extrapolated from its last two steps) is below ``tol`` relative, and leaves the batch.
    Returns per map ``sigma``, ``iterations`` (``max_iter``: not converged) and its final block."""
    K, _, k = x0.shape
    sigma, prev, prev2 = (torch.zeros(K, dtype=torch.float64) for _ in range(3))
    iters, active, out = torch.zeros(K, dtype=torch.long), torch.arange(K), x0.clone()
    ax = gram(x0, active)
    theta, y = torch.linalg.eigh(x0.mT @ ax)  # Ritz pairs of the start block (eigh reads one triangle)
    x, ax, p, ap = x0 @ y, ax @ y, None, None
    for it in range(1, max_iter + 1):
        s = theta[:, -1].clamp_min(0.0).sqrt()
        p1, p2 = prev[active], prev2[active]
        step, last = (s - p1).abs(), (p1 - p2).abs()
        r = step / last.clamp_min(1e-300)  # linear rate r leaves ≈ step·r/(1-r) to go
        remaining = torch.where((step > 0) & (step < last), step * r / (1 - r).clamp_min(1e-300), step)
        done = (s == 0) | ((it >= 3) & (torch.maximum(step, remaining) <= tol * s)) | (it == max_iter)
        sigma[active], iters[active], out[active] = s, it, x
        prev2[active], prev[active] = p1, s
        if bool(done.all()):
            break
        keep = ~done
        active, x, ax, theta, p, ap = (t if t is None else t[keep] for t in (active, x, ax, theta, p, ap))
        res = ax - x * theta[:, None, :]
        res = res / res.norm(dim=1, keepdim=True).clamp_min(1e-300)
        n_b = 2 if p is None else 3
        basis = torch.cat([x, res, p][:n_b], 2)
        abasis = torch.cat([ax, gram(res, active), ap][:n_b], 2)
        lam, v = torch.linalg.eigh(basis.mT @ basis)  # orthonormalise, dropping dependent directions
        t = v * torch.where(lam > 1e-10 * lam[:, -1:], lam.clamp_min(1e-300).rsqrt(), 0.0)[:, None, :]
        basis, abasis = basis @ t, abasis @ t
        lam, y = torch.linalg.eigh(basis.mT @ abasis)
        theta, y = lam[:, -k:], y[:, :, -k:]
        x_next, ax_next = basis @ y, abasis @ y
        c = x.mT @ x_next  # P: the part of the new block outside the old one
        p, ap = x_next - x @ c, ax_next - ax @ c
        x, ax = x_next, ax_next
    return sigma, iters, out
