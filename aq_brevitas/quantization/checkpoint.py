"""Save a quantized model with a sidecar that says how to rebuild it, and rebuild it from that.

The sidecar (:class:`QuantizedSidecar`) is written from what the model's quantizers say
(:mod:`~aq_brevitas.quantization.readback`), so any Brevitas model whose layers a
:class:`~aq_brevitas.policy.LayerSpec` describes can be saved, including one re-bitted after
quantization.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..classifier import unwrap_parallel
from ..errors import CheckpointError, PolicyError
from ..policy import LayerwisePolicy
from .convert import convert_model
from .placement import PLACEMENTS
from .readback import act_placement_of, input_signedness, read_policy

KIND = "brevitas"
_OWN_KEYS = ("kind", "arch", "policy", "input_signed", "act_placement", "fold_bn")


@dataclass(frozen=True)
class QuantizedSidecar:
    """What a quantized checkpoint's sidecar records: enough to rebuild the model's quantizers.

    ``policy``: one spec per quantized layer (:func:`~aq_brevitas.quantization.readback.read_policy`);
    ``input_signed`` and ``act_placement``: per layer whose input is quantized, whether that quantizer
    is signed and where it sits (``"input"``/``"producer"``); ``arch``: the reference architecture
    to rebuild by name (``""``: pass the float model); ``fold_bn``: BatchNorms were folded first;
    ``meta``: the caller's own keys (source, calibration images, fine-tuning record, ...).
    """

    policy: LayerwisePolicy
    input_signed: dict[str, bool] = field(default_factory=dict)
    act_placement: dict[str, str] = field(default_factory=dict)
    arch: str = ""
    fold_bn: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    kind: str = KIND

    @classmethod
    def of(cls, model: nn.Module, meta: Mapping[str, Any] | None = None) -> QuantizedSidecar:
        """The sidecar of ``model`` as its quantizers say, with the caller's ``meta`` (``arch`` and
        ``fold_bn`` there fill those fields)."""
        meta = dict(meta or {})
        return cls(
            policy=read_policy(model),
            input_signed=input_signedness(model),
            act_placement=act_placement_of(model),
            arch=str(meta.pop("arch", "") or ""),
            fold_bn=bool(meta.pop("fold_bn", False)),
            meta={k: v for k, v in meta.items() if k not in _OWN_KEYS},
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: the caller's meta keys, then the record's own (flat, as the CLI reads it)."""
        own: dict[str, Any] = {
            "kind": self.kind,
            "policy": self.policy.to_dict(),
            "input_signed": dict(self.input_signed),
            "act_placement": dict(self.act_placement),
            "fold_bn": self.fold_bn,
        }
        return {**self.meta, **({"arch": self.arch} if self.arch else {}), **own}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "sidecar") -> QuantizedSidecar:
        """Parse :meth:`to_dict` output; a sidecar that is not one is a one-line :class:`CheckpointError`."""
        if d.get("kind") != KIND or "policy" not in d:
            raise CheckpointError(
                f"{where} is not a quantized checkpoint written by aq-brevitas",
                "create one with `aq-brevitas quantize` or aq_brevitas.save_quantized",
            )
        placement = d.get("act_placement")
        if not isinstance(placement, Mapping) or not set(placement.values()) <= set(PLACEMENTS):
            raise CheckpointError(
                f"{where} has no per-layer act_placement (written by an older aq-brevitas)",
                "re-create the checkpoint with `aq-brevitas quantize` or aq_brevitas.save_quantized",
            )
        try:
            policy = LayerwisePolicy.from_dict(d["policy"])
        except PolicyError as exc:
            raise CheckpointError(
                f"{where}: its policy is malformed ({exc.problem})",
                "re-create the checkpoint with `aq-brevitas quantize` or aq_brevitas.save_quantized",
            ) from None
        return cls(
            policy=policy,
            input_signed={str(k): bool(v) for k, v in dict(d.get("input_signed", {})).items()},
            act_placement={str(k): str(v) for k, v in placement.items()},
            arch=str(d.get("arch", "") or ""),
            fold_bn=bool(d.get("fold_bn", False)),
            meta={k: v for k, v in d.items() if k not in _OWN_KEYS},
        )


# -- quantized checkpoints -----------------------------------------------------------------------------
def save_quantized(model: nn.Module, path: Any, meta: dict[str, Any] | None = None) -> None:
    """Save a quantized model: its state_dict, plus a :class:`QuantizedSidecar` read from its quantizers.

    ``meta={"arch": name}`` lets :func:`load_quantized` (and the CLI) rebuild a reference architecture
    by name; any other model is rebuilt from the float model you pass to :func:`load_quantized`.
    ``meta["fold_bn"]`` says its BatchNorms were folded (``quantize(..., fold_bn=True)``). A model
    without any quantized layer is refused (:class:`PolicyError`).
    """
    from ..storage import save_checkpoint

    model = unwrap_parallel(model)
    sidecar = QuantizedSidecar.of(model, meta)
    if not sidecar.policy.layers:
        raise PolicyError(
            "the model has no quantized layer (no Brevitas layer with an enabled weight quantizer)",
            "quantize the float model with aq_brevitas.quantize(model, policy) first",
        )
    save_checkpoint(path, {"state_dict": model.state_dict()}, meta=sidecar.to_dict())


def load_quantized(path: Any, float_model: nn.Module | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a quantized model from :func:`save_quantized` output; returns it and the sidecar's dict.

    The skeleton is ``float_model`` (any ``nn.Module`` of the same architecture; it is not modified)
    or, without one, the reference architecture named in the sidecar's ``arch``.
    """
    import brevitas.config

    from ..models import build_model, load_weights
    from ..storage import load_checkpoint, read_sidecar

    state = load_checkpoint(path)
    sidecar = QuantizedSidecar.from_dict(read_sidecar(path), f"{path}")
    if float_model is None and not sidecar.arch:
        raise CheckpointError(
            f"{path} does not name a reference architecture, so it cannot be rebuilt by name",
            "pass the float model: load_quantized(path, float_model=MyNet())",
        )
    model = convert_model(
        copy.deepcopy(float_model) if float_model is not None else build_model(sidecar.arch),
        sidecar.policy,
        inplace=True,
        swap_float=True,
        calibration_data=None,
        fold_bn=sidecar.fold_bn,
        bias_correction=False,
        input_signed=sidecar.input_signed,
        replay=True,  # a saved policy: its coverage was reported when it was made
        act_placement=sidecar.act_placement,
    )
    old = brevitas.config.IGNORE_MISSING_KEYS
    brevitas.config.IGNORE_MISSING_KEYS = True  # activation scales exist only after calibration
    try:
        load_weights(model, state["state_dict"], path, "recorded policy/architecture")
    finally:
        brevitas.config.IGNORE_MISSING_KEYS = old
    return model.eval(), sidecar.to_dict()
