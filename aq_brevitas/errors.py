"""The package's own exceptions.

Every user-facing failure is an :class:`AqError` whose message is one line that names what is wrong
and how to fix it. The CLI prints that line and exits with code 2, without a traceback.
"""

from __future__ import annotations


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
