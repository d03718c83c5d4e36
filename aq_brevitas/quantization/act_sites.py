"""The pieces of activation placement that placement, FINN's layout and the read-back share: what a
quantizer site is, the traced graph they all walk (:func:`trace_for_placement`), the walk back through
value-copying ops (:func:`producer_of`), and FINN's averaging unit (:class:`FinnAvgPool`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F

from ..nnutils import LeafTracer, trace_with
from .value_ops import copies_values

_RELU_FUNCTIONS = ((F.relu, nn.ReLU), (F.relu_, nn.ReLU), (torch.relu, nn.ReLU), (torch.relu_, nn.ReLU))


@dataclass(frozen=True)
class ActQuantSite:
    """One activation quantizer placed by :func:`place_act_quant`.

    ``module``: its name in the returned model; ``kind``: ``"QuantReLU"``, ``"QuantIdentity"`` or the
    re-bitted Brevitas class; ``after``: the graph node whose output it quantizes (``"x"`` for the
    input); ``consumers``: the quantized layers reading it; ``bit_width``, ``signed``, ``po2``: its
    quantizer.
    """

    module: str
    kind: str
    after: str
    consumers: tuple[str, ...]
    bit_width: int
    signed: bool
    po2: bool

    def describe(self) -> str:
        sign = "int" if self.signed else "uint"
        return f"{self.kind} a{self.bit_width} {sign}{' po2' if self.po2 else ''} (input of {', '.join(self.consumers)})"


@dataclass(frozen=True)
class ActRequest:
    """What one quantized layer asks of the activation it reads: bits, power-of-two scale, sign."""

    bit_width: int
    po2: bool
    signed: bool


class _PlacementTracer(LeafTracer):
    """:class:`LeafTracer` that also keeps Brevitas activation layers whole (they are re-bitted, not traced)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        from brevitas.nn.quant_layer import QuantNonLinearActLayer

        if isinstance(m, (QuantNonLinearActLayer, FinnAvgPool)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace_for_placement(model: nn.Module) -> tuple[fx.GraphModule | None, str]:
    """``model`` traced as :func:`place_act_quant` needs it (functional ReLUs as ``nn.ReLU`` modules,
    one module per call of a shared stateless module), or ``(None, why)`` when fx cannot trace it."""
    from brevitas.graph.standardize import DuplicateSharedStatelessModule, TorchFunctionalToModule

    try:
        gm = trace_with(_PlacementTracer(), model, type(model).__name__)  # nothing left on model
    except Exception as exc:  # tracing fails in many ways (TraceError, TypeError, NotImplementedError...)
        first = (str(exc).strip().splitlines() or [""])[0]
        return None, f"{type(exc).__name__}: {first}"
    gm = TorchFunctionalToModule(fn_to_module_map=_RELU_FUNCTIONS).apply(gm)
    gm = DuplicateSharedStatelessModule().apply(gm)
    gm.training = model.training  # the root's own flag only: submodules keep theirs
    return gm, ""


def data_input(node: fx.Node) -> fx.Node | None:
    """The tensor a single-input op reads (fx puts it in args, or in kwargs for ``F.relu(input=...)``);
    for a concatenation, its first input."""
    for a in (*node.args, *node.kwargs.values()):
        for b in a if isinstance(a, (list, tuple)) else (a,):
            if isinstance(b, fx.Node):
                return b
    return None


def producer_of(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The node whose output reaches ``node``'s data input through value-copying ops only
    (:data:`~aq_brevitas.quantization.value_ops.VALUE_COPYING_OPS`)."""
    current = data_input(node)
    while current is not None and copies_values(gm, current):
        current = data_input(current)
    return current


class FinnAvgPool(nn.Module):
    """Average pooling in FINN's averaging unit: a per-tensor quantizer, then Brevitas's
    ``TruncAvgPool2d`` (floor), which exports as ``AveragePool -> Mul -> Trunc``. A global pool
    (``kernel_size=None``) takes its kernel from the input's spatial size at each call; FINN maps
    square kernels without padding. ``bit_width``: the bits of the averaged output (and of the input
    quantizer).
    """

    def __init__(self, bit_width: int, signed: bool, po2: bool, kernel_size: int | None = None) -> None:
        super().__init__()
        import brevitas.nn as qnn

        from .injectors import act_quant_for

        self.global_pool = kernel_size is None
        self.input_quant = qnn.QuantIdentity(
            act_quant=act_quant_for(bit_width, signed=signed, po2=po2), return_quant_tensor=True
        )
        self.pool = qnn.TruncAvgPool2d(
            kernel_size or 1, bit_width=bit_width, float_to_int_impl_type="FLOOR", return_quant_tensor=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool:
            size = tuple(int(s) for s in x.shape[-2:])
            self.pool.kernel_size = self.pool.stride = size
        return self.pool(self.input_quant(x))

    @property
    def act_quant(self) -> Any:
        """The input quantizer's proxy: what the layers after the pool read (bits and sign)."""
        return self.input_quant.act_quant

    def rebit(self, bit_width: int) -> None:
        """Both the input quantizer and the averaged output at ``bit_width`` (kept when equal)."""
        proxy = self.input_quant.act_quant
        if int(proxy.bit_width()) != bit_width:
            self.input_quant.act_quant = type(proxy)(
                self.input_quant, proxy.quant_injector.let(bit_width=bit_width)
            )
            trunc = self.pool.trunc_quant
            self.pool.trunc_quant = type(trunc)(self.pool, trunc.quant_injector.let(bit_width=bit_width))


def module_device(gm: nn.Module) -> torch.device:
    return next((p.device for p in gm.parameters()), torch.device("cpu"))
