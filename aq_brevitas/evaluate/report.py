"""The robustness report: what :func:`~aq_brevitas.evaluate.evaluate_robustness` measured, and the
gradient-masking checklist computed from its numbers (docs/finetune_and_evaluate.md describes it).

:class:`RobustnessReport` holds one :class:`AttackResult` per attack and ε and one
:class:`MaskingCheck` per check; it serialises to JSON (``to_json``/``save``, ``from_json``/``load``),
renders as a markdown table (``to_markdown``) and plots accuracy against ε (``plot``).

Each result keeps which images it left standing (``AttackResult.correct``, a base64 bitmask), so
:meth:`RobustnessReport.robust_accuracy` is the per-image worst case over every attack run at an ε
(AutoAttack's definition): an image broken by any attack counts as broken. That is the robust figure
the package reports everywhere.
"""

from __future__ import annotations

import base64
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ConfigError

SCHEMA = "aq-brevitas/robustness/v2"
OLD_SCHEMAS = ("aq-brevitas/robustness/v1",)  # read, with a note: no per-image outcomes
NO_PER_IMAGE_NOTE = (
    "per-image outcomes were not stored (a report of schema v1): robust_accuracy is the lowest "
    "accuracy of any attack run on all images at that ε, an upper bound on the per-image worst case"
)
TOLERANCE = 0.005  # 0.5 pt: PGD vs FGSM, and monotonicity in ε
GRADIENT_FREE_TOLERANCE = 0.02  # 2 pts: Square may be this much stronger than PGD before we flag it
LARGE_EPS_MAX_ACCURACY = 0.05  # at ε=0.5 an honest attack leaves (almost) nothing standing
BALL_TOLERANCE = 1e-6


