"""The evaluate stage: clean and adversarial accuracy, the attack suites, the robustness report.

===============  ================================================================================
module           holds
===============  ================================================================================
``report``       :class:`RobustnessReport`: what an evaluation found, saved and plotted
``indicators``   checks that the attacks worked (gradient masking indicators)
``suite``        the attack suites and their per-image worst case
``accuracy``     :func:`accuracy`, :func:`attack_accuracy`
``robustness``   :func:`evaluate_robustness` -> :class:`RobustnessReport`
``study``        the bits-vs-robustness study over uniform policies
===============  ================================================================================

:func:`~aq_brevitas.evaluate.accuracy.accuracy` is not re-exported here (its module has the same name):
import it from :mod:`aq_brevitas.evaluate.accuracy` or as ``aq_brevitas.accuracy``.
"""

from __future__ import annotations

from .accuracy import attack_accuracy
from .report import AttackResult, RobustnessReport
from .robustness import evaluate_robustness
from .study import StudyResult, run_study
from .suite import suite_accuracies, worst_case_accuracy

__all__ = [
    "AttackResult",
    "RobustnessReport",
    "StudyResult",
    "attack_accuracy",
    "evaluate_robustness",
    "run_study",
    "suite_accuracies",
    "worst_case_accuracy",
]
