"""Malformed messages go to the dead-letter queue with their reason; nothing else is lost."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from tests.conftest import RABBITMQ_URL, Names
from tests.integration.raw_amqp import publish_without_id
from tests.integration.support import (
    Replicas,
    ResultSink,
    drain_queue,
    publish_raw,
)
from worker.amqp.broker import DETAIL_HEADER, REASON_HEADER

pytestmark = pytest.mark.integration

NO_ID = b'{"text": "no id in the body, no message_id property either"}'
MALFORMED: list[tuple[bytes, str | None, str]] = [
    (b"this is not json", None, "not_json"),
    (b'{"message_id": "trunc-1", "text": "half', None, "not_json"),
    (b"\xff\xfe\x00garbage", None, "not_json"),
    (b'["a", "list"]', None, "not_object"),
    (b"42", None, "not_object"),
    (b'{"message_id": "no-text"}', None, "no_text"),
    (b'{"message_id": "num-text", "text": 12}', None, "bad_text"),
    (b'{"message_id": "blank", "text": "   "}', None, "empty_text"),
    (b'{"message_id": 17, "text": "id is a number"}', None, "bad_message_id"),
    (orjson.dumps({"message_id": "big", "text": "x" * 5000}), None, "too_large"),
]


async def test_malformed_messages_are_dead_lettered_with_reasons(
    names: Names, amqp: object, tmp_path: Path
) -> None:
    """Each malformed kind lands in the dead-letter queue with its reason header, the replica keeps
    running, and the valid messages around them (one identified only by its AMQP message_id
    property) are all processed."""
    valid = [
        (orjson.dumps({"message_id": f"ok-{i}", "text": f"Привет {i}"}), None) for i in range(20)
    ]
    by_property = (orjson.dumps({"text": "ID only in the AMQP property"}), "prop-1")
    traffic = valid[:10] + [(b, m) for b, m, _ in MALFORMED] + [by_property] + valid[10:]
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            replica = replicas.start(names.env(redis=False, MAX_MESSAGE_BYTES="4096"))
            await replica.started()
            await publish_raw(names, traffic)
            # aio-pika invents a message_id when none is given; a bare publisher sends none.
            await publish_without_id(RABBITMQ_URL, names.input_queue, [NO_ID])
            expected = {f"ok-{i}" for i in range(20)} | {"prop-1"}
            await sink.wait_for_ids(expected, timeout_s=30)
            dead = await drain_queue(
                names, names.dead_letter_queue, timeout_s=10, expected=len(MALFORMED) + 1
            )

            cases = [*MALFORMED, (NO_ID, None, "no_message_id")]
            assert sorted(m.body for m in dead) == sorted(b for b, _, _ in cases)
            reasons = {m.body: (m.headers or {}).get(REASON_HEADER) for m in dead}
            for raw, _, reason in cases:
                assert reasons[raw] == reason, raw
            assert all((m.headers or {}).get(DETAIL_HEADER) for m in dead)
            assert sink.by_id["prop-1"][0]["message_id"] == "prop-1"
            assert replica.process is not None
            assert replica.process.poll() is None
    finally:
        replicas.close()
