"""Where an adaptive attack suite spends its effort: :class:`Schedule` and the named :data:`SCHEDULES`
(:mod:`aq_brevitas.evaluate.suite` runs them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Schedule:
    """Where an adaptive suite spends its effort. ``step_share``: ``(attack, share)`` pairs, the share
    of the suite's ``steps`` the attack runs (before :func:`member_steps`; others run all of them).
    ``sampled``: attacks that first run on their focus -- the ``focus`` share (``(attack, share)``
    pairs, default 0) of the images still standing with the smallest margin any earlier attack saw --
    and a seeded random ``sample`` of the others, and go on to the rest only when that sample loses an
    image or the attack-failure indicators readable from the chain so far fire
    (:func:`~aq_brevitas.evaluate.indicators.chain_alarm`); once escalated, every later sampled attack
    runs on all images still standing. What was skipped is in the step's ``notes``."""

    step_share: tuple[tuple[str, float], ...] = ()
    sampled: tuple[str, ...] = ()
    sample: int = 48
    focus: tuple[tuple[str, float], ...] = ()

    def focused(self, name: str, todo: torch.Tensor) -> int:
        """How many of the images ``todo`` attack ``name`` always runs on (its focus)."""
        return int(dict(self.focus).get(name, 0.0) * len(todo))

    def describe(self) -> str:
        """The schedule in words, for a report's notes.

        >>> Schedule((("apgd-ce", 0.5),), ("square",), 48).describe()
        'apgd-ce with 0.5 of the iterations; square first on a random 48 of the (other) images still standing, on the rest only when that sample loses an image or an attack-failure indicator fires'
        """
        parts = [f"{a} with {share:g} of the iterations" for a, share in self.step_share]
        parts += [
            f"{a} always on the {share:g} of the images with the smallest margin" for a, share in self.focus
        ]
        if self.sampled:
            parts.append(
                f"{' and '.join(self.sampled)} first on a random {self.sample} of the (other) images still standing, "
                "on the rest only when that sample loses an image or an attack-failure indicator fires"
            )
        return "; ".join(parts) or "every attack on every image still standing"


#: the schedules of the suites of :data:`SUITES` that have one (the others run every attack on every
#: image still standing). ``"adaptive"``: the fast suite's attacks; APGD-CE on every image (at half its
#: iterations it cost up to 1.4 points on masked rows); APGD-DLR and APGD-T3 on the 15 % of the images
#: still standing with the smallest margin and a random 32 of the others, Square on the smallest-margin
#: 5 % and a random 32, each escalated to all; transfer, cheap, on all (docs/benchmarks.md, "Attack suite").
SCHEDULES: dict[str, Schedule] = {
    "adaptive": Schedule(
        sampled=("apgd-dlr", "apgd-t3", "square"),
        sample=32,
        focus=(("apgd-dlr", 0.15), ("apgd-t3", 0.15), ("square", 0.05)),
    ),
}
