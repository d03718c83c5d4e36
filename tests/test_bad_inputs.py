"""The bad-input catalogue: each case fails with the package's own error, in one line naming the
offending thing and the fix, with no traceback on the CLI, and leaves existing outputs intact."""

import gzip
import json
import pickle
import random
import re
import shutil
import warnings

import brevitas.nn as qnn
import pytest
import torch
from torch import nn

import aq_brevitas as aq
from aq_brevitas.cli import main
from aq_brevitas.data import resolve_data_dir
from aq_brevitas.errors import AqError
from aq_brevitas.models import build_model, save_model
from aq_brevitas.quantization.readback import layer_changes
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
        for f in sorted(resolve_data_dir().iterdir()):  # the directory the loader would read
            shutil.copy(f, d)
        bad = next(d.glob("t10k-images*"))
        bad.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 64))
    return str(d)


def _quantize(tmp_path, policy, out=None):
    """`aq-brevitas quantize` of cnn-pgd with ``policy`` (a path) into ``out`` (default tmp/out.pt)."""
    out = str(tmp_path / "out.pt") if out is None else out
    return ["quantize", "--model", "cnn-pgd", "--policy", policy, "--out", out, "--calib-images", "0"]


def _good_policy(tmp_path) -> str:
    return _policy(tmp_path, {"schema": SCHEMA, "default": {"weight_bit_width": 4}})


def _dir(tmp_path, name) -> str:
    d = tmp_path / name
    d.mkdir()
    return str(d)


