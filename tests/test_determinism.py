"""Same inputs + seed → byte-identical policy JSON and identical Lipschitz scores, across processes."""

from conftest import run_cli

SEARCH = ["search", "--model", "cnn-pgd", "--budget", "avg-bits=3", "--bits", "2", "3", "8", "--scalings", "max", "mse",
          "--granularities", "per_channel", "--calib-images", "64", "--val-images", "64", "--seed", "3"]  # fmt: skip


def test_policy_json_is_byte_identical_across_processes(tmp_path):
    for name in ("a.json", "b.json"):
        res = run_cli(*SEARCH, "--out", str(tmp_path / name))
        assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_lipschitz_scores_identical_across_processes(tmp_path):
    for name in ("a.json", "b.json"):
        res = run_cli("score", "--model", "vgg-pgd", "--images", "32", "--json", str(tmp_path / name))
        assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
