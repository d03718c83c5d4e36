"""IDX datasets (Fashion-MNIST, MNIST or your own, of any sample shape) as float tensors and DataLoaders.

The directory is, in order: the ``data_dir`` argument, the ``AQ_DATA_DIR`` environment variable,
then Debian's ``dataset-fashion-mnist`` location (the default data). It holds a training and a test
pair of IDX files named like Fashion-MNIST's: ``train-images-idx3-ubyte[.gz]`` and
``train-labels-idx1-ubyte[.gz]``, ``t10k-…`` or ``test-…`` for the test pair (any ``idxN``; a dot
before it, ``train-images.idx3-ubyte``, works too). Samples keep the shape stored after N, channels
first, except that N×H×W files (one-channel images, as Fashion-MNIST's 28×28) come back as N×1×H×W:
N×C×H×W images (e.g. 3×32×32), N×F vectors and so on as stored. Pixel bytes (``uint8``) are scaled
to [0, 1]; float files are taken as they are. Splits:

* ``train``: all but the last 5,000 training images (Fashion-MNIST's first 55,000) -- what the zoo
  models were trained on;
* ``val``: the last 5,000 training images, never trained on -- for selection and calibration checks;
* ``train-full``: all the training images;
* ``test``: the test images -- for reporting only.
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
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] < 1:
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
    """The first ``*PREFIX*KIND-idxN-ubyte[.gz]`` (or ``KIND.idxN``) file of ``directory``."""
    for prefix in prefixes:
        hits = sorted(directory.glob(f"*{prefix}*{kind}[-.]idx[0-9]-ubyte*"))
        if hits:
            return hits[0]
    want = f"{prefixes[0]}-{kind}-idxN-ubyte[.gz]"
    raise DataError(f"no IDX file matching *{want} in {directory}", _FIX)


@lru_cache(maxsize=8)
def _load_raw(directory: str, which: str) -> tuple[np.ndarray, np.ndarray]:
    d = Path(directory)
    prefixes = ("train",) if which == "train" else ("t10k", "test")
    images = read_idx(_find(d, prefixes, "images"))
    labels = read_idx(_find(d, prefixes, "labels"))
    if images.ndim < 2 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"IDX files in {d} disagree: images {images.shape} vs labels {labels.shape}",
            "use image/label files from the same dataset: N samples and N labels",
        )
    if images.dtype != np.uint8 and images.dtype.kind != "f":
        raise DataError(
            f"IDX images in {d} hold {images.dtype} values, neither pixel bytes nor floats",
            "store pixel bytes (0-255, type 0x08) or floats in [0, 1] (type 0x0D/0x0E)",
        )
    return images, labels


def as_float_samples(images: np.ndarray) -> Any:
    """An IDX array as a float32 tensor: pixel bytes divided by 255, floats as stored; N×H×W arrays
    get a channel dimension (N×1×H×W), other shapes stay as stored."""
    import torch

    x = torch.from_numpy(np.array(images, dtype=np.float32, copy=True))
    if images.dtype == np.uint8:
        x.div_(255.0)
    return x.unsqueeze(1) if x.dim() == 3 else x


def seeded_subset(x: Any, y: Any, limit: int | None, seed: int = 0) -> tuple[Any, Any]:
    """``limit`` samples of ``(x, y)`` drawn at random with ``seed``, kept in their order (all of them
    when ``limit`` is None or at least their number): how every ``limit``/``--…-images N`` subsets."""
    import torch

    if limit is None or limit >= len(x):
        return x, y
    idx, _ = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:limit].sort()
    return x[idx], y[idx]


def load_split(
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    limit: int | None = None,
    seed: int = 0,
):
    """Return ``(images, labels)``: float32 samples (N×1×H×W for Fashion-MNIST, in [0, 1]) and int64 labels.

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
    if limit is not None and limit <= 0:
        raise DataError(
            f"limit must be positive, got {limit}",
            "pass a positive number of images (--images, --train-images or --test-images N)",
        )
    return seeded_subset(as_float_samples(images), torch.from_numpy(labels.astype(np.int64)), limit, seed)


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


def draw_selection(
    data: tuple[Any, Any], calib_images: int, val_images: int, seed: int = 0, *, pool: str = "val images"
) -> tuple[tuple[Any, Any], tuple[Any, Any], Any]:
    """Disjoint seeded calibration and validation draws from ``data`` (an ``(x, y)`` pair), and the
    sorted indices of the samples neither drew. ``pool`` names ``data`` in the error when
    ``calib_images + val_images`` exceed it."""
    import torch

    x, y = data
    if calib_images + val_images > len(y):
        raise ConfigError(
            f"--calib-images {calib_images} + --val-images {val_images} exceed the {len(y)} {pool}",
            "lower them",
        )
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    calib, val = perm[:calib_images], perm[calib_images : calib_images + val_images]
    return (x[calib], y[calib]), (x[val], y[val]), perm[calib_images + val_images :].sort()[0]


def selection_data(
    calib_images: int, val_images: int, seed: int = 0, data_dir: str | os.PathLike[str] | None = None
) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """Disjoint calibration and validation images, both from the held-out ``val`` split (never test).

    The one place that draws selection data from an IDX directory, so the CLI and the benchmarks
    select alike (``aq.run`` draws with :func:`draw_selection` too).
    """
    calib, val, _ = draw_selection(load_split("val", data_dir), calib_images, val_images, seed)
    return calib, val
