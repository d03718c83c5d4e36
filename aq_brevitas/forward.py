"""Running a model: the inputs its forward takes, the errors it raises, and the guards around a run.

* The forward signature tells a tuple of inputs from data with labels (:func:`forward_arity`,
  :func:`example_args`); entry points that read ``(images, labels)`` refuse multi-input models in one
  line (:func:`require_single_input`).
* Any exception of the model's own forward becomes one line that keeps its type and message, with a
  fix that fits it (:func:`reported_forward`, :func:`check_forward`).
* Guards give the model back as it came: eval mode restoring each module's flag (BatchNorm statistics
  untouched), paused torch.ao observers, frozen Brevitas quantized weights.
* The one data convention: :func:`as_xy`, :func:`iter_x_batches`, :func:`as_dataset`, with its image
  check :func:`check_images`.

Nothing here imports another module of the package except :mod:`aq_brevitas.errors` and
:mod:`aq_brevitas.classifier` (how a model's output is read).
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from .classifier import class_logits
from .errors import AqError, ConfigError, ModelError, a_type

_BATCH = 256  # images per forward when a helper runs the model over in-memory data


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

    Weights do not change in an attack, yet each forward re-quantizes them; torch.ao observers pause too.
    Inside the block the quantized weights are constants, so outputs and input gradients are
    unchanged but **weights get no gradient** -- use it around attacks, not around training steps.
    Enter it in the mode the attack runs the model in (eval). Layers whose weight quantizer needs the
    quantized input are left alone; ``quant_weight`` is restored on exit, also on exceptions. Float
    models pass through untouched (yields 0). Attacks run inside
    :func:`~aq_brevitas.quantization.twin.attack_twin`, which also fuses the activation quantizers.
    """
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer as QuantWBIOL

    frozen = 0
    with paused_observers(model), instance_overrides() as override:
        for m in model.modules():
            wq = m.weight_quant if isinstance(m, QuantWBIOL) else None
            if wq is None or not wq.is_quant_enabled or wq.requires_quant_input:
                continue
            with torch.no_grad():
                override(m, "quant_weight", _constant(m.quant_weight()))
            frozen += 1
        yield frozen


@contextlib.contextmanager
def instance_overrides() -> Iterator[Callable[[nn.Module, str, Any], None]]:
    """``override(module, name, value)`` sets ``name`` on that instance only until exit; each is then
    restored (also on exceptions), or removed where the instance had none of its own."""
    missing = object()
    saved: list[tuple[nn.Module, str, Any]] = []

    def override(module: nn.Module, name: str, value: Any) -> None:
        saved.append((module, name, module.__dict__.get(name, missing)))
        setattr(module, name, value)

    try:
        yield override
    finally:
        for module, name, previous in reversed(saved):
            if previous is missing:
                module.__dict__.pop(name, None)
            else:
                setattr(module, name, previous)


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


