"""The one place that builds attacks, and the one input convention every attack, forward and ε share.

Every attack has the torchattacks interface ``attack(images, labels) -> adversarial images``. Inputs
are in [0, 1] ("pixel space") and ε is measured there, whatever the model expects:

* **Normalised models.** A model trained on ``(x - mean) / std`` is given ``normalization=(mean,
  std)`` (one value, or one per channel of dim 1); the package then runs it inside
  :func:`normalized_inputs`, which normalises its input on the way in. Attacks, predictions,
  calibration and training all see [0, 1] inputs, so ε stays in pixel space -- the convention of
  torchattacks' ``set_normalization_used``. That method itself is not used: in torchattacks 3.5.1 an
  attack told so takes and returns *normalised* inputs, and it only reshapes for 4-D images.
* **Inputs that are not images.** torchattacks' Square and AutoAttack code only takes N×C×H×W images
  with H, W >= 2. :func:`make_attack` runs them on the C×H×W view :func:`image_grid` gives other
  samples (a C×L signal becomes C×h×w with h·w = L; the model still sees its own shape).
* **Converted integer models** (``convert_fx``/``convert_pt2e``) have no input gradient; gradient
  attacks refuse them in one line (:func:`check_input_gradient`) instead of failing in autograd.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .config import (
    ATTACKS,
    GRADIENT_FREE,
    GRID_ATTACKS,
    Normalization,
    check_eps,
    check_normalization,
    default_alpha,
)
from .errors import ConfigError, ModelError

if TYPE_CHECKING:  # torch is imported by the functions that need it; keep this module light for the CLI
    import torch
    from torch import nn

    from .config import AttackConfig


def normalize(x: torch.Tensor, normalization: Any) -> torch.Tensor:
    """``(x - mean) / std`` per channel (dim 1) of a batch ``x`` of any rank; what a normalised model
    is fed. Raises :class:`ConfigError` for a ``normalization`` that does not fit ``x``."""
    import torch

    channels = x.shape[1] if x.dim() >= 2 else 1
    mean, std = check_normalization(normalization, channels)
    shape = (1, -1) + (1,) * (x.dim() - 2) if x.dim() >= 2 else (-1,)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return (x - m) / s


class _InputNormalizer:
    """A forward pre-hook: :func:`normalize` on the model's first input."""

    def __init__(self, normalization: Normalization) -> None:
        self.normalization = normalization

    def __call__(self, module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        import torch

        if not args or not isinstance(args[0], torch.Tensor):
            return None
        return (normalize(args[0], self.normalization), *args[1:])


def _normalizers(model: nn.Module) -> list[_InputNormalizer]:
    return [h for h in model._forward_pre_hooks.values() if isinstance(h, _InputNormalizer)]


@contextlib.contextmanager
def normalized_inputs(model: nn.Module, normalization: Any) -> Iterator[nn.Module]:
    """Until exit, ``model`` takes [0, 1] inputs and is fed ``(x - mean) / std`` (nothing with None).

    The one mechanism behind every ``normalization=(mean, std)`` of the package: a forward pre-hook on
    ``model`` itself, so layer names, parameters and train/eval mode stay the model's own, and copies
    made inside the block (``quantize`` deep-copies) normalise too. Nested blocks with the same values
    normalise once. A mean/std whose length is neither 1 nor the inputs' channel count raises a
    one-line :class:`ConfigError` at the first forward; a malformed one at once.
    """
    if normalization is None:
        yield model
        return
    values = check_normalization(normalization)
    active = _normalizers(model)
    if active:  # already normalising (an outer block, or a copy of a model made inside one)
        if any(h.normalization != values for h in active):
            raise ConfigError(
                "the model is already fed normalised inputs with another mean/std",
                "give one normalization=(mean, std) per call",
            )
        yield model
        return
    handle = model.register_forward_pre_hook(_InputNormalizer(values))
    try:
        yield model
    finally:
        handle.remove()


def forward_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``model.forward`` itself is given for ``x``: ``x`` normalised inside a
    :func:`normalized_inputs` block, else ``x``. For code that runs the model's traced graph (which
    bypasses the block's hook on the model) instead of calling the model."""
    active = _normalizers(model)
    return normalize(x, active[0].normalization) if active else x


# ------------------------------------------------------------------------------------ input checks
def image_grid(sample_shape: Sequence[int]) -> tuple[int, int, int] | None:
    """The C×H×W image the grid attacks (Square, AutoAttack) run on for samples of ``sample_shape``.

    An image with H, W >= 2 is itself; any other sample keeps its channels (dim 0; 1 for a flat
    vector) and folds the rest, L values, into an h×w grid with h the largest divisor of L up to √L
    (a 3×1024 signal is viewed as 3×32×32). None when no grid with h >= 2 exists (L prime or below 4).
    """
    shape = tuple(int(s) for s in sample_shape)
    if len(shape) == 3 and min(shape[1:]) >= 2:
        return shape  # type: ignore[return-value]
    channels, rest = (shape[0], shape[1:]) if len(shape) >= 2 else (1, shape)
    n = math.prod(rest)
    h = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0) if n >= 1 else 1
    return (channels, h, n // h) if h >= 2 else None


def check_input_gradient(model: nn.Module, x: torch.Tensor) -> None:
    """Refuse a model whose output has no gradient with respect to its input, in one line.

    One forward and backward of ``x[:1]`` in eval mode, fake-quant observers paused (so neither
    BatchNorm statistics nor observed ranges move). Gradient attacks need that gradient; a torch.ao
    model after ``convert_fx``/``convert_pt2e`` computes with integer ops and has none.
    Raises :class:`ModelError` naming the prepared (fake-quant) model as the one to attack.
    """
    import torch

    from .forward import eval_mode, paused_observers

    x1 = x[:1].detach().clone().requires_grad_(True)
    grad = None
    with torch.enable_grad(), eval_mode(model), paused_observers(model):
        out = model(x1)
        out = getattr(out, "value", out)  # a Brevitas QuantTensor
        if isinstance(out, torch.Tensor) and out.requires_grad:
            (grad,) = torch.autograd.grad(out.float().sum(), x1, allow_unused=True)
    if grad is None:
        raise ModelError(
            "the model has no input gradient (a converted integer torch.ao model, after "
            "convert_fx/convert_pt2e), so gradient attacks cannot run on it",
            "attack the prepared (fake-quant) model from before conversion (prepare_fx_model/"
            "prepare_pt2e_model): it computes the same quantized function",
        )


def needs_input_gradient(attack: Any) -> bool:
    """Whether ``attack`` (a name of :data:`ATTACKS` or a built attack) asks for input gradients."""
    if isinstance(attack, str):
        return attack.lower() not in GRADIENT_FREE
    if isinstance(attack, AdaptedAttack):
        return attack.name not in GRADIENT_FREE
    return type(attack).__name__.lower() not in GRADIENT_FREE


# ------------------------------------------------------------------------------------ the factory
class _GridModel:
    """``model`` seen by a grid attack: takes the C×H×W view of each sample and calls ``model`` on the
    sample's own shape. Train/eval mode, parameters and modules are ``model``'s (torchattacks reads
    and sets them), so the attack changes and restores the real model's mode as it would unwrapped."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.sample_shape: tuple[int, ...] = ()

    @property
    def training(self) -> bool:
        return self.model.training

    def train(self, mode: bool = True) -> _GridModel:
        self.model.train(mode)
        return self

    def eval(self) -> _GridModel:
        self.model.eval()
        return self

    def parameters(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        return self.model.parameters(*args, **kwargs)

    def named_modules(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, Any]]:
        return self.model.named_modules(*args, **kwargs)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(z.reshape(z.shape[0], *self.sample_shape))


class _TemperatureScaled(_GridModel):
    """``model`` whose logits are divided by their own per-example standard deviation (detached).

    Cross-entropy on a confident quantized net saturates: its gradient vanishes although the margin
    can still be moved (Gupta & Ajanthan 2021). Rescaling each example's logits to unit spread keeps
    the softmax away from saturation; the argmax, hence every prediction, is unchanged."""

    def __init__(self, model: Any) -> None:
        super().__init__(model.model if isinstance(model, _GridModel) else model)
        self.inner = model

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        logits = self.inner(z)
        return logits / logits.detach().std(dim=1, keepdim=True).clamp(min=1e-6)


class AdaptedAttack:
    """What :func:`make_attack` returns: ``attack(images, labels) -> adversarial images``, both in
    [0, 1] and of the model's own input shape.

    Around the torchattacks object (``.attack``; its attributes such as ``eps`` or ``steps`` read
    through) it applies the package's conventions: the model is fed normalised inputs when
    ``normalization`` is set (:func:`normalized_inputs`), a gradient attack first checks once that the
    model has an input gradient (:func:`check_input_gradient`), and a grid attack runs on the
    :func:`image_grid` view of non-image samples (:class:`ConfigError` when there is none). The
    model is attacked in eval mode and given back in the mode it came in, each module's own flag.
    """

    def __init__(
        self, name: str, attack: Any, model: nn.Module, grid: _GridModel | None, normalization: Any
    ) -> None:
        self.name, self.attack, self.model, self.grid = name, attack, model, grid
        self.normalization = normalization
        self.checked = name in GRADIENT_FREE

    def __getattr__(self, key: str) -> Any:
        if key == "attack":  # not set yet (copy/pickle): no recursion
            raise AttributeError(key)
        return getattr(self.attack, key)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from .forward import eval_mode

        # eval mode is torchattacks' own default; the guard also gives back each module's own flag,
        # where torchattacks' recovery calls model.train() on everything (a frozen BatchNorm too)
        with normalized_inputs(self.model, self.normalization), eval_mode(self.model):
            if not self.checked:
                check_input_gradient(self.model, images)
                self.checked = True
            if self.grid is None:
                return self.attack(images, labels)
            grid = image_grid(images.shape[1:])
            if grid is None:
                raise ConfigError(
                    f"{self.name} needs image-like inputs, and samples of shape {tuple(images.shape[1:])} "
                    "have no C x H x W view with H, W >= 2",
                    "use pgd or fgsm for such inputs (evaluate_robustness skips square/autoattack itself)",
                )
            self.grid.sample_shape = tuple(images.shape[1:])
            adv = self.attack(images.reshape(images.shape[0], *grid), labels)
            return adv.reshape(images.shape)


def make_attack(
    name: str | AttackConfig,
    model: nn.Module,
    *,
    eps: float | None = None,
    steps: int = 10,
    alpha: float | None = None,
    random_start: bool = True,
    seed: int = 0,
    n_classes: int = 10,
    normalization: Any = None,
    **extra: Any,
) -> AdaptedAttack:
    """Build an attack by name (torchattacks classes): fgsm, pgd, pgdl2, tpgd, square, autoattack
    (torchattacks' own shortened AutoAttack), apgd-ce, apgd-dlr, apgd-t (9 target classes with 10
    classes), apgd-t3 (APGD-T on the 3 highest-scoring other classes), fab-t (targeted FAB), or
    apgd-ce-scaled (APGD-CE on the logits divided by their own
    per-example standard deviation, detached: the temperature scaling of Gupta & Ajanthan 2021 that
    undoes the vanishing cross-entropy gradients of confident quantized nets; predictions unchanged).

    ``name`` may also be an :class:`~aq_brevitas.config.AttackConfig`, whose settings then replace
    ``eps``, ``steps``, ``alpha``, ``random_start`` and (unless given) ``normalization``. ``eps`` is the
    budget on [0, 1] inputs (L-inf; L2 for pgdl2); ``alpha`` the step (default 2.5·ε/steps);
    ``random_start`` applies to pgd/pgdl2; ``steps`` is also the iteration count of the APGD and FAB
    attacks. ``tpgd`` is TRADES's inner maximisation (Zhang et al.
    2019): PGD on KL(f(x') ‖ f(x)) from x + 0.001·N(0, 1), labels unused. ``n_queries`` (square,
    default 1000) goes in ``extra``. ``normalization=(mean, std)``: ``model`` expects normalised
    inputs; the attack still takes and returns [0, 1] inputs (see :func:`normalized_inputs`; to
    classify its output yourself, do it inside that block too).
    Returns an :class:`AdaptedAttack`, called as ``attack(images, labels) -> adversarial images``.
    Raises :class:`ConfigError` for an unknown name, an ε outside [0, 1] or a malformed
    normalization; the attack raises :class:`ModelError` at its first call on a model without input
    gradient.
    """
    import torchattacks

    if not isinstance(name, str):  # an AttackConfig
        cfg = name
        name, eps, steps, alpha, random_start = cfg.name, cfg.eps, cfg.steps, cfg.alpha, cfg.random_start
        normalization = normalization if normalization is not None else cfg.normalization
    if eps is None:
        raise ConfigError("make_attack needs eps", "pass eps=..., e.g. eps=0.1")
    eps = check_eps(eps)
    if normalization is not None:
        normalization = check_normalization(normalization)
    name = name.lower()
    step = alpha or default_alpha(eps, steps)
    grid = _GridModel(model) if name in GRID_ATTACKS else None
    target: Any = grid if grid is not None else model
    if name == "fgsm":
        atk = torchattacks.FGSM(model, eps=eps)
    elif name in ("pgd", "pgdl2"):
        cls = torchattacks.PGD if name == "pgd" else torchattacks.PGDL2
        atk = cls(model, eps=eps, alpha=step, steps=steps, random_start=random_start)
    elif name == "tpgd":
        atk = torchattacks.TPGD(model, eps=eps, alpha=step, steps=steps)
    elif name == "square":
        atk = torchattacks.Square(target, eps=eps, n_queries=extra.pop("n_queries", 1000), seed=seed, **extra)
    elif name == "autoattack":
        atk = torchattacks.AutoAttack(
            target, norm="Linf", eps=eps, version="standard", n_classes=n_classes, seed=seed
        )
    elif name in ("apgd-ce", "apgd-dlr", "apgd-ce-scaled"):
        loss = "dlr" if name == "apgd-dlr" else "ce"
        victim = _TemperatureScaled(target) if name == "apgd-ce-scaled" else target
        atk = torchattacks.APGD(victim, norm="Linf", eps=eps, steps=steps, seed=seed, loss=loss, **extra)
    elif name in ("apgd-t", "apgd-t3"):  # apgd-t3: only the 3 highest-scoring other classes as targets
        classes = min(n_classes, 4) if name == "apgd-t3" else n_classes
        atk = torchattacks.APGDT(target, norm="Linf", eps=eps, steps=steps, seed=seed, n_classes=classes)
    elif name == "fab-t":
        atk = torchattacks.FAB(
            target, norm="Linf", eps=eps, steps=steps, seed=seed, multi_targeted=True, n_classes=n_classes
        )
    else:
        raise ConfigError(f"unknown attack {name!r}", f"use one of {', '.join(ATTACKS)}")
    return AdaptedAttack(name, atk, model, grid, normalization)
