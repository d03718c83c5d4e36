"""Policy search: the exact knapsack, the scorers, the uniform baseline, determinism, metric validation."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from aq_brevitas.budget import Budget
from aq_brevitas.errors import ConfigError, PolicyError
from aq_brevitas.models import load_float_model
from aq_brevitas.nnutils import layer_geometry
from aq_brevitas.policy import LayerSpec, LayerwisePolicy
from aq_brevitas.quantization.convert import quantize
from aq_brevitas.search import (
    SearchConfig,
    SearchResult,
    adversarial_calibration,
    best_uniform,
    lipschitz_terms,
    policy_table,
    score_ans,
    score_hessian,
    score_lipschitz,
    search_policy,
    solve_mckp,
    solve_top_k,
    validate_metric,
)
from aq_brevitas.search.candidates import CandidateTable, candidate_table, default_candidates
from aq_brevitas.search.costing import check_feasible

# Expected by design in these unit tests (each is asserted by its own test): searches without
# held-out data, and policies that quantize a single layer on purpose.
pytestmark = pytest.mark.filterwarnings(
    "ignore:search_policy ran without val_data:UserWarning",
    "ignore:policy has no spec and no default for layers:UserWarning",
)

CANDS = default_candidates(bits=(2, 3, 4, 8), scalings=("max", "mse"), granularities=("per_channel",))


# --------------------------------------------------------------------------------- the knapsack
def _brute(scores, costs, budget):
    layers = list(scores)
    out = []
    for combo in itertools.product(*(list(scores[n]) for n in layers)):
        cost = sum(costs[n][s] for n, s in zip(layers, combo))
        if cost <= budget + 1e-9:
            out.append((sum(scores[n][s] for n, s in zip(layers, combo)), dict(zip(layers, combo))))
    return sorted(out, key=lambda t: t[0])


def _greedy(scores, costs, budget):
    """Start from the cheapest option per layer; repeatedly take the best score drop per unit cost."""
    choice = {n: min(c, key=c.get) for n, c in costs.items()}
    while True:
        spent = sum(costs[n][s] for n, s in choice.items())
        best = None
        for n in scores:
            for s in scores[n]:
                dc = costs[n][s] - costs[n][choice[n]]
                ds = scores[n][choice[n]] - scores[n][s]
                if ds > 0 and dc > 0 and spent + dc <= budget:
                    if best is None or ds / dc > best[0]:
                        best = (ds / dc, n, s)
        if best is None:
            return sum(scores[n][s] for n, s in choice.items())
        choice[best[1]] = best[2]


def _instance(vals):
    specs = [LayerSpec(2), LayerSpec(4), LayerSpec(8)]
    scores = {f"l{i}": {s: v[0] for s, v in zip(specs, row)} for i, row in enumerate(vals)}
    costs = {f"l{i}": {s: v[1] for s, v in zip(specs, row)} for i, row in enumerate(vals)}
    return scores, costs


def test_milp_is_exact_and_beats_greedy_where_greedy_fails():
    # (score, cost) per option: greedy upgrades l1 first (best ratio), then cannot afford l0's jump.
    scores, costs = _instance(
        [[(10, 1), (9.5, 2), (0, 4)], [(10, 1), (6, 2), (5.9, 9)], [(5, 1), (0, 10), (-1, 20)]]
    )
    budget = 6
    opt = _brute(scores, costs, budget)[0][0]
    choice, status = solve_mckp(scores, costs, budget)
    assert status == "optimal"
    assert sum(costs[n][s] for n, s in choice.items()) <= budget
    assert sum(scores[n][s] for n, s in choice.items()) == pytest.approx(opt)
    assert _greedy(scores, costs, budget) > opt + 1  # the instance really defeats greedy


def test_milp_matches_brute_force_on_random_instances():
    gen = torch.Generator().manual_seed(0)
    for _ in range(15):
        vals = [
            [(float(torch.rand(1, generator=gen)) * 10, float(torch.randint(1, 20, (1,), generator=gen)))
             for _ in range(3)]
            for _ in range(3)
        ]  # fmt: skip
        scores, costs = _instance(vals)
        budget = float(torch.randint(3, 45, (1,), generator=gen))
        brute = _brute(scores, costs, budget)
        if not brute:
            with pytest.raises(PolicyError):
                solve_mckp(scores, costs, budget)
            continue
        choice, _ = solve_mckp(scores, costs, budget)
        assert sum(costs[n][s] for n, s in choice.items()) <= budget
        assert sum(scores[n][s] for n, s in choice.items()) == pytest.approx(brute[0][0])
        assert sum(scores[n][s] for n, s in choice.items()) <= _greedy(scores, costs, budget) + 1e-9


def test_top_k_distinct_and_sorted():
    scores, costs = _instance([[(3, 1), (2, 2), (0, 4)], [(4, 1), (1, 3), (0, 5)], [(2, 1), (1, 2), (0, 3)]])
    budget = 9
    brute = _brute(scores, costs, budget)
    sols = solve_top_k(scores, costs, budget, k=6)
    assert len(sols) == 6
    objs = [s.objective for s in sols]
    assert objs == sorted(objs)
    assert objs == pytest.approx([b[0] for b in brute[:6]])
    assert len({tuple(sorted(s.choice.items())) for s in sols}) == 6
    assert all(s.cost <= budget for s in sols)
    assert len(solve_top_k(scores, costs, budget, k=10_000)) == len(brute)  # stops when none are left


def test_infeasible_budget_names_the_minimum():
    scores, costs = _instance([[(1, 3), (0, 5), (0, 6)], [(1, 2), (0, 3), (0, 4)], [(1, 1), (0, 2), (0, 9)]])
    with pytest.raises(PolicyError, match=r"costs 6\b"):
        solve_mckp(scores, costs, 5.5)


# ------------------------------------------------------------------------------------- on cnn-pgd
@pytest.fixture(scope="module")
def cnn():
    model, _ = load_float_model("cnn-pgd")
    return model


@pytest.fixture(scope="module")
def calib(fmnist_val_512):
    x, y = fmnist_val_512
    return x[:64], y[:64]


@pytest.fixture(scope="module")
def held_out(fmnist_val_512):
    x, y = fmnist_val_512
    return x[256:356], y[256:356]


@pytest.fixture(scope="module")
def table(cnn, calib):
    return candidate_table(cnn, calib[0], CANDS)


@pytest.fixture(scope="module")
def adv_calib(cnn, calib):
    return adversarial_calibration(cnn, calib, eps=0.1, seed=0)


def test_check_feasible_states_minimum_in_budget_units(table):
    with pytest.raises(PolicyError, match=r"needs 2 average weight bits") as e:
        check_feasible(table, Budget(avg_weight_bits=1.5))
    assert "\n" not in str(e.value)
    params = sum(s.params for s in table.scores.values())
    with pytest.raises(PolicyError, match=f"needs {2 * params / 8:g} weight bytes"):
        check_feasible(table, Budget(weight_bytes=100))
    check_feasible(table, Budget(avg_weight_bits=2))


def test_search_rejects_bad_settings_in_one_line(cnn, calib):
    cases = [
        ("avg-bits=4", dict(method="greedy"), ConfigError, "unknown search method"),
        ("avg-bits=4", dict(eps=1.5), ConfigError, "outside"),
        ("avg-bits=1", dict(candidates=CANDS), PolicyError, "needs 2 average weight bits"),
        ("avg-bits=4", dict(estimate="exact"), ConfigError, "unknown estimate"),
    ]
    for budget, changes, exc, text in cases:
        with pytest.raises(exc, match=text) as e:
            search_policy(cnn, calib, budget, config=SearchConfig().replace(**changes), progress=False)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="takes method in its config"):  # settings live in the config
        search_policy(cnn, calib, "avg-bits=4", method="hessian", progress=False)
    with pytest.raises(ConfigError, match="not a SearchConfig"):
        search_policy(cnn, calib, "avg-bits=4", config={"method": "hessian"}, progress=False)
    with pytest.raises(ConfigError, match="empty"):
        search_policy(cnn, (torch.empty(0, 1, 28, 28), torch.empty(0, dtype=torch.long)), budget="avg-bits=4")


def test_uniform_picks_highest_bits_that_fit(cnn, table, calib, held_out):
    u = best_uniform(cnn, table, "avg-bits=5", held_out, calib_data=calib, config=SearchConfig(val_images=64))
    specs = set(u.policy.layers.values())
    assert len(specs) == 1 and next(iter(specs)).weight_bit_width == 4  # 8 does not fit, 4 is the highest
    # one option per maximal (weight, input) bit pair, at its data-free best scaling: here weight-only
    # candidates, so one pair (4, float): measured all the same, since the held-out check compares with it
    accs = u.robust_accuracy
    assert list(accs) == [next(iter(specs)).short()] and u.rule == "robust_accuracy"
    assert 0 <= u.accuracy <= 1 and u.to_dict()["robust_accuracy"] == accs
    q = search_policy(
        cnn, calib, "avg-bits=3.5", config=SearchConfig(method="uniform"), table=table, progress=False
    )
    assert {s.weight_bit_width for s in q.layers.values()} == {3}
    assert best_uniform(cnn, table, "bytes=1e9").spec.weight_bit_width == 8
    no_common = CandidateTable(
        table.scores,
        {
            n: [r for r in rows if r.spec.weight_bit_width == (2 if n == "fc1" else 8)]
            for n, rows in table.rows.items()
        },
    )
    with pytest.raises(PolicyError, match="no uniform policy fits"):
        best_uniform(cnn, no_common, "avg-bits=4")


def test_lipschitz_term_is_the_swap_quantizers_deviation(cnn, table, adv_calib):
    terms = lipschitz_terms(cnn, table, adv_calib, eps=0.1)
    for name, spec in [
        ("conv2", LayerSpec(3, "mse")),
        ("fc1", LayerSpec(2, "max")),
        ("fc2", LayerSpec(4, "mse")),
    ]:
        q = quantize(cnn, LayerwisePolicy({name: spec})).eval()  # only this layer quantized, the rest float
        with torch.no_grad():
            dev = (q(adv_calib.x_adv) - cnn(adv_calib.x_adv)).norm(dim=1).mean().item()
        assert terms.quantization[name][spec] == pytest.approx(dev, rel=1e-5, abs=1e-7)
        row, sc = table.row(name, spec), table.scores[name]
        assert terms.adversarial[name][spec] == pytest.approx(0.1 * adv_calib.j_loc * (row.L_hat / sc.L - 1))
    total = score_lipschitz(cnn, table, adv_calib, config=SearchConfig(eps=0.1))
    assert total["fc1"][LayerSpec(2)] > total["fc1"][LayerSpec(8)]


def test_lipschitz_term_with_batchnorm():
    model, _ = load_float_model("vgg-pgd")
    x = torch.rand(16, 1, 28, 28)
    spec = LayerSpec(3, "mse")
    tab = candidate_table(model, x, {"*": [LayerSpec(8)], "block2.conv": [spec]})
    cal = adversarial_calibration(model, (x, model(x).argmax(1)), eps=0.05, steps=2)
    terms = lipschitz_terms(model, tab, cal, eps=0.05)
    q = quantize(model, LayerwisePolicy({"block2.conv": spec})).eval()
    with torch.no_grad():
        dev = (q(cal.x_adv) - model(cal.x_adv)).norm(dim=1).mean().item()
    assert terms.quantization["block2.conv"][spec] == pytest.approx(dev, rel=1e-5)


def test_search_is_deterministic(cnn, table, calib):
    a = search_policy(
        cnn, calib, "avg-bits=3", config=SearchConfig(seed=3), table=table, progress=False
    ).policy
    b = search_policy(
        cnn, calib, "avg-bits=3", config=SearchConfig(seed=3), table=table, progress=False
    ).policy
    assert a.to_json() == b.to_json()  # timings are kept in memory only, never written
    assert "timing" in a.meta and "timing" not in LayerwisePolicy.from_json(a.to_json()).meta
    assert LayerwisePolicy.from_json(a.to_json()).layers == a.layers


def test_search_cnn_avg4_end_to_end(cnn, calib, held_out):
    config = SearchConfig(candidates=CANDS, val_images=64, refine=True)
    r = search_policy(cnn, calib, Budget(avg_weight_bits=4), config=config, val_data=held_out, progress=False)
    assert isinstance(r, SearchResult) and r.cost.avg_weight_bits <= 4 + 1e-9
    assert set(r.policy.layers) == {"conv1", "conv2", "fc1", "fc2"}
    assert r.method == "lipschitz" and r.estimate == "jacobian" and r.solver.status == "optimal"
    assert r.winner in ("search", "search-unrefined", "uniform")
    v = r.validation
    accs = {
        "search": v.search_accuracy,
        "search-unrefined": v.unrefined_accuracy,
        "uniform": v.uniform_accuracy,
    }
    best = max(a for a in accs.values() if a is not None)
    assert accs[r.winner] == best  # never worse than uniform (or the unrefined solution) on validation images
    assert r.refinement.done and r.refinement.bound_final <= r.refinement.bound_milp + 1e-12
    assert set(r.layer_scores) == set(r.policy.layers) and r.evidence.j_loc > 0
    assert r.timing.solve_s is not None and r.timing.scoring_s is not None and r.timing.total_s is not None
    assert r.candidates["fc1"].to_dict() == {"given": 8, "distinct": 7}  # 8b max and 8b mse give the same Ŵ
    # The policy's JSON meta is the same record, built from the typed fields.
    m = r.policy.meta
    assert m["winner"] == r.winner and m["cost"] == r.cost.summary() and m["refine"] == r.refinement.to_dict()
    assert m["validation"] == v.to_dict() and m["j_loc"] == r.evidence.j_loc
    text = policy_table(r, layer_geometry(cnn, calib[0][:1]))
    assert "fc1" in text and "avg weight bits" in text and "winner" in text
    assert text == policy_table(
        r.policy, layer_geometry(cnn, calib[0][:1])
    )  # from the typed fields or the meta


def test_bytes_and_bops_budgets(cnn, table, calib):
    for budget in ("kib=80", "bops=5e7"):
        b = Budget.parse(budget)
        r = search_policy(cnn, calib, b, table=table, progress=False)
        assert r.cost.value(b.kind) <= b.value * (1 + 1e-9)


def test_baseline_scorers_and_spectral(cnn, table, calib):
    cfg = SearchConfig(eps=0.1).replace(n_samples=4, estimate="spectral")
    for scores in (
        score_hessian(cnn, table, calib, config=cfg),
        score_ans(cnn, table, calib, config=cfg),
        score_lipschitz(cnn, table, calib, config=cfg),
    ):
        assert set(scores) == set(table.layers)
        assert all(math.isfinite(v) for per in scores.values() for v in per.values())
    h = score_hessian(cnn, table, calib, config=cfg)
    assert h["fc1"][LayerSpec(2)] > h["fc1"][LayerSpec(4)] >= 0
    for method in ("hessian", "ans", "lipschitz"):
        config = cfg.replace(method=method, refine=True)
        r = search_policy(cnn, calib, "avg-bits=4", config=config, table=table, progress=False)
        assert r.cost.avg_weight_bits <= 4 + 1e-9
        assert r.refinement.done is (method == "lipschitz")


def test_validate_metric_tiny(cnn, table, calib, held_out, tmp_path):
    v = validate_metric(cnn, calib, held_out, budget="avg-bits=4", n_policies=5, table=table, progress=False)
    assert len(v.policies) == 5 and v.images == len(held_out[0])
    assert len({json.dumps(r["layers"], sort_keys=True) for r in v.policies}) == 5  # distinct draws
    assert all(abs(r["cost"]["avg_weight_bits"] - 4) <= 0.2 + 1e-9 for r in v.policies)
    assert len({round(r["bound"], 9) for r in v.policies}) > 1  # the bound tells the policies apart
    assert all(0 <= r["pgd_accuracy"] <= 1 for r in v.policies)
    assert -1 <= v.rho <= 1 and 0 <= v.p_value <= 1
    assert -1 <= v.rho_additive <= 1 and 0 <= v.p_value_additive <= 1
    assert "Spearman" in v.to_markdown() and json.dumps(v.to_dict())
    v.plot(tmp_path / "metric.png")
    assert (tmp_path / "metric.png").stat().st_size > 1000


def test_search_without_val_data_says_unchecked(cnn, table, calib):
    with pytest.warns(UserWarning, match="not compared with the best uniform"):
        r = search_policy(cnn, calib, "avg-bits=4", table=table, progress=False)
    assert r.winner == "unchecked" and r.validation is None


def test_uniform_policy_meta_has_scores_and_solver(cnn, table, calib):
    r = search_policy(
        cnn, calib, "avg-bits=4", config=SearchConfig(method="uniform"), table=table, progress=False
    )
    assert r.winner == "uniform" and r.solver.status == "not run"
    assert set(r.layer_scores) == set(r.layers) and r.objective == sum(r.layer_scores.values())
    assert r.layer_scores["fc1"] != 0  # a uniform policy's share of the (spectral) bound, not zeros


def test_downstream_replay_equals_full_forward(cnn, table, adv_calib):
    from aq_brevitas.search import WeightCache, network_deviation, swapped_weights

    cache = WeightCache(cnn, table)
    for specs in ({"conv2": LayerSpec(2)}, {"fc1": LayerSpec(3, "mse"), "fc2": LayerSpec(2)}):
        fast = network_deviation(cnn, adv_calib, specs, cache)
        with torch.no_grad(), swapped_weights(cnn, {n: cache(n, s) for n, s in specs.items()}):
            full = (cnn(adv_calib.x_adv) - adv_calib.base_logits).norm(dim=1).mean().item()
        assert fast == pytest.approx(full, rel=1e-6)


def test_search_costs_less_than_four_pgd20_evaluations(cnn, fmnist_val_512):
    """Default candidates (36 per layer), avg-4, 64 calibration images: the whole search, candidate table
    included, against PGD-20 on 256 images timed in the same test (no absolute timings).

    The issue's target (0.2x PGD-20 on 1,000 images) is missed -- docs/method.md has the figures (2.3x
    with 256 calibration images); this bound (4x) catches a return to the old cost (about 6x).
    """
    import time

    from aq_brevitas.config import AttackConfig
    from aq_brevitas.evaluate.accuracy import attack_accuracy

    x, y = fmnist_val_512
    t0 = time.perf_counter()
    attack_accuracy(cnn, x[:256], y[:256], AttackConfig("pgd", eps=0.1, steps=20))
    pgd_s = time.perf_counter() - t0
    with pytest.warns(UserWarning, match="not compared"):
        r = search_policy(cnn, (x[:64], y[:64]), budget="avg-bits=4", progress=False)
    assert r.candidates["conv1"].given == 36 and not r.refinement.done  # off by default
    assert r.timing.total_s <= 4 * 4 * pgd_s  # 4 × PGD-20 on 256 ≈ PGD-20 on 1,000 images


# --------------------------------------------------------------------------- config and registry
def test_search_config_validates_serialises_and_routes_method_settings():
    from aq_brevitas.config import ConfigBase
    from aq_brevitas.search import METHODS, SCORERS, HessianSettings, LipschitzSettings

    assert isinstance(SearchConfig(), ConfigBase) and isinstance(HessianSettings(), ConfigBase)
    cfg = SearchConfig(candidates=[LayerSpec(2), LayerSpec(8)]).replace(
        method="hessian", n_samples=4, estimate="spectral", eps=0.05, val_images=None
    )
    assert cfg.settings_for(HessianSettings).n_samples == 4 and cfg.method_settings.n_samples == 4
    assert cfg.settings_for(LipschitzSettings).estimate == "spectral" and cfg.candidates == (
        LayerSpec(2),
        LayerSpec(8),
    )
    assert SearchConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    per_layer = SearchConfig(candidates={"*": [LayerSpec(4)], "fc2": [LayerSpec(8)]})
    assert SearchConfig.from_dict(per_layer.to_dict()) == per_layer
    for kwargs, text in (
        ({"method": "greedy"}, "unknown search method"),
        ({"estimate": "exact"}, "unknown estimate"),
        ({"eps": float("nan")}, "eps must be a number"),
        ({"top_k": 0}, "top_k=0 is outside"),
        ({"n_samples": 0}, "n_samples=0 is outside"),
        ({"candidates": [4]}, "is not a LayerSpec"),
    ):
        with pytest.raises((ConfigError, PolicyError), match=text):
            SearchConfig().replace(**kwargs)
    for old in ("hessian_samples", "n_sample"):  # no spelling of earlier releases is read
        with pytest.raises(ConfigError, match=f"unknown search setting.*'{old}'.*n_samples"):
            SearchConfig().replace(**{old: 4})
    with pytest.raises(ConfigError, match="unknown SearchConfig setting.*'bogus'"):
        SearchConfig.from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match="unknown HessianSettings setting.*'hessian_samples'"):
        SearchConfig.from_dict({"settings": {"hessian": {"hessian_samples": 4}}})
    with pytest.raises(ConfigError, match="cannot be written to JSON"):
        SearchConfig().replace(attack=object()).to_dict()
    # One list of methods: the scorers cover the scored ones, the CLI offers exactly these.
    assert set(SCORERS) == {"lipschitz", "hessian", "ans"} and METHODS[-1] == "uniform"
    from aq_brevitas.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    method = next(a for a in sub.choices["search"]._actions if a.dest == "method")
    assert tuple(method.choices) == METHODS and not any(
        a.dest == "no_refine" for a in sub.choices["search"]._actions
    )


def test_search_result_is_typed_and_carries_the_policy(cnn, table, calib):
    from aq_brevitas.search import select_policy

    with pytest.warns(UserWarning, match="not compared"):
        r = search_policy(
            cnn, calib, "avg-bits=4", config=SearchConfig(method="ans"), table=table, progress=False
        )
    assert r.config.method == "ans" and set(r.evidence.sensitivity) == set(table.layers)
    assert r.policy.meta["ans"] == r.evidence.sensitivity and "avg weight bits" in r.summary()
    assert not hasattr(r, "meta") and not hasattr(r, "save")  # the policy's API lives on result.policy
    # select_policy and search_policy agree that whole-network refinement is off unless asked for.
    assert not select_policy(cnn, table, score_ans(cnn, table, calib), "avg-bits=4").refinement.done


@pytest.fixture
def registries():
    """The method registries, restored after the test whatever it registered."""
    from aq_brevitas.search import METHOD_SETTINGS, SCORERS

    saved = dict(METHOD_SETTINGS), dict(SCORERS)
    yield METHOD_SETTINGS, SCORERS
    for registry, before in zip((METHOD_SETTINGS, SCORERS), saved):
        registry.clear()
        registry.update(before)


def test_a_method_registered_in_one_place_is_selectable_everywhere(cnn, table, calib, registries):
    from dataclasses import dataclass

    import aq_brevitas
    from aq_brevitas.search import MethodSettings, Scoring, register_scorer, score

    @dataclass(frozen=True)
    class FavourSettings(MethodSettings):
        favoured: str = "fc1"

    @dataclass(frozen=True)
    class FavourEvidence:
        favoured: str

        def to_meta(self):
            return {"favoured": self.favoured}

    def favour_scorer(model, table, inputs, settings):
        """Error ~ 1/bits, a hundred times worse in the favoured layer: it gets the most bits."""
        scores = {
            n: {r.spec: (100.0 if n == settings.favoured else 1.0) / r.spec.weight_bit_width for r in rows}
            for n, rows in table.rows.items()
        }
        return Scoring(scores, None, FavourEvidence(settings.favoured))

    aq_brevitas.register_scorer("favour", favour_scorer, FavourSettings)
    cfg = SearchConfig(method="favour").replace(favoured="conv2")  # its settings route like the built-ins'
    assert cfg.method_settings == FavourSettings("conv2") and SearchConfig.from_dict(cfg.to_dict()) == cfg
    scores = score("favour", cnn, table, calib, config=cfg).scores
    assert scores["conv2"][LayerSpec(2)] == 50.0 and scores["fc1"][LayerSpec(2)] == 0.5
    with pytest.warns(UserWarning, match="not compared"):
        r = search_policy(cnn, calib, "avg-bits=3", config=cfg, table=table, progress=False)
    bits = {n: s.weight_bit_width for n, s in r.layers.items()}
    assert (
        r.method == "favour" and r.policy.meta["favoured"] == "conv2" and r.cost.avg_weight_bits <= 3 + 1e-9
    )
    assert bits["conv2"] == max(bits.values()) > min(bits.values())

    class Undecorated(MethodSettings):
        level: int = 1

    @dataclass(frozen=True)
    class Flat(MethodSettings):
        flatness: int = 1

    @dataclass(frozen=True)
    class OwnEps(MethodSettings):
        eps: float = 0.1  # a SearchConfig field: replace(eps=...) could not tell the two apart

    for bad, text in (
        (("favour", favour_scorer, Flat), "taken"),
        (("noisy", favour_scorer, Undecorated), "not a frozen"),
        (("again", favour_scorer, FavourSettings), "reuse the setting name"),
        (("clash", favour_scorer, OwnEps), "reuse the setting name"),
        (("flat", None, Flat), "does not match"),
        (("flat", "no_colon_path", Flat), "does not match"),
    ):
        with pytest.raises(ConfigError, match=text):
            register_scorer(*bad)
    register_scorer("missing", "aq_brevitas.search.scorers:no_such_scorer", Flat)  # a path: imported on use
    with pytest.raises(ConfigError, match="scorers:no_such_scorer' of method 'missing' does not import"):
        score("missing", cnn, table, calib)


def test_search_takes_a_list_of_batches(cnn, table, calib):
    x, y = calib
    ans = SearchConfig(method="ans")
    pair = search_policy(cnn, calib, "avg-bits=3", config=ans, table=table, progress=False)
    batches = search_policy(cnn, [(x[:32], y[:32]), (x[32:], y[32:])], "avg-bits=3", config=ans, table=table,
                            progress=False)  # fmt: skip
    assert batches.policy.to_json() == pair.policy.to_json()


def test_result_cost_is_the_policys_cost_on_the_model():
    from aq_brevitas.budget import PolicyCost
    from aq_brevitas.models import build_model

    torch.manual_seed(0)
    model = build_model("small_cnn").eval()
    x = torch.rand(16, 1, 28, 28)
    config = SearchConfig(candidates=[LayerSpec(2), LayerSpec(8)])
    result = search_policy(model, (x, model(x).argmax(1)), "avg-bits=4", config=config, progress=False)
    assert type(result.cost) is PolicyCost and not callable(result.cost)
    assert result.cost == result.policy.cost(model, x[:1])


def test_layers_sharing_a_weight_get_one_spec_and_its_bits_count_once():
    """A tied weight is stored once, so the search gives both layers one spec (one knapsack item)."""
    from torch import nn

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.head(torch.relu(self.b(torch.relu(self.a(x)))))

    torch.manual_seed(0)
    model = Tied().eval()
    x = torch.rand(32, 32)
    y = model(x).argmax(1)
    config = SearchConfig(candidates=[LayerSpec(2), LayerSpec(4), LayerSpec(8)])
    result = search_policy(model, (x, y), "avg-bits=5", config=config, progress=False)
    assert result.layers["a"] == result.layers["b"]
    assert result.cost.avg_weight_bits <= 5
    geometry = layer_geometry(model, x[:1])
    assert geometry["b"].params == 0 and result.cost.params == geometry["a"].params + geometry["head"].params
