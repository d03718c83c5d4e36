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

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F

from .errors import ConfigError, ModelError
from .forward import check_images, eval_mode, example_args, paused_observers, require_single_input
from .nnutils import (
    QUANTIZABLE_TYPES,
    LayerCalls,
    folded_weight,
    norm_folding,
    observe_layers,
    out_channels,
    plain_tensor,
    quantizable_layers,
    trace_leaves,
    weight_owners,
)

_BLOCK = 4  # vectors per block: near-equal top singular values do not stall the iteration
GAINS = ("spectral", "jacobian")
NON_CHAIN_WARNING = (
    "model is not a chain (residual or branching graph): gain_spectral, the product of downstream "
    "operator norms in execution order, is only a heuristic upper-bound estimate there; prefer gain_jacobian"
)
_NO_LAYERS = "model has no quantizable layers (Conv1d/Conv2d/ConvTranspose2d/Linear)"


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


def operator_norm(layer: nn.Module, input_shape: Sequence[int], **settings: Any) -> tuple[float, int]:
    """Largest singular value of the linear map ``layer`` computes (bias excluded), by block LOBPCG
    (:func:`top_singular_values`), stopping when the estimated remaining change is below ``tol``.

    The map runs on one sample of per-sample shape ``input_shape`` ((C, L), (C, H, W) or (..., features))
    with the layer's real stride, padding (and mode), dilation, groups and output_padding; its adjoint
    is autograd's. ``weight`` replaces the layer's weight (same shape) to score a quantized Ŵ on the
    same geometry; ``out_scale`` (one factor per output channel) multiplies the output (an unfolded
    BatchNorm scale). Float64 from a seeded start block, so one seed gives comparable ``L`` and ``L̂``.
    Returns ``(sigma, iterations)``; ``iterations == max_iter`` means it did not reach ``tol``. A
    Linear layer's norm is an exact SVD (1 "iteration"). ``settings``: :func:`operator_norm_basis`'s
    keywords ``weight``, ``out_scale``, ``tol`` (1e-6), ``max_iter`` (500), ``seed`` (0). Raises
    :class:`ModelError` for a layer of another type, :class:`ConfigError` for a misfit shape or weight.
    """
    sigma, it, _ = operator_norm_basis(layer, input_shape, **settings)
    return sigma, it


def operator_norm_basis(
    layer: nn.Module,
    input_shape: Sequence[int],
    *,
    weight: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
    tol: float = 1e-6,
    max_iter: int = 500,
    seed: int = 0,
    init: torch.Tensor | None = None,
) -> tuple[float, int, torch.Tensor | None]:
    """:func:`operator_norm` plus the final block of right singular vectors, for warm starts: ``init``
    (such a block, same layer geometry) replaces the seeded start, so a quantized Ŵ ≈ W converges in a
    few steps from W's. The block is None for Linear layers (exact SVD, no iteration)."""
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
        return float(torch.linalg.matrix_norm(mat, ord=2)), 1, None
    q = start_block(math.prod(shape), seed, init).to(device)
    gram = stacked_gram(layer, shape, w64[None], scale64)
    sigma, its, basis = top_singular_values(gram, q[None], tol=tol, max_iter=max_iter)
    return float(sigma[0]), int(its[0]), (basis[0] if sigma[0] > 0 else None)


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


