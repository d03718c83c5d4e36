"""The robustness report: what :func:`~aq_brevitas.evaluate.evaluate_robustness` measured, and the
gradient-masking checklist computed from its numbers (docs/finetune_and_evaluate.md describes it).

:class:`RobustnessReport` holds one :class:`AttackResult` per attack and ε and one
:class:`MaskingCheck` per check; it serialises to JSON (``to_json``/``save``, ``from_json``/``load``),
renders as a markdown table (``to_markdown``) and plots accuracy against ε (``plot``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ConfigError

SCHEMA = "aq-brevitas/robustness/v1"
TOLERANCE = 0.005  # 0.5 pt: PGD vs FGSM, and monotonicity in ε
GRADIENT_FREE_TOLERANCE = 0.02  # 2 pts: Square may be this much stronger than PGD before we flag it
LARGE_EPS_MAX_ACCURACY = 0.05  # at ε=0.5 an honest attack leaves (almost) nothing standing
BALL_TOLERANCE = 1e-6


# -- the report -------------------------------------------------------------------------------------------
@dataclass
class AttackResult:
    """One attack at one ε: robust accuracy on ``images`` images (an example counts if clean- and adv-correct)."""

    attack: str
    eps: float
    accuracy: float
    images: int
    seconds: float
    steps: int | None = None  # iterations (PGD), 1 (FGSM), queries (Square), None (clean, AutoAttack)
    restarts: int = 1


@dataclass
class MaskingCheck:
    """One gradient-masking sanity check. ``passed=None`` means it could not run (its attacks were off)."""

    name: str
    passed: bool | None
    detail: str


@dataclass
class RobustnessReport:
    """What :func:`~aq_brevitas.evaluate.evaluate_robustness` measured (accuracies in [0, 1], ε on [0, 1]
    images, seconds of wall time), the masking checklist, and the settings it ran with. ``skipped``:
    attacks that could not run on these inputs, with the reason; ``notes``: how the suite adapted
    to them (e.g. Square on a C×H×W view of signals)."""

    model: str
    images: int
    clean_accuracy: float
    results: list[AttackResult] = field(default_factory=list)
    checks: list[MaskingCheck] = field(default_factory=list)
    seconds: float = 0.0
    max_violation: float = 0.0  # worst excursion of any adversarial example outside its ε-ball or [0, 1]
    meta: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def masking_suspected(self) -> bool:
        """True when any check that ran failed: the robust accuracies are then likely overestimates."""
        return any(c.passed is False for c in self.checks)

    def result(self, attack: str, eps: float) -> AttackResult:
        for r in self.results:
            if r.attack == attack and (attack == "clean" or math.isclose(r.eps, eps, abs_tol=1e-9)):
                return r
        have = ", ".join(f"{r.attack}@{r.eps:g}" for r in self.results)
        raise ConfigError(f"no result for attack {attack!r} at eps={eps:g}", f"use one of {have}")

    def accuracy(self, attack: str, eps: float = 0.0) -> float:
        """Accuracy of ``attack`` at ``eps`` ('clean' ignores ``eps``)."""
        return self.result(attack, eps).accuracy

    def check(self, name: str) -> MaskingCheck:
        for c in self.checks:
            if c.name == name:
                return c
        raise ConfigError(f"no check named {name!r}", f"use one of {', '.join(c.name for c in self.checks)}")

    # serialisation
    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: Any) -> RobustnessReport:
        if not isinstance(d, Mapping) or d.get("schema") != SCHEMA:
            raise ConfigError("not a robustness report (missing or wrong 'schema')", f"expected {SCHEMA!r}")
        try:
            return cls(
                model=str(d["model"]),
                images=int(d["images"]),
                clean_accuracy=float(d["clean_accuracy"]),
                results=[AttackResult(**r) for r in d.get("results", [])],
                checks=[MaskingCheck(**c) for c in d.get("checks", [])],
                seconds=float(d.get("seconds", 0.0)),
                max_violation=float(d.get("max_violation", 0.0)),
                meta=dict(d.get("meta", {})),
                settings=dict(d.get("settings", {})),
                skipped={str(k): str(v) for k, v in dict(d.get("skipped", {})).items()},
                notes=[str(n) for n in d.get("notes", [])],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed robustness report ({exc})", "re-create it") from None

    @classmethod
    def from_json(cls, text: str) -> RobustnessReport:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"robustness report is not valid JSON ({exc.msg})", "re-create it") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        from .storage import atomic_write_text

        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RobustnessReport:
        from .storage import read_json

        return cls.from_dict(read_json(path, "robustness report"))

    # presentation
    def _attacks_in_order(self) -> list[str]:
        return list(dict.fromkeys(r.attack for r in self.results))

    def to_markdown(self) -> str:
        """A table attacks × ε (robust accuracy), notes and skipped attacks, then the gradient-masking
        checklist."""
        eps_cols = sorted({r.eps for r in self.results})
        head = ["attack", "images", "steps", *[f"ε={e:g}" for e in eps_cols], "seconds"]
        lines = [
            f"### Robustness of {self.model} ({self.images} images, {self.seconds:.1f} s)",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
        ]
        for name in self._attacks_in_order():
            rows = [r for r in self.results if r.attack == name]
            cells = {r.eps: f"{100 * r.accuracy:.1f}%" for r in rows}
            steps = rows[0].steps if rows[0].steps is not None else "–"
            if rows[0].restarts > 1:
                steps = f"{steps}×{rows[0].restarts}"
            lines.append(
                "| "
                + " | ".join(
                    [
                        name,
                        str(rows[0].images),
                        str(steps),
                        *[cells.get(e, "–") for e in eps_cols],
                        f"{sum(r.seconds for r in rows):.1f}",
                    ]
                )
                + " |"
            )
        if self.notes:
            lines += ["", "Notes:", "", *[f"- {n}" for n in self.notes]]
        if self.skipped:
            lines += ["", "Skipped attacks:", "", *[f"- `{a}`: {why}" for a, why in self.skipped.items()]]
        lines += ["", "Gradient-masking checks:", ""]
        mark = {True: "✅", False: "⚠️", None: "–"}
        lines += [f"- {mark[c.passed]} `{c.name}`: {c.detail}" for c in self.checks]
        if self.masking_suspected:
            lines += [
                "",
                "⚠️ Gradient masking suspected: the robust accuracies above are likely overestimates.",
            ]
        return "\n".join(lines) + "\n"

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Accuracy vs ε per attack, clean accuracy as a horizontal line."""
        from .plots import plot_robustness

        series = {}
        for name in self._attacks_in_order():
            if name == "clean":
                continue
            rows = sorted((r for r in self.results if r.attack == name), key=lambda r: r.eps)
            series[f"{name} ({rows[0].images} img)"] = ([r.eps for r in rows], [r.accuracy for r in rows])
        title = f"{self.model}: robust accuracy" + (" (masking suspected)" if self.masking_suspected else "")
        plot_robustness(series, self.clean_accuracy, path, title=title)