# -- the report -------------------------------------------------------------------------------------------
def pack_mask(mask: Any) -> str:
    """A sequence of booleans as a compact base64 bitmask (bit ``i % 8`` of byte ``i // 8``)."""
    bits = [bool(v) for v in mask]
    raw = bytearray((len(bits) + 7) // 8)
    for i, b in enumerate(bits):
        if b:
            raw[i // 8] |= 1 << (i % 8)
    return base64.b64encode(bytes(raw)).decode("ascii")


def unpack_mask(text: str, n: int) -> list[bool]:
    """The ``n`` booleans :func:`pack_mask` encoded; :class:`ConfigError` for a malformed mask."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise ConfigError("malformed per-image mask in a robustness report", "re-create the report") from None
    if len(raw) != (n + 7) // 8:
        raise ConfigError(
            f"a per-image mask holds {len(raw)} bytes, not {(n + 7) // 8}", "re-create the report"
        )
    return [bool(raw[i // 8] >> (i % 8) & 1) for i in range(n)]


@dataclass
class AttackResult:
    """One attack at one ε: robust accuracy on ``images`` images (an example counts if clean- and adv-correct).

    ``correct``: which of the report's images this attack left standing, a :func:`pack_mask` bitmask
    over all of them (an image it did not attack counts as standing unless it was misclassified
    clean). ``chain``: the suite it belongs to (``"suite"``, ``"autoattack"``), whose attacks run one
    after another on the images still standing, each row counting the images standing after it and
    every earlier attack of the chain (at this ε and, for the suite, at every smaller ε)."""

    attack: str
    eps: float
    accuracy: float
    images: int
    seconds: float
    steps: int | None = (
        None  # iterations (PGD, APGD, FAB), 1 (FGSM), queries (Square), None (clean, transfer)
    )
    restarts: int = 1
    correct: str | None = None
    chain: str | None = None


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

    @property
    def warnings(self) -> list[str]:
        """One line per failed check (masking check or attack-failure indicator), with its numbers."""
        return [f"{c.name}: {c.detail}" for c in self.checks if c.passed is False]

    @property
    def eps_values(self) -> list[float]:
        """The ε values attacks ran at (0 and the large-ε check excluded), ascending."""
        return sorted(
            {r.eps for r in self.results if r.attack not in ("clean", "pgd-large-eps") and r.eps > 0}
        )

    def per_image(self, eps: float) -> list[bool] | None:
        """Per image: still correct after every attack run at ``eps`` (None when the report stores no
        per-image outcomes: a schema-v1 report)."""
        rows = [r for r in self.results if r.attack == "clean" or math.isclose(r.eps, eps, abs_tol=1e-9)]
        if any(r.correct is None for r in rows):
            return None
        if len(rows) == 1:
            raise ConfigError(f"no attack ran at eps={eps:g}", f"use one of {self.eps_values}")
        masks = [unpack_mask(r.correct, self.images) for r in rows if r.correct is not None]
        return [all(bits) for bits in zip(*masks, strict=True)]

    def robust_accuracy(self, eps: float) -> float:
        """Robust accuracy at ``eps`` in [0, 1]: the fraction of the report's images classified correctly
        clean and after every attack run at ``eps`` -- the per-image worst case (an image broken by
        any attack counts as broken), AutoAttack's definition. Attacks run on a subset (Square,
        AutoAttack) can only remove images of their subset. For a schema-v1 report,
        without per-image outcomes, the lowest accuracy of any attack run on all images at ``eps``
        (see ``notes``). Raises :class:`ConfigError` when no attack ran at ``eps``.

        >>> from aq_brevitas.evaluate.report import AttackResult, RobustnessReport, pack_mask
        >>> rows = [AttackResult("clean", 0.0, 0.75, 4, 0.0, correct=pack_mask([1, 1, 1, 0])),
        ...         AttackResult("pgd", 0.1, 0.5, 4, 0.0, correct=pack_mask([1, 0, 1, 0])),
        ...         AttackResult("square", 0.1, 0.5, 4, 0.0, correct=pack_mask([1, 1, 0, 0]))]
        >>> RobustnessReport("m", 4, 0.75, rows).robust_accuracy(0.1)  # each attack breaks another image
        0.25
        """
        worst = self.per_image(eps)
        if worst is not None:
            return sum(worst) / self.images
        at = [r for r in self.results if r.attack != "clean" and math.isclose(r.eps, eps, abs_tol=1e-9)]
        if not at:
            raise ConfigError(f"no attack ran at eps={eps:g}", f"use one of {self.eps_values}")
        on_all = [r.accuracy for r in at if r.images == self.images]
        return min(on_all or [r.accuracy for r in at])

    def result(self, attack: str, eps: float, chain: str | None = None) -> AttackResult:
        """The row of ``attack`` at ``eps`` (of the chain ``chain``: ``"suite"``, ``"autoattack"``; None:
        an attack run on its own)."""
        for r in self.results:
            if (
                r.attack == attack
                and r.chain == chain
                and (attack == "clean" or math.isclose(r.eps, eps, abs_tol=1e-9))
            ):
                return r
        have = ", ".join(f"{_label(r)}@{r.eps:g}" for r in self.results)
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
        if not isinstance(d, Mapping) or d.get("schema") not in (SCHEMA, *OLD_SCHEMAS):
            raise ConfigError("not a robustness report (missing or wrong 'schema')", f"expected {SCHEMA!r}")
        try:
            report = cls(
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
        if any(r.correct is None for r in report.results) and NO_PER_IMAGE_NOTE not in report.notes:
            report.notes.append(NO_PER_IMAGE_NOTE)
        return report

    @classmethod
    def from_json(cls, text: str) -> RobustnessReport:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"robustness report is not valid JSON ({exc.msg})", "re-create it") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        from ..storage import atomic_write_text

        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RobustnessReport:
        from ..storage import read_json

        return cls.from_dict(read_json(path, "robustness report"))

    # presentation
    def _labels_in_order(self) -> list[str]:
        return list(dict.fromkeys(_label(r) for r in self.results))

    def _row(self, label: str, rows: list[AttackResult], eps_cols: list[float]) -> str:
        cells = {r.eps: f"{100 * r.accuracy:.1f}%" for r in rows}
        steps = rows[0].steps if rows[0].steps is not None else "–"
        if rows[0].restarts > 1:
            steps = f"{steps}×{rows[0].restarts}"
        cols = [label, str(rows[0].images), str(steps), *[cells.get(e, "–") for e in eps_cols]]
        return "| " + " | ".join([*cols, f"{sum(r.seconds for r in rows):.1f}"]) + " |"

    def to_markdown(self) -> str:
        """The robust accuracy (per-image worst case) per ε, a table attacks × ε, notes and skipped
        attacks, then the gradient-masking checks and attack-failure indicators, and a warning per
        failed one."""
        eps_cols = sorted({r.eps for r in self.results})
        head = ["attack", "images", "steps", *[f"ε={e:g}" for e in eps_cols], "seconds"]
        worst = ", ".join(f"**{100 * self.robust_accuracy(e):.1f}%** at ε={e:g}" for e in self.eps_values)
        lines = [
            f"### Robustness of {self.model} ({self.images} images, {self.seconds:.1f} s)",
            "",
            f"Robust accuracy (per image, the worst case over every attack at that ε): {worst or 'none'}.",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
        ]
        wc = {e: f"**{100 * self.robust_accuracy(e):.1f}%**" for e in self.eps_values}
        lines.append("| **worst case** | " + f"{self.images} | – | " + " | ".join(
            [f"{100 * self.clean_accuracy:.1f}%" if e == 0 else wc.get(e, "–") for e in eps_cols]) + " | – |")  # fmt: skip
        for label in self._labels_in_order():
            lines.append(self._row(label, [r for r in self.results if _label(r) == label], eps_cols))
        if any(r.chain for r in self.results):
            lines += ["", CHAIN_NOTE]
        if self.notes:
            lines += ["", "Notes:", "", *[f"- {n}" for n in self.notes]]
        if self.skipped:
            lines += ["", "Skipped attacks:", "", *[f"- `{a}`: {why}" for a, why in self.skipped.items()]]
        lines += ["", "Gradient-masking checks and attack-failure indicators:", ""]
        mark = {True: "✅", False: "⚠️", None: "–"}
        lines += [f"- {mark[c.passed]} `{c.name}`: {c.detail}" for c in self.checks]
        if self.masking_suspected:
            lines += ["", "⚠️ Gradient masking or a failing attack suspected: the robust accuracies above "
                      "are likely overestimates."]  # fmt: skip
        return "\n".join(lines) + "\n"

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Accuracy vs ε per attack and the per-image worst case, clean accuracy as a horizontal line."""
        from ..plots import plot_robustness

        eps = self.eps_values
        series = {"worst case (robust accuracy)": (eps, [self.robust_accuracy(e) for e in eps])}
        for label in self._labels_in_order():
            if label == "clean":
                continue
            rows = sorted((r for r in self.results if _label(r) == label), key=lambda r: r.eps)
            series[f"{label} ({rows[0].images} img)"] = ([r.eps for r in rows], [r.accuracy for r in rows])
        title = f"{self.model}: robust accuracy" + (" (masking suspected)" if self.masking_suspected else "")
        plot_robustness(series, self.clean_accuracy, path, title=title)


CHAIN_NOTE = (
    "Rows `suite › …` and `autoattack › …` are chains: each attack runs on the images still standing, and "
    "its row counts the images standing after it and every earlier attack of the chain (the suite also "
    "starts from the images standing at every smaller ε)."
)


def _label(r: AttackResult) -> str:
    return f"{r.chain} › {r.attack}" if r.chain else r.attack


# -- the gradient-masking checklist -----------------------------------------------------------------------
def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _by_eps(report: RobustnessReport, attack: str) -> dict[float, float]:
    return {r.eps: r.accuracy for r in report.results if r.attack == attack and r.chain is None}


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
        r for r in report.results if r.attack == "pgd" and r.chain is None and math.isclose(r.eps, large_eps)
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
    sq = [r for r in report.results if r.attack == "square" and r.chain is None]
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