# Each case: (argv builder, regex the one error line must match). "{tmp}" stands for the case's tmp_path.
CLI_CASES = {
    "malformed JSON": (
        lambda t: _quantize(t, _policy(t, '{"schema": ')),
        r"policy file \S+policy\.json is not valid JSON \(line 1, column 12",
    ),
    "unknown schema version": (
        lambda t: _quantize(t, _policy(t, {"schema": "aq-brevitas/policy/v9", "layers": {}})),
        r"policy schema 'aq-brevitas/policy/v9' is not supported",
    ),
    "unknown policy key": (
        lambda t: _quantize(t, _policy(t, {"schema": SCHEMA, "layers": {}, "bits": 4})),
        r"policy has unknown key 'bits'",
    ),
    "unknown spec key": (
        lambda t: _quantize(
            t, _policy(t, {"schema": SCHEMA, "layers": {"fc1": {"weight_bit_width": 4, "wbits": 4}}})
        ),
        r"layer 'fc1': unknown key 'wbits'",
    ),
    "bits 0": (
        lambda t: _quantize(t, _policy(t, {"schema": SCHEMA, "layers": {"fc1": {"weight_bit_width": 0}}})),
        r"layer 'fc1': weight_bit_width=0 is out of range",
    ),
    "bits 9": (
        lambda t: _quantize(t, _policy(t, {"schema": SCHEMA, "layers": {"fc1": {"weight_bit_width": 9}}})),
        r"layer 'fc1': weight_bit_width=9 is out of range",
    ),
    "bits 33": (
        lambda t: _quantize(t, _policy(t, {"schema": SCHEMA, "layers": {"fc1": {"weight_bit_width": 33}}})),
        r"layer 'fc1': weight_bit_width=33 is out of range",
    ),
    "bits -1": (
        lambda t: _quantize(t, _policy(t, {"schema": SCHEMA, "layers": {"fc1": {"weight_bit_width": -1}}})),
        r"layer 'fc1': weight_bit_width=-1 is out of range",
    ),
    "bits as string": (
        lambda t: _quantize(t, _policy(t, {"schema": SCHEMA, "layers": {"fc1": {"weight_bit_width": "4"}}})),
        r"layer 'fc1': weight_bit_width must be an integer, got '4'",
    ),
    "unknown layer name": (
        lambda t: _quantize(t, _policy(t, {"schema": SCHEMA, "layers": {"fc9": {"weight_bit_width": 4}}})),
        r"policy names layer 'fc9', which the model does not have",
    ),
    "missing layer names": (
        lambda t: _quantize(t, _policy(t, {"schema": SCHEMA, "layers": {"fc1": {"weight_bit_width": 4}}})),
        r"no spec and no default for layers conv1, conv2, fc2 .*--allow-partial",
    ),
    "policy with only a schema": (
        lambda t: _quantize(t, _policy(t, {"schema": SCHEMA})),
        r"covers none of the model's layers \(conv1, conv2, fc1, fc2\)",
    ),
    "missing policy file": (
        lambda t: _quantize(t, str(t / "none.json")),
        r"policy file {tmp}/none\.json does not exist",
    ),
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
            "--calib-images",
            "16",
            "--val-images",
            "0",
        ],
        r"budget avg_weight_bits=1\.5 is infeasible",
    ),
    "budget non-positive": (
        lambda t: [
            "search",
            "--model",
            "cnn-pgd",
            "--budget",
            "avg-bits=0",
            "--calib-images",
            "16",
            "--val-images",
            "0",
        ],
        r"budget avg_weight_bits=0\.0 must be a positive number",
    ),
    "budget unparsable": (
        lambda t: [
            "search",
            "--model",
            "cnn-pgd",
            "--budget",
            "four-bits",
            "--calib-images",
            "16",
            "--val-images",
            "0",
        ],
        r"cannot parse budget 'four-bits'",
    ),
    "eps negative": (
        lambda t: ["evaluate", "--model", "cnn-pgd", "--eps", "-0.1", "--images", "8"],
        r"eps=-0\.1 is outside \[0, 1\]",
    ),
    "eps above one": (
        lambda t: ["evaluate", "--model", "cnn-pgd", "--eps", "1.5", "--images", "8"],
        r"eps=1\.5 is outside \[0, 1\]",
    ),
    "eps NaN": (
        lambda t: ["evaluate", "--model", "cnn-pgd", "--eps", "nan", "--images", "8"],
        r"eps must be a number, got nan",
    ),
    "missing checkpoint": (
        lambda t: ["evaluate", "--model", str(t / "none.pt"), "--images", "8"],
        r"{tmp}/none\.pt\b.*does not exist",
    ),
    "empty checkpoint": (
        lambda t: ["evaluate", "--model", _ckpt(t, "empty"), "--images", "8"],
        r"checkpoint {tmp}/model\.pt is empty",
    ),
    "truncated checkpoint": (
        lambda t: ["evaluate", "--model", _ckpt(t, "truncated"), "--images", "8"],
        r"checkpoint {tmp}/model\.pt is truncated or not a torch checkpoint",
    ),
    "foreign checkpoint": (
        lambda t: ["evaluate", "--model", _ckpt(t, "foreign"), "--images", "8"],
        # Random bytes: refused as an unsafe or unreadable pickle, depending on the bytes.
        r"checkpoint {tmp}/model\.pt (is truncated|is not a readable|contains pickled Python objects)",
    ),
    "pickle payload checkpoint": (
        lambda t: ["evaluate", "--model", _ckpt(t, "pickle"), "--images", "8"],
        r"checkpoint {tmp}/model\.pt contains pickled Python objects and was refused",
    ),
    "NaN/Inf weights": (
        lambda t: ["evaluate", "--model", _ckpt(t, "nan"), "--images", "8"],
        r"{tmp}/model\.pt: tensor conv1\.weight holds NaN/Inf values",
    ),
    "checkpoint of another architecture": (
        lambda t: ["evaluate", "--model", _ckpt(t, "wrong-arch"), "--images", "8"],
        r"{tmp}/model\.pt does not fit .*vgg_bn",
    ),
    "unknown zoo name": (
        lambda t: ["evaluate", "--model", "resnet-huge", "--images", "8"],
        r"'?resnet-huge'? is neither a zoo model nor a file",
    ),
    "unknown architecture": (
        lambda t: ["train", "--arch", "resnet50", "--out", str(t / "out.pt")],
        r"unknown architecture 'resnet50'",
    ),
    "data dir without IDX files": (
        lambda t: ["evaluate", "--model", "cnn-pgd", "--data-dir", _data_dir(t, "empty"), "--images", "8"],
        r"no IDX file matching \S+ in {tmp}/data",
    ),
    "corrupt IDX file": (
        lambda t: ["evaluate", "--model", "cnn-pgd", "--data-dir", _data_dir(t, "corrupt"), "--images", "8"],
        r"IDX file {tmp}/data/t10k-images\S+ holds \d+ data bytes but its header",
    ),
    "missing data dir": (
        lambda t: ["evaluate", "--model", "cnn-pgd", "--data-dir", str(t / "nowhere"), "--images", "8"],
        r"data directory {tmp}/nowhere does not exist .*apt-get install",
    ),
    "non-positive limit": (
        lambda t: ["evaluate", "--model", "cnn-pgd", "--images", "0"],
        r"limit must be positive, got 0",
    ),
    "output dir missing": (
        lambda t: _quantize(t, _good_policy(t), str(t / "no" / "out.pt")),
        r"output directory {tmp}/no of --out {tmp}/no/out\.pt does not exist",
    ),
    "output dir not writable": (
        lambda t: _quantize(t, _good_policy(t), "/proc/aq-out.pt"),
        r"cannot write in /proc .*--out /proc/aq-out\.pt",
    ),
    "quantize --out is a directory": (
        lambda t: _quantize(t, _good_policy(t), _dir(t, "adir")),
        r"--out {tmp}/adir is an existing directory, not a file name .*adir/out\.pt",
    ),
    "export --out is a directory": (
        lambda t: ["export", "--model", "cnn-pgd", "--out", _dir(t, "adir")],
        r"--out {tmp}/adir is an existing directory",
    ),
    "finetune --out is a directory": (
        lambda t: ["finetune", "--model", "cnn-pgd", "--out", _dir(t, "adir")],
        r"--out {tmp}/adir is an existing directory",
    ),
    "score --json is a directory": (
        lambda t: ["score", "--model", "cnn-pgd", "--json", _dir(t, "adir")],
        r"--json {tmp}/adir is an existing directory, not a file name .*adir/out\.json",
    ),
    "score --plot with an unknown extension": (
        lambda t: ["score", "--model", "cnn-pgd", "--plot", str(t / "x.bogus")],
        r"--plot {tmp}/x\.bogus: matplotlib cannot write \.bogus files .*\.png",
    ),
    "search --plot in a missing directory": (
        lambda t: [
            "search",
            "--model",
            "cnn-pgd",
            "--budget",
            "avg-bits=4",
            "--plot",
            str(t / "no" / "p.png"),
        ],
        r"output directory {tmp}/no of --plot {tmp}/no/p\.png does not exist",
    ),
    "train --out in a missing directory": (
        lambda t: ["train", "--arch", "small_cnn", "--out", str(t / "no" / "x.pt"), "--train-images", "64"],
        r"output directory {tmp}/no of --out {tmp}/no/x\.pt does not exist",
    ),
    "evaluate --report in a missing directory": (
        lambda t: ["evaluate", "--model", "cnn-pgd", "--images", "8", "--report", str(t / "no" / "r.json")],
        r"output directory {tmp}/no of --report {tmp}/no/r\.json does not exist",
    ),
    "study --out prefix in a missing directory": (
        lambda t: ["study", "--test-images", "8", "--out", str(t / "no" / "study")],
        r"output directory {tmp}/no of --out {tmp}/no/study\.json does not exist",
    ),
    "validate-metric --out whose .json is a directory": (
        lambda t: [
            "validate-metric",
            "--model",
            "cnn-pgd",
            "--budget",
            "avg-bits=4",
            "--out",
            _dir(t, "vm.json")[: -len(".json")],
        ],
        r"--out {tmp}/vm\.json is an existing directory",
    ),
    "export of a float model": (
        lambda t: ["export", "--model", "cnn-pgd", "--out", str(t / "out.pt")],
        r"cnn-pgd is a float model .*aq-brevitas quantize",
    ),
    "finetune of a float model": (
        lambda t: ["finetune", "--model", "cnn-pgd", "--out", str(t / "out.pt")],
        r"cnn-pgd is a float model .*aq-brevitas quantize",
    ),
    "run --out is a file": (
        lambda t: ["run", "--model", "cnn-pgd", "--out", str(t / "out.pt")],
        r"{tmp}/out\.pt is a file",
    ),
    "torchrun world size without rendezvous": (
        lambda t: ["finetune", "--model", "cnn-pgd", "--out", str(t / "out.pt")],
        r"WORLD_SIZE=2",
    ),
}
# torchrun sets WORLD_SIZE, RANK, MASTER_ADDR and MASTER_PORT together; a WORLD_SIZE alone is a broken launch.
ENV = {"torchrun world size without rendezvous": {"WORLD_SIZE": "2"}}


