"""`run`: stage records carry their inputs (changed settings redo), --force starts fine-tuning fresh,
bad settings fail before anything is written, corrupt records or outputs mean redo, not crash.

A one-layer model and a few images keep a whole run to seconds; the zoo CNN run is in test_cli.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil

import pytest
import torch
from torch import nn

import aq_brevitas
from aq_brevitas.errors import AqError, ConfigError, DataError, ModelError, PolicyError
from aq_brevitas.nnutils import quantizable_layers
from aq_brevitas.pipeline.config import STAGES, RunConfig
from aq_brevitas.pipeline.job import RunResult, run
from aq_brevitas.pipeline.report import finn_lines
from aq_brevitas.pipeline.rows import FinnRow, ParityRow, SummaryRow
from aq_brevitas.storage import load_checkpoint, save_checkpoint
from conftest import run_cli

TINY = RunConfig(
    calib_images=16,
    val_images=16,
    finetune_images=32,
    finetune_steps=1,
    test_images=8,
    pgd_steps=1,
    eval_eps=(0.1,),
)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


def _digests(folder) -> dict[str, str]:
    files = (p for p in sorted(folder.rglob("*")) if p.is_file())  # FINN's reports sit in finn*/ folders
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "r"
    return out, run(_model(), out, TINY)


@pytest.fixture
def run_dir(done_run, tmp_path):
    """A private copy of the finished run, so a test may change it."""
    out = tmp_path / "r"
    shutil.copytree(done_run[0], out)
    return out


def test_run_writes_both_exports_and_an_aligned_summary(done_run):
    out, result = done_run
    assert result.skipped == []
    rows = {r.name.split(" ")[0]: r for r in result.rows}
    for key, onnx in (("uniform", "model_uniform.onnx"), ("aq-brevitas", "model.onnx")):
        assert (out / onnx).stat().st_size > 0
        # the library's own bound (tol x output scale), once rounding-boundary flips get PyTorch's codes
        parity = rows[key].parity
        assert parity is not None and 0 <= parity.without_flips <= parity.allowed, rows[key]
    assert rows["float"].parity is None and rows["float"].finn is None
    report = (out / "report.md").read_text()
    assert report.count("e-0") >= 2  # both parities in the summary table
    table = result.summary_table().splitlines()
    finn = [line for line in table if line.startswith("FINN (")]  # run's default target is FINN
    assert len(finn) == 2 and all("FINN-ready;" in line and " BOPs, " in line for line in finn), finn
    assert (out / "finn" / "summary.md").is_file() and (out / "finn_uniform" / "finn_report.json").is_file()
    lines = [line for line in table if not line.startswith(("warning: ", "FINN ("))]
    assert "aq-brevitas (avg-bits=3)" in lines[-1]
    assert len({len(line) for line in lines}) == 1
    # Every value column ends where its header ends.
    for head in ("avg bits", "clean", "export parity"):
        end = lines[0].index(head) + len(head)
        assert all(line[end - 1] != " " and (end == len(line) or line[end] == " ") for line in lines[2:])
    assert json.loads((out / "config.json").read_text())["calib_images"] == TINY.calib_images


def test_summary_robust_figure_is_the_worst_case_and_warnings_are_shown(done_run):
    """The summary's robust column is each model's per-image worst case over every attack (never above
    PGD alone); quantized models are also attacked by transfer from the float one; failed checks are
    warnings in report.md and under the summary table."""
    from aq_brevitas.evaluate.report import RobustnessReport

    out, result = done_run
    text = (out / "report.md").read_text()
    assert "| clean | robust (worst case) | PGD |" in text
    for row, stem in zip(result.rows, ("float", "uniform", "searched"), strict=True):
        rep = RobustnessReport.load(out / f"robustness_{stem}.json")
        assert row.robust == rep.robust_accuracy(TINY.eps) <= row.pgd and list(row.warnings) == rep.warnings
        transfer = any(r.attack == "transfer" for r in rep.results)
        assert transfer == (stem != "float")
        for w in row.warnings:
            assert f"`{w}`" in text and f"warning: {row.name}: {w}" in result.summary_table()


def test_report_shows_export_parity_and_flips(done_run):
    """report.md/report.json carry each export's max |QONNX - PyTorch|, the rounding-boundary flips the
    parity check allowed, and the difference without them, as the export records hold them; the JSON
    rows are the typed rows' records and read back to them."""
    out, result = done_run
    document = json.loads((out / "report.json").read_text())
    assert [SummaryRow.from_dict(r) for r in document["rows"]] == result.rows
    text = (out / "report.md").read_text()
    assert "## Export parity" in text and "boundary flips" in text
    for row, v in zip(document["rows"][1:], ("uniform", "searched"), strict=True):
        export = json.loads((out / f"export{'' if v == 'searched' else '_uniform'}.json").read_text())
        assert row["parity"] == export["max_abs_diff"] and row["boundary_flips"] == export["boundary_flips"]
        assert row["parity_without_flips"] == export["diff_without_flips"] <= row["parity_allowed"]
        assert row["flip_detail"] == export["flip_detail"]
        assert (
            f"| {row['name']} | {row['parity']:.1e} | {row['parity_allowed']:.1e} | {row['boundary_flips']} |"
            in text
        )


