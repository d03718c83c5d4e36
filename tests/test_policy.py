import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aq_brevitas.errors import PolicyError
from aq_brevitas.models import build_model
from aq_brevitas.policy import SCHEMA, Budget, LayerSpec, LayerwisePolicy

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
_spec_like = st.dictionaries(
    st.sampled_from(["weight_bit_width", "scaling", "granularity", "act_bit_width", "bogus"]),
    _values,
    max_size=5,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layers=st.dictionaries(st.text(min_size=1, max_size=6), _spec_like, max_size=3),
    schema=st.sampled_from([SCHEMA, "v0", None]),
)
def test_fuzzed_policies_raise_policy_error_or_parse(layers, schema):
    doc = {"schema": schema, "layers": layers}
    try:
        p = LayerwisePolicy.from_dict(doc)
    except PolicyError as exc:
        msg = str(exc)
        assert "\n" not in msg and ("schema" in msg or "layer " in msg)
    else:
        assert LayerwisePolicy.from_json(p.to_json()) == p


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
    text = str(MIXED)
    assert "conv2" in text and "mse" in text and "(default)" in text
    assert torch is not None
