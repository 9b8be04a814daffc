"""The LLM circuit breaker: its state machine in Redis (fakeredis) and in memory, the probe taken
by one replica at a time, how HTTP failures are blamed, the call window, the attempt refund."""

from __future__ import annotations

import asyncio

import fakeredis
import httpx
import pytest

from tests.unit.pipeline_rig import rig
from worker.claims.memory_store import MemoryClaimStore
from worker.claims.protocol import ClaimAsk, ClaimStatus, TokenSource
from worker.claims.redis_store import RedisClaimStore
from worker.classification.breaker import (
    CONFIGURATION,
    PROVIDER,
    BreakerConfig,
    CircuitBreaker,
    Failure,
    MemoryBreakerState,
)
from worker.classification.classifiers.llm_http import (
    AttemptFailed,
    Blame,
    breaker_failure,
    check_status,
)
from worker.classification.window import CallWindow
from worker.core.classification import Classification
from worker.core.errors import ClassifierPaused, ClassifierUnavailable, PermanentError
from worker.observability.breakers import breaker_lines, read_breakers
from worker.observability.counters import Counters
from worker.observability.metrics import CounterName
from worker.processing.triage import AfterFailure, after_failure
from worker.redisio.keys import RedisKeys
from worker.redisio.link import RedisLink

KEYS = RedisKeys("unit:")
DOWN = Failure(PROVIDER, "the LLM server answered HTTP 503")
KEY_REFUSED = Failure(CONFIGURATION, "the LLM server refused the key (HTTP 401): check LLM_API_KEY")
CONFIG = BreakerConfig(failures=3, probe_min_s=0.2, probe_max_s=0.5, config_probe_s=0.3)


def breakers(
    links: list[RedisLink], counters: list[Counters] | None = None
) -> list[CircuitBreaker]:
    """One breaker per replica link, all on the same key; each counts into ``counters[i]``."""
    counters = counters if counters is not None else [Counters(cluster=True) for _ in links]
    key = KEYS.breaker("llm:v1:m:abc")
    return [
        CircuitBreaker(CONFIG, key=key, link=link, counters=counted)
        for link, counted in zip(links, counters, strict=True)
    ]


async def test_consecutive_provider_failures_open_it_and_an_answer_resets_the_count(
    links: list[RedisLink],
) -> None:
    """Two failures, an answer, two more leave it closed; the third in a row opens it, once."""
    first, second, _ = breakers(links)
    assert not await first.failed(DOWN)
    assert not await second.failed(DOWN)
    await first.succeeded()
    assert not await second.failed(DOWN)
    assert not await first.failed(DOWN)
    assert await second.failed(DOWN)
    assert await first.failed(DOWN)  # a late failure of a call in flight: still open, not again
    assert first.is_open()
    assert second.is_open()
    assert first.view.opens == 1
    assert (
        second.problem() == "LLM circuit breaker open (provider): the LLM server answered HTTP 503"
    )


async def test_every_replica_sees_it_open_after_a_refresh(links: list[RedisLink]) -> None:
    """A replica that had no failure of its own learns of the open breaker when it reads it."""
    first, _, third = breakers(links)
    for _ in range(3):
        await first.failed(DOWN)
    assert not third.is_open()
    assert (await third.refresh()).open
    assert third.problem() is not None


async def test_a_configuration_error_opens_it_at_once_and_probes_at_the_ceiling_rate(
    links: list[RedisLink],
) -> None:
    """One 401 opens it, with the setting to fix in the reason; its next probe is the
    configuration interval away."""
    (breaker,) = breakers(links[:1])
    assert await breaker.failed(KEY_REFUSED)
    assert breaker.view.kind == CONFIGURATION
    assert "LLM_API_KEY" in (breaker.problem() or "")
    assert 0.2 < breaker.view.next_probe_in_s <= 0.3


async def test_one_replica_at_a_time_takes_the_probe(links: list[RedisLink]) -> None:
    """When a probe is due, of three replicas asking at once exactly one sends it; a failed probe
    doubles the delay up to the ceiling; a successful one closes the breaker for everyone."""
    counters = [Counters(cluster=True) for _ in links]
    replicas = breakers(links, counters)
    sent: list[int] = []
    outcome: list[Failure | None] = [DOWN]

    def prober(index: int):  # type: ignore[no-untyped-def]
        async def probe() -> Failure | None:
            sent.append(index)
            await asyncio.sleep(0.05)  # still probing when the others ask
            return outcome[0]

        return probe

    for index, breaker in enumerate(replicas):
        breaker.probe_with(prober(index), lambda: True)
    for _ in range(3):
        await replicas[0].failed(DOWN)
    for breaker in replicas:
        await breaker.refresh()
    assert not any([await b.probe_now() for b in replicas])  # not due yet
    await asyncio.sleep(0.25)
    taken = await asyncio.gather(*(b.probe_now() for b in replicas))
    assert sorted(taken) == [False, False, True]
    assert len(sent) == 1
    delays = []
    for _ in range(3):
        view = await replicas[0].refresh()
        delays.append(view.next_probe_in_s)
        await asyncio.sleep(view.next_probe_in_s + 0.02)
        assert await replicas[0].probe_now()
    assert delays[0] == pytest.approx(0.4, abs=0.05)  # 0.2 doubled
    assert delays[1] == pytest.approx(0.5, abs=0.05)  # the ceiling
    outcome[0] = None
    await asyncio.sleep((await replicas[0].refresh()).next_probe_in_s + 0.02)
    assert await replicas[1].probe_now()
    assert not any([(await b.refresh()).open for b in replicas])
    assert sum(c.local[CounterName.BREAKER_PROBES] for c in counters) == 5


