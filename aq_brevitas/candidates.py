"""The candidate table: for every layer and every candidate spec, L̂, ‖ΔW‖₂ and the cost.

Ŵ comes from the very Brevitas quantizer the swap installs (:func:`convert.brevitas_layer`), never
from a re-implementation of the rounding, so a score describes exactly the layer that will run.
Norms are operator norms on the layer's real input shape, of the BN-folded map when a BatchNorm
follows (the BN scale multiplies Ŵ's output just as it multiplies W's).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .convert import brevitas_layer
from .errors import PolicyError
from .lipschitz import LayerScore, lipschitz_scores, operator_norm_basis
from .nnutils import bn_scale, check_images, fold_batchnorm
from .policy import FINN_ACT_BITS, FINN_MAX_BITS, TARGETS, LayerSpec, for_target, layer_cost  # noqa: F401 -- re-exported

DEFAULT_BITS = (2, 3, 4, 5, 6, 8)
DEFAULT_SCALINGS = ("max", "percentile", "mse")
DEFAULT_GRANULARITIES = ("per_tensor", "per_channel")
_NORM_MAX_ITER = 300  # power-iteration cap per candidate norm (tol decides in practice)


def default_candidates(
    bits: Iterable[int] = DEFAULT_BITS,
    scalings: Iterable[str] = DEFAULT_SCALINGS,
    granularities: Iterable[str] = DEFAULT_GRANULARITIES,
    act_bit_width: int | None = None,
) -> list[LayerSpec]:
    """The cross product bits × scaling × granularity (36 specs by default)."""
    return [LayerSpec(b, s, g, act_bit_width) for b, s, g in itertools.product(bits, scalings, granularities)]


@dataclass(frozen=True)
class CandidateRow:
    """One (layer, candidate) entry."""

    spec: LayerSpec
    L_hat: float  # ‖Ŵ(c)‖₂ of the (BN-folded) layer map
    dW_norm: float  # ‖Ŵ(c) − W‖₂
    weight_bits: int
    bops: int

    @property
    def weight_bytes(self) -> float:
        return self.weight_bits / 8

    def cost(self, kind: str) -> float:
        return {
            "avg_weight_bits": float(self.weight_bits),
            "weight_bytes": self.weight_bytes,
            "bops": float(self.bops),
        }[kind]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spec"] = self.spec.to_dict()
        return d


@dataclass
class CandidateTable:
    """Per-layer candidate rows plus the float scores they were measured against."""

    scores: dict[str, LayerScore]
    rows: dict[str, list[CandidateRow]] = field(default_factory=dict)
    # Ŵ per (layer, spec), kept so that scoring reuses the quantizer's output instead of re-running it.
    weights: dict[tuple[str, LayerSpec], torch.Tensor] = field(
        default_factory=dict, repr=False, compare=False
    )
    fold_bn: bool = False  # rows describe the BN-folded conv weights (what quantize(fold_bn=True) quantizes)

    @property
    def layers(self) -> list[str]:
        return list(self.rows)

    def row(self, layer: str, spec: LayerSpec) -> CandidateRow:
        for r in self.rows[layer]:
            if r.spec == spec:
                return r
        raise PolicyError(f"layer {layer!r} has no candidate {spec.short()}", "add it to the candidate set")

    def to_dict(self) -> dict[str, Any]:
        return {
            "scores": {n: s.to_dict() for n, s in self.scores.items()},
            "rows": {n: [r.to_dict() for r in rows] for n, rows in self.rows.items()},
            "fold_bn": self.fold_bn,
        }


def per_layer_candidates(
    candidates: Sequence[LayerSpec] | Mapping[str, Sequence[LayerSpec]] | None, names: Iterable[str]
) -> dict[str, list[LayerSpec]]:
    """Each of ``names`` with its candidate list: ``None`` gives every layer :func:`default_candidates`;
    a sequence gives every layer that list; a mapping gives per-layer lists (``"*"`` for the rest).

    Raises :class:`PolicyError` for a mapping naming an unknown layer, an empty list, or a
    candidate that is not a :class:`LayerSpec`.
    """
    if candidates is None:
        base = default_candidates()
        return {n: base for n in names}
    if isinstance(candidates, Mapping):
        default = list(candidates.get("*", default_candidates()))
        unknown = sorted(set(candidates) - set(names) - {"*"})
        if unknown:
            raise PolicyError(
                f"candidates name layer {unknown[0]!r}, which the model does not have",
                "use names from model.named_modules()",
            )
        out = {n: list(candidates.get(n, default)) for n in names}
    else:
        out = {n: list(candidates) for n in names}
    for n, specs in out.items():
        if not specs:
            raise PolicyError(f"layer {n!r} has an empty candidate list", "give it at least one LayerSpec")
        for s in specs:
            if not isinstance(s, LayerSpec):
                raise PolicyError(
                    f"layer {n!r}: candidate {s!r} is not a LayerSpec", "pass LayerSpec objects"
                )
    return out


@torch.no_grad()
def quantized_weight(layer: nn.Module, spec: LayerSpec) -> torch.Tensor:
    """Ŵ for ``spec``, computed by the Brevitas quantizer the swap would install on ``layer``."""
    q = brevitas_layer(layer, spec, signed_input=True)
    return q.quant_weight().value.detach().to(layer.weight.dtype)


def candidate_table(
    model: nn.Module,
    example_inputs: torch.Tensor,
    candidates: Sequence[LayerSpec] | Mapping[str, Sequence[LayerSpec]] | None = None,
    *,
    scores: dict[str, LayerScore] | None = None,
    gains: Sequence[str] = (),
    seed: int = 0,
    tol: float = 1e-5,
    dw_norms: bool = True,
    fold_bn: bool = False,
    progress: bool = False,
) -> CandidateTable:
    """L̂_l(c), ‖ΔW_l(c)‖₂ and cost for every layer ``l`` and candidate ``c``.

    ``candidates`` is one list for all layers, or a dict of per-layer lists (key ``"*"`` for the rest),
    e.g. to pin the first and last layer to 8 bits. ``scores`` reuses a :func:`lipschitz_scores` result.
    ``fold_bn`` must match the swap's: with True, :func:`~aq_brevitas.convert.quantize` quantizes the
    BN-folded conv weight, so the table does too (on a folded copy; ``model`` is left alone).
    Power iterations (relative tolerance ``tol``, at most 300 steps) for Ŵ start from the float layer's
    converged singular vectors (Ŵ ≈ W, so a few steps suffice and L̂/L shares L's residual error);
    ‖ΔW‖₂ starts cold (ΔW of two candidates share no subspace, so a warm start can stall on a lower
    singular value). ``dw_norms=False`` skips ‖ΔW‖₂ (NaN in the rows): only the spectral estimate
    uses it, and it is half the table's cost. ``gains`` (default none: the search reads only
    L and A from the table's scores) is passed to :func:`lipschitz_scores` when ``scores`` is None. ``example_inputs`` is a float batch ``(N, *input_shape)``.
    """
    from tqdm.auto import tqdm

    check_images(example_inputs, "example_inputs", unit_range=False, batch=False)
    if fold_bn:
        model = folded_copy(model)
    if scores is None:
        scores = lipschitz_scores(model, example_inputs, gains=gains, seed=seed)
    per_layer = per_layer_candidates(candidates, list(scores))
    table = CandidateTable(scores, fold_bn=fold_bn)
    modules = dict(model.named_modules())
    total = sum(len(v) for v in per_layer.values())
    bar = tqdm(total=total, desc="candidate norms", disable=not progress, leave=False)
    kw = {"seed": seed, "max_iter": _NORM_MAX_ITER, "tol": tol}
    for name, specs in per_layer.items():
        layer, score = modules[name], scores[name]
        scale = bn_scale(modules[score.bn]) if score.bn else None
        w = layer.weight.detach()
        _, _, w_basis = operator_norm_basis(layer, score.input_shape, out_scale=scale, **kw)
        rows = []
        for spec in specs:
            w_hat = quantized_weight(layer, spec)
            table.weights[(name, spec)] = w_hat
            l_hat, _, _ = operator_norm_basis(
                layer, score.input_shape, weight=w_hat, out_scale=scale, init=w_basis, **kw
            )
            d_norm = (
                operator_norm_basis(layer, score.input_shape, weight=w_hat - w, out_scale=scale, **kw)[0]
                if dw_norms
                else math.nan
            )
            bits, bops = layer_cost(spec, score.params, score.macs)
            rows.append(CandidateRow(spec, l_hat, d_norm, bits, bops))
            bar.update()
        table.rows[name] = rows
    bar.close()
    return table


def folded_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with every conv-following BatchNorm folded in, as
    ``quantize(fold_bn=True)`` does; ``model`` is left alone."""
    folded = copy.deepcopy(model)
    fold_batchnorm(folded)
    return folded.eval()
