"""The broker-facing decisions that need no broker: queue arguments per QUEUE_TYPE, reading the
broker's refusals, the consumer timeout, the unrouted warning's pace and a broker dead letter."""

from __future__ import annotations

from datetime import datetime

import aio_pika
import pytest
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import ChannelPreconditionFailed
from pamqp.commands import Basic
from pamqp.header import ContentHeader
from structlog.testing import capture_logs

from worker.amqp.declaring import Differs, differs
from worker.amqp.timeouts import ConsumerTimeouts, consumer_timeout_ms
from worker.amqp.topology import Topology
from worker.amqp.unrouted import UnroutedWatch
from worker.cli.letters import letter_of
from worker.core.errors import ConfigError
from worker.core.settings import load_settings
from worker.observability.counters import Counters
from worker.observability.metrics import CounterName


def refused(text: str) -> ChannelPreconditionFailed:
    """As aiormq raises it for the broker's channel.close (its reply text the only argument)."""
    return ChannelPreconditionFailed(text)


def test_queue_type_sets_the_type_and_at_least_once_dead_lettering_of_quorum_queues() -> None:
    """Classic queues get their type and a dead-letter route; quorum ones also dead-letter at
    least once (which needs reject-publish); the results exchange's alternate follows the name."""
    classic = Topology.of(load_settings())
    assert classic.input_arguments() == {
        "x-queue-type": "classic",
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "neiromatrius.messages.dead",
    }
    quorum = Topology.of(load_settings(queue_type="QUORUM"))
    retry = quorum.retry_arguments(1)
    assert retry["x-queue-type"] == "quorum"
    assert retry["x-dead-letter-routing-key"] == "neiromatrius.messages"
    assert (retry["x-dead-letter-strategy"], retry["x-overflow"]) == (
        "at-least-once",
        "reject-publish",
    )
    assert quorum.plain_arguments() == {"x-queue-type": "quorum"}
    assert quorum.results_arguments() == {"alternate-exchange": "neiromatrius.classified.unrouted"}
    assert Topology.of(load_settings(results_unrouted="discard")).results_arguments() == {}
    with pytest.raises(ConfigError, match="QUEUE_TYPE"):
        load_settings(queue_type="stream")


def test_the_brokers_words_on_an_inequivalent_argument_are_read() -> None:
    """Each form RabbitMQ 3.10 words a refused declaration in gives the argument and its value."""
    prefix = "PRECONDITION_FAILED - inequivalent arg"
    where = "for queue 'q' in vhost '/'"
    assert differs(
        refused(f"{prefix} 'x-queue-type' {where}: received 'p' but current is 'quorum'")
    ) == (Differs("x-queue-type", "quorum"))
    typed = f"{prefix} 'x-delivery-limit' {where}: received none but current is the value '2' of type 'byte'"
    assert differs(refused(typed)) == Differs("x-delivery-limit", 2)
    missing = f"{prefix} 'x-queue-type' {where}: received the value 'p' of type 'longstr' but current is none"
    assert differs(refused(missing)) == Differs("x-queue-type", None)
    assert differs(refused("PRECONDITION_FAILED - something else")) is None


def test_start_up_counts_the_wait_in_the_inbox_against_the_consumer_timeout() -> None:
    """3 × WORK_TIMEOUT_S + CLAIM_LEASE_S must stay below RABBITMQ_CONSUMER_TIMEOUT_S: 580 s of
    work passes under the default 30 min, 600 s (once accepted, when the inbox was not counted)
    does not."""
    assert load_settings(work_timeout_s=580).longest_unacked_s == 1_770
    with pytest.raises(ConfigError, match="WORK_TIMEOUT_S is too long"):
        load_settings(work_timeout_s=600)
    assert (
        load_settings(work_timeout_s=600, rabbitmq_consumer_timeout_s=2_000).work_timeout_s == 600
    )


def test_a_consumer_timeout_closure_is_one_warning_and_one_count() -> None:
    """The broker's consumer-timeout closure is told from other closures, warned about once with
    the timeout the broker used, and counted; another closure is neither."""
    text = (
        "PRECONDITION_FAILED - delivery acknowledgement on channel 2 timed out. Timeout value "
        "used: 3000 ms. This timeout value can be configured, see consumers doc guide to learn more"
    )
    assert consumer_timeout_ms(refused(text)) == 3000
    assert consumer_timeout_ms(refused("PRECONDITION_FAILED - unknown delivery tag 7")) is None
    counters = Counters(cluster=False)
    on_close = ConsumerTimeouts(counters, configured_s=1_800)
    with capture_logs() as logs:
        on_close(None, refused(text))
        on_close(None, ConnectionError("gone"))
        on_close(None, None)
    assert [log["event"] for log in logs] == ["broker_consumer_timeout"]
    assert logs[0]["broker_timeout_s"] == 3.0
    assert counters.local[CounterName.CONSUMER_TIMEOUTS] == 1


def test_unrouted_results_are_warned_about_when_they_grow_at_most_once_a_minute() -> None:
    """A growing unrouted queue is warned about at once, then not again within the minute, then
    again once it grew after the minute; a queue that stays the same is not warned about."""
    watch = UnroutedWatch(connection=None, queue="x.unrouted")  # type: ignore[arg-type]
    with capture_logs() as logs:
        assert watch.check(0, now=0.0) is False
        assert watch.check(5, now=1.0) is True
        assert watch.check(9, now=30.0) is False
        assert watch.check(9, now=90.0) is False
        assert watch.check(12, now=100.0) is True
    assert [log["messages"] for log in logs] == [5, 12]


def test_a_message_the_broker_dead_lettered_shows_its_x_death_reason() -> None:
    """Without the worker's reason header, dead-letters reads RabbitMQ's latest x-death."""
    death = {
        "reason": "delivery_limit",
        "queue": "in",
        "count": 1,
        "time": datetime(2026, 1, 1),
        "exchange": "",
        "routing-keys": ["in"],
    }
    properties = Basic.Properties(headers={"x-death": [death]}, message_id="m-1")
    letter = letter_of(_incoming(b'{"message_id": "m-1", "text": "t"}', properties))
    assert (letter.message_id, letter.reason) == ("m-1", "broker:delivery_limit")
    assert letter.detail == "dead-lettered by RabbitMQ from in (1 time)"


def _incoming(body: bytes, properties: Basic.Properties) -> aio_pika.IncomingMessage:
    header = ContentHeader(body_size=len(body), properties=properties)
    raw = DeliveredMessage(
        delivery=Basic.GetOk(delivery_tag=1, exchange="", routing_key="dead"),
        header=header,
        body=body,
        channel=None,  # type: ignore[arg-type]
    )
    return aio_pika.IncomingMessage(raw, no_ack=True)
