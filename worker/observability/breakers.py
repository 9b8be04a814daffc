"""The classifiers' circuit breakers as the stats show them, read from their Redis hashes.

The hashes are written by ``worker.classification.breaker`` (fields in its ``breaker.lua``); this
reads them for the ``stats`` command and the cluster stats JSON, which need no classifier built.
"""

from __future__ import annotations

import time
from typing import Any

from redis.asyncio import Redis

from worker.redisio.keys import RedisKeys


def breaker_entry(classifier: str, fields: dict[str, str]) -> dict[str, Any]:
    """One breaker for the stats JSON (the same shape a replica reports for its own)."""
    is_open = fields.get("open") == "1"
    next_probe_ms = int(fields.get("next_probe") or 0)
    return {
        "classifier": classifier,
        "state": "open" if is_open else "closed",
        "kind": (fields.get("kind") or None) if is_open else None,
        "reason": (fields.get("reason") or None) if is_open else None,
        "opened_at": int(fields.get("opened") or 0) / 1000 if is_open else None,
        "next_probe_in_s": (
            round(max(0.0, next_probe_ms / 1000 - time.time()), 3) if is_open else None
        ),
        "opens": int(fields.get("opens") or 0),
        "probes": int(fields.get("probes") or 0),
    }


async def read_breakers(redis: Redis, keys: RedisKeys) -> list[dict[str, Any]]:
    """Every classifier's breaker of the deployment, open ones first."""
    stem = keys.breaker("")[:-2]  # the key without its empty "{}" hash tag
    found = []
    async for raw_key in redis.scan_iter(match=keys.breaker_pattern, count=100):
        key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
        raw: dict[Any, Any] = await redis.hgetall(key)  # type: ignore[misc]
        fields = {_text(k): _text(v) for k, v in raw.items()}
        if fields:
            found.append(breaker_entry(key[len(stem) :].strip("{}"), fields))
    return sorted(found, key=lambda entry: (entry["state"] != "open", entry["classifier"]))


def breaker_lines(breakers: list[dict[str, Any]] | None) -> list[str]:
    """The ``stats`` table's lines: one per breaker."""
    if not breakers:
        return []
    lines = [""]
    for entry in breakers:
        state = entry["state"]
        if state == "open":
            state = f"OPEN ({entry['kind']}): {entry['reason']}"
        lines.append(
            f"  llm breaker      {state}  [{entry['opens']} opens, {entry['probes']} probes]"
            f"  {entry['classifier']}"
        )
    return lines


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
