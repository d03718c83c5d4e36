"""Warm starts (issue 23, item 3): one policy's adversarial examples replayed last on the next policy,
as a transfer attack -- inside the ε-ball, judged by the Brevitas forward, cached with the measurement
that found them, and seeded by the sweep's structure, never by which process ran first."""

import torch
from torch import nn

from aq_brevitas.budget import as_budget
from aq_brevitas.evaluate.cache import MeasureCache
from aq_brevitas.evaluate.suite import ChainSettings, run_chain, suite_chain
from aq_brevitas.evaluate.warm import AdvExamples, replay
from aq_brevitas.models import load_float_model
from aq_brevitas.policy import LayerSpec
from aq_brevitas.search import SearchConfig
from aq_brevitas.search.baselines import measure_policy
from aq_brevitas.search.pareto import _Measure

torch.set_num_threads(1)
FAST = ChainSettings(steps=3, queries=10)


def test_a_chains_examples_replayed_on_its_model_break_exactly_what_it_broke(fmnist_val_512):
    model = load_float_model("cnn-pgd")[0].eval()
    x, y = fmnist_val_512[0][:24], fmnist_val_512[1][:24]
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    chain = run_chain(model, x, y, 0.1, ["pgd", "apgd-ce"], alive=clean, settings=FAST)
    found = AdvExamples.empty(tuple(x.shape[1:]))
    for step in chain:
        found = found.merge(step.found.index, step.found.images)
    broken = clean & ~chain[-1].survived
    assert broken.any() and sorted(found.index.tolist()) == broken.nonzero()[:, 0].tolist()
    assert (found.images - x[found.index]).abs().max() <= 0.1 + 1e-6
    after, broke = replay(model, x, y, 0.1, found, clean)
    assert torch.equal(after, chain[-1].survived) and len(broke.index) == int(broken.sum())


def test_a_seed_outside_the_ball_is_projected_before_it_counts():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 1, 1, 1], [-1.0, -1, -1, -1]]))
        model[1].bias.zero_()
    x = torch.full((1, 1, 2, 2), 0.5)
    y = torch.tensor([0])  # class 0 while the pixel sum is positive
    far = AdvExamples(torch.tensor([0]), torch.zeros(1, 1, 2, 2))  # sum 0: a tie would not break it
    alive, broke = replay(model, x, y, 0.1, far, torch.tensor([True]))
    assert alive.tolist() == [True] and len(broke.index) == 0  # projected to 0.4 per pixel: still class 0
    near = AdvExamples(torch.tensor([0]), torch.full((1, 1, 2, 2), -5.0))
    assert replay(model, x, y, 0.5, near, torch.tensor([True]))[0].tolist() == [True]  # clamped to [0, 1]


def test_warm_measurement_is_never_above_cold_and_is_cached_with_its_examples(tmp_path, fmnist_val_512):
    model = load_float_model("cnn-pgd")[0]
    x, y = fmnist_val_512
    val, args = (x[:24], y[:24]), {"eps": 0.1, "steps": 2, "seed": 0}
    seed = measure_policy(model, None, val, x[100:132], **args)
    specs = {n: LayerSpec(2, act_bit_width=2) for n in ("conv1", "conv2", "fc1", "fc2")}
    cold = measure_policy(model, specs, val, x[100:132], cache_dir=tmp_path, **args)
    warm = measure_policy(model, specs, val, x[100:132], cache_dir=tmp_path, warm=seed, **args)
    assert warm.key != cold.key and warm.robust <= cold.robust and cold.warm == 0
    assert len(list(tmp_path.glob("*.json"))) == 2 and len(list(tmp_path.glob("*.adv.pt"))) == 2
    cache = MeasureCache(tmp_path)
    again = cache.get_or_measure_examples(
        warm.key, lambda: (_ for _ in ()).throw(AssertionError("re-measured"))
    )
    assert again[0]["robust"] == warm.robust and torch.equal(again[1].images, warm.examples.images)
    q = load_float_model("cnn-pgd")[0]
    with torch.no_grad():
        q.conv1.weight.mul_(0.9)  # another model than the seed's, broken somewhere else
    names = ("apgd-ce", "square")
    plain, _ = suite_chain(q, *val, 0.1, names, FAST)
    acc, _ = suite_chain(q, *val, 0.1, names, FAST, warm=seed.examples)
    assert list(acc)[-2:] == ["warm", "worst case"]  # the replay runs last, as its own step
    # every attack before it ran exactly as without it; the worst case can only be lower
    assert {k: v for k, v in acc.items() if k not in ("warm", "worst case")} == {
        k: v for k, v in plain.items() if k != "worst case"
    }
    assert acc["worst case"] <= plain["worst case"]


def test_sweep_seeds_come_from_the_sweep_not_from_the_order_of_measurement():
    specs = {b: {"a": LayerSpec(b), "b": LayerSpec(b)} for b in (2, 3, 4)}
    b1, b2 = as_budget("bops=1e6"), as_budget("bops=2e6")
    chosen = [
        ("lipschitz", b1, specs[3]), ("uniform", b2, specs[4]), ("uniform", b1, specs[2]),
        ("hessian", b2, specs[2]), ("first_last_8", b2, specs[3]),
    ]  # fmt: skip
    measure = _Measure(nn.Linear(1, 1), torch.zeros(1), (torch.zeros(1), torch.zeros(1)), SearchConfig())
    waves = measure.waves(chosen)
    key = measure._key
    assert list(waves[0]) == [key(None)]
    assert {k: s for k, (_, s) in waves[1].items()} == {key(specs[4]): key(None), key(specs[2]): key(None)}
    # w3 first chosen by lipschitz at b1: seeded by b1's uniform; hessian's w2 is uniform's b1 policy
    assert {k: s for k, (_, s) in waves[2].items()} == {key(specs[3]): key(specs[2])}
    assert measure.waves(list(reversed(chosen)))[1].keys() == waves[1].keys()
