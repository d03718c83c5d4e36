"""`aq.run` on the user's own model and data (issue 14, kinds f and g), on small models of our own.

Signals (N×C×L) and RGB images of any size run end to end from tensors or a directory of IDX files;
a normalised model gets normalization=(mean, std) in every stage; the data is part of each stage's
fingerprint; bad data and a mean/std of the wrong length are one line, before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import aq_brevitas as aq
from aq_brevitas.attacks import normalized_inputs
from aq_brevitas.data import load_split
from aq_brevitas.errors import ConfigError, DataError, ModelError
from aq_brevitas.pipeline.config import STAGES, RunConfig
from aq_brevitas.pipeline.data import RunData, prepare_data
from aq_brevitas.pipeline.job import run
from conftest import run_cli

TINY = RunConfig(
    calib_images=6,
    val_images=6,
    finetune_images=16,
    finetune_steps=1,
    test_images=8,
    pgd_steps=1,
    eval_eps=(0.1,),
    target="generic",  # these tests are about the data; FINN's steps run in test_pipeline and test_demo
)
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


class Signal1d(nn.Module):
    """A Conv1d classifier of 3×L signals (any L)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(3, 6, 5, padding=2)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(2))


class MeanSign(nn.Module):
    """A 3×16×16 CNN whose class is the sign of its input's mean: right on normalised inputs only.

    The conv averages a 3×3×3 patch and the head reads +mean / -mean, so on images of class 1 (bright)
    and 0 (dark) it is 100% accurate when fed (x - 0.5) / 0.25, and says "1" for everything in [0, 1].
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.conv.weight.fill_(1 / 27)
            self.conv.bias.zero_()
            self.fc.weight.copy_(torch.tensor([[-1.0] * 4, [1.0] * 4]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def _signals(n: int, length: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = (0.2 + 0.15 * y[:, None, None] + 0.1 * torch.rand(n, 3, length, generator=g)).clamp(0, 1)
    return x, y


def _bright_or_dark(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = 0.05 + 0.4 * torch.rand(n, 3, 16, 16, generator=g) + 0.5 * y[:, None, None, None]
    return x, y


def _write_idx(path, array: np.ndarray) -> None:
    """An uncompressed IDX file of unsigned bytes (type 0x08), any number of dimensions."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _idx_dir(folder, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor]):
    folder.mkdir()
    for prefix, (x, y) in (("train", train), ("t10k", test)):
        _write_idx(folder / f"{prefix}-images-idx{x.dim()}-ubyte", (x * 255).round().numpy())
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", y.numpy())
    return folder


@pytest.fixture(scope="module")
def signal_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("signal") / "r"
    x, y = _signals(48)
    data = RunData(train=(x[:40], y[:40]), test=(x[40:], y[40:]))
    return out, run(Signal1d(), out, TINY, data=data, progress=False), data


def test_a_conv1d_signal_model_runs_on_its_own_tensors_and_the_report_shows_the_shapes(signal_run):
    out, result, _ = signal_run
    assert result.skipped == [] and [r.name.split(" ")[0] for r in result.rows] == [
        "float", "uniform", "aq-brevitas"
    ]  # fmt: skip
    document = json.loads((out / "report.json").read_text())
    assert document["data"]["sample_shape"] == [3, 64]
    # Selection draws 6 + 6 from the 40 training samples; fine-tuning reads 16 of the other 28.
    assert document["data"]["images"] == {"calib": 6, "held_out": 6, "train": 16, "test": 8}
    text = (out / "report.md").read_text()
    assert "inputs of shape N×3×64" in text and "from the training data" in text
    policy = json.loads((out / "policy.json").read_text())
    assert set(policy["layers"]) == {"conv", "fc"}
    assert all(r.parity.max_abs_diff <= r.parity.allowed for r in result.rows[1:])


def test_the_data_is_part_of_the_fingerprint(signal_run, tmp_path, capsys):
    """Same data: every stage skipped. Other test data of the same shape: evaluate and export redo."""
    folder, _, data = signal_run
    out = tmp_path / "r"
    shutil.copytree(folder, out)
    assert run(Signal1d(), out, TINY, data=data, progress=False).skipped == list(STAGES)
    # The same samples through a shuffling DataLoader and a Dataset are the same data.
    loader = DataLoader(TensorDataset(*data.train), batch_size=7, shuffle=True)
    same = RunData(train=loader, test=TensorDataset(*data.test))
    assert run(Signal1d(), out, TINY, data=same, progress=False).skipped == list(STAGES)
    capsys.readouterr()
    x, y = _signals(8, seed=5)
    result = run(Signal1d(), out, TINY, data=dataclasses.replace(data, test=(x, y)), progress=False)
    assert "[evaluate] redoing: changed: the test data" in capsys.readouterr().out
    assert result.skipped == ["score", "search", "quantize", "finetune"]