def _tree(root) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


# These run as a user runs them, in their own process (exit code, stderr, no traceback); the rest call
# the CLI's main() here, which is the same code without a second interpreter start per case.
IN_A_PROCESS = {"torchrun world size without rendezvous", "malformed JSON", "pickle payload checkpoint"}


def _cli(case, args, capsys, monkeypatch) -> tuple[int, str]:
    if case in IN_A_PROCESS:
        res = run_cli(*args, env=ENV.get(case))
        return res.returncode, res.stderr
    for key, value in ENV.get(case, {}).items():
        monkeypatch.setenv(key, value)
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_bad_input(case, tmp_path, capsys, monkeypatch):
    build, expected = CLI_CASES[case]
    (tmp_path / "out.pt").write_bytes(SENTINEL)
    args = build(tmp_path)
    before = _tree(tmp_path)
    code, err = _cli(case, args, capsys, monkeypatch)
    assert code == 2, (case, code, err[-800:])
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("aq-brevitas: error:")]
    assert len(errors) == 1, err[-800:]
    assert re.search(expected.replace("{tmp}", re.escape(str(tmp_path))), errors[0]), errors[0]
    assert "-- fix:" in errors[0]
    assert _tree(tmp_path) == before  # nothing written, pre-existing outputs (out.pt) left intact
    assert not (tmp_path / "pwned").exists()