def test_memory_state_machine_is_the_scripts() -> None:
    """Without Redis the same steps give the same answers (on a clock of our own)."""
    state = MemoryBreakerState()
    args = [PROVIDER, "down", "2", "1000", "30000"]
    assert state.step("failure", args, now=0)[0] == 0
    opened = state.step("failure", args, now=10)
    assert opened[0] == 1
    assert opened[5] == 1000
    assert opened[6] == 1
    assert state.step("probe", ["5000"], now=500)[6] == 0  # not due
    assert state.step("probe", ["5000"], now=1010)[6] == 1
    assert state.step("probe", ["5000"], now=1020)[6] == 0  # taken
    assert state.step("probe_failed", [PROVIDER, "down", "3000", "30000"], now=1100)[5] == 2000
    assert state.step("probe_failed", [PROVIDER, "down", "3000", "30000"], now=1200)[5] == 3000
    config = state.step("probe_failed", [CONFIGURATION, "key", "3000", "30000"], now=1300)
    assert config[1] == CONFIGURATION
    assert config[5] == 30000
    assert state.step("success", [], now=1400)[:2] == [0, ""]


async def test_in_memory_mode_has_a_breaker_of_its_own() -> None:
    """Without a link the breaker opens and closes inside the process."""
    breaker = CircuitBreaker(CONFIG, key=KEYS.breaker("x"))
    for _ in range(3):
        await breaker.failed(DOWN)
    assert breaker.is_open()
    await breaker.succeeded()
    assert not breaker.is_open()
    assert breaker.state()["state"] == "closed"


def _response(status: int, body: bytes = b"{}") -> httpx.Response:
    return httpx.Response(status, content=body, request=httpx.Request("POST", "http://llm/"))


@pytest.mark.parametrize(
    ("status", "body", "blame", "setting"),
    [
        (503, b"{}", Blame.PROVIDER, ""),
        (401, b"{}", Blame.CONFIGURATION, "LLM_API_KEY"),
        (403, b"{}", Blame.CONFIGURATION, "LLM_API_KEY"),
        (404, b"{}", Blame.CONFIGURATION, "LLM_MODEL"),
        (
            400,
            b'{"error": "response_format json_schema unsupported"}',
            Blame.CONFIGURATION,
            "LLM_RESPONSE_FORMAT",
        ),
        (400, b'{"error": "context too long"}', Blame.MESSAGE, ""),
        (422, b"{}", Blame.MESSAGE, ""),
    ],
)
def test_http_failures_are_blamed_on_the_provider_the_configuration_or_the_message(
    status: int, body: bytes, blame: Blame, setting: str
) -> None:
    """Each refusal is blamed where it belongs, and a configuration error names the setting."""
    with pytest.raises(AttemptFailed) as raised:
        check_status(_response(status, body))
    assert raised.value.blame is blame
    assert setting in raised.value.detail


def test_only_the_providers_and_the_configurations_failures_reach_the_breaker() -> None:
    """A message's own failure and an honourable 429 are not the breaker's business."""
    assert breaker_failure(AttemptFailed("unknown_label", "x", blame=Blame.MESSAGE), 60) is None
    assert breaker_failure(AttemptFailed("rate_limited", "429", retry_after_s=2), 60) is None
    assert breaker_failure(AttemptFailed("rate_limited", "429", retry_after_s=600), 60) == Failure(
        PROVIDER, "429"
    )
    assert breaker_failure(AttemptFailed("timeout", "slow"), 60) == Failure(PROVIDER, "slow")


async def test_the_call_window_starts_small_grows_per_answer_and_falls_to_one() -> None:
    """Four calls at first, one more per answer up to the ceiling, one after a failure."""
    window = CallWindow(ceiling=6)
    entered = 0

    async def call() -> None:
        nonlocal entered
        async with window.slot():
            entered += 1
            await asyncio.sleep(0.05)

    tasks = [asyncio.create_task(call()) for _ in range(10)]
    await asyncio.sleep(0.01)
    assert entered == 4
    window.succeeded()
    window.succeeded()
    window.succeeded()
    await asyncio.sleep(0.01)
    assert entered == 6  # the ceiling
    window.failed()
    await asyncio.gather(*tasks)
    assert window.limit == 1
    assert window.in_flight == 0


