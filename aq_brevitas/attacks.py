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
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .config import (
    GRADIENT_FREE,
    GRID_ATTACKS,
    AttackConfig,
    Normalization,
    check_normalization,
    takes_config,
)
from .errors import ConfigError, ModelError

if TYPE_CHECKING:  # torch is imported by the functions that need it; keep this module light for the CLI
    import torch
    from torch import nn


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
    """Until exit, ``model`` takes [0, 1] inputs and is fed ``(x - mean) / std`` (nothing with None),
    and its output is read as class logits (:func:`~aq_brevitas.classifier.logit_view`: a single-logit
    binary model gives ``[0, z]``).

    The block every entry point runs the model in, and the one mechanism behind every
    ``normalization=(mean, std)`` of the package: a forward pre-hook on ``model`` itself, so layer
    names, parameters and train/eval mode stay the model's own, and copies made inside the block
    (``quantize`` deep-copies) normalise too. Nested blocks with the same values normalise once. A
    mean/std whose length is neither 1 nor the inputs' channel count raises a one-line
    :class:`ConfigError` at the first forward; a malformed one at once.
    """
    from .classifier import logit_view

    values = None if normalization is None else check_normalization(normalization)
    active = _normalizers(model)
    if active and values is not None and any(h.normalization != values for h in active):
        # an outer block (or a copy of a model made inside one) normalises already, with other values
        raise ConfigError(
            "the model is already fed normalised inputs with another mean/std",
            "give one normalization=(mean, std) per call",
        )
    with logit_view(model):
        if values is None or active:
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
    Built without a class count, the torchattacks object is built at the first call, for the class
    count of the model's output there (:func:`class_count`); ``note`` says what that count changed
    (autoattack without APGD-T), else None.
    """

    def __init__(
        self,
        config: AttackConfig,
        model: nn.Module,
        grid: _GridModel | None,
        seed: int,
        n_classes: int | None,
    ) -> None:
        self.name, self.config, self.model, self.grid = config.name, config, model, grid
        self.normalization, self.seed = config.normalization, seed
        self.checked = config.name in GRADIENT_FREE
        #: what was changed for the model's class count (None: the attack runs as named)
        self.note: str | None = None
        self.attack: Any = None
        if n_classes is not None or self.name not in _BY_CLASS_COUNT:
            self.build(n_classes or 2)  # an attack that never reads the class count is built at once

    def build(self, n_classes: int) -> None:
        """Build the torchattacks attack for a model of ``n_classes`` classes (refused in one line
        where the attack's loss needs more, :func:`class_shortfall`)."""
        if class_shortfall(self.name, n_classes) is not None:
            raise ConfigError(
                f"{self.name} needs at least {MIN_CLASSES[self.name]} classes (its DLR loss ranks that many "
                f"logits), and the model has {n_classes}",
                "use apgd-ce, fab-t or pgd, which run on any class count",
            )
        victim = self.model if self.grid is None else self.grid
        self.attack = ATTACK_BUILDERS[self.name](self.config, victim, self.seed, n_classes)
        if self.name == "autoattack" and n_classes < MIN_CLASSES["apgd-t"]:
            self.note = f"autoattack: {autoattack_note(n_classes)}"

    def __getattr__(self, key: str) -> Any:
        if key in ("attack", "config"):  # not set yet (copy/pickle): no recursion
            raise AttributeError(key)
        if self.attack is None:  # not built yet: the settings are the config's
            return getattr(self.config, key)
        return getattr(self.attack, key)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from .forward import eval_mode

        # eval mode is torchattacks' own default; the guard also gives back each module's own flag,
        # where torchattacks' recovery calls model.train() on everything (a frozen BatchNorm too)
        with normalized_inputs(self.model, self.normalization), eval_mode(self.model):
            if not self.checked:
                check_input_gradient(self.model, images)
                self.checked = True
            if self.attack is None:
                self.build(class_count(self.model, images))
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


# the attacks whose torchattacks object depends on the class count, built at their first call
_BY_CLASS_COUNT = frozenset({"autoattack", "apgd-t", "apgd-t3", "apgd-dlr", "fab-t"})

# One builder per attack name: ``(config, model, seed, n_classes) -> torchattacks attack``. ``model`` is
# the grid view (:class:`_GridModel`) for the names of GRID_ATTACKS, else the model itself.
AttackBuilder = Callable[["AttackConfig", Any, int, int], Any]


def _fgsm(cfg: AttackConfig, model: Any, seed: int, n_classes: int) -> Any:
    import torchattacks

    return torchattacks.FGSM(model, eps=cfg.eps)


def _pgd(cfg: AttackConfig, model: Any, seed: int, n_classes: int) -> Any:
    import torchattacks

    cls = torchattacks.PGD if cfg.name == "pgd" else torchattacks.PGDL2
    return cls(model, eps=cfg.eps, alpha=cfg.step_size, steps=cfg.steps, random_start=cfg.random_start)


def _tpgd(cfg: AttackConfig, model: Any, seed: int, n_classes: int) -> Any:
    import torchattacks

    return torchattacks.TPGD(model, eps=cfg.eps, alpha=cfg.step_size, steps=cfg.steps)


def _square(cfg: AttackConfig, model: Any, seed: int, n_classes: int) -> Any:
    import torchattacks

    return torchattacks.Square(model, eps=cfg.eps, n_queries=cfg.queries, seed=seed)


def _autoattack(cfg: AttackConfig, model: Any, seed: int, n_classes: int) -> Any:
    import torchattacks

    atk = torchattacks.AutoAttack(
        model, norm="Linf", eps=cfg.eps, version="standard", n_classes=n_classes, seed=seed
    )
    if n_classes < MIN_CLASSES["apgd-t"]:  # APGD-T cannot rank 4 logits: the others still run
        atk._autoattack.attacks = [
            a for a in atk._autoattack.attacks if not isinstance(a, torchattacks.APGDT)
        ]
    return atk


def _apgd(cfg: AttackConfig, model: Any, seed: int, n_classes: int) -> Any:
    import torchattacks

    loss = "dlr" if cfg.name == "apgd-dlr" else "ce"
    victim = _TemperatureScaled(model) if cfg.name == "apgd-ce-scaled" else model
    return torchattacks.APGD(victim, norm="Linf", eps=cfg.eps, steps=cfg.steps, seed=seed, loss=loss)


def _apgd_targeted(cfg: AttackConfig, model: Any, seed: int, n_classes: int) -> Any:
    import torchattacks

    classes = min(n_classes, 4) if cfg.name == "apgd-t3" else n_classes  # apgd-t3: the 3 best other classes
    return torchattacks.APGDT(model, norm="Linf", eps=cfg.eps, steps=cfg.steps, seed=seed, n_classes=classes)


def _fab_targeted(cfg: AttackConfig, model: Any, seed: int, n_classes: int) -> Any:
    import torchattacks

    return torchattacks.FAB(
        model, norm="Linf", eps=cfg.eps, steps=cfg.steps, seed=seed, multi_targeted=True, n_classes=n_classes
    )


#: the builder of each attack name of :data:`~aq_brevitas.config.ATTACKS` (what :func:`make_attack` runs)
ATTACK_BUILDERS: dict[str, AttackBuilder] = {
    "fgsm": _fgsm,
    "pgd": _pgd,
    "pgdl2": _pgd,
    "tpgd": _tpgd,
    "square": _square,
    "autoattack": _autoattack,
    "apgd-ce": _apgd,
    "apgd-dlr": _apgd,
    "apgd-ce-scaled": _apgd,
    "apgd-t": _apgd_targeted,
    "apgd-t3": _apgd_targeted,
    "fab-t": _fab_targeted,
}


#: the fewest classes an attack's loss needs (torchattacks 3.5.1): the DLR loss divides by the gap
#: to the 3rd largest logit, its targeted form by the gap to the 4th
MIN_CLASSES: dict[str, int] = {"apgd-dlr": 3, "apgd-t": 4, "apgd-t3": 4}


def class_shortfall(name: str, n_classes: int) -> str | None:
    """Why the attack ``name`` cannot run on a model of ``n_classes`` classes (None: it can). Every
    other attack runs on 2 classes and more (the targeted ones on ``n_classes - 1`` targets: one for a
    binary model, the other class)."""
    need = MIN_CLASSES.get(name, 2)
    if n_classes >= need:
        return None
    return (
        f"needs at least {need} classes (its DLR loss ranks that many logits), and the model has {n_classes}"
    )


def autoattack_note(n_classes: int) -> str:
    """What AutoAttack runs on a model of ``n_classes`` < 4 classes: all but APGD-T."""
    return (
        f"APGD-T left out ({class_shortfall('apgd-t', n_classes)}); "
        f"APGD-CE, FAB-T ({n_classes - 1} target class{'es' if n_classes > 2 else ''}) and Square ran"
    )


def class_count(model: nn.Module, images: torch.Tensor) -> int:
    """How many classes ``model`` scores, from one forward of ``images[:1]`` (eval mode, no gradient):
    the width of its class logits (:func:`~aq_brevitas.classifier.class_logits`; 2 for one logit)."""
    import torch

    from .classifier import n_classes
    from .forward import eval_mode, paused_observers

    with torch.no_grad(), eval_mode(model), paused_observers(model):
        return n_classes(model(images[:1]))


@takes_config(AttackConfig)
def make_attack(
    config: AttackConfig, model: nn.Module, *, seed: int = 0, n_classes: int | None = None
) -> AdaptedAttack:
    """The attack ``config`` describes (torchattacks classes, :data:`ATTACK_BUILDERS`) on ``model``.

    ``config.name``: fgsm, pgd, pgdl2, tpgd (TRADES's inner maximisation, Zhang et al. 2019: PGD on
    KL(f(x') ‖ f(x)) from x + 0.001·N(0, 1), labels unused), square (``config.queries`` queries),
    autoattack (torchattacks' own shortened AutoAttack), apgd-ce, apgd-dlr, apgd-ce-scaled (APGD-CE on
    the logits divided by their own per-example standard deviation, detached: the temperature scaling
    of Gupta & Ajanthan 2021 against the vanishing cross-entropy gradients of confident quantized
    nets; predictions unchanged), apgd-t (``n_classes - 1`` targets), apgd-t3 (the 3 highest-scoring
    other classes) or fab-t (targeted FAB). ``seed`` seeds Square, AutoAttack, APGD and FAB.
    ``n_classes``: how many classes the model scores (None: read from the model at the first call,
    :func:`class_count`). A single-logit binary model is attacked on its two class logits ``[0, z]``
    (:mod:`aq_brevitas.classifier`). apgd-dlr needs 3 classes, apgd-t and apgd-t3 need 4
    (:data:`MIN_CLASSES`); autoattack on fewer than 4 leaves APGD-T out and says so in ``attack.note``.
    ``config.normalization=(mean, std)``: ``model`` expects normalised inputs; the attack still takes
    and returns [0, 1] inputs (see :func:`normalized_inputs`; to classify its output yourself, do it
    inside that block too, or read ``attack.normalization``). A ``DataParallel`` model is attacked as
    the network it holds.

    Returns an :class:`AdaptedAttack`, called as ``attack(images, labels) -> adversarial images``.
    Raises :class:`ConfigError` for anything but an AttackConfig (an attack name alone included) and
    for an attack the model has too few classes for (at its first call when ``n_classes`` is None);
    the attack raises :class:`ModelError` at its first call on a model without input gradient.

    >>> import torch
    >>> from aq_brevitas.attacks import make_attack
    >>> from aq_brevitas.config import AttackConfig
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    >>> x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    >>> adv = make_attack(AttackConfig("pgd", eps=0.1, steps=3), model)(x, y)
    >>> bool((adv - x).abs().max() <= 0.1 + 1e-6), adv.shape
    (True, torch.Size([4, 1, 4, 4]))
    """
    from .classifier import unwrap_parallel

    if not isinstance(config, AttackConfig):
        raise ConfigError(
            f"make_attack takes an AttackConfig, got {config!r}",
            "pass make_attack(AttackConfig(name, eps=..., steps=...), model)",
        )
    model = unwrap_parallel(model)
    grid = _GridModel(model) if config.name in GRID_ATTACKS else None
    return AdaptedAttack(config, model, grid, seed, n_classes)
