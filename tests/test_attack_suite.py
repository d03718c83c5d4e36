"""The attack suite, the per-image worst case and the attack-failure indicators (issue 16), on real
Fashion-MNIST images: each indicator fires on a model built to trip it and stays quiet on a normal one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aq_brevitas.config import EvalConfig
from aq_brevitas.data import load_split
from aq_brevitas.evaluate import report as rep_module
from aq_brevitas.evaluate.indicators import (
    INDICATORS,
    input_gradient_check,
    noise_stability_check,
    optimisation_check,
)
from aq_brevitas.evaluate.report import AttackResult, RobustnessReport, pack_mask, unpack_mask
from aq_brevitas.evaluate.robustness import evaluate_robustness
from aq_brevitas.evaluate.suite import ChainSettings, run_chain, suite_accuracies
from aq_brevitas.models import load_float_model

TINY = EvalConfig(
    eps=(0.1,), attacks=("clean", "pgd"), pgd_steps=3, gradient_free=False, large_eps_images=30, suite_steps=10,
    suite_queries=30,
)  # fmt: skip


class InputRounding(nn.Module):
    """Rounds its input to 5 levels: zero input gradient everywhere (masks gradients)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * 4) / 4)


class NoisyLogits(nn.Module):
    """Adds large random noise to its logits: predictions change from call to call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out + 3 * out.std() * torch.randn_like(out)


class GradTrap(nn.Module):
    """Wrong whenever autograd is on (inside a gradient attack), right otherwise: the attack
    sees adversarial points that are not adversarial when its result is classified."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return -out if torch.is_grad_enabled() else out


