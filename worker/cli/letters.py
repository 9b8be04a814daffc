"""One dead letter as ``dead-letters`` reads it: its ID, reason, detail, attempts and time.

The reason is the worker's ``x-death-reason`` header; a message the broker dead-lettered itself (a
quorum queue's delivery limit, a policy's max-length, an expired message, a reject) has none, and
its reason is then RabbitMQ's latest ``x-death`` entry: ``broker:delivery_limit``,
``broker:maxlen``, ``broker:expired`` or ``broker:rejected``, with the queue it left in the detail.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from aio_pika.abc import AbstractIncomingMessage as Incoming

from worker.amqp.topology import ATTEMPT_HEADER, DETAIL_HEADER, REASON_HEADER

SHOWN_TEXT_CHARS = 500


@dataclass(frozen=True, slots=True)
class Letter:
    """One dead letter as the command shows it (``text`` only when asked for)."""

    message_id: str | None  # the ID the worker deduplicates on: the body's, else the property's
    reason: str
    detail: str
    attempts: int | None
    time: str | None  # the timestamp property, else RabbitMQ's latest x-death time (ISO 8601)
    text: str | None = None


def letter_of(message: Incoming, *, with_text: bool = False) -> Letter:
    headers = message.headers or {}
    attempts = headers.get(ATTEMPT_HEADER)
    reason = str(headers.get(REASON_HEADER) or "")
    detail = str(headers.get(DETAIL_HEADER) or "")
    if not reason and (death := _latest_death(message)):
        reason = f"broker:{death.get('reason') or 'unknown'}"
        detail = detail or f"dead-lettered by RabbitMQ from {death.get('queue') or '?'}"
        count = death.get("count")
        detail += f" ({count} time{'' if count == 1 else 's'})" if isinstance(count, int) else ""
    return Letter(
        message_id=worker_id(message),
        reason=reason or "unknown",
        detail=detail,
        attempts=attempts if isinstance(attempts, int) and not isinstance(attempts, bool) else None,
        time=time_of(message),
        text=_text_of(message.body) if with_text else None,
    )


def _body_object(body: bytes) -> dict[str, Any]:
    with contextlib.suppress(orjson.JSONDecodeError):
        data = orjson.loads(body)
        if isinstance(data, dict):
            return data
    return {}


def worker_id(message: Incoming) -> str | None:
    """The ID the worker claims the message under: the body's ``message_id``, else the property's."""
    found = _body_object(message.body).get("message_id")
    return found if isinstance(found, str) else message.message_id or None


def _text_of(body: bytes) -> str:
    text = _body_object(body).get("text")
    return (text if isinstance(text, str) else body.decode(errors="replace"))[:SHOWN_TEXT_CHARS]


def _deaths(message: Incoming) -> list[dict[str, Any]]:
    """RabbitMQ's ``x-death`` entries, the latest first."""
    deaths = (message.headers or {}).get("x-death")
    return [e for e in (deaths if isinstance(deaths, list) else []) if isinstance(e, dict)]


def _latest_death(message: Incoming) -> dict[str, Any] | None:
    entries = _deaths(message)
    return entries[0] if entries else None


def time_of(message: Incoming) -> str | None:
    entries = _deaths(message)
    times = [t for e in entries if isinstance(t := e.get("time"), datetime)]
    stamp = message.timestamp or max(times, default=None)
    if stamp is None:
        return None
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).isoformat()
