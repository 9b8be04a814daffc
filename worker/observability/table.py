"""The stats as a table for people: the ``stats`` command without ``--json``."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from worker.observability.breakers import breaker_lines


def _ago(epoch_s: Any, now: float) -> str:
    if not isinstance(epoch_s, int | float):
        return "?"
    seconds = max(0.0, now - float(epoch_s))
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _started(epoch_s: Any) -> str:
    if not isinstance(epoch_s, int | float):
        return "?"
    return datetime.fromtimestamp(float(epoch_s), UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _depth(entry: dict[str, Any]) -> str:
    if entry.get("missing"):
        return f"{entry['name']}: (no such queue)"
    if entry.get("messages") is None:
        return f"{entry['name']}: ?"
    consumers = f"{entry['consumers']} consumer{'' if entry['consumers'] == 1 else 's'}"
    return f"{entry['name']}: {entry['messages']:,} waiting, {consumers}"


def render_table(stats: dict[str, Any], now: float | None = None) -> str:
    """A readable summary for people (the ``stats`` command without ``--json``)."""
    now = time.time() if now is None else now
    lines = [f"Neiromatrius worker — {stats.get('scope', 'cluster')} stats"]
    cache = stats.get("cache")
    if cache:
        lines.append(f"  cache            {cache['status']} ({cache['type']})")
    lines.append("")
    lines.append("  counters")
    for name, value in stats["counters"].items():
        lines.append(f"    {name:<18}{value:>12,}")
    lines.append("")
    r = stats["rates"]
    lines.append(f"  duplicate rate   {r['duplicate_rate']:.2%}")
    lines.append(f"  cache hit rate   {r['cache_hit_rate']:.2%}")
    tp = stats["throughput"]
    lines.append("  throughput       " + "  ".join(f"{k}: {v:,.1f}/s" for k, v in tp.items()))
    lines.extend(_replica_lines(stats.get("replicas", []), now))
    lines.extend(_redis_lines(stats.get("redis")))
    lines.extend(breaker_lines(stats.get("breakers")))
    lines.extend(_queue_lines(stats.get("queues")))
    return "\n".join(lines)


def _replica_lines(replicas: list[dict[str, Any]], now: float) -> list[str]:
    lines = ["", f"  live replicas    {len(replicas)}"]
    for rep in replicas:
        lines.append(
            f"    {rep.get('id')!s:<28} host {rep.get('host')!s:<16} pid {rep.get('pid')!s:<8}"
            f" started {_started(rep.get('started_at'))}  seen {_ago(rep.get('last_seen'), now)}"
            f"  in flight {rep.get('in_flight') or 0:<5} processed {rep.get('processed') or 0:,}"
        )
    return lines


def _redis_lines(redis: dict[str, Any] | None) -> list[str]:
    if not redis:
        return []
    lines = [
        "",
        f"  redis memory     {redis.get('used_memory_human')} "
        f"(max {redis.get('maxmemory') or 'unlimited'}, policy {redis.get('maxmemory_policy')},"
        f" evicted {redis.get('evicted_keys')})",
        f"  redis clients    {redis.get('connected_clients') or 0:,} connected, "
        f"{redis.get('instantaneous_ops_per_sec') or 0:,} commands/s",
    ]
    if "warning" in redis:
        lines.append(f"  WARNING: {redis['warning']}")
    return lines


def _queue_lines(queues: dict[str, Any] | None) -> list[str]:
    if not queues:
        return []
    lines = [
        "",
        f"  input queue      {_depth(queues['input'])}",
        f"  dead letters     {_depth(queues['dead_letter'])}",
    ]
    if "unrouted" in queues:
        lines.append(f"  unrouted results {_depth(queues['unrouted'])}")
    if "error" in queues:
        lines.append(f"  (queue depths unknown: {queues['error']})")
    return lines
