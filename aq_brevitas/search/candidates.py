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
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..errors import PolicyError
from ..folding import bn_scale, fold_batchnorm
from ..forward import check_images
from ..nnutils import QUANTIZABLE_TYPES
from ..policy import LayerSpec, layer_cost
from ..quantization.convert import brevitas_layer
from ..score.lipschitz import LayerScore, lipschitz_scores
from ..score.norms import (
    check_input_shape,
    operator_norm,
    stacked_gram,
    start_block,
    top_singular_values,
)

DEFAULT_BITS = (2, 3, 4, 5, 6, 8)
DEFAULT_SCALINGS = ("max", "percentile", "mse")
DEFAULT_GRANULARITIES = ("per_tensor", "per_channel")
_NORM_MAX_ITER = 300  # power-iteration cap per candidate norm (tol decides in practice)
_BLOCK = 4  # vectors per block, as score.norms.operator_norm
_STACK_ELEMENTS = 1 << 24  # float64 elements per chunk of stacked candidates (128 MiB): bounds memory


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
    """Per-layer candidate rows plus the float scores they were measured against.

    Rows built with ``norms=False`` hold NaN for ``L_hat`` and ``dW_norm``; :meth:`fill_norms`
    computes the missing ones later, once: the table is a cache to reuse across budgets and methods.
    """

    scores: dict[str, LayerScore]
    rows: dict[str, list[CandidateRow]] = field(default_factory=dict)
    # Ŵ per (layer, spec), kept so that scoring reuses the quantizer's output instead of re-running it.
    # Candidates with the same Ŵ (act-bit variants, bit-identical quantizers) share one tensor object.
    weights: dict[tuple[str, LayerSpec], torch.Tensor] = field(
        default_factory=dict, repr=False, compare=False
    )
    fold_bn: bool = False  # rows describe the BN-folded conv weights (what quantize(fold_bn=True) quantizes)
    model: nn.Module | None = field(default=None, repr=False, compare=False)  # what fill_norms reads
    tol: float = field(default=1e-5, compare=False)  # relative tolerance of the power iterations
    seed: int = field(default=0, compare=False)  # seeds their cold starts
    norm_count: int = field(default=0, compare=False)  # operator norms computed so far (float ones too)
    bases: dict[str, torch.Tensor | None] = field(default_factory=dict, repr=False, compare=False)

    @property
    def layers(self) -> list[str]:
        return list(self.rows)

    def row(self, layer: str, spec: LayerSpec) -> CandidateRow:
        for r in self.rows[layer]:
            if r.spec == spec:
                return r
        raise PolicyError(f"layer {layer!r} has no candidate {spec.short()}", "add it to the candidate set")

    def has_norms(self, dw_norms: bool = False) -> bool:
        """True when every row has ``L_hat`` (and, with ``dw_norms``, ``dW_norm``)."""
        return not any(
            math.isnan(r.L_hat) or (dw_norms and math.isnan(r.dW_norm))
            for rows in self.rows.values()
            for r in rows
        )

    def fill_norms(
        self, model: nn.Module | None = None, *, dw_norms: bool = True, progress: bool = False
    ) -> CandidateTable:
        """Compute the missing ``L_hat`` (and with ``dw_norms`` the missing ``dW_norm``) in place; returns self.

        Norms already there are kept, so a second call computes nothing. One norm per distinct Ŵ of a
        layer (candidates differing only in ``act_bit_width``, or whose quantizers give bit-identical
        Ŵ, share it), all of a layer's candidates in one batched power iteration
        (:func:`operator_norms`), as :func:`candidate_table` describes. ``model``: the model the table
        was built from (default: the one it keeps; folded again when ``fold_bn``). ``norm_count``
        grows by the norms computed. Raises :class:`PolicyError` when no model is known.
        """
        if model is not None and self.fold_bn:
            model = folded_copy(model)
        model = model if model is not None else self.model
        if model is None:
            raise PolicyError("this candidate table keeps no model to compute norms on", "pass model=")
        from tqdm.auto import tqdm

        modules = dict(model.named_modules())
        with (
            torch.no_grad(),
            tqdm(total=len(self.rows), desc="candidate norms", disable=not progress, leave=False) as bar,
        ):
            for name in self.rows:
                self._fill_layer(modules, name, dw_norms)
                bar.update()
        return self

    def _fill_layer(self, modules: dict[str, nn.Module], name: str, dw_norms: bool) -> None:
        """:meth:`fill_norms` for one layer."""
        rows, score, layer = self.rows[name], self.scores[name], modules[name]
        groups: dict[int, list[int]] = {}  # id(Ŵ) -> row indices sharing it
        for i, r in enumerate(rows):
            key = (name, r.spec)
            if key not in self.weights:
                self.weights[key] = quantized_weight(layer, weight_part(r.spec))
            groups.setdefault(id(self.weights[key]), []).append(i)
        need_l = [g for g in groups.values() if any(math.isnan(rows[i].L_hat) for i in g)]
        need_d = [g for g in groups.values() if dw_norms and any(math.isnan(rows[i].dW_norm) for i in g)]
        scale = bn_scale(modules[score.bn]) if score.bn else None
        kw = {"out_scale": scale, "seed": self.seed, "max_iter": _NORM_MAX_ITER, "tol": self.tol}
        if need_l:
            if name not in self.bases and isinstance(layer, nn.Linear):
                self.bases[name] = None  # exact SVDs: nothing to warm-start
            elif name not in self.bases:
                self.bases[name] = operator_norm(layer, score.input_shape, **kw).basis
                self.norm_count += 1
            w_hat = torch.stack([self.weights[(name, rows[g[0]].spec)] for g in need_l])
            for g, (sigma, _) in zip(
                need_l, operator_norms(layer, score.input_shape, w_hat, init=self.bases[name], **kw)
            ):
                for i in g:
                    rows[i] = replace(rows[i], L_hat=sigma)
            self.norm_count += len(need_l)
        if need_d:
            # ΔW of two candidates share no subspace: cold start (a warm one can stall on a lower σ).
            dw = torch.stack([self.weights[(name, rows[g[0]].spec)] for g in need_d]) - layer.weight.detach()
            for g, (sigma, _) in zip(need_d, operator_norms(layer, score.input_shape, dw, **kw)):
                for i in g:
                    rows[i] = replace(rows[i], dW_norm=sigma)
            self.norm_count += len(need_d)

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


