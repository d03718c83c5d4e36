"""A :class:`~aq_brevitas.policy.LayerwisePolicy` as a torch.ao PT2E quantizer (:class:`PolicyQuantizer`),
and the prepare/convert steps around it."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, PolicyError
from ..forward import eval_mode
from ..nnutils import quantizable_layers, warn_never_called
from ..policy import PATTERN_PREFIX, LayerSpec, LayerwisePolicy, entry_matches
from .fx import (
    act_range,
    check_transposed_bn,
    expressible,
    warn_approximations,
    warn_per_tensor,
    weight_observer,
)


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


_LAYER_OPS = ("conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d", "linear")


_GROUPS_ARG = 6  # aten.conv_transpose*d(input, weight, bias, stride, padding, output_padding, groups, ...)


def _pt2e_specs(spec: LayerSpec, qat: bool, axis: int = 0) -> tuple[Any, Any]:
    pt2e = _torchao()
    from torchao.quantization.pt2e import observer as obs
    from torchao.quantization.pt2e.quantizer import QuantizationSpec

    w_cls, w_scheme, w_kw = weight_observer(spec, obs, pt2e=True, axis=axis)
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

    Layers are matched by the ``nn_module_stack`` name recorded by ``torch.export``. ``layers``: the
    model's quantizable layer names (:func:`~aq_brevitas.nnutils.quantizable_layers`, as
    :func:`prepare_pt2e_model` passes them): only those are annotated, with the policy resolved over
    them as :func:`~aq_brevitas.quantize` does (parent-module names, ``re:`` patterns, ``None``).
    Without it every conv/linear node is looked up by its name. Use it with
    ``torch.export.export`` + torchao's ``prepare_pt2e``/``prepare_qat_pt2e`` + ``convert_pt2e``.
    It is registered as a virtual subclass of torchao's ``Quantizer`` on first use, so that
    importing aq_brevitas never needs torchao; without torchao, constructing one raises ``ConfigError``.
    """

    def __init__(
        self, policy: LayerwisePolicy, *, qat: bool = False, layers: Iterable[str] | None = None
    ) -> None:
        _torchao()
        from torchao.quantization.pt2e.quantizer import Quantizer

        Quantizer.register(PolicyQuantizer)
        self.policy = policy
        self.qat = qat
        self.specs = None if layers is None else policy.resolve(list(layers))
        self.annotated: dict[str, LayerSpec] = {}

    def _spec(self, name: str | None) -> LayerSpec | None:
        if name is None:
            return None
        return self.policy.spec_for(name) if self.specs is None else self.specs.get(name)

    def transform_for_annotation(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        """No graph rewrite is needed before annotating (torchao ``Quantizer`` hook)."""
        return model

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        """Annotate the input activation and weight of every conv/linear node the policy names.

        Per-channel weight scales go on the output-channel axis (1 for a transposed conv); a
        transposed conv with ``groups > 1`` gets per-tensor weights, with a warning naming it.
        ``annotated`` records the spec each layer got."""
        from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

        fallback: dict[str, str] = {}
        for node in model.graph.nodes:
            op = getattr(node.target, "__name__", "").split(".")[0]
            if node.op != "call_function" or op not in _LAYER_OPS:
                continue
            name = _layer_name(node)
            spec = self._spec(name)
            if name is None or spec is None:
                continue
            transposed = op.startswith("conv_transpose")
            groups = node.args[_GROUPS_ARG] if transposed and len(node.args) > _GROUPS_ARG else 1
            spec, axis = expressible(name, spec, transposed, groups, pt2e=True, fallback=fallback)
            act, weight = _pt2e_specs(spec, self.qat, axis)
            node.meta["quantization_annotation"] = QuantizationAnnotation(
                input_qspec_map={node.args[0]: act, node.args[1]: weight}, _annotated=True
            )
            self.annotated[name] = spec
        warn_approximations(self.annotated, pt2e=True)
        warn_per_tensor(fallback)
        return model

    def validate(self, model: torch.fx.GraphModule) -> None:
        """Every layer the policy quantizes must have been found in the graph. Given ``layers``, one
        that was not is never called by the traced forward: it stays float, named in a warning (as in
        :func:`~aq_brevitas.quantize`). Without, a layer name the policy gives that no node has is a
        :class:`PolicyError`."""
        if self.specs is not None:
            warn_never_called([n for n, s in self.specs.items() if s is not None and n not in self.annotated])
            return
        named = [
            k for k, s in self.policy.layers.items() if s is not None and not k.startswith(PATTERN_PREFIX)
        ]
        missing = [k for k in named if not any(entry_matches(k, n) for n in self.annotated)]
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
    (``allow_exported_model_train_eval`` is applied so ``.train()``/``.eval()`` work). ``model`` is
    exported in eval mode (train mode with ``qat``) and given back in the mode it came in, every
    module's flag restored; export traces it without running it, so BatchNorm statistics are untouched.
    A grouped transposed conv followed by a BatchNorm is refused (:func:`check_transposed_bn`).
    The policy is resolved over the model's quantizable layers as :func:`~aq_brevitas.quantize` does
    (a key naming no layer is a :class:`PolicyError`); layers the forward never calls stay float,
    named in a warning.
    """
    pt2e = _torchao()
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, prepare_qat_pt2e

    x = (
        example_inputs
        if len(example_inputs) > 1
        else example_inputs.repeat(2, *[1] * (example_inputs.dim() - 1))
    )
    check_transposed_bn(model, fx=False, qat=qat)
    policy.check(model)
    layers = list(quantizable_layers(model))
    batch = torch.export.Dim("batch")  # keep the batch size dynamic (export would specialise it)
    with eval_mode(model):  # restores every module's own train/eval flag on exit
        exported = torch.export.export(model.train(qat), (x,), dynamic_shapes=({0: batch},)).module()
    prepared = (prepare_qat_pt2e if qat else prepare_pt2e)(
        exported, PolicyQuantizer(policy, qat=qat, layers=layers)
    )
    pt2e.allow_exported_model_train_eval(prepared)
    return prepared


def convert_pt2e_model(prepared: Any) -> Any:
    """``convert_pt2e`` (integer weights in the graph, quantize/dequantize around them).

    ``prepared`` is left as it was: ``convert_pt2e`` rewrites its graph in place, and the prepared
    (fake-quant) model is the one to attack, since the converted one has no input gradient.
    """
    pt2e = _torchao()
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    converted = convert_pt2e(copy.deepcopy(prepared))
    pt2e.allow_exported_model_train_eval(converted)
    return converted
