"""Deprecated location: everything here moved to :mod:`aq_brevitas.nnutils`.

A temporary shim, kept only until the modules below import from nnutils; it defines nothing.
"""

from __future__ import annotations

# re-exported for search, export, ao, policy, study, cli, pipeline until they import from nnutils
from .nnutils import (  # noqa: F401
    QUANTIZABLE_TYPES,
    UNSUPPORTED_TYPES,
    LayerGeometry,
    check_forward,
    eval_mode,
    layer_geometry,
    layer_macs,
    paused_observers,
    quantizable_layers,
    shared_layer_names,
    unsupported_layers,
    warn_unsupported,
)
