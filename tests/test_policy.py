import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aq_brevitas.budget import Budget
from aq_brevitas.errors import PolicyError
from aq_brevitas.models import build_model
from aq_brevitas.policy import (
    _SPEC_KEYS,
    GRANULARITIES,
    SCALINGS,
    SCHEMA,
    VOLATILE_META,
    LayerSpec,
    LayerwisePolicy,
)

MIXED = LayerwisePolicy(
    {
        "conv1": LayerSpec(8, "max", "per_channel"),
        "conv2": LayerSpec(4, "mse", "per_tensor", act_bit_width=8),
        "fc1": LayerSpec(2, "percentile", "per_channel", act_bit_width=4),
        "fc2": LayerSpec(1, "po2", "per_tensor"),
    },
    default=LayerSpec(8),
    meta={"method": "hand", "note": "ünïcode"},
)


def test_json_round_trip_is_lossless():
    text = MIXED.to_json()
    again = LayerwisePolicy.from_json(text)
    assert again == MIXED and again.to_json() == text
    assert json.loads(text)["schema"] == SCHEMA


def test_hand_written_policy_with_defaults():
    text = json.dumps({"schema": SCHEMA, "layers": {"fc1": {"weight_bit_width": 3}}})
    p = LayerwisePolicy.from_json(text)
    assert p.layers["fc1"] == LayerSpec(3, "max", "per_channel", None)


def test_cost_counts_bits_bytes_and_bops():
    model = build_model("small_cnn")
    cost = LayerwisePolicy.uniform(["conv1", "conv2", "fc1", "fc2"], LayerSpec(4)).cost(model)
    params = sum(m.weight.numel() for m in (model.conv1, model.conv2, model.fc1, model.fc2))
    assert cost.params == params and cost.avg_weight_bits == 4.0
    assert cost.weight_bytes == params * 4 / 8
    macs = (
        28 * 28 * model.conv1.weight.numel()
        + 14 * 14 * model.conv2.weight.numel()
        + model.fc1.weight.numel()
        + model.fc2.weight.numel()
    )
    assert cost.bops == macs * 4 * 8


def test_matches_reports_unknown_and_uncovered():
    model = build_model("small_cnn")
    p = LayerwisePolicy({"conv1": LayerSpec(4), "nope": LayerSpec(4)})
    m = p.matches(model)
    assert m.unknown == ("nope",) and m.uncovered == ("conv2", "fc1", "fc2")
    with pytest.raises(PolicyError, match="'nope'"):
        p.check(model)


@pytest.mark.parametrize("bits", [0, 9, 33, -1, "4", 4.0, True, None])
def test_bad_bit_widths_name_the_layer(bits):
    d = {"schema": SCHEMA, "layers": {"fc1": {"weight_bit_width": bits}}}
    with pytest.raises(PolicyError, match="layer 'fc1': weight_bit_width"):
        LayerwisePolicy.from_dict(d)


@pytest.mark.parametrize(
    "doc, where",
    [
        ({"schema": "aq-brevitas/policy/v2", "layers": {}}, "schema"),
        ({"schema": SCHEMA, "layers": {}, "extra": 1}, "unknown key 'extra'"),
        ({"schema": SCHEMA, "layers": {"fc1": {"weight_bit_width": 4, "bits": 4}}}, "unknown key 'bits'"),
        (
            {"schema": SCHEMA, "layers": {"fc1": {"weight_bit_width": 4, "scaling": "minmax"}}},
            "scaling='minmax'",
        ),
        (
            {"schema": SCHEMA, "layers": {"fc1": {"weight_bit_width": 4, "granularity": "per_row"}}},
            "granularity",
        ),
        (
            {"schema": SCHEMA, "layers": {"fc1": {"weight_bit_width": 4, "act_bit_width": 1}}},
            "act_bit_width=1",
        ),
        ({"schema": SCHEMA, "layers": []}, "'layers' must be an object"),
        ([], "must be a JSON object"),
    ],
)
def test_malformed_policies(doc, where):
    with pytest.raises(PolicyError, match=where):
        LayerwisePolicy.from_dict(doc)


def test_malformed_json_text():
    with pytest.raises(PolicyError, match="not valid JSON"):
        LayerwisePolicy.from_json("{'schema': ")


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-50, 50),
    st.floats(allow_nan=True, allow_subnormal=False),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
)
_any = _values.map(lambda v: v)  # one branch, not six, when it sits inside another one_of


def _often(valid):
    """A valid value about half the time, so every check of the validator gets reached."""
    return st.one_of(valid, _any)


_fields = {
    "weight_bit_width": _often(st.integers(1, 8)),
    "scaling": _often(st.sampled_from(SCALINGS)),
    "granularity": _often(st.sampled_from(GRANULARITIES)),
    "act_bit_width": _often(st.one_of(st.none(), st.integers(2, 16))),
}
_spec_dict = st.fixed_dictionaries(
    {"weight_bit_width": _fields["weight_bit_width"]},
    optional={k: v for k, v in _fields.items() if k != "weight_bit_width"},
)
_spec_like = st.integers(0, 9).flatmap(  # mostly objects; sometimes a missing or unknown key, or no object
    lambda i: (
        [
            _any,
            st.fixed_dictionaries({"bogus": _any}, optional=_fields),
            st.fixed_dictionaries({}, optional=_fields),
        ][i]
        if i < 3
        else _spec_dict
    )
)
_json_safe = st.one_of(st.none(), st.integers(-5, 5), st.text(max_size=4))
_meta = st.one_of(
    st.dictionaries(st.text(max_size=5).filter(lambda k: k not in VOLATILE_META), _json_safe, max_size=3),
    st.lists(st.integers(), max_size=2),
    st.integers(),
    st.text(max_size=3),
)
# The fuzz profile (HYPOTHESIS_PROFILE=fuzz, `make fuzz`) tries many more documents than CI does.
_EXAMPLES = 3000 if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" else 150


