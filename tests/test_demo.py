"""`make demo` cannot break unseen, and no subcommand answers a missing or wrong option with a traceback.

The demo test reads the Makefile's ``demo`` recipe as make expands it (``make -n``), keeps every
subcommand and option, and makes only the sizes tiny (images, steps, budgets), so a crash in any
command or option the demo uses fails CI instead of the first user's machine.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from aq_brevitas.cli import COMMANDS, build_parser, main
from aq_brevitas.pipeline.config import STAGES
from conftest import REPO, run_cli

# Options whose value is a size: the test replaces it with the tiny value here. Every other option of
# the demo's commands must be in KEPT (run as the Makefile says), so a new option is classified by whoever
# adds it to the demo.
TINY = {
    "--test-images": ["4"],
    "--eval-eps-images": ["2"],
    "--val-images": ["4"],
    "--calib-images": ["8"],
    "--train-images": ["8"],
    "--train-steps": ["1"],
    "--pgd-steps": ["1"],
    "--epochs": ["1"],
    "--widths": ["3"],
}
KEPT = {"--model", "--budget", "--eps", "--out", "--target", "--methods", "--method", "--seed", "--workers"}


def _demo_commands(*make_args: str) -> list[list[str]]:
    """The aq-brevitas command lines of `make demo`, expanded by make itself, without running them."""
    res = subprocess.run(
        ["make", "-n", "--no-print-directory", "demo", *make_args],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    lines = [shlex.split(ln) for ln in res.stdout.splitlines() if "bin/aq-brevitas " in ln]
    return [
        words[words.index(next(w for w in words if w.endswith("bin/aq-brevitas"))) + 1 :] for words in lines
    ]


def _options(words: list[str]) -> dict[str, list[str]]:
    """``[cmd, --opt, v1, v2, --flag, ...]`` as ``{--opt: [v1, v2], --flag: []}``."""
    opts: dict[str, list[str]] = {}
    key = None
    for w in words[1:]:
        if w.startswith("--"):
            key = w
            opts[key] = []
        else:
            assert key is not None, f"positional argument {w!r} in {words}"
            opts[key].append(w)
    return opts


def _tiny(words: list[str], out: Path) -> list[str]:
    opts = _options(words)
    unknown = set(opts) - set(TINY) - KEPT
    assert not unknown, f"classify the demo's option(s) {sorted(unknown)} in TINY (a size) or KEPT"
    argv = [words[0]]
    for key, values in opts.items():
        if key == "--out":  # the demo's out folder, moved under tmp (run/ and its pareto/ keep their nesting)
            values = [str(out / values[0])]
        argv += [key, *TINY.get(key, values)]
    return argv


def test_demo_commands_are_the_quick_ones_and_full_is_one_flag_away():
    """The default demo sizes the extra radii and the sweep down; FULL=1 gives the full-size job."""
    quick, full = _demo_commands(), _demo_commands("FULL=1")
    assert [c[0] for c in quick] == [c[0] for c in full] == ["run", "pareto"]
    q_run, f_run = _options(quick[0]), _options(full[0])
    assert int(q_run["--test-images"][0]) >= 500 and q_run["--eps"] == ["0.1"]  # the headline stays
    assert q_run["--eval-eps-images"] == ["100"] and f_run["--eval-eps-images"] == ["0"]
    assert len(_options(quick[1])["--widths"]) == 3 and len(_options(full[1])["--widths"]) == 5


DEMO = _demo_commands()


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(DEMO)), ids=[words[0] for words in DEMO])
def test_make_demo_runs_to_the_end_with_tiny_sizes(index, tmp_path):
    """Each command of `make demo` (they are independent: `run`, then the sweep), with its options,
    exits 0 when only the sizes are made tiny; `run` prints each stage's time and resumes."""
    argv = _tiny(DEMO[index], tmp_path)
    if argv[0] != "run":  # in `make demo` the run before it has made the folder its --out is in
        Path(argv[argv.index("--out") + 1]).parent.mkdir(parents=True, exist_ok=True)
    res = run_cli(*argv, cwd=tmp_path)
    assert res.returncode == 0, (argv, res.stderr[-3000:])
    assert "Traceback" not in res.stderr
    demo = tmp_path / "runs" / "demo"
    if argv[0] == "pareto":
        for f in ("pareto.json", "pareto.md", "pareto.png"):
            assert (demo / f).stat().st_size > 0, f
        return
    for f in ("report.md", "report.json", "policy.png", "robustness.png", "comparison.png", "model.onnx",
              "robustness_searched_eps.json"):  # fmt: skip
        assert (demo / f).stat().st_size > 0, f
    assert "uniform (avg-bits=3)" in res.stdout and "aq-brevitas (avg-bits=3)" in res.stdout
    for stage in STAGES:
        assert f"[{stage}] done in " in res.stdout  # each stage's time is printed
    again = run_cli(*argv, cwd=tmp_path)  # a second run resumes: nothing is redone
    assert again.returncode == 0 and f"skipped done stages: {', '.join(STAGES)}" in again.stdout


# -- every subcommand, a required option missing or wrong ------------------------------------------------
def _required(command: str) -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return [a.option_strings[-1] for a in sub._actions if a.required]


def _valid(flag: str, tmp: Path) -> list[str]:
    """A value each required option accepts."""
    policy = tmp / "policy.json"
    policy.write_text('{"schema": "aq-brevitas/policy/v1", "default": {"weight_bit_width": 4}, "layers": {}}')
    return {
        "--model": ["cnn-pgd"],
        "--budget": ["avg-bits=3"],
        "--policy": [str(policy)],
        "--arch": ["small_cnn"],
        "--out": [str(tmp / "out.pt")],
    }[flag]


def _wrong(command: str, flag: str, tmp: Path) -> tuple[list[str], str]:
    """A value of ``flag`` that ``command`` must refuse before any work, and a word its error names."""
    (tmp / "afile").write_text("x")
    return {
        "--model": (["no-such-model"], "no-such-model"),
        "--budget": (["avg-bits=three"], "three"),
        "--policy": ([str(tmp / "missing.json")], "missing.json"),
        "--arch": (["no_such_arch"], "no_such_arch"),
        # run's --out is a folder (a file is refused); everywhere else a file in a missing folder
        "--out": (
            [str(tmp / "afile")] if command == "run" else [str(tmp / "no" / "out.pt")],
            "afile" if command == "run" else "does not exist",
        ),
    }[flag]


CASES = [(c, f) for c in COMMANDS for f in _required(c)]


def test_every_required_option_is_covered():
    assert {c for c, _ in CASES} >= {"train", "quantize", "finetune", "search", "pareto", "export", "run"}


@pytest.mark.parametrize(("command", "flag"), CASES)
def test_a_missing_required_option_is_argparse_usage_and_exit_2(command, flag, tmp_path, capsys):
    argv = [command] + [w for f in _required(command) if f != flag for w in [f, *_valid(f, tmp_path)]]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(errors) == 1 and flag in errors[0] and "Traceback" not in err, err


@pytest.mark.parametrize(("command", "flag"), CASES)
def test_a_wrong_required_option_is_one_line_and_exit_2(command, flag, tmp_path, capsys):
    wrong, word = _wrong(command, flag, tmp_path)
    argv = [command] + [
        w for f in _required(command) for w in [f, *(wrong if f == flag else _valid(f, tmp_path))]
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith("aq-brevitas: error:") and "-- fix:" in errors[0], err
    assert word in errors[0], errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # refused before writing anything
