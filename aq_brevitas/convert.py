"""The layer swap: apply a :class:`LayerwisePolicy` to a model.

* :func:`quantize` turns a float model's ``Conv1d/Conv2d/ConvTranspose2d/Linear`` into Brevitas
  ``QuantConv1d/QuantConv2d/QuantConvTranspose2d/QuantLinear`` carrying the spec's weight quantizer
  (and, with ``act_bit_width``, an input quantizer on the layer), with the trained weights.
* :func:`apply_policy` re-bits a model that already uses Brevitas layers, keeping its float weights.

Both leave the original model untouched unless ``inplace=True`` and attach ``aq_policy`` and
``aq_changes`` (a list of :class:`LayerChange`) to the returned model.

A module registered under several names is one object: the specs for those names must agree. A
module called several times in ``forward`` is quantized once and used quantized at every call.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import brevitas.nn as qnn
import torch
from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer as QuantWBIOL
from torch import nn

from .errors import CheckpointError, PolicyError
from .injectors import act_quant_for, weight_quant_for
from .nnutils import (
    eval_mode,
    fold_batchnorm,
    iter_x_batches,
    quantizable_layers,
    shared_layer_names,
    warn_unsupported,
)
from .policy import LayerSpec, LayerwisePolicy


@dataclass(frozen=True)
class LayerChange:
    """One layer's change: its name, what it was, what it became."""

    name: str
    old: str
    new: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _input_quant(spec: LayerSpec, signed: bool) -> type | None:
    if spec.act_bit_width is None:
        return None
    return act_quant_for(spec.act_bit_width, signed=signed, po2=spec.scaling == "po2")


def brevitas_layer(layer: nn.Module, spec: LayerSpec, signed_input: bool = True) -> nn.Module:
    """A Brevitas twin of a float layer: same geometry, weights, bias, mode and device, with the weight
    quantizer of ``spec`` (and, when ``spec.act_bit_width`` is set, an input quantizer, signed or not).

    This is the quantizer :func:`quantize` installs, so ``brevitas_layer(layer, spec).quant_weight()``
    is exactly the Ŵ that will run.
    """
    common: dict[str, Any] = {
        "weight_quant": weight_quant_for(spec),
        "input_quant": _input_quant(spec, signed_input),
        "return_quant_tensor": False,
    }
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        q: nn.Module = qnn.QuantLinear(layer.in_features, layer.out_features, bias=bias, **common)
    else:
        geometry = {
            "in_channels": layer.in_channels,
            "out_channels": layer.out_channels,
            "kernel_size": layer.kernel_size,
            "stride": layer.stride,
            "padding": layer.padding,
            "dilation": layer.dilation,
            "groups": layer.groups,
            "padding_mode": layer.padding_mode,
            "bias": bias,
        }
        if isinstance(layer, nn.ConvTranspose2d):
            q = qnn.QuantConvTranspose2d(output_padding=layer.output_padding, **geometry, **common)
        elif isinstance(layer, nn.Conv2d):
            q = qnn.QuantConv2d(**geometry, **common)
        else:
            q = qnn.QuantConv1d(**geometry, **common)
    with torch.no_grad():
        q.weight.copy_(layer.weight)
        if bias:
            q.bias.copy_(layer.bias)
    q.train(layer.training)
    return q.to(layer.weight.device)


def _rebit(layer: QuantWBIOL, spec: LayerSpec, signed_input: bool) -> None:
    """Swap a Brevitas layer's weight (and, if asked, input) quantizer in place; float weights untouched."""
    injector = weight_quant_for(spec)
    layer.weight_quant = injector.proxy_class(layer, injector)
    act = _input_quant(spec, signed_input)
    if act is not None:
        layer.input_quant = act.proxy_class(layer, act)


def _describe(layer: nn.Module) -> str:
    if isinstance(layer, QuantWBIOL):
        try:
            bits = int(layer.quant_weight().bit_width.item())
            return f"{type(layer).__name__} {bits}b"
        except Exception:  # a Brevitas layer with quantization disabled
            return type(layer).__name__
    return f"{type(layer).__name__} float"


@torch.no_grad()
def _nonnegative_inputs(model: nn.Module, names: Iterable[str], x: torch.Tensor) -> dict[str, bool]:
    """Whether each layer's input is non-negative on ``x`` (then an unsigned quantizer wastes no level)."""
    layers = {n: model.get_submodule(n) for n in names}
    out: dict[str, bool] = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda mod, inp, n=n: out.__setitem__(n, out.get(n, True) and bool(inp[0].min() >= 0))
        )
        for n, m in layers.items()
    ]
    try:
        with eval_mode(model):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return out


def calibrate(
    model: nn.Module, data: Any, *, bias_correction: bool = False, max_batches: int | None = None
) -> None:
    """Brevitas calibration (activation scales from data), optionally followed by bias correction.

    ``data`` is any form :func:`~aq_brevitas.nnutils.iter_x_batches` streams (images, an
    ``(images, labels)`` pair, a Dataset, a DataLoader, an iterable of batches); labels are unused.
    ``max_batches`` stops each pass early. The model's train/eval flag is restored afterwards.
    """
    from brevitas.graph.calibrate import bias_correction_mode, calibration_mode

    was_training = model.training
    model.eval()
    with torch.no_grad():
        with calibration_mode(model):
            for x in iter_x_batches(data, limit_batches=max_batches):
                model(x)
        if bias_correction:
            with bias_correction_mode(model):
                for x in iter_x_batches(data, limit_batches=max_batches):
                    model(x)
    model.train(was_training)


