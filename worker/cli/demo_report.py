"""The demo's report: the summary of a run, the final table with what each number should be,
and the check of what does not add up (the exit code)."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, TextIO

import orjson

from worker.cli.demo_progress import COMPARED, Progress, ResultCounter
from worker.cli.demo_setup import DemoOptions
from worker.cli.replicas import ReplicaNames
from worker.cli.samples import SamplePlan
from worker.core.redaction import redact_url
from worker.observability.metrics import CounterName


@dataclasses.dataclass(frozen=True, slots=True)
class RunFacts:
    """What one run published and what it saw, for its summary."""

    options: DemoOptions
    names: ReplicaNames
    plan: SamplePlan
    progress: Progress
    results: ResultCounter
    cluster: dict[str, int] | None
    elapsed_s: float
    exit_codes: list[int | None]


def summary(run: RunFacts) -> dict[str, Any]:
    """The run's numbers, as ``--json`` prints them and the table shows them."""
    p, plan, redis_url = run.progress, run.plan, run.options.redis_url
    return {
        "mode": "redis" if redis_url else "memory",
        "redis": redact_url(redis_url) if redis_url else None,
        "replicas": len(run.exit_codes),
        "published": len(plan.messages),
        "unique_ids": plan.unique_ids,
        "duplicates_published": plan.duplicate_count,
        "distinct_texts": plan.distinct_texts,
        "processed": p.total(CounterName.PROCESSED),
        "results": run.results.total,
        "ids_with_results": len(run.results.by_id),
        "duplicates_skipped": p.total(CounterName.DUPLICATES)
        + p.total(CounterName.REDELIVERED_DONE),
        "cache_hits": p.total(CounterName.CACHE_HITS),
        "cache_misses": p.total(CounterName.CACHE_MISSES),
        "classifier_calls": p.total(CounterName.CLASSIFIER_CALLS),
        "dead_lettered": p.total(CounterName.DEAD_LETTERED),
        "seconds": round(run.elapsed_s, 3),
        "throughput_per_s": round(len(plan.messages) / run.elapsed_s, 1),
        "rate_per_s": run.options.rate_per_s,
        "per_replica": {rid: c.get(CounterName.PROCESSED, 0) for rid, c in p.per_replica.items()},
        "cluster_counters": run.cluster,
        "cluster_counters_agree": None
        if run.cluster is None
        else all(run.cluster[c] == p.total(c) for c in COMPARED),
        "replica_exit_codes": run.exit_codes,
        "names": dataclasses.asdict(run.names),
    }


def _row(name: str, count: int, expected: int | None, note: str = "", mark: str = "") -> str:
    shown = "" if expected is None else f"{expected:>10,}"
    if expected is not None and not mark:
        mark = "✓" if count == expected else "≠"
    return f"  {name:<30}{count:>10,}{shown}  {mark:<1}  {note}".rstrip()


MEMORY_NOTE = [
    "",
    "  Without Redis each replica remembers only the IDs and texts it has seen itself:",
    "  duplicates that land on another replica are processed again, and each replica",
    "  classifies each text once. Run with --redis-url redis://127.0.0.1:6379/0 to see",
    "  the cluster process every message once.",
]


def render_summary(s: dict[str, Any]) -> str:
    """The final table, with what each number should be given what was published."""
    redis = s["mode"] == "redis"
    lines = [
        f"Neiromatrius demo: {s['replicas']} replicas, "
        + (f"Redis {s['redis']} (cluster-wide dedup and cache)" if redis else "no Redis"),
        "",
        f"  {'':<30}{'count':>10}{'expected':>10}",
        _row("published", s["published"], None),
        _row("  unique message IDs", s["unique_ids"], None),
        _row("  duplicate deliveries", s["duplicates_published"], None),
        _row("  distinct texts", s["distinct_texts"], None),
        *(_cluster_rows(s) if redis else _memory_rows(s)),
        *_totals(s),
    ]
    if s["cluster_counters_agree"] is not None:
        agree = "yes ✓" if s["cluster_counters_agree"] else "NO"
        lines.append(f"  cluster counters in Redis equal the replicas' sum: {agree}")
    if not redis:
        lines += MEMORY_NOTE
    return "\n".join(lines)


