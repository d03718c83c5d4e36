"""Settings as frozen, validated, JSON-serialisable dataclasses (torchao's ``quantize_(model, config)`` shape).

* :class:`AttackConfig`: one attack, as :func:`~aq_brevitas.attacks.make_attack` builds it.
* :class:`TrainConfig`: adversarial training and fine-tuning
  (:func:`~aq_brevitas.train.training.adversarial_train`, :func:`~aq_brevitas.train.finetune.adversarial_finetune`).
* :class:`EvalConfig`: the robustness suite of :func:`~aq_brevitas.evaluate.evaluate_robustness`.

Each validates itself in ``__post_init__`` (a bad value raises a one-line :class:`ConfigError` naming
it), has ``replace(**changes)``, ``to_dict()`` and ``from_dict()``. The three share one declaration of
``normalization`` (:class:`InputNormalization`). This module imports neither torch nor Brevitas, so a
command-line parser can be built from it cheaply.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import ConfigError, a_type

ATTACKS = (
    "fgsm", "pgd", "pgdl2", "tpgd", "square", "autoattack",
    "apgd-ce", "apgd-dlr", "apgd-ce-scaled", "apgd-t", "apgd-t3", "fab-t",
)  # fmt: skip


GRADIENT_FREE = ("square",)  # the attacks that never ask the model for an input gradient


#: torchattacks code that only takes N x C x H x W images (APGD's steps are shaped [N, 1, 1, 1])
GRID_ATTACKS = ("square", "autoattack", "apgd-ce", "apgd-dlr", "apgd-ce-scaled", "apgd-t", "apgd-t3", "fab-t")


#: attack suites (:mod:`aq_brevitas.evaluate.suite`): the attacks of each, in the order they run
SUITES: dict[str, tuple[str, ...]] = {
    "adaptive": ("apgd-ce", "apgd-dlr", "apgd-t3", "transfer", "square"),  # the fast one's, scheduled
    "fast": ("apgd-ce", "apgd-dlr", "apgd-t3", "transfer", "square"),
    "reference": ("apgd-ce", "apgd-t", "fab-t", "square"),
}


SUITE_ATTACKS = (
    "apgd-ce", "apgd-dlr", "apgd-ce-scaled", "apgd-t", "apgd-t3", "fab-t", "square", "transfer", "pgd",
)  # fmt: skip


AUTOATTACK_VERSIONS = ("off", "standard", "torchattacks")


#: ``(mean, std)`` per channel, as :func:`check_normalization` returns it
Normalization = tuple[tuple[float, ...], tuple[float, ...]]


#: where attacks may run (:func:`~aq_brevitas.workers.resolve_device`): "auto" is a GPU when present
DEVICE_HELP = "where attacks run: auto (a GPU when one is present, else the CPU), cpu, cuda or cuda:N"


def check_device(device: Any) -> str:
    """``device`` if it names where attacks can run (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``),
    else a one-line :class:`ConfigError` (torch-free: whether the GPU exists is checked when used).

    >>> check_device("cuda:1")
    'cuda:1'
    """
    import re

    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ConfigError(f"unknown device {device!r}", "pass auto, cpu, cuda or cuda:N")
    return device


def check_eps(eps: float, name: str = "eps") -> float:
    """An L-inf budget on [0, 1] images as a float; :class:`ConfigError` unless a number in [0, 1]."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or math.isnan(eps):
        raise ConfigError(f"{name} must be a number, got {eps!r}", f"pass e.g. --{name} 0.1")
    if not 0.0 <= float(eps) <= 1.0:
        raise ConfigError(
            f"{name}={eps} is outside [0, 1] (inputs are images in [0, 1])", f"pass e.g. --{name} 0.1"
        )
    return float(eps)


def default_alpha(eps: float, steps: int) -> float:
    """Step size 2.5·ε/steps (Madry et al.), so steps can walk across the ball and back."""
    return 2.5 * eps / max(steps, 1)


# ------------------------------------------------------------------------------------ normalisation
def check_normalization(value: Any, channels: int | None = None) -> Normalization:
    """``(mean, std)`` as tuples of floats; :class:`ConfigError` unless equal-length, non-empty, with
    positive stds, and (given ``channels``, the size of the inputs' dim 1) one value or one per channel."""
    try:
        mean, std = (tuple(float(v) for v in part) for part in value)
        ok = bool(mean) and len(mean) == len(std) and all(s > 0 for s in std)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(
            f"normalization={value!r} is not a (mean, std) pair with positive stds",
            "pass e.g. normalization=((0.286,), (0.353,))",
        )
    if channels is not None and len(mean) not in (1, channels):
        raise ConfigError(
            f"normalization has {len(mean)} mean/std values but the inputs have {channels} channels (dim 1)",
            f"give one mean and std for all channels, or one per channel ({channels})",
        )
    return mean, std


