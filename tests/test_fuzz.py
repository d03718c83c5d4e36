"""Hypothesis: small random conv/linear architectures through score → search → quantize → export parity.

CI runs a few examples; `make fuzz` (HYPOTHESIS_PROFILE=fuzz) runs many more.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import aq_brevitas as aq
from aq_brevitas.errors import PolicyError
from aq_brevitas.search.candidates import candidate_table

settings.register_profile(
    "ci", max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
)
settings.register_profile("fuzz", max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class RandomNet(nn.Module):
    """A chain of conv blocks (optionally strided, grouped, with BN) then a linear head."""

    def __init__(self, convs, hidden, use_bn, size=12):
        super().__init__()
        layers, cin = [], 1
        for cout, k, stride, groups in convs:
            g = groups if cin % groups == 0 and cout % groups == 0 else 1
            layers += [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=g, bias=not use_bn)]
            layers += [nn.BatchNorm2d(cout)] if use_bn else []
            layers += [nn.ReLU()]
            cin = cout
            size = (size + 2 * (k // 2) - k) // stride + 1
        self.features = nn.Sequential(*layers)
        self.head = (
            nn.ModuleList([nn.Linear(cin * size * size, hidden), nn.Linear(hidden, 10)])
            if hidden
            else nn.ModuleList([nn.Linear(cin * size * size, 10)])
        )

    def forward(self, x):
        x = self.features(x).flatten(1)
        for i, fc in enumerate(self.head):
            x = fc(x) if i == len(self.head) - 1 else torch.relu(fc(x))
        return x


conv_spec = st.tuples(
    st.sampled_from([2, 4]), st.sampled_from([1, 3]), st.sampled_from([1, 2]), st.sampled_from([1, 2])
)


@given(
    convs=st.lists(conv_spec, min_size=0, max_size=2),
    hidden=st.sampled_from([0, 8]),
    use_bn=st.booleans(),
    bits=st.lists(st.sampled_from([2, 3, 4, 8]), min_size=1, max_size=3, unique=True),
    budget=st.sampled_from([3.0, 4.0, 8.0]),
    seed=st.integers(0, 3),
)
def test_random_architectures_survive_the_whole_flow(
    tmp_path_factory, convs, hidden, use_bn, bits, budget, seed
):
    torch.manual_seed(seed)
    model = RandomNet(convs, hidden, use_bn)
    x = torch.rand(16, 1, 12, 12)
    if use_bn:
        model.train()
        with torch.no_grad():
            model(x)
    model.eval()
    y = model(x).argmax(1)
    candidates = [aq.LayerSpec(b, "max", "per_channel") for b in sorted(set(bits) | {8})]
    scores = aq.lipschitz_scores(model, x[:4], seed=seed)
    assert all(s.L >= 0 for s in scores.values())
    table = candidate_table(model, x[:4], candidates, scores=scores)
    config = aq.SearchConfig(seed=seed).replace(steps=2)
    search = dict(budget=aq.Budget(avg_weight_bits=budget), config=config, table=table, progress=False)
    if budget < min(c.weight_bit_width for c in candidates):
        with pytest.raises(PolicyError, match="infeasible"):
            aq.search_policy(model, (x, y), **search)
        return
    with pytest.warns(UserWarning, match="without val_data"):
        result = aq.search_policy(model, (x, y), **search)
    policy = result.policy
    assert result.winner == "unchecked"
    assert result.cost.avg_weight_bits <= budget + 1e-9
    assert aq.LayerwisePolicy.from_json(policy.to_json()).layers == policy.layers
    q = aq.quantize(model, policy).eval()
    out = tmp_path_factory.mktemp("fuzz") / "m.onnx"
    res = aq.export_qonnx(q, out, x[:1], images=x[1:3])
    assert res.max_abs_diff <= res.allowed_diff
    assert res.layer_bits == {n: s.weight_bit_width for n, s in policy.layers.items()}
