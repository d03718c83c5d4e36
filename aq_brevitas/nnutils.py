"""Torch utilities every stage shares: which layers are quantizable and their geometry, fx leaf
tracing, conv→BatchNorm pairing and folding, mode guards, frozen quantized weights, and the one
data convention (:func:`as_xy`, :func:`iter_x_batches`, :func:`as_dataset`) with its image check.

The single list of quantizable layer types lives here. Brevitas ``QuantConv*``/``QuantLinear``
subclass the torch layers, so the same test finds them in models that are already quantized.
Nothing here imports another module of the package except :mod:`aq_brevitas.errors`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

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
# Layers whose output may feed a BatchNorm that folds into them (Linear folds too, see folded_weight,
# but pairing looks for convs only).
BN_PAIRED_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)
_BATCH = 256  # images per forward when a helper runs the model over in-memory data


# ---------------------------------------------------------------------------------------- layers
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
    """Warn (``UserWarning``) naming every layer of an unsupported type: it stays float."""
    bad = unsupported_layers(model)
    if bad:
        listed = ", ".join(f"{n} ({t})" for n, t in bad.items())
        warnings.warn(
            f"aq-brevitas leaves these layers in float, their type is not supported: {listed} -- fix: "
            "replace them with Conv1d/Conv2d/ConvTranspose2d/Linear if they should be quantized; "
            "otherwise nothing to do (their cost counts as 32-bit)",
            stacklevel=3,
        )


def out_channels(layer: nn.Module) -> int:
    """Output channels (features, for Linear) of a quantizable layer."""
    return int(layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels)


def plain_tensor(value: Any) -> torch.Tensor | None:
    """A plain tensor from a tensor or a Brevitas ``QuantTensor`` (its ``.value``); else None."""
    if isinstance(value, torch.Tensor):
        return value
    inner = getattr(value, "value", None)
    return inner if isinstance(inner, torch.Tensor) else None


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


@torch.no_grad()
def check_forward(model: nn.Module, example_input: torch.Tensor) -> None:
    """One forward on a single sample: a shape/dtype mismatch becomes a one-line :class:`ModelError`."""
    check_images(example_input, "example inputs", unit_range=False, batch=False)
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
    """Run one forward pass (eval mode) with hooks and record every quantizable layer's geometry.

    Layers the forward never reaches still cost parameters: they get 0 MACs and empty shapes.
    Raises :class:`ModelError` for a model without quantizable layers or a failing forward.
    """
    check_images(example_input, "example inputs", unit_range=False, batch=False)
    layers = quantizable_layers(model)
    if not layers:
        raise ModelError(
            "model has no quantizable layers (Conv1d/Conv2d/Linear)",
            "pass a model with at least one such layer",
        )
    found: dict[str, LayerGeometry] = {}

    def hook(name: str):
        def fn(mod, inputs, output):
            x = getattr(inputs[0], "value", inputs[0])
            out = getattr(output, "value", output)
            if name not in found:
                i, o = tuple(x.shape[1:]), tuple(out.shape[1:])
                found[name] = LayerGeometry(
                    name, type(mod).__name__, int(mod.weight.numel()), layer_macs(mod, i, o), i, o
                )

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        with eval_mode(model):
            model(example_input[:1])
    except (RuntimeError, ValueError) as exc:
        raise ModelError(
            f"model forward failed on an input of shape {tuple(example_input.shape)} ({str(exc).splitlines()[0][:120]})",
            "pass an example input of the shape the model expects",
        ) from None
    finally:
        for h in handles:
            h.remove()
    for n in [n for n in layers if n not in found]:  # dead branches still cost parameters
        found[n] = LayerGeometry(n, type(layers[n]).__name__, int(layers[n].weight.numel()), 0, (), ())
    return {n: found[n] for n in layers}


# ------------------------------------------------------------------------------------ mode guards
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


def _constant(value: Any):
    return lambda *args, **kwargs: value


@contextlib.contextmanager
def frozen_quant_weights(model: nn.Module) -> Iterator[int]:
    """Quantize each Brevitas layer's weights once and reuse them until exit; yields how many layers.

    Also stops torch.ao/torchao fake-quant observers until exit (they keep observing in eval mode).
    Weights do not change during an attack, yet every forward re-quantizes them (stats, scale, round).
    Inside the block the quantized weights are constants, so outputs and input gradients are
    unchanged but **weights get no gradient** -- use it around attacks, not around training steps.
    Enter it in the mode the attack runs the model in (attacks run in eval mode). Layers whose weight
    quantizer needs the quantized input are left alone. The original ``quant_weight`` is restored on
    exit, also on exceptions. Float models pass through untouched (yields 0).
    """
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer as QuantWBIOL

    missing = object()
    frozen: list[tuple[nn.Module, Any]] = []
    with paused_observers(model):
        try:
            for m in model.modules():
                if not isinstance(m, QuantWBIOL):
                    continue
                wq = m.weight_quant
                if not wq.is_quant_enabled or wq.requires_quant_input:
                    continue
                with torch.no_grad():
                    qw = m.quant_weight()
                previous = m.__dict__.get("quant_weight", missing)
                m.quant_weight = _constant(qw)
                frozen.append((m, previous))
            yield len(frozen)
        finally:
            for m, previous in reversed(frozen):
                if previous is missing:
                    m.__dict__.pop("quant_weight", None)
                else:
                    m.quant_weight = previous


@contextlib.contextmanager
def frozen_activation_scales(model: nn.Module) -> Iterator[int]:
    """Stop gradients to Brevitas activation-quantizer parameters until exit; yields how many.

    Their ``requires_grad`` flags are restored on exit, also on exceptions.
    """
    from brevitas.proxy.runtime_quant import ActQuantProxyFromInjector

    params = {
        id(p): p
        for m in model.modules()
        if isinstance(m, ActQuantProxyFromInjector)
        for p in m.parameters()
        if p.requires_grad
    }
    try:
        for p in params.values():
            p.requires_grad_(False)
        yield len(params)
    finally:
        for p in params.values():
            p.requires_grad_(True)


# ------------------------------------------------------------------------------------- fx tracing
class LeafTracer(fx.Tracer):
    """Keeps quantizable layers and BatchNorms (Brevitas ones included) as single call_module nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, QUANTIZABLE_TYPES + (_BatchNorm,)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace_leaves(model: nn.Module) -> fx.GraphModule | None:
    """``model`` as an fx graph with :class:`LeafTracer`, or None when symbolic tracing fails
    (data-dependent control flow...)."""
    try:
        tracer = LeafTracer()
        graph = tracer.trace(model)
        return fx.GraphModule(tracer.root, graph)
    except Exception:  # tracing fails in many ways (TraceError, TypeError, NotImplementedError...)
        return None


