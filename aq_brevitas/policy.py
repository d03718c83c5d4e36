"""Per-layer quantization policies: plain frozen dataclasses and JSON schema v1.

A policy is what the search produces and what :func:`aq_brevitas.quantize`, :func:`apply_policy`,
the QONNX export and the torch.ao adapters consume. It is meant to be hand-writable::

    {"schema": "aq-brevitas/policy/v1",
     "default": {"weight_bit_width": 8, "scaling": "max", "granularity": "per_channel"},
     "layers": {"fc1": {"weight_bit_width": 3, "scaling": "mse", "granularity": "per_channel"},
                "conv1": null},
     "meta": {}}

One language for every backend (Brevitas, torch.ao FX and PT2E, the cost): a ``layers`` key is a
layer name, a parent-module name or a ``re:`` pattern; a ``None``/``null`` spec keeps layers float
next to a default (see :class:`LayerwisePolicy`, whose ``resolve`` gives the per-layer result).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .budget import DEFAULT_ACT_BITS_FOR_BOPS, PolicyCost
from .errors import PolicyError, a_type

SCHEMA = "aq-brevitas/policy/v1"
SCALINGS = ("max", "percentile", "mse", "po2")
GRANULARITIES = ("per_tensor", "per_channel")
WEIGHT_BITS = range(1, 9)
ACT_BITS = range(2, 17)
VOLATILE_META = ("timing",)  # kept in memory, never written: it differs from run to run
_SPEC_KEYS = ("weight_bit_width", "scaling", "granularity", "act_bit_width")
_POLICY_KEYS = ("schema", "layers", "default", "meta")
PATTERN_PREFIX = "re:"  # a layers key starting with it is a regular expression over layer names


def _check_int(value: Any, allowed: range, field_name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(
            f"{where}: {field_name} must be an integer, got {value!r}",
            f"use an integer in {allowed.start}..{allowed.stop - 1}",
        )
    if value not in allowed:
        raise PolicyError(
            f"{where}: {field_name}={value} is out of range", f"use {allowed.start}..{allowed.stop - 1}"
        )
    return value


def _check_choice(value: Any, choices: tuple[str, ...], field_name: str, where: str) -> str:
    if value not in choices:
        raise PolicyError(
            f"{where}: {field_name}={value!r} is not one of {', '.join(choices)}",
            f"set {field_name} to one of {', '.join(choices)}",
        )
    return value


@dataclass(frozen=True, order=True)
class LayerSpec:
    """How one layer is quantized: weight bits, scaling (clipping) rule, granularity, input activation bits."""

    weight_bit_width: int = 8
    scaling: str = "max"
    granularity: str = "per_channel"
    act_bit_width: int | None = None

    def __post_init__(self) -> None:
        self.validate("layer spec")

    def validate(self, where: str) -> None:
        _check_int(self.weight_bit_width, WEIGHT_BITS, "weight_bit_width", where)
        _check_choice(self.scaling, SCALINGS, "scaling", where)
        _check_choice(self.granularity, GRANULARITIES, "granularity", where)
        if self.act_bit_width is not None:
            _check_int(self.act_bit_width, ACT_BITS, "act_bit_width", where)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "weight_bit_width": self.weight_bit_width,
            "scaling": self.scaling,
            "granularity": self.granularity,
        }
        if self.act_bit_width is not None:
            d["act_bit_width"] = self.act_bit_width
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "layer spec") -> LayerSpec:
        if not isinstance(d, Mapping):
            raise PolicyError(
                f"{where}: expected an object, got {type(d).__name__}", 'write {"weight_bit_width": 4, ...}'
            )
        unknown = sorted(set(d) - set(_SPEC_KEYS))
        if unknown:
            raise PolicyError(
                f"{where}: unknown key {unknown[0]!r}", f"allowed keys: {', '.join(_SPEC_KEYS)}"
            )
        if "weight_bit_width" not in d:
            raise PolicyError(f"{where}: weight_bit_width is missing", "add weight_bit_width (1..8)")
        spec = object.__new__(cls)
        for k in _SPEC_KEYS:
            object.__setattr__(spec, k, d.get(k, getattr(LayerSpec, k)))
        spec.validate(where)
        return spec

    def short(self) -> str:
        """A compact label, e.g. ``4b mse pc a8``."""
        g = "pc" if self.granularity == "per_channel" else "pt"
        a = f" a{self.act_bit_width}" if self.act_bit_width else ""
        return f"{self.weight_bit_width}b {self.scaling} {g}{a}"


@dataclass(frozen=True)
class PolicyMatch:
    """How a policy lines up with a model's quantizable layers."""

    unknown: tuple[str, ...]  # named in the policy, absent from the model
    uncovered: tuple[str, ...]  # quantizable in the model, with no spec and no default

    @property
    def ok(self) -> bool:
        return not self.unknown