# -- the gradient-masking checklist -----------------------------------------------------------------------
def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _by_eps(report: RobustnessReport, attack: str) -> dict[float, float]:
    return {r.eps: r.accuracy for r in report.results if r.attack == attack}


def masking_checks(
    report: RobustnessReport, *, checked: int | None = None, worst: str = ""
) -> list[MaskingCheck]:
    """The gradient-masking sanity checks on a report's numbers; each failure is flagged, never hidden.

    In order: ``pgd_not_above_fgsm``, ``monotone_in_eps``, ``large_eps_near_zero``,
    ``gradient_free_not_stronger``, ``in_epsilon_ball`` (``passed=None``: its attacks did not run).
    ``checked`` (adversarial examples checked against the ε-ball) and ``worst`` (the attack with the
    largest violation) only enrich the last check's text.
    """
    return [
        _pgd_not_above_fgsm(report),
        _monotone_in_eps(report),
        _large_eps_near_zero(report),
        _gradient_free_not_stronger(report),
        _in_epsilon_ball(report, checked, worst),
    ]


def _pgd_not_above_fgsm(report: RobustnessReport) -> MaskingCheck:
    fgsm, pgd = _by_eps(report, "fgsm"), _by_eps(report, "pgd")
    common = sorted(set(fgsm) & set(pgd))
    if not common:
        return MaskingCheck("pgd_not_above_fgsm", None, "not run: needs both fgsm and pgd")
    gaps = {e: pgd[e] - fgsm[e] for e in common}
    e = max(gaps, key=gaps.get)
    ok = gaps[e] <= TOLERANCE
    detail = f"PGD {_pct(pgd[e])} vs FGSM {_pct(fgsm[e])} at ε={e:g}" + (
        " (worst case)" if ok else " -- PGD should be the stronger attack"
    )
    return MaskingCheck("pgd_not_above_fgsm", ok, detail)


