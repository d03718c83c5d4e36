"""The Pareto benchmark: verdicts recomputed from the run files alone (benchmarks/pareto_verdict.py), and
the lock files that let several processes share its measurements (benchmarks/pareto.py)."""

import json
import math
import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture()
def verdict(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import pareto_verdict

    yield pareto_verdict
    sys.modules.pop("pareto_verdict", None)


def test_a_lock_is_held_once_and_a_dead_owners_lock_is_taken_over(monkeypatch, tmp_path):
    import subprocess

    monkeypatch.syspath_prepend(str(BENCH))
    from pareto import claim

    lock = tmp_path / "locks" / "key"
    assert claim(lock) and lock.read_text() == str(os.getpid())
    assert not claim(lock)  # held by a live process (this one)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock.write_text(str(gone.pid))  # its owner has exited: a killed run
    assert claim(lock) and lock.read_text() == str(os.getpid())


def _run(seed, robust, split="test", stage="ptq", float_robust=0.70):
    """One run: ``robust`` maps (method, budget) to robust accuracy, or None for an infeasible method."""
    budgets = sorted({b for _, b in robust})
    points = [
        {"method": m, "budget": b, "feasible": r is not None, "robust_accuracy": r, "clean_accuracy": r,
         "policy": {}}
        for (m, b), r in robust.items()
    ]  # fmt: skip
    return {"model": "cnn-pgd", "seed": seed, "split": split, "test_images": 1000, "stage": stage,
            "float_clean_accuracy": 0.8, "float_robust_accuracy": float_robust, "budgets": budgets,
            "points": points}  # fmt: skip


def _both(ours_low, ours_high, uni_low=0.40, uni_high=0.69, rivals=0.5):
    return {("uniform", "b1"): uni_low, ("uniform", "b2"): uni_high, ("lipschitz+check", "b1"): ours_low,
            ("lipschitz+check", "b2"): ours_high, ("hessian", "b1"): rivals, ("hessian", "b2"): rivals,
            ("ans", "b1"): None, ("ans", "b2"): rivals}  # fmt: skip


def test_targets_met_when_ours_clears_uniform_by_three_points_where_uniform_loses_five(verdict):
    runs = [_run(0, _both(0.50, 0.69)), _run(1, _both(0.52, 0.70))]
    v = verdict.verdicts(runs)
    assert v["cells"] == 2
    assert v["vs_uniform"]["met"] and v["gap"]["met"] and v["rivals"]["met"]
    assert v["gap"]["of"] == 1  # b2: uniform is within 5 points of float, so only b1 is such a cell


def test_a_small_gain_where_uniform_loses_badly_misses_the_margin_target(verdict):
    runs = [_run(0, _both(0.41, 0.69)), _run(1, _both(0.42, 0.69))]
    v = verdict.verdicts(runs)
    assert v["vs_uniform"]["met"] and not v["gap"]["met"]
    ((model, budget, (mean, se)),) = v["gap"]["misses"]
    assert (model, budget) == ("cnn-pgd", "b1")
    assert math.isclose(mean, 1.5) and math.isclose(se, 0.5)  # +1 and +2 points over two seeds


def test_losing_to_a_rival_at_most_budgets_misses_and_infeasible_methods_are_left_out(verdict):
    runs = [_run(0, _both(0.45, 0.58, rivals=0.60))]
    v = verdict.verdicts(runs)
    assert not v["rivals"]["met"] and v["rivals"]["won"] == 0 and v["rivals"]["of"] == 2
    c = verdict.cell(runs, "b1")
    assert c["ans"] == [] and math.isclose(c["ours-rivals"][0], 0.45 - 0.60)  # ANS does not fit b1


def test_heldout_runs_and_unmeasured_points_are_never_judged(verdict, tmp_path):
    pending = _run(0, _both(0.5, 0.5))
    for p in pending["points"]:
        p["robust_accuracy"] = None  # feasible, not measured yet
    runs = [_run(0, _both(0.1, 0.1), split="heldout"), pending]
    (tmp_path / "pareto_x.json").write_text(json.dumps({"runs": runs}))
    loaded = verdict.load_runs(tmp_path)
    assert len(loaded) == 2
    assert verdict.verdicts(loaded)["cells"] == 0
    page = "\n".join(verdict.render_section(loaded))
    assert "Runs complete" in page and "10.0" not in page  # the held-out 10 % figure is not on the page


def test_a_run_is_complete_only_when_every_row_is_measured_or_infeasible_at_every_budget(verdict):
    full = {(m, b): 0.5 for m in verdict.METHODS for b in ("b1", "b2")}
    full[("first_last_8", "b1")] = None  # infeasible there: nothing to measure
    run = _run(0, full)
    assert verdict.complete(run)
    run["points"][3]["robust_accuracy"] = None  # feasible, not measured yet
    assert not verdict.complete(run)
    assert not verdict.complete(_run(0, _both(0.5, 0.6)))  # rows missing
    page = "\n".join(verdict.render_section([_run(0, full)]))
    assert "**Provisional**: 1 of the 12" in page