def test_every_output_option_is_checked_up_front():
    """Each option that names an output file is in the CLI's up-front check (``run --out`` is a directory)."""
    from aq_brevitas.cli import OUTPUT_OPTIONS, OUTPUT_PREFIXES, build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for command, parser in sub.choices.items():
        dests = {a.dest for a in parser._actions} & {"out", "report", "json", "plot"}
        checked = {d for d, _, _ in OUTPUT_OPTIONS.get(command, ())}
        checked |= {"out"} if command in OUTPUT_PREFIXES else set()
        assert dests - checked <= ({"out"} if command == "run" else set()), command


def test_every_warning_has_a_fix():
    from test_reference import reference

    rows = reference.warning_catalogue()
    assert {m for m, _, _ in rows} >= {"ao.fx", "quantization.convert", "nnutils", "score.lipschitz"}
    assert not [(m, msg) for m, msg, fix in rows if not fix.strip()]


def _model():
    return aq.load_float_model("cnn-pgd")[0]


def _bad_spec(bits: int) -> aq.LayerSpec:
    """A spec altered after construction (the only way a bad LayerSpec can reach a policy)."""
    spec = aq.LayerSpec(4)
    object.__setattr__(spec, "weight_bit_width", bits)
    return spec


# Each case: (call, regex its one-line message must match: the offending thing by name or value).
API_CASES = {
    "inputs outside [0, 1]": (
        lambda: aq.accuracy(_model(), torch.rand(4, 1, 28, 28) * 2, torch.zeros(4, dtype=torch.long)),
        r"inputs span \[[0-9.e-]+, 2\], outside \[0, 1\]",
    ),
    "inputs of integer dtype": (
        lambda: aq.accuracy(
            _model(), torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)
        ),
        r"inputs have dtype torch\.uint8",
    ),
    "inputs of the wrong shape": (
        lambda: aq.lipschitz_scores(_model(), torch.rand(2, 3, 5, 5)),
        r"inputs of shape \(2, 3, 5, 5\)",
    ),
    "attack on wrong-shape inputs": (
        lambda: aq.attack_accuracy(_model(), torch.rand(2, 3, 5, 5), torch.zeros(2, dtype=torch.long)),
        r"inputs of shape \(2, 3, 5, 5\)",
    ),
    "model without quantizable layers": (
        lambda: aq.quantize(nn.Sequential(nn.ReLU()), aq.LayerwisePolicy(default=aq.LayerSpec(4))),
        r"model has no quantizable layers",
    ),
    "policy that is not a LayerwisePolicy": (
        lambda: aq.quantize(_model(), {"fc1": 4}),
        r"policy is a dict, not a LayerwisePolicy",
    ),
    "budget with two kinds": (
        lambda: aq.Budget(avg_weight_bits=4, bops=1e6),
        r"exactly one of avg_weight_bits, weight_bytes, bops, got 2",
    ),
    "eps NaN in search": (
        lambda: aq.search_policy(
            _model(), aq.load_split("val", limit=16), "avg-bits=4", config=aq.SearchConfig(eps=float("nan"))
        ),
        r"eps must be a number, got nan",
    ),
    "1-bit layer in torch.ao": (
        lambda: aq.to_qconfig_mapping(aq.LayerwisePolicy({"fc1": aq.LayerSpec(1)})),
        r"1-bit weights cannot be expressed in torch\.ao",
    ),
    "bad spec inside a policy": (
        lambda: aq.LayerwisePolicy({"fc1": _bad_spec(9)}),
        r"layer 'fc1': weight_bit_width=9 is out of range",
    ),
    "cost of a model of unknown input shape": (
        lambda: aq.LayerwisePolicy(default=aq.LayerSpec(4)).cost(nn.Sequential(nn.Linear(3, 2))),
        r"cost of a Sequential needs an example input",
    ),
}


