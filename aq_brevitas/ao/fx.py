"""The policy as a torch.ao FX ``QConfigMapping``: observers per layer spec, activation observers
re-targeted to the layers that read them, and the checks torch.ao needs (see :mod:`aq_brevitas.ao`)."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ModelError, PolicyError, warn
from ..folding import find_conv_bn_pairs
from ..nnutils import UNSUPPORTED_TYPES, quantizable_layers
from ..policy import PATTERN_PREFIX, LayerSpec, LayerwisePolicy

DEFAULT_ACT_BITS = 8
# The DeprecationWarning torch 2.13 emits on every FX quantization call (a regex for warning filters).
FX_DEPRECATION_MESSAGE = r"torch\.ao\.quantization is deprecated and will be removed"


def weight_range(bits: int) -> tuple[int, int]:
    """The narrow signed integer range for ``bits``-bit weights (what Brevitas uses too)."""
    if bits < 2:
        raise PolicyError(
            f"{bits}-bit weights cannot be expressed in torch.ao (no binary dtype)",
            "give the layer >= 2 bits, or deploy it through Brevitas/QONNX",
        )
    return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1


def act_range(bits: int | None) -> tuple[int, int]:
    """The unsigned integer range for a ``bits``-bit activation (8 bits when the spec has none)."""
    b = DEFAULT_ACT_BITS if bits is None else bits
    if b > 8:
        raise PolicyError(
            f"act_bit_width={b} exceeds torch.ao's 8-bit activation dtypes",
            "use act_bit_width <= 8 for torch.ao",
        )
    return 0, 2**b - 1


def _clipping_observer(spec: LayerSpec, pt2e: bool) -> bool:
    """Whether the spec gets ``HistogramObserver``: per-tensor mse/percentile, and only where convert
    clamps the weights to quant_min/quant_max (convert_pt2e does, convert_fx does not)."""
    return pt2e and spec.scaling in ("mse", "percentile") and spec.granularity == "per_tensor"


def _approximated(spec: LayerSpec, pt2e: bool) -> bool:
    return spec.scaling != "max" and not _clipping_observer(spec, pt2e)


def warn_approximations(specs: dict[str, LayerSpec], pt2e: bool) -> None:
    approx = [f"{n} ({s.scaling} {s.granularity})" for n, s in specs.items() if _approximated(s, pt2e)]
    if approx:
        warn(
            f"torch.ao has no observer for these scaling rules; MinMax is used instead: {', '.join(approx)}",
        )


_TRANSPOSED_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def weight_channel_axis(transposed: bool, groups: int = 1, *, pt2e: bool) -> int | None:
    """The weight axis on which torch.ao puts a layer's per-output-channel scales, or None where it
    cannot put them anywhere.

    0 for conv/linear (weight ``(out, in/groups, *k)``); 1 for a transposed conv (weight
    ``(in, out/groups, *k)``) through PT2E. None for a transposed conv through FX (torch.ao has no
    per-channel ``ConvTranspose``: ``prepare_fx`` asserts, fbgemm/qnnpack refuse the weight) and for
    a transposed conv with ``groups > 1`` (output channel ``g·(out/groups) + j`` is block ``g`` of
    axis 0 times column ``j`` of axis 1: no single axis holds it).
    """
    if not transposed:
        return 0
    return 1 if pt2e and groups == 1 else None


def expressible(
    name: str, spec: LayerSpec, transposed: bool, groups: int, pt2e: bool, fallback: dict[str, str]
) -> tuple[LayerSpec, int]:
    """The spec torch.ao runs for a layer and its per-channel axis: per-tensor where
    :func:`weight_channel_axis` has none (recorded in ``fallback`` by name, with the reason)."""
    axis = weight_channel_axis(transposed, groups, pt2e=pt2e)
    if spec.granularity != "per_channel" or axis is not None:
        return spec, axis or 0
    fallback[name] = f"groups={groups}" if pt2e else "FX has no per-channel ConvTranspose"
    return dataclasses.replace(spec, granularity="per_tensor"), 0


def check_transposed_bn(model: nn.Module, *, fx: bool, qat: bool = False) -> None:
    """Refuse, in one line (:class:`ModelError`), a transposed conv whose BatchNorm torch.ao cannot fuse.

    Preparing fuses each conv's BatchNorm into it. torch's fusion of a transposed conv breaks with
    ``groups > 1`` (a shape error in ``fuse_conv_bn_weights``, FX and PT2E alike), and FX refuses it
    in QAT. ``fx`` and ``qat`` say which preparation follows.
    """
    for conv_name, bn_name in find_conv_bn_pairs(model).items():
        conv = model.get_submodule(conv_name)
        if not isinstance(conv, _TRANSPOSED_TYPES):
            continue
        why = f"groups={conv.groups}" if conv.groups > 1 else ("FX, in QAT" if fx and qat else None)
        if why:
            raise ModelError(
                f"torch.ao cannot fuse BatchNorm {bn_name} into transposed conv {conv_name} ({why}), "
                "which it does while preparing",
                "fold it into the conv first: aq_brevitas.folding.fold_batchnorm(model) (eval statistics)",
            )


def warn_per_tensor(fallback: dict[str, str]) -> None:
    if fallback:
        listed = ", ".join(f"{n} ({why})" for n, why in fallback.items())
        warn(
            f"torch.ao cannot hold per-output-channel weight scales for these transposed convs; they get "
            f"per-tensor weights: {listed} -- fix: give them granularity='per_tensor' to silence this, or "
            "quantize them per channel through Brevitas (aq_brevitas.quantize)",
        )


def weight_observer(
    spec: LayerSpec, observers: Any, pt2e: bool, axis: int = 0
) -> tuple[Any, torch.qscheme, dict[str, Any]]:
    qmin, qmax = weight_range(spec.weight_bit_width)
    if spec.granularity == "per_channel":
        return (
            observers.PerChannelMinMaxObserver,
            torch.per_channel_symmetric,
            {"ch_axis": axis, "quant_min": qmin, "quant_max": qmax},
        )
    cls = observers.HistogramObserver if _clipping_observer(spec, pt2e) else observers.MinMaxObserver
    return cls, torch.per_tensor_symmetric, {"quant_min": qmin, "quant_max": qmax}


def _fx_act(bits: int | None, qat: bool) -> Any:
    """The FX activation observer (PTQ) or fake-quant (QAT) constructor for ``bits``-bit activations."""
    from torch.ao.quantization import FakeQuantize
    from torch.ao.quantization import observer as obs

    amin, amax = act_range(bits)
    a_kw = {"quant_min": amin, "quant_max": amax, "dtype": torch.quint8, "qscheme": torch.per_tensor_affine}
    if qat:
        return FakeQuantize.with_args(observer=obs.MovingAverageMinMaxObserver, **a_kw)
    return obs.MinMaxObserver.with_args(**a_kw)


def _fx_qconfig(spec: LayerSpec, qat: bool) -> Any:
    from torch.ao.quantization import FakeQuantize, QConfig
    from torch.ao.quantization import observer as obs

    w_cls, w_scheme, w_kw = weight_observer(spec, obs, pt2e=False)
    if qat:
        weight = FakeQuantize.with_args(observer=w_cls, dtype=torch.qint8, qscheme=w_scheme, **w_kw)
    else:
        weight = w_cls.with_args(dtype=torch.qint8, qscheme=w_scheme, **w_kw)
    return QConfig(activation=_fx_act(spec.act_bit_width, qat), weight=weight)


def _mapping(
    policy: LayerwisePolicy, qat: bool, layers: Iterable[str] | Mapping[str, nn.Module] | None
) -> tuple[Any, list[LayerSpec]]:
    from torch.ao.quantization import QConfigMapping

    modules = dict(layers) if isinstance(layers, Mapping) else {}
    fallback: dict[str, str] = {}
    # bare keys (layers, parents, patterns) as torch.ao reads them alike: a name, else its nearest named
    # parent (set_module_name), else the first matching pattern; given layers, the policy's own resolve
    resolved = dict(policy.layers) if layers is None else policy.resolve(layers)
    specs = {
        name: expressible(
            name,
            spec,
            isinstance(modules.get(name), _TRANSPOSED_TYPES),
            getattr(modules.get(name), "groups", 1),
            pt2e=False,
            fallback=fallback,
        )[0]
        for name, spec in resolved.items()
        if spec is not None
    }
    warn_approximations(specs, pt2e=False)
    warn_per_tensor(fallback)
    mapping = QConfigMapping()
    used = list(specs.values())
    if policy.default is not None and layers is None:
        mapping.set_global(_fx_qconfig(policy.default, qat))
        # a transposed conv under the default gets per-tensor weights (torch.ao has no per-channel one)
        per_tensor = dataclasses.replace(policy.default, granularity="per_tensor")
        for kind in _TRANSPOSED_TYPES:
            mapping.set_object_type(kind, _fx_qconfig(per_tensor, qat))
        used.append(policy.default)
    for name in resolved:
        qconfig = _fx_qconfig(specs[name], qat) if name in specs else None  # None: float
        if name.startswith(PATTERN_PREFIX):  # torch.ao's regex is re.match: anchor its end too
            mapping.set_module_name_regex(f"(?:{name[len(PATTERN_PREFIX) :]})\\Z", qconfig)
        else:
            mapping.set_module_name(name, qconfig)
    return mapping, used


def to_qconfig_mapping(
    policy: LayerwisePolicy,
    *,
    qat: bool = False,
    layers: Iterable[str] | Mapping[str, nn.Module] | None = None,
) -> Any:
    """A ``QConfigMapping`` with one entry per key of the policy (``None`` specs: a ``None`` qconfig,
    float), or with ``layers`` one per layer (:meth:`~aq_brevitas.policy.LayerwisePolicy.resolve`).

    Without ``layers``, layer and parent-module keys become ``set_module_name`` entries and ``re:``
    patterns ``set_module_name_regex`` ones (anchored at both ends), which torch.ao reads in the
    policy's own order: a name, else its nearest named parent, else a pattern. The policy's default
    (if any) becomes the mapping's global qconfig (transposed convs under it get per-tensor weights);
    pass ``layers`` to expand the default per layer instead. Given as a name -> module mapping (``quantizable_layers(model)``), it also tells
    which layers are transposed convs: those get per-tensor weights where the policy asks per-channel
    (torch.ao has none for them), with a warning naming them. With bare names it cannot tell, and
    ``prepare_fx`` asserts on a transposed conv named with a per-channel spec.
    Use it with ``prepare_fx`` / ``prepare_qat_fx`` and ``convert_fx`` (conv-relu fusion included).
    torch.ao FX applies a QConfig's activation to the layer's OUTPUT, so when layers ask for
    different ``act_bit_width`` this warns: use :func:`prepare_fx_model`, which puts each on the
    layer's input.
    """
    mapping, used = _mapping(policy, qat, layers)
    if len({act_range(s.act_bit_width) for s in used}) > 1:
        warn(
            "to_qconfig_mapping: torch.ao FX quantizes each layer's OUTPUT with its act_bit_width; "
            "use aq_brevitas.ao.prepare_fx_model to quantize each layer's input with it",
        )
    return mapping


def _is_act_observer(module: nn.Module) -> bool:
    from torch.ao.quantization import FakeQuantizeBase
    from torch.ao.quantization.observer import ObserverBase

    return isinstance(module, ObserverBase | FakeQuantizeBase)


def _readers(
    prepared: torch.fx.GraphModule, node: torch.fx.Node, policy: LayerwisePolicy
) -> dict[str, LayerSpec]:
    """The policy layers that read ``node``'s tensor before anything re-quantizes it, by name."""
    readers: dict[str, LayerSpec] = {}
    stack, seen = list(node.users), set()
    while stack:
        user = stack.pop()
        if user in seen or user.op == "output":
            continue
        seen.add(user)
        if user.op == "call_module":
            module = prepared.get_submodule(user.target)
            # a module of an unsupported type (MultiheadAttention) stays float whatever the policy says
            spec = None if isinstance(module, UNSUPPORTED_TYPES) else policy.spec_for(user.target)
            if spec is not None and any(True for _ in module.parameters()):
                readers[user.target] = spec  # a quantized layer (fused ones keep the layer's name)
                continue
            if _is_act_observer(module) or any(True for _ in module.parameters()):
                continue  # re-quantized here, or a float layer that makes a new tensor
        stack.extend(user.users)
    return readers


