"""Errors raised by the worker, split by what the caller should do about them.

WorkerError
├── ConfigError              a setting is invalid; start-up stops (exit code 2)
├── PermanentError           retrying cannot help; the message goes to the dead-letter queue
│   └── InvalidMessage       the body is not a message we can process (the reason says why)
└── TransientError           may succeed later; the message is retried with a delay
    ├── ClassifierUnavailable   the classifier timed out or failed
    ├── PublishFailed        the broker did not confirm a publish
    └── StoreUnavailable     Redis could not be reached for a claim, the cache or counters
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base of every error the worker raises on purpose."""


class ConfigError(WorkerError):
    """A setting is invalid; the message names the variable, never its secret value."""


class PermanentError(WorkerError):
    """Processing this message can never succeed."""


class InvalidMessage(PermanentError):
    """The delivery is not a processable message; ``reason`` is a short machine-friendly code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class TransientError(WorkerError):
    """Processing may succeed if tried again later."""


class ClassifierUnavailable(TransientError):
    """The classifier could not give an answer this time."""


class PublishFailed(TransientError):
    """The broker did not accept a publish."""


class StoreUnavailable(TransientError):
    """Redis could not be reached."""
