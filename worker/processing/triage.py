"""What a claim's answer means for one delivery, decided once, by a pure function.

Every claimed message, whether it was claimed by a pass, after waiting for a busy claim, or alone
as a suspect, goes through ``triage``; the caller acts on the verdict and nothing else:

=================  ====================================================================
verdict            what the caller does
=================  ====================================================================
``DUPLICATE``      ack, count ``duplicates`` (the producer sent the ID twice)
``DONE_AGAIN``     ack, count ``redelivered_done`` (a redelivery or retry of a done ID)
``EXHAUSTED``      dead-letter as ``retries_exhausted`` with ``attempts`` started
``OVER_LIMIT``     release the claim, then dead-letter (``MAX_ATTEMPTS`` lowered since)
``SUSPECT``        re-claim and work on it alone (two of its attempts vanished)
``BUSY``           hold the delivery, re-claim after ``retry_after_s``
``WORK``           classify, publish, complete: attempt number ``attempt``
=================  ====================================================================

What a failed attempt means is decided the same way, by ``after_failure``:

===============  ======================================================================
``HOLD``         the classifier's breaker is open (``ClassifierPaused``): release the claim
                 with its attempt given back and hold the delivery (``Failures.hold``)
``RETRY``        release the claim, park a copy in the retry queue of ``attempt``
``DEAD_LETTER``  release the claim, dead-letter: a permanent error, or the last attempt
===============  ======================================================================
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

from worker.amqp.topology import Attempts
from worker.claims.protocol import ClaimResult, ClaimStatus
from worker.core.errors import ClassifierPaused, PermanentError


class Verdict(Enum):
    DUPLICATE = "duplicate"
    DONE_AGAIN = "done_again"
    EXHAUSTED = "exhausted"
    OVER_LIMIT = "over_limit"
    SUSPECT = "suspect"
    BUSY = "busy"
    WORK = "work"


class Triage(NamedTuple):
    """The verdict, with the attempt being made (``WORK``) or the attempts already made
    (``EXHAUSTED``, ``OVER_LIMIT``, ``SUSPECT``)."""

    verdict: Verdict
    attempt: int = 0


def triage(
    claim: ClaimResult, *, attempts: Attempts, seen_before: bool, max_attempts: int
) -> Triage:
    """Decide what ``claim`` means for a delivery whose attempt header and broker delivery count
    are ``attempts``.

    The store counts attempts when a claim is taken (``claim.attempt``); the header survives a
    Redis outage and a memory store's restart, and so does a quorum queue's count of the times a
    delivery came back unacknowledged (a replica that crashed on it, a lost channel): each such
    return is an attempt on top of the header's. The attempt is the larger of the two counts, so
    a message that kills every replica working on it ends in the dead-letter queue even when the
    attempts counted in memory die with the replicas.
    """
    status = claim.status
    if status is ClaimStatus.DONE:
        return Triage(Verdict.DONE_AGAIN if seen_before else Verdict.DUPLICATE)
    if status is ClaimStatus.BUSY:
        return Triage(Verdict.BUSY)
    if status is ClaimStatus.SUSPECT:
        return Triage(Verdict.SUSPECT, claim.attempt)
    if status is ClaimStatus.EXHAUSTED:
        return Triage(Verdict.EXHAUSTED, claim.attempt)
    attempt = max(attempts.header + attempts.returned, claim.attempt)
    if attempt > max_attempts:
        return Triage(Verdict.OVER_LIMIT, attempt - 1)
    return Triage(Verdict.WORK, attempt)


class AfterFailure(Enum):
    HOLD = "hold"
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"


def after_failure(exc: BaseException, *, attempt: int, max_attempts: int) -> AfterFailure:
    """Decide what a failure of attempt ``attempt`` means: a message the open breaker refused
    spends nothing; a permanent error or the last attempt ends in the dead-letter queue."""
    if isinstance(exc, ClassifierPaused):
        return AfterFailure.HOLD
    if isinstance(exc, PermanentError) or attempt >= max_attempts:
        return AfterFailure.DEAD_LETTER
    return AfterFailure.RETRY