def _sharing_ops() -> set[Any]:
    """The ops whose output torch.ao keeps on its input's quantization grid (OUTPUT_SHARE_OBSERVER_WITH_INPUT
    in its native backend config): ``convert_fx`` drops an observer after them, keeping the one before."""
    import torch.ao.quantization.backend_config.utils  # noqa: F401 -- torch 2.13 needs it loaded first
    from torch.ao.quantization.backend_config import ObservationType, get_native_backend_config

    share = ObservationType.OUTPUT_SHARE_OBSERVER_WITH_INPUT
    return {c.pattern for c in get_native_backend_config().configs if c.observation_type == share}


def _shares_input_grid(prepared: torch.fx.GraphModule, node: torch.fx.Node, ops: set[Any]) -> bool:
    if len(node.all_input_nodes) != 1 or node.op not in ("call_function", "call_method", "call_module"):
        return False
    op = type(prepared.get_submodule(node.target)) if node.op == "call_module" else node.target
    return op in ops


def place_input_activations(prepared: torch.fx.GraphModule, policy: LayerwisePolicy, *, qat: bool) -> None:
    """Give every activation observer of an FX-prepared model the ``act_bit_width`` of the layer that
    reads its tensor, so each layer's input (not its output, as ``QConfig`` has it) gets its bits.

    An observer behind ops that keep their input's grid (max-pool, flatten, ...) becomes the same
    module as the observer before them, as ``convert_fx`` only keeps that one. Observers that no
    policy layer reads (the model output, tensors re-quantized later) get 8 bits. A tensor read by
    layers asking for different bits cannot be honoured: ``PolicyError``. Call it right after
    ``prepare_fx``/``prepare_qat_fx``, before calibration.
    """
    ops = _sharing_ops()
    observer_of: dict[torch.fx.Node, nn.Module] = {}  # observer node -> its (possibly shared) module
    for node in prepared.graph.nodes:
        if node.op != "call_module" or not _is_act_observer(prepared.get_submodule(node.target)):
            continue
        source = node.args[0]
        while isinstance(source, torch.fx.Node) and _shares_input_grid(prepared, source, ops):
            source = source.all_input_nodes[0]
        observer_of[node] = observer_of.get(source, prepared.get_submodule(node.target))
    groups: dict[int, list[torch.fx.Node]] = {}
    for node, module in observer_of.items():
        groups.setdefault(id(module), []).append(node)
    for nodes in groups.values():
        readers: dict[str, LayerSpec] = {}
        for node in nodes:
            readers.update(_readers(prepared, node, policy))
        bits = {n: s.act_bit_width or DEFAULT_ACT_BITS for n, s in readers.items()}
        if len(set(bits.values())) > 1:
            raise PolicyError(
                f"layers {sorted(bits)} read the same tensor but ask for act_bit_width {sorted(set(bits.values()))}; "
                "torch.ao quantizes a tensor once",
                "give the layers that read one tensor the same act_bit_width",
            )
        observer = _fx_act(next(iter(bits.values()), DEFAULT_ACT_BITS), qat)()
        for node in nodes:
            prepared.add_submodule(node.target, observer)