def test_a_normalised_rgb_model_gets_its_normalisation_in_every_stage(tmp_path, monkeypatch):
    import aq_brevitas.train.training

    seen = []
    real = aq_brevitas.train.training.adversarial_train

    def recording(model, data, config, **kwargs):
        seen.append(config.normalization)
        return real(model, data, config, **kwargs)

    monkeypatch.setattr(aq_brevitas.train.training, "adversarial_train", recording)
    x, y = _bright_or_dark(40)
    data = RunData(train=(x[:16], y[:16]), held_out=(x[16:30], y[16:30]), test=(x[30:], y[30:]))
    cfg = dataclasses.replace(TINY, normalization=(MEAN, STD), eps=0.02)
    result = run(MeanSign(), tmp_path / "r", cfg, data=data, progress=False)
    # Evaluation: the model is right only on normalised inputs (it says "1" for every raw image).
    assert result.rows[0].clean == 1.0
    assert aq.accuracy(MeanSign(), x[30:], y[30:]) == 0.5
    assert seen == [(MEAN, STD)] * 2  # fine-tuning, both models
    robustness = json.loads((tmp_path / "r" / "robustness_searched.json").read_text())
    assert robustness["settings"]["normalization"] == [list(MEAN), list(STD)]
    meta = json.loads((tmp_path / "r" / "policy.json").read_text())["meta"]
    assert meta["normalization"] == [list(MEAN), list(STD)]  # the search ran normalised
    document = json.loads((tmp_path / "r" / "report.json").read_text())
    assert document["data"]["sample_shape"] == [3, 16, 16]
    assert document["data"]["images"]["train"] == 16  # held-out data given: all training data fine-tunes
    assert "std [0.25, 0.25, 0.25]" in (tmp_path / "r" / "report.md").read_text()
    # The scores (the first layer's input norm A above all) are those of the normalised inputs.
    calib = prepare_data(MeanSign(), data, cfg).calib[0]
    model = MeanSign()
    with normalized_inputs(model, (MEAN, STD)):
        expected = aq.lipschitz_scores(model, calib, seed=cfg.seed)
    scores = json.loads((tmp_path / "r" / "scores.json").read_text())
    assert scores["conv"]["A"] == pytest.approx(expected["conv"].A)
    assert scores["conv"]["A"] != pytest.approx(aq.lipschitz_scores(model, calib, seed=cfg.seed)["conv"].A)


def test_an_idx_directory_of_signals_loads_through_data_py_and_runs(tmp_path):
    """N×3×64 signals in 3-D IDX files: data.py reads one-channel images N×1×3×64, the run sees that the
    Conv1d model takes N×3×64 and feeds that; a directory this small selects from its training data."""
    x, y = _signals(48)
    folder = _idx_dir(tmp_path / "idx", (x[:40], y[:40]), (x[40:], y[40:]))
    xs, ys = load_split("test", folder)
    assert xs.shape == (8, 1, 3, 64) and torch.equal(ys, y[40:])
    assert (xs[:, 0] - x[40:]).abs().max() <= 0.5 / 255 + 1e-6
    result = run(Signal1d(), tmp_path / "r", TINY, data=str(folder), progress=False)
    document = json.loads((tmp_path / "r" / "report.json").read_text())
    assert document["data"]["sample_shape"] == [3, 64] and str(folder) in document["data"]["source"]
    assert result.rows[0].name == "float"


def test_an_idx_directory_of_rgb_images_any_size(tmp_path):
    """4-D IDX files (N×3×16×16, channels first) come back as stored; RunConfig.data_dir reads them."""
    x, y = _bright_or_dark(40)
    folder = _idx_dir(tmp_path / "rgb", (x[:32], y[:32]), (x[32:], y[32:]))
    xs, _ = load_split("train-full", folder)
    assert xs.shape == (32, 3, 16, 16) and 0 <= xs.min() and xs.max() <= 1
    data = RunData.from_idx(folder)
    assert data.held_out is None and len(data.train[1]) == 32  # under 5,000 images: no val split
    cfg = dataclasses.replace(TINY, data_dir=str(folder), normalization=(MEAN, STD), eps=0.02)
    result = run(MeanSign(), tmp_path / "r", cfg, progress=False)
    assert result.rows[0].clean == 1.0


def _one_line(info) -> str:
    text = str(info.value)
    assert "\n" not in text and " -- fix: " in text
    return text


def test_a_mean_std_of_the_wrong_length_is_one_line_before_anything_is_written(tmp_path):
    x, y = _bright_or_dark(24)
    data = RunData(train=(x[:16], y[:16]), test=(x[16:], y[16:]))
    cfg = dataclasses.replace(TINY, normalization=((0.5, 0.5), (0.25, 0.25)))
    with pytest.raises(ConfigError) as info:
        run(MeanSign(), tmp_path / "r", cfg, data=data)
    assert "has 2 values but the samples (3×16×16) have 3 channels" in _one_line(info)
    with pytest.raises(ConfigError) as info:
        run(MeanSign(), tmp_path / "r", dataclasses.replace(TINY, normalization=((0.5,), (-1.0,))), data=data)
    assert "positive stds" in _one_line(info)
    assert not (tmp_path / "r").exists()


