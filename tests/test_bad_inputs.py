"""The bad-input catalogue: each case fails with the package's own error, in one line naming the
offending thing and the fix, with no traceback on the CLI, and leaves existing outputs intact."""

import gzip
import json
import os
import pickle
import random
import shutil
import warnings

import pytest
import torch
from torch import nn

import aq_brevitas as aq
from aq_brevitas.data import DEFAULT_DATA_DIR
from aq_brevitas.errors import AqError
from aq_brevitas.models import build_model, save_model
from aq_brevitas.storage import atomic_write_with
from conftest import run_cli

SCHEMA = "aq-brevitas/policy/v1"
SENTINEL = b"previous output, must survive"


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def _policy(tmp_path, doc) -> str:
    p = tmp_path / "policy.json"
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(p)


def _ckpt(tmp_path, kind) -> str:
    p = tmp_path / "model.pt"
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "foreign":
        # Fixed bytes, not os.urandom: random garbage makes the unpickler fail in ways that vary by draw.
        p.write_bytes(random.Random(kind).randbytes(2048))
    elif kind == "truncated":
        save_model(build_model("small_cnn"), p, {"arch": "small_cnn"})
        p.write_bytes(p.read_bytes()[:4000])
    elif kind == "pickle":
        p.write_bytes(pickle.dumps({"state_dict": _Payload(str(tmp_path / "pwned"))}))
        (tmp_path / "model.json").write_text('{"arch": "small_cnn"}')
    elif kind == "nan":
        m = build_model("small_cnn")
        with torch.no_grad():
            m.conv1.weight[0, 0, 0, 0] = float("inf")
        torch.save({"state_dict": m.state_dict()}, p)
        (tmp_path / "model.json").write_text('{"arch": "small_cnn"}')
    elif kind == "wrong-arch":
        save_model(build_model("small_cnn"), p, {"arch": "vgg_bn"})
    return str(p)


def _data_dir(tmp_path, kind) -> str:
    d = tmp_path / "data"
    d.mkdir()
    if kind == "corrupt":
        for f in sorted(os.listdir(DEFAULT_DATA_DIR)):
            shutil.copy(os.path.join(DEFAULT_DATA_DIR, f), d)
        bad = next(d.glob("t10k-images*"))
        bad.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 64))
    return str(d)


def _quantize(tmp_path, policy):
    return [
        "quantize",
        "--model",
        "cnn-pgd",
        "--policy",
        policy,
        "--out",
        str(tmp_path / "out.pt"),
        "--calibrate",
        "0",
    ]


