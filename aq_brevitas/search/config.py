"""What a search is asked to do: one frozen :class:`SearchConfig` with per-method settings.

``METHOD_SETTINGS`` is the registry of selection methods, the one list of them: each name maps to the
frozen settings class of that method, and ``SCORERS`` maps each scored name to its scorer. Both are
filled by :func:`register_scorer` only, so a new method is one module: a settings class, a scorer and
one ``register_scorer`` call. The CLI's choices, the pipeline and the benchmarks read the names from here.

Torch-free, so the command line can build its options without importing torch: the built-in scorers
are registered by their ``module:function`` path and imported on first use (:func:`scorer_for`).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from ..config import DEVICE_HELP, ConfigBase, InputNormalization, check_device, json_ready
from ..errors import ConfigError, PolicyError, a_type
from ..policy import TARGETS, LayerSpec, for_target

ESTIMATES = ("jacobian", "spectral", "loss")
DEFAULT_METHOD = "lipschitz"


def _number(value: Any, name: str, lo: float, hi: float = math.inf, *, integer: bool = False) -> None:
    """One-line ConfigError unless ``value`` is a (whole, with ``integer``) number in [lo, hi]."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or (not integer and math.isnan(value)):
        raise ConfigError(
            f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}",
            f"pass e.g. {name}={max(lo, 1) if integer else 0.1}",
        )
    if not lo <= value <= hi:
        where = f"[{lo:g}, {hi:g}]" if math.isfinite(hi) else f">= {lo:g}"
        raise ConfigError(f"{name}={value} is outside {where}", f"pass {name} {where}")


# ------------------------------------------------------------------------------ per-method settings
@dataclass(frozen=True)
class MethodSettings(ConfigBase):
    """Settings of one selection method (a frozen dataclass; ``replace``/``to_dict``/``from_dict``
    as every config). ``scored``: it scores (layer, candidate) pairs for the knapsack (``uniform``
    enumerates instead); ``refinable``: it has a whole-network measure that refinement can re-rank by
    (only ``lipschitz``)."""

    scored: ClassVar[bool] = True
    refinable: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a one-line :class:`ConfigError` for a bad value."""


@dataclass(frozen=True)
class LipschitzSettings(MethodSettings):
    """This project's score (docs/method.md "Scores"). ``estimate``: ``jacobian`` (measured deviation
    on adversarial calibration images), ``spectral`` (data-free bound) or ``loss`` (the measured
    increase of the cross-entropy at those images, no first-order adversarial term); ``attack`` builds the
    adversarial calibration images (None: PGD-``steps``; a name for :func:`make_attack`; or a ready
    torchattacks object, which cannot be written to JSON); ``adv_weight`` scales the adversarial
    term (1 is the bound; other values are for ablations); ``measured_top_k``: how many of the
    knapsack's best solutions are measured on the held-out images, the most robust kept (1: the
    optimum alone; see docs/method.md "Which term ranks layers wrongly")."""

    refinable: ClassVar[bool] = True

    estimate: str = field(
        default="jacobian",
        metadata={"help": "measured (jacobian), data-free (spectral) or robust loss (loss)"},
    )
    attack: Any = field(default=None, metadata={"help": "attack for calibration images (default PGD)"})
    steps: int = field(default=10, metadata={"help": "PGD steps for the adversarial calibration images"})
    adv_weight: float = field(
        default=1.0, metadata={"help": "weight of the adversarial term (1 = the bound)"}
    )
    measured_top_k: int = field(
        default=1, metadata={"help": "knapsack solutions measured on held-out images, the best kept"}
    )

    def validate(self) -> None:
        if self.estimate not in ESTIMATES:
            raise ConfigError(f"unknown estimate {self.estimate!r}", f"use one of {', '.join(ESTIMATES)}")
        _number(self.steps, "steps", 1, integer=True)
        _number(self.adv_weight, "adv_weight", 0)
        _number(self.measured_top_k, "measured_top_k", 1, integer=True)

    def to_dict(self) -> dict[str, Any]:
        if self.attack is not None and not isinstance(self.attack, str):
            raise ConfigError(
                f"the attack object {type(self.attack).__name__} cannot be written to JSON",
                "name the attack instead (e.g. attack='pgd') to save the config",
            )
        return super().to_dict()


@dataclass(frozen=True)
class HessianSettings(MethodSettings):
    """HAWQ-V2 baseline: ``n_samples`` Rademacher vectors for the Hutchinson trace estimate."""

    n_samples: int = field(default=16, metadata={"help": "Hutchinson samples of the Hessian trace"})

    def validate(self) -> None:
        _number(self.n_samples, "n_samples", 1, integer=True)


@dataclass(frozen=True)
class AnsSettings(MethodSettings):
    """QUANOS baseline: adversarial noise sensitivity under FGSM at the search's ε (nothing to set)."""