class Drift(nn.Module):
    """Lowers its top logit faster and faster, call after call: an attack's margin keeps falling to the end."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.model(x)
        return out - 0.01 * self.calls**2 * nn.functional.one_hot(out.argmax(1), out.shape[1])


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    return load_float_model("cnn-pgd")[0].eval()


@pytest.fixture(scope="module")
def data():
    x, y = load_split("test", limit=60, seed=0)
    return x, y


def failed(report: RobustnessReport) -> set[str]:
    return {c.name for c in report.checks if c.passed is False}


def test_worst_case_is_per_image():
    """Two attacks each breaking a different image: the worst case loses both."""
    rows = [
        AttackResult("clean", 0.0, 1.0, 4, 0.0, correct=pack_mask([1, 1, 1, 1])),
        AttackResult("pgd", 0.1, 0.75, 4, 0.0, correct=pack_mask([0, 1, 1, 1])),
        AttackResult("apgd-ce", 0.1, 0.75, 4, 0.0, correct=pack_mask([1, 0, 1, 1]), chain="suite"),
        AttackResult("square", 0.1, 0.5, 2, 0.0, correct=pack_mask([1, 1, 1, 0])),  # a subset of 2 images
        AttackResult("pgd", 0.2, 0.5, 4, 0.0, correct=pack_mask([0, 0, 1, 1])),
    ]
    report = RobustnessReport("m", 4, 1.0, rows)
    assert report.robust_accuracy(0.1) == 0.25 and report.per_image(0.1) == [False, False, True, False]
    assert report.robust_accuracy(0.2) == 0.5 and report.eps_values == [0.1, 0.2]
    assert unpack_mask(pack_mask([True] * 9 + [False]), 10) == [True] * 9 + [False]
    assert "**25.0%** at ε=0.1" in report.to_markdown()
    with pytest.raises(rep_module.ConfigError):
        report.robust_accuracy(0.3)


def test_old_report_without_per_image_outcomes_loads_with_a_note(cnn, data):
    rep = evaluate_robustness(cnn, data, TINY.replace(indicators=False), progress=False)
    old = rep.to_dict()
    old["schema"] = "aq-brevitas/robustness/v1"
    for r in old["results"]:
        del r["correct"], r["chain"]
    back = RobustnessReport.from_dict(old)
    assert rep_module.NO_PER_IMAGE_NOTE in back.notes and back.per_image(0.1) is None
    on_all = [r.accuracy for r in rep.results if r.eps == 0.1 and r.images == rep.images]
    assert back.robust_accuracy(0.1) == min(on_all) >= rep.robust_accuracy(0.1)
    worst = [
        all(b) for b in zip(*[unpack_mask(r.correct, rep.images) for r in rep.results if r.eps in (0, 0.1)])
    ]
    assert (
        rep.robust_accuracy(0.1) == sum(worst) / rep.images
    )  # an image broken by any attack counts as broken


def test_suite_only_attacks_what_is_left_and_never_raises_accuracy(cnn, data):
    x, y = data
    kw = dict(eps=0.1, settings=ChainSettings(10, 30), pgd_steps=5, surrogate=cnn)
    acc = suite_accuracies(cnn, x, y, suite="fast", **kw)
    values = list(acc.values())
    assert list(acc) == ["clean", "pgd", "apgd-ce", "apgd-dlr", "apgd-t3", "transfer", "square", "worst case"]
    adaptive = suite_accuracies(cnn, x, y, suite="adaptive", **kw)
    assert list(adaptive) == list(acc) and adaptive["worst case"] <= adaptive["pgd"]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    chain = run_chain(cnn, x, y, 0.1, ["apgd-ce", "apgd-dlr"], settings=ChainSettings(steps=10))
    assert chain[1].attacked == int(chain[0].survived.sum()) and chain[0].attacked == len(x)


def test_zero_gradient_unconstrained_and_white_box_indicators(cnn, data):
    """Input rounding masks gradients: no input gradient, ε = 1 does not reach 0, and transfer from the
    unrounded model beats the white-box attacks."""
    masked = evaluate_robustness(InputRounding(cnn), data, TINY, surrogate=cnn, progress=False)
    assert {"input_gradient_nonzero", "unconstrained_reaches_zero", "white_box_strongest"} <= failed(masked)
    assert "⚠️ `white_box_strongest`" in masked.to_markdown() and masked.warnings


def test_indicators_quiet_on_a_normal_model(cnn, data):
    normal = evaluate_robustness(cnn, data, TINY, surrogate=cnn, progress=False)
    names = [c.name for c in normal.checks]
    assert names[-6:] == list(INDICATORS)
    assert not failed(normal), normal.to_markdown()


def test_silent_success_is_caught(cnn, data):
    trap = evaluate_robustness(GradTrap(cnn), data, TINY.replace(suite=("apgd-ce",)), progress=False)
    check = trap.check("no_silent_success")
    assert check.passed is False and "counted robust" in check.detail


def test_noise_and_gradient_indicators_directly(cnn, data):
    x, y = data
    torch.manual_seed(0)
    assert noise_stability_check(NoisyLogits(cnn), x, amplitude=0.005, batch_size=100, seed=0).passed is False
    assert noise_stability_check(cnn, x, amplitude=0.005, batch_size=100, seed=0).passed is True
    assert input_gradient_check(cnn, x, y, batch_size=100).passed is True
    assert input_gradient_check(InputRounding(cnn), x, y, batch_size=100).passed is False


def test_incomplete_optimisation_is_caught(cnn, data):
    x, y = data
    (drift,) = run_chain(Drift(cnn), x, y, 0.1, ["apgd-ce"], settings=ChainSettings(steps=20))
    (normal,) = run_chain(cnn, x, y, 0.1, ["apgd-ce"], settings=ChainSettings(steps=20))
    assert optimisation_check({0.1: ("apgd-ce", drift.trace)}).passed is False
    assert optimisation_check({0.1: ("apgd-ce", normal.trace)}).passed is True


# --- the adaptive schedule, on tiny synthetic inputs: a 2-class model whose margin is x0 - x1, and
# fake attacks that push every image they get by a set share of ε towards the other class


def _margins(n: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """n images of 1×1×2 pixels, label 0, margins (x0 - x1) spread evenly over (0, 0.4)."""
    m = torch.linspace(0.001, 0.4, n)
    x = torch.stack([0.5 + m / 2, 0.5 - m / 2], 1).reshape(n, 1, 1, 2)
    return x, torch.zeros(n, dtype=torch.long)


def _fake_builder(push: dict[str, float], calls: dict[str, list[torch.Tensor]], peek: bool = False):
    """A stand-in for suite._builder: attack ``name`` moves each image ``push[name]``·ε along (-1, +1)
    and records the margins of the images it was given; ``peek``: apgd-ce also looks at a broken point
    (as its own forward) but returns the image unchanged: a silent success."""

    def builder(name, model, eps, **kw):
        def attack(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            calls.setdefault(name, []).append((xb[:, 0, 0, 0] - xb[:, 0, 0, 1]).clone())
            step = torch.tensor([-1.0, 1.0]).reshape(1, 1, 1, 2)
            if peek and name == "apgd-ce":
                with torch.enable_grad():
                    model(xb + eps * step)
                return xb
            return (xb + push[name] * eps * step).clamp(0, 1)

        return attack

    return builder


def _linear() -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(2))
    return model.eval()


def _chain(monkeypatch, push, schedule, seed=0, peek=False):
    from aq_brevitas.evaluate import suite

    calls: dict[str, list[torch.Tensor]] = {}
    monkeypatch.setattr(suite, "_builder", _fake_builder(push, calls, peek))
    x, y = _margins()
    settings = ChainSettings(steps=8, queries=10, seed=seed, schedule=schedule)
    chain = run_chain(_linear(), x, y, 0.1, ["apgd-ce", "square"], settings=settings)
    return chain, {k: torch.cat(v) for k, v in calls.items()}


SAMPLED = dict(sampled=("square",), sample=20)


def test_schedule_escalates_to_all_survivors_when_the_sample_breaks_an_image(monkeypatch):
    from aq_brevitas.evaluate.suite import Schedule

    # apgd-ce (0.5 ε each way: margins < 0.1 fall) leaves 75 images; square (1 ε: < 0.2) breaks 25 more
    plain, _ = _chain(monkeypatch, {"apgd-ce": 0.5, "square": 1.0}, None)
    chain, calls = _chain(monkeypatch, {"apgd-ce": 0.5, "square": 1.0}, Schedule(**SAMPLED))
    assert int(chain[0].survived.sum()) == 75
    assert torch.equal(chain[-1].survived, plain[-1].survived) and int(chain[-1].survived.sum()) == 50
    assert len(calls["square"]) == 75  # the sample of 20, then the other 55
    (note,) = chain[-1].notes
    assert "ran on all 75 images" in note and "random sample of 20" in note


def test_schedule_notes_what_it_skipped_and_what_that_could_miss(monkeypatch):
    from aq_brevitas.evaluate.suite import Schedule

    # square no stronger than apgd-ce: its sample breaks nothing, the other 55 survivors are skipped
    chain, calls = _chain(monkeypatch, {"apgd-ce": 0.5, "square": 0.5}, Schedule(**SAMPLED))
    assert len(calls["square"]) == 20 and int(chain[-1].survived.sum()) == 75
    assert chain[-1].attacked == 75 and chain[0].notes == ()
    (note,) = chain[-1].notes
    assert "skipped on the other 55" in note and "at most 9" in note and "9.0 points" in note


def test_schedule_equals_a_plain_chain_when_nothing_is_skipped(monkeypatch):
    from aq_brevitas.evaluate.suite import Schedule

    push = {"apgd-ce": 0.5, "square": 1.0}
    plain, plain_calls = _chain(monkeypatch, push, None)
    for schedule in (Schedule(), Schedule(sampled=("square",), sample=100)):
        chain, calls = _chain(monkeypatch, push, schedule)
        assert [torch.equal(a.survived, b.survived) for a, b in zip(chain, plain, strict=True)] == [
            True,
            True,
        ]
        assert torch.equal(calls["square"], plain_calls["square"]) and chain[-1].notes == ()


def test_schedule_sample_is_deterministic_with_a_seed(monkeypatch):
    from aq_brevitas.evaluate.suite import Schedule

    push = {"apgd-ce": 0.5, "square": 0.5}
    runs = [_chain(monkeypatch, push, Schedule(**SAMPLED), seed=s)[1]["square"] for s in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_schedule_escalates_when_the_indicators_fire(monkeypatch):
    from aq_brevitas.evaluate.suite import Schedule

    # apgd-ce sees broken points it does not return (silent success): square must run on everyone
    chain, calls = _chain(monkeypatch, {"apgd-ce": 0.0, "square": 0.5}, Schedule(**SAMPLED), peek=True)
    assert len(calls["square"]) == 100 and int(chain[-1].survived.sum()) == 75
    (note,) = chain[-1].notes
    assert note.startswith("square ran on all 100 images still standing: no_silent_success")


def test_schedule_shares_the_steps():
    from aq_brevitas.evaluate.suite import SCHEDULES, Schedule, _Chain

    names = ("apgd-ce", "apgd-dlr", "apgd-t3", "square", "transfer")
    for schedule, used in (
        (SCHEDULES["adaptive"], [100, 100, 25, 500, None]),
        (Schedule(step_share=(("apgd-ce", 0.5), ("apgd-t3", 0.5))), [50, 100, 12, 500, None]),
    ):
        run = _Chain(_linear(), *_margins(4), 0.1, None, ChainSettings(100, 500, schedule=schedule), None)
        assert [run.used(a) for a in names] == used


def test_schedule_focus_runs_on_the_smallest_margins(monkeypatch):
    from aq_brevitas.evaluate.suite import Schedule

    # after apgd-ce the 75 survivors' margins are 0..0.3; square (1 ε) breaks the 25 below 0.1: its
    # focus (a third, the smallest margins) holds exactly those, its sample of 10 of the others none
    schedule = Schedule(sampled=("square",), sample=10, focus=(("square", 0.34),))
    chain, calls = _chain(monkeypatch, {"apgd-ce": 0.5, "square": 1.0}, schedule)
    assert len(calls["square"]) == 35 and int(chain[-1].survived.sum()) == 50
    assert calls["square"].sort().values[24] < 0.2 <= calls["square"].sort().values[25]
    (note,) = chain[-1].notes
    assert "the 25 with the smallest margin" in note and "skipped on the other 40" in note


def test_report_states_what_the_adaptive_schedule_skipped(cnn, data):
    # tiny budgets: the point is the wiring, the schedule's sentence and its run-time notes in the report
    cfg = TINY.replace(suite="adaptive", suite_queries=10)
    rep = evaluate_robustness(cnn, data, cfg, surrogate=cnn, progress=False)
    assert any(
        n.startswith("attack suite adaptive's schedule: apgd-dlr always on the 0.15") for n in rep.notes
    )
    suite_notes = [n for n in rep.notes if n.startswith("suite at ε=0.1: ")]
    assert suite_notes and all(("ran on all" in n) or ("skipped on the other" in n) for n in suite_notes)
    fast = evaluate_robustness(
        cnn, data, TINY.replace(suite="fast", suite_queries=10), surrogate=cnn, progress=False
    )
    assert not any("schedule" in n or n.startswith("suite at") for n in fast.notes)
