"""Deprecated alias of :mod:`aq_brevitas.nnutils`, where these helpers moved (kept for one release).

User code such as ``aq_brevitas.layers.quantizable_layers(model)`` keeps working, with a
``DeprecationWarning`` naming the new home.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any


def __getattr__(name: str) -> Any:
    nnutils = importlib.import_module("aq_brevitas.nnutils")
    if name.startswith("__") or not hasattr(nnutils, name):
        raise AttributeError(f"module 'aq_brevitas.layers' has no attribute {name!r}")
    warnings.warn(
        f"aq_brevitas.layers is deprecated -- fix: import {name} from aq_brevitas.nnutils",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(nnutils, name)
