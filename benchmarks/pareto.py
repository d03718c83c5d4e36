"""Robust accuracy per BOPs on the TEST split: every method at every budget, 3 seeds (issue 25).

Per zoo model and seed (the seed draws the calibration and held-out images and the attacks' noise;
the model and the test images stay the same):

1. ``search_pareto`` selects each method's best policy per budget on held-out *training* images
   (calibration 256, --val-images held-out) -- uniform (w, a), first/last-8, Hessian, ANS and ours
   (its knapsack's 4 best policies measured), on one candidate table, one solver and one held-out set;
   the rows of :data:`ROWS` pick among them on those held-out images. The front is saved under
   ``results/heldout_fronts/``, so its policies are fixed once chosen.
2. Each chosen policy is quantized (PTQ, calibrated on the seed's calibration images) and measured on
   --test-images TEST images: robust accuracy is the per-image worst case of PGD-20 and the default
   attack suite (``suite="fast"``: APGD-CE, APGD-DLR, APGD-T, transfer from the float model, Square,
   at the report's 100 iterations / 500 queries), never PGD alone.
3. At the BOPs of uniform w3a3 every method's policy is also fine-tuned (PGD-7, one pass over
   --finetune-images training images drawn by the seed) and measured the same way.

Every test measurement is kept in ``results/pareto_cache/`` (a MeasureCache folder, committed: small
JSON files), so a killed run resumes and ``make bench`` re-renders the page without attacking
anything; the held-out measurements stay in ``results/cache/heldout`` (not committed; the saved
fronts make them unneeded). Several processes may run the same command at once: each claims a
measurement by a lock file before it starts it (``results/cache/locks``), so they share the work. Each (model, seed) is
written to ``results/pareto_<model>_seed<seed>.json`` as its points come in (see
:mod:`pareto_verdict` for the schema and the verdicts).

    python benchmarks/pareto.py [--models cnn-pgd ...] [--seeds 0 1 2] [--test-images 1000]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from aq_brevitas.search.pareto import DEFAULT_SWEEP
from common import header, selection_split

HERE = Path(__file__).parent
RESULTS = HERE / "results"
MODELS = ("cnn-pgd", "tfc-pgd", "vgg-pgd", "resnet-pgd")
METHODS = ("uniform", "first_last_8", "hessian", "ans", "lipschitz")
TOP_K = 4  # LipschitzSettings.measured_top_k of the sweep: our knapsack's 4 best policies are measured
# Each row of the results: the (method, max knapsack rank) whose held-out points compete for it, the
# most robust on the held-out images kept (never judged on test; ties keep the earlier). The rivals
# are one policy per budget as published; "lipschitz" is our knapsack's optimum alone,
# "lipschitz+check" what search_policy delivers by default (that or the best uniform policy,
# docs/method.md "Never worse than uniform"), "-top4" the variant measuring the knapsack's 4 best,
# "combined" every method's policies competing.
ROWS: dict[str, tuple[tuple[str, int | None], ...]] = {
    **{m: ((m, 0),) for m in METHODS},
    "lipschitz+check": (("lipschitz", 0), ("uniform", 0)),
    "lipschitz-top4": (("lipschitz", None),),
    "lipschitz-top4+check": (("lipschitz", None), ("uniform", 0)),
    "combined": (("lipschitz", None), *((m, 0) for m in METHODS[:-1])),
}
FINETUNE_BUDGET = 1  # the sweep's second budget: the BOPs of uniform w3a3
TEST_DRAW = 0  # one seeded draw of the test split for every seed: the seeds vary the method, not the exam
PGD_STEPS = 20


def claim(lock: Path) -> bool:
    """Whether this process now holds ``lock`` (created with our pid); a lock whose process is gone is
    taken over, so a killed run never blocks the next one."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(lock.read_text() or "0"), 0)
            return False  # its owner is alive
        except PermissionError:
            return False  # alive, another user's
        except (OSError, ValueError):
            lock.unlink(missing_ok=True)
            return claim(lock)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


