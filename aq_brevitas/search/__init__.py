"""Policy search (docs/method.md "Scores", "Selection", "Baselines"): score every (layer, candidate),
pick one candidate per layer under a cost budget with an exact multiple-choice knapsack, optionally
refine on the whole-network bound, and keep the result only if its held-out robust accuracy (the
per-image worst case of PGD and the fast attack suite) beats the best uniform policy's.

=================  ===========================================================================
module             holds
=================  ===========================================================================
``config``         :class:`SearchConfig`, per-method settings, :func:`register_scorer` (torch-free)
``calibration``    adversarial calibration, :class:`WeightCache`, fx replay, network deviation
``scorers``        ``lipschitz``/``hessian``/``ans`` behind one signature, :func:`score`
``mckp``           the knapsack as a MILP (numpy/scipy only)
``selection``      :func:`select_policy`: knapsack + refinement on ready scores
``refine``         the whole-network bound B(p), top-K re-ranking, coordinate descent
``baselines``      the best uniform policy
``core``           :func:`search_policy`, step by step
``result``         :class:`SearchResult` and its records
``validate``       :func:`validate_metric`: does the bound rank policies like robust error?
``tables``         :func:`policy_table`, :func:`compare_methods`
``pareto``         :func:`search_pareto`: every method over a sweep of budgets, measured robustly
=================  ===========================================================================

Names are imported lazily (as in the package root), so reading the method registry
(``aq_brevitas.search.config``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public names by the module that defines them.
_MODULES: dict[str, tuple[str, ...]] = {
    ".config": ("SearchConfig", "MethodSettings", "LipschitzSettings", "HessianSettings", "AnsSettings",
                "UniformSettings", "METHOD_SETTINGS", "METHODS", "SCORED_METHODS", "COMPARE_ORDER",
                "ESTIMATES", "DEFAULT_ACT_BITS", "with_act_bits", "SCORERS", "register_scorer", "scorer_for"),
    ".calibration": ("AdversarialCalibration", "adversarial_calibration", "WeightCache", "swapped_weights",
                     "network_deviation", "equivalent_candidates", "ActivationProbe"),
    ".scorers": ("Scores", "Scoring", "ScoringInputs", "LipschitzTerms", "lipschitz_terms",
                 "hessian_traces", "activation_hessian_traces", "ans_sensitivity", "score", "score_lipschitz", "score_hessian",
                 "score_ans"),
    ".mckp": ("MckpSolution", "solve_top_k", "solve_mckp"),
    ".selection": ("Selection", "select_policy"),
    ".refine": ("WholeNetworkBound", "Refinement", "policy_bound"),
    ".baselines": (
        "UniformChoice", "best_uniform", "uniform_options", "uniform_choices",
        "measure_policy", "PolicyMeasurement",
    ),
    ".core": ("search_policy",),
    ".result": ("SearchResult", "SolverReport", "HeldOutCheck", "Timing"),
    ".validate": ("MetricValidation", "sample_policies", "validate_metric"),
    ".tables": ("policy_table", "compare_methods", "MethodComparison"),
    ".pareto": ("search_pareto", "ParetoFront", "ParetoPoint", "PARETO_METHODS", "sweep_budgets"),
    ".costing": ("candidate_costs", "budget_capacity", "check_feasible"),
}  # fmt: skip
_HOME = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    """Import ``name``'s module on first use (PEP 562), so ``search.config`` stays torch-free."""
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value = getattr(importlib.import_module(_HOME[name], __name__), name)
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
