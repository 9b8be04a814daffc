"""The processing layer without servers: triage, passes, batches of one, and settlement under faults."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from tests.unit.pipeline_rig import Rig, rig
from worker.amqp.broker import ATTEMPT_HEADER
from worker.amqp.topology import Attempts
from worker.claims.protocol import ClaimAsk, ClaimResult, ClaimStatus, Completion
from worker.processing.hooks import Hooks
from worker.processing.triage import Triage, Verdict, triage


def judge(
    claim: ClaimResult, *, header: int = 1, returned: int = 0, seen: bool = False, limit: int = 5
) -> Triage:
    attempts = Attempts(header, returned)
    return triage(claim, attempts=attempts, seen_before=seen, max_attempts=limit)


def test_triage_names_every_outcome_of_a_claim() -> None:
    """Each claim status maps to its verdict, and a done ID seen before is not a duplicate."""
    assert judge(ClaimResult(ClaimStatus.DONE)) == Triage(Verdict.DUPLICATE)
    assert judge(ClaimResult(ClaimStatus.DONE), seen=True) == Triage(Verdict.DONE_AGAIN)
    assert judge(ClaimResult(ClaimStatus.BUSY, retry_after_s=1.0)) == Triage(Verdict.BUSY)
    assert judge(ClaimResult(ClaimStatus.SUSPECT, attempt=3)) == Triage(Verdict.SUSPECT, 3)
    assert judge(ClaimResult(ClaimStatus.EXHAUSTED, attempt=5)) == Triage(Verdict.EXHAUSTED, 5)
    assert judge(ClaimResult(ClaimStatus.CLAIMED, "t", attempt=2)) == Triage(Verdict.WORK, 2)


def test_triage_takes_the_larger_attempt_of_store_and_header() -> None:
    """The attempt is the larger of the store's count and the header's (which survives an
    outage), and past ``MAX_ATTEMPTS`` by either the claim is over the limit."""
    claimed = ClaimResult(ClaimStatus.CLAIMED, "t", attempt=1)
    assert judge(claimed, header=3) == Triage(Verdict.WORK, 3)
    assert judge(ClaimResult(ClaimStatus.CLAIMED, "t", attempt=4), header=2) == Triage(
        Verdict.WORK, 4
    )
    assert judge(claimed, header=6, limit=5) == Triage(Verdict.OVER_LIMIT, 5)


def test_triage_counts_each_return_of_a_quorum_delivery_as_an_attempt() -> None:
    """A quorum queue's delivery count adds to the header's attempt (a memory store forgets its
    own count with the replica), so a message that keeps coming back is over the limit."""
    claimed = ClaimResult(ClaimStatus.CLAIMED, "t", attempt=1)
    assert judge(claimed, header=2, returned=2) == Triage(Verdict.WORK, 4)
    assert judge(claimed, returned=5, limit=5) == Triage(Verdict.OVER_LIMIT, 5)
    assert judge(ClaimResult(ClaimStatus.CLAIMED, "t", attempt=3), returned=1) == Triage(
        Verdict.WORK, 3
    )


def message(message_id: str, text: str = "Где мой заказ?") -> dict[str, str]:
    return {"message_id": message_id, "text": text}


def assert_each_settled_once(r: Rig) -> None:
    twice = {tag: seen for tag, seen in r.channel.settlements.items() if len(seen) > 1}
    assert not twice, f"settled more than once: {twice}"
    assert all(r.channel.settlements.get(tag) for tag in r.channel.delivered)


async def test_a_pass_publishes_once_per_id_and_counts_the_copies() -> None:
    """Unique messages get one result each; a copy in the same pass and a later copy are acked
    as duplicates; a redelivery of a done ID counts as ``redelivered_done``."""
    async with rig() as r:
        for i in range(5):
            r.deliver(message(f"m-{i}"))
        r.deliver(message("m-0"))
        await r.channel.wait_settled(6)
        r.deliver(message("m-1"))
        r.deliver(message("m-2"), redelivered=True)
        await r.channel.wait_settled(8)
        assert sorted(r.outbox.result_ids()) == [f"m-{i}" for i in range(5)]
        assert r.counted("processed") == 5
        assert r.counted("duplicates") == 2
        assert r.counted("redelivered_done") == 1
        assert all(r.channel.outcome(tag) == "ack" for tag in r.channel.delivered)
        assert_each_settled_once(r)


async def test_an_invalid_body_is_dead_lettered_with_its_reason() -> None:
    """A body that is not a message is dead-lettered (reason given) and acked, never retried."""
    async with rig() as r:
        bad = r.deliver(b"not json")
        no_text = r.deliver({"message_id": "x"})
        await r.channel.wait_settled(2)
        reasons = {tag: reason for tag, reason, _, _ in r.outbox.dead_letters}
        assert set(reasons) == {bad, no_text}
        assert all(reasons.values())
        assert r.outbox.retries == []
        assert r.channel.outcome(bad) == "ack"
        assert_each_settled_once(r)


async def test_attempts_past_the_limit_are_dead_lettered_not_worked_on() -> None:
    """A delivery whose header says it is past ``MAX_ATTEMPTS`` is released and dead-lettered
    as ``retries_exhausted`` without a result; its claim is free afterwards."""
    async with rig(max_attempts=3) as r:
        tag = r.deliver(message("late"), headers={ATTEMPT_HEADER: 4})
        await r.channel.wait_settled(1)
        assert [(t, reason) for t, reason, _, _ in r.outbox.dead_letters] == [
            (tag, "retries_exhausted")
        ]
        assert r.outbox.results == []
        [again] = await r.store.claim_many([ClaimAsk("late")])
        assert again.status is ClaimStatus.CLAIMED


async def test_a_busy_claim_is_worked_on_as_a_batch_of_one_once_released() -> None:
    """A delivery whose ID another replica holds waits; released, it is claimed and processed
    by the same pipeline as a pass: one result with the same classification, counted once."""
    async with rig() as r:
        r.deliver(message("first"))
        await r.channel.wait_settled(1)
        [held] = await r.store.claim_many([ClaimAsk("busy")])
        tag = r.deliver(message("busy"))
        await asyncio.sleep(0.05)
        assert not r.channel.settlements.get(tag), "a busy ID must be held, not settled"
        await r.store.release("busy", held.token)
        await r.channel.wait_settled(2)
        (first_id, first, _), (busy_id, busy, cached) = r.outbox.results
        assert (first_id, busy_id) == ("first", "busy")
        assert busy == first  # same text, same classification...
        assert cached  # ...served from the cache the pass filled
        assert r.counted("processed") == 2
        assert r.counted("cache_hits") == 1
        assert_each_settled_once(r)


async def test_a_busy_claim_completed_by_its_owner_is_a_duplicate() -> None:
    """If the owner finishes the ID while a copy waits, the copy is acked as a duplicate."""
    async with rig() as r:
        [held] = await r.store.claim_many([ClaimAsk("owned")])
        tag = r.deliver(message("owned"))
        await asyncio.sleep(0.05)
        await r.store.complete_many([Completion("owned", held.token, False)])
        await r.channel.wait_settled(1)
        assert r.outbox.results == []
        assert r.counted("duplicates") == 1
        assert r.channel.outcome(tag) == "ack"


class InWork(Hooks):
    """Records which IDs are in work when each one's work starts."""

    def __init__(self) -> None:
        self.in_work: set[str] = set()
        self.alongside: dict[str, set[str]] = {}

    def before_process(self, message_id: str) -> None:
        self.alongside[message_id] = set(self.in_work)
        self.in_work.add(message_id)

    def after_complete(self, message_id: str) -> None:
        self.in_work.discard(message_id)