# ------------------------------------------------------------------------------ forward signature
def _forward_params(model: nn.Module) -> tuple[tuple[str, ...], int | None]:
    """Names of ``model.forward``'s required positional parameters, and how many positional
    arguments it takes at most (None: ``*args``, or a signature that cannot be read)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return (), None
    required: list[str] = []
    most = 0
    for p in params:
        if p.kind is p.VAR_POSITIONAL:
            return tuple(required), None
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            most += 1
            if p.default is p.empty:
                required.append(p.name)
    return tuple(required), most


def forward_arity(model: nn.Module) -> int:
    """How many inputs ``model.forward`` requires (its required positional parameters; at least 1).

    This is how a tuple of tensors is told apart: for a model of arity 2 ``(img, vec)`` is its two
    inputs, for a model of arity 1 ``(images, labels)`` is data with labels.
    """
    return max(1, len(_forward_params(model)[0]))


def _inputs_phrase(model: nn.Module) -> str:
    names = _forward_params(model)[0]
    return f"{type(model).__name__}.forward takes {len(names)} inputs ({', '.join(names)})"


def require_single_input(model: nn.Module, what: str) -> None:
    """One-line :class:`ModelError` when ``model.forward`` requires more than one input.

    ``what`` names the entry point that reads data as ``(images, labels)`` and so takes
    single-input models only (evaluation, attacks, the search, training, export).
    """
    if forward_arity(model) > 1:
        raise ModelError(
            f"{what} takes single-input models, and {_inputs_phrase(model)}",
            "wrap the model so that forward takes one tensor (split it inside forward); lipschitz_scores, "
            "layer_geometry, policy.cost and quantize's calibration_data take a tuple of inputs",
        )


def example_args(model: nn.Module, example: Any, name: str = "example inputs") -> tuple[torch.Tensor, ...]:
    """The positional arguments of ``model``'s forward from an example: a tensor or a tuple of tensors.

    A single-input model takes one float tensor ``(N, *input_shape)`` (checked by
    :func:`check_images`, any range); a model whose forward requires k inputs takes a tuple (or list)
    of k tensors (up to the number of positional parameters it accepts), each with the batch dimension
    first and the same N. Anything else is a one-line :class:`ConfigError`/:class:`ModelError`
    naming the inputs the forward takes.
    """
    required, most = _forward_params(model)
    if not isinstance(example, (tuple, list)):
        if len(required) > 1:
            raise ModelError(
                f"{_inputs_phrase(model)}, but {name} is a single "
                + ("tensor" if isinstance(example, torch.Tensor) else type(example).__name__),
                f"pass a tuple of {len(required)} tensors ({', '.join(required)}), each (N, ...)",
            )
        check_images(example, name, unit_range=False)
        return (example,)
    n = len(example)
    if n < max(1, len(required)) or (most is not None and n > max(most, 1)):
        raise ModelError(
            f"{name} is a tuple of {n} tensors, but {type(model).__name__}.forward takes "
            f"{max(1, len(required))} input(s)",
            "pass one tensor per input of forward (labels are not part of the inputs)",
        )
    if n == 1:
        return example_args(model, example[0], name)
    for i, t in enumerate(example):
        if not isinstance(t, torch.Tensor) or t.dim() < 1 or t.shape[0] == 0:
            raise ConfigError(
                f"{name}[{i}] is not a tensor with a batch dimension",
                "pass tensors shaped (N, ...), the same N for every input",
            )
    if len({t.shape[0] for t in example}) > 1:
        raise ConfigError(
            f"{name} have different batch sizes {[t.shape[0] for t in example]}",
            "pass the same number of samples for every input",
        )
    return tuple(example)


# --------------------------------------------------------------------------------- forward errors
_DTYPE_CLUE = re.compile(r"dtype|scalar type|\b(input|weight|bias|result|output) type\b", re.IGNORECASE)


_SHAPE_CLUE = re.compile(
    r"shape|size|channels|dimension|\bdims?\b|elements|mat1|mat2|must match|expected input", re.IGNORECASE
)


@contextlib.contextmanager
def reported_forward(inputs: Any) -> Iterator[None]:
    """Turn any exception the model's forward raises in the block into a one-line :class:`ModelError`.

    The message keeps the exception type and the first line of its message, with the shapes of
    ``inputs`` (a tensor or a tuple of tensors); the fix fits the cause: a dtype mismatch asks for
    inputs of the weights' dtype, a shape mismatch for inputs of the expected shape, anything else to
    fix the model or its inputs. The original exception is chained (``--debug`` shows its traceback).
    :class:`AqError` passes through unchanged.
    """
    try:
        yield
    except AqError:
        raise
    except Exception as exc:
        kind = type(exc).__name__
        line = (str(exc).strip().splitlines() or [""])[0][:200] or "(no message)"
        ts = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
        shapes = " and ".join(
            str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__ for t in ts
        )
        if _DTYPE_CLUE.search(line):
            raise ModelError(
                f"model forward raised {kind} on inputs of shape {shapes}: {line}",
                "pass inputs of the dtype of the model's weights (e.g. x.float()), or convert the model "
                "with model.to(x.dtype)",
            ) from exc
        if _SHAPE_CLUE.search(line):
            raise ModelError(
                f"model forward raised {kind} on inputs of shape {shapes}: {line}",
                "pass inputs of the shape the model expects: (N, *input_shape), batch dimension first",
            ) from exc
        raise ModelError(
            f"model forward raised {kind} on inputs of shape {shapes}: {line}",
            f"the model's forward raised {kind}: fix the model or its inputs",
        ) from exc


@torch.no_grad()
def check_forward(model: nn.Module, example_input: Any) -> None:
    """One forward (eval mode, observers paused) on the first sample of an example input.

    ``example_input`` is what :func:`example_args` accepts (a tensor, or a tuple of tensors for a
    multi-input model). A failing forward becomes the one-line :class:`ModelError` of
    :func:`reported_forward`; the model comes back in its own mode with its BatchNorm statistics.
    """
    args = example_args(model, example_input)
    with eval_mode(model), paused_observers(model), reported_forward(args):
        model(*(a[:1] for a in args))


# ------------------------------------------------------------------------------------------- data
_DATA_FIX = (
    "pass image and label tensors, an (images, labels) pair, a Dataset, a DataLoader "
    "or an iterable of (images, labels) batches"
)
_INPUTS_FIX = "for a model with several inputs, pass a tuple of input tensors or batches of such tuples"
_LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_images(x: Any, name: str = "inputs", *, unit_range: bool = True, batch: bool = True) -> None:
    """Refuse anything but a floating-point image tensor, with a one-line :class:`ConfigError`.

    ``batch``: the tensor is shaped ``(N, *sample_shape)`` with N >= 1. ``unit_range``: its values
    are finite and in [0, 1] (un-normalised images: the convention of every attack and of ε).
    ``name`` is how the messages call ``x``.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = f"have dtype {x.dtype}" if isinstance(x, torch.Tensor) else f"is {a_type(x)}"
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
            "pass un-normalised images in [0, 1], and normalization=(mean, std) for a model that expects "
            "normalised inputs (or normalise inside the model)",
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
            raise ConfigError(f"{name}: batch {i} is {a_type(b)}, not (images, labels)", _DATA_FIX)


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
    """``model``'s top-1 class for each image of ``x`` (eval mode, batches of 256), shape (N,): the
    argmax of its :func:`~aq_brevitas.classifier.class_logits` (a single logit: 1 where it is positive).
    A failing forward is the one-line error of :func:`reported_forward`."""
    with eval_mode(model), paused_observers(model), reported_forward(x):
        return torch.cat([class_logits(model(b)).argmax(1) for b in x.split(_BATCH)])


