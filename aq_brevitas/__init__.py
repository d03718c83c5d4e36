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
    "adversarial_train": "train.training",
    "accuracy": "evaluate.accuracy",
    "attack_accuracy": "evaluate.accuracy",
    "make_attack": "attacks",
    "normalized_inputs": "attacks",
    "LayerSpec": "policy",
    "LayerwisePolicy": "policy",
    "for_target": "policy",
    "check_target": "policy",
    "Budget": "budget",
    "lipschitz_scores": "score.lipschitz",
    "candidate_table": "search.candidates",
    "quantize": "quantization.convert",
    "apply_policy": "quantization.convert",
    "save_quantized": "quantization.checkpoint",
    "load_quantized": "quantization.checkpoint",
    "QuantizedSidecar": "quantization.checkpoint",
    "read_policy": "quantization.readback",
    "place_act_quant": "quantization.placement",
    "input_quantizer": "quantization.placement",
    "ActQuantSite": "quantization.placement",
    "adversarial_finetune": "train.finetune",
    "init_distributed": "train.finetune",
    "evaluate_robustness": "evaluate.robustness",
    "worst_case_accuracy": "evaluate.suite",
    "suite_accuracies": "evaluate.suite",
    "RobustnessReport": "evaluate.report",
    "TrainConfig": "config",
    "AttackConfig": "config",
    "EvalConfig": "config",
    "search_policy": "search",
    "SearchConfig": "search",
    "SearchResult": "search",
    "register_scorer": "search",
    "validate_metric": "search",
    "search_pareto": "search",
    "ParetoFront": "search",
    "ParetoPoint": "search",
    "export_qonnx": "export",
    "export_qcdq": "export",
    "inference_cost": "export",
    "CostReport": "export",
    "finn_check": "export",
    "FinnReport": "export",
    "FinnStep": "export",
    "FinnRun": "export",
    "FinnEstimates": "export",
    "finn_available": "export",
    "to_qconfig_mapping": "ao.fx",
    "prepare_fx_model": "ao.fx",
    "PolicyQuantizer": "ao.pt2e",
    "prepare_pt2e_model": "ao.pt2e",
    "convert_pt2e_model": "ao.pt2e",
    "run": "pipeline.job",
    "RunConfig": "pipeline.config",
    "RunResult": "pipeline.job",
    "RunData": "pipeline.data",
    "SummaryRow": "pipeline.rows",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'aq_brevitas' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
