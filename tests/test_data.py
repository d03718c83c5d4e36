import gzip
import shutil
import struct

import numpy as np
import pytest
import torch

from aq_brevitas.data import VAL_SIZE, load_split, make_loader, read_idx, resolve_data_dir
from aq_brevitas.errors import DataError


def _write_idx(path, array: np.ndarray, gz: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def test_real_fashion_mnist_shapes_and_range():
    x, y = load_split("test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (10000,) and y.dtype == torch.int64
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.99
    assert set(y.unique().tolist()) == set(range(10))


def test_train_val_split_is_disjoint_and_sized():
    xt, _ = load_split("train")
    xv, _ = load_split("val")
    xf, _ = load_split("train-full")
    assert len(xt) == 60000 - VAL_SIZE and len(xv) == VAL_SIZE and len(xf) == 60000
    assert torch.equal(torch.cat([xt, xv]), xf)


def test_limit_is_seeded_subset():
    a, ya = load_split("test", limit=100, seed=3)
    b, yb = load_split("test", limit=100, seed=3)
    c, _ = load_split("test", limit=100, seed=4)
    assert a.shape[0] == 100 and torch.equal(a, b) and torch.equal(ya, yb)
    assert not torch.equal(a, c)


def test_loader_batches():
    loader = make_loader("val", batch_size=64, limit=200)
    xb, yb = next(iter(loader))
    assert xb.shape == (64, 1, 28, 28) and yb.shape == (64,)
    assert sum(len(b[1]) for b in loader) == 200


def test_any_directory_via_env(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", VAL_SIZE + 20), ("t10k", 30)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)), gz=True)
    monkeypatch.setenv("AQ_DATA_DIR", str(tmp_path))
    x, y = load_split("test")
    assert x.shape == (30, 1, 28, 28) and y.shape == (30,)
    assert len(load_split("train")[0]) == 20


def test_wrong_magic_is_detected(tmp_path):
    bad = tmp_path / "t10k-images-idx3-ubyte"
    bad.write_bytes(b"\x12\x34\x08\x03" + b"\x00" * 100)
    with pytest.raises(DataError, match="wrong magic"):
        read_idx(bad)


def test_truncated_file_is_detected(tmp_path):
    src = sorted(resolve_data_dir().glob("t10k-labels*"))[0]
    raw = gzip.decompress(src.read_bytes())
    cut = tmp_path / "t10k-labels-idx1-ubyte"
    cut.write_bytes(raw[:-7])
    with pytest.raises(DataError, match="data bytes but its header"):
        read_idx(cut)


def test_truncated_gzip_is_detected(tmp_path):
    src = sorted(resolve_data_dir().glob("t10k-labels*"))[0]
    cut = tmp_path / "t10k-labels-idx1-ubyte.gz"
    cut.write_bytes(src.read_bytes()[:2000])
    with pytest.raises(DataError, match="truncated gzip"):
        read_idx(cut)


def test_missing_directory_names_the_fix(tmp_path):
    with pytest.raises(DataError) as err:
        load_split("test", tmp_path / "nope")
    msg = str(err.value)
    assert "nope" in msg and "apt-get install" in msg and "\n" not in msg


def test_directory_without_idx_files(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="no IDX file"):
        load_split("test", tmp_path)


def test_mismatched_images_and_labels(tmp_path):
    src = resolve_data_dir()  # AQ_DATA_DIR or the default, as the loader resolves it
    shutil.copy(sorted(src.glob("t10k-images*"))[0], tmp_path)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(5))
    with pytest.raises(DataError, match="disagree"):
        load_split("test", tmp_path)


def test_data_dir_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv("AQ_DATA_DIR", str(tmp_path))
    assert resolve_data_dir() == tmp_path
    (tmp_path / "other").mkdir()
    assert resolve_data_dir(tmp_path / "other") == tmp_path / "other"  # the argument wins
    monkeypatch.setenv("AQ_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(DataError, match="missing does not exist"):
        resolve_data_dir()


def test_unknown_split():
    with pytest.raises(DataError, match="unknown split"):
        load_split("validation")


def test_idx_files_of_any_shape_and_type(tmp_path):
    """3-D files are one-channel images (N×1×H×W); 2-D, 4-D and deeper files keep their shape (channels
    first); pixel bytes are scaled to [0, 1], floats kept; ``name.idxN-ubyte`` spellings are found."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 3, 16, 16))
    _write_idx(tmp_path / "train-images-idx4-ubyte.gz", rgb, gz=True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", rng.integers(0, 10, (6,)))
    signals = rng.random((4, 2, 3, 5, 7)).astype(">f4")
    raw = bytes([0, 0, 0x0D, 5]) + struct.pack(">5I", *signals.shape) + signals.tobytes()
    (tmp_path / "t10k-images.idx5-ubyte").write_bytes(raw)
    _write_idx(tmp_path / "t10k-labels.idx1-ubyte", rng.integers(0, 10, (4,)))
    x, y = load_split("train-full", tmp_path)
    assert x.shape == (6, 3, 16, 16) and torch.equal(x, torch.from_numpy(rgb).float() / 255) and len(y) == 6
    xt, _ = load_split("test", tmp_path)
    assert xt.shape == (4, 2, 3, 5, 7) and torch.equal(xt, torch.from_numpy(signals.astype(np.float32)))
    flat = tmp_path / "flat"
    flat.mkdir()
    _write_idx(flat / "t10k-images-idx2-ubyte", rng.integers(0, 256, (3, 12)))
    _write_idx(flat / "t10k-labels-idx1-ubyte", rng.integers(0, 10, (3,)))
    assert load_split("test", flat)[0].shape == (3, 12)


def test_idx_images_that_are_neither_bytes_nor_floats_are_refused(tmp_path):
    ints = np.arange(8 * 4, dtype=">i4").reshape(8, 2, 2)
    raw = bytes([0, 0, 0x0C, 3]) + struct.pack(">3I", *ints.shape) + ints.tobytes()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(raw)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(8))
    with pytest.raises(DataError, match="neither pixel bytes nor floats") as err:
        load_split("test", tmp_path)
    assert "\n" not in str(err.value)