BAD_DATA = {
    "a bare (x, y) pair": (lambda x, y: (x, y), ConfigError, "not RunData or an IDX directory"),
    "images and labels of different lengths": (
        lambda x, y: RunData(train=(x, y[:-1]), test=(x, y)), ConfigError, "40 images but 39 labels"
    ),
    "no labels": (lambda x, y: RunData(train=x, test=(x, y)), ConfigError, "has no labels"),
    "an int for data": (lambda x, y: RunData(train=3, test=(x, y)), ConfigError, "of type int"),
    "values outside [0, 1]": (
        lambda x, y: RunData(train=(x * 4 - 2, y), test=(x, y)), ConfigError, "outside [0, 1]"
    ),
    "samples of two shapes": (
        lambda x, y: RunData(train=(x, y), test=(x[:, :, :32], y)), DataError, "train 3×64, test 3×32"
    ),
    "labels beyond the classes": (
        lambda x, y: RunData(train=(x, y + 4), test=(x, y)), DataError, "but the model has 4 classes"
    ),
    "images the forward refuses": (
        lambda x, y: RunData(train=(x[:, :2], y), test=(x[:, :2], y)), ModelError,
        "model forward raised RuntimeError on inputs of shape (1, 2, 64)",
    ),
    "one test sample": (lambda x, y: RunData(train=(x, y), test=(x[:1], y[:1])), DataError, "holds 1 sample"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_one_line_before_anything_is_written(case, tmp_path):
    make, error, text = BAD_DATA[case]
    x, y = _signals(40)
    with pytest.raises(error) as info:
        run(Signal1d(), tmp_path / "r", TINY, data=make(x, y))
    assert text in _one_line(info)
    assert not (tmp_path / "r").exists()


def test_the_default_data_refused_by_the_model_says_how_to_pass_its_own(tmp_path):
    with pytest.raises(ModelError) as info:
        run(Signal1d(), tmp_path / "r", TINY)
    text = _one_line(info)
    assert "default data: N×1×28×28 images" in text and "data=RunData(train=(x, y)" in text
    assert "--data-dir" in text and "conv1d" in text  # the forward's own message is kept
    with pytest.raises(ConfigError, match="pass one of them"):
        run(Signal1d(), tmp_path / "r", dataclasses.replace(TINY, data_dir=str(tmp_path)), data=str(tmp_path))
    assert not (tmp_path / "r").exists()


def test_a_model_of_two_inputs_or_without_logits_is_refused_in_one_line(tmp_path):
    class TwoInputs(nn.Module):
        def forward(self, a, b):
            return a + b

    class Features(Signal1d):
        def forward(self, x):
            return torch.relu(self.conv(x))

    x, y = _signals(24)
    data = RunData(train=(x[:16], y[:16]), test=(x[16:], y[16:]))
    with pytest.raises(ModelError) as info:
        run(TwoInputs(), tmp_path / "r", TINY, data=data)
    assert "aq.run takes single-input models" in _one_line(info)
    with pytest.raises(ModelError) as info:
        run(Features(), tmp_path / "r", TINY, data=data)
    assert "returning (N, classes) logits; the model returns shape (1, 6, 64)" in _one_line(info)
    assert not (tmp_path / "r").exists()


def test_a_run_gives_the_model_back_in_its_own_mode(signal_run, tmp_path):
    model = Signal1d().train()
    model.conv.eval()
    x, y = _signals(8)
    with pytest.raises(DataError):  # fails after the model checks: the mode is restored all the same
        run(model, tmp_path / "r", TINY, data=RunData(train=(x, y + 4), test=(x, y)))
    assert model.training and not model.conv.training and model.fc.training


def test_cli_run_on_an_idx_directory_the_zoo_model_refuses_and_a_mean_of_the_wrong_length(tmp_path):
    x, y = _bright_or_dark(24)
    folder = _idx_dir(tmp_path / "rgb", (x[:16], y[:16]), (x[16:], y[16:]))
    cases = (
        (["--data-dir", str(folder)], "model forward raised"),
        (
            ["--mean", "0.5", "0.5", "--std", "0.2", "0.2"],
            "has 2 values but the samples (1×28×28) have 1 channel",
        ),
    )
    for extra, text in cases:
        res = run_cli("run", "--model", "cnn-pgd", "--out", str(tmp_path / "r"), *extra)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("aq-brevitas: error:")]
        assert len(errors) == 1 and text in errors[0], res.stderr
    assert not (tmp_path / "r").exists()


def test_cli_mean_and_std_go_together():
    from aq_brevitas.cli import build_parser
    from aq_brevitas.cli.options import normalization_of

    parse = build_parser().parse_args
    base = ["run", "--model", "m", "--out", "o"]
    assert normalization_of(parse(base)) is None
    assert normalization_of(parse([*base, "--mean", "0.5", "0.4", "--std", "0.2", "0.3"])) == (
        (0.5, 0.4), (0.2, 0.3)
    )  # fmt: skip
    for extra, text in (
        (["--mean", "0.5"], "--mean is given without --std"),
        (["--std", "0.5"], "--std is given without --mean"),
        (["--mean", "0.5", "0.5", "--std", "0.2"], "--mean has 2 value(s) but --std 1"),
    ):
        with pytest.raises(ConfigError, match=None) as info:
            normalization_of(parse([*base, *extra]))
        assert text in _one_line(info)