# ------------------------------------------------------------------------------------- BN folding
def _bn_fits(layer: nn.Module, bn: nn.Module | None) -> bool:
    return isinstance(bn, _BatchNorm) and bn.num_features == out_channels(layer)


def find_conv_bn_pairs(model: nn.Module) -> dict[str, str]:
    """Map conv name -> BatchNorm name for each Conv/ConvTranspose whose output feeds only a BatchNorm.

    Uses the fx graph where the model traces: every call of the conv must have exactly one user, a call
    of the same BatchNorm. Where tracing fails, falls back to module order: a conv immediately followed
    (among leaf modules, in ``named_modules()`` order) by a BatchNorm with matching ``num_features``.
    """
    modules = dict(model.named_modules())
    gm = trace_leaves(model)
    if gm is None:
        leaves = [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())]
        return {
            name: next_name
            for (name, m), (next_name, nxt) in zip(leaves, leaves[1:])
            if isinstance(m, BN_PAIRED_TYPES) and _bn_fits(m, nxt)
        }
    found: dict[str, str | None] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), BN_PAIRED_TYPES):
            continue
        users = list(node.users)
        bn_name = None
        if len(users) == 1 and users[0].op == "call_module" and len(users[0].all_input_nodes) == 1:
            cand = users[0].target
            if _bn_fits(modules[node.target], modules.get(cand)):
                bn_name = cand
        prev = found.get(node.target, bn_name)
        found[node.target] = bn_name if prev == bn_name else None  # a shared conv must always feed it
    return {conv: bn for conv, bn in found.items() if bn is not None}


def bn_scale(bn: nn.Module) -> torch.Tensor:
    """Per-channel factor gamma/sqrt(running_var + eps) of a BatchNorm in eval mode (detached, float).

    The linear part of the BatchNorm: pass it as ``operator_norm(..., out_scale=bn_scale(bn))`` to score
    an unfolded (e.g. quantized) conv weight as if the BatchNorm were folded into it.
    Raises :class:`ModelError` for a non-BatchNorm or one without running statistics.
    """
    if not isinstance(bn, _BatchNorm):
        raise ModelError(
            f"{type(bn).__name__} is not a BatchNorm", "pass the BatchNorm that follows the layer"
        )
    if bn.running_var is None:
        raise ModelError(
            "BatchNorm has no running statistics (track_running_stats=False), so it cannot be folded",
            "use track_running_stats=True, or leave the BatchNorm out of the pairs",
        )
    var = bn.running_var.detach()
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(var)
    return gamma / torch.sqrt(var + bn.eps)