CLI_CASES = {
    "malformed JSON": (lambda t: _quantize(t, _policy(t, '{"schema": ')), "not valid JSON"),
    "unknown schema version": (
        lambda t: _quantize(t, _policy(t, {"schema": "aq-brevitas/policy/v9", "layers": {}})),
        "schema",
    ),
    "unknown policy key": (
        lambda t: _quantize(t, _policy(t, {"schema": SCHEMA, "layers": {}, "bits": 4})),
        "unknown key 'bits'",
    ),
    "unknown spec key": (
        lambda t: _quantize(
            t, _policy(t, {"schema": SCHEMA, "layers": {"fc1": {"weight_bit_width": 4, "wbits": 4}}})
        ),
        "unknown key 'wbits'",
    ),
    "bits 0": (
        lambda t: _quantize(t, _policy(t, {"schema": SCHEMA, "layers": {"fc1": {"weight_bit_width": 0}}})),
        "weight_bit_width=0",
    ),
    "bits 9": (
        lambda t: _quantize(t, _policy(t, {"schema": SCHEMA, "layers": {"fc1": {"weight_bit_width": 9}}})),
        "weight_bit_width=9",
    ),
    "bits 33": (
        lambda t: _quantize(t, _policy(t, {"schema": SCHEMA, "layers": {"fc1": {"weight_bit_width": 33}}})),
        "weight_bit_width=33",
    ),
    "bits -1": (
        lambda t: _quantize(t, _policy(t, {"schema": SCHEMA, "layers": {"fc1": {"weight_bit_width": -1}}})),
        "weight_bit_width=-1",
    ),
    "bits as string": (
        lambda t: _quantize(t, _policy(t, {"schema": SCHEMA, "layers": {"fc1": {"weight_bit_width": "4"}}})),
        "must be an integer",
    ),
    "unknown layer name": (
        lambda t: _quantize(t, _policy(t, {"schema": SCHEMA, "layers": {"fc9": {"weight_bit_width": 4}}})),
        "'fc9'",
    ),
    "missing policy file": (lambda t: _quantize(t, str(t / "none.json")), "does not exist"),
    "budget below minimum": (
        lambda t: [
            "search",
            "--model",
            "cnn-pgd",
            "--budget",
            "avg-bits=1.5",
            "--bits",
            "2",
            "4",
            "--calib",
            "16",
            "--val-images",
            "0",
        ],
        "budget",
    ),
    "budget non-positive": (
        lambda t: [
            "search",
            "--model",
            "cnn-pgd",
            "--budget",
            "avg-bits=0",
            "--calib",
            "16",
            "--val-images",
            "0",
        ],
        "positive",
    ),
    "budget unparsable": (
        lambda t: [
            "search",
            "--model",
            "cnn-pgd",
            "--budget",
            "four-bits",
            "--calib",
            "16",
            "--val-images",
            "0",
        ],
        "cannot parse budget",
    ),
    "eps negative": (
        lambda t: ["evaluate", "--model", "cnn-pgd", "--eps", "-0.1", "--limit", "8"],
        "outside [0, 1]",
    ),
    "eps above one": (
        lambda t: ["evaluate", "--model", "cnn-pgd", "--eps", "1.5", "--limit", "8"],
        "outside [0, 1]",
    ),
    "eps NaN": (
        lambda t: ["evaluate", "--model", "cnn-pgd", "--eps", "nan", "--limit", "8"],
        "must be a number",
    ),
    "missing checkpoint": (
        lambda t: ["evaluate", "--model", str(t / "none.pt"), "--limit", "8"],
        "does not exist",
    ),
    "empty checkpoint": (lambda t: ["evaluate", "--model", _ckpt(t, "empty"), "--limit", "8"], "is empty"),
    "truncated checkpoint": (
        lambda t: ["evaluate", "--model", _ckpt(t, "truncated"), "--limit", "8"],
        "truncated",
    ),
    "foreign checkpoint": (
        lambda t: ["evaluate", "--model", _ckpt(t, "foreign"), "--limit", "8"],
        "checkpoint",
    ),
    "pickle payload checkpoint": (
        lambda t: ["evaluate", "--model", _ckpt(t, "pickle"), "--limit", "8"],
        "refused",
    ),
    "NaN/Inf weights": (lambda t: ["evaluate", "--model", _ckpt(t, "nan"), "--limit", "8"], "NaN/Inf"),
    "checkpoint of another architecture": (
        lambda t: ["evaluate", "--model", _ckpt(t, "wrong-arch"), "--limit", "8"],
        "does not fit",
    ),
    "unknown zoo name": (
        lambda t: ["evaluate", "--model", "resnet-huge", "--limit", "8"],
        "neither a zoo model nor a file",
    ),
    "unknown architecture": (
        lambda t: ["train", "--arch", "resnet50", "--out", str(t / "out.pt")],
        "unknown architecture",
    ),
    "data dir without IDX files": (
        lambda t: ["evaluate", "--model", "cnn-pgd", "--data-dir", _data_dir(t, "empty"), "--limit", "8"],
        "no IDX file",
    ),
    "corrupt IDX file": (
        lambda t: ["evaluate", "--model", "cnn-pgd", "--data-dir", _data_dir(t, "corrupt"), "--limit", "8"],
        "IDX file",
    ),
    "missing data dir": (
        lambda t: ["evaluate", "--model", "cnn-pgd", "--data-dir", str(t / "nowhere"), "--limit", "8"],
        "apt-get install",
    ),
    "non-positive limit": (
        lambda t: ["evaluate", "--model", "cnn-pgd", "--limit", "0"],
        "limit must be positive",
    ),
    "output dir missing": (
        lambda t: [
            "quantize",
            "--model",
            "cnn-pgd",
            "--policy",
            _policy(t, {"schema": SCHEMA, "default": {"weight_bit_width": 4}}),
            "--out",
            str(t / "no" / "out.pt"),
            "--calibrate",
            "0",
        ],
        "does not exist",
    ),
    "output dir not writable": (
        lambda t: [
            "quantize",
            "--model",
            "cnn-pgd",
            "--policy",
            _policy(t, {"schema": SCHEMA, "default": {"weight_bit_width": 4}}),
            "--out",
            "/proc/aq-out.pt",
            "--calibrate",
            "0",
        ],
        "cannot write in /proc",
    ),
    "export of a float model": (
        lambda t: ["export", "--model", "cnn-pgd", "--out", str(t / "out.pt")],
        "is a float model",
    ),
    "finetune of a float model": (
        lambda t: ["finetune", "--model", "cnn-pgd", "--out", str(t / "out.pt")],
        "is a float model",
    ),
    "run --out is a file": (lambda t: ["run", "--model", "cnn-pgd", "--out", str(t / "out.pt")], "is a file"),
    "torchrun world size without rendezvous": (
        lambda t: ["finetune", "--model", "cnn-pgd", "--out", str(t / "out.pt")],
        "WORLD_SIZE=2",
    ),
}
# torchrun sets WORLD_SIZE, RANK, MASTER_ADDR and MASTER_PORT together; a WORLD_SIZE alone is a broken launch.
ENV = {"torchrun world size without rendezvous": {"WORLD_SIZE": "2"}}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_bad_input(case, tmp_path):
    build, expected = CLI_CASES[case]
    (tmp_path / "out.pt").write_bytes(SENTINEL)
    args = build(tmp_path)
    res = run_cli(*args, env=ENV.get(case))
    assert res.returncode == 2, (case, res.returncode, res.stderr[-800:])
    assert "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("aq-brevitas: error:")]
    assert len(errors) == 1, res.stderr[-800:]
    assert expected in errors[0], errors[0]
    assert "-- fix:" in errors[0]
    assert (tmp_path / "out.pt").read_bytes() == SENTINEL  # pre-existing output left intact
    assert not (tmp_path / "pwned").exists()
    assert not [p for p in tmp_path.rglob(".*.tmp")]


