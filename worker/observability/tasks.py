"""The last error of each background task (heartbeats and counters, lease renewal), for the stats.

A background task never dies of an error: it logs it, records it here, and tries again at its
next turn; a turn that succeeds clears the record. The stats endpoint shows what is recorded under
``replica.background_errors``, so a task that keeps failing is visible while it happens, not
only at shutdown.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from worker.core.redaction import scrub


@dataclass(frozen=True, slots=True)
class TaskError:
    error: str  # the exception's type and message, secrets removed
    since: float  # epoch seconds of the first failure in a row
    failures: int  # failures in a row


class BackgroundErrors:
    """Per task name, its current run of failures (none while it succeeds)."""

    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        self._secrets = secrets
        self._errors: dict[str, TaskError] = {}

    def failed(self, task: str, exc: BaseException) -> bool:
        """Record a failure of ``task``; ``True`` when it is the first of a run (log it then)."""
        error = scrub(f"{type(exc).__name__}: {exc}", self._secrets)
        previous = self._errors.get(task)
        if previous is None:
            self._errors[task] = TaskError(error, time.time(), 1)
            return True
        self._errors[task] = TaskError(error, previous.since, previous.failures + 1)
        return previous.error != error

    def succeeded(self, task: str) -> None:
        self._errors.pop(task, None)

    def snapshot(self) -> dict[str, dict[str, object]]:
        return {
            task: {"error": e.error, "since": e.since, "failures": e.failures}
            for task, e in sorted(self._errors.items())
        }