def weight_part(spec: LayerSpec) -> LayerSpec:
    """``spec`` without its activation bits: what Ŵ, L̂ and ‖ΔW‖ depend on."""
    return replace(spec, act_bit_width=None) if spec.act_bit_width is not None else spec


def candidate_table(
    model: nn.Module,
    example_inputs: torch.Tensor,
    candidates: Sequence[LayerSpec] | Mapping[str, Sequence[LayerSpec]] | None = None,
    *,
    scores: dict[str, LayerScore] | None = None,
    seed: int = 0,
    tol: float = 1e-5,
    dw_norms: bool = True,
    norms: bool = True,
    fold_bn: bool = False,
    progress: bool = False,
) -> CandidateTable:
    """L̂_l(c), ‖ΔW_l(c)‖₂ and cost for every layer ``l`` and candidate ``c``.

    ``candidates`` is one list for all layers, or a dict of per-layer lists (key ``"*"`` for the rest),
    e.g. to pin the first and last layer to 8 bits. ``scores`` reuses a :func:`lipschitz_scores` result.
    ``fold_bn`` must match the swap's: with True, :func:`~aq_brevitas.quantization.convert.quantize` quantizes the
    BN-folded conv weight, so the table does too (on a folded copy; ``model`` is left alone).
    Ŵ is computed once per distinct weight part (:func:`weight_part`: candidates differing only in
    ``act_bit_width`` share it); candidates whose Ŵ are bit-identical share one norm. Block
    LOBPCG iterations (relative tolerance ``tol``, at most 300 steps), all of a layer's Ŵ at once
    (:func:`operator_norms`), start from the float layer's converged singular vectors (Ŵ ≈ W, so a
    few steps suffice and L̂/L shares L's residual error); ‖ΔW‖₂ starts cold (ΔW of two candidates
    share no subspace, so a warm start can stall on a lower singular value). ``dw_norms=False`` skips
    ‖ΔW‖₂ (NaN in the rows): only the spectral estimate uses it, and it is half the table's cost.
    ``norms=False`` computes no operator norm at all (L̂ and ‖ΔW‖ NaN), only Ŵ and costs, for methods
    that read neither (uniform, hessian, ans); :meth:`CandidateTable.fill_norms` adds them later.
    Scores computed here have no gains (the search reads only L and A from the table's scores; pass
    ``scores=lipschitz_scores(..., gains=...)`` for them). ``example_inputs`` is a float batch ``(N, *input_shape)``.

    >>> import torch
    >>> from torch import nn
    >>> from aq_brevitas.search.candidates import candidate_table
    >>> from aq_brevitas.policy import LayerSpec
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10)).eval()
    >>> specs = [LayerSpec(4, act_bit_width=a) for a in (4, 8)]
    >>> table = candidate_table(model, torch.rand(8, 1, 8, 8), specs, norms=False)
    >>> table.norm_count, table.has_norms()
    (0, False)
    >>> table.fill_norms(dw_norms=False).norm_count  # float basis + one Ŵ for conv, one Ŵ for linear
    3
    >>> r4, r8 = table.rows["0"]
    >>> r4.L_hat == r8.L_hat and r4.bops * 2 == r8.bops
    True
    """
    check_images(example_inputs, "example_inputs", unit_range=False, batch=False)
    if fold_bn:
        model = folded_copy(model)
    if scores is None:
        scores = lipschitz_scores(model, example_inputs, gains=(), seed=seed)
    per_layer = per_layer_candidates(candidates, list(scores))
    table = CandidateTable(scores, fold_bn=fold_bn, model=model, tol=tol, seed=seed)
    modules = dict(model.named_modules())
    for name, specs in per_layer.items():
        table.rows[name] = _layer_rows(table, name, modules[name], scores[name], specs)
    if norms:
        table.fill_norms(dw_norms=dw_norms, progress=progress)
    return table


