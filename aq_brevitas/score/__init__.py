"""Layer sensitivity scores from the weights and the data: operator norms, local Jacobian gains, and
the per-layer Lipschitz scores the search ranks layers by.

===============  ================================================================================
module           holds
===============  ================================================================================
``norms``        operator norms of a layer's linear map (exact or power/Lanczos estimates)
``jacobian``     whether a model is a chain; each layer's local Jacobian gain on data
``lipschitz``    :func:`lipschitz_scores` -> :class:`LayerScore` per layer
===============  ================================================================================
"""

from __future__ import annotations

from .jacobian import is_chain, local_jacobian_norm
from .lipschitz import GAINS, LayerScore, lipschitz_scores
from .norms import OperatorNorm, operator_norm, top_singular_values

__all__ = [
    "GAINS",
    "LayerScore",
    "OperatorNorm",
    "is_chain",
    "lipschitz_scores",
    "local_jacobian_norm",
    "operator_norm",
    "top_singular_values",
]
