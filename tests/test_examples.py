"""Every example runs (in its fast mode)."""

import subprocess
import sys

import pytest

from conftest import REPO

EXAMPLES = sorted((REPO / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script):
    res = subprocess.run(
        [sys.executable, str(script), "--fast"], capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip()


def test_distributed_finetune_script_runs():
    script = REPO / "examples" / "distributed_finetune.sh"
    res = subprocess.run(
        ["bash", str(script), "--fast"], capture_output=True, text=True, timeout=900, cwd=REPO
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "pgd" in res.stdout.lower()