def as_xy(
    data: Any, *, model: nn.Module | None = None, limit: int | None = None, name: str = "data"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` tensors from any accepted form of data: the package's one data convention.

    Accepted: an image tensor (then the labels are ``model``'s predictions, so ``model`` is needed),
    an ``(images, labels)`` pair, a torch ``Dataset``, a ``DataLoader``, or any iterable of
    ``(images, labels)`` batches (a list of them, a generator...). ``limit`` keeps the first ``limit``
    images (a DataLoader is read no further). Images are checked by :func:`check_images` (float,
    (N, ...), finite, in [0, 1]); labels must be 1-D integers, one per image; they come back as int64.
    Anything else raises a one-line :class:`ConfigError` whose subject is ``name``. With ``model``, a
    model whose forward requires several inputs is refused in one line (:func:`require_single_input`):
    a pair of tensors is ``(images, labels)`` here, never two inputs.
    """
    if model is not None:
        require_single_input(model, name)
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
    data: Any,
    *,
    limit_batches: int | None = None,
    batch_size: int = _BATCH,
    name: str = "calibration data",
    model: nn.Module | None = None,
) -> Iterator[Any]:
    """The image batches of any form :func:`as_xy` accepts, streamed (labels, if any, are dropped).

    In-memory tensors are split into batches of ``batch_size``; a DataLoader's batches are used as it
    yields them. Stops after ``limit_batches`` batches. Each batch must be a float tensor with a
    batch dimension (values are not range-checked: calibration sees what the model will see).

    With a ``model`` whose forward requires k > 1 inputs (:func:`forward_arity`), each batch is a
    tuple of k tensors instead, to call ``model(*batch)``: ``data`` is then a tuple/list of at least k
    tensors (the inputs, then anything else such as labels, split into batches), a Dataset, or an
    iterable of such tuples (a DataLoader over ``TensorDataset(img, vec, labels)``...).
    """
    arity = forward_arity(model) if model is not None else 1
    if arity == 1:
        for i, (xb, _) in enumerate(_pieces(data, name, batch_size)):
            if limit_batches is not None and i >= limit_batches:
                return
            check_images(xb, name, unit_range=False)
            yield xb
        return
    if isinstance(data, torch.Tensor):
        example_args(model, data, name)  # raises: one tensor for a forward of several inputs, named
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        if len(data) < arity:
            raise ConfigError(f"{name} holds {len(data)} tensors for a model of {arity} inputs", _INPUTS_FIX)
        data = zip(*(t.split(batch_size) for t in data[:arity]))  # in-memory inputs: one tuple per batch
    elif isinstance(data, Dataset):
        data = DataLoader(data, batch_size=batch_size)
    if isinstance(data, (str, bytes, Mapping, torch.Tensor)) or not isinstance(data, Iterable):
        raise ConfigError(f"{name} of type {type(data).__name__} is not supported", _INPUTS_FIX)
    for i, b in enumerate(data):
        if limit_batches is not None and i >= limit_batches:
            return
        if not (isinstance(b, (tuple, list)) and len(b) >= arity):
            raise ConfigError(f"{name}: batch {i} is not a tuple of {arity} inputs", _INPUTS_FIX)
        yield example_args(model, tuple(b[:arity]), f"{name} batch {i}")


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