def _check_convertible(model: nn.Module, policy: LayerwisePolicy, *, warn_uncovered: bool) -> list[str]:
    """Refuse what cannot be converted (one-line :class:`PolicyError`); the layers the policy leaves
    uncovered, named in a ``UserWarning`` when ``warn_uncovered``."""
    if not isinstance(policy, LayerwisePolicy):
        raise PolicyError(
            f"policy is a {type(policy).__name__}, not a LayerwisePolicy",
            "load it with LayerwisePolicy.load(path)",
        )
    if not quantizable_layers(model):
        raise PolicyError(
            "model has no quantizable layers (Conv1d/Conv2d/ConvTranspose2d/Linear)",
            "pass a model with at least one such layer",
        )
    policy.check(model)
    uncovered = policy.matches(model).uncovered
    if uncovered and warn_uncovered:
        warnings.warn(
            f"policy has no spec and no default for layers {', '.join(uncovered)}; they stay float "
            '-- fix: add them to the policy\'s layers or give it a default (LayerwisePolicy(default=...) / "default")',
            UserWarning,
            stacklevel=4,
        )
    for names in shared_layer_names(model).values():
        specs = {policy.spec_for(n) for n in names}
        if len(specs) > 1:
            raise PolicyError(
                f"layers {' and '.join(names)} are one shared module but the policy gives them different specs",
                "give them the same spec, or copy.deepcopy the module so each name has its own",
            )
    return uncovered


def _convert(
    model: nn.Module,
    policy: LayerwisePolicy,
    *,
    inplace: bool,
    swap_float: bool,
    calibration_data: Any,
    fold_bn: bool,
    bias_correction: bool,
    input_signed: dict[str, bool] | None = None,
    warn_uncovered: bool = True,
) -> nn.Module:
    # A search result carries its policy: quantize(model, search_policy(...)) keeps working.
    policy = policy.policy if isinstance(getattr(policy, "policy", None), LayerwisePolicy) else policy
    uncovered = _check_convertible(model, policy, warn_uncovered=warn_uncovered and swap_float)
    warn_unsupported(model)
    target = model if inplace else copy.deepcopy(model)
    if fold_bn:
        fold_batchnorm(target)
    specs = policy.resolve(quantizable_layers(target))
    signed = {n: True for n in specs}
    first_batch = (
        next(iter_x_batches(calibration_data, limit_batches=1), None)
        if calibration_data is not None
        else None
    )
    if input_signed is not None:
        signed.update(input_signed)
    elif first_batch is not None and any(s.act_bit_width for s in specs.values()):
        signed = {n: not nonneg for n, nonneg in _nonnegative_inputs(target, specs, first_batch).items()}
    changes = []
    for name, spec in specs.items():
        layer = target.get_submodule(name)
        before = _describe(layer)
        if isinstance(layer, QuantWBIOL):
            _rebit(layer, spec, signed.get(name, True))
        elif swap_float:
            target.set_submodule(name, brevitas_layer(layer, spec, signed.get(name, True)))
        else:
            raise PolicyError(
                f"layer {name} is a plain {type(layer).__name__}, not a Brevitas layer",
                "use aq_brevitas.quantize for float models",
            )
        changes.append(
            LayerChange(name, before, f"{type(target.get_submodule(name)).__name__} {spec.short()}")
        )
    for name in uncovered:  # the change record also names what was left alone, and why
        kept = _describe(target.get_submodule(name))
        changes.append(LayerChange(name, kept, f"{kept} (not in policy)"))
    if calibration_data is not None:
        calibrate(target, calibration_data, bias_correction=bias_correction)
    target.aq_policy = policy
    target.aq_changes = changes
    target.aq_input_signed = signed  # input quantizer signedness, needed to rebuild from a checkpoint
    return target


def quantize(
    model: nn.Module,
    policy: LayerwisePolicy,
    *,
    inplace: bool = False,
    calibration_data: Any = None,
    fold_bn: bool = False,
    bias_correction: bool = False,
) -> nn.Module:
    """Swap every layer the policy covers for its Brevitas twin; calibrate if data is given.

    ``policy`` is a :class:`LayerwisePolicy`, or a search result carrying one as ``.policy``.
    ``calibration_data`` is any form :func:`calibrate` accepts; its first batch also decides whether
    each input quantizer is signed (a layer whose input is non-negative gets an unsigned one).
    ``fold_bn=True`` folds conv-following BatchNorms into the conv first (what FINN-style integer
    deployment wants); by default BatchNorm stays a float module after the quantized conv.
    Layers the policy does not cover (no entry and no default) stay float, with a ``UserWarning``
    naming them; they appear in ``aq_changes`` as ``(not in policy)``. Returns the quantized model
    (a copy unless ``inplace``); raises :class:`PolicyError` for a policy that does not fit the model.

    >>> import torch
    >>> from torch import nn
    >>> from aq_brevitas import LayerSpec, LayerwisePolicy, quantize
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    >>> q = quantize(model, LayerwisePolicy(default=LayerSpec(4)), calibration_data=torch.rand(8, 1, 8, 8))
    >>> [c.new for c in q.aq_changes]
    ['QuantConv2d 4b max pc', 'QuantLinear 4b max pc']
    >>> q(torch.rand(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """
    return _convert(
        model,
        policy,
        inplace=inplace,
        swap_float=True,
        calibration_data=calibration_data,
        fold_bn=fold_bn,
        bias_correction=bias_correction,
    )