def folded_weight(conv: nn.Module, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, b)`` of ``bn(conv(x))`` as one conv, with the BatchNorm in eval semantics (running stats).

    W is scaled per output channel by gamma/sqrt(var + eps); b = (b_conv - mean) * scale + beta.
    Handles Conv1d/Conv2d/Linear (weight dim 0 is out) and ConvTranspose2d (out is dim 1, per group).
    """
    if not isinstance(conv, QUANTIZABLE_TYPES) or not isinstance(bn, _BatchNorm):
        raise ModelError(
            f"cannot fold {type(bn).__name__} into {type(conv).__name__}",
            "pass a Conv1d/Conv2d/ConvTranspose2d/Linear and the BatchNorm that follows it",
        )
    out = out_channels(conv)
    if bn.num_features != out:
        raise ModelError(
            f"BatchNorm has {bn.num_features} features but the layer {out} output channels",
            "pair each conv with the BatchNorm applied to its output",
        )
    w = conv.weight.detach()
    scale = bn_scale(bn).to(w.dtype)
    mean = bn.running_mean.detach().to(w.dtype)
    beta = bn.bias.detach().to(w.dtype) if bn.bias is not None else torch.zeros_like(mean)
    if isinstance(conv, nn.ConvTranspose2d):
        g = conv.groups
        cin, cout_g = w.shape[0], w.shape[1]
        w_f = (w.reshape(g, cin // g, cout_g, *w.shape[2:]) * scale.reshape(g, 1, cout_g, 1, 1)).reshape(
            w.shape
        )
    else:
        w_f = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    b = conv.bias.detach() if conv.bias is not None else torch.zeros_like(mean)
    return w_f, (b - mean) * scale + beta


def fold_batchnorm(model: nn.Module) -> dict[str, str]:
    """Fold, in place, every BatchNorm that directly follows a conv into it (eval semantics).

    Each folded BatchNorm is replaced by ``nn.Identity``; returns the pairs, conv name -> bn name.
    """
    pairs = find_conv_bn_pairs(model)
    for conv_name, bn_name in pairs.items():
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        w, b = folded_weight(conv, bn)
        with torch.no_grad():
            conv.weight.copy_(w)
            if conv.bias is None:
                conv.bias = nn.Parameter(b.detach().clone())
            else:
                conv.bias.copy_(b)
        model.set_submodule(bn_name, nn.Identity())
    return pairs


# ------------------------------------------------------------------------------------------- data
_DATA_FIX = (
    "pass image and label tensors, an (images, labels) pair, a Dataset, a DataLoader "
    "or an iterable of (images, labels) batches"
)
_LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_images(x: Any, name: str = "inputs", *, unit_range: bool = True, batch: bool = True) -> None:
    """Refuse anything but a floating-point image tensor, with a one-line :class:`ConfigError`.

    ``batch``: the tensor is shaped ``(N, *sample_shape)`` with N >= 1. ``unit_range``: its values
    are finite and in [0, 1] (un-normalised images: the convention of every attack and of ε).
    ``name`` is how the messages call ``x``.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = f"have dtype {x.dtype}" if isinstance(x, torch.Tensor) else f"is a {type(x).__name__}"
        raise ConfigError(
            f"{name} {got}, expected a floating-point tensor of images",
            "pass float images, e.g. x.float() / 255, shaped (N, *input_shape)",
        )
    if batch and x.dim() < 2:
        raise ConfigError(
            f"{name} of shape {tuple(x.shape)} has no batch dimension",
            "pass a batch shaped (N, *input_shape) with N >= 1",
        )
    if batch and x.shape[0] == 0:
        raise ConfigError(f"{name} is empty", "pass at least one image, e.g. load_split('val', limit=256)")
    if unit_range and x.numel() and not torch.isfinite(x).all():
        raise ConfigError(f"{name} contain NaN or Inf", "pass finite images in [0, 1]")
    if unit_range and x.numel() and (x.min() < 0 or x.max() > 1):
        raise ConfigError(
            f"{name} span [{x.min().item():.3g}, {x.max().item():.3g}], outside [0, 1]",
            "pass un-normalised images in [0, 1]; normalise inside the model",
        )


def _is_pair(data: Any) -> bool:
    """An ``(images, labels)`` pair: two tensors, the second 1-D (so two image batches are not one)."""
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, torch.Tensor) for t in data)
        and data[1].dim() == 1
    )


