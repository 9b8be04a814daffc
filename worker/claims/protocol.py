"""Claims: a replica processes a message only while it holds the message ID's lease.

Protocol (per message ID):
- ``claim_many``: if a done marker exists the delivery is a duplicate (or a redelivery of a
  message already finished); otherwise take the lease if it is free, else report who is busy and
  for how long. The caller of a busy ID waits, holding its delivery, and claims again.
- Taking the lease also counts an attempt, so an attempt is counted even when the replica making
  it is killed before it can say anything. An ID whose attempts already reached ``max_attempts``
  is not claimed but reported ``EXHAUSTED``: it goes to the dead-letter queue instead of killing
  one more replica. An ID with ``suspect_at`` or more attempts started is not claimed either but
  reported ``SUSPECT``: the caller knows how many of them ended properly, and the rest vanished
  with their replica; it claims the ID again when it can work on it alone (``suspect_at`` 0).
- ``release`` with ``refund_attempt`` also takes back the attempt the claim counted (the message
  was held, not tried: the classifier's circuit breaker was open).
- ``renew``/``release``/``complete_many`` check the owner token, so a replica that lost its lease
  can never extend, delete or finish the new owner's claim.
- ``complete_many`` writes the done marker, drops the lease and the attempt count, and adds the
  message to the cluster counters at once: a crash cannot leave a counted message without its
  marker, or the reverse.

The stores: ``redis_store`` (the cluster), ``memory_store`` (one process), ``fallback`` (Redis
while it answers, memory meanwhile). Every operation takes a batch: one round trip for it.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Sequence
from enum import Enum
from typing import NamedTuple, Protocol


class ClaimStatus(Enum):
    CLAIMED = "claimed"
    DONE = "done"
    BUSY = "busy"
    EXHAUSTED = "exhausted"
    SUSPECT = "suspect"


class CompleteStatus(Enum):
    """How a completion ended: counted in Redis by the script, kept in memory, or lease lost."""

    IN_REDIS = "in_redis"
    IN_MEMORY = "in_memory"
    # A Redis claim finished while Redis was unreachable: the write-back records and counts it
    # (unless Redis already had it, see write_back.lua), so it is not counted anywhere else.
    DEFERRED = "deferred"
    LOST = "lost"


class ClaimResult(NamedTuple):
    """The answer to a claim: ours (with its token), already done, busy for ``retry_after_s``, or
    exhausted (no attempt left).

    ``attempt`` is the number of attempts started for the ID, this one included, when claimed; the
    number already started when exhausted or suspect. ``in_redis`` says a Redis script already
    counted what this answer implies (a duplicate).
    """

    status: ClaimStatus
    token: str = ""
    retry_after_s: float = 0.0
    in_redis: bool = False
    attempt: int = 0


class ClaimAsk(NamedTuple):
    """One ID to claim. ``redelivered``: a done ID then counts as ``redelivered_done``, not as a
    duplicate. ``suspect_at``: answer ``SUSPECT`` instead of claiming once this many attempts were
    started (0: never)."""

    message_id: str
    redelivered: bool = False
    suspect_at: int = 0


class Completion(NamedTuple):
    message_id: str
    token: str
    cache_hit: bool


class Lease(NamedTuple):
    message_id: str
    token: str


class ClaimStore(Protocol):
    """Where claims and done markers live: Redis for a cluster, memory for one process."""

    lease_s: float

    async def claim_many(self, requests: Sequence[ClaimAsk]) -> list[ClaimResult]:
        """Claim several IDs at once: one round trip for the batch."""
        ...

    async def complete_many(self, items: Sequence[Completion]) -> list[CompleteStatus]:
        """Complete several claims at once: one round trip for the batch."""
        ...

    async def release(
        self, message_id: str, token: str, *, refund_attempt: bool = False
    ) -> bool: ...

    async def renew(self, leases: Sequence[Lease]) -> list[bool]: ...

    async def aclose(self) -> None: ...


class TokenSource:
    """Unique lease tokens: the replica's ID, a random nonce of this process, a sequence number.

    The nonce keeps a restarted replica that reuses its ``REPLICA_ID`` from ever presenting the
    token of a claim its predecessor left behind.
    """

    def __init__(self, replica_id: str) -> None:
        self._prefix = f"{replica_id}:{secrets.token_hex(4)}"
        self._seq = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}:{next(self._seq)}"
