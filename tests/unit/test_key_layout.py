"""The key layout's hash tags (what a Redis Cluster needs) and the batch split by slot."""

from __future__ import annotations

import asyncio
import re

import fakeredis
import pytest
from redis.crc import key_slot

from worker.claims.protocol import ClaimAsk, ClaimStatus, Completion, TokenSource
from worker.claims.redis_store import CLAIM, COMPLETE, RELEASE, WRITE_BACK, RedisClaimStore
from worker.classification.cache import classifier_key
from worker.classification.locks import LOOKUP_OR_LOCK, STORE_AND_RELEASE
from worker.observability.stats import read_counters
from worker.redisio.batching import in_groups, slot_of
from worker.redisio.clients import RedisMode, mode_in_url
from worker.redisio.keys import SHARD_TAGS, SHARDS, RedisKeys, shard_of
from worker.redisio.scripts import RENEW, LuaScript

KEYS = RedisKeys("unit:")
SLOTS = 16_384


def test_each_shard_tag_sits_in_the_middle_of_its_share_of_the_slots() -> None:
    """Tag i's slot lies in the middle half of the i-th 1/24 of the slots, so masters holding
    equal slot ranges (2, 3, 4, 6, 8, 12 or 24 of them) get equal numbers of shards."""
    width = SLOTS / SHARDS
    assert len(set(SHARD_TAGS)) == SHARDS
    for index, tag in enumerate(SHARD_TAGS):
        slot = key_slot(tag.encode())
        assert index * width + width / 4 <= slot < (index + 1) * width - width / 4
    for masters in (3, 6):
        share = [0] * masters
        for tag in SHARD_TAGS:
            share[key_slot(tag.encode()) * masters // SLOTS] += 1
        assert share == [SHARDS // masters] * masters


def test_a_messages_keys_and_its_counters_shard_share_one_slot() -> None:
    """The done marker, lease and attempts of an ID, and the counters and throughput shard it is
    counted in, all hash to one slot; IDs spread over every shard."""
    for message_id in ("m-1", "Где мой заказ", "{braces}", "x" * 300):
        message = KEYS.message(message_id)
        shard = shard_of(message_id)
        slots = {
            slot_of(key)
            for key in (
                message.done,
                message.claim,
                message.attempts,
                KEYS.stats(shard),
                KEYS.throughput(shard, 1_000_000),
            )
        }
        assert len(slots) == 1
        assert (message.done, message.claim, message.attempts) == (
            KEYS.done(message_id),
            KEYS.claim(message_id),
            KEYS.attempts(message_id),
        )
    assert {shard_of(f"m-{i}") for i in range(1000)} == set(range(SHARDS))


def test_a_cached_value_and_its_lock_share_a_slot_as_do_the_rate_limiters_keys() -> None:
    """The single flight's lock is in its value's slot; the LLM pacing and cool-down keys are in
    one slot; the heartbeats, the replica set and counters shard 0 are in one slot."""
    who = classifier_key("keywords:v1")
    for text_hash in ("0" * 32, "abc", "f" * 32):
        assert slot_of(KEYS.cache(who, text_hash)) == slot_of(KEYS.lock(who, text_hash))
    assert slot_of(KEYS.llm_rate) == slot_of(KEYS.llm_cooldown)
    assert len({slot_of(KEYS.replica("a")), slot_of(KEYS.replicas), slot_of(KEYS.stats())}) == 1


def test_scan_patterns_still_match_the_tagged_keys() -> None:
    """The ``SCAN MATCH`` patterns (clean-up, live claims, cache entries) match the keys."""

    def matches(pattern: str, key: str) -> bool:
        return re.fullmatch(re.escape(pattern).replace(r"\*", ".*"), key) is not None

    assert matches(KEYS.claim_pattern, KEYS.claim("m-1"))
    assert not matches(KEYS.claim_pattern, KEYS.done("m-1"))
    assert matches(KEYS.cache_pattern, KEYS.cache("c", "h"))
    assert matches(KEYS.throughput_pattern, KEYS.throughput(3, 60))
    assert all(matches(KEYS.everything, key) for key in (KEYS.llm_rate, *KEYS.stats_shards))


@pytest.mark.parametrize(
    "script", [CLAIM, COMPLETE, RELEASE, WRITE_BACK, RENEW, LOOKUP_OR_LOCK, STORE_AND_RELEASE]
)
def test_no_script_builds_a_key(script: LuaScript) -> None:
    """Every key a script touches comes in KEYS: none is joined from parts in Lua, and the
    claim path's scripts take the time from their caller."""
    source = script.source
    code = [line for line in source.splitlines() if not line.lstrip().startswith("--")]
    assert not [line for line in code if ".." in line]
    calls = re.findall(r"redis\.call\('(\w+)',\s*([^,)]+)", source)
    assert calls
    assert all(re.fullmatch(r"KEYS\[[^\]]+\]|\w+_key", key) for _, key in calls)
    assert "'TIME'" not in source  # the caller gives the time: an ACL may refuse TIME


async def test_a_batch_is_cut_by_group_concurrently_and_answered_in_order() -> None:
    """Split: one call per group, all running at once, the answers back in the items' order;
    not split: one call for the whole batch, named after the first item's group."""
    calls: list[tuple[int, list[int]]] = []
    running = 0
    most = 0

    async def run(group: int, part: list[int]) -> list[int]:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.01)
        running -= 1
        calls.append((group, part))
        return [item * 10 for item in part]

    items = [5, 1, 8, 2, 7, 3]
    assert await in_groups(run, items, lambda item: item % 3, split=True) == [i * 10 for i in items]
    assert sorted(calls) == [(0, [3]), (1, [1, 7]), (2, [5, 8, 2])]
    assert most == 3
    calls.clear()
    assert await in_groups(run, items, lambda item: item % 3, split=False) == [
        i * 10 for i in items
    ]
    assert calls == [(2, items)]


async def test_a_failing_group_fails_the_batch_after_every_group_ended() -> None:
    """One group's failure is raised, but only once the other groups' calls have ended."""
    ended: list[int] = []

    async def run(group: int, part: list[int]) -> list[int]:
        if group == 0:
            raise ConnectionError("down")
        await asyncio.sleep(0.02)
        ended.append(group)
        return part

    with pytest.raises(ConnectionError):
        await in_groups(run, [0, 1, 2], lambda item: item, split=True)
    assert sorted(ended) == [1, 2]


async def test_claims_counted_over_many_shards_add_up() -> None:
    """Duplicates and completions of IDs in every shard land in their own shards' counters,
    and the stats read sums them."""
    redis = fakeredis.FakeAsyncRedis()
    store = RedisClaimStore(redis, KEYS, TokenSource("a"), lease_s=30, dedup_ttl_s=60)
    ids = [f"s-{i}" for i in range(200)]
    claims = await store.claim_many([ClaimAsk(i) for i in ids])
    assert all(c.status is ClaimStatus.CLAIMED for c in claims)
    await store.complete_many(
        [Completion(i, c.token, False) for i, c in zip(ids, claims, strict=True)]
    )
    again = await store.claim_many([ClaimAsk(i) for i in ids[:50]])
    assert all(c.status is ClaimStatus.DONE for c in again)
    counters = await read_counters(redis, KEYS)
    assert (counters["processed"], counters["duplicates"]) == (200, 50)
    await redis.aclose()


def test_the_url_may_ask_for_cluster_mode() -> None:
    """``?cluster=true`` forces cluster mode and is taken out of the URL; other parameters stay."""
    url, mode = mode_in_url("redis://h:7000/0?cluster=true&ssl_cert_reqs=none")
    assert (url, mode) == ("redis://h:7000/0?ssl_cert_reqs=none", RedisMode.CLUSTER)
    assert mode_in_url("redis://h:7000/0?cluster=no")[1] is RedisMode.STANDALONE
    assert mode_in_url("redis://h:7000/0") == ("redis://h:7000/0", None)