def test_a_paused_classification_is_held_and_spends_nothing() -> None:
    """The one decision on failures: paused holds, permanent or last attempt dead-letters."""
    paused = ClassifierPaused("open")
    assert after_failure(paused, attempt=5, max_attempts=5) is AfterFailure.HOLD
    assert (
        after_failure(ClassifierUnavailable("x"), attempt=5, max_attempts=5)
        is AfterFailure.DEAD_LETTER
    )
    assert after_failure(PermanentError("x"), attempt=1, max_attempts=5) is AfterFailure.DEAD_LETTER
    assert (
        after_failure(ClassifierUnavailable("x"), attempt=1, max_attempts=5) is AfterFailure.RETRY
    )


async def test_a_refunded_release_gives_the_attempt_back_in_memory() -> None:
    """Released with its attempt refunded, the next claim is attempt 1 again, not 2."""
    store = MemoryClaimStore(TokenSource("r"), lease_s=30, dedup_ttl_s=60, max_done=100)
    first = (await store.claim_many([ClaimAsk("m")]))[0]
    assert await store.release("m", first.token, refund_attempt=True)
    again = (await store.claim_many([ClaimAsk("m")]))[0]
    assert (again.status, again.attempt) == (ClaimStatus.CLAIMED, 1)


async def test_a_refunded_release_gives_the_attempt_back_in_redis() -> None:
    """The refund script deletes our lease and takes back the attempt; not someone else's."""
    redis = fakeredis.FakeAsyncRedis()
    store = RedisClaimStore(redis, KEYS, TokenSource("r"), lease_s=30, dedup_ttl_s=60)
    first = (await store.claim_many([ClaimAsk("m")]))[0]
    assert await store.release("m", first.token)
    second = (await store.claim_many([ClaimAsk("m")]))[0]
    assert second.attempt == 2
    assert not await store.release("m", "not-ours", refund_attempt=True)
    assert await store.release("m", second.token, refund_attempt=True)
    third = (await store.claim_many([ClaimAsk("m")]))[0]
    assert third.attempt == 2  # the refunded attempt was not counted
    await redis.aclose()


class PausingClassifier:
    """Refuses every text (``ClassifierPaused``) while ``open``, as the LLM one does behind an
    open breaker; answers ``other`` otherwise."""

    name = "pausing"
    identity = "pausing:v1"

    def __init__(self) -> None:
        self.open = True

    async def classify(self, text: str) -> Classification:
        if self.open:
            raise ClassifierPaused("LLM circuit breaker open (provider): down")
        return Classification("other", 1.0, self.name)

    async def aclose(self) -> None:
        return None


async def test_a_refused_miss_is_held_without_an_attempt_then_requeued_when_it_closes() -> None:
    """While the classifier is paused a delivery is neither acked, retried nor dead-lettered and
    its attempt is given back; once it is no longer paused the delivery is requeued."""
    classifier = PausingClassifier()
    async with rig(classifier=classifier, paused=lambda: classifier.open) as r:
        tag = r.deliver({"message_id": "m-1", "text": "где мой заказ"})
        deadline = asyncio.get_running_loop().time() + 3
        while not r.counted(CounterName.BREAKER_HELD):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        probe = (await r.store.claim_many([ClaimAsk("m-1")]))[0]
        assert probe.attempt == 1  # the held one's attempt was given back
        await r.store.release("m-1", probe.token, refund_attempt=True)
        assert not r.channel.settlements.get(tag)
        classifier.open = False
        await r.channel.wait_settled(1)
        assert r.channel.outcome(tag) == "requeue"
        assert (r.outbox.retries, r.outbox.dead_letters, r.outbox.sent_to_back) == ([], [], [])
        assert r.counted(CounterName.FAILED) == 0


async def test_a_miss_held_past_the_hold_goes_to_the_back_of_the_queue() -> None:
    """Still paused after the hold, the delivery's copy goes to the back and the delivery is
    acked, so the prefetch window never fills up with held misses."""
    classifier = PausingClassifier()
    async with rig(classifier=classifier, paused=lambda: classifier.open, hold_s=0.1) as r:
        tag = r.deliver({"message_id": "m-2", "text": "где мой заказ"})
        await r.channel.wait_settled(1)
        assert r.channel.outcome(tag) == "ack"
        assert r.outbox.sent_to_back == [tag]
        assert (r.outbox.retries, r.outbox.dead_letters) == ([], [])


async def test_the_stats_show_every_breaker_of_the_deployment(links: list[RedisLink]) -> None:
    """The stats JSON lists the shared breaker with its reason, and the ``stats`` table gives it
    one line naming the setting to fix."""
    (breaker,) = breakers(links[:1])
    await breaker.failed(KEY_REFUSED)
    found = await read_breakers(links[0].client, KEYS)
    assert [(b["classifier"], b["state"], b["kind"]) for b in found] == [
        ("llm:v1:m:abc", "open", CONFIGURATION)
    ]
    assert found[0]["opens"] == 1
    (line,) = [line for line in breaker_lines(found) if line.strip()]
    assert "OPEN (configuration)" in line
    assert "check LLM_API_KEY" in line
