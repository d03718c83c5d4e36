"""Where :func:`~aq_brevitas.quantization.placement.place_act_quant` writes FINN's layout into the traced
graph: average pools as FINN's averaging unit, one quantizer on the inputs of a residual add or a
concatenation, and one quantizer per reader of a tensor (:mod:`~aq_brevitas.quantization.finn_layout`
says why FINN needs each)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import fx, nn

from .act_sites import ActQuantSite, ActRequest, FinnAvgPool, data_input, module_device
from .injectors import act_quant_for
from .value_ops import copies_values, is_concat


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
            _ask_relu(gm, data_input(gm_node(gm, sites[-1].module)), wanted, asks)
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
                continue
            # placed before (a re-bit): an input read through its own quantizer copy keeps it
            fresh = [a for a in plain if not _own_copy(gm, a, _merged(asks).bit_width)]
            if fresh:
                sites.append(_shared_quant(gm, node, fresh, asks, signed=True))
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
        tensor = data_input(tensor)
    if tensor is not None and tensor.op == "call_module":
        module = gm.get_submodule(tensor.target)
        if type(module) is nn.ReLU or (
            isinstance(module, QuantNonLinearActLayer) and not isinstance(module, _quant_identity())
        ):
            unsigned = [(n, ActRequest(r.bit_width, r.po2, False)) for n, r in asks]
            wanted.setdefault(tensor, []).extend(a for a in unsigned if a not in wanted.get(tensor, []))
            return True
    return False


def _own_copy(gm: fx.GraphModule, tensor: fx.Node, bits: int) -> bool:
    """Whether ``tensor`` comes (through value-copying ops) from a quantizer copy :func:`split_forks`
    made; that copy is re-bitted to ``bits``."""
    while tensor is not None and copies_values(gm, tensor):
        tensor = data_input(tensor)
    if tensor is None or tensor.op != "call_module" or not re.search(r"_use\d+$", str(tensor.target)):
        return False
    copy = gm.get_submodule(tensor.target)
    if int(copy.act_quant.bit_width()) != bits:
        copy.act_quant = type(copy.act_quant)(copy, copy.act_quant.quant_injector.let(bit_width=bits))
    return True


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
    pool = FinnAvgPool(req.bit_width, req.signed, req.po2, kernel).to(module_device(gm)).train(gm.training)
    if node.op == "call_module":
        gm.set_submodule(node.target, pool)
        return ActQuantSite(
            node.target, "FinnAvgPool", node.name, consumers, req.bit_width, req.signed, req.po2
        )
    name = f"{node.name}_finn"
    gm.add_module(name, pool)
    with gm.graph.inserting_after(node):
        call = gm.graph.call_module(name, args=(data_input(node),))
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
    gm.add_module(name, quant.to(module_device(gm)).train(gm.training))
    for a in inputs:
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, args=(a,))
        node.replace_input_with(a, call)
    return ActQuantSite(name, "QuantIdentity", node.name, (node.name,), req.bit_width, signed, req.po2)


def split_forks(gm: fx.GraphModule, sites: list[ActQuantSite]) -> list[ActQuantSite]:
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
        source = data_input(node)
        for i, user in enumerate(list(node.users)[1:], start=1):
            name = f"{str(node.target).replace('.', '_')}_use{i}"
            act = act_quant_for(site.bit_width, signed=site.signed, po2=site.po2)
            gm.add_module(
                name, qnn.QuantIdentity(act_quant=act, return_quant_tensor=False).to(module_device(gm))
            )
            gm.get_submodule(name).train(gm.training)
            with gm.graph.inserting_before(user):
                copy = gm.graph.call_module(name, args=(source,))
            user.replace_input_with(node, copy)
            made.append(ActQuantSite(name, "QuantIdentity", source.name, (user.name,), *site_fields(site)))
    return made


def site_fields(site: ActQuantSite) -> tuple[int, bool, bool]:
    return site.bit_width, site.signed, site.po2