def _layer_rows(
    table: CandidateTable, name: str, layer: nn.Module, score: LayerScore, specs: Sequence[LayerSpec]
) -> list[CandidateRow]:
    """One layer's rows (costs; norms NaN until filled), its Ŵ stored in ``table.weights`` once per
    distinct weight part, bit-identical Ŵ sharing one tensor object."""
    distinct: list[torch.Tensor] = []  # one tensor object per bit-identical Ŵ
    by_part: dict[LayerSpec, torch.Tensor] = {}
    rows = []
    for spec in specs:
        part = weight_part(spec)
        if part not in by_part:
            w_hat = quantized_weight(layer, part)
            by_part[part] = next((d for d in distinct if torch.equal(d, w_hat)), w_hat)
            if by_part[part] is w_hat:
                distinct.append(w_hat)
        table.weights[(name, spec)] = by_part[part]
        bits, bops = layer_cost(spec, score.params, score.macs)
        rows.append(CandidateRow(spec, math.nan, math.nan, bits, bops))
    return rows


def operator_norms(
    layer: nn.Module,
    input_shape: Sequence[int],
    weights: torch.Tensor,
    *,
    out_scale: torch.Tensor | None = None,
    tol: float = 1e-6,
    max_iter: int = 500,
    seed: int = 0,
    init: torch.Tensor | None = None,
) -> list[tuple[float, int]]:
    """:func:`~aq_brevitas.score.norms.operator_norm` of ``layer``'s map with each of K weights, at once.

    ``weights`` is ``(K, *layer.weight.shape)``; returns K ``(sigma, iterations)``. The same block
    LOBPCG as :func:`~aq_brevitas.score.norms.operator_norm` (same start: ``init`` or the seeded
    block; same stopping rule, per weight: a converged one leaves the batch), on all K maps as one
    grouped conv (:func:`~aq_brevitas.score.norms.stacked_layer_map`) whose adjoint is autograd's.
    Linear layers: exact SVDs, batched. Conv1d/Conv2d, grouped convs and ConvTranspose2d all stack
    (their groups multiply by K), so none falls back to one weight at a time; only memory splits K
    into chunks. Raises :class:`PolicyError` for misfit weights, else as ``operator_norm``.
    """
    shape = tuple(int(s) for s in input_shape)
    if weights.dim() != layer.weight.dim() + 1 or weights.shape[1:] != layer.weight.shape:
        raise PolicyError(
            f"weights of shape {tuple(weights.shape)} do not stack the layer's {tuple(layer.weight.shape)}",
            "pass (K, *layer.weight.shape)",
        )
    if len(weights) == 0:
        return []
    if not isinstance(layer, QUANTIZABLE_TYPES):
        raise PolicyError(
            f"operator_norms does not support {type(layer).__name__}", "pass a quantizable layer"
        )
    check_input_shape(layer, shape)
    w64 = weights.detach().to(torch.float64)
    scale = None if out_scale is None else out_scale.detach().to(w64.device, torch.float64).reshape(-1)
    per = max(w64[0].numel(), math.prod(shape) * _BLOCK * 12)  # elements one weight's blocks need
    step = max(1, _STACK_ELEMENTS // per)
    out: list[tuple[float, int]] = []
    for lo in range(0, len(w64), step):
        chunk = w64[lo : lo + step]
        if isinstance(layer, nn.Linear):
            mats = chunk if scale is None else chunk * scale[:, None]
            out += [(float(s), 1) for s in torch.linalg.matrix_norm(mats, ord=2)]
        else:
            x0 = start_block(math.prod(shape), seed, init).to(chunk.device).expand(len(chunk), -1, -1)
            gram = stacked_gram(layer, shape, chunk, scale)
            sig, its, _ = top_singular_values(gram, x0.contiguous(), tol=tol, max_iter=max_iter)
            out += [(float(s), int(i)) for s, i in zip(sig, its)]
    return out


def folded_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with every conv-following BatchNorm folded in, as
    ``quantize(fold_bn=True)`` does; ``model`` is left alone."""
    folded = copy.deepcopy(model)
    fold_batchnorm(folded)
    return folded.eval()
