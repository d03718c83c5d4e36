import pickle
import random

import pytest
import torch

from aq_brevitas.errors import CheckpointError, ConfigError
from aq_brevitas.models import build_model, load_float_model, save_model
from aq_brevitas.storage import atomic_write_text, load_checkpoint, save_checkpoint


class _Payload:
    """Unpickling this would create a file -- proof of code execution."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_model_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model("vgg_bn").eval()
    path = tmp_path / "m.pt"
    save_model(model, path, {"arch": "vgg_bn", "eps": 0.1})
    loaded, meta = load_float_model(str(path))
    assert meta["eps"] == 0.1
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(model(x), loaded(x))


def test_pickle_payload_is_refused_not_executed(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"state_dict": _Payload(str(target))}))
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not target.exists()


def test_torch_saved_object_payload_is_refused(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _Payload(str(target))}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not target.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all"])
def test_empty_or_foreign_checkpoint(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_random_bytes_are_always_a_checkpoint_error(tmp_path):
    """Garbage makes the unpickler raise many exception types (IndexError, KeyError, ...): all are one error."""
    rng = random.Random(0)
    path = tmp_path / "garbage.pt"
    for _ in range(200):
        path.write_bytes(rng.randbytes(rng.randint(1, 4096)))
        with pytest.raises(CheckpointError, match="not a torch checkpoint|not a readable|refused"):
            load_checkpoint(path)


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "t.pt"
    save_checkpoint(path, {"state_dict": build_model("small_cnn").state_dict()})
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def test_missing_sidecar_names_the_fix(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, {"state_dict": build_model("small_cnn").state_dict()})
    with pytest.raises(CheckpointError, match="sidecar"):
        load_float_model(str(path))


def test_nan_weights_are_refused(tmp_path):
    model = build_model("small_cnn")
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    save_model(model, path, {"arch": "small_cnn"})
    with pytest.raises(Exception, match="NaN"):
        load_float_model(str(path))


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", boom)
    with pytest.raises(ConfigError, match="could not write"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_missing_output_directory(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        atomic_write_text(tmp_path / "no" / "x.txt", "x")