def apply_policy(
    model: nn.Module, policy: LayerwisePolicy, *, inplace: bool = False, calibration_data: Any = None
) -> nn.Module:
    """Re-configure the weight (and input) quantizers of an existing Brevitas model per ``policy``,
    keeping its float weights; a copy unless ``inplace``. Plain float layers raise :class:`PolicyError`
    (use :func:`quantize` for those).

    >>> from torch import nn
    >>> from aq_brevitas import LayerSpec, LayerwisePolicy, apply_policy, quantize
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    >>> q = quantize(model, LayerwisePolicy(default=LayerSpec(4)))
    >>> rebit = apply_policy(q, LayerwisePolicy({"0": LayerSpec(8), "3": LayerSpec(2)}))
    >>> [(c.old, c.new) for c in rebit.aq_changes]
    [('QuantConv2d 4b', 'QuantConv2d 8b max pc'), ('QuantLinear 4b', 'QuantLinear 2b max pc')]
    """
    return _convert(
        model,
        policy,
        inplace=inplace,
        swap_float=False,
        calibration_data=calibration_data,
        fold_bn=False,
        bias_correction=False,
    )


def changes_table(changes: Iterable[LayerChange]) -> str:
    rows = [f"{'layer':<28} {'before':<22} after"]
    rows += [f"{c.name:<28} {c.old:<22} {c.new}" for c in changes]
    return "\n".join(rows)


# -- quantized checkpoints -----------------------------------------------------------------------------
def save_quantized(model: nn.Module, path: Any, meta: dict[str, Any] | None = None) -> None:
    """Save a model made by :func:`quantize`: its state_dict, plus a sidecar with the policy that made it.

    ``meta={"arch": name}`` lets :func:`load_quantized` (and the CLI) rebuild a reference architecture
    by name; any other model is rebuilt from the float model you pass to :func:`load_quantized`.
    """
    from .storage import save_checkpoint

    policy = getattr(model, "aq_policy", None)
    if policy is None:
        raise PolicyError(
            "only models made by aq_brevitas.quantize can be saved this way (no policy attached)",
            "quantize the float model with aq_brevitas.quantize(model, policy) first",
        )
    save_checkpoint(
        path,
        {"state_dict": model.state_dict()},
        meta={
            **(meta or {}),
            "kind": "brevitas",
            "policy": policy.to_dict(),
            "input_signed": getattr(model, "aq_input_signed", {}),
        },
    )


def load_quantized(path: Any, float_model: nn.Module | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a quantized model from :func:`save_quantized` output.

    The skeleton is ``float_model`` (any ``nn.Module`` of the same architecture; it is not modified)
    or, without one, the reference architecture named in the sidecar's ``arch``.
    """
    import brevitas.config

    from .models import build_model, load_weights
    from .storage import load_checkpoint, read_sidecar

    state = load_checkpoint(path)
    meta = read_sidecar(path)
    if meta.get("kind") != "brevitas" or "policy" not in meta:
        raise CheckpointError(
            f"{path} is not a quantized checkpoint written by aq-brevitas",
            "create one with `aq-brevitas quantize` or aq_brevitas.save_quantized",
        )
    if float_model is None and "arch" not in meta:
        raise CheckpointError(
            f"{path} does not name a reference architecture, so it cannot be rebuilt by name",
            "pass the float model: load_quantized(path, float_model=MyNet())",
        )
    policy = LayerwisePolicy.from_dict(meta["policy"])
    signed = {str(k): bool(v) for k, v in dict(meta.get("input_signed", {})).items()}
    model = _convert(
        copy.deepcopy(float_model) if float_model is not None else build_model(meta["arch"]),
        policy,
        inplace=True,
        swap_float=True,
        calibration_data=None,
        fold_bn=bool(meta.get("fold_bn", False)),
        bias_correction=False,
        input_signed=signed,
        warn_uncovered=False,  # replaying a saved policy: its coverage was reported when it was made
    )
    old = brevitas.config.IGNORE_MISSING_KEYS
    brevitas.config.IGNORE_MISSING_KEYS = True  # activation scales exist only after calibration
    try:
        load_weights(model, state["state_dict"], path, "recorded policy/architecture")
    finally:
        brevitas.config.IGNORE_MISSING_KEYS = old
    model.aq_policy = policy
    return model.eval(), meta