@dataclass(frozen=True)
class UniformSettings(MethodSettings):
    """The uniform baseline: one spec everywhere, enumerated rather than scored (nothing to set)."""

    scored: ClassVar[bool] = False


#: selection method -> its settings class, the one list of methods (filled by :func:`register_scorer`)
METHOD_SETTINGS: dict[str, type[MethodSettings]] = {}
#: scored method -> its scorer ``(model, table, inputs, settings) -> Scoring``, or the
#: ``"module:function"`` path of one not imported yet (:func:`scorer_for` imports it)
SCORERS: dict[str, Callable[..., Any] | str] = {}


def default_settings() -> dict[str, MethodSettings]:
    """Every method's settings at their defaults."""
    return {name: cls() for name, cls in METHOD_SETTINGS.items()}


def _setting_owners() -> dict[str, str]:
    """Method setting name -> the method whose settings class has it."""
    return {f.name: m for m, cls in METHOD_SETTINGS.items() for f in fields(cls)}


S = TypeVar("S", bound=MethodSettings)
Candidates = Sequence[LayerSpec] | Mapping[str, Sequence[LayerSpec]] | None


def _frozen_candidates(candidates: Any) -> Any:
    """Candidates as tuples (a frozen config holds no list a caller could change), type-checked."""
    if candidates is None:
        return None
    per_layer = candidates if isinstance(candidates, Mapping) else {"": candidates}
    out = {}
    for layer, specs in per_layer.items():
        if isinstance(specs, (str, bytes)) or not isinstance(specs, Sequence):
            raise ConfigError(
                f"candidates of type {type(specs).__name__} are not a list of LayerSpec",
                "pass a list of LayerSpec, or a dict of layer name -> list ('*' for the rest)",
            )
        bad = next((s for s in specs if not isinstance(s, LayerSpec)), None)
        if bad is not None:
            where = f"layer {layer!r}: " if layer else ""
            raise PolicyError(f"{where}candidate {bad!r} is not a LayerSpec", "pass LayerSpec objects")
        out[layer] = tuple(specs)
    return out if isinstance(candidates, Mapping) else out[""]


DEFAULT_ACT_BITS = (2, 3, 4, 8)
# What search_pareto sweeps: the baselines first (uniform (w, a) pairs, the first/last-at-8-bits
# heuristic, HAWQ-V2, QUANOS), this project's method last.
PARETO_METHODS = ("uniform", "first_last_8", "hessian", "ans", "lipschitz")


def _act_bits(bits: Any) -> tuple[int, ...]:
    if isinstance(bits, (str, bytes)) or not isinstance(bits, Sequence) or not bits:
        raise ConfigError(
            f"act_bits must be a list of bit widths, got {bits!r}", "pass e.g. act_bits=(2, 3, 4, 8)"
        )
    for b in bits:
        _number(b, "act_bits entry", 2, 16, integer=True)
    return tuple(sorted(set(bits)))


def with_act_bits(specs: Sequence[LayerSpec], act_bits: Sequence[int]) -> tuple[LayerSpec, ...]:
    """Every spec of ``specs`` at every input width of ``act_bits`` (the activation bits of the layer's
    input, quantized at its producer: :mod:`aq_brevitas.quantization.placement`).

    >>> [s.short() for s in with_act_bits([LayerSpec(4)], (2, 8))]
    ['4b max pc a2', '4b max pc a8']
    """
    return tuple(dataclasses.replace(s, act_bit_width=a) for s in specs for a in act_bits)


def _for_target(candidates: Candidates, target: str) -> Candidates:
    """The candidates restricted to what ``target`` builds (:func:`~aq_brevitas.policy.for_target`);
    a per-layer mapping gets a ``"*"`` entry so that the layers it does not name are restricted too."""
    if target not in TARGETS:
        raise ConfigError(
            f"target {target!r} is not one of {', '.join(TARGETS)}", 'use target="finn" or "generic"'
        )
    if target == "generic":
        return candidates
    from .candidates import default_candidates

    if isinstance(candidates, Mapping):
        full = {"*": default_candidates(), **candidates}
        return {n: tuple(for_target(v, target)) for n, v in full.items()}
    return tuple(for_target(default_candidates() if candidates is None else candidates, target))