def _pieces(data: Any, name: str, split: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Every accepted form of data as a stream of ``(images, labels or None)`` pieces.

    In-memory tensors come as one piece, or in chunks of ``split``; a Dataset is read through a
    DataLoader; a DataLoader or any other iterable is read batch by batch, as it yields them.
    """
    if isinstance(data, TensorDataset) and 1 <= len(data.tensors) <= 2:
        data = data.tensors[0] if len(data.tensors) == 1 else tuple(data.tensors)
    if isinstance(data, torch.Tensor) or _is_pair(data):
        x, y = (data, None) if isinstance(data, torch.Tensor) else data
        chunks = x.split(split) if split else (x,)
        labels = (y.split(split) if split else (y,)) if y is not None else (None,) * len(chunks)
        yield from zip(chunks, labels)
        return
    if isinstance(data, Dataset):  # map-style or iterable: let torch batch it
        data = DataLoader(data, batch_size=split or _BATCH)
    if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise ConfigError(f"{name} of type {type(data).__name__} is not supported", _DATA_FIX)
    for i, b in enumerate(data):
        if isinstance(b, torch.Tensor):
            yield b, None
        elif isinstance(b, (tuple, list)) and b and all(isinstance(t, torch.Tensor) for t in b[:2]):
            yield b[0], (b[1] if len(b) > 1 else None)
        else:
            raise ConfigError(f"{name}: batch {i} is a {type(b).__name__}, not (images, labels)", _DATA_FIX)


def _cat(parts: list[torch.Tensor], name: str) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    try:
        return torch.cat(parts)
    except RuntimeError as exc:
        raise ConfigError(
            f"{name}: its batches cannot be joined ({str(exc).splitlines()[0][:100]})",
            "make every batch hold images of one shape",
        ) from None


@torch.no_grad()
def predicted_labels(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model``'s top-1 class for each image of ``x`` (eval mode, batches of 256), shape (N,)."""
    with eval_mode(model):
        return torch.cat([model(b).argmax(1) for b in x.split(_BATCH)])


def as_xy(
    data: Any, *, model: nn.Module | None = None, limit: int | None = None, name: str = "data"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` tensors from any accepted form of data: the package's one data convention.

    Accepted: an image tensor (then the labels are ``model``'s predictions, so ``model`` is needed),
    an ``(images, labels)`` pair, a torch ``Dataset``, a ``DataLoader``, or any iterable of
    ``(images, labels)`` batches (a list of them, a generator...). ``limit`` keeps the first ``limit``
    images (a DataLoader is read no further). Images are checked by :func:`check_images` (float,
    (N, ...), finite, in [0, 1]); labels must be 1-D integers, one per image; they come back as int64.
    Anything else raises a one-line :class:`ConfigError` whose subject is ``name``.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be positive, got {limit}", "pass limit>=1 or None")
    xs, ys, n = [], [], 0
    for xb, yb in _pieces(data, name, None):
        xs.append(xb)
        ys.append(yb)
        n += len(xb)
        if limit is not None and n >= limit:
            break
    if not xs:
        raise ConfigError(f"{name} is empty", "pass at least one image, e.g. load_split('val', limit=256)")
    if len({yb is None for yb in ys}) > 1:
        raise ConfigError(f"{name} mixes batches with and without labels", "give every batch its labels")
    x = _cat(xs, name)[:limit]
    check_images(x, name)
    if ys[0] is None:
        if model is None:
            raise ConfigError(f"{name} has no labels", "pass (images, labels)")
        y = predicted_labels(model, x)
    else:
        y = _cat(ys, name)[:limit]
    if y.dtype not in _LABEL_DTYPES or y.dim() != 1:
        raise ConfigError(
            f"labels have dtype {y.dtype} and shape {tuple(y.shape)}", "pass 1-D integer labels"
        )
    if len(y) != len(x):
        raise ConfigError(f"{len(x)} images but {len(y)} labels", "pass matching images and labels")
    return x.detach(), y.long().detach()


def iter_x_batches(
    data: Any, *, limit_batches: int | None = None, batch_size: int = _BATCH, name: str = "calibration data"
) -> Iterator[torch.Tensor]:
    """The image batches of any form :func:`as_xy` accepts, streamed (labels, if any, are dropped).

    In-memory tensors are split into batches of ``batch_size``; a DataLoader's batches are used as it
    yields them. Stops after ``limit_batches`` batches. Each batch must be a float tensor with a
    batch dimension (values are not range-checked: calibration sees what the model will see).
    """
    for i, (xb, _) in enumerate(_pieces(data, name, batch_size)):
        if limit_batches is not None and i >= limit_batches:
            return
        check_images(xb, name, unit_range=False)
        yield xb


def as_dataset(data: Any, *, name: str = "training data") -> Dataset:
    """A map-style Dataset (indexable, sized) of ``(image, label)`` from any form :func:`as_xy` accepts.

    A map-style Dataset is used as it is (a DataLoader's own dataset too: sampling is the caller's);
    anything else is read by :func:`as_xy` (and checked) into a ``TensorDataset``.
    """
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, Dataset) and not isinstance(data, (IterableDataset, TensorDataset)):
        return data
    return TensorDataset(*as_xy(data, name=name))