# ------------------------------------------------------------------------------------------ chains
class _TensorFlags(fx.Interpreter):
    """Runs the graph once and records which nodes produce tensors (vs. sizes, shapes and other metadata)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.is_tensor: dict[fx.Node, bool] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        seen: list[bool] = []
        fx.node.map_aggregate(out, lambda a: seen.append(isinstance(a, torch.Tensor)) or a)
        self.is_tensor[n] = any(seen) or plain_tensor(out) is not None
        return out


def is_chain(model: nn.Module, example_inputs: torch.Tensor) -> bool:
    """True when the data path is a single chain: no forks, no merges (residual adds, concats).

    ``example_inputs``: a tensor, or a tuple for a multi-input model (never a chain).

    Traces with torch.fx and runs the graph on ``example_inputs`` to tell tensors from metadata (so
    ``x.view(x.size(0), -1)`` is not a fork). Every data-carrying node must have at most one data input
    and one data user, and each quantizable layer must be called once. Untraceable models -> False.
    """
    args = example_args(model, example_inputs, "example_inputs")
    gm = trace_leaves(model)
    if gm is None or len(args) > 1:  # several inputs merge somewhere: no chain
        return False
    flags = _TensorFlags(gm)
    try:
        with eval_mode(gm), paused_observers(gm), torch.no_grad():
            flags.run(*args)
    except Exception:  # a graph that traces but does not run as traced is no chain we can vouch for
        return False
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if not placeholders:
        return False
    data: set[fx.Node] = {placeholders[0]}
    for n in nodes:
        if n.op == "placeholder":
            continue
        ins = {a for a in n.all_input_nodes if a in data}
        if n.op == "output":
            if len(ins) != 1:
                return False
            continue
        if not ins or not flags.is_tensor.get(n, False):
            continue
        if len(ins) > 1:
            return False
        data.add(n)
    for n in data:
        if sum(1 for u in n.users if u in data or u.op == "output") > 1:
            return False
    modules = dict(gm.named_modules())
    calls = [
        n.target
        for n in nodes
        if n.op == "call_module" and isinstance(modules.get(n.target), QUANTIZABLE_TYPES)
    ]
    return len(calls) == len(set(calls)) and all(
        n in data for n in nodes if n.op == "call_module" and n.target in set(calls)
    )


# ---------------------------------------------------------------------------------------- jacobian
def _output_tensor(out: Any) -> torch.Tensor:
    t = plain_tensor(out)
    if t is None:
        raise ModelError(
            f"model output is a {type(out).__name__}, not a tensor",
            "wrap the model so that forward returns the logits tensor",
        )
    return t


def _jacobian_sigmas(
    run: Callable[[torch.Tensor], torch.Tensor],
    delta_shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    *,
    tol: float,
    max_iter: int,
    seed: int,
) -> tuple[torch.Tensor, int]:
    """Per-example ‖J_i‖₂ of ``delta -> run(delta)`` at delta = 0, by batched power iteration.

    Examples are independent (eval mode), so J is block diagonal and one backward pass applies every
    J_iᵀ at once. Stops when the RMS of the per-example norms changes by less than ``tol`` (relative). The forward graph is built once; J v comes from double backward through Jᵀu (linear in
    u), J^T(Jv) from a plain backward, each vector normalised per example.
    """
    n = delta_shape[0]
    with torch.enable_grad():
        delta = torch.zeros(delta_shape, dtype=dtype, device=device, requires_grad=True)
        y = run(delta)
        if not y.requires_grad:
            return torch.zeros(n, dtype=torch.float64), 0
        u = torch.zeros_like(y, requires_grad=True)
        (jt_u,) = torch.autograd.grad(y, delta, u, create_graph=True, allow_unused=True)
        if jt_u is None or not jt_u.requires_grad:
            return torch.zeros(n, dtype=torch.float64), 0
        gen = torch.Generator().manual_seed(seed)
        v = torch.randn(delta_shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        v = v / v.flatten(1).norm(dim=1).clamp_min(1e-30).reshape(-1, *([1] * (v.dim() - 1)))
        sigma = prev = torch.zeros(n, dtype=torch.float64)
        it = 0
        for it in range(1, max_iter + 1):
            (jv,) = torch.autograd.grad(jt_u, u, v, retain_graph=True, allow_unused=True)
            if jv is None:
                return torch.zeros(n, dtype=torch.float64), it
            (jtjv,) = torch.autograd.grad(y, delta, jv, retain_graph=True)
            norms = jtjv.flatten(1).norm(dim=1)
            sigma = norms.detach().to(torch.float64).cpu().sqrt()
            v = (jtjv / norms.clamp_min(1e-30).reshape(-1, *([1] * (jtjv.dim() - 1)))).detach()
            # Callers use the RMS over examples only: stop when it has converged, not when the slowest
            # example has (one slow example would keep a whole batch iterating).
            if abs(_rms(sigma) - _rms(prev)) <= tol * _rms(sigma):
                break
            prev = sigma
    return sigma, it


def _rms(sigmas: torch.Tensor) -> float:
    return float(sigmas.square().mean().sqrt())


def local_jacobian_norm(
    model: nn.Module, x: torch.Tensor, *, tol: float = 1e-5, max_iter: int = 500, seed: int = 0
) -> float:
    """J_loc: root-mean-square over examples of the per-example input-output Jacobian norm ‖∂y_i/∂x_i‖₂.

    The float network's local amplification of a small input perturbation at ``x`` (model in eval mode),
    used by the data-driven adversarial term of the score.
    """
    require_single_input(model, "local_jacobian_norm")
    check_images(x, "x", unit_range=False)
    x = x.detach()
    with eval_mode(model), paused_observers(model):
        sig, _ = _jacobian_sigmas(
            lambda d: _output_tensor(model(x + d)),
            tuple(x.shape),
            x.dtype,
            x.device,
            tol=tol,
            max_iter=max_iter,
            seed=seed,
        )
    return _rms(sig)


def _layer_jacobian(
    model: nn.Module, target: nn.Module, args: tuple[torch.Tensor, ...], out_shape: tuple[int, ...], **kw: Any
) -> tuple[float, int]:
    """Λ_l by the Jacobian of the model output w.r.t. ``target``'s output (its first call per forward)."""
    holder: dict[str, Any] = {}

    def hook(_m: nn.Module, _args: Any, out: Any) -> Any:
        if holder.get("done") or not isinstance(out, torch.Tensor):
            return None
        holder["done"] = True
        return out + holder["delta"]

    def run(delta: torch.Tensor) -> torch.Tensor:
        holder["delta"], holder["done"] = delta, False
        handle = target.register_forward_hook(hook)
        try:
            return _output_tensor(model(*args))
        finally:
            handle.remove()

    sig, it = _jacobian_sigmas(run, out_shape, **kw)
    return _rms(sig), it


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
    _output_tensor(out)
    missing = [n for n in layers if n not in seen]
    if missing:
        warnings.warn(f"layers never called in forward are not scored: {', '.join(missing)}", stacklevel=3)
    repeated = [f"{n} ({c.calls} calls)" for n, c in seen.items() if c.calls > 1]
    if repeated:
        warnings.warn(
            f"layers called more than once per forward: {', '.join(repeated)}; their cost (MACs, BOPs) "
            "counts every call, their L, A and gain are measured at the first call -- fix: if the calls "
            "see different inputs, give each call its own module (copy.deepcopy) so each gets its own score",
            stacklevel=3,
        )
    if not seen:
        raise ModelError(_NO_LAYERS + " is called by forward", "check the model's forward")
    return seen


