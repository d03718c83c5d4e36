"""Activation quantizers where FINN needs them: at the output of the op that produces a layer's input.

A :class:`~aq_brevitas.policy.LayerSpec`'s ``act_bit_width`` is the precision of the layer's *input*.
Quantizing that input right in front of the layer (a Brevitas ``input_quant``) leaves whatever sits
between the producer and the layer (MaxPool, Flatten, ...) running on floats; FINN's QONNX->FINN
conversion folds a ``Relu`` into a ``MultiThreshold`` only when its ``Quant`` follows it directly, so
such a graph never reaches one dataflow partition. Brevitas's own FINN models (``bnn_pynq`` TFC/CNV)
therefore put ``QuantReLU``/``QuantIdentity`` modules after the activation. :func:`place_act_quant`
does the same on any fx-traceable model:

* the model is traced (Brevitas layers, BatchNorms and Brevitas activation layers stay leaves), and
  Brevitas's graph tools turn functional ``relu`` calls into ``nn.ReLU`` modules
  (``TorchFunctionalToModule``) and give every call of a shared stateless module its own copy
  (``DuplicateSharedStatelessModule``);
* from each quantized layer's input the graph is walked back through ops that commute with a
  per-tensor, zero-point-0 quantizer (:data:`TRANSPARENT_MODULES`, max-pooling, flatten/view/reshape,
  dropout): max-pooling is monotone and the others move elements without changing them, so the
  quantized values the layer sees are the same;
* the op found there gets the quantizer: an ``nn.ReLU`` becomes a ``QuantReLU`` (swapped by module
  name, as Brevitas's ``ModuleToModuleByName`` does); an existing Brevitas activation layer is
  re-bitted (its own quantizer, ``bit_width`` changed; kept, calibrated scale and all, when the bits
  match); anything else (the graph input, an add, a concatenation, an average pool, a BatchNorm)
  gets a ``QuantIdentity`` call after it (as Brevitas's ``InsertModuleCallAfter`` does), named ``<node>_quant`` as Brevitas's ``inp_placeholder_handler`` names
  the input one. Every use of that output then sees the quantized tensor, as it would in hardware.

Several layers reading one producer share its quantizer: it gets the largest bit width they ask for
(a ``UserWarning`` names them), power-of-two scales if any of them is ``po2``, and a sign if any of
their inputs is negative (ReLU outputs are unsigned).

The result is a ``torch.fx.GraphModule`` (as Brevitas's ``brevitas.graph.quantize`` returns) with the
model's module names. A model fx cannot trace keeps the quantizers at the layers' inputs, with a
``UserWarning`` saying it is not FINN-ready.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn import functional as F

from ..errors import warn
from ..nnutils import LeafTracer, trace_with
from .finn_layout import FinnAvgPool
from .injectors import act_quant_for
from .value_ops import copies_values, is_concat

PLACEMENTS = ("producer", "input")
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


def _data_input(node: fx.Node) -> fx.Node | None:
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
    current = _data_input(node)
    while current is not None and copies_values(gm, current):
        current = _data_input(current)
    return current


def place_act_quant(
    model: nn.Module, requests: Mapping[str, ActRequest]
) -> tuple[nn.Module, list[ActQuantSite], str]:
    """Put each quantized layer's input quantizer at the output of its producer (see the module docstring).

    ``requests`` maps a layer name of ``model`` to the :class:`ActRequest` of its input. Returns
    ``(model, sites, why_not)`` with one :class:`ActQuantSite` per quantizer. Where every quantizer
    fits the model's own modules (an ``nn.ReLU`` module called once becomes a ``QuantReLU``, a Brevitas
    activation layer is re-bitted, a layer reading the graph input directly gets its own
    ``input_quant``), ``model`` itself is changed in place and returned, class and all; otherwise (a
    functional ``relu``, a ``QuantIdentity`` after an add/pool/BatchNorm) the result is a
    ``torch.fx.GraphModule`` with the model's module names. For a model fx cannot trace it returns
    ``(model, [], why)``, ``model`` unchanged and ``why`` the tracer's one-line reason.
    Source: Brevitas ``brevitas.graph`` (``TorchFunctionalToModule``, ``DuplicateSharedStatelessModule``)
    and the layout of Brevitas's FINN
    examples (``brevitas_examples/bnn_pynq``).

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 10))
    >>> q, sites, _ = place_act_quant(net, {"0": ActRequest(8, False, True), "4": ActRequest(4, False, False)})
    >>> [s.describe() for s in sites], type(q).__name__
    (['input_quant a8 int (input of 0)', 'QuantReLU a4 uint (input of 4)'], 'Sequential')
    >>> q(torch.rand(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """
    gm, why = trace_for_placement(model)
    if gm is None:
        return model, [], why
    wanted: dict[fx.Node, list[tuple[str, ActRequest]]] = {}
    direct: list[tuple[str, ActRequest]] = []  # layers reading the graph input as it is
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in requests:
            producer = producer_of(gm, node)
            direct_input = (
                producer is not None and producer.op == "placeholder" and producer is _data_input(node)
            )
            if direct_input and calls[node.target] == 1:  # a layer's own input_quant acts at every call
                direct.append((node.target, requests[node.target]))
            elif producer is not None:
                wanted.setdefault(producer, []).append((node.target, requests[node.target]))
    layout_sites = finn_layout_sites(gm, wanted, requests)
    forked = any(len(p.users) > 1 for p in wanted)
    in_place = not (layout_sites or forked) and all(_fits_in_place(model, gm, p) for p in wanted)
    sites = [_quantize_output(model if in_place else gm, gm, p, asks) for p, asks in wanted.items()]
    sites += _split_forks(gm, sites) if forked else []
    sites += layout_sites
    for name, req in direct:
        install_input_quant(model.get_submodule(name), req.bit_width, req.signed, req.po2)
        sites.insert(0, ActQuantSite(f"{name}.input_quant", "input_quant", "input", (name,), *_fields(req)))
    if in_place:
        return model, sites, ""
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm, sites, ""


def _fields(req: ActRequest) -> tuple[int, bool, bool]:
    return req.bit_width, req.signed, req.po2


def install_input_quant(layer: nn.Module, bit_width: int, signed: bool, po2: bool) -> None:
    """Give a Brevitas layer its own per-tensor input quantizer (``act_quant_for``)."""
    act = act_quant_for(bit_width, signed=signed, po2=po2)
    layer.input_quant = act.proxy_class(layer, act)


def _fits_in_place(model: nn.Module, gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether the quantizer for ``node``'s output can live in ``model``'s own module tree: ``node``
    calls a ReLU or Brevitas activation module of ``model`` that no other call site uses."""
    from brevitas.nn.quant_layer import QuantNonLinearActLayer

    if node.op != "call_module":
        return False
    module = gm.get_submodule(node.target)
    try:
        own = model.get_submodule(node.target)
    except AttributeError:  # made by TorchFunctionalToModule/DuplicateSharedStatelessModule
        return False
    calls = sum(1 for n in gm.graph.nodes if n.op == "call_module" and gm.get_submodule(n.target) is own)
    return own is module and calls == 1 and (type(own) is nn.ReLU or isinstance(own, QuantNonLinearActLayer))


def _quantize_output(
    owner: nn.Module, gm: fx.GraphModule, node: fx.Node, asks: list[tuple[str, ActRequest]]
) -> ActQuantSite:
    """Quantize ``node``'s output for the layers in ``asks``; module changes go into ``owner`` (the
    model itself, or ``gm``), graph changes into ``gm``."""
    import brevitas.nn as qnn
    from brevitas.nn.quant_layer import QuantNonLinearActLayer

    consumers = tuple(dict.fromkeys(name for name, _ in asks))
    bits = max(r.bit_width for _, r in asks)
    if len({r.bit_width for _, r in asks}) > 1:
        warn(
            f"layers {', '.join(consumers)} read one activation ({node.name}) but ask for act_bit_width "
            f"{sorted({r.bit_width for _, r in asks})}; it is quantized once, at {bits} bits -- fix: give "
            "the layers that read one tensor the same act_bit_width",
            UserWarning,
        )
    po2 = any(r.po2 for _, r in asks)
    signed = any(r.signed for _, r in asks)
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    if isinstance(module, QuantNonLinearActLayer):
        proxy = module.act_quant
        if int(proxy.bit_width()) != bits:  # the same bits: the quantizer stays, calibrated scale and all
            module.act_quant = type(proxy)(module, proxy.quant_injector.let(bit_width=bits))
        return ActQuantSite(
            node.target, type(module).__name__, node.name, consumers, bits, proxy.is_signed, po2
        )
    if type(module) is nn.ReLU:
        quant = qnn.QuantReLU(act_quant=act_quant_for(bits, signed=False, po2=po2), return_quant_tensor=False)
        owner.set_submodule(node.target, quant.to(_device(gm)).train(module.training))
        return ActQuantSite(node.target, "QuantReLU", node.name, consumers, bits, False, po2)
    name = f"{node.name}_quant"
    quant = qnn.QuantIdentity(
        act_quant=act_quant_for(bits, signed=signed, po2=po2), return_quant_tensor=False
    )
    gm.add_module(name, quant.to(_device(gm)).train(gm.training))
    # fx's own rewiring: Brevitas 0.13.4's InsertModuleCallAfter leaves the users reading the old node
    # under torch 2.13 (its replace_all_uses_except updates args without fx's bookkeeping).
    with gm.graph.inserting_after(node):
        inserted = gm.graph.call_module(name, args=(node,))
    node.replace_all_uses_with(inserted, delete_user_cb=lambda user: user is not inserted)
    return ActQuantSite(name, "QuantIdentity", node.name, consumers, bits, signed, po2)


def _device(gm: nn.Module) -> torch.device:
    return next((p.device for p in gm.parameters()), torch.device("cpu"))


def input_quantizer(model: nn.Module, layer: str) -> nn.Module | None:
    """The Brevitas activation quantizer (proxy) whose output layer ``layer`` reads, wherever it sits:
    the layer's own enabled ``input_quant``, or the ``act_quant`` of the QuantReLU/QuantIdentity found
    by walking back through transparent ops; None when the input is float. Raises ``AttributeError``
    for a name that is not a submodule of ``model``.

    >>> import torch
    >>> from torch import nn
    >>> from aq_brevitas import LayerSpec, LayerwisePolicy, quantize
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    >>> q = quantize(net, LayerwisePolicy(default=LayerSpec(4, act_bit_width=6)))
    >>> int(input_quantizer(q, "3").bit_width()), type(q.get_submodule("1")).__name__
    (6, 'QuantReLU')
    """
    found = input_quantizers(model, [layer])[layer]
    return found[1] if found else None


def input_quantizers(model: nn.Module, layers: Iterable[str]) -> dict[str, tuple[str, nn.Module] | None]:
    """:func:`input_quantizer` for several layers with one trace: per layer ``(where, proxy)``, ``where``
    the quantizer's module name (``"<layer>.input_quant"`` for the layer's own), or None for a float input."""
    from brevitas.nn.quant_layer import QuantNonLinearActLayer

    out: dict[str, tuple[str, nn.Module] | None] = {}
    traced: tuple[fx.GraphModule | None, dict[str, fx.Node]] | None = None
    for layer in layers:
        own = getattr(model.get_submodule(layer), "input_quant", None)
        if getattr(own, "is_quant_enabled", False):
            out[layer] = (f"{layer}.input_quant", own)
            continue
        if traced is None:
            gm, _ = trace_for_placement(model)
            nodes: dict[str, fx.Node] = {}
            for n in gm.graph.nodes if gm is not None else ():
                if n.op == "call_module":
                    nodes.setdefault(str(n.target), n)  # a layer called several times: its first call
            traced = (gm, nodes)
        gm, nodes = traced
        producer = producer_of(gm, nodes[layer]) if gm is not None and layer in nodes else None
        found = (
            gm.get_submodule(producer.target)
            if producer is not None and producer.op == "call_module"
            else None
        )
        out[layer] = (
            (str(producer.target), found.act_quant)
            if isinstance(found, (QuantNonLinearActLayer, FinnAvgPool))
            else None
        )
    return out


def _merged(asks: list[tuple[str, ActRequest]]) -> ActRequest:
    return ActRequest(
        max(r.bit_width for _, r in asks), any(r.po2 for _, r in asks), any(r.signed for _, r in asks)
    )


def finn_layout_sites(
    gm: fx.GraphModule, wanted: dict[fx.Node, list[tuple[str, ActRequest]]], layers: Mapping[str, ActRequest]
) -> list[ActQuantSite]:
    """FINN's layout between quantized layers, written into ``gm`` (:mod:`~aq_brevitas.quantization.finn_layout`):
    an average pool asked for a quantizer becomes a :class:`FinnAvgPool` (its ReLU producer is asked for a
    QuantReLU at the same bits), and each residual add or concatenation whose result reaches a quantizer
    gets ONE ``QuantIdentity`` on all its inputs. ``wanted`` (producer node -> asks) is updated: the
    pools leave it, the ReLUs feeding pools and merges join it. Returns the sites made."""
    from .finn_layout import avg_pool_kernel

    sites = []
    for node in list(wanted):
        ok, kernel = avg_pool_kernel(gm, node)
        current = gm.get_submodule(node.target) if node.op == "call_module" else None
        if ok or isinstance(current, FinnAvgPool):
            asks = wanted.pop(node)
            sites.append(_finn_pool(gm, node, kernel, asks))
            _ask_relu(gm, _data_input(gm_node(gm, sites[-1].module)), wanted, asks)
    for node in list(gm.graph.nodes):
        inputs = _merge_inputs(node)
        asks = _downstream_asks(node, wanted, layers) if inputs else []
        if asks:
            # an add input from a ReLU keeps the ReLU's own (unsigned) quantizer: a signed one after it
            # would give FINN's thresholding negative thresholds on an unsigned input, which it refuses;
            # a concatenation needs one scale on all its inputs (signed only if an input can be negative)
            plain = [a for a in inputs if not _ask_relu(gm, a, wanted, asks)]
            if is_concat(node):
                sites.append(_shared_quant(gm, node, inputs, asks, signed=bool(plain)))
            elif plain:
                sites.append(_shared_quant(gm, node, plain, asks, signed=True))
    return sites


def gm_node(gm: fx.GraphModule, target: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


def _merge_inputs(node: fx.Node) -> list[fx.Node]:
    from .finn_layout import is_merge

    if is_merge(node):
        return [a for a in node.args[:2] if isinstance(a, fx.Node)]
    if is_concat(node) and isinstance(node.args[0], (list, tuple)):
        return [a for a in node.args[0] if isinstance(a, fx.Node)]
    return []


def _downstream_asks(
    node: fx.Node, wanted: dict[fx.Node, list[tuple[str, ActRequest]]], layers: Mapping[str, ActRequest]
) -> list[tuple[str, ActRequest]]:
    """The asks of the quantizers and quantized layers that ``node``'s output reaches first (through any op)."""
    asks, todo, seen = [], list(node.users), set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in wanted:
            asks += wanted[n]
        elif n.op == "call_module" and n.target in layers:
            asks.append((str(n.target), layers[n.target]))
        else:
            todo += list(n.users)
    return asks


def _ask_relu(
    gm: fx.GraphModule,
    tensor: fx.Node | None,
    wanted: dict[fx.Node, list[tuple[str, ActRequest]]],
    asks: list[tuple[str, ActRequest]],
) -> bool:
    """Ask for a quantizer at the ReLU (or Brevitas activation) producing ``tensor``, if one does
    (FINN folds a ReLU only into the quantizer right after it); whether one does."""
    from brevitas.nn.quant_layer import QuantNonLinearActLayer

    while tensor is not None and copies_values(gm, tensor):
        tensor = _data_input(tensor)
    if tensor is not None and tensor.op == "call_module":
        module = gm.get_submodule(tensor.target)
        if type(module) is nn.ReLU or (
            isinstance(module, QuantNonLinearActLayer) and not isinstance(module, _quant_identity())
        ):
            unsigned = [(n, ActRequest(r.bit_width, r.po2, False)) for n, r in asks]
            wanted.setdefault(tensor, []).extend(a for a in unsigned if a not in wanted.get(tensor, []))
            return True
    return False


def _quant_identity() -> type:
    import brevitas.nn as qnn

    return qnn.QuantIdentity


def _finn_pool(
    gm: fx.GraphModule, node: fx.Node, kernel: int | None, asks: list[tuple[str, ActRequest]]
) -> ActQuantSite:
    """``node`` (an average pool) as a :class:`FinnAvgPool` at the asked bits; re-bitted if it is one."""
    req = _merged(asks)
    consumers = tuple(dict.fromkeys(n for n, _ in asks))
    current = gm.get_submodule(node.target) if node.op == "call_module" else None
    if isinstance(current, FinnAvgPool):
        current.rebit(req.bit_width)
        return ActQuantSite(
            node.target, "FinnAvgPool", node.name, consumers, req.bit_width, req.signed, req.po2
        )
    pool = FinnAvgPool(req.bit_width, req.signed, req.po2, kernel).to(_device(gm)).train(gm.training)
    if node.op == "call_module":
        gm.set_submodule(node.target, pool)
        return ActQuantSite(
            node.target, "FinnAvgPool", node.name, consumers, req.bit_width, req.signed, req.po2
        )
    name = f"{node.name}_finn"
    gm.add_module(name, pool)
    with gm.graph.inserting_after(node):
        call = gm.graph.call_module(name, args=(_data_input(node),))
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)
    return ActQuantSite(name, "FinnAvgPool", node.name, consumers, req.bit_width, req.signed, req.po2)


def _shared_quant(
    gm: fx.GraphModule,
    node: fx.Node,
    inputs: list[fx.Node],
    asks: list[tuple[str, ActRequest]],
    *,
    signed: bool,
) -> ActQuantSite:
    """One ``QuantIdentity`` on every input in ``inputs`` of the add/concat ``node`` (re-bitted when
    they already share one)."""
    import brevitas.nn as qnn

    req = _merged(asks)
    calls = {a.target for a in inputs if a.op == "call_module"}
    shared = gm.get_submodule(next(iter(calls))) if len(calls) == 1 else None
    if all(a.op == "call_module" for a in inputs) and isinstance(shared, qnn.QuantIdentity):
        proxy = shared.act_quant
        if int(proxy.bit_width()) != req.bit_width:
            shared.act_quant = type(proxy)(shared, proxy.quant_injector.let(bit_width=req.bit_width))
        return ActQuantSite(
            inputs[0].target, "QuantIdentity", node.name, (node.name,), req.bit_width, signed, req.po2
        )
    name = f"{node.name}_quant"
    quant = qnn.QuantIdentity(
        act_quant=act_quant_for(req.bit_width, signed=signed, po2=req.po2), return_quant_tensor=False
    )
    gm.add_module(name, quant.to(_device(gm)).train(gm.training))
    for a in inputs:
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, args=(a,))
        node.replace_input_with(a, call)
    return ActQuantSite(name, "QuantIdentity", node.name, (node.name,), req.bit_width, signed, req.po2)


def _split_forks(gm: fx.GraphModule, sites: list[ActQuantSite]) -> list[ActQuantSite]:
    """One quantizer per use: a placed quantizer whose output several ops read keeps its first reader;
    each further reader gets its own ``QuantIdentity`` on the quantizer's input (unsigned after a
    ReLU: an unsigned quantizer clamps at 0 as the ReLU does). FINN's default streamlining moves a
    quantizer's scale into the next layer or thresholds only where the scale has one consumer."""
    import brevitas.nn as qnn

    by_module = {s.module: s for s in sites}
    made = []
    for node in list(gm.graph.nodes):
        site = by_module.get(str(node.target)) if node.op == "call_module" else None
        if site is None or len(node.users) < 2:
            continue
        source = _data_input(node)
        for i, user in enumerate(list(node.users)[1:], start=1):
            name = f"{str(node.target).replace('.', '_')}_use{i}"
            act = act_quant_for(site.bit_width, signed=site.signed, po2=site.po2)
            gm.add_module(name, qnn.QuantIdentity(act_quant=act, return_quant_tensor=False).to(_device(gm)))
            gm.get_submodule(name).train(gm.training)
            with gm.graph.inserting_before(user):
                copy = gm.graph.call_module(name, args=(source,))
            user.replace_input_with(node, copy)
            made.append(ActQuantSite(name, "QuantIdentity", source.name, (user.name,), *site_fields(site)))
    return made


def site_fields(site: ActQuantSite) -> tuple[int, bool, bool]:
    return site.bit_width, site.signed, site.po2
