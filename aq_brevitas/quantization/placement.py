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

from torch import fx, nn

from ..errors import warn
from .act_sites import (
    ActQuantSite,
    ActRequest,
    FinnAvgPool,
    data_input,
    module_device,
    producer_of,
    trace_for_placement,
)
from .injectors import act_quant_for

#: where a layer's input quantizer goes: at the op producing the input ("producer"), the same in FINN's
#: own layout ("finn": average pools as FINN's averaging unit, the inputs of an add or concat
#: re-quantized by one quantizer, one quantizer per reader of a forked tensor; what ``quantize(...,
#: target="finn")`` uses), or on the layer itself ("input")
PLACEMENTS = ("producer", "input", "finn")
#: the key of a GraphModule's ``meta`` that records a FINN layout (read back by ``act_placement_of``)
LAYOUT_KEY = "aq_brevitas.layout"


def target_layout(model: nn.Module) -> str:
    """``"finn"`` for a model :func:`place_act_quant` laid out as FINN builds it, else ``"producer"``."""
    return "finn" if getattr(model, "meta", {}).get(LAYOUT_KEY) == "finn" else "producer"


def place_act_quant(
    model: nn.Module, requests: Mapping[str, ActRequest], *, finn: bool = False
) -> tuple[nn.Module, list[ActQuantSite], str]:
    """Put each quantized layer's input quantizer at the output of its producer (see the module docstring).

    ``requests`` maps a layer name of ``model`` to the :class:`ActRequest` of its input. Returns
    ``(model, sites, why_not)`` with one :class:`ActQuantSite` per quantizer. ``finn``: FINN's own
    layout (:data:`PLACEMENTS`), which costs a generic model accuracy (a join's inputs share one
    scale), so only ``target="finn"`` asks for it. Where every quantizer
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
                producer is not None and producer.op == "placeholder" and producer is data_input(node)
            )
            if direct_input and calls[node.target] == 1:  # a layer's own input_quant acts at every call
                direct.append((node.target, requests[node.target]))
            elif producer is not None:
                wanted.setdefault(producer, []).append((node.target, requests[node.target]))
    from .finn_sites import finn_layout_sites, split_forks

    layout_sites = finn_layout_sites(gm, wanted, requests) if finn else []
    forked = finn and any(len(p.users) > 1 for p in wanted)
    in_place = not (layout_sites or forked) and all(_fits_in_place(model, gm, p) for p in wanted)
    sites = [_quantize_output(model if in_place else gm, gm, p, asks) for p, asks in wanted.items()]
    sites += split_forks(gm, sites) if forked else []
    sites += layout_sites
    for name, req in direct:
        install_input_quant(model.get_submodule(name), req.bit_width, req.signed, req.po2)
        sites.insert(0, ActQuantSite(f"{name}.input_quant", "input_quant", "input", (name,), *_fields(req)))
    if in_place:
        return model, sites, ""
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    if finn:
        gm.meta[LAYOUT_KEY] = "finn"
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
        owner.set_submodule(node.target, quant.to(module_device(gm)).train(module.training))
        return ActQuantSite(node.target, "QuantReLU", node.name, consumers, bits, False, po2)
    name = f"{node.name}_quant"
    quant = qnn.QuantIdentity(
        act_quant=act_quant_for(bits, signed=signed, po2=po2), return_quant_tensor=False
    )
    gm.add_module(name, quant.to(module_device(gm)).train(gm.training))
    # fx's own rewiring: Brevitas 0.13.4's InsertModuleCallAfter leaves the users reading the old node
    # under torch 2.13 (its replace_all_uses_except updates args without fx's bookkeeping).
    with gm.graph.inserting_after(node):
        inserted = gm.graph.call_module(name, args=(node,))
    node.replace_all_uses_with(inserted, delete_user_cb=lambda user: user is not inserted)
    return ActQuantSite(name, "QuantIdentity", node.name, consumers, bits, signed, po2)


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