def _spec_problems(where: str, d) -> list[str]:
    """What a correct validator may report for spec ``d``: each text names ``where`` and the bad field."""
    if not isinstance(d, dict):
        return [f"{where}: expected an object"]
    problems = [f"{where}: unknown key {k!r}" for k in d if k not in _SPEC_KEYS]
    if "weight_bit_width" not in d:
        problems.append(f"{where}: weight_bit_width is missing")
    checks = {
        "weight_bit_width": lambda v: type(v) is int and 1 <= v <= 8,
        "scaling": lambda v: v in SCALINGS,
        "granularity": lambda v: v in GRANULARITIES,
        "act_bit_width": lambda v: v is None or (type(v) is int and 2 <= v <= 16),
    }
    problems += [f"{where}: {k}" for k, ok in checks.items() if k in d and not ok(d[k])]
    return problems


def _policy_problems(doc: dict) -> list[str]:
    problems = []
    if doc.get("schema") != SCHEMA:
        problems.append(f"policy schema {doc.get('schema')!r}")
    problems += [f"unknown key {k!r}" for k in doc if k not in ("schema", "layers", "default", "meta")]
    for name, spec in doc.get("layers", {}).items():
        if spec is not None:  # null keeps the layer float
            problems += _spec_problems(f"layer {name!r}", spec)
    if doc.get("default") is not None:
        problems += _spec_problems("default", doc["default"])
    if "meta" in doc and not isinstance(doc["meta"], dict):
        problems.append("policy 'meta' must be an object")
    return problems


@settings(max_examples=_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=_spec_like, where=st.sampled_from(["default", "layer 'fc1'", "layer 'ü.0'"]))
def test_fuzzed_specs_name_the_bad_field(spec, where):
    problems = _spec_problems(where, spec)
    try:
        parsed = LayerSpec.from_dict(spec, where)
    except PolicyError as exc:
        assert problems and any(pr in str(exc) for pr in problems), (str(exc), problems)
    else:
        assert not problems and LayerSpec.from_dict(parsed.to_dict()) == parsed


@settings(max_examples=_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layers=st.dictionaries(st.text(min_size=1, max_size=6), _spec_like, max_size=3),
    schema=st.sampled_from([SCHEMA, "v0", None]),
    default=st.one_of(st.none(), _spec_like),
    meta=st.one_of(st.none(), _meta),
    extra=st.dictionaries(st.sampled_from(["bits", "Layers", "version"]), _json_safe, max_size=1),
)
def test_fuzzed_policies_raise_policy_error_naming_the_field_or_parse(layers, schema, default, meta, extra):
    doc = {"schema": schema, "layers": layers, **extra}
    if default is not None:
        doc["default"] = default
    if meta is not None:
        doc["meta"] = meta
    problems = _policy_problems(doc)
    try:
        p = LayerwisePolicy.from_dict(doc)
    except PolicyError as exc:
        msg = str(exc)
        assert "\n" not in msg and "-- fix:" in msg
        assert problems, f"refused a valid policy: {msg}"
        assert any(pr in msg for pr in problems), (msg, problems)
    else:
        assert not problems, f"accepted a bad policy: {problems}"
        assert LayerwisePolicy.from_json(p.to_json()) == p


def test_cost_needs_the_input_shape_of_a_foreign_model():
    from torch import nn

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 8 * 8, 3))
    policy = LayerwisePolicy(default=LayerSpec(4))
    with pytest.raises(PolicyError, match="cost of a Sequential needs an example input"):
        policy.cost(model)
    explicit = policy.cost(model, torch.rand(1, 1, 10, 10))
    model.input_shape = (1, 10, 10)
    assert policy.cost(model) == explicit and explicit.bops == (8 * 8 * 18 + 128 * 3) * 4 * 8


def test_a_bad_spec_inside_a_policy_is_named_by_layer():
    spec = LayerSpec(4)
    object.__setattr__(spec, "scaling", "minmax")  # bypasses LayerSpec's own check
    with pytest.raises(PolicyError, match="layer 'fc1': scaling='minmax'"):
        LayerwisePolicy({"fc1": spec})
    with pytest.raises(PolicyError, match="default: scaling='minmax'"):
        LayerwisePolicy(default=spec)


def test_budget_parse_and_validation():
    assert Budget.parse("avg-bits=4") == Budget(avg_weight_bits=4.0)
    assert Budget.parse("kib=2").weight_bytes == 2048
    assert Budget.parse("bops=1e9").kind == "bops"
    for bad in ("avg-bits=-1", "avg-bits=0", "avg-bits=nan", "bits=4", "avg-bits=four"):
        with pytest.raises(PolicyError):
            Budget.parse(bad)
    with pytest.raises(PolicyError, match="exactly one"):
        Budget(avg_weight_bits=4, bops=1e6)


def test_str_is_a_table():
    lines = str(MIXED).splitlines()
    assert lines[0].split() == ["layer", "bits", "scaling", "granularity", "act"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows == {
        "conv1": ["8", "max", "per_channel", "-"],
        "conv2": ["4", "mse", "per_tensor", "8"],
        "fc1": ["2", "percentile", "per_channel", "4"],
        "fc2": ["1", "po2", "per_tensor", "-"],
        "(default)": ["8", "max", "per_channel", "-"],
    }
