"""Errors that a user can act on.

Every problem found in user input is reported as one line of the form
``kitspipe: <stage>: <case> <path>: <problem> (<observed> vs <expected>)`` so that a
log of a failed run can be grepped and each line points at the file to fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    """One defect in one input, as reported to the user.

    Args:
        stage: the pipeline stage that found it (``check``, ``fingerprint``, ...).
        case: the case id, or ``-`` when the problem is not tied to one case.
        path: the file or folder concerned.
        problem: what is wrong, in a few words.
        observed: what was found (optional).
        expected: what was expected (optional; without it the line ends ``(<observed>)``).
        severity: ``error`` stops the stage; ``warning`` is reported and the stage goes on.
    """

    stage: str
    case: str
    path: str | Path
    problem: str
    observed: str = ""
    expected: str = ""
    severity: str = "error"

    def line(self) -> str:
        text = f"kitspipe: {self.stage}: {_one_line(str(self.case))} {_one_line(str(self.path))}: {self.problem}"
        if self.expected:
            text += f" ({_one_line(str(self.observed))} vs {_one_line(str(self.expected))})"
        elif self.observed:
            text += f" ({_one_line(str(self.observed))})"
        if self.severity != "error":
            text += f" [{self.severity}]"
        return text


def _one_line(text: str) -> str:
    """``text`` with control characters escaped: a file name may hold a newline or a terminal
    escape sequence, and one problem must stay one line of the log."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class KitspipeError(Exception):
    """An error caused by user input or configuration, reported without a traceback."""

    def __init__(self, problems: Problem | list[Problem] | str):
        if isinstance(problems, str):
            self.problems: list[Problem] = []
            message = problems if problems.startswith("kitspipe:") else f"kitspipe: {problems}"
        else:
            self.problems = [problems] if isinstance(problems, Problem) else list(problems)
            message = "\n".join(p.line() for p in self.problems)
        super().__init__(message)


class PlanError(KitspipeError):
    """A plans file or preset that does not satisfy the schema; the message names the field."""