def test_quantized_models_are_save_quantized_checkpoints(done_run):
    """The run keeps its quantized models as save_quantized writes them: load_quantized rebuilds them."""
    out, _ = done_run
    for stage in ("ptq", "finetuned"):
        q, meta = aq_brevitas.load_quantized(out / f"searched_{stage}.pt", float_model=_model())
        assert meta["kind"] == "brevitas" and aq_brevitas.read_policy(
            q
        ).layers == aq_brevitas.LayerwisePolicy.load(out / "policy.json").resolve(quantizable_layers(q))


def _without_times(value):
    """A report's JSON without its wall times (the only field allowed to differ between runs)."""
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def test_two_evaluation_workers_write_the_same_reports(run_dir):
    """--workers 2 forks the evaluation's reports over two processes; every number is the same."""
    before = {p.name: json.loads(p.read_text()) for p in run_dir.glob("robustness_*.json")}
    for name in before:
        (run_dir / name).unlink()  # the evaluate stage's outputs are gone: it is redone, nothing else
    run(_model(), run_dir, dataclasses.replace(TINY, workers=2, eval_eps=(0.05, 0.1), eval_eps_images=4))
    after = {p.name: json.loads(p.read_text()) for p in run_dir.glob("robustness_*.json")}
    assert set(after) == set(before) | {f"robustness_{s}_eps.json" for s in ("float", "uniform", "searched")}
    for name in before:
        assert _without_times(after[name]) == _without_times(before[name]), name


def test_summary_table_sizes_columns_from_a_long_label():
    row = SummaryRow("n", 3.0, 1.5, clean=0.5, robust=0.125, pgd=0.25, parity=ParityRow(1e-7))
    long = dataclasses.replace(row, name="a-very-long-model-label (avg-bits=3)", warnings=("masking",))
    text = RunResult("x", [row, long]).summary_table().splitlines()
    lines, warnings = text[:-1], text[-1:]
    assert len({len(line) for line in lines}) == 1
    assert lines[2].index("3.00") == lines[3].index("3.00")
    assert "0.1250 (!)" in lines[3] and "1.0e-07" in lines[2]
    assert warnings == ["warning: a-very-long-model-label (avg-bits=3): masking"]


def test_a_summary_row_reads_back_from_its_record_with_its_finn_estimates():
    finn = FinnRow(True, ran=True, version="1.2", lut=1500.0, bram=4.0, dsp=0.0, fps=1e5, fpga_part="xc7z020")
    row = SummaryRow(
        "aq-brevitas (avg-bits=3)", 3.0, 1.5, clean=0.5, robust=0.25, pgd=0.25, bops=2e6,
        parity=ParityRow(1e-7, allowed=1e-5, without_flips=0.0, boundary_flips=2, flip_detail={"a": 2}, images=8),
        finn=finn,
    )  # fmt: skip
    record = json.loads(json.dumps(row.to_dict()))
    assert record["parity"] == 1e-7 and record["boundary_flips"] == 2 and record["finn"]["lut"] == 1500.0
    assert SummaryRow.from_dict(record) == row
    assert finn_lines([row]) == [
        "FINN (finn-plus 1.2): aq-brevitas (avg-bits=3): FINN-ready; 1,500 LUT, 4 BRAM_18K, 0 DSP, "
        "100,000 FPS est. on xc7z020; 2e+06 BOPs, 1.5 weight KiB"
    ]


def test_same_settings_skip_and_a_changed_setting_redoes_its_stage_and_downstream(run_dir, capsys):
    assert run(_model(), run_dir, TINY).skipped == list(STAGES)
    capsys.readouterr()
    result = run(_model(), run_dir, dataclasses.replace(TINY, finetune_steps=2))
    printed = capsys.readouterr().out
    assert "[finetune] redoing: changed: finetune_steps 1 -> 2" in printed
    assert result.skipped == ["score", "search", "quantize"]
    manifest = json.loads((run_dir / "stages.json").read_text())
    assert manifest["finetune"]["inputs"]["finetune_steps"] == 2
    assert json.loads((run_dir / "config.json").read_text())["finetune_steps"] == 2


def test_another_model_in_the_same_folder_redoes_every_stage(run_dir, capsys):
    result = run(_model(seed=1), run_dir, TINY)
    assert result.skipped == []
    assert "[score] redoing: changed: the model's weights" in capsys.readouterr().out


