"""The same policy in torch.ao: an FX ``QConfigMapping`` (built into torch) and a PT2E ``Quantizer`` (torchao).

How each :class:`LayerSpec` field is honoured (see docs/torch_ao.md):

* ``weight_bit_width`` 2..8: narrow signed range ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` on qint8, so
  ``convert`` keeps it. 1 bit cannot be expressed (no binary dtype) and is refused.
* ``granularity``: per-channel (axis 0) or per-tensor symmetric observers.
* ``scaling``: ``max`` → MinMax observers (exact). ``mse`` and ``percentile`` per-tensor →
  ``HistogramObserver`` (torch.ao's clipping search minimising quantization error: the nearest
  torch.ao has to both). Per-channel ``mse``/``percentile`` and ``po2`` have no torch.ao observer:
  MinMax is used and a warning names the layers (approximations, never silent).
* ``act_bit_width`` 2..8: the layer's input activation, affine quint8 range ``[0, 2^b - 1]``.
  torch.ao's static quantization needs quantized activations, so layers without one get 8 bits;
  more than 8 bits is refused.

torchao is an optional extra (``pip install aq-brevitas[pt2e]``); only :class:`PolicyQuantizer`
and :func:`prepare_pt2e_model` need it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, PolicyError
from .policy import LayerSpec, LayerwisePolicy

DEFAULT_ACT_BITS = 8


def weight_range(bits: int) -> tuple[int, int]:
    """The narrow signed integer range for ``bits``-bit weights (what Brevitas uses too)."""
    if bits < 2:
        raise PolicyError(
            f"{bits}-bit weights cannot be expressed in torch.ao (no binary dtype)",
            "give the layer >= 2 bits, or deploy it through Brevitas/QONNX",
        )
    return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1


def act_range(bits: int | None) -> tuple[int, int]:
    b = DEFAULT_ACT_BITS if bits is None else bits
    if b > 8:
        raise PolicyError(
            f"act_bit_width={b} exceeds torch.ao's 8-bit activation dtypes",
            "use act_bit_width <= 8 for torch.ao",
        )
    return 0, 2**b - 1


def _approximated(name: str, spec: LayerSpec) -> bool:
    return spec.scaling == "po2" or (
        spec.scaling in ("mse", "percentile") and spec.granularity == "per_channel"
    )


def _warn_approximations(specs: dict[str, LayerSpec]) -> None:
    approx = [f"{n} ({s.scaling} {s.granularity})" for n, s in specs.items() if _approximated(n, s)]
    if approx:
        warnings.warn(
            f"torch.ao has no observer for these scaling rules; MinMax is used instead: {', '.join(approx)}",
            stacklevel=3,
        )


def _weight_observer(spec: LayerSpec, observers: Any) -> tuple[Any, torch.qscheme, dict[str, Any]]:
    qmin, qmax = weight_range(spec.weight_bit_width)
    if spec.granularity == "per_channel":
        return (
            observers.PerChannelMinMaxObserver,
            torch.per_channel_symmetric,
            {"ch_axis": 0, "quant_min": qmin, "quant_max": qmax},
        )
    cls = observers.HistogramObserver if spec.scaling in ("mse", "percentile") else observers.MinMaxObserver
    return cls, torch.per_tensor_symmetric, {"quant_min": qmin, "quant_max": qmax}


def _fx_qconfig(spec: LayerSpec, qat: bool) -> Any:
    from torch.ao.quantization import FakeQuantize, QConfig
    from torch.ao.quantization import observer as obs

    w_cls, w_scheme, w_kw = _weight_observer(spec, obs)
    amin, amax = act_range(spec.act_bit_width)
    a_kw = {"quant_min": amin, "quant_max": amax, "dtype": torch.quint8, "qscheme": torch.per_tensor_affine}
    if qat:
        weight = FakeQuantize.with_args(observer=w_cls, dtype=torch.qint8, qscheme=w_scheme, **w_kw)
        act = FakeQuantize.with_args(observer=obs.MovingAverageMinMaxObserver, **a_kw)
    else:
        weight = w_cls.with_args(dtype=torch.qint8, qscheme=w_scheme, **w_kw)
        act = obs.MinMaxObserver.with_args(**a_kw)
    return QConfig(activation=act, weight=weight)


def to_qconfig_mapping(
    policy: LayerwisePolicy, *, qat: bool = False, layers: Iterable[str] | None = None
) -> Any:
    """A ``QConfigMapping`` with one ``set_module_name`` entry per layer of the policy.

    The policy's default (if any) becomes the mapping's global qconfig when ``layers`` is not given;
    pass ``layers`` (e.g. ``quantizable_layers(model)``) to expand the default per layer instead.
    Use it with ``prepare_fx`` / ``prepare_qat_fx`` and ``convert_fx`` (conv-relu fusion included).
    """
    from torch.ao.quantization import QConfigMapping

    specs = dict(policy.layers) if layers is None else policy.resolve(layers)
    _warn_approximations(specs)
    mapping = QConfigMapping()
    if policy.default is not None and layers is None:
        mapping.set_global(_fx_qconfig(policy.default, qat))
    for name, spec in specs.items():
        mapping.set_module_name(name, _fx_qconfig(spec, qat))
    return mapping


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

    w_cls, w_scheme, w_kw = _weight_observer(spec, obs)
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


def PolicyQuantizer(policy: LayerwisePolicy, *, qat: bool = False) -> Any:  # noqa: N802 -- a class factory
    """A torchao PT2E ``Quantizer`` that gives each conv/linear node its layer's spec.

    Layers are matched by the ``nn_module_stack`` name recorded by ``torch.export``. Built lazily so
    that importing aq_brevitas never needs torchao.
    """
    _torchao()
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, Quantizer

    class _PolicyQuantizer(Quantizer):
        def __init__(self) -> None:
            super().__init__()
            self.policy = policy
            self.annotated: dict[str, LayerSpec] = {}

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
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
                act, weight = _pt2e_specs(spec, qat)
                node.meta["quantization_annotation"] = QuantizationAnnotation(
                    input_qspec_map={node.args[0]: act, node.args[1]: weight}, _annotated=True
                )
                self.annotated[name] = spec
            _warn_approximations(self.annotated)
            return model

        def validate(self, model: torch.fx.GraphModule) -> None:
            missing = set(self.policy.layers) - set(self.annotated)
            if missing:
                raise PolicyError(
                    f"PT2E graph has no conv/linear node for policy layer {sorted(missing)[0]!r}",
                    "check the layer names against model.named_modules()",
                )

    return _PolicyQuantizer()


def prepare_pt2e_model(
    model: nn.Module, policy: LayerwisePolicy, example_inputs: torch.Tensor, *, qat: bool = False
) -> Any:
    """``torch.export`` + ``prepare_pt2e``/``prepare_qat_pt2e`` with :func:`PolicyQuantizer`.

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