async def test_a_suspect_is_worked_on_alone() -> None:
    """An ID two of whose attempts vanished is claimed again only when nothing else is in work,
    and then processed once, on its own."""
    hooks = InWork()
    async with rig(hooks=hooks, lease_s=0.05, classify_delay_s=0.05) as r:
        for _ in range(2):  # two attempts started, their replicas gone: the leases lapse
            await r.store.claim_many([ClaimAsk("suspect")])
            await asyncio.sleep(0.06)
        r.deliver(message("suspect"))
        for i in range(3):
            r.deliver(message(f"other-{i}", text=f"hello {i}"))
        await r.channel.wait_settled(4)
        assert sorted(r.outbox.result_ids()) == ["other-0", "other-1", "other-2", "suspect"]
        assert hooks.alongside["suspect"] == set()
        assert_each_settled_once(r)


class FailAt(Hooks):
    """Raises at one hook for the message IDs it names."""

    def __init__(self, point: str, ids: set[str]) -> None:
        self.point, self.ids = point, ids

    def _maybe_fail(self, point: str, message_id: str) -> None:
        if point == self.point and message_id in self.ids:
            raise RuntimeError(f"injected at {point}")

    def before_process(self, message_id: str) -> None:
        self._maybe_fail("before_process", message_id)

    def before_classify(self, message_id: str) -> None:
        self._maybe_fail("before_classify", message_id)

    def after_publish(self, message_id: str) -> None:
        self._maybe_fail("after_publish", message_id)

    def after_complete(self, message_id: str) -> None:
        self._maybe_fail("after_complete", message_id)


@pytest.mark.parametrize(
    "point", ["before_process", "before_classify", "after_publish", "after_complete"]
)
async def test_every_delivery_is_settled_exactly_once_when_a_fault_point_fails(point: str) -> None:
    """A failure injected at any fault point leaves no delivery unsettled or settled twice,
    and the IDs it did not hit are published."""
    async with rig(hooks=FailAt(point, {"m-3"})) as r:
        with capture_logs() as logs:
            for i in range(6):
                r.deliver(message(f"m-{i}", text=f"text {i}"))
            await r.channel.wait_settled(6)
        assert_each_settled_once(r)
        assert not [e for e in logs if e["event"] == "delivery_settled_twice"]
        published = set(r.outbox.result_ids())
        if point == "before_process":  # the whole batch fails before its work: requeued
            assert published == set()
            assert {r.channel.outcome(t) for t in r.channel.delivered} == {"requeue"}
        elif point == "before_classify":  # the message's own attempt fails: retried
            assert published == {f"m-{i}" for i in range(6)} - {"m-3"}
            assert [attempt for _, attempt, _ in r.outbox.retries] == [1]
        else:  # its result is out; the batch's settlement is a requeue or an ack
            assert published == {f"m-{i}" for i in range(6)}
