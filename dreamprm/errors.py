"""Every error a user can cause and fix, under one base class.

The CLI catches DreamPRMError alone and prints its message without a traceback; anything
else (an ImportError or FileNotFoundError from a bug, say) keeps its traceback. Messages
name the file and line, or the flag, and say how to fix it.
"""

from __future__ import annotations

MAX_SHOWN = 50  # problem lines in one message; the count of the rest is always given


class DreamPRMError(Exception):
    """Bad input, configuration or state that the user can fix; the message says how."""


def _listing(headline: str, problems: list[str]) -> str:
    shown = problems[:MAX_SHOWN]
    if len(problems) > MAX_SHOWN:
        shown = [*shown, f"... and {len(problems) - MAX_SHOWN} more"]
    return headline + "\n  " + "\n  ".join(shown)


class ConfigError(DreamPRMError):
    """An invalid run configuration; .problems names the flag (or YAML file:line) of each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(_listing("invalid configuration:", self.problems))


class DataError(DreamPRMError):
    """Bad input data; .problems holds every "FILE:LINE: field: message" line. skippable is
    True when leaving the bad records out (skip_invalid) would give a usable file."""

    def __init__(self, problems: list[str], skippable: bool = False):
        self.problems, self.skippable = list(problems), skippable
        shown = self.problems[:MAX_SHOWN]
        if len(self.problems) > MAX_SHOWN:
            shown.append(f"... and {len(self.problems) - MAX_SHOWN} more")
        super().__init__(f"{len(self.problems)} problem(s) in the data:\n" + "\n".join(shown))


class CheckpointError(DreamPRMError):
    """A checkpoint that is missing, partial, damaged or does not fit this run."""


class RunLockError(DreamPRMError):
    """The run directory is held by another job (or its LOCK cannot be read)."""


class CollectiveError(DreamPRMError):
    """A rank or node went silent (a collective timed out) or died; names the rank when it can."""


class NonFiniteError(DreamPRMError):
    """A non-finite loss or alignment; names the records of every rank."""


class ScoringError(DreamPRMError):
    """A model path that cannot be scored with, or solutions that cannot be scored."""


class EvalError(DreamPRMError):
    """Bad input to `dreamprm evaluate`; the message lists every problem found."""


class ModelError(DreamPRMError):
    """A model folder, tokenizer, step tag or optional package that does not fit the run."""


class WeightsError(DreamPRMError):
    """A run directory whose learned weights cannot be audited, or bad `dreamprm weights` flags."""
