"""aq-brevitas: layer-wise adversarial-aware quantization for Brevitas.

The whole job in one call is :func:`run` (``aq-brevitas run`` on the command line); the stages it
chains are public too. The public API is imported lazily, so ``import aq_brevitas`` (and the CLI's
``--help``) does not pay for importing torch and Brevitas until a name is used, and torchao is only
needed for the torch.ao names.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "AqError": "errors",
    "DataError": "errors",
    "CheckpointError": "errors",
    "PolicyError": "errors",
    "ModelError": "errors",
    "ConfigError": "errors",
    "load_split": "data",
    "make_loader": "data",
    "build_model": "models",
    "load_float_model": "models",
    "adversarial_train": "training",
    "accuracy": "evaluate",
    "attack_accuracy": "evaluate",
    "make_attack": "attacks",
    "normalized_inputs": "attacks",
    "LayerSpec": "policy",
    "LayerwisePolicy": "policy",
    "for_target": "policy",
    "check_target": "policy",
    "Budget": "budget",
    "lipschitz_scores": "lipschitz",
    "candidate_table": "candidates",
    "quantize": "convert",
    "apply_policy": "convert",
    "save_quantized": "convert",
    "load_quantized": "convert",
    "place_act_quant": "placement",
    "input_quantizer": "placement",
    "ActQuantSite": "placement",
    "adversarial_finetune": "finetune",
    "init_distributed": "finetune",
    "evaluate_robustness": "evaluate",
    "worst_case_accuracy": "suite",
    "suite_accuracies": "suite",
    "RobustnessReport": "report",
    "TrainConfig": "config",
    "AttackConfig": "config",
    "EvalConfig": "config",
    "search_policy": "search",
    "SearchConfig": "search",
    "SearchResult": "search",
    "validate_metric": "search",
    "search_pareto": "search",
    "ParetoFront": "search",
    "ParetoPoint": "search",
    "export_qonnx": "export",
    "export_qcdq": "export",
    "inference_cost": "export",
    "finn_check": "export",
    "FinnReport": "export",
    "FinnStep": "export",
    "FinnRun": "export",
    "FinnEstimates": "export",
    "finn_available": "export",
    "to_qconfig_mapping": "ao",
    "prepare_fx_model": "ao",
    "PolicyQuantizer": "ao",
    "prepare_pt2e_model": "ao",
    "convert_pt2e_model": "ao",
    "run": "pipeline",
    "RunConfig": "pipeline",
    "RunResult": "pipeline",
    "RunData": "rundata",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):  # a submodule named as an attribute: aq_brevitas.layers.<name>
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module 'aq_brevitas' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