def _warn_norms_left_out(unfolded: dict[str, str], after: dict[str, str], scored: Iterable[str]) -> None:
    """One line naming each scored layer whose output goes through a normalisation L leaves out."""
    scored = set(scored)
    left = [f"{layer} ({norm}: {unfolded[norm]})" for norm, layer in after.items() if layer in scored]
    if left:
        warnings.warn(
            f"L of these layers leaves out the normalisation applied to their output, which does not fold: "
            f"{'; '.join(left)} -- fix: nothing to do with gain_jacobian, which includes it; to have L "
            "include a BatchNorm, give it running statistics and apply it to the layer's output alone",
            stacklevel=3,
        )


def _float_score(
    name: str, layer: nn.Module, bn: nn.Module | None, bn_name: str | None, seen: LayerCalls, **kw: Any
) -> LayerScore:
    """The :class:`LayerScore` of one layer, gains not yet set; ``kw`` goes to :func:`operator_norm`."""
    weight = folded_weight(layer, bn)[0] if bn is not None else None
    L, iters = operator_norm(layer, seen.input_shape, weight=weight, **kw)
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
    several inputs a tuple of such batches (same N), see :func:`~aq_brevitas.nnutils.example_args`.
    One hooked forward on it (eval mode, no grad) gives shapes, ``A``, MACs (summed over every call of
    a layer) and the order; ``L`` is the operator norm on the real input shape of the layer's map with
    the BatchNorm applied to its output folded in (Conv/ConvTranspose/Linear, see
    :func:`~aq_brevitas.nnutils.norm_folding`; a normalisation that cannot fold is named in a warning);
    ``gains`` picks which of ``gain_spectral`` / ``gain_jacobian`` to compute (the other stays None).
    A layer whose weight is an earlier layer's (tied) has ``params`` 0 and ``weight_of`` set. Layers
    never called are left out with a warning; layers called several times are scored at their first
    call, with a warning. Warns once when the spectral gain is asked for on a non-chain graph. The
    model comes back in its own mode, BatchNorm statistics untouched. Raises :class:`ConfigError`
    for bad inputs or gains, :class:`ModelError` for a model without quantizable layers or a failing
    forward (with the forward's own error, see :func:`~aq_brevitas.nnutils.reported_forward`).

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
    bad = [g for g in gains if g not in GAINS]
    if bad:
        raise ConfigError(f"unknown gain(s) {', '.join(map(repr, bad))}", f"use a subset of {GAINS}")
    layers = quantizable_layers(model)
    if not layers:
        raise ModelError(
            _NO_LAYERS,
            f"pass a model with {', '.join(t.__name__ for t in QUANTIZABLE_TYPES)} layers (Brevitas ones count)",
        )
    modules = dict(model.named_modules())
    owners = weight_owners(model)
    with eval_mode(model), paused_observers(model):
        seen = _observe(model, layers, args)
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
            downstream = 1.0
            for s in reversed(list(scores.values())):
                s.gain_spectral = downstream
                downstream *= s.L
            if not is_chain(model, args):
                warnings.warn(NON_CHAIN_WARNING, stacklevel=2)
        if "jacobian" in gains:
            x0 = args[0]
            for s in scores.values():
                target = modules[s.bn] if s.bn else layers[s.name]
                s.gain_jacobian, s.jacobian_iterations = _layer_jacobian(
                    model, target, args, (x0.shape[0], *s.output_shape), dtype=x0.dtype, device=x0.device,
                    tol=jacobian_tol, max_iter=max_iter, seed=seed,
                )  # fmt: skip
    return scores