@functools.cache
def transposed_kernel_error(engine: str) -> float:
    """Max error of torch's quantized ``conv_transpose2d`` on ``engine`` (the current
    ``torch.backends.quantized.engine``, which ``convert_fx``'s modules run on) against the float
    op on the same integers, on a fixed probe whose output step is 0.02: above that the kernel is wrong.

    torch 2.13's ``x86``/``onednn`` kernels were measured wrong (error ~1 on outputs of range 1)
    where ``fbgemm``/``qnnpack`` are right; the probe tells on the machine at hand. Cached per engine.
    """
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(4, 6, 2, 2, generator=g) * 0.3, torch.rand(2, 4, 3, 3, generator=g)
    with warnings.catch_warnings():
        # torch 2.13 deprecates creating quantized tensors; the probe needs them, as convert_fx does
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        qw = torch.quantize_per_tensor(w, float(w.abs().max()) / 127, 0, torch.qint8)
        qx = torch.quantize_per_tensor(x, 1 / 255, 0, torch.quint8)
        packed = torch.ops.quantized.conv_transpose2d_prepack(qw, None, [2, 2], [0, 0], [0, 0], [1, 1], 1)
        y = torch.ops.quantized.conv_transpose2d(qx, packed, 0.02, 128).dequantize()
    return float((y - F.conv_transpose2d(qx.dequantize(), qw.dequantize(), stride=2)).abs().max())


