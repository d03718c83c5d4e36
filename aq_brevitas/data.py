"""IDX datasets (Fashion-MNIST, MNIST) from any directory, as tensors in [0, 1] and DataLoaders.

The directory is, in order: the ``data_dir`` argument, the ``AQ_DATA_DIR`` environment variable,
then Debian's ``dataset-fashion-mnist`` location. Splits:

* ``train``: the first 55,000 training images -- what the zoo models were trained on;
* ``val``: the last 5,000 training images, never trained on -- for selection and calibration checks;
* ``train-full``: all 60,000 training images;
* ``test``: the 10,000 test images -- for reporting only.
"""

from __future__ import annotations

import gzip
import os
import struct
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, DataError

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
VAL_SIZE = 5000
SPLITS = ("train", "val", "train-full", "test")
_FIX = "run `apt-get install -y dataset-fashion-mnist`, or pass --data-dir / set AQ_DATA_DIR to a directory of IDX files"
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory to read: argument, then ``AQ_DATA_DIR``, then the Debian package location."""
    chosen = data_dir if data_dir is not None else os.environ.get("AQ_DATA_DIR") or DEFAULT_DATA_DIR
    path = Path(chosen)
    if not path.is_dir():
        raise DataError(f"data directory {path} does not exist", _FIX)
    return path


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse one IDX file (optionally gzip-compressed), checking its magic number and its length."""
    p = Path(path)
    try:
        raw = p.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(
            f"IDX file {p} is unreadable or a truncated gzip ({type(exc).__name__})", _FIX
        ) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or not 1 <= raw[3] <= 4:
        raise DataError(f"IDX file {p} has a wrong magic number ({raw[:4].hex() or 'empty file'})", _FIX)
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {p} is truncated inside its header", _FIX)
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"IDX file {p} holds {len(raw) - header} data bytes but its header {tuple(dims)} needs {expected}",
            _FIX,
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _find(directory: Path, prefixes: tuple[str, ...], kind: str) -> Path:
    for prefix in prefixes:
        hits = sorted(directory.glob(f"*{prefix}*{kind}*-ubyte*"))
        if hits:
            return hits[0]
    want = f"{prefixes[0]}-{kind}-ubyte[.gz]"
    raise DataError(f"no IDX file matching *{want} in {directory}", _FIX)


@lru_cache(maxsize=8)
def _load_raw(directory: str, which: str) -> tuple[np.ndarray, np.ndarray]:
    d = Path(directory)
    prefixes = ("train",) if which == "train" else ("t10k", "test")
    images = read_idx(_find(d, prefixes, "images-idx3"))
    labels = read_idx(_find(d, prefixes, "labels-idx1"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"IDX files in {d} disagree: images {images.shape} vs labels {labels.shape}",
            "use image/label files from the same dataset",
        )
    return images, labels


def load_split(
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    limit: int | None = None,
    seed: int = 0,
):
    """Return ``(images, labels)``: float32 N×1×H×W in [0, 1] and int64 labels.

    ``limit`` draws a seeded random subset (the same ``seed`` gives the same images).
    """
    import torch

    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}", f"use one of {', '.join(SPLITS)}")
    directory = resolve_data_dir(data_dir)
    images, labels = _load_raw(str(directory.resolve()), "test" if split == "test" else "train")
    if split == "train":
        images, labels = images[:-VAL_SIZE], labels[:-VAL_SIZE]
    elif split == "val":
        images, labels = images[-VAL_SIZE:], labels[-VAL_SIZE:]
    x = torch.from_numpy(np.array(images, copy=True)).float().div_(255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    if limit is not None:
        if limit <= 0:
            raise DataError(f"limit must be positive, got {limit}", "pass --limit N with N >= 1")
        if limit < len(x):
            idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:limit]
            idx, _ = idx.sort()
            x, y = x[idx], y[idx]
    return x, y


def make_loader(
    split: str = "train",
    *,
    batch_size: int = 128,
    limit: int | None = None,
    seed: int = 0,
    shuffle: bool | None = None,
    data_dir: str | os.PathLike[str] | None = None,
):
    """A DataLoader over :func:`load_split`; shuffles (seeded) for training splits by default."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    x, y = load_split(split, data_dir, limit=limit, seed=seed)
    if shuffle is None:
        shuffle = split in ("train", "train-full")
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator)


def selection_data(
    calib_images: int, val_images: int, seed: int = 0, data_dir: str | os.PathLike[str] | None = None
) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """Disjoint calibration and validation images, both from the held-out ``val`` split (never test).

    The one place that draws selection data, so the CLI, ``run`` and the benchmarks select alike.
    """
    import torch

    x, y = load_split("val", data_dir)
    if calib_images + val_images > len(y):
        raise ConfigError(
            f"--calib {calib_images} + --val-images {val_images} exceed the {len(y)} val images",
            "lower them",
        )
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    calib, val = perm[:calib_images], perm[calib_images : calib_images + val_images]
    return (x[calib], y[calib]), (x[val], y[val])