def _model():
    return aq.load_float_model("cnn-pgd")[0]


API_CASES = {
    "inputs outside [0, 1]": lambda: aq.accuracy(
        _model(), torch.rand(4, 1, 28, 28) * 2, torch.zeros(4, dtype=torch.long)
    ),
    "inputs of integer dtype": lambda: aq.accuracy(
        _model(), torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)
    ),
    "inputs of the wrong shape": lambda: aq.lipschitz_scores(_model(), torch.rand(2, 3, 5, 5)),
    "attack on wrong-shape inputs": lambda: aq.attack_accuracy(
        _model(), torch.rand(2, 3, 5, 5), torch.zeros(2, dtype=torch.long)
    ),
    "model without quantizable layers": lambda: aq.quantize(
        nn.Sequential(nn.ReLU()), aq.LayerwisePolicy(default=aq.LayerSpec(4))
    ),
    "policy that is not a LayerwisePolicy": lambda: aq.quantize(_model(), {"fc1": 4}),
    "budget with two kinds": lambda: aq.Budget(avg_weight_bits=4, bops=1e6),
    "eps NaN in search": lambda: aq.search_policy(
        _model(), aq.load_split("val", limit=16), budget="avg-bits=4", eps=float("nan"), progress=False
    ),
    "1-bit layer in torch.ao": lambda: aq.to_qconfig_mapping(aq.LayerwisePolicy({"fc1": aq.LayerSpec(1)})),
}


@pytest.mark.parametrize("case", sorted(API_CASES))
def test_api_bad_input(case):
    with pytest.raises(AqError) as err:
        API_CASES[case]()
    msg = str(err.value)
    assert "\n" not in msg and "-- fix:" in msg


def test_unsupported_layer_is_named_not_silently_skipped():
    model = nn.Sequential(nn.Conv3d(1, 2, 1), nn.Flatten(), nn.Linear(8, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        aq.quantize(model, aq.LayerwisePolicy(default=aq.LayerSpec(4)))
    assert any("0 (Conv3d)" in str(w.message) for w in caught)


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_full_disk_or_interrupt_during_export_leaves_no_file(tmp_path, monkeypatch, failure):
    from qonnx.core.modelwrapper import ModelWrapper

    def broken_save(self, path):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise failure

    monkeypatch.setattr(ModelWrapper, "save", broken_save)
    q = aq.quantize(_model(), aq.LayerwisePolicy(default=aq.LayerSpec(4)))
    target = tmp_path / "m.onnx"
    with pytest.raises((AqError, KeyboardInterrupt)) as err:
        aq.export_qonnx(q, target, torch.rand(1, 1, 28, 28))
    if isinstance(failure, OSError):
        assert "No space left" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_interrupt_in_any_atomic_write_keeps_previous_output(tmp_path):
    target = tmp_path / "report.json"
    target.write_bytes(SENTINEL)

    def writer(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_with(target, writer)
    assert target.read_bytes() == SENTINEL and [p.name for p in tmp_path.iterdir()] == ["report.json"]
