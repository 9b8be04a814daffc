"""Errors raised by the worker, split by what the caller should do about them.

Three kinds: configuration errors stop start-up, permanent errors dead-letter the message, and
retryable (transient) errors send it round again after a delay. The hierarchy::

    WorkerError                   base of every error raised on purpose
    │
    ├── ConfigError               CONFIGURATION: a setting is invalid; start-up stops, exit code 2
    │
    ├── PermanentError            PERMANENT: retrying cannot help; the message is dead-lettered
    │   └── InvalidMessage          the body is not a processable message (``reason`` says why)
    │
    └── TransientError            RETRYABLE: may succeed later; the message waits in a retry
        │                         queue for its next attempt, and is dead-lettered once its
        │                         attempts are spent
        ├── ClassifierUnavailable   no classification this time: the classifier failed or timed
        │   │                       out, or the answer another replica was computing never came
        │   └── ClassifierPaused      not asked at all: the classifier's circuit breaker is open
        │                             (the provider is down or refuses the configuration); the
        │                             message waits without spending an attempt
        ├── PublishFailed           the broker did not confirm a publish
        └── StoreUnavailable        the claim store (Redis) is unreachable and the claim cannot
                                    fall back yet; the cache and counters degrade instead of raising

Anything else that escapes a message's processing is unexpected (a bug): its dead letter or retry
names only its type, since its text may hold anything, and it is retried until the attempts run out.
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


class ClassifierPaused(ClassifierUnavailable):
    """The classifier's circuit breaker is open: the message was not the cause and is held."""


class PublishFailed(TransientError):
    """The broker did not accept a publish."""


class StoreUnavailable(TransientError):
    """Redis could not be reached."""
