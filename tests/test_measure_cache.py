"""Measure once (aq_brevitas.evaluate.cache) and spread over torchrun ranks (aq_brevitas.workers):
the cache's key, a Pareto sweep killed with kill -9 resuming without re-measuring, and 2 gloo ranks
giving the bytes 1 process gives."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aq_brevitas.evaluate import cache as cache_module
from aq_brevitas.evaluate import suite as suite_module
from aq_brevitas.evaluate.cache import MeasureCache, data_digest, measurement_key, model_digest
from aq_brevitas.models import load_float_model
from aq_brevitas.policy import LayerSpec
from aq_brevitas.search.baselines import measure_policy

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "pareto_worker.py"


@pytest.fixture
def counted(monkeypatch):
    """How many times the attack suite ran (each measurement runs it once)."""
    calls = []
    real = suite_module.suite_chain

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(suite_module, "suite_chain", counting)
    return calls


def test_the_key_changes_with_everything_that_decides_the_answer(monkeypatch):
    a, b = torch.zeros(3), torch.zeros(3)
    assert data_digest(a) == data_digest(b) and data_digest(a) != data_digest(a.double())
    b[1] = 1e-30
    assert data_digest(a) != data_digest(b)
    model = load_float_model("cnn-pgd")[0]
    other = load_float_model("cnn-pgd")[0]
    assert model_digest(model) == model_digest(other)
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-6
    assert model_digest(model) != model_digest(other)
    base = {"model": "m", "policy": {"default": "w4"}, "eps": 0.1, "suite": {"steps": 25}}
    key = measurement_key(base)
    for part, value in [("policy", {"default": "w2"}), ("eps", 0.2), ("suite", {"steps": 26})]:
        assert measurement_key({**base, part: value}) != key, part
    monkeypatch.setattr(cache_module, "MEASUREMENT_VERSION", cache_module.MEASUREMENT_VERSION + 1)
    assert measurement_key(base) != key  # a new measuring code misses every old entry


def test_a_cached_measurement_is_the_measured_one_and_runs_once(tmp_path, counted, fmnist_val_512):
    model = load_float_model("cnn-pgd")[0]
    x, y = fmnist_val_512
    specs = {n: LayerSpec(4, act_bit_width=4) for n in ("conv1", "conv2", "fc1", "fc2")}
    val, args = (x[:8], y[:8]), {"eps": 0.1, "steps": 1, "seed": 0}
    fresh = measure_policy(model, specs, val, x[8:40], **args)
    first = measure_policy(model, specs, val, x[8:40], cache_dir=tmp_path, **args)
    again = measure_policy(model, specs, val, x[8:40], cache_dir=tmp_path, **args)
    assert (fresh.clean, fresh.robust) == (first.clean, first.robust) == (again.clean, again.robust)
    assert torch.equal(first.examples.images, again.examples.images)
    assert len(counted) == 2  # the third call read the file
    assert len(list(tmp_path.glob("*.json"))) == 1
    measure_policy(model, specs, val, x[8:41], cache_dir=tmp_path, **args)  # other calibration images
    measure_policy(model, specs, val, x[8:40], cache_dir=tmp_path, **{**args, "seed": 1})
    assert len(counted) == 4 and len(list(tmp_path.glob("*.json"))) == 3
    (next(tmp_path.glob("*.json"))).write_text("{half a fi")  # a foreign, broken file misses
    assert MeasureCache(tmp_path).get(next(tmp_path.glob("*.json")).stem) is None


def test_a_sweep_killed_with_kill_9_resumes_without_re_measuring(tmp_path, counted):
    """The sweep runs in a subprocess pausing 2 s after each measured policy; it is killed with
    SIGKILL once two are on disk; the rerun here measures only the rest, and its front is the one an
    uninterrupted sweep gives."""
    sys.path.insert(0, str(REPO / "tests"))
    from pareto_worker import front_json, sweep

    cache = tmp_path / "cache"
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(tmp_path / "killed.json"), str(cache), "--pause", "2"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while len(list(cache.glob("*.json"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    done = len(list(cache.glob("*.json")))
    assert not (tmp_path / "killed.json").exists() and done >= 2
    resumed = sweep(cache)
    total = 1 + len(
        {json.dumps(p.layers, sort_keys=True) for p in resumed.points}
    )  # float + distinct policies
    assert done < total and len(counted) == total - done
    assert len(list(cache.glob("*.json"))) == total and not list(cache.glob(".*.tmp"))
    assert front_json(resumed) == front_json(sweep())  # the uninterrupted, uncached sweep's bytes


def test_two_gloo_ranks_give_the_bytes_of_one_process(tmp_path):
    """torchrun --nproc_per_node=2: the policies are split over the ranks (each measured once: one
    cache file each) and gathered; rank 0's front is byte for byte the 1-process front."""
    sys.path.insert(0, str(REPO / "tests"))
    from pareto_worker import front_json, sweep
    from test_finetune import _free_port

    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.Popen(
        [torchrun, "--nproc_per_node=2", f"--master_port={_free_port()}", str(WORKER),
         str(tmp_path / "two.json"), str(tmp_path / "cache")],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        one = front_json(sweep())  # 1 process, no cache, here while the ranks run
    finally:
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert (tmp_path / "two.json").read_text(encoding="utf-8") == one
    files = list((tmp_path / "cache").glob("*.json"))
    assert len(files) == 1 + len({json.dumps(p["layers"], sort_keys=True) for p in json.loads(one)["points"]})