def _monotone_in_eps(report: RobustnessReport) -> MaskingCheck:
    rises = []
    for attack in ("fgsm", "pgd"):
        curve = sorted({0.0: report.clean_accuracy, **_by_eps(report, attack)}.items())
        rises += [(b[1] - a[1], attack, a, b) for a, b in zip(curve, curve[1:], strict=False)]
    if not rises:
        return MaskingCheck("monotone_in_eps", None, "not run: needs fgsm or pgd")
    rise, attack, a, b = max(rises)
    ok = rise <= TOLERANCE
    detail = (
        "accuracy falls (or stays) as ε grows for every attack"
        if ok
        else f"{attack} accuracy rises from {_pct(a[1])} at ε={a[0]:g} to {_pct(b[1])} at ε={b[0]:g}"
    )
    return MaskingCheck("monotone_in_eps", ok, detail)


def _large_eps_near_zero(report: RobustnessReport) -> MaskingCheck:
    large_eps = report.settings.get("large_eps", 0.5)
    big = [r for r in report.results if r.attack == "pgd-large-eps"] or [
        r for r in report.results if r.attack == "pgd" and math.isclose(r.eps, large_eps)
    ]
    if not big:
        return MaskingCheck("large_eps_near_zero", None, "not run")
    r = big[0]
    ok = r.accuracy <= LARGE_EPS_MAX_ACCURACY
    detail = f"PGD accuracy at ε={r.eps:g} is {_pct(r.accuracy)} on {r.images} images" + (
        "" if ok else f" (> {_pct(LARGE_EPS_MAX_ACCURACY)}: the attack cannot find what must exist)"
    )
    return MaskingCheck("large_eps_near_zero", ok, detail)


def _gradient_free_not_stronger(report: RobustnessReport) -> MaskingCheck:
    sq = [r for r in report.results if r.attack == "square"]
    ps = [r for r in report.results if r.attack == "pgd-subset"]
    if not (sq and ps):
        why = "square was skipped on these inputs" if "square" in report.skipped else "gradient_free=False"
        return MaskingCheck("gradient_free_not_stronger", None, f"not run: {why}")
    ok = sq[0].accuracy >= ps[0].accuracy - GRADIENT_FREE_TOLERANCE
    detail = (
        f"Square ({sq[0].steps} queries) {_pct(sq[0].accuracy)} vs PGD {_pct(ps[0].accuracy)} "
        f"on the same {sq[0].images} images at ε={sq[0].eps:g}"
    ) + ("" if ok else " -- a gradient-free attack beats the gradient attack")
    return MaskingCheck("gradient_free_not_stronger", ok, detail)


def _in_epsilon_ball(report: RobustnessReport, checked: int | None, worst: str) -> MaskingCheck:
    ok = report.max_violation <= BALL_TOLERANCE
    where = f" ({worst})" if worst and report.max_violation > 0 else ""
    counted = f"{checked} adversarial examples; " if checked is not None else ""
    return MaskingCheck(
        "in_epsilon_ball",
        ok,
        f"{counted}max violation of the ε-ball / [0, 1] {report.max_violation:.2e}{where}",
    )
