"""The data of a run: the user's own, or a directory of IDX files, as :func:`~aq_brevitas.pipeline.run`'s stages read it.

:class:`RunData` names the data (training, test and optionally held-out data, each in any form
:func:`~aq_brevitas.forward.as_xy` reads: an ``(x, y)`` pair of tensors, a ``Dataset``, a
``DataLoader``...) or, from :meth:`RunData.from_idx`, the splits of an IDX directory of any sample
shape (Fashion-MNIST by default). :func:`prepare_data` checks it against the model and the settings
and draws what each stage reads (:class:`RunInputs`): the selection images (scores, calibration, the
search's held-out comparison) come from the held-out data, else from the training data (never the
test data, which is for reporting only); fine-tuning reads the training images the selection did not
take; evaluation and export read the test images. Every draw is seeded by ``RunConfig.seed``.

Importing this module does not import torch (the CLI builds its options from the pipeline).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, DataError, ModelError, a_type

if TYPE_CHECKING:
    from torch import nn

    from .config import RunConfig

#: what each stage reads, in the order the report lists them
PARTS = ("calib", "held_out", "train", "test")
_RUN_DATA_FIX = "pass data=RunData(train=(x, y), test=(x_test, y_test)), or a directory of IDX files"


@dataclass
class RunData:
    """The data :func:`~aq_brevitas.pipeline.run` works on: ``run(model, out, config, data=RunData(...))``.

    ``train``: training data; fine-tuning reads a seeded subset of it and, without ``held_out``, the
    selection draws its ``calib_images + val_images`` from it first (fine-tuning then reads only the
    rest). ``test``: reporting only (evaluation; the export's example and parity inputs).
    ``held_out``: optional data for the selection (scores, calibration, the search's comparison with
    uniform), never trained on. Each is an ``(x, y)`` pair of tensors, a ``Dataset``, a ``DataLoader``
    (read through its Dataset, in index order) or an iterable of ``(x, y)`` batches, read into
    memory once per run (random augmentations would make each run's data, and so its stages, new):
    float samples ``(N, *input_shape)`` of
    any shape (N×C×H×W images, N×C×L signals, N×F vectors) with values in [0, 1], where ε is
    measured (a model that expects normalised inputs gets ``RunConfig.normalization``), and integer
    class labels. ``directory`` is the IDX directory :meth:`from_idx` read, else None.
    """

    train: Any
    test: Any
    held_out: Any = None
    directory: str | None = None

    @classmethod
    def from_idx(cls, data_dir: str | os.PathLike[str] | None = None) -> RunData:
        """The splits of an IDX directory (:func:`~aq_brevitas.data.resolve_data_dir`: the argument,
        ``$AQ_DATA_DIR`` or Fashion-MNIST): ``train``, ``val`` as ``held_out`` (the last 5,000
        training images) and ``test``. A directory of at most 5,000 training images has no separate
        ``val``: they are all ``train``, and the selection draws from them. N×H×W files are one-channel
        images (N×1×H×W; :func:`prepare_data` drops that channel for a model that takes N×H×W, e.g.
        N×C×L signals); :class:`~aq_brevitas.errors.DataError` for missing or malformed files."""
        from ..data import load_split, resolve_data_dir

        directory = str(resolve_data_dir(data_dir).resolve())
        test, train = load_split("test", directory), load_split("train", directory)
        if len(train[1]) == 0:  # too few images for the val convention: select from them all
            return cls(load_split("train-full", directory), test, None, directory)
        return cls(train, test, load_split("val", directory), directory)


@dataclass(frozen=True)
class RunInputs:
    """What the stages read, as ``(x, y)`` tensor pairs: ``calib`` (scores, calibration), ``held_out``
    (the search's comparison with uniform), ``train`` (fine-tuning), ``test`` (evaluation, export);
    ``source`` says where they came from, ``digests`` identify each (:func:`~aq_brevitas.evaluate.cache.data_digest`)."""

    calib: tuple[Any, Any]
    held_out: tuple[Any, Any]
    train: tuple[Any, Any]
    test: tuple[Any, Any]
    source: str
    selection_pool: str
    digests: dict[str, str]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one input sample, e.g. (1, 28, 28) or (3, 1024)."""
        return tuple(int(s) for s in self.test[0].shape[1:])

    def describe(self) -> dict[str, Any]:
        """The data as the report records it: source, sample shape and how many images each stage read."""
        counts = {p: len(getattr(self, p)[1]) for p in PARTS}
        return {"source": self.source, "sample_shape": list(self.sample_shape),
                "selection_from": self.selection_pool, "images": counts}  # fmt: skip


def _run_data(data: Any, data_dir: str | None) -> RunData:
    """``data`` as a :class:`RunData`: given, an IDX directory, or (None) ``data_dir``'s IDX files."""
    if data is not None and data_dir is not None:
        raise ConfigError("both data= and RunConfig.data_dir (--data-dir) name the data", "pass one of them")
    if data is None or isinstance(data, (str, os.PathLike)):
        return RunData.from_idx(data if data is not None else data_dir)
    if not isinstance(data, RunData):
        raise ConfigError(f"data is {a_type(data)}, not RunData or an IDX directory", _RUN_DATA_FIX)
    return data


def _read(value: Any, name: str) -> tuple[Any, Any]:
    """One part of the data as checked ``(x, y)`` tensors. A DataLoader over a map-style Dataset is
    read through its Dataset, in index order: a shuffling loader would change the data's digest (and
    redo every stage) on each run."""
    from torch.utils.data import DataLoader, IterableDataset

    from ..forward import as_xy

    if isinstance(value, DataLoader) and not isinstance(value.dataset, IterableDataset):
        value = value.dataset
    return as_xy(value, name=f"{name.replace('_', '-')} data")


def _read_parts(data: RunData) -> dict[str, tuple[Any, Any]]:
    """Every given part of ``data`` as checked ``(x, y)`` tensors of one sample shape."""
    parts = {
        name: _read(value, name)
        for name, value in (("train", data.train), ("held_out", data.held_out), ("test", data.test))
        if value is not None or name != "held_out"
    }
    shapes = {name: tuple(x.shape[1:]) for name, (x, _) in parts.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{n.replace('_', '-')} {'×'.join(map(str, s))}" for n, s in shapes.items())
        raise DataError(f"the data's samples differ in shape: {listed}", "pass data of one sample shape")
    return parts


def _fit_to_model(model: nn.Module, parts: dict[str, Any], data: RunData, default: bool) -> dict[str, Any]:
    """``parts`` as the model takes them: as given, or for an IDX directory's N×1×A×B samples that
    the model refuses, N×A×B (C×L signals stored in a 3-D IDX file). The model's refusal otherwise
    is a one-line :class:`ModelError` keeping the forward's own message."""
    from ..forward import check_forward

    x = parts["test"][0]
    try:
        check_forward(model, x[:1])
        return parts
    except ModelError as exc:
        refusal = exc
    if data.directory is not None and x.dim() == 4 and x.shape[1] == 1:
        try:
            check_forward(model, x[:1, 0])
            return {name: (xs[:, 0], ys) for name, (xs, ys) in parts.items()}
        except ModelError:
            pass
    if not default:
        raise refusal
    shape = "×".join(map(str, x.shape[1:]))
    raise ModelError(
        f"{refusal.problem} (aq.run's default data: N×{shape} images from {data.directory})",
        "pass your own data of the model's input shape: data=RunData(train=(x, y), test=(x_test, y_test)) "
        "in Python, --data-dir DIR of IDX files on the command line",
    ) from refusal


def _check_outputs(model: nn.Module, parts: dict[str, Any]) -> None:
    """Refuse a model that does not return class logits, or labels beyond its classes."""
    import torch

    from ..classifier import n_classes
    from ..forward import eval_mode

    with torch.no_grad(), eval_mode(model):
        out = model(parts["test"][0][:1])
    if not isinstance(out, torch.Tensor) or out.dim() not in (1, 2) or out.shape[-1] == 0:
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        raise ModelError(
            f"aq.run needs a classifier returning (N, classes) logits; the model returns {got}",
            "wrap the model so that forward returns one logits tensor of shape (N, classes), (N, 1) for a binary one",
        )
    classes = n_classes(out)  # one logit: two classes (aq_brevitas.classifier)
    for name, (_, y) in parts.items():
        if len(y) and (y.min() < 0 or y.max() >= classes):
            raise DataError(
                f"{name.replace('_', '-')} labels span {int(y.min())}..{int(y.max())} but the model "
                f"has {classes} classes",
                f"pass labels 0..{classes - 1}, one per sample",
            )


def _check_normalization(normalization: Any, sample_shape: tuple[int, ...]) -> None:
    """One line when RunConfig.normalization has neither one value nor one per channel (dim 1)."""
    from ..config import check_normalization

    if normalization is None:
        return
    channels = sample_shape[0] if sample_shape else 1
    n = len(check_normalization(normalization)[0])
    if n not in (1, channels):
        shape = "×".join(map(str, sample_shape))
        raise ConfigError(
            f"normalization (--mean/--std) has {n} values but the samples ({shape}) have {channels} "
            f"channel{'s' if channels > 1 else ''}",
            f"give one mean and one std for all channels, or one per channel ({channels})",
        )


def _split(parts: dict[str, Any], cfg: RunConfig, what: str) -> dict[str, tuple[Any, Any]]:
    """The seeded draws of each stage: selection from the held-out data (else from the training data,
    whose rest is then the fine-tuning pool), fine-tuning and test subsets. ``what`` names the
    selection's pool in the error when the counts exceed it."""
    from ..data import draw_selection, seeded_subset

    held = parts.get("held_out")
    pool = held if held is not None else parts["train"]
    calib, val, rest = draw_selection(pool, cfg.calib_images, cfg.val_images, cfg.seed, pool=what)
    train = parts["train"] if held is not None else (pool[0][rest], pool[1][rest])
    if len(train[1]) == 0:
        raise ConfigError(
            f"no training images are left for fine-tuning: the selection takes all {len(pool[1])} "
            f"(--calib-images {cfg.calib_images} + --val-images {cfg.val_images})",
            "lower them, pass more training data, or pass RunData(held_out=...) for the selection",
        )
    test = seeded_subset(*parts["test"], cfg.test_images, cfg.seed)
    if len(test[1]) < 2:
        raise DataError(
            f"the test data holds {len(test[1])} sample(s); the export needs one example and one parity "
            "sample",
            "pass at least 2 test samples",
        )
    return {"calib": calib, "held_out": val, "train": seeded_subset(*train, cfg.finetune_images, cfg.seed),
            "test": test}  # fmt: skip


def prepare_data(
    model: nn.Module, data: RunData | str | os.PathLike[str] | None, cfg: RunConfig
) -> RunInputs:
    """Check ``data`` (a :class:`RunData`, an IDX directory, or None: ``cfg.data_dir``'s IDX files,
    Fashion-MNIST by default) against ``model`` and ``cfg`` and draw what each stage reads.

    One-line errors, before any work: :class:`ConfigError` for data of the wrong kind, images and labels
    of different lengths, values outside [0, 1], counts the data cannot meet, or a
    ``cfg.normalization`` whose length fits no channel count; :class:`DataError` for samples of
    different shapes, labels outside the model's classes, missing IDX files; :class:`ModelError` for
    a multi-input model, a forward that refuses the data (its own message kept), or an output that
    is not (N, classes) logits.
    """
    from ..evaluate.cache import data_digest
    from ..forward import require_single_input

    default = data is None and cfg.data_dir is None
    run_data = _run_data(data, cfg.data_dir)
    require_single_input(model, "aq.run")
    parts = _fit_to_model(model, _read_parts(run_data), run_data, default)
    _check_outputs(model, parts)
    sample_shape = tuple(int(s) for s in parts["test"][0].shape[1:])
    _check_normalization(cfg.normalization, sample_shape)
    if run_data.directory is not None:
        source = f"IDX files in {run_data.directory}"
        pool, what = ("the val split (the last 5,000 training images)", "val images")
    else:
        source = "the data given to run()"
        pool, what = ("the held-out data", "held-out images")
    if "held_out" not in parts:
        pool, what = ("the training data (fine-tuning reads the rest)", "training images")
    drawn = _split(parts, cfg, what)
    digests = {name: data_digest(*xy) for name, xy in drawn.items()}
    return RunInputs(**drawn, source=source, selection_pool=pool, digests=digests)