@pytest.mark.parametrize("case", sorted(API_CASES))
def test_api_bad_input(case):
    call, expected = API_CASES[case]
    with pytest.raises(AqError) as err:
        call()
    msg = str(err.value)
    assert "\n" not in msg and "-- fix:" in msg
    assert re.search(expected, msg), msg


def test_policy_missing_layers_warns_by_name_and_records_it():
    with pytest.warns(
        UserWarning, match=r"no spec and no default for layers conv1, conv2, fc2; they stay float"
    ):
        q = aq.quantize(model := _model(), aq.LayerwisePolicy({"fc1": aq.LayerSpec(4)}))
    record = {c.name: c.new for c in layer_changes(model, q)}
    assert record["fc1"].startswith("QuantLinear 4b") and record["conv1"] == "Conv2d float (kept float)"
    assert isinstance(q.conv1, nn.Conv2d) and not isinstance(q.conv1, qnn.QuantConv2d)


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


def test_index_page_counts_match_the_catalogue():
    """docs/index.md states the catalogue's size; keep it in step with the cases above."""
    import re
    from pathlib import Path

    text = " ".join((Path(__file__).parents[1] / "docs" / "index.md").read_text().split())
    m = re.search(
        r"(\d+) bad inputs tried in the catalogue \((\d+) through the CLI, (\d+) through the API\)", text
    )
    assert m, "docs/index.md lost its hardening counts line"
    assert tuple(map(int, m.groups())) == (len(CLI_CASES) + len(API_CASES), len(CLI_CASES), len(API_CASES))
