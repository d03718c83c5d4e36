import json
import re
import subprocess
import sys

import pytest

from conftest import REPO, run_cli


def test_cli_start_imports_no_heavy_modules():
    code = "import sys, aq_brevitas.cli as c; c.build_parser(); print([m for m in ('torch', 'brevitas', 'torchattacks') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


def test_help_lists_commands():
    res = run_cli("--help")
    assert res.returncode == 0
    for cmd in ("train", "evaluate", "score", "quantize", "zoo"):
        assert cmd in res.stdout


def _one_line_error(res):
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("Warning")]
    err = [ln for ln in lines if ln.startswith("aq-brevitas: error:")]
    assert len(err) == 1, res.stderr
    return err[0]


def test_missing_model_is_one_line(tmp_path):
    msg = _one_line_error(run_cli("evaluate", "--model", str(tmp_path / "none.pt")))
    assert "none.pt" in msg and "does not exist" in msg


def test_missing_data_dir_is_one_line(tmp_path):
    msg = _one_line_error(
        run_cli("evaluate", "--model", "cnn-pgd", "--data-dir", str(tmp_path / "x"), "--images", "10")
    )
    assert "apt-get install" in msg


def test_debug_shows_traceback(tmp_path):
    res = run_cli("--debug", "evaluate", "--model", str(tmp_path / "none.pt"))
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_bad_policy_json_is_one_line(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text('{"schema": "aq-brevitas/policy/v1", "layers": {"fc1": {"weight_bit_width": 9}}}')
    msg = _one_line_error(
        run_cli("quantize", "--model", "cnn-pgd", "--policy", str(bad), "--out", str(tmp_path / "q.pt"))
    )
    assert "fc1" in msg and "weight_bit_width=9" in msg
    assert not (tmp_path / "q.pt").exists()


def test_score_and_quantize_end_to_end(tmp_path):
    res = run_cli(
        "score",
        "--model",
        "cnn-pgd",
        "--images",
        "32",
        "--json",
        str(tmp_path / "s.json"),
        "--plot",
        str(tmp_path / "s.png"),
    )
    assert res.returncode == 0, res.stderr
    scores = json.loads((tmp_path / "s.json").read_text())
    assert list(scores) == ["conv1", "conv2", "fc1", "fc2"] and (tmp_path / "s.png").stat().st_size > 1000
    policy = tmp_path / "p.json"
    policy.write_text(
        json.dumps(
            {
                "schema": "aq-brevitas/policy/v1",
                "default": {"weight_bit_width": 4},
                "layers": {"fc1": {"weight_bit_width": 2, "scaling": "mse"}},
            }
        )
    )
    res = run_cli(
        "quantize",
        "--model",
        "cnn-pgd",
        "--policy",
        str(policy),
        "--out",
        str(tmp_path / "q.pt"),
        "--calib-images",
        "64",
    )
    assert res.returncode == 0, res.stderr
    assert "QuantLinear 2b mse" in res.stdout
    res = run_cli(
        "evaluate",
        "--model",
        str(tmp_path / "q.pt"),
        "--images",
        "50",
        "--pgd-steps",
        "3",
        "--eps",
        "0.1",
        "--no-gradient-free",
        "--suite-steps",  # plumbing: a short suite
        "10",
        "--suite-queries",
        "20",
    )
    assert res.returncode == 0, res.stderr
    assert "pgd" in res.stdout.lower()


def test_zoo_listing():
    res = run_cli("zoo")
    assert res.returncode == 0 and "cnn-pgd" in res.stdout


def test_search_cli_writes_policy_and_chart(tmp_path):
    res = run_cli(
        "search", "--model", "cnn-pgd", "--budget", "avg-bits=4", "--bits", "2", "4", "8",
        "--scalings", "max", "--granularities", "per_channel", "--calib-images", "64", "--val-images", "50",
        "--out", str(tmp_path / "p.json"), "--plot", str(tmp_path / "p.png"),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    from aq_brevitas.policy import LayerwisePolicy

    pol = LayerwisePolicy.load(tmp_path / "p.json")
    assert pol.meta["cost"]["avg_weight_bits"] <= 4.0 and pol.meta["winner"] in (
        "search",
        "search-unrefined",
        "uniform",
    )
    assert (tmp_path / "p.png").stat().st_size > 1000 and "total:" in res.stdout


SMALL_SEARCH = ("--model", "cnn-pgd", "--budget", "avg-bits=4", "--bits", "2", "4", "8", "--scalings", "max",
                "--granularities", "per_channel", "--calib-images", "64", "--val-images", "50")  # fmt: skip


def test_search_compare_prints_every_method_with_its_bound():
    res = run_cli("search", *SMALL_SEARCH, "--compare")
    assert res.returncode == 0, res.stderr
    rows = {line.split()[0]: line.split() for line in res.stdout.splitlines() if line.split()[:1]}
    header = next(line for line in res.stdout.splitlines() if line.startswith("method "))
    assert "Σ s_l" in header and "bound B" in header
    for method in ("uniform", "hessian", "ans", "lipschitz"):
        bits, bound = float(rows[method][1]), float(rows[method][5])
        assert bits <= 4.0 + 1e-9 and bound > 0


def test_validate_metric_cli_writes_report_and_scatter(tmp_path):
    res = run_cli(
        "validate-metric", *SMALL_SEARCH, "--n", "4", "--pgd-steps", "2", "--out", str(tmp_path / "vm")
    )
    assert res.returncode == 0, res.stderr
    assert "Spearman ρ(whole-network bound B(p), robust error)" in res.stdout
    report = json.loads((tmp_path / "vm.json").read_text())
    assert (tmp_path / "vm.png").stat().st_size > 1000
    assert len(report["policies"]) == 4 and report["images"] == 50 and report["pgd_steps"] == 2
    assert -1 <= report["rho"] <= 1 and 0 <= report["p_value"] <= 1
    assert f"{report['rho']:+.3f}" in res.stdout  # the printed ρ is the saved one


# ---- one option word, one meaning; defaults from the API; an old spelling is an unknown option ------------
AMBIGUOUS = ("--steps", "--limit", "--calib", "--calibrate", "--eval-limit", "--eval-steps",
             "--finetune-steps", "--finetune-images", "--restarts", "--trades")  # fmt: skip


def _subparsers():
    from aq_brevitas.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices


def test_no_command_takes_an_old_ambiguous_spelling():
    for command, parser in _subparsers().items():
        words = {s for a in parser._actions for s in a.option_strings}
        assert not words & set(AMBIGUOUS), command


@pytest.mark.parametrize(
    ("argv", "word", "meant"),
    [
        (
            ["train", "--arch", "small_cnn", "--out", "m.pt", "--steps", "3"],
            "--steps 3",
            "--train-steps or --pgd-steps",
        ),
        (["evaluate", "--model", "m.pt", "--limit", "5"], "--limit 5", None),
        (
            ["run", "--model", "m", "--out", "o", "--calib", "32"],
            "--calib 32",
            "--calib-images",
        ),  # no prefix matching
        (["finetune", "--model", "q.pt", "--out", "o.pt", "--trades", "6"], "--trades 6", "--trades-beta"),
        (["evaluate", "--model", "m.pt", "--epss", "0.1"], "--epss 0.1", "--eps"),  # a typo
    ],
)
def test_an_old_spelling_fails_naming_the_current_option(argv, word, meant, capsys):
    """Exit code 2 and one line naming the command, the word and the option it most likely meant,
    before anything is loaded or written."""
    from aq_brevitas.cli import main

    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and f"aq-brevitas {argv[0]} does not take {word}" in err[0], err
    assert (f"did you mean {meant}?" in err[0]) if meant else ("did you mean" not in err[0]), err
    assert "Traceback" not in captured.err and captured.out == ""


def test_cli_defaults_are_the_api_defaults():
    from aq_brevitas.cli import build_parser
    from aq_brevitas.cli.options import search_config, train_config, values_for
    from aq_brevitas.config import EvalConfig, TrainConfig
    from aq_brevitas.pipeline.config import RunConfig
    from aq_brevitas.search import SearchConfig
    from aq_brevitas.search.candidates import DEFAULT_BITS, DEFAULT_GRANULARITIES, DEFAULT_SCALINGS

    parse = build_parser().parse_args
    assert train_config(parse(["train", "--arch", "a", "--out", "o.pt"]), TrainConfig()) == TrainConfig()
    tuned = parse(["finetune", "--model", "q.pt", "--out", "o.pt"])
    assert (
        train_config(tuned, TrainConfig.finetuning())
        == TrainConfig.finetuning()
        == train_config(tuned, TrainConfig())
    )
    assert EvalConfig(**values_for(parse(["evaluate", "--model", "m"]), EvalConfig)) == EvalConfig()
    assert RunConfig(**values_for(parse(["run", "--model", "m", "--out", "o"]), RunConfig)) == RunConfig()
    assert search_config(parse(["search", "--model", "m", "--budget", "avg-bits=3"])) == SearchConfig()
    # Candidates default to the library's (None on the command line); the help states those values.
    text = " ".join(_subparsers()["search"].format_help().split())
    for values in (DEFAULT_BITS, DEFAULT_SCALINGS, DEFAULT_GRANULARITIES):
        assert f"(default {' '.join(map(str, values))})" in text


def test_export_prints_parity_and_rounding_boundary_flips(tmp_path):
    policy = tmp_path / "p.json"
    policy.write_text(json.dumps({"schema": "aq-brevitas/policy/v1", "default": {"weight_bit_width": 4}}))
    q = tmp_path / "q.pt"
    res = run_cli(
        "quantize", "--model", "cnn-pgd", "--policy", str(policy), "--out", str(q), "--calib-images", "0"
    )
    assert res.returncode == 0, res.stderr
    res = run_cli("export", "--model", str(q), "--out", str(tmp_path / "q.onnx"), "--images", "2")
    assert res.returncode == 0, res.stderr
    assert "max |ONNX - PyTorch| = " in res.stdout
    assert re.search(r"rounding-boundary flips allowed by the check: \d+", res.stdout), res.stdout


def test_unknown_option_is_one_line_naming_the_command(capsys):
    from aq_brevitas.cli import main

    assert main(["evaluate", "--model", "cnn-pgd", "--epsilon", "0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "aq-brevitas evaluate does not take --epsilon 0.1" in err[0] and "-- fix:" in err[0]
    )


def test_a_json_file_given_as_a_model_says_so(tmp_path):
    from aq_brevitas.errors import CheckpointError
    from aq_brevitas.storage import load_checkpoint

    path = tmp_path / "policy.json"
    path.write_text("{}")
    with pytest.raises(CheckpointError, match="is a JSON file"):
        load_checkpoint(path)


def test_pareto_cli_keeps_its_measurements_beside_out_and_reads_them_back(tmp_path):
    """A second run of the same sweep measures nothing: every point comes from DIR/cache."""
    import json

    args = ("pareto", "--model", "cnn-pgd", "--methods", "uniform", "--widths", "8", "--bits", "4", "8",
            "--scalings", "max", "--granularities", "per_channel", "--calib-images", "32", "--val-images", "16",
            "--pgd-steps", "2", "--out", str(tmp_path / "front"))  # fmt: skip
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    cached = sorted((tmp_path / "cache").glob("*.json"))
    stamps = [p.stat().st_mtime_ns for p in cached]
    front = json.loads((tmp_path / "front.json").read_text())
    assert len(cached) == 1 + len({json.dumps(p["layers"], sort_keys=True) for p in front["points"]})
    second = run_cli(*args)
    assert second.returncode == 0, second.stderr
    assert sorted((tmp_path / "cache").glob("*.json")) == cached
    assert [p.stat().st_mtime_ns for p in cached] == stamps  # read, not rewritten
    again = json.loads((tmp_path / "front.json").read_text())
    assert again["points"] == front["points"] and front["seconds"]["measure"] > again["seconds"]["measure"]


def test_quantize_target_finn_refuses_what_finn_cannot_build(tmp_path):
    policy = tmp_path / "p.json"
    policy.write_text('{"schema": "aq-brevitas/policy/v1", "default": {"weight_bit_width": 4}, "layers": {}}')
    args = ["quantize", "--model", "cnn-pgd", "--policy", str(policy), "--out", str(tmp_path / "q.pt")]
    msg = _one_line_error(run_cli(*args, "--target", "finn", "--calib-images", "16"))
    assert "target='finn'" in msg and "act_bit_width" in msg
    assert not (tmp_path / "q.pt").exists()
