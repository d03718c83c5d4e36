"""Activation bits in the search space, and the Pareto sweep (aq_brevitas.search.pareto)."""

import warnings

import pytest
import torch

from aq_brevitas.budget import Budget
from aq_brevitas.errors import ConfigError
from aq_brevitas.models import load_float_model
from aq_brevitas.nnutils import layer_geometry
from aq_brevitas.policy import LayerSpec, LayerwisePolicy, cost_of
from aq_brevitas.search import (
    ActivationProbe,
    ParetoFront,
    SearchConfig,
    WeightCache,
    adversarial_calibration,
    score,
    search_pareto,
    search_policy,
    uniform_choices,
    with_act_bits,
)
from aq_brevitas.search.candidates import candidate_table
from aq_brevitas.search.pareto import ParetoPoint, _mark_dominated, _Measure

torch.set_num_threads(1)
FEW = [LayerSpec(b, "max", "per_channel") for b in (2, 3, 4, 8)]


@pytest.fixture(scope="module")
def cnn():
    return load_float_model("cnn-pgd")[0]


def test_act_bits_cross_the_default_candidates_and_round_trip():
    cfg = SearchConfig(act_bits=[8, 2, 4, 2])
    assert cfg.act_bits == (2, 4, 8) and len(cfg.candidates) == 36 * 3
    assert {c.act_bit_width for c in cfg.candidates} == {2, 4, 8}
    assert SearchConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="act_bits entry"):
        SearchConfig(act_bits=(1, 4))


def test_input_bits_are_scored_by_their_own_measured_deviation(cnn, fmnist_val_512):
    x, y = fmnist_val_512[0][:96], fmnist_val_512[1][:96]
    calib = adversarial_calibration(cnn, (x, y), eps=0.1, steps=3)
    probe = ActivationProbe(cnn, calib)
    devs = [probe.deviation("conv2", b, False) for b in (2, 3, 4, 8)]
    assert devs == sorted(devs, reverse=True) and devs[-1] < 0.1 * devs[0]  # fewer bits, more deviation
    assert probe.relative_error("fc1", 2, False) > probe.relative_error("fc1", 8, False) > 0
    candidates = with_act_bits(FEW, (2, 8))
    table = candidate_table(cnn, calib.x_adv, candidates)
    cache = WeightCache(cnn, table)
    for method in ("lipschitz", "hessian", "ans"):
        data = calib if method == "lipschitz" else (x, y)
        scores = score(
            method, cnn, table, data, config=SearchConfig().replace(n_samples=2), cache=cache
        ).scores
        for name in ("conv2", "fc1"):  # same weight, 2-bit input scores worse than 8-bit input
            low, high = (scores[name][LayerSpec(4, "max", "per_channel", a)] for a in (2, 8))
            assert low > high, (method, name, low, high)


def test_a_bops_budget_at_uniform_w3a3_gets_layer_wise_input_bits(cnn, fmnist_val_512):
    x, y = fmnist_val_512[0][:128], fmnist_val_512[1][:128]
    geometry = layer_geometry(cnn, x[:1])
    w3a3 = cost_of({n: LayerSpec(3, act_bit_width=3) for n in geometry}, geometry).bops
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no held-out data: the result says "unchecked"
        config = SearchConfig(candidates=with_act_bits(FEW, (2, 3, 4, 8))).replace(steps=3)
        res = search_policy(cnn, (x, y), Budget(bops=w3a3), config=config, progress=False)
    acts = {s.act_bit_width for s in res.policy.layers.values()}
    assert len(acts) > 1, res.policy.layers  # not one width for every layer
    assert res.cost.bops <= w3a3 * (1 + 1e-9)


def test_uniform_choices_are_the_maximal_fitting_pairs(cnn, fmnist_val_512):
    x = fmnist_val_512[0][:16]
    table = candidate_table(cnn, x, with_act_bits(FEW, (2, 4, 8)))
    cache = WeightCache(cnn, table)
    w4a4 = cost_of({n: LayerSpec(4, act_bit_width=4) for n in table.layers}, table.scores).bops
    pairs = {
        (next(iter(c.values())).weight_bit_width, next(iter(c.values())).act_bit_width)
        for c in uniform_choices(table, Budget(bops=w4a4), cache)
    }
    assert pairs == {(4, 4), (8, 2), (2, 8)}  # (3, 4) and (2, 4) are beaten by (4, 4) on both widths
    assert uniform_choices(table, Budget(bops=1.0), cache) == []


def _point(method, bops, robust):
    return ParetoPoint(method, "bops=1", {}, bops, 1.0, 4.0, 0.9, robust)


def test_dominated_points_are_marked_within_each_method():
    pts = _mark_dominated(
        [_point("a", 10, 0.5), _point("a", 20, 0.4), _point("a", 20, 0.6), _point("b", 30, 0.1)], "bops"
    )
    assert [p.dominated for p in pts] == [False, True, False, False]


