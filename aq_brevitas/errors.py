"""The package's own exceptions.

Every user-facing failure is an :class:`AqError` whose message is one line that names what is wrong
and how to fix it. The CLI prints that line and exits with code 2, without a traceback.
"""

from __future__ import annotations

import sys
import warnings


class AqError(Exception):
    """Base class: a one-line message naming the problem, plus the fix."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem} -- fix: {fix}")


class DataError(AqError):
    """Dataset files missing, unreadable or malformed."""


class CheckpointError(AqError):
    """A checkpoint that is missing, truncated, foreign or unsafe to load."""


class PolicyError(AqError):
    """A quantization policy that is malformed or does not fit the model."""


class ModelError(AqError):
    """A model that cannot be handled (unknown name, no quantizable layers, NaN weights...)."""


class ConfigError(AqError):
    """A bad setting: an epsilon out of range, a budget that cannot be met, a bad path..."""


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """Issue ``message`` as a warning attributed to the user's own line: the caller of the outermost
    frame of this package on the stack, however deep inside it the warning arose, callbacks from
    torch included (a fixed ``stacklevel`` breaks whenever a call path inside the package changes,
    e.g. when an entry point is decorated)."""
    package = __name__.partition(".")[0]
    frame, level, target = sys._getframe(1), 2, 2  # level 2: the frame that called this function
    while frame is not None:
        if frame.f_globals.get("__name__", "").partition(".")[0] == package:
            target = level + 1
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=min(target, level - 1))


def a_type(obj: object) -> str:
    """``obj``'s type name with its indefinite article, for messages: "an AttackConfig", "a dict".

    >>> a_type({}), a_type(ValueError())
    ('a dict', 'a ValueError')
    >>> a_type(Exception())
    'an Exception'
    """
    name = type(obj).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"
