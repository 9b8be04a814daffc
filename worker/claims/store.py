"""Claims: a replica processes a message only while it holds the message ID's lease.

Protocol (per message ID):
- ``claim``: if a done marker exists the delivery is a duplicate (or a redelivery of a message
  already finished); otherwise take the lease if it is free (``SET NX PX``), else report who is
  busy and for how long. The caller of a busy ID waits, holding its delivery, and claims again.
- Taking the lease also counts an attempt (``INCR attempts:{id}``), so an attempt is counted
  even when the replica making it is killed before it can say anything. An ID whose attempts
  already reached ``max_attempts`` is not claimed but reported ``EXHAUSTED``: it goes to the
  dead-letter queue instead of killing one more replica. An ID with ``suspect_at`` or more
  attempts started is not claimed either but reported ``SUSPECT``: the caller knows how many of
  them ended properly, and the rest vanished with their replica; it claims the ID again when it
  can work on it alone (``suspect_at`` 0).
- ``renew``/``release``/``complete`` check the owner token inside Lua, so a replica that lost its
  lease can never extend, delete or finish the new owner's claim.
- ``complete`` writes the done marker, drops the lease and the attempt count, and adds the message
  to the cluster counters in one script: a crash cannot leave a counted message without its
  marker, or the reverse.

Every operation takes a batch: concurrent messages share one round trip (see ``batching``).
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from enum import Enum
from typing import Final, NamedTuple, Protocol, TypeVar

from redis.asyncio import Redis

from worker.observability.metrics import CounterName
from worker.redisio.batching import MicroBatcher
from worker.redisio.keys import RedisKeys

# Keys are built here from their stems (``RedisKeys.done("")`` and so on) and each message ID, so
# a call carries an ID per message instead of three full keys: the arguments were most of the
# client's and the server's work per message. (Redis Cluster wants keys declared in KEYS; the
# worker's deployments are a single Redis, as for the throughput buckets below.)
# KEYS[1]: the counters hash. ARGV: lease (ms), max attempts, attempts TTL (s), the done, claim
# and attempts stems; then per ID: the ID, its token, and 2 * suspect_at + redelivered (0/1).
# Answers, two numbers per ID: (status, value); status 0 claimed (value: attempts started, this
# one included), 1 done, 2 busy (value: ms left on the owner's lease), 3 exhausted and 4 suspect
# (value: attempts started before).
CLAIM_LUA = """
local lease_ms, max_attempts, attempts_ttl_s = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local done_stem, claim_stem, attempts_stem = ARGV[4], ARGV[5], ARGV[6]
local out = {}
local duplicates, redelivered = 0, 0
for i = 1, (#ARGV - 6) / 3 do
  local id, token, flags = ARGV[3 * i + 4], ARGV[3 * i + 5], tonumber(ARGV[3 * i + 6])
  local claim_key = claim_stem .. id
  if redis.call('EXISTS', done_stem .. id) == 1 then
    out[2 * i - 1], out[2 * i] = 1, 0
    if flags % 2 == 1 then redelivered = redelivered + 1 else duplicates = duplicates + 1 end
  elseif redis.call('SET', claim_key, token, 'NX', 'PX', lease_ms) then
    local attempts_key = attempts_stem .. id
    local attempts = 1
    if not redis.call('SET', attempts_key, 1, 'NX', 'EX', attempts_ttl_s) then
      attempts = redis.call('INCR', attempts_key)
    end
    local suspect_at = math.floor(flags / 2)
    if max_attempts > 0 and attempts > max_attempts then
      redis.call('DECR', attempts_key)
      redis.call('DEL', claim_key)
      out[2 * i - 1], out[2 * i] = 3, attempts - 1
    elseif suspect_at > 0 and attempts > suspect_at then
      redis.call('DECR', attempts_key)
      redis.call('DEL', claim_key)
      out[2 * i - 1], out[2 * i] = 4, attempts - 1
    else
      out[2 * i - 1], out[2 * i] = 0, attempts
    end
  else
    local ttl = redis.call('PTTL', claim_key)
    if ttl < 0 then ttl = tonumber(lease_ms) end
    out[2 * i - 1], out[2 * i] = 2, ttl
  end
end
if duplicates > 0 then redis.call('HINCRBY', KEYS[1], '@DUPLICATES@', duplicates) end
if redelivered > 0 then redis.call('HINCRBY', KEYS[1], '@REDELIVERED@', redelivered) end
return out
""".replace("@DUPLICATES@", CounterName.DUPLICATES).replace(
    "@REDELIVERED@", CounterName.REDELIVERED_DONE
)

# The end of a script that finished ``processed`` messages, ``hits`` of them cache hits: adds them
# to the counters hash (KEYS[1]) and to this second's throughput bucket (prefix: the last ARGV).
COUNT_COMPLETIONS_LUA: Final = (
    """
if processed > 0 then
  redis.call('HINCRBY', KEYS[1], '@PROCESSED@', processed)
  if hits > 0 then redis.call('HINCRBY', KEYS[1], '@HITS@', hits) end
  if processed > hits then redis.call('HINCRBY', KEYS[1], '@MISSES@', processed - hits) end
  local bucket = ARGV[#ARGV] .. redis.call('TIME')[1]
  redis.call('INCRBY', bucket, processed)
  redis.call('EXPIRE', bucket, bucket_ttl_s)
end
""".replace("@PROCESSED@", CounterName.PROCESSED)
    .replace("@HITS@", CounterName.CACHE_HITS)
    .replace("@MISSES@", CounterName.CACHE_MISSES)
)

# KEYS[1]: the counters hash. ARGV: done TTL (s), bucket TTL (s), the done, claim and attempts
# stems; then per ID: the ID, the owner's token, '1' for a cache hit ('0' not); last: the
# throughput bucket prefix. Per ID: 1 completed, 0 the claim is not ours (any more).
COMPLETE_LUA = (
    """
local ttl_s, bucket_ttl_s = ARGV[1], ARGV[2]
local done_stem, claim_stem, attempts_stem = ARGV[3], ARGV[4], ARGV[5]
local out = {}
local processed, hits = 0, 0
for i = 1, (#ARGV - 6) / 3 do
  local id = ARGV[3 * i + 3]
  local claim_key = claim_stem .. id
  if redis.call('GET', claim_key) == ARGV[3 * i + 4] then
    redis.call('SET', done_stem .. id, '1', 'EX', ttl_s)
    redis.call('DEL', claim_key, attempts_stem .. id)
    processed = processed + 1
    if ARGV[3 * i + 5] == '1' then hits = hits + 1 end
    out[i] = 1
  else
    out[i] = 0
  end
end
"""
    + COUNT_COMPLETIONS_LUA
    + "return out\n"
)

# The write-back of completions made while Redis was unreachable. KEYS[1]: the counters hash;
# then per ID: its done marker and attempt counter. ARGV[1]: done TTL; ARGV[2]: bucket TTL; per ID:
# '0' (claimed in memory, counted already), '1' (a cache miss to count) or '2' (a hit to count);
# last: the throughput bucket prefix. A completion is counted only if its done marker was not
# there yet: a completion script whose answer was lost with the connection may have counted it.
WRITE_BACK_LUA = (
    """
local ttl_s, bucket_ttl_s = ARGV[1], ARGV[2]
local processed, hits = 0, 0
local n = (#KEYS - 1) / 2
for i = 1, n do
  local fresh = redis.call('SET', KEYS[2 * i], '1', 'NX', 'EX', ttl_s)
  redis.call('DEL', KEYS[2 * i + 1])
  local kind = ARGV[i + 2]
  if fresh and kind ~= '0' then
    processed = processed + 1
    if kind == '2' then hits = hits + 1 end
  end
end
"""
    + COUNT_COMPLETIONS_LUA
    + "return processed\n"
)

RENEW_LUA = """
local out = {}
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i + 1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""

RELEASE_LUA = """
local out = {}
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i] then
    redis.call('DEL', KEYS[i])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""


MAX_SCRIPT_BATCH = 512  # IDs per script call: bounds how long one call blocks Redis

Item = TypeVar("Item")
Answer = TypeVar("Answer")


async def in_script_batches(
    run: Callable[[list[Item]], Awaitable[Sequence[Answer]]], items: Sequence[Item]
) -> list[Answer]:
    """``run`` over ``items`` in slices of at most ``MAX_SCRIPT_BATCH``, answers in order."""
    answers: list[Answer] = []
    for start in range(0, len(items), MAX_SCRIPT_BATCH):
        answers += await run(list(items[start : start + MAX_SCRIPT_BATCH]))
    return answers


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
    # (unless Redis already had it, see WRITE_BACK_LUA), so it is not counted anywhere else.
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


class ClaimRequest(NamedTuple):
    message_id: str
    token: str
    redelivered: bool
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

    async def claim(
        self, message_id: str, redelivered: bool, suspect_at: int = 0
    ) -> ClaimResult: ...

    async def claim_many(self, requests: Sequence[ClaimAsk]) -> list[ClaimResult]:
        """Claim several IDs at once: one round trip for the batch."""
        ...

    async def complete(self, message_id: str, token: str, cache_hit: bool) -> CompleteStatus: ...

    async def complete_many(self, items: Sequence[Completion]) -> list[CompleteStatus]:
        """Complete several claims at once: one round trip for the batch."""
        ...

    async def release(self, message_id: str, token: str) -> bool: ...

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


class RedisClaimStore:
    """Claims in Redis, shared by every replica using the same key prefix."""

    def __init__(
        self,
        redis: Redis,
        keys: RedisKeys,
        tokens: TokenSource,
        *,
        lease_s: float,
        dedup_ttl_s: int,
        max_attempts: int = 0,
    ) -> None:
        self.lease_s = lease_s
        self._keys = keys
        self._tokens = tokens
        self._lease_ms = str(max(1, int(lease_s * 1000)))
        self._dedup_ttl_s = str(dedup_ttl_s)
        self._max_attempts = str(max_attempts)  # 0: count attempts, never refuse one
        # The scripts build each ID's keys from these (see CLAIM_LUA).
        self._stems = (keys.done(""), keys.claim(""), keys.attempts(""))
        self._claim_script = redis.register_script(CLAIM_LUA)
        self._complete_script = redis.register_script(COMPLETE_LUA)
        self._renew_script = redis.register_script(RENEW_LUA)
        self._release_script = redis.register_script(RELEASE_LUA)
        self._claims: MicroBatcher[ClaimRequest, ClaimResult] = MicroBatcher(self._claim_batch)
        self._completions: MicroBatcher[Completion, bool] = MicroBatcher(self._complete_batch)
        self._releases: MicroBatcher[Lease, bool] = MicroBatcher(self._release_batch)

    async def claim(self, message_id: str, redelivered: bool, suspect_at: int = 0) -> ClaimResult:
        request = ClaimRequest(message_id, self._tokens.next(), redelivered, suspect_at)
        return await self._claims.submit(request)

    async def claim_many(self, requests: Sequence[ClaimAsk]) -> list[ClaimResult]:
        batch = [
            ClaimRequest(ask.message_id, self._tokens.next(), ask.redelivered, ask.suspect_at)
            for ask in requests
        ]
        return await in_script_batches(self._claim_batch, batch)

    async def complete(self, message_id: str, token: str, cache_hit: bool) -> CompleteStatus:
        done = await self._completions.submit(Completion(message_id, token, cache_hit))
        return CompleteStatus.IN_REDIS if done else CompleteStatus.LOST

    async def complete_many(self, items: Sequence[Completion]) -> list[CompleteStatus]:
        done = await in_script_batches(self._complete_batch, items)
        return [CompleteStatus.IN_REDIS if d else CompleteStatus.LOST for d in done]

    async def release(self, message_id: str, token: str) -> bool:
        return await self._releases.submit(Lease(message_id, token))

    async def renew(self, leases: Sequence[Lease]) -> list[bool]:
        if not leases:
            return []
        keys = [self._keys.claim(lease.message_id) for lease in leases]
        args = [self._lease_ms, *(lease.token for lease in leases)]
        return [bool(x) for x in await self._renew_script(keys=keys, args=args)]

    async def _claim_batch(self, batch: list[ClaimRequest]) -> list[ClaimResult]:
        args = [self._lease_ms, self._max_attempts, self._dedup_ttl_s, *self._stems]
        for request in batch:
            flags = 2 * request.suspect_at + (1 if request.redelivered else 0)
            args += (request.message_id, request.token, str(flags))
        answers = await self._claim_script(keys=[self._keys.stats], args=args)
        results: list[ClaimResult] = []
        for index, request in enumerate(batch):
            status, value = int(answers[2 * index]), int(answers[2 * index + 1])
            if status == 0:
                results.append(
                    ClaimResult(ClaimStatus.CLAIMED, request.token, in_redis=True, attempt=value)
                )
            elif status == 1:
                results.append(ClaimResult(ClaimStatus.DONE, in_redis=True))
            elif status == 2:
                results.append(ClaimResult(ClaimStatus.BUSY, retry_after_s=value / 1000))
            elif status == 3:
                results.append(ClaimResult(ClaimStatus.EXHAUSTED, attempt=value))
            else:
                results.append(ClaimResult(ClaimStatus.SUSPECT, attempt=value))
        return results

    async def _complete_batch(self, batch: list[Completion]) -> list[bool]:
        args = [self._dedup_ttl_s, "900", *self._stems]
        for item in batch:
            args += (item.message_id, item.token, "1" if item.cache_hit else "0")
        args.append(self._keys.throughput(0)[:-1])  # the bucket prefix; the script appends TIME
        answers = await self._complete_script(keys=[self._keys.stats], args=args)
        return [bool(x) for x in answers]

    async def _release_batch(self, batch: list[Lease]) -> list[bool]:
        keys = [self._keys.claim(lease.message_id) for lease in batch]
        args = [lease.token for lease in batch]
        return [bool(x) for x in await self._release_script(keys=keys, args=args)]

    async def aclose(self) -> None:
        for batcher in (self._claims, self._completions, self._releases):
            await batcher.aclose()


class MemoryClaimStore:
    """Claims inside one process: exact for one replica, blind to the others (no Redis).

    Attempts are counted as in Redis, but they die with the process: without Redis a message that
    kills its replica is redelivered to the next one with a count of zero.
    """

    def __init__(
        self,
        tokens: TokenSource,
        *,
        lease_s: float,
        dedup_ttl_s: int,
        max_done: int,
        max_attempts: int = 0,
    ) -> None:
        self.lease_s = lease_s
        self._tokens = tokens
        self._dedup_ttl_s = dedup_ttl_s
        self._max_done = max_done
        self._max_attempts = max_attempts
        self._claims: dict[str, tuple[str, float]] = {}
        self._done: OrderedDict[str, float] = OrderedDict()
        self._attempts: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def is_done(self, message_id: str) -> bool:
        expires = self._done.get(message_id)
        return expires is not None and expires > time.monotonic()

    def mark_done(self, message_id: str) -> None:
        """Remember a finished ID (oldest forgotten first once ``max_done`` is reached)."""
        now = time.monotonic()
        self._done[message_id] = now + self._dedup_ttl_s
        self._done.move_to_end(message_id)
        self._claims.pop(message_id, None)
        self._attempts.pop(message_id, None)
        while self._done:
            oldest, expires = next(iter(self._done.items()))
            if expires > now and len(self._done) <= self._max_done:
                break
            del self._done[oldest]

    async def claim_many(self, requests: Sequence[ClaimAsk]) -> list[ClaimResult]:
        return [self._claim(ask) for ask in requests]

    async def claim(self, message_id: str, redelivered: bool, suspect_at: int = 0) -> ClaimResult:
        return self._claim(ClaimAsk(message_id, redelivered, suspect_at))

    def _claim(self, ask: ClaimAsk) -> ClaimResult:
        message_id = ask.message_id
        if self.is_done(message_id):
            return ClaimResult(ClaimStatus.DONE)
        now = time.monotonic()
        held = self._claims.get(message_id)
        if held is not None and held[1] > now:
            return ClaimResult(ClaimStatus.BUSY, retry_after_s=held[1] - now)
        started = self._started(message_id, now)
        if 0 < self._max_attempts <= started:
            return ClaimResult(ClaimStatus.EXHAUSTED, attempt=started)
        if 0 < ask.suspect_at <= started:
            return ClaimResult(ClaimStatus.SUSPECT, attempt=started)
        self._count_attempt(message_id, started, now)
        token = self._tokens.next()
        self._claims[message_id] = (token, now + self.lease_s)
        return ClaimResult(ClaimStatus.CLAIMED, token, attempt=started + 1)

    def _started(self, message_id: str, now: float) -> int:
        attempts, expires = self._attempts.get(message_id, (0, 0.0))
        return attempts if expires > now else 0

    def _count_attempt(self, message_id: str, started: int, now: float) -> None:
        _, expires = self._attempts.get(message_id, (0, 0.0))
        if started == 0:
            expires = now + self._dedup_ttl_s
        self._attempts[message_id] = (started + 1, expires)
        self._attempts.move_to_end(message_id)
        while len(self._attempts) > self._max_done:
            self._attempts.popitem(last=False)

    def _owns(self, message_id: str, token: str) -> bool:
        held = self._claims.get(message_id)
        return held is not None and held[0] == token and held[1] > time.monotonic()

    async def complete(self, message_id: str, token: str, cache_hit: bool) -> CompleteStatus:
        if not self._owns(message_id, token):
            return CompleteStatus.LOST
        self.mark_done(message_id)
        return CompleteStatus.IN_MEMORY

    async def complete_many(self, items: Sequence[Completion]) -> list[CompleteStatus]:
        return [await self.complete(i.message_id, i.token, i.cache_hit) for i in items]

    async def release(self, message_id: str, token: str) -> bool:
        if not self._owns(message_id, token):
            return False
        del self._claims[message_id]
        return True

    async def renew(self, leases: Sequence[Lease]) -> list[bool]:
        renewed = []
        for lease in leases:
            owned = self._owns(lease.message_id, lease.token)
            if owned:
                self._claims[lease.message_id] = (lease.token, time.monotonic() + self.lease_s)
            renewed.append(owned)
        return renewed

    async def aclose(self) -> None:
        self._claims.clear()
