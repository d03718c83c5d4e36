"""The same policy in torch.ao: an FX ``QConfigMapping`` (built into torch) and a PT2E ``Quantizer`` (torchao).

How each :class:`LayerSpec` field is honoured (see docs/torch_ao.md):

* ``weight_bit_width`` 2..8: narrow signed range ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` on (q)int8, kept
  by ``convert_fx`` and ``convert_pt2e``. 1 bit cannot be expressed (no binary dtype) and is refused.
* ``granularity``: per-channel (axis 0) or per-tensor symmetric observers.
* ``scaling``: ``max`` → MinMax observers (exact). PT2E, per-tensor ``mse``/``percentile`` →
  ``HistogramObserver`` (torch.ao's clipping search minimising quantization error: the nearest
  torch.ao has to both; ``convert_pt2e`` clamps to the narrow range). FX gets MinMax there, because
  ``convert_fx`` clamps weights only to the qint8 range (a clipping observer gives -8 at 4 bits).
  Per-channel ``mse``/``percentile`` and ``po2`` have no torch.ao observer: MinMax. Every
  approximation warns with the layer names (never silent).
* ``act_bit_width`` 2..8: the layer's INPUT activation, affine quint8 range ``[0, 2^b - 1]``. PT2E
  annotates the input edge. FX attaches ``QConfig.activation`` to a layer's output, so
  :func:`prepare_fx_model` re-targets the observers after ``prepare_fx`` (each one gets the bits of
  the layer that reads it). torch.ao's static quantization needs quantized activations, so other
  quantized tensors (layers without ``act_bit_width``, the model output) get 8 bits; more than 8
  bits is refused.

torchao is an optional extra (``pip install aq-brevitas[pt2e]``); only :class:`PolicyQuantizer`,
:func:`prepare_pt2e_model` and :func:`convert_pt2e_model` need it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, PolicyError
from .nnutils import quantizable_layers
from .policy import LayerSpec, LayerwisePolicy

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


def _warn_approximations(specs: dict[str, LayerSpec], pt2e: bool) -> None:
    approx = [f"{n} ({s.scaling} {s.granularity})" for n, s in specs.items() if _approximated(s, pt2e)]
    if approx:
        warnings.warn(
            f"torch.ao has no observer for these scaling rules; MinMax is used instead: {', '.join(approx)}",
            stacklevel=3,
        )


def _weight_observer(
    spec: LayerSpec, observers: Any, pt2e: bool
) -> tuple[Any, torch.qscheme, dict[str, Any]]:
    qmin, qmax = weight_range(spec.weight_bit_width)
    if spec.granularity == "per_channel":
        return (
            observers.PerChannelMinMaxObserver,
            torch.per_channel_symmetric,
            {"ch_axis": 0, "quant_min": qmin, "quant_max": qmax},
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

    w_cls, w_scheme, w_kw = _weight_observer(spec, obs, pt2e=False)
    if qat:
        weight = FakeQuantize.with_args(observer=w_cls, dtype=torch.qint8, qscheme=w_scheme, **w_kw)
    else:
        weight = w_cls.with_args(dtype=torch.qint8, qscheme=w_scheme, **w_kw)
    return QConfig(activation=_fx_act(spec.act_bit_width, qat), weight=weight)


def _mapping(policy: LayerwisePolicy, qat: bool, layers: Iterable[str] | None) -> tuple[Any, list[LayerSpec]]:
    from torch.ao.quantization import QConfigMapping

    specs = dict(policy.layers) if layers is None else policy.resolve(layers)
    _warn_approximations(specs, pt2e=False)
    mapping = QConfigMapping()
    used = list(specs.values())
    if policy.default is not None and layers is None:
        mapping.set_global(_fx_qconfig(policy.default, qat))
        used.append(policy.default)
    for name, spec in specs.items():
        mapping.set_module_name(name, _fx_qconfig(spec, qat))
    return mapping, used


def to_qconfig_mapping(
    policy: LayerwisePolicy, *, qat: bool = False, layers: Iterable[str] | None = None
) -> Any:
    """A ``QConfigMapping`` with one ``set_module_name`` entry per layer of the policy.

    The policy's default (if any) becomes the mapping's global qconfig when ``layers`` is not given;
    pass ``layers`` (e.g. ``quantizable_layers(model)``) to expand the default per layer instead.
    Use it with ``prepare_fx`` / ``prepare_qat_fx`` and ``convert_fx`` (conv-relu fusion included).
    torch.ao FX applies a QConfig's activation to the layer's OUTPUT, so when layers ask for
    different ``act_bit_width`` this warns: use :func:`prepare_fx_model`, which puts each on the
    layer's input.
    """
    mapping, used = _mapping(policy, qat, layers)
    if len({act_range(s.act_bit_width) for s in used}) > 1:
        warnings.warn(
            "to_qconfig_mapping: torch.ao FX quantizes each layer's OUTPUT with its act_bit_width; "
            "use aq_brevitas.ao.prepare_fx_model to quantize each layer's input with it",
            stacklevel=2,
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
            spec = policy.spec_for(user.target)
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


def prepare_fx_model(
    model: nn.Module, policy: LayerwisePolicy, example_inputs: torch.Tensor, *, qat: bool = False
) -> torch.fx.GraphModule:
    """``prepare_fx``/``prepare_qat_fx`` with :func:`to_qconfig_mapping`, then
    :func:`place_input_activations` so each layer's ``act_bit_width`` quantizes its input.

    The policy's default is expanded over the model's conv/linear layers (functional ops stay float
    between quantized layers). Parameters are shared with ``model``: pass a copy to keep it float.
    """
    from torch.ao.quantization.quantize_fx import prepare_fx, prepare_qat_fx

    mapping, _ = _mapping(policy, qat, list(quantizable_layers(model)))
    prepare = prepare_qat_fx if qat else prepare_fx
    prepared = prepare(model.train() if qat else model.eval(), mapping, (example_inputs,))
    place_input_activations(prepared, policy, qat=qat)
    return prepared


def _torchao() -> Any:
    try:
        import torchao.quantization.pt2e as pt2e
    except ImportError:
        raise ConfigError(
            "PolicyQuantizer needs torchao, which is not installed",
            "pip install 'aq-brevitas[pt2e]' (torchao==0.18.0)",
        ) from None
    return pt2e


def _layer_name(node: Any) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path.replace("L['self'].", "").replace("L__self___", "") or None


_LAYER_OPS = ("conv1d", "conv2d", "conv_transpose2d", "linear")


def _pt2e_specs(spec: LayerSpec, qat: bool) -> tuple[Any, Any]:
    pt2e = _torchao()
    from torchao.quantization.pt2e import observer as obs
    from torchao.quantization.pt2e.quantizer import QuantizationSpec

    w_cls, w_scheme, w_kw = _weight_observer(spec, obs, pt2e=True)
    qmin, qmax = w_kw.pop("quant_min"), w_kw.pop("quant_max")
    w_ctor = pt2e.FakeQuantize.with_args(observer=w_cls, **w_kw) if qat else w_cls.with_args(**w_kw)
    weight = QuantizationSpec(
        dtype=torch.int8,
        quant_min=qmin,
        quant_max=qmax,
        qscheme=w_scheme,
        ch_axis=w_kw.get("ch_axis", 0),
        is_dynamic=False,
        observer_or_fake_quant_ctr=w_ctor,
    )
    amin, amax = act_range(spec.act_bit_width)
    a_obs = obs.MovingAverageMinMaxObserver if qat else obs.MinMaxObserver
    a_ctor = pt2e.FakeQuantize.with_args(observer=a_obs) if qat else a_obs.with_args()
    act = QuantizationSpec(
        dtype=torch.uint8,
        quant_min=amin,
        quant_max=amax,
        qscheme=torch.per_tensor_affine,
        is_dynamic=False,
        observer_or_fake_quant_ctr=a_ctor,
    )
    return act, weight


class PolicyQuantizer:
    """A torchao PT2E ``Quantizer`` that gives each conv/linear node its layer's spec: the weight and
    the layer's input edge are annotated, the output stays float until the next layer's input.

    Layers are matched by the ``nn_module_stack`` name recorded by ``torch.export``. Use it with
    ``torch.export.export`` + torchao's ``prepare_pt2e``/``prepare_qat_pt2e`` + ``convert_pt2e``.
    It is registered as a virtual subclass of torchao's ``Quantizer`` on first use, so that
    importing aq_brevitas never needs torchao; without torchao, constructing one raises ``ConfigError``.
    """

    def __init__(self, policy: LayerwisePolicy, *, qat: bool = False) -> None:
        _torchao()
        from torchao.quantization.pt2e.quantizer import Quantizer

        Quantizer.register(PolicyQuantizer)
        self.policy = policy
        self.qat = qat
        self.annotated: dict[str, LayerSpec] = {}

    def transform_for_annotation(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        """No graph rewrite is needed before annotating (torchao ``Quantizer`` hook)."""
        return model

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        """Annotate the input activation and weight of every conv/linear node the policy names."""
        from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

        for node in model.graph.nodes:
            if (
                node.op != "call_function"
                or getattr(node.target, "__name__", "").split(".")[0] not in _LAYER_OPS
            ):
                continue
            name = _layer_name(node)
            spec = self.policy.spec_for(name) if name else None
            if spec is None:
                continue
            act, weight = _pt2e_specs(spec, self.qat)
            node.meta["quantization_annotation"] = QuantizationAnnotation(
                input_qspec_map={node.args[0]: act, node.args[1]: weight}, _annotated=True
            )
            self.annotated[name] = spec
        _warn_approximations(self.annotated, pt2e=True)
        return model

    def validate(self, model: torch.fx.GraphModule) -> None:
        """Every layer the policy names explicitly must have been found in the graph."""
        missing = set(self.policy.layers) - set(self.annotated)
        if missing:
            raise PolicyError(
                f"PT2E graph has no conv/linear node for policy layer {sorted(missing)[0]!r}",
                "check the layer names against model.named_modules()",
            )

    def prepare_obs_or_fq_callback(
        self, model: torch.fx.GraphModule, edge_or_node_to_obs_or_fq: dict
    ) -> None:
        """No adjustment of the created observers is needed (torchao ``Quantizer`` hook)."""


def prepare_pt2e_model(
    model: nn.Module, policy: LayerwisePolicy, example_inputs: torch.Tensor, *, qat: bool = False
) -> Any:
    """``torch.export`` + ``prepare_pt2e``/``prepare_qat_pt2e`` with :class:`PolicyQuantizer`.

    The result can be calibrated, fine-tuned, attacked and evaluated like any module
    (``allow_exported_model_train_eval`` is applied so ``.train()``/``.eval()`` work).
    """
    pt2e = _torchao()
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, prepare_qat_pt2e

    x = (
        example_inputs
        if len(example_inputs) > 1
        else example_inputs.repeat(2, *[1] * (example_inputs.dim() - 1))
    )
    batch = torch.export.Dim("batch")  # keep the batch size dynamic (export would specialise it)
    exported = torch.export.export(
        model.eval() if not qat else model.train(), (x,), dynamic_shapes=({0: batch},)
    ).module()
    prepared = (prepare_qat_pt2e if qat else prepare_pt2e)(exported, PolicyQuantizer(policy, qat=qat))
    pt2e.allow_exported_model_train_eval(prepared)
    return prepared


def convert_pt2e_model(prepared: Any) -> Any:
    """``convert_pt2e`` (integer weights in the graph, quantize/dequantize around them)."""
    pt2e = _torchao()
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    converted = convert_pt2e(prepared)
    pt2e.allow_exported_model_train_eval(converted)
    return converted