def test_search_pareto_measures_every_method_on_the_same_images(cnn, fmnist_val_512, tmp_path):
    x, y = fmnist_val_512
    geometry = layer_geometry(cnn, x[:1])
    w4a4 = cost_of({n: LayerSpec(4, act_bit_width=4) for n in geometry}, geometry).bops
    cfg = SearchConfig(candidates=with_act_bits(FEW, (2, 4, 8)), val_images=24, pgd_steps=3).replace(steps=3)
    front = search_pareto(
        cnn, (x[:64], y[:64]), (x[64:], y[64:]), budgets=[f"bops={w4a4}"],
        methods=["uniform", "first_last_8", "lipschitz"], config=cfg, progress=False, workers=2,
    )  # fmt: skip
    # Two forked workers measured the points: the same numbers as measuring them here, one by one.
    here = _Measure(cnn, x[:64], (x[64:88], y[64:88]), cfg)
    for p in front.points[:2]:
        specs = LayerwisePolicy.from_dict(p.policy).layers
        assert here(specs) == (p.clean_accuracy, p.robust_accuracy), p.method
    assert {p.method for p in front.points} == {"uniform", "first_last_8", "lipschitz"}
    assert all(p.bops <= w4a4 * (1 + 1e-9) for p in front.points)
    assert all(0 <= p.robust_accuracy <= p.clean_accuracy <= 1 for p in front.points)
    assert front.val_images == 24 and 0 <= front.float_robust_accuracy <= front.float_clean_accuracy
    fl8 = [p for p in front.points if p.method == "first_last_8"]
    assert fl8 and all(p.layers["conv1"].startswith("8b") and p.layers["fc2"].startswith("8b") for p in fl8)
    front.save(tmp_path / "f.json")
    back = ParetoFront.load(tmp_path / "f.json")
    assert back.points == front.points and "| bops=" in back.table()
    with pytest.raises(ConfigError, match="unknown Pareto method 'hawq'"):
        search_pareto(cnn, (x[:8], y[:8]), (x[8:16], y[8:16]), methods=["hawq"])


def test_measured_top_k_measures_the_knapsacks_next_best_solutions(cnn, fmnist_val_512):
    """LipschitzSettings.measured_top_k: the sweep measures the knapsack's k best distinct policies
    for ours (ranks 0..k-1, all within the budget), best_at keeps the most robust of them and
    best_at(max_rank=0) the optimum alone; the other methods still get one policy per budget."""
    x, y = fmnist_val_512
    geometry = layer_geometry(cnn, x[:1])
    w3a3 = cost_of({n: LayerSpec(3, act_bit_width=3) for n in geometry}, geometry).bops
    cfg = SearchConfig(candidates=with_act_bits(FEW, (2, 4, 8)), val_images=16, pgd_steps=2)
    cfg = cfg.replace(steps=2, measured_top_k=3)
    front = search_pareto(
        cnn, (x[:48], y[:48]), (x[48:], y[48:]), budgets=[f"bops={w3a3}"],
        methods=["ans", "lipschitz"], config=cfg, progress=False,
    )  # fmt: skip
    ours = [p for p in front.points if p.method == "lipschitz"]
    assert sorted(p.rank for p in ours) == [0, 1, 2]
    assert len({tuple(sorted(p.layers.items())) for p in ours}) == 3  # distinct policies
    assert all(p.bops <= w3a3 * (1 + 1e-9) for p in ours)
    assert [p.rank for p in front.points if p.method == "ans"] == [0]
    budget = front.budgets[0]
    assert front.best_at("lipschitz", budget).robust_accuracy == max(p.robust_accuracy for p in ours)
    assert front.best_at("lipschitz", budget, max_rank=0).rank == 0
    with pytest.raises(ConfigError, match="measured_top_k"):
        SearchConfig().replace(measured_top_k=0)


def test_search_policy_keeps_the_most_robust_of_the_measured_top_k(cnn, fmnist_val_512, tmp_path):
    """With measured_top_k=3 the held-out check measures two more policies (the knapsack's next-best
    ones; each a file in the measurement cache) and keeps the most robust of all."""
    x, y = fmnist_val_512
    counts, results = [], []
    for k in (1, 3):
        cfg = SearchConfig(candidates=FEW, val_images=16, pgd_steps=2).replace(steps=2, measured_top_k=k)
        results.append(search_policy(
            cnn, (x[:48], y[:48]), Budget(avg_weight_bits=3), config=cfg, val_data=(x[48:], y[48:]),
            cache_dir=tmp_path / f"k{k}",
        ))  # fmt: skip
        counts.append(len(list((tmp_path / f"k{k}").glob("*.json"))))
    assert counts[1] == counts[0] + 2
    res = results[1]
    assert res.winner in ("search", "search-rank-1", "search-rank-2", "uniform")
    assert res.cost.avg_weight_bits <= 3 + 1e-9