def test_corrupt_manifest_or_output_is_redone_not_a_crash(run_dir, capsys):
    (run_dir / "searched_finetuned.pt").write_bytes(b"\x00truncated")
    result = run(_model(), run_dir, TINY)
    assert "[finetune] redoing: searched_finetuned.pt changed or is corrupt" in capsys.readouterr().out
    # Stages downstream are redone only if the rewritten file differs from the one they used.
    assert "finetune" not in result.skipped and result.skipped[:3] == ["score", "search", "quantize"]
    load_checkpoint(run_dir / "searched_finetuned.pt")
    (run_dir / "stages.json").write_text('{"score": {"status": "do')
    result = run(_model(), run_dir, TINY)
    assert "is not valid JSON" in capsys.readouterr().out and result.skipped == []


def test_force_starts_fine_tuning_fresh(run_dir):
    # A stale epoch state (here: unreadable) must not be resumed from by --force.
    for f in ("searched", "uniform"):
        (run_dir / f"{f}_finetune_state.pt").write_bytes(b"stale state of another run")
    result = run(_model(), run_dir, TINY, force=True)
    assert result.skipped == []
    assert not list(run_dir.glob("*_finetune_state.*"))


def test_interrupted_fine_tuning_resumes_with_the_same_settings(run_dir, monkeypatch, capsys):
    import aq_brevitas.train.training

    real = aq_brevitas.train.training.adversarial_train
    calls = []

    def interrupted_on_second_model(*args, **kwargs):
        calls.append(kwargs["checkpoint"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    cfg = dataclasses.replace(TINY, finetune_steps=2)
    monkeypatch.setattr(aq_brevitas.train.training, "adversarial_train", interrupted_on_second_model)
    with pytest.raises(KeyboardInterrupt):
        run(_model(), run_dir, cfg)
    monkeypatch.setattr(aq_brevitas.train.training, "adversarial_train", real)
    # Mark the finished epoch state so that using it shows in the fine-tuned weights.
    state_path = run_dir / "searched_finetune_state.pt"
    state = load_checkpoint(state_path)
    state["model"]["1.weight"] += 1.0
    save_checkpoint(state_path, state)
    capsys.readouterr()
    run(_model(), run_dir, cfg)
    assert "resuming the interrupted fine-tuning" in capsys.readouterr().out
    tuned = load_checkpoint(run_dir / "searched_finetuned.pt")["state_dict"]["1.weight"]
    assert torch.equal(tuned, state["model"]["1.weight"])
    assert not state_path.exists()


BAD = {
    "budget below zero": (dict(budget="avg-bits=-1"), PolicyError, "must be a positive number"),
    "budget typo": (dict(budget="avg-bit3"), PolicyError, "cannot parse budget"),
    "eps negative": (dict(eps=-1.0), ConfigError, "outside [0, 1]"),
    "eps NaN": (dict(eps=math.nan), ConfigError, "must be a number"),
    "calib zero": (dict(calib_images=0), ConfigError, "--calib-images"),
    "calib+val too many": (dict(calib_images=4000, val_images=2000), ConfigError, "exceed the 5000"),
    "one test image": (dict(test_images=1), ConfigError, "--test-images"),
    "unknown method": (dict(method="magic"), ConfigError, "unknown search method"),
    "missing data": (dict(data_dir="/nonexistent/fmnist"), DataError, "fmnist"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_setting_fails_before_writing_and_keeps_an_existing_run(case, run_dir, tmp_path):
    change, error, text = BAD[case]
    before = _digests(run_dir)
    with pytest.raises(error, match=None) as info:
        run(_model(), run_dir, dataclasses.replace(TINY, **change))
    assert text in str(info.value) and "\n" not in str(info.value)
    assert _digests(run_dir) == before
    with pytest.raises(error):
        run(_model(), tmp_path / "fresh", dataclasses.replace(TINY, **change))
    assert not (tmp_path / "fresh").exists()


def test_bad_model_or_out_fails_before_writing(tmp_path):
    with pytest.raises(ModelError):
        run("no-such-model", tmp_path / "a", TINY)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        run(_model(), tmp_path / "file", TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_cli_bad_calib_is_one_line_and_writes_nothing(tmp_path):
    res = run_cli("run", "--model", "cnn-pgd", "--calib-images", "0", "--out", str(tmp_path / "r"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("aq-brevitas: error:")]
    assert len(errors) == 1 and "--calib-images" in errors[0] and ">= 1" in errors[0]
    assert not (tmp_path / "r").exists()


def test_public_api_lists_the_pipeline_and_error_types():
    for name in ("run", "RunConfig", "RunResult", "ConfigError", "DataError", "init_distributed"):
        assert name in aq_brevitas.__all__ and getattr(aq_brevitas, name).__doc__
    assert issubclass(aq_brevitas.ModelError, AqError)
