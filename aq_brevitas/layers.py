"""Which layers are quantizable, and their geometry (parameters, MACs, shapes).

The single list of quantizable layer types lives here. Brevitas ``QuantConv*``/``QuantLinear``
subclass the torch layers, so the same test finds them in models that are already quantized.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .errors import ConfigError, ModelError

QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.ConvTranspose2d)
# Layers that hold weights a user may expect us to quantize, but which we do not support.
UNSUPPORTED_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose3d,
    nn.Bilinear,
    nn.RNNBase,
    nn.MultiheadAttention,
    nn.Embedding,
)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm on running stats, examples independent), restoring each module's own flag."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def _has_observed(fake_quant: nn.Module) -> bool:
    """Whether a fake-quant module's observer has seen data (before that its qparams have no shape yet)."""
    mv = getattr(getattr(fake_quant, "activation_post_process", None), "min_val", None)
    return mv is None or (mv.numel() > 0 and bool(torch.isfinite(mv).all()))


@contextlib.contextmanager
def paused_observers(model: nn.Module) -> Iterator[None]:
    """Stop torch.ao/torchao fake-quant observers until exit (they keep observing in eval mode).

    Checking, evaluating or attacking a QAT-prepared model must not move its activation ranges.
    Observers that have not seen data yet are left on: their qparams have no shape before that.
    """
    observers = [
        (m, m.observer_enabled.clone())
        for m in model.modules()
        if isinstance(getattr(m, "observer_enabled", None), torch.Tensor) and _has_observed(m)
    ]
    try:
        for m, _ in observers:
            m.observer_enabled.fill_(0)
        yield
    finally:
        for m, flag in observers:
            m.observer_enabled.copy_(flag)


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Quantizable layers by qualified name (as in ``named_modules()``), in registration order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QUANTIZABLE_TYPES)}


def unsupported_layers(model: nn.Module) -> dict[str, str]:
    """Weight-carrying layers this package cannot quantize, by name -> type name."""
    return {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, UNSUPPORTED_TYPES)}


def shared_layer_names(model: nn.Module) -> dict[int, list[str]]:
    """Quantizable modules registered under more than one name (one object, several names)."""
    seen: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, QUANTIZABLE_TYPES) and name:
            seen.setdefault(id(m), []).append(name)
    return {k: v for k, v in seen.items() if len(v) > 1}


def warn_unsupported(model: nn.Module) -> None:
    bad = unsupported_layers(model)
    if bad:
        listed = ", ".join(f"{n} ({t})" for n, t in bad.items())
        warnings.warn(
            f"aq-brevitas leaves these layers in float, their type is not supported: {listed}", stacklevel=3
        )


@dataclass(frozen=True)
class LayerGeometry:
    """Shape facts of one layer, measured on a forward pass: what cost accounting needs."""

    name: str
    type: str
    params: int  # weight elements (biases are kept at higher precision and not counted)
    macs: int  # multiply-accumulates per sample
    input_shape: tuple[int, ...]  # per sample
    output_shape: tuple[int, ...]  # per sample

    def to_dict(self) -> dict:
        return asdict(self)


def layer_macs(layer: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates per sample: every weight is used once per output (or, transposed, input) position."""
    w = layer.weight
    if isinstance(layer, nn.Linear):
        return math.prod(out_shape[:-1]) * w.numel()
    if isinstance(layer, nn.ConvTranspose2d):
        return math.prod(in_shape[1:]) * w.numel()
    return math.prod(out_shape[1:]) * w.numel()


def check_example_input(example_input: torch.Tensor) -> None:
    if not torch.is_tensor(example_input) or not torch.is_floating_point(example_input):
        raise ConfigError(
            f"example input must be a float tensor, got {getattr(example_input, 'dtype', type(example_input).__name__)}",
            "pass a batch of images, e.g. torch.rand(1, 1, 28, 28)",
        )


@torch.no_grad()
def check_forward(model: nn.Module, example_input: torch.Tensor) -> None:
    """One forward on a single sample: a shape/dtype mismatch becomes a one-line :class:`ModelError`."""
    check_example_input(example_input)
    try:
        with eval_mode(model), paused_observers(model):
            model(example_input[:1])
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ModelError(
            f"model forward failed on inputs of shape {tuple(example_input.shape)} ({str(exc).splitlines()[0][:120]})",
            "pass inputs of the shape and dtype the model expects (N x C x H x W images in [0, 1])",
        ) from None


@torch.no_grad()
def layer_geometry(model: nn.Module, example_input: torch.Tensor) -> dict[str, LayerGeometry]:
    """Run one forward pass with hooks and record every quantizable layer's geometry."""
    check_example_input(example_input)
    layers = quantizable_layers(model)
    if not layers:
        raise ModelError(
            "model has no quantizable layers (Conv1d/Conv2d/Linear)",
            "pass a model with at least one such layer",
        )
    found: dict[str, LayerGeometry] = {}

    def hook(name: str):
        def fn(mod, inputs, output):
            x = inputs[0]
            x = getattr(x, "value", x)
            out = getattr(output, "value", output)
            if name not in found:
                o = tuple(out.shape[1:])
                found[name] = LayerGeometry(
                    name,
                    type(mod).__name__,
                    int(mod.weight.numel()),
                    layer_macs(mod, tuple(x.shape[1:]), o),
                    tuple(x.shape[1:]),
                    o,
                )

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    was_training = model.training
    try:
        model.eval()
        model(example_input[:1])
    except (RuntimeError, ValueError) as exc:
        raise ModelError(
            f"model forward failed on an input of shape {tuple(example_input.shape)} ({str(exc).splitlines()[0][:120]})",
            "pass an example input of the shape the model expects",
        ) from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [n for n in layers if n not in found]
    for n in missing:  # layers not reached by forward (dead branches) still cost parameters
        m = layers[n]
        found[n] = LayerGeometry(n, type(m).__name__, int(m.weight.numel()), 0, (), ())
    return {n: found[n] for n in layers}