# ----------------------------------------------------------------------------------- the config
@dataclass(frozen=True)
class SearchConfig(InputNormalization):
    """Everything :func:`~aq_brevitas.search.search_policy` is asked to do, besides the data and budget.

    Validated on construction (one-line :class:`ConfigError`/:class:`PolicyError`), serialisable with
    :meth:`to_dict`/:meth:`from_dict` (an attack *object* is not), and changed with :meth:`replace`,
    which also accepts any method setting by name (``estimate=``, ``n_samples=``...).

    ``candidates``: None (the 36 defaults), one list of :class:`LayerSpec`, or per-layer lists
    (``"*"`` for the rest). ``refine``/``top_k``: re-rank the ``top_k`` knapsack solutions by the
    whole-network bound and run one pass of coordinate descent (methods with a whole-network measure
    only; off by default, see docs/method.md "Selection"). ``pgd_steps``/``val_images``: the
    held-out check against the best uniform policy, by robust accuracy (the per-image worst case of
    PGD-``pgd_steps`` and the fast attack suite) on the first ``val_images`` held-out images.
    ``warm_start``: seed each held-out measurement with a neighbouring policy's adversarial examples (a
    transfer attack, :mod:`aq_brevitas.evaluate.warm`); ``device``: where those attacks run
    (``"auto"``: a GPU when one is present). ``fold_bn``: score the BatchNorm-folded weights that ``quantize(..., fold_bn=True)`` will quantize. ``normalization=(mean, std)``: the
    model expects normalised inputs; data and ε stay in [0, 1] pixel space and the model is fed
    ``(x - mean) / std`` (:func:`~aq_brevitas.attacks.normalized_inputs`). ``settings``: per-method
    settings by method name; missing ones take their defaults.

    >>> from aq_brevitas.search import SearchConfig
    >>> cfg = SearchConfig(method="hessian").replace(n_samples=4, eps=0.05)
    >>> cfg.settings_for(HessianSettings).n_samples, cfg.eps
    (4, 0.05)
    >>> SearchConfig.from_dict(cfg.to_dict()) == cfg
    True
    """

    method: str = field(default=DEFAULT_METHOD, metadata={"help": "selection method"})
    eps: float = field(default=0.1, metadata={"help": "L-inf radius (images in [0, 1])"})
    seed: int = field(default=0, metadata={"help": "seed of every random draw"})
    candidates: Candidates = field(default=None, metadata={"help": "candidate LayerSpecs"})
    fold_bn: bool = field(default=False, metadata={"help": "score BatchNorm-folded weights"})
    refine: bool = field(default=False, metadata={"help": "refine on the whole-network bound"})
    top_k: int = field(default=5, metadata={"help": "knapsack solutions refinement re-ranks"})
    pgd_steps: int = field(default=10, metadata={"help": "PGD steps in the held-out robust check"})
    val_images: int | None = field(default=500, metadata={"help": "held-out images for that check"})
    warm_start: bool = field(
        default=True,
        metadata={"help": "seed each held-out measurement with a neighbour policy's adversarial examples"},
    )
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})
    settings: Mapping[str, MethodSettings] = field(default_factory=default_settings)
    target: str = field(
        default="generic", metadata={"help": "generic, or finn: integer inputs on every layer, <= 8 bits"}
    )
    act_bits: tuple[int, ...] | None = field(
        default=None, metadata={"help": "input activation widths crossed with the default candidates"}
    )

    def __post_init__(self) -> None:
        check_device(self.device)
        if self.method not in METHOD_SETTINGS:
            raise ConfigError(
                f"unknown search method {self.method!r}", f"use one of {', '.join(METHOD_SETTINGS)}"
            )
        merged = default_settings()
        for name, s in dict(self.settings).items():
            if name not in METHOD_SETTINGS or not isinstance(s, METHOD_SETTINGS[name]):
                raise ConfigError(
                    f"settings for {name!r} are a {type(s).__name__}",
                    f"give each method its settings class: {', '.join(c.__name__ for c in METHOD_SETTINGS.values())}",
                )
            merged[name] = s
        object.__setattr__(self, "settings", merged)
        _number(self.eps, "eps", 0, 1)
        object.__setattr__(self, "eps", float(self.eps))
        _number(self.seed, "seed", -(2**63), 2**64 - 1, integer=True)
        _number(self.top_k, "top_k", 1, integer=True)
        _number(self.pgd_steps, "pgd_steps", 1, integer=True)
        if self.val_images is not None:
            _number(self.val_images, "val_images", 1, integer=True)
        if self.act_bits is not None:
            object.__setattr__(self, "act_bits", _act_bits(self.act_bits))
        candidates = _frozen_candidates(self.candidates)
        if candidates is None and self.act_bits is None and self.target == "finn":
            object.__setattr__(self, "act_bits", DEFAULT_ACT_BITS)  # FINN: integer inputs, width searched
        if candidates is None and self.act_bits:
            from .candidates import default_candidates

            candidates = with_act_bits(default_candidates(), self.act_bits)
        object.__setattr__(self, "candidates", _for_target(candidates, self.target))
        super().__post_init__()

    @classmethod
    def setting_names(cls) -> set[str]:
        """Config fields and every registered method's setting names (what :meth:`replace` takes)."""
        return super().setting_names() | set(_setting_owners())

    # -- access -------------------------------------------------------------------------------
    @property
    def method_settings(self) -> MethodSettings:
        """The settings of :attr:`method`."""
        return self.settings[self.method]

    def settings_for(self, cls: type[S]) -> S:
        """The settings of the method whose settings class is ``cls`` (typed access)."""
        name = next(n for n, c in METHOD_SETTINGS.items() if c is cls)
        out = self.settings.get(name) or cls()  # a method registered after this config was made
        assert isinstance(out, cls)
        return out

    def for_budget(self, kind: str) -> SearchConfig:
        """This config for a budget of ``kind``: a BOPs budget counts input bits, so default candidates
        then get :data:`DEFAULT_ACT_BITS` (``act_bits`` or explicit candidates are kept as given)."""
        if kind == "bops" and self.candidates is None and self.act_bits is None:
            return self.replace(act_bits=DEFAULT_ACT_BITS)
        return self

    def replace(self, **changes: Any) -> SearchConfig:
        """A copy with ``changes``: config fields, or method settings by field name (``estimate``,
        ``attack``, ``steps``, ``adv_weight``, ``n_samples``, and those of registered methods).
        An unknown name is a one-line :class:`ConfigError`; the rest are passed on to
        :meth:`ConfigBase.replace`."""
        own, owners = {f.name for f in fields(self)}, _setting_owners()
        unknown = sorted(set(changes) - own - set(owners))
        if unknown:
            raise ConfigError(
                f"unknown search setting(s) {', '.join(map(repr, unknown))}",
                f"use a SearchConfig field ({', '.join(sorted(own))}) or a method setting "
                f"({', '.join(sorted(owners))})",
            )
        top = {k: v for k, v in changes.items() if k in own}
        settings = {**self.settings, **dict(top.pop("settings", {}))}
        for key, value in changes.items():
            if key not in own:
                method = owners[key]
                settings[method] = (settings.get(method) or METHOD_SETTINGS[method]()).replace(**{key: value})
        return super().replace(**top, settings=settings)

    # -- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types: specs as their dicts, settings per method."""

        def specs(seq: Sequence[LayerSpec]) -> list[dict[str, Any]]:
            return [s.to_dict() for s in seq]

        c = self.candidates
        cands = (
            None if c is None else {n: specs(v) for n, v in c.items()} if isinstance(c, Mapping) else specs(c)
        )
        out = {
            f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("candidates", "settings")
        }
        settings = {n: s.to_dict() for n, s in self.settings.items()}
        return {**json_ready(out), "candidates": cands, "settings": settings}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SearchConfig:
        """Inverse of :meth:`to_dict`; unknown keys are a one-line :class:`ConfigError`."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"a search config must be an object, got {type(d).__name__}", "pass a dict")
        cls._check_names(d)
        kw = dict(d)
        raw = kw.get("candidates")
        if raw is not None:

            def specs(seq: Any) -> tuple[LayerSpec, ...]:
                return tuple(LayerSpec.from_dict(s, "candidate") for s in seq)

            kw["candidates"] = (
                {n: specs(v) for n, v in raw.items()} if isinstance(raw, Mapping) else specs(raw)
            )
        settings = {}
        for name, values in dict(kw.get("settings") or {}).items():
            if name not in METHOD_SETTINGS:
                raise ConfigError(
                    f"search config has settings for unknown method {name!r}",
                    f"use {', '.join(METHOD_SETTINGS)}",
                )
            settings[name] = METHOD_SETTINGS[name].from_dict(values)
        return super().from_dict({**kw, "settings": settings})


def as_config(config: SearchConfig | None) -> SearchConfig:
    """``config``, or the default :class:`SearchConfig` for None; ConfigError for anything else."""
    if config is None:
        return SearchConfig()
    if not isinstance(config, SearchConfig):
        raise ConfigError(f"config is {a_type(config)}, not a SearchConfig", "pass SearchConfig(...)")
    return config


# ------------------------------------------------------------------------------------ the registry
def register_scorer(
    name: str, scorer: Callable[..., Any] | str | None, settings_cls: type[MethodSettings]
) -> None:
    """Make ``name`` a selection method: ``SearchConfig(method=name)`` then selects it in
    :func:`~aq_brevitas.search.search_policy`, :func:`~aq_brevitas.search.score` and the comparisons.

    ``scorer``: ``(model, table, inputs: ScoringInputs, settings) -> Scoring`` (the three of
    :mod:`aq_brevitas.search.scorers` show the shape), or its ``"package.module:function"`` path,
    imported on first use; None for a method that enumerates instead of scoring
    (``settings_cls.scored`` False, as ``uniform``). ``settings_cls``: a frozen dataclass deriving
    from :class:`MethodSettings`; its field names become :meth:`SearchConfig.replace` keywords, so
    they must be new. Raises :class:`ConfigError` for a name already registered, a setting name
    already taken, or a scorer that does not match ``settings_cls.scored``.

    >>> @dataclass(frozen=True)
    ... class NoiseSettings(MethodSettings):
    ...     sigma: float = 0.1
    >>> register_scorer("noise", "my_package.scoring:noise_scorer", NoiseSettings)
    >>> SearchConfig(method="noise").replace(sigma=0.2).method_settings
    NoiseSettings(sigma=0.2)
    >>> del METHOD_SETTINGS["noise"], SCORERS["noise"]  # (this example's method, removed again)
    """
    if not isinstance(name, str) or not name or name in METHOD_SETTINGS:
        raise ConfigError(f"method name {name!r} is taken or empty", "register the method under a new name")
    if not (
        isinstance(settings_cls, type)
        and issubclass(settings_cls, MethodSettings)
        and "__dataclass_params__" in vars(settings_cls)  # decorated itself, not only its base
        and settings_cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
    ):
        raise ConfigError(
            f"the settings of {name!r} are not a frozen MethodSettings dataclass",
            "declare @dataclass(frozen=True) class ...(MethodSettings)",
        )
    taken = (set(_setting_owners()) | {f.name for f in fields(SearchConfig)}) & {
        f.name for f in fields(settings_cls)
    }
    if taken:
        raise ConfigError(
            f"settings of {name!r} reuse the setting name(s) {', '.join(sorted(taken))}",
            "give the settings class field names no other method or SearchConfig uses",
        )
    lazy = isinstance(scorer, str) and ":" in scorer
    if (scorer is None) == settings_cls.scored or not (scorer is None or lazy or callable(scorer)):
        raise ConfigError(
            f"the scorer of {name!r} does not match {settings_cls.__name__}.scored={settings_cls.scored}",
            "pass a scorer function (or its 'module:function' path) for a scored method, None otherwise",
        )
    METHOD_SETTINGS[name] = settings_cls
    if scorer is not None:
        SCORERS[name] = scorer


def scorer_for(method: str) -> Callable[..., Any]:
    """The scorer registered for ``method``, imported on first use when registered by its path.
    ConfigError for a method without one."""
    scorer = SCORERS.get(method)
    if scorer is None:
        raise ConfigError(f"method {method!r} has no scorer", f"use one of {', '.join(SCORERS)}")
    if isinstance(scorer, str):
        module, _, attr = scorer.partition(":")
        try:
            scorer = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(
                f"the scorer {SCORERS[method]!r} of method {method!r} does not import: {exc}",
                "register the scorer function itself, or a 'module:function' path that imports",
            ) from None
        SCORERS[method] = scorer
    return scorer


register_scorer("lipschitz", "aq_brevitas.search.scorers:lipschitz_scorer", LipschitzSettings)
register_scorer("hessian", "aq_brevitas.search.scorers:hessian_scorer", HessianSettings)
register_scorer("ans", "aq_brevitas.search.scorers:ans_scorer", AnsSettings)
register_scorer("uniform", None, UniformSettings)
#: the built-in methods (:data:`METHOD_SETTINGS` holds those registered later too)
METHODS = tuple(METHOD_SETTINGS)
SCORED_METHODS = tuple(n for n, c in METHOD_SETTINGS.items() if c.scored)
# Side-by-side order (search --compare, benchmarks): baselines first, this project's method last.
COMPARE_ORDER = (
    *(n for n, c in METHOD_SETTINGS.items() if not c.scored),
    *(n for n in SCORED_METHODS if n != DEFAULT_METHOD),
    DEFAULT_METHOD,
)
