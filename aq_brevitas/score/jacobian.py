"""The local Jacobian gain of a layer on data: whether a model is a chain of layers, and the norm of
each layer's Jacobian at the observed inputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from ..errors import ModelError, a_type
from ..forward import check_images, eval_mode, example_args, paused_observers, require_single_input
from ..nnutils import (
    QUANTIZABLE_TYPES,
    math_attention,
    plain_tensor,
    trace_leaves,
)


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
def output_tensor(out: Any) -> torch.Tensor:
    t = plain_tensor(out)
    if t is None:
        raise ModelError(
            f"model output is {a_type(out)}, not a tensor",
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
    u), J^T(Jv) from a plain backward, each vector normalised per example. Attention runs on torch's
    math kernel (:func:`~aq_brevitas.nnutils.math_attention`): the fused ones have no double backward.
    """
    n = delta_shape[0]
    with torch.enable_grad(), math_attention():
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
            lambda d: output_tensor(model(x + d)),
            tuple(x.shape),
            x.dtype,
            x.device,
            tol=tol,
            max_iter=max_iter,
            seed=seed,
        )
    return _rms(sig)


def layer_jacobian(
    model: nn.Module,
    target: nn.Module,
    args: tuple[torch.Tensor, ...],
    out_shape: tuple[int, ...],
    *,
    dtype: torch.dtype,
    device: torch.device,
    tol: float = 1e-5,
    max_iter: int = 500,
    seed: int = 0,
) -> tuple[float, int]:
    """Λ_l by the Jacobian of the model output w.r.t. ``target``'s output (its first call per forward):
    ``(RMS over examples of ‖∂y_i/∂h_i‖₂, power iterations)``. ``out_shape`` is ``target``'s output
    shape (N, ...) for the ``args`` batch; the perturbation is of ``dtype`` on ``device``; ``tol``,
    ``max_iter`` and ``seed`` steer the power iteration (as :func:`local_jacobian_norm`'s)."""
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
            return output_tensor(model(*args))
        finally:
            handle.remove()

    sig, it = _jacobian_sigmas(run, out_shape, dtype, device, tol=tol, max_iter=max_iter, seed=seed)
    return _rms(sig), it
