"""Save a quantized model with a sidecar that says how to rebuild it, and rebuild it from that."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from ..errors import CheckpointError, PolicyError
from ..policy import LayerwisePolicy
from .convert import convert_model


# -- quantized checkpoints -----------------------------------------------------------------------------
def save_quantized(model: nn.Module, path: Any, meta: dict[str, Any] | None = None) -> None:
    """Save a model made by :func:`quantize`: its state_dict, plus a sidecar with the policy that made it.

    ``meta={"arch": name}`` lets :func:`load_quantized` (and the CLI) rebuild a reference architecture
    by name; any other model is rebuilt from the float model you pass to :func:`load_quantized`.
    """
    from ..storage import save_checkpoint

    policy = getattr(model, "aq_policy", None)
    if policy is None:
        raise PolicyError(
            "only models made by aq_brevitas.quantize can be saved this way (no policy attached)",
            "quantize the float model with aq_brevitas.quantize(model, policy) first",
        )
    save_checkpoint(
        path,
        {"state_dict": model.state_dict()},
        meta={
            **(meta or {}),
            "kind": "brevitas",
            "policy": policy.to_dict(),
            "input_signed": getattr(model, "aq_input_signed", {}),
            "act_placement": getattr(model, "aq_act_placement", "input"),
        },
    )


def load_quantized(path: Any, float_model: nn.Module | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a quantized model from :func:`save_quantized` output.

    The skeleton is ``float_model`` (any ``nn.Module`` of the same architecture; it is not modified)
    or, without one, the reference architecture named in the sidecar's ``arch``.
    """
    import brevitas.config

    from ..models import build_model, load_weights
    from ..storage import load_checkpoint, read_sidecar

    state = load_checkpoint(path)
    meta = read_sidecar(path)
    if meta.get("kind") != "brevitas" or "policy" not in meta:
        raise CheckpointError(
            f"{path} is not a quantized checkpoint written by aq-brevitas",
            "create one with `aq-brevitas quantize` or aq_brevitas.save_quantized",
        )
    if float_model is None and "arch" not in meta:
        raise CheckpointError(
            f"{path} does not name a reference architecture, so it cannot be rebuilt by name",
            "pass the float model: load_quantized(path, float_model=MyNet())",
        )
    policy = LayerwisePolicy.from_dict(meta["policy"])
    signed = {str(k): bool(v) for k, v in dict(meta.get("input_signed", {})).items()}
    model = convert_model(
        copy.deepcopy(float_model) if float_model is not None else build_model(meta["arch"]),
        policy,
        inplace=True,
        swap_float=True,
        calibration_data=None,
        fold_bn=bool(meta.get("fold_bn", False)),
        bias_correction=False,
        input_signed=signed,
        warn_uncovered=False,  # replaying a saved policy: its coverage was reported when it was made
        # checkpoints from before producer placement existed had their quantizers at the layer inputs
        act_placement=str(meta.get("act_placement", "input")),
    )
    old = brevitas.config.IGNORE_MISSING_KEYS
    brevitas.config.IGNORE_MISSING_KEYS = True  # activation scales exist only after calibration
    try:
        load_weights(model, state["state_dict"], path, "recorded policy/architecture")
    finally:
        brevitas.config.IGNORE_MISSING_KEYS = old
    model.aq_policy = policy
    return model.eval(), meta