def _warn_fx_transposed(layers: dict[str, nn.Module], policy: LayerwisePolicy, qat: bool) -> None:
    """The two FX limits a policy's transposed convs meet besides per-channel weights, one line each."""
    names = [n for n, m in layers.items() if isinstance(m, _TRANSPOSED_TYPES) and policy.spec_for(n)]
    if not names:
        return
    listed = ", ".join(names)
    if qat:
        warn(
            f"torch.ao FX has no QAT ConvTranspose: {listed} compute with float weights in the prepared "
            "model (convert_fx quantizes them) -- fix: use prepare_pt2e_model(..., qat=True), which "
            "fake-quantizes them",
        )
    engine = torch.backends.quantized.engine
    error = transposed_kernel_error(engine)
    if error > 0.02:
        warn(
            f"torch's quantized ConvTranspose kernel is wrong on engine {engine!r} here (error {error:.2g} on "
            f"a probe whose output step is 0.02): convert_fx would give wrong outputs for {listed} -- fix: "
            "torch.backends.quantized.engine = 'fbgemm' (or 'qnnpack') before convert_fx",
        )


def prepare_fx_model(
    model: nn.Module, policy: LayerwisePolicy, example_inputs: torch.Tensor, *, qat: bool = False
) -> torch.fx.GraphModule:
    """``prepare_fx``/``prepare_qat_fx`` with :func:`to_qconfig_mapping`, then
    :func:`place_input_activations` so each layer's ``act_bit_width`` quantizes its input.

    The policy is resolved over the model's conv/linear layers as :func:`~aq_brevitas.quantize` does
    (parent-module names, ``re:`` patterns, ``None`` for float; a key naming no layer is a
    :class:`PolicyError`); functional ops stay float between quantized layers; transposed convs get per-tensor weights where the policy asks
    per-channel (with a warning naming them: torch.ao has no per-channel ``ConvTranspose``).
    ``model`` becomes part of the result: its modules and parameters are shared with it, and it is
    left in the mode ``prepare_fx`` needs (eval, or train with ``qat``). Pass a copy to keep it.
    A transposed conv followed by a BatchNorm FX cannot fuse is refused (:func:`check_transposed_bn`).
    Transposed convs also warn, naming them, when ``qat`` (FX has no QAT ``ConvTranspose``: float
    weights until ``convert_fx``) and when the current quantized engine's ConvTranspose kernel is
    wrong (:func:`transposed_kernel_error`).
    """
    from torch.ao.quantization.quantize_fx import prepare_fx, prepare_qat_fx

    check_transposed_bn(model, fx=True, qat=qat)
    policy.check(model)
    layers = quantizable_layers(model)
    mapping, _ = _mapping(policy, qat, layers)
    _warn_fx_transposed(layers, policy, qat)
    prepare = prepare_qat_fx if qat else prepare_fx
    prepared = prepare(model.train() if qat else model.eval(), mapping, (example_inputs,))
    place_input_activations(prepared, policy, qat=qat)
    return prepared
