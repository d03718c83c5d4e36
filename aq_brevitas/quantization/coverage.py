"""Which layers a policy converts: what is refused before any swap, what stays float (layers the
policy leaves out or keeps float, layers the forward never calls), and the warnings that name them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer as QuantWBIOL
from torch import nn

from ..errors import PolicyError, a_type, warn
from ..forward import iter_x_batches
from ..nnutils import quantizable_layers, shared_layer_names, shared_weights
from ..policy import LayerwisePolicy, deciding_key
from .calibrate import model_inputs


def check_convertible(model: nn.Module, policy: LayerwisePolicy, *, warn_uncovered: bool) -> list[str]:
    """Refuse what cannot be converted (one-line :class:`PolicyError`); the layers the policy leaves
    uncovered, named in a ``UserWarning`` when ``warn_uncovered``."""
    if not isinstance(policy, LayerwisePolicy):
        raise PolicyError(
            f"policy is {a_type(policy)}, not a LayerwisePolicy",
            "load it with LayerwisePolicy.load(path)",
        )
    if not quantizable_layers(model):
        raise PolicyError(
            "model has no quantizable layers (Conv1d/Conv2d/ConvTranspose2d/Linear)",
            "pass a model with at least one such layer",
        )
    policy.check(model)
    uncovered = policy.matches(model).uncovered
    if uncovered and warn_uncovered:
        warn(
            f"policy has no spec and no default for layers {', '.join(uncovered)}; they stay float "
            '-- fix: add them to the policy\'s layers or give it a default (LayerwisePolicy(default=...) / "default")',
            UserWarning,
        )
    for names in shared_layer_names(model).values():
        specs = {policy.spec_for(n) for n in names}
        if len(specs) > 1:
            raise PolicyError(
                f"layers {' and '.join(names)} are one shared module but the policy gives them different specs",
                "give them the same spec, or copy.deepcopy the module so each name has its own",
            )
    _warn_shared_weights(model, policy)
    return uncovered


def _warn_shared_weights(model: nn.Module, policy: LayerwisePolicy) -> None:
    """One ``UserWarning`` per tied weight whose layers quantize it differently (weight bits, scaling,
    granularity, or float for a layer the policy leaves out; input bits do not matter here)."""
    for names in shared_weights(model).values():
        specs = [policy.spec_for(n) for n in names]
        if len({(s.weight_bit_width, s.scaling, s.granularity) if s else None for s in specs}) > 1:
            listed = ", ".join(f"{n} ({s.short() if s else 'float'})" for n, s in zip(names, specs))
            warn(
                f"layers {listed} share one weight Parameter but the policy quantizes it differently in each: "
                "each layer uses its own spec (the float weight stays shared, the deployed model stores it "
                "once per spec) -- fix: give them the same weight spec to quantize it one way",
                UserWarning,
            )


def first_sample(model: nn.Module, calibration_data: Any) -> Any:
    """The model inputs of the first calibration batch (a tensor or a tuple), or None without data."""
    if calibration_data is None:
        return None
    first = next(iter_x_batches(calibration_data, limit_batches=1, model=model), None)
    return None if first is None else model_inputs(first)


def refuse_unquantize(model: nn.Module, policy: LayerwisePolicy) -> None:
    """A re-bit cannot turn a quantized layer back to float: one-line :class:`PolicyError`."""
    back = [
        n
        for n, s in policy.resolve(model).items()
        if s is None
        and deciding_key(policy.layers, n) is not None
        and isinstance(model.get_submodule(n), QuantWBIOL)
    ]
    if back:
        raise PolicyError(
            f"apply_policy cannot turn quantized layers {', '.join(back)} back to float (the policy gives them None)",
            "quantize the float model with this policy: aq_brevitas.quantize(float_model, policy)",
        )


# torch modules whose eval fast path reads their children's weights directly, skipping the children's
# forward: TransformerEncoderLayer runs torch._transformer_encoder_layer_fwd on linear1/linear2.weight
FAST_PATH_TYPES: tuple[type[nn.Module], ...] = (nn.TransformerEncoderLayer,)


def _slow_path(module: nn.Module, args: Any) -> None:
    """A no-op forward pre-hook: torch takes no fast path on a module that has hooks."""


def keep_layers_called(model: nn.Module, swapped: Iterable[str]) -> None:
    """Give each module of :data:`FAST_PATH_TYPES` holding a swapped layer a no-op forward pre-hook,
    so its forward calls the (quantized) layers in every mode: its eval no-grad fast path would run
    their float weights while the model reports them quantized. torch checks for hooks before it
    takes the fast path; the hook is a module-level function, so the model still pickles."""
    names = list(swapped)
    for name, m in model.named_modules():
        inside = any(n.startswith(f"{name}.") for n in names)
        if isinstance(m, FAST_PATH_TYPES) and inside and _slow_path not in m._forward_pre_hooks.values():
            m.register_forward_pre_hook(_slow_path)
