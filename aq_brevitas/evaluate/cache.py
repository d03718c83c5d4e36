"""Measured results kept on disk, keyed by everything that decides them: measure once.

A held-out measurement (a policy's clean and robust accuracy) is a pure function of the float model's
weights, the policy, the calibration images, the evaluation images and labels, ε, the attack suite
and its schedule, and the measuring code. :func:`measurement_key` digests all of them, together with
:data:`MEASUREMENT_VERSION`, into one SHA-256; :class:`MeasureCache` keeps one JSON file per key in a
folder, written atomically (a temporary file renamed onto the name), so concurrent processes or
torchrun ranks sharing the folder never read a half-written entry, and a sweep killed with ``kill -9``
finds every finished measurement when it is run again.

Also the digests the run folder's stage log compares (:func:`model_digest`, :func:`data_digest`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..storage import atomic_write_text
from .warm import AdvExamples

if TYPE_CHECKING:
    from torch import nn

#: Bump whenever the measuring code's results may change (the suite's attacks or schedule, the
#: quantizer, the calibration, the accuracy arithmetic): every cached measurement then misses.
MEASUREMENT_VERSION = 1


def _hash_tensor(h: Any, value: Any) -> None:
    """Feed a tensor's dtype, shape and bytes to hash ``h``."""
    import torch

    t = value.detach().cpu().contiguous().flatten()
    h.update(f"{t.dtype}{tuple(value.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes())


def model_digest(model: nn.Module) -> str:
    """SHA-256 (hex) of a model's class name and ``state_dict`` (every key, dtype, shape and byte)."""
    import torch

    h = hashlib.sha256(type(model).__name__.encode())
    for key, value in model.state_dict().items():
        h.update(key.encode())
        if torch.is_tensor(value):
            _hash_tensor(h, value)
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


def data_digest(*tensors: Any) -> str:
    """SHA-256 (hex) of tensors such as ``(images, labels)``: dtypes, shapes and values."""
    h = hashlib.sha256()
    for t in tensors:
        _hash_tensor(h, t)
    return h.hexdigest()


def measurement_key(parts: Mapping[str, Any]) -> str:
    """The key of one measurement: SHA-256 (hex) of :data:`MEASUREMENT_VERSION` and ``parts`` (name:
    value), each value JSON-able or a digest (:func:`model_digest`, :func:`data_digest`); a non-JSON
    value counts by its ``repr``. The parts' order does not matter.

    >>> measurement_key({"eps": 0.1, "policy": None}) == measurement_key({"policy": None, "eps": 0.1})
    True
    >>> measurement_key({"eps": 0.1}) == measurement_key({"eps": 0.2})
    False
    """
    text = json.dumps({"version": MEASUREMENT_VERSION, **parts}, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


class MeasureCache:
    """One JSON file per measurement key under ``cache_dir`` (created on first write); with
    ``cache_dir=None`` nothing is kept and every lookup misses. ``hits`` and ``measured`` count this
    object's lookups that were read back and that ran the measurement.

    >>> import tempfile
    >>> cache = MeasureCache(tempfile.mkdtemp())
    >>> key = measurement_key({"policy": "w4a4"})
    >>> cache.get_or_measure(key, lambda: {"robust": 0.5}), cache.get_or_measure(key, lambda: {"robust": 0.0})
    ({'robust': 0.5}, {'robust': 0.5})
    >>> cache.hits, cache.measured
    (1, 1)
    """

    def __init__(self, cache_dir: str | os.PathLike[str] | None) -> None:
        self.dir = None if cache_dir is None else Path(cache_dir)
        self.hits = 0
        self.measured = 0

    def path(self, key: str) -> Path | None:
        """The file of ``key`` (None without a folder)."""
        return None if self.dir is None else self.dir / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored result of ``key``, or None (no folder, no file, or a file that does not parse)."""
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # another writer's file is only ever renamed in whole; this one is foreign
        return entry.get("result") if isinstance(entry, dict) else None

    def put(self, key: str, result: Mapping[str, Any], about: Mapping[str, Any] | None = None) -> None:
        """Store ``result`` (JSON-able) under ``key``, atomically; ``about``: readable context kept
        beside it (never read back). Nothing happens without a folder."""
        path = self.path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"version": MEASUREMENT_VERSION, "about": dict(about or {}), "result": dict(result)}
        atomic_write_text(path, json.dumps(entry, indent=1, sort_keys=True))

    def get_or_measure(
        self,
        key: str,
        measure: Callable[[], Mapping[str, Any]],
        about: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The stored result of ``key``, or ``measure()``'s, stored before it is returned."""
        found = self.get(key)
        if found is not None:
            self.hits += 1
            return found
        result = dict(measure())
        self.measured += 1
        self.put(key, result, about)
        return result

    def get_or_measure_examples(
        self,
        key: str,
        measure: Callable[[], tuple[Mapping[str, Any], AdvExamples]],
        about: Mapping[str, Any] | None = None,
    ) -> tuple[dict[str, Any], AdvExamples]:
        """:meth:`get_or_measure` for a measurement that also finds adversarial examples (``measure``
        returns ``(result, examples)``): the examples are kept in ``<key>.adv.pt`` beside the result,
        written before it, so a result read back always has its examples."""
        found, path = self.get(key), self.path(key)
        examples_path = None if path is None else path.with_suffix(".adv.pt")
        if found is not None and examples_path is not None and examples_path.is_file():
            self.hits += 1
            return found, AdvExamples.load(examples_path)
        result, examples = measure()
        self.measured += 1
        if examples_path is not None:
            examples_path.parent.mkdir(parents=True, exist_ok=True)
            examples.save(examples_path)
        self.put(key, result, about)
        return dict(result), examples