OPTIMIZERS = ("sgd", "adam")
EVAL_ATTACKS = ("clean", "fgsm", "pgd")  # the per-ε attacks; Square and AutoAttack have their own switches
_C = TypeVar("_C", bound="ConfigBase")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _check_step(alpha: Any) -> None:
    if alpha is not None and not (_is_number(alpha) and 0 < alpha <= 1):
        raise ConfigError(
            f"alpha={alpha!r} is not a PGD step in (0, 1]", "pass e.g. --alpha 0.01, or omit it"
        )


class ConfigBase:
    """Shared behaviour: ``replace``, ``to_dict``/``from_dict`` with unknown names refused.

    ``__post_init__`` here ends the cooperative chain: a config that validates its own fields calls
    ``super().__post_init__()`` so that every mixin (:class:`InputNormalization`) checks its own."""

    def __post_init__(self) -> None:
        pass

    @classmethod
    def setting_names(cls) -> set[str]:
        """The names :meth:`replace` takes (the fields; a config with nested settings adds theirs)."""
        return {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]

    @classmethod
    def _check_names(cls, names: Any) -> None:
        known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown {cls.__name__} setting(s) {', '.join(map(repr, unknown))}",
                f"use {', '.join(known)}",
            )

    def replace(self: _C, **changes: Any) -> _C:
        """A copy with ``changes`` (field names, checked first: an unknown one is a one-line
        :class:`ConfigError`) passed on to :func:`dataclasses.replace`, which validates the copy."""
        self._check_names(changes)
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (tuples become lists)."""
        return json_ready(dataclasses.asdict(self))  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_C], d: Mapping[str, Any]) -> _C:
        """The config ``to_dict`` gave (missing names take their defaults)."""
        if not isinstance(d, Mapping):
            raise ConfigError(
                f"{cls.__name__} settings must be a mapping, got {type(d).__name__}", "pass a dict"
            )
        cls._check_names(d)
        return cls(**d)


_F = TypeVar("_F", bound=Callable[..., Any])


def takes_config(config_cls: type[ConfigBase]) -> Callable[[_F], _F]:
    """Decorate a function whose settings come in one ``config: config_cls``: a setting passed as a
    loose keyword (``search_policy(..., eps=0.1)``) is then a one-line :class:`ConfigError` naming the
    form to use (``config=SearchConfig(eps=...)``) instead of Python's bare ``TypeError``. Other
    unknown keywords still raise the ``TypeError``; the signature and docstring are the function's."""

    def decorate(fn: _F) -> _F:
        params = set(inspect.signature(fn).parameters)

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            extra = kwargs.keys() - params  # empty on every well-formed call: nothing more to do
            loose = sorted(extra & config_cls.setting_names()) if extra else []
            if loose:
                fields_ = {f.name for f in dataclasses.fields(config_cls)}  # type: ignore[arg-type]
                build = config_cls.__name__ + ("(" if set(loose) <= fields_ else "().replace(")
                raise ConfigError(
                    f"{fn.__name__}() takes {', '.join(loose)} in its config, not as a keyword",
                    f"pass config={build}{', '.join(f'{k}=...' for k in loose)})",
                )
            aliases = {k: k[2:] for k in extra if k.startswith("n_") and k[2:] in config_cls.setting_names()}
            if aliases:  # torchattacks' spelling (n_queries, n_restarts) of one of our settings
                raise ConfigError(
                    f"{fn.__name__}() has no keyword {', '.join(map(repr, aliases))}",
                    f"pass {', '.join(f'{v}=...' for v in aliases.values())} in config={config_cls.__name__}(...)",
                )
            return fn(*args, **kwargs)

        return call  # type: ignore[return-value]

    return decorate