class Unit:
    """One (model, seed): its held-out front, its data and its test measurements."""

    def __init__(self, name: str, seed: int, args: argparse.Namespace) -> None:
        from aq_brevitas import load_float_model, load_split
        from aq_brevitas.evaluate.cache import MeasureCache, data_digest, model_digest
        from aq_brevitas.workers import resolve_device

        self.name, self.seed, self.args = name, seed, args
        self.model = load_float_model(name)[0].eval()
        self.calib, self.val = selection_split(seed, 256, args.val_images)
        self.test = load_split("test", limit=args.test_images, seed=TEST_DRAW)[:2]
        self.cache = MeasureCache(Path(args.results_dir) / "pareto_cache")
        self.locks = Path(args.results_dir) / "cache" / "locks"
        self.digests = {"model": model_digest(self.model), "evaluation": data_digest(*self.test),
                        "calibration": data_digest(self.calib[0])}  # fmt: skip
        self.device = resolve_device(args.device, self.model)
        self.front_path = Path(args.results_dir) / "heldout_fronts" / f"{name}_seed{seed}.json"

    def front(self):
        """The saved held-out front, or a new search when this process can claim it (else None)."""
        from aq_brevitas.search import ParetoFront, SearchConfig, search_pareto

        if self.front_path.is_file():
            return ParetoFront.load(self.front_path)
        lock = self.locks / f"front_{self.name}_seed{self.seed}"
        if not claim(lock):
            return None
        try:
            config = SearchConfig(seed=self.seed, val_images=self.args.val_images).replace(
                measured_top_k=TOP_K
            )
            cache = Path(self.args.results_dir) / "cache" / "heldout"
            front = search_pareto(self.model, self.calib, self.val, config=config, cache_dir=cache)
            self.front_path.parent.mkdir(parents=True, exist_ok=True)
            front.save(self.front_path)
            return front
        finally:
            lock.unlink(missing_ok=True)

    def key(self, policy: dict | None, stage: str) -> str:
        from aq_brevitas.evaluate.cache import measurement_key
        from aq_brevitas.evaluate.suite import ChainSettings

        # the same layers from two methods are one measurement: the meta (which method) is left out
        layers = None if policy is None else {k: v for k, v in policy.items() if k != "meta"}
        return measurement_key({
            "benchmark": "pareto-test", **self.digests, "policy": layers, "eps": self.args.eps,
            "suite": "fast", "settings": asdict(ChainSettings(seed=self.seed)), "pgd_steps": PGD_STEPS,
            "stage": stage, "finetune": self.finetune_settings() if stage == "finetuned" else None,
            # a GPU's arithmetic differs from the CPU's: its measurements are its own
            **({"device": self.device.type} if self.device.type != "cpu" else {}),
        })  # fmt: skip

    def finetune_settings(self) -> dict[str, Any]:
        return {"images": self.args.finetune_images, "steps": 7, "epochs": 1, "seed": self.seed}

    def measure(self, policy: dict | None, stage: str) -> dict[str, float] | None:
        """The test measurement of ``policy`` (None: the float model) at ``stage``: from the cache, or
        measured now when this process claims it, or None when another process is measuring it."""
        key = self.key(policy, stage)
        found = self.cache.get(key)
        if found is not None:
            return found
        lock = self.locks / key
        if not claim(lock):
            return None
        try:
            about = {"model": self.name, "seed": self.seed, "stage": stage, "policy": policy}
            return self.cache.get_or_measure(key, lambda: self._measure(policy, stage), about)
        finally:
            lock.unlink(missing_ok=True)

    def _measure(self, policy: dict | None, stage: str) -> dict[str, float]:
        from aq_brevitas import LayerwisePolicy, TrainConfig, adversarial_finetune, load_split, quantize
        from aq_brevitas.evaluate.suite import ChainSettings, suite_accuracies
        from aq_brevitas.workers import on_device

        t0 = time.perf_counter()
        q = self.model
        if policy is not None:
            q = quantize(self.model, LayerwisePolicy.from_dict(policy), calibration_data=self.calib[0])
        surrogate = None if policy is None else self.model
        with on_device([q, surrogate], self.args.device):
            if stage == "finetuned":
                ft = self.finetune_settings()
                data = load_split("train", limit=ft["images"], seed=self.seed)[:2]
                cfg = TrainConfig.finetuning(
                    eps=self.args.eps, steps=ft["steps"], epochs=ft["epochs"], seed=self.seed
                )
                adversarial_finetune(q, data, cfg, progress=False)
            acc = suite_accuracies(
                q.eval(), *self.test, eps=self.args.eps, suite="fast", pgd_steps=PGD_STEPS,
                surrogate=surrogate, settings=ChainSettings(seed=self.seed),
            )  # fmt: skip
        return {"clean": acc["clean"], "pgd": acc["pgd"], "robust": acc["worst case"],
                "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip


def pick(front, row: str, budget: str):
    """The point of ``row`` (:data:`ROWS`) at ``budget``, by held-out robust accuracy; None when no
    policy of its methods fits the budget."""
    points = [p for m, rank in ROWS[row] if (p := front.best_at(m, budget, rank)) is not None]
    return max(points, key=lambda p: p.robust_accuracy, default=None)  # max keeps the first of ties


def _tasks(front) -> Iterator[tuple[str, str, str]]:
    """(stage, budget, method) for every measurement of a unit: PTQ at every budget, then fine-tuned
    at the w3a3 budget."""
    for budget in front.budgets:
        for method in ROWS:
            yield "ptq", budget, method
    for method in ROWS:
        yield "finetuned", front.budgets[FINETUNE_BUDGET], method


def run_unit(unit: Unit, write: Callable[[Unit, Any, dict], None]) -> bool:
    """Measure what is missing of ``unit`` (what this process can claim); whether all of it is done."""
    front = unit.front()
    if front is None:
        return False
    found: dict[str, Any] = {"float": unit.measure(None, "ptq"), "points": dict.fromkeys(_tasks(front))}
    done = found["float"] is not None
    for stage, budget, method in _tasks(front):
        point = pick(front, method, budget)
        got = None if point is None else unit.measure(point.policy, stage)
        found["points"][stage, budget, method] = got
        done &= point is None or got is not None
        write(unit, front, found)
    return done


def unit_runs(unit: Unit, front, found: dict) -> list[dict]:
    """The unit's runs in the results schema (:mod:`pareto_verdict`): one PTQ run, one fine-tuned run."""
    fl = found["float"] or {}
    runs = []
    for stage in ("ptq", "finetuned"):
        points = []
        for (st, budget, method), got in found["points"].items():
            if st != stage:
                continue
            p = pick(front, method, budget)
            points.append({
                "method": method, "budget": budget, "feasible": p is not None,
                "robust_accuracy": None if got is None else got["robust"],
                "clean_accuracy": None if got is None else got["clean"],
                "pgd_accuracy": None if got is None else got["pgd"],
                "policy": None if p is None else p.policy, "layers": None if p is None else p.layers,
                "bops": None if p is None else p.bops, "weight_kib": None if p is None else p.weight_kib,
                "heldout_robust_accuracy": None if p is None else p.robust_accuracy,
                "picked_from": None if p is None else p.method,
                "seconds": None if got is None else got.get("seconds"),
            })  # fmt: skip
        runs.append({
            "model": unit.name, "seed": unit.seed, "split": "test", "test_images": len(unit.test[1]),
            "stage": stage, "eps": unit.args.eps, "float_clean_accuracy": fl.get("clean"),
            "float_robust_accuracy": fl.get("robust"), "budgets": front.budgets,
            "budget_names": [f"w{b}a{b}" for b in DEFAULT_SWEEP],
            "heldout": {"val_images": front.val_images, "float_robust_accuracy": front.float_robust_accuracy,
                        "seconds": front.seconds},
            "points": points,
        })  # fmt: skip
    return runs


def write_unit(unit: Unit, front, found: dict) -> None:
    from aq_brevitas.storage import atomic_write_json

    settings = {
        k: v
        for k, v in vars(unit.args).items()
        if k in ("val_images", "test_images", "finetune_images", "eps")
    }
    atomic_write_json(
        Path(unit.args.results_dir) / f"pareto_{unit.name}_seed{unit.seed}.json",
        {"header": header(), "settings": settings, "runs": unit_runs(unit, front, found)},
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--val-images", type=int, default=200, help="held-out training images per selection")
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--finetune-images", type=int, default=10000)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument(
        "--results-dir",
        default=str(RESULTS),
        help="run files; heldout_fronts/, pareto_cache/ (test measurements) and cache/ inside",
    )
    parser.add_argument("--device", default="cpu", help="where attacks and fine-tuning run: cpu, cuda, auto")
    parser.add_argument(
        "--poll", type=float, default=30.0, help="seconds between passes while others measure"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    units = [Unit(m, s, args) for s in args.seeds for m in args.models]  # seed 0 of every model first
    for unit in units:  # every held-out front first: the variant study (method_variants.py) reads them
        unit.front()
    while True:
        pending = [u for u in units if not run_unit(u, write_unit)]
        if not pending:
            break
        print(
            f"pareto: {len(pending)} unit(s) being measured by other processes; next pass in {args.poll:g} s"
        )
        time.sleep(args.poll)
        units = pending
    from pareto_verdict import load_runs, plot_figures

    default = Path(args.results_dir).resolve() == RESULTS.resolve()
    plot_figures(
        load_runs(args.results_dir), None if default else args.results_dir
    )  # docs/img/ for the real run
    return None  # each (model, seed) wrote its own results/pareto_<model>_seed<seed>.json


if __name__ == "__main__":
    main()