def _cluster_rows(s: dict[str, Any]) -> list[str]:
    """With Redis: each ID once, every duplicate skipped, each distinct text classified once."""
    expected_hits = s["unique_ids"] - s["distinct_texts"]
    # A replica that waited too long for another's classification of the same text computes
    # it itself: a hit less and a call more, so hits + misses stay exact.
    races = expected_hits - s["cache_hits"]
    exact = s["cache_hits"] + s["cache_misses"] == s["processed"] and races >= 0
    raced = bool(races and exact)
    note = f"{races} texts were classified by two replicas" if raced else ""
    calls_raced = raced and s["classifier_calls"] == s["distinct_texts"] + races
    return [
        _row("processed", s["processed"], s["unique_ids"], "each ID once"),
        _row("duplicates skipped", s["duplicates_skipped"], s["duplicates_published"]),
        _row("cache hits", s["cache_hits"], expected_hits, note, "≈" if raced else ""),
        _row(
            "classifier calls",
            s["classifier_calls"],
            s["distinct_texts"],
            note if calls_raced else "each distinct text once",
            "≈" if calls_raced else "",
        ),
    ]


def _memory_rows(s: dict[str, Any]) -> list[str]:
    """Without Redis: how many duplicates were processed again, and no expected cache hits."""
    again = s["processed"] - s["unique_ids"]
    return [
        _row("processed", s["processed"], s["unique_ids"], f"{again} processed again"),
        _row("duplicates skipped", s["duplicates_skipped"], s["duplicates_published"]),
        _row("cache hits", s["cache_hits"], None, "each replica has its own cache"),
        _row(
            "classifier calls",
            s["classifier_calls"],
            None,
            f"each text once per replica that saw it (distinct texts: {s['distinct_texts']:,})",
        ),
    ]


def _totals(s: dict[str, Any]) -> list[str]:
    return [
        _row("results published", s["results"], s["processed"]),
        _row("dead-lettered", s["dead_lettered"], 0),
        "",
        f"  throughput  {s['throughput_per_s']:,.0f} messages/s"
        f"  ({s['published']:,} deliveries in {s['seconds']:.1f}s"
        + (f", publishing paced at {s['rate_per_s']:g}/s)" if s["rate_per_s"] else ")"),
        "  processed per replica  "
        + "  ".join(f"{rid}: {n:,}" for rid, n in sorted(s["per_replica"].items())),
    ]


def check_summary(s: dict[str, Any]) -> list[str]:
    """What does not add up; with Redis every number is exact, without it only the totals are."""
    problems = []
    if s["ids_with_results"] != s["unique_ids"]:
        problems.append(f"{s['ids_with_results']} of {s['unique_ids']} IDs got a result")
    if s["processed"] + s["duplicates_skipped"] + s["dead_lettered"] != s["published"]:
        problems.append("processed + duplicates skipped + dead-lettered != published")
    if s["mode"] == "redis":
        if s["processed"] != s["unique_ids"] or s["results"] != s["unique_ids"]:
            problems.append("with Redis every unique message must be processed exactly once")
        if s["cluster_counters_agree"] is False:
            problems.append("the cluster counters in Redis differ from the replicas' own")
    if any(code != 0 for code in s["replica_exit_codes"]):
        problems.append(f"replica exit codes: {s['replica_exit_codes']}")
    return problems


def report(s: dict[str, Any], as_json: bool, err: TextIO) -> int:
    """Print the summary (the table, or JSON) and what does not add up; the exit code."""
    if as_json:
        print(orjson.dumps(s, option=orjson.OPT_INDENT_2).decode(), file=sys.stdout)
    else:
        print(render_summary(s), file=sys.stdout)
    problems = check_summary(s)
    for problem in problems:
        err.write(f"demo: {problem}\n")
    return 1 if problems else 0
