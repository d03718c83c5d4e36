"""Claim-1 study (run_study / `aq-brevitas study`) on a tiny real subset: table shape and real numbers."""

from __future__ import annotations

import json

import pytest

from aq_brevitas.config import AttackConfig
from aq_brevitas.data import load_split
from aq_brevitas.evaluate.accuracy import accuracy, attack_accuracy
from aq_brevitas.evaluate.study import StudyResult, run_study
from aq_brevitas.models import load_float_model
from conftest import run_cli

N_TEST, BITS = 60, (8, 2)


@pytest.fixture(scope="module")
def study() -> tuple[StudyResult, dict, tuple]:
    models = {name: load_float_model(name)[0] for name in ("cnn-plain", "cnn-pgd")}
    test = load_split("test", limit=N_TEST, seed=0)
    calib = load_split("train", limit=32, seed=0)[0]
    return run_study(models, test, calib, bits=BITS, pgd_steps=3, progress=False), models, test


def test_table_structure(study):
    result, _, _ = study
    assert [(r.model, r.bits) for r in result.rows] == [
        (m, b) for m in ("cnn-plain", "cnn-pgd") for b in (None, *BITS)
    ]
    assert result.settings["test_images"] == N_TEST and result.settings["bits"] == list(BITS)
    lines = result.to_markdown().splitlines()
    assert len(lines) == 2 + len(result.rows) and lines[0].startswith("| model | weight bits |")
    assert "| cnn-pgd | float |" in lines[5] and "| cnn-pgd | 2 |" in lines[-1]
    assert json.loads(json.dumps(result.to_dict()))["rows"][0]["model"] == "cnn-plain"


def test_numbers_are_real_accuracies(study):
    result, models, (x, y) = study
    for r in result.rows:
        for v in (r.clean_acc, r.pgd_acc):
            assert 0 <= v <= 1 and abs(v * N_TEST - round(v * N_TEST)) < 1e-9  # a count of N_TEST images
        base = next(b for b in result.rows if b.model == r.model and b.bits is None)
        assert r.clean_drop == pytest.approx(base.clean_acc - r.clean_acc)
        assert r.pgd_drop == pytest.approx(base.pgd_acc - r.pgd_acc)
    # The float rows are the models' own accuracies, measured independently here.
    for name, model in models.items():
        row = next(r for r in result.rows if r.model == name and r.bits is None)
        assert row.clean_acc == accuracy(model, x, y)
        assert row.pgd_acc == attack_accuracy(model, x, y, AttackConfig("pgd", eps=0.1, steps=3), seed=0)
    by = {(r.model, r.bits): r for r in result.rows}
    for name in models:
        assert abs(by[name, 8].clean_drop) <= 0.05  # 8 bits is near-lossless
        assert by[name, 2].clean_drop > by[name, 8].clean_drop  # ternary weights cost accuracy
    assert by["cnn-pgd", None].pgd_acc > by["cnn-plain", None].pgd_acc + 0.2  # PGD training worked


def test_cli_study_writes_table_json_and_plot(tmp_path):
    out = tmp_path / "s"
    res = run_cli(
        "study", "--models", "cnn-plain", "--bits", "4", "--test-images", "30", "--pgd-steps", "2",
        "--calib-images", "32", "--out", str(out),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads((tmp_path / "s.json").read_text())
    assert [(r["model"], r["bits"]) for r in data["rows"]] == [("cnn-plain", None), ("cnn-plain", 4)]
    assert (tmp_path / "s.md").read_text().strip() in res.stdout
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