def config_or_default(config: Any, default: _C) -> _C:
    """``config``, or ``default`` when it is None: what a function taking ``config=`` works with.
    Raises :class:`ConfigError` when ``config`` is another kind of config (a TrainConfig given to an
    evaluation), which would otherwise fail later on a missing field.

    >>> from aq_brevitas.config import EvalConfig, TrainConfig, config_or_default
    >>> config_or_default(None, TrainConfig()) == TrainConfig()
    True
    >>> config_or_default(EvalConfig(), TrainConfig())
    Traceback (most recent call last):
    ...
    aq_brevitas.errors.ConfigError: config is an EvalConfig, not a TrainConfig -- fix: pass TrainConfig(...)
    """
    if config is None:
        return default
    if not isinstance(config, type(default)):
        raise ConfigError(
            f"config is {a_type(config)}, not {a_type(default)}",
            f"pass {type(default).__name__}(...)",
        )
    return config


@dataclass(frozen=True)
class InputNormalization(ConfigBase):
    """The one declaration of a config's ``normalization=(mean, std)`` (None: the model takes [0, 1]
    inputs as they are), checked and stored as tuples of floats (:func:`check_normalization`).

    A model that expects ``(x - mean) / std`` is fed that while data and ε stay in [0, 1] pixel space
    (:func:`~aq_brevitas.attacks.normalized_inputs`). A config adopts it by inheriting it and calling
    ``super().__post_init__()`` after its own checks; the field is keyword-only, so it comes after the
    config's own fields in every constructor call.

    >>> from aq_brevitas.config import AttackConfig
    >>> AttackConfig("fgsm", normalization=([0.5], [0.25])).normalization
    ((0.5,), (0.25,))
    """

    normalization: Normalization | None = field(
        default=None,
        kw_only=True,
        metadata={"help": "(mean, std) the model expects its inputs normalised with", "flag": "--mean/--std"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.normalization is not None:
            object.__setattr__(self, "normalization", check_normalization(self.normalization))


def json_ready(value: Any) -> Any:
    """``value`` with every tuple turned into a list, recursively (what ``json.loads(json.dumps(...))`` gives)."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


@dataclass(frozen=True)
class AttackConfig(InputNormalization):
    """One attack, as :func:`~aq_brevitas.attacks.make_attack` builds it: ``name`` (one of
    :data:`~aq_brevitas.config.ATTACKS`), ``eps`` (budget on [0, 1] images: L-inf; L2 for pgdl2),
    ``steps`` (iterations of PGD, TPGD, APGD and FAB), ``alpha`` (step; None = 2.5·ε/steps),
    ``random_start`` (pgd, pgdl2), ``queries`` (Square's query budget) and ``normalization=(mean, std)``
    for a model that expects normalised inputs (:class:`InputNormalization`).

    >>> from aq_brevitas.config import AttackConfig
    >>> cfg = AttackConfig("PGD", eps=0.1, steps=4)
    >>> cfg.name, cfg.step_size
    ('pgd', 0.0625)
    """

    name: str = "pgd"
    eps: float = 0.1
    steps: int = 10
    alpha: float | None = None
    random_start: bool = True
    queries: int = 1000

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name.lower() not in ATTACKS:
            raise ConfigError(f"unknown attack {self.name!r}", f"use one of {', '.join(ATTACKS)}")
        object.__setattr__(self, "name", self.name.lower())
        object.__setattr__(self, "eps", check_eps(self.eps))
        if not _is_int(self.steps) or self.steps < 0:
            raise ConfigError(
                f"attack steps must be an integer >= 0, got {self.steps!r}", "pass e.g. steps=10"
            )
        _check_step(self.alpha)
        _check_count("queries", self.queries)
        super().__post_init__()

    @property
    def step_size(self) -> float:
        """``alpha``, or the default 2.5·ε/steps."""
        return self.alpha or default_alpha(self.eps, self.steps)


@dataclass(frozen=True)
class TrainConfig(InputNormalization):
    """Adversarial training settings; the defaults are :func:`~aq_brevitas.train.training.adversarial_train`'s.

    ``eps`` (L-inf, [0, 1] images) and ``steps`` set the training attack (either 0: plain training);
    ``alpha`` is its step (None: 2.5·ε/steps); ``random_start`` starts PGD at a uniform point of the
    ε-ball (TRADES always starts from a small Gaussian). ``epochs``, ``lr`` (cosine-annealed per
    step), ``optimizer`` (``"sgd"``: Nesterov, momentum 0.9; ``"adam"``), ``weight_decay`` and
    ``batch_size`` (the global batch under torchrun) set the outer loop. ``clean_weight`` w mixes in
    the clean loss: (1-w)·CE(adv) + w·CE(clean). ``trades_beta`` β switches to TRADES: CE(clean) +
    β·KL(f(x_adv) ‖ f(x)). ``seed`` fixes the shuffle and the attack noise of every epoch.
    ``learn_act_scales=False`` keeps Brevitas activation scales at their calibrated values.
    ``normalization=(mean, std)``: the model expects normalised inputs (:class:`InputNormalization`).

    >>> from aq_brevitas.config import TrainConfig
    >>> cfg = TrainConfig(eps=0.2, epochs=3)
    >>> cfg.replace(lr=0.01).to_dict()["lr"], cfg.attack().name, TrainConfig.finetuning().optimizer
    (0.01, 'pgd', 'adam')
    >>> TrainConfig(optimizer="lbfgs")
    Traceback (most recent call last):
    ...
    aq_brevitas.errors.ConfigError: unknown optimizer 'lbfgs' -- fix: use 'sgd' or 'adam'
    """

    eps: float = 0.1
    steps: int = 7
    alpha: float | None = None
    random_start: bool = True
    epochs: int = 1
    lr: float = 0.05
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    batch_size: int = 128
    clean_weight: float = 0.0
    trades_beta: float | None = None
    seed: int = 0
    learn_act_scales: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps", check_eps(self.eps))
        e, s, lr, b = self.epochs, self.steps, self.lr, self.batch_size
        if (
            not (_is_int(e) and _is_int(s) and _is_number(lr) and _is_int(b))
            or e < 1
            or s < 0
            or lr <= 0
            or b < 1
        ):
            raise ConfigError(
                f"bad training settings (epochs={e}, steps={s}, lr={lr}, batch_size={b})",
                "use epochs>=1, steps>=0, lr>0, batch_size>=1",
            )
        if not (_is_number(self.clean_weight) and 0.0 <= self.clean_weight <= 1.0):
            raise ConfigError(
                f"clean_weight={self.clean_weight} is outside [0, 1]", "pass a mixing weight in [0, 1]"
            )
        _check_step(self.alpha)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}", "use 'sgd' or 'adam'")
        if not (_is_number(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay={self.weight_decay!r} must be >= 0", "pass e.g. 5e-4, or 0")
        if self.trades_beta is not None and not (_is_number(self.trades_beta) and self.trades_beta >= 0):
            raise ConfigError(f"trades_beta={self.trades_beta!r} must be >= 0", "pass e.g. --trades-beta 6")
        if not _is_int(self.seed):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}", "pass e.g. --seed 0")
        super().__post_init__()

    @classmethod
    def finetuning(cls, **changes: Any) -> TrainConfig:
        """The defaults of :func:`~aq_brevitas.train.finetune.adversarial_finetune`: Adam at 5e-4, no weight
        decay, calibrated activation scales kept; ``changes`` are passed on to :meth:`replace`."""
        return cls(lr=5e-4, optimizer="adam", weight_decay=0.0, learn_act_scales=False).replace(**changes)

    @property
    def adversarial(self) -> bool:
        """Whether examples are attacked at all (``eps > 0`` and ``steps > 0``)."""
        return self.eps > 0 and self.steps > 0

    def attack(self) -> AttackConfig:
        """The inner maximisation: PGD (Madry), or TPGD when ``trades_beta`` is set."""
        name = "pgd" if self.trades_beta is None else "tpgd"
        return AttackConfig(
            name, self.eps, self.steps, self.alpha, self.random_start, normalization=self.normalization
        )


@dataclass(frozen=True)
class EvalConfig(InputNormalization):
    """The robustness suite; defaults are :func:`~aq_brevitas.evaluate.evaluate_robustness`'s.

    ``eps`` (one or several L-inf budgets, kept sorted and unique) × ``attacks`` (of
    :data:`EVAL_ATTACKS`); PGD with ``pgd_steps`` steps and ``pgd_restarts`` restarts; at every ε the
    attack ``suite`` (``"fast"``, ``"adaptive"``, ``"reference"``, ``"none"``, or a tuple of
    :data:`~aq_brevitas.config.SUITE_ATTACKS`; :mod:`aq_brevitas.evaluate.suite`) with ``suite_steps`` APGD
    iterations and ``suite_queries`` Square queries; ``autoattack`` (``"standard"``: the reference
    AutoAttack of Croce & Hein, 100 iterations, Square 5,000 queries, built from torchattacks classes;
    ``"torchattacks"``: the library's own shortened one; True means ``"standard"``; ``"off"``) and
    ``gradient_free`` (Square with ``square_queries`` queries) on a seeded subset of
    ``gradient_free_images`` images at the largest ε; PGD at ``large_eps`` on ``large_eps_images``
    images; ``indicators``: the attack-failure indicators (:mod:`aq_brevitas.evaluate.indicators`);
    ``batch_size`` images per attack call; the first ``limit`` images (None: all); ``seed``;
    ``device`` where the attacks run (``"auto"``: a GPU when one is present; the model is moved there
    and back, :func:`~aq_brevitas.workers.on_device`);
    ``normalization=(mean, std)`` for a model that expects normalised inputs (:class:`InputNormalization`).
    """

    eps: tuple[float, ...] = (0.05, 0.1, 0.2)
    attacks: tuple[str, ...] = EVAL_ATTACKS
    pgd_steps: int = 20
    pgd_restarts: int = 1
    suite: str | tuple[str, ...] = field(
        default="fast", metadata={"choices": (*SUITES, "none"), "help": "attack suite run at every eps"}
    )
    suite_steps: int = 100
    suite_queries: int = 500
    autoattack: str = field(default="off", metadata={"choices": AUTOATTACK_VERSIONS})
    indicators: bool = True
    gradient_free: bool = True
    gradient_free_images: int = 100
    square_queries: int = 300
    large_eps: float = 0.5
    large_eps_images: int = 200
    batch_size: int = 250
    limit: int | None = None
    seed: int = 0
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})

    def __post_init__(self) -> None:
        check_device(self.device)
        eps = [self.eps] if isinstance(self.eps, (int, float, str)) else list(self.eps)
        if not eps:
            raise ConfigError("no eps given", "pass e.g. eps=(0.05, 0.1, 0.2)")
        object.__setattr__(self, "eps", tuple(sorted({check_eps(e) for e in eps})))
        attacks = [self.attacks] if isinstance(self.attacks, str) else list(self.attacks)
        names = [str(a).lower() for a in attacks]
        unknown = [a for a in names if a not in EVAL_ATTACKS]
        if unknown:
            raise ConfigError(
                f"unknown attack(s) {', '.join(map(repr, unknown))}",
                f"use {', '.join(EVAL_ATTACKS)}; AutoAttack and Square run via autoattack='standard' / gradient_free=True",
            )
        object.__setattr__(self, "attacks", tuple(dict.fromkeys(names)))
        _set_suite(self)
        for key in (
            "pgd_steps", "pgd_restarts", "gradient_free_images", "square_queries", "large_eps_images", "batch_size",
            "suite_steps", "suite_queries",
        ):  # fmt: skip
            _check_count(key, getattr(self, key))
        object.__setattr__(self, "large_eps", check_eps(self.large_eps, "large_eps"))
        if self.limit is not None and not (_is_int(self.limit) and self.limit >= 1):
            raise ConfigError(f"limit must be positive, got {self.limit}", "pass limit>=1 or None")
        super().__post_init__()


def _set_suite(config: Any) -> None:
    """``suite`` (a name, or attack names stored as a tuple) and ``autoattack`` (True -> "standard",
    False/None -> "off") checked and stored."""
    suite = config.suite
    if isinstance(suite, str):
        if suite not in (*SUITES, "none"):
            raise ConfigError(
                f"unknown attack suite {suite!r}", f"use {', '.join(SUITES)}, none, or a tuple of attacks"
            )
    else:
        names = tuple(str(a).lower() for a in suite)
        bad = [a for a in names if a not in SUITE_ATTACKS]
        if bad or not names:
            raise ConfigError(
                f"bad suite attack(s) {', '.join(map(repr, bad)) or '(none given)'}",
                f"use {', '.join(SUITE_ATTACKS)}",
            )
        object.__setattr__(config, "suite", names)
    aa = {True: "standard", False: "off", None: "off"}.get(config.autoattack, config.autoattack)  # type: ignore[call-overload]
    if aa not in AUTOATTACK_VERSIONS:
        raise ConfigError(
            f"unknown autoattack version {config.autoattack!r}", f"use {', '.join(AUTOATTACK_VERSIONS)}"
        )
    object.__setattr__(config, "autoattack", aa)


def _check_count(key: str, value: Any) -> None:
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{key} must be an integer >= 1, got {value!r}", f"pass {key}>=1")