def entry_matches(key: str, name: str) -> bool:
    """Whether the policy key ``key`` names layer ``name``: the layer itself, a parent module of it
    (``"features"`` names ``"features.0"``), or a ``re:`` pattern that matches the whole name."""
    if key.startswith(PATTERN_PREFIX):
        return re.fullmatch(key[len(PATTERN_PREFIX) :], name) is not None
    return key == name or name.startswith(key + ".")


def deciding_key(layers: Mapping[str, LayerSpec | None], name: str) -> str | None:
    """The key of ``layers`` that decides layer ``name``: its own name, else its nearest parent
    module, else the ``re:`` pattern matching it; None when no key does. Patterns that match one layer
    with different specs are ambiguous (JSON keeps no order): one-line :class:`PolicyError`."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in layers:
            return ".".join(parts[:i])
    hits = [k for k in layers if k.startswith(PATTERN_PREFIX) and entry_matches(k, name)]
    if len({layers[k] for k in hits}) > 1:
        raise PolicyError(
            f"layer {name!r} matches patterns {', '.join(map(repr, hits))}, which give it different specs",
            "make the patterns disjoint, or name the layer itself",
        )
    return hits[0] if hits else None


def _check_entry(name: Any, spec: Any) -> None:
    if not isinstance(name, str) or not name:
        raise PolicyError(
            f"policy layer name {name!r} is not a non-empty string", "use names from model.named_modules()"
        )
    if name.startswith(PATTERN_PREFIX):
        try:
            re.compile(name[len(PATTERN_PREFIX) :])
        except re.error as exc:
            raise PolicyError(
                f"policy pattern {name!r} is not a valid regular expression ({exc})",
                "fix the pattern, e.g. 're:fc\\d+'",
            ) from None
    if spec is not None and not isinstance(spec, LayerSpec):
        raise PolicyError(
            f"layer {name}: spec is {a_type(spec)}, not a LayerSpec",
            "wrap it: LayerSpec(...), or None to keep the layer float",
        )
    if spec is not None:
        spec.validate(f"layer {name!r}")  # a spec altered after construction is caught here, by name


@dataclass(frozen=True)
class LayerwisePolicy:
    """Per-layer :class:`LayerSpec` (or None: float) by layer name, an optional default, and free-form meta.

    A ``layers`` key is a layer name of ``model.named_modules()``, a parent-module name (it names
    every quantizable layer under it) or a ``re:`` pattern (it names the layers whose whole name it
    matches). A layer takes the spec of its own name, else of its nearest named parent, else of the
    pattern matching it, else ``default``; a ``None`` spec (JSON ``null``) keeps it float, default or
    not. :meth:`resolve` gives the result per layer. The policy is plain data: ``to_json``/``from_json``
    round-trip it exactly, and ``cost(model, example_input)`` gives its
    :class:`~aq_brevitas.budget.PolicyCost` (bits, bytes, BOPs) on that model. Raises
    :class:`~aq_brevitas.errors.PolicyError` for a malformed policy.

    >>> import torch
    >>> from torch import nn
    >>> from aq_brevitas import LayerSpec, LayerwisePolicy
    >>> model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    >>> policy = LayerwisePolicy({"0": LayerSpec(8)}, default=LayerSpec(3, "mse"))
    >>> policy.resolve(["0", "2"])["2"].short()
    '3b mse pc'
    >>> round(policy.cost(model, torch.rand(1, 784)).avg_weight_bits, 2)
    7.94
    >>> LayerwisePolicy.from_json(policy.to_json()) == policy
    True
    >>> keep_last_float = LayerwisePolicy({"re:2": None}, default=LayerSpec(4))
    >>> {n: s.short() if s else "float" for n, s in keep_last_float.resolve(model).items()}
    {'0': '4b max pc', '2': 'float'}
    """

    layers: dict[str, LayerSpec | None] = field(default_factory=dict)
    default: LayerSpec | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.layers, Mapping):
            raise PolicyError(
                "policy layers must be a mapping of layer name to LayerSpec",
                "pass layers={'fc1': LayerSpec(4)}",
            )
        for name, spec in self.layers.items():
            _check_entry(name, spec)
        if self.default is not None and not isinstance(self.default, LayerSpec):
            raise PolicyError("policy default must be a LayerSpec or None", "pass default=LayerSpec(8)")
        if self.default is not None:
            self.default.validate("default")

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def uniform(cls, names: Iterable[str], spec: LayerSpec, **meta: Any) -> LayerwisePolicy:
        """The same ``spec`` for every named layer; the ``meta`` keywords are passed on to the policy's
        free-form :attr:`meta` (provenance such as ``source`` or ``budget``), not read as settings."""
        return cls({n: spec for n in names}, None, dict(meta))

    def spec_for(self, name: str) -> LayerSpec | None:
        """The spec of layer ``name`` (see the class doc for the order), None when it stays float."""
        key = deciding_key(self.layers, name)
        return self.layers[key] if key is not None else self.default

    def resolve(self, layers: Any, example_input: Any = None) -> dict[str, LayerSpec | None]:
        """The spec of every layer, None where it stays float: the one resolution that
        :func:`~aq_brevitas.quantize`, the torch.ao adapters and the cost use.

        ``layers``: layer names (an iterable, or a mapping's keys), or a model: its quantizable
        layers, where those its forward never calls (on ``example_input``'s first sample, else as
        ``torch.fx`` traces it: :func:`~aq_brevitas.nnutils.called_layers`) stay float too, named in
        a warning. Raises :class:`PolicyError` for patterns that give one layer different specs."""
        if not hasattr(layers, "named_modules"):
            return {n: self.spec_for(n) for n in layers}
        from .nnutils import called_layers, quantizable_layers, warn_never_called

        specs = self.resolve(quantizable_layers(layers))
        called = called_layers(layers, example_input)
        if called is None:  # no input and no fx graph: nothing tells, every layer counts as called
            return specs
        warn_never_called([n for n, s in specs.items() if s is not None and n not in called])
        return {n: s if n in called else None for n, s in specs.items()}

    # -- JSON -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON form. Run-dependent meta (``VOLATILE_META``: wall-clock timings) is left out, so
        the same inputs and seed always give byte-identical policy files."""
        return {
            "schema": SCHEMA,
            "default": self.default.to_dict() if self.default else None,
            "layers": {n: s.to_dict() if s else None for n, s in sorted(self.layers.items())},
            "meta": {k: v for k, v in self.meta.items() if k not in VOLATILE_META},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: Any) -> LayerwisePolicy:
        if not isinstance(d, Mapping):
            raise PolicyError(
                f"a policy must be a JSON object, got {type(d).__name__}",
                f'start from {{"schema": "{SCHEMA}", "layers": {{}}}}',
            )
        schema = d.get("schema")
        if schema != SCHEMA:
            raise PolicyError(f"policy schema {schema!r} is not supported", f'set "schema": "{SCHEMA}"')
        unknown = sorted(set(d) - set(_POLICY_KEYS))
        if unknown:
            raise PolicyError(
                f"policy has unknown key {unknown[0]!r}", f"allowed keys: {', '.join(_POLICY_KEYS)}"
            )
        layers_raw = d.get("layers", {})
        if not isinstance(layers_raw, Mapping):
            raise PolicyError(
                "policy 'layers' must be an object of layer name -> spec",
                'write "layers": {"fc1": {"weight_bit_width": 4}}',
            )
        layers = {
            str(n): None if s is None else LayerSpec.from_dict(s, f"layer {n!r}")
            for n, s in layers_raw.items()
        }
        default = d.get("default")
        meta = d.get("meta", {})
        if not isinstance(meta, Mapping):
            raise PolicyError("policy 'meta' must be an object", 'write "meta": {}')
        return cls(
            layers, LayerSpec.from_dict(default, "default") if default is not None else None, dict(meta)
        )

    @classmethod
    def from_json(cls, text: str) -> LayerwisePolicy:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PolicyError(
                f"policy is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})",
                "fix the JSON syntax",
            ) from None
        return cls.from_dict(d)

    def save(self, path: str | os.PathLike[str]) -> None:
        from .storage import atomic_write_text

        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LayerwisePolicy:
        from .storage import read_json

        return cls.from_dict(read_json(path, "policy file"))

    # -- fitting a model ------------------------------------------------------------------------------
    def matches(self, model: Any) -> PolicyMatch:
        """Keys that name no quantizable layer of the model, and layers no key nor default covers
        (a layer kept float by a ``None`` entry is covered)."""
        from .nnutils import quantizable_layers

        names = list(quantizable_layers(model))
        unknown = tuple(sorted(k for k in self.layers if not any(entry_matches(k, n) for n in names)))
        uncovered = tuple(
            sorted(n for n in names if self.default is None and deciding_key(self.layers, n) is None)
        )
        return PolicyMatch(unknown, uncovered)

    def check(self, model: Any) -> None:
        """Raise :class:`PolicyError` if a key names no quantizable layer of the model, or patterns
        give one layer different specs."""
        m = self.matches(model)
        if m.unknown:
            from .nnutils import quantizable_layers

            known = ", ".join(list(quantizable_layers(model))[:8])
            raise PolicyError(
                f"policy names layer {m.unknown[0]!r}, which the model does not have (no quantizable layer "
                "has that name, sits under a module of that name, or matches it as a 're:' pattern)",
                f"use quantizable layer names such as: {known}",
            )
        from .nnutils import quantizable_layers

        self.resolve(quantizable_layers(model))

    def cost(self, model_or_geometry: Any, example_input: Any = None) -> PolicyCost:
        """Cost under all budget kinds: of a ``layer_geometry`` dict, or of a model run on ``example_input``.

        MACs (hence BOPs) depend on the input size, so a model needs an example input (one image is
        enough; a tuple of tensors for a model whose forward takes several inputs) unless its input
        shape is known: the reference architectures' 1×28×28, a model attribute ``input_shape``
        (per sample, e.g. ``(3, 32, 32)``), or the ``input_shape`` a searched policy's meta recorded
        from its calibration data. The cost is that of what runs
        (:func:`~aq_brevitas.nnutils.layer_geometry`): a layer called several times costs BOPs at
        every call, a weight shared by several layers costs its bits once; weights used outside a
        quantizable layer stay float, are not in the cost, and are named in a warning.
        """
        if isinstance(model_or_geometry, Mapping):
            geometry = model_or_geometry
        else:
            from .classifier import unwrap_parallel
            from .nnutils import layer_geometry

            model_or_geometry = unwrap_parallel(model_or_geometry)
            x = (
                example_input
                if example_input is not None
                else _example_for(model_or_geometry, self.meta.get("input_shape"))
            )
            geometry = layer_geometry(model_or_geometry, x)
        return cost_of(self.resolve(geometry), geometry)

    def __str__(self) -> str:
        rows = [("layer", "bits", "scaling", "granularity", "act")]
        for n, s in [*sorted(self.layers.items()), *([("(default)", self.default)] if self.default else [])]:
            f = (
                (s.weight_bit_width, s.scaling, s.granularity, s.act_bit_width or "-")
                if s
                else ("fp32", "", "", "")
            )
            rows.append((n, *f))
        return "\n".join(f"{n:<28} {b:>4} {sc:<10} {g:<11} {a:>4}".rstrip() for n, b, sc, g, a in rows)


def _example_for(model: Any, recorded: Any = None) -> Any:
    """One random input of the model's (or the search's ``recorded``) input shape, or a PolicyError."""
    import torch

    from .models import ARCHITECTURES, INPUT_SHAPE

    shape = getattr(model, "input_shape", None) or recorded
    if shape is None and type(model) in set(ARCHITECTURES.values()):
        shape = INPUT_SHAPE
    if shape is None:
        raise PolicyError(
            f"cost of a {type(model).__name__} needs an example input: its input shape is not known",
            "pass one, e.g. policy.cost(model, images[:1]), or set model.input_shape = (C, H, W)",
        )
    return torch.rand(1, *shape)


# ------------------------------------------------------------------------------------- targets
TARGETS = ("generic", "finn")
FINN_ACT_BITS = 8  # the input precision a FINN candidate gets when it names none
FINN_MAX_BITS = 8  # FINN's ConvertQONNXtoFINN max_multithreshold_bit_width


def for_target(specs: Iterable[LayerSpec], target: str = "generic") -> list[LayerSpec]:
    """``specs`` restricted to what ``target`` builds: ``"generic"`` keeps them; ``"finn"`` gives every
    candidate an integer input (``act_bit_width``, :data:`FINN_ACT_BITS` where it names none), since
    FINN maps a layer to hardware only when its input is integer, and refuses inputs wider than
    :data:`FINN_MAX_BITS` (one-line :class:`PolicyError`). Float or power-of-two scales, per-tensor or
    per-channel, are all kept: FINN absorbs float scales into thresholds.

    >>> [s.short() for s in for_target([LayerSpec(4), LayerSpec(2, act_bit_width=4)], "finn")]
    ['4b max pc a8', '2b max pc a4']
    """
    if target not in TARGETS:
        raise PolicyError(
            f"target {target!r} is not one of {', '.join(TARGETS)}", 'use target="finn" or "generic"'
        )
    if target == "generic":
        return list(specs)
    out = []
    for s in specs:
        bits = s.act_bit_width or FINN_ACT_BITS
        if bits > FINN_MAX_BITS:
            raise PolicyError(
                f"candidate {s.short()} asks for {bits}-bit inputs; FINN builds at most {FINN_MAX_BITS}-bit activations",
                f"use act_bit_width <= {FINN_MAX_BITS} with target='finn'",
            )
        out.append(replace(s, act_bit_width=bits))
    return list(dict.fromkeys(out))


def check_target(
    policy: LayerwisePolicy, layers: list[str], target: str, act_placement: str = "producer"
) -> None:
    """Refuse a policy ``target`` cannot build, in one line (:class:`PolicyError`). ``layers``: the
    model's quantizable layer names. ``"finn"`` needs every layer covered, each with an integer input
    (``act_bit_width`` 2..:data:`FINN_MAX_BITS`) quantized at its producer (``act_placement="producer"``:
    FINN folds a Relu into thresholds only when its Quant follows it); ``"generic"`` takes anything.

    >>> check_target(LayerwisePolicy(default=LayerSpec(4, act_bit_width=4)), ["fc"], "finn")
    >>> check_target(LayerwisePolicy(default=LayerSpec(4)), ["fc"], "finn")
    Traceback (most recent call last):
    ...
    aq_brevitas.errors.PolicyError: target='finn': layers fc have no act_bit_width (FINN maps a layer to hardware only with an integer input of at most 8 bits) -- fix: give every layer act_bit_width 2..8 (aq_brevitas.for_target(specs, 'finn') does it for candidate lists)
    """
    if target not in TARGETS:
        raise PolicyError(
            f"target {target!r} is not one of {', '.join(TARGETS)}", 'use target="finn" or "generic"'
        )
    if target == "generic":
        return
    if act_placement not in ("producer", "finn"):
        raise PolicyError(
            "target='finn' needs act_placement='producer' (FINN folds a Relu into thresholds only when its Quant follows it)",
            "drop act_placement, or use target='generic'",
        )
    specs = {n: policy.spec_for(n) for n in layers}
    missing = [n for n, s in specs.items() if s is None or not s.act_bit_width]
    wide = [n for n, s in specs.items() if s is not None and (s.act_bit_width or 0) > FINN_MAX_BITS]
    if missing or wide:
        what = (
            f"layers {', '.join(missing)} have no act_bit_width"
            if missing
            else f"layers {', '.join(wide)} have inputs over {FINN_MAX_BITS} bits"
        )
        raise PolicyError(
            f"target='finn': {what} (FINN maps a layer to hardware only with an integer input of at most {FINN_MAX_BITS} bits)",
            "give every layer act_bit_width 2..8 (aq_brevitas.for_target(specs, 'finn') does it for candidate lists)",
        )


def layer_cost(spec: LayerSpec, params: int, macs: int) -> tuple[int, int]:
    """``(weight bits, BOPs)`` of one layer under ``spec``: bits·params and MACs·b_w·b_a."""
    act = spec.act_bit_width or DEFAULT_ACT_BITS_FOR_BOPS
    return spec.weight_bit_width * params, macs * spec.weight_bit_width * act


def cost_of(specs: Mapping[str, LayerSpec], geometry: Mapping[str, Any]) -> PolicyCost:
    """Cost of concrete per-layer specs over layer geometries (anything with ``params`` and ``macs``:
    ``params`` stored once, ``macs`` over every call, as :func:`~aq_brevitas.nnutils.layer_geometry`
    gives them); layers without a spec count as 32-bit float."""
    bits = bops = params = 0
    for name, g in geometry.items():
        spec = specs.get(name)
        b, o = (32 * g.params, g.macs * 32 * 32) if spec is None else layer_cost(spec, g.params, g.macs)
        bits += b
        bops += o
        params += g.params
    return PolicyCost(bits / max(params, 1), bits, bits / 8, bops, params)
