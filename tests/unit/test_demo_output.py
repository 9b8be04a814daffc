"""What the demo prints: the progress line, the line after an interruption, the no-Redis notice and
the final table's classifier calls."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

from worker.cli.demo import no_redis_notice
from worker.cli.demo_progress import Watcher
from worker.cli.demo_report import render_summary
from worker.cli.demo_setup import DemoOptions, demo_names
from worker.cli.replicas import ReplicaGroup
from worker.observability.metrics import CounterName


class Terminal(io.StringIO):
    """A stderr that says it is a terminal (the progress line is then rewritten in place)."""

    def isatty(self) -> bool:
        return True


def watcher(err: io.StringIO, tmp_path: Path) -> Watcher:
    return Watcher("", demo_names(), DemoOptions(), ReplicaGroup(tmp_path), asyncio.Event(), err)


def test_published_never_lags_processed(tmp_path: Path) -> None:
    """While a chunk's confirms are awaited, the progress line counts as published what the
    replicas already hold or handled, so it never shows fewer published than processed."""
    err = io.StringIO()
    shown = watcher(err, tmp_path)
    shown.progress.published = 1_000  # confirmed so far
    shown.progress.per_replica = {
        "a": {CounterName.PROCESSED: 1_000, CounterName.DUPLICATES: 200},
        "b": {CounterName.PROCESSED: 333},
    }
    shown.progress.in_flight = 50
    shown.show_progress(started=0.0, total=20_000)
    assert "published 1,583/20,000  processed 1,333" in err.getvalue()
    shown.progress.published = 20_000
    shown.show_progress(started=0.0, total=20_000)
    assert "published 20,000/20,000" in err.getvalue().splitlines()[-1]


def test_a_line_after_the_progress_line_starts_a_line_of_its_own(tmp_path: Path) -> None:
    """On a terminal the progress line has no newline while it runs; ``end_line`` ends it (once),
    so the interruption message that follows is not printed onto it."""
    err = Terminal()
    shown = watcher(err, tmp_path)
    shown.show_progress(started=0.0, total=10)
    assert not err.getvalue().endswith("\n")
    shown.end_line()
    shown.end_line()
    assert err.getvalue().endswith("in flight 0\n")
    final = Terminal()
    done = watcher(final, tmp_path)
    done.show_progress(started=0.0, total=10, final=True)
    done.end_line()
    assert final.getvalue().count("\n") == 1


def test_no_redis_asked_for_is_not_told_to_set_redis_url() -> None:
    """With --no-redis the notice names the option and suggests no REDIS_URL; without Redis
    configured at all it says how to add it."""
    asked = no_redis_notice(DemoOptions(no_redis=True))
    assert "--no-redis" in asked
    assert "REDIS_URL" not in asked
    assert "--redis-url" not in asked
    assert "set REDIS_URL or pass --redis-url" in no_redis_notice(DemoOptions())


def summary(mode: str, **numbers: int) -> dict[str, Any]:
    base: dict[str, Any] = {
        "mode": mode,
        "redis": "redis://127.0.0.1:6379/0" if mode == "redis" else None,
        "replicas": 3,
        "published": 1_250,
        "unique_ids": 1_000,
        "duplicates_published": 250,
        "distinct_texts": 500,
        "processed": 1_000,
        "results": 1_000,
        "duplicates_skipped": 250,
        "cache_hits": 500,
        "cache_misses": 500,
        "classifier_calls": 500,
        "dead_lettered": 0,
        "seconds": 2.0,
        "throughput_per_s": 625.0,
        "rate_per_s": 0.0,
        "per_replica": {"r-1": 1_000},
        "cluster_counters_agree": None,
    }
    base.update(numbers)
    return base


def calls_row(table: str) -> str:
    (row,) = [line for line in table.splitlines() if line.startswith("  classifier calls")]
    return row


def test_classifier_calls_are_expected_once_per_distinct_text() -> None:
    """With Redis the classifier calls row expects the distinct texts (✓ when equal, ≈ with the
    reason when two replicas raced on a text, ≠ otherwise); without Redis it names them in a note."""
    assert calls_row(render_summary(summary("redis"))).split() == [
        "classifier", "calls", "500", "500", "✓", "each", "distinct", "text", "once",
    ]  # fmt: skip
    raced = calls_row(render_summary(summary("redis", cache_hits=497, cache_misses=503,
                                              classifier_calls=503)))  # fmt: skip
    assert raced.split()[2:5] == ["503", "500", "≈"]
    assert raced.endswith("3 texts were classified by two replicas")
    wrong = calls_row(render_summary(summary("redis", classifier_calls=900)))
    assert wrong.split()[2:5] == ["900", "500", "≠"]
    memory = calls_row(render_summary(summary("memory", classifier_calls=1_200)))
    assert memory.split()[2] == "1,200"
    assert memory.endswith("(distinct texts: 500)")
