"""The ``neiromatrius-worker`` command: run, publish, stats, check, demo."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from worker.cli import dead_letters
from worker.cli.arguments import build_parser
from worker.cli.loop import run_on_loop
from worker.core.errors import ConfigError
from worker.core.redaction import redact_url, scrub
from worker.core.settings import Settings, load_settings
from worker.observability.logs import configure_logging

if TYPE_CHECKING:
    from worker.cli.publish import Outgoing
    from worker.observability.stats import QueueNames
    from worker.redisio.clients import RedisClient

EXIT_CONFIG = 2  # a setting is wrong: fix it before trying again
EXIT_UNREACHABLE = 1  # a server could not be reached: try again once it is up


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"neiromatrius-worker: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log_format, settings.log_level)
    try:
        if args.command == "run":
            return run_on_loop(_run(settings), settings.event_loop)
        if args.command == "publish":
            return asyncio.run(_publish(settings, args))
        if args.command == "stats":
            return asyncio.run(_stats(settings, as_json=args.json))
        if args.command == "check":
            return asyncio.run(_check(settings))
        if args.command == "demo":
            return _demo(settings, args)
        if args.command == "dead-letters":
            return asyncio.run(dead_letters.run(settings, args))
    except ConfigError as exc:
        print(f"neiromatrius-worker: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    return 1


async def _run(settings: Settings) -> int:
    from worker.app import run_replica

    drained = await run_replica(settings, _stop_on_signals())
    if not drained:
        structlog.get_logger("worker").warning(
            "exited_before_drain_finished", note="unacknowledged messages are redelivered"
        )
    return 0


async def _publish(settings: Settings, args: argparse.Namespace) -> int:
    from worker.amqp.topology import Topology
    from worker.cli import publish

    loaded = await _messages_to_publish(args)
    if isinstance(loaded, int):
        return loaded
    messages, summary = loaded
    try:
        took_s = await publish.publish(
            settings.rabbitmq_url,
            settings.input_queue,
            messages,
            rate_per_s=args.rate,
            secrets=settings.secrets,
            arguments=Topology.of(settings).input_arguments(),
        )
    except (ConfigError, publish.BrokerUnreachable) as exc:
        print(f"neiromatrius-worker publish: {exc}", file=sys.stderr)
        return EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_UNREACHABLE
    summary["seconds"] = round(took_s, 3)
    summary["queue"] = settings.input_queue
    print(orjson.dumps(summary).decode())
    return 0


async def _messages_to_publish(
    args: argparse.Namespace,
) -> tuple[list[Outgoing], dict[str, object]] | int:
    """The messages ``publish`` was asked to send and the summary's start, or an exit code."""
    from worker.cli import publish

    if args.sample is not None:
        from worker.cli.samples import generate_sample

        try:
            plan = generate_sample(args.sample, args.duplicates, args.repeat_texts, seed=args.seed)
        except ValueError as exc:
            print(f"neiromatrius-worker publish: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        messages = publish.from_bodies(m.to_body() for m in plan.messages)
        return messages, {
            "published": len(messages),
            "unique_ids": plan.unique_ids,
            "duplicates": plan.duplicate_count,
            "distinct_texts": plan.distinct_texts,
        }
    if args.file == "-":
        lines = sys.stdin.buffer.read().splitlines()
    else:
        try:
            lines = (await asyncio.to_thread(Path(args.file).read_bytes)).splitlines()
        except OSError as exc:
            print(
                f"neiromatrius-worker publish: cannot read {args.file}: {exc.strerror}",
                file=sys.stderr,
            )
            return 1
    messages = publish.from_jsonl_lines(lines)
    return messages, {"published": len(messages)}


async def _stats(settings: Settings, *, as_json: bool) -> int:
    from worker.observability.table import render_table
    from worker.redisio.clients import client_for
    from worker.redisio.link import REDIS_ERRORS

    if not settings.redis_enabled:
        print(
            "neiromatrius-worker stats: REDIS_URL is not set; without Redis every replica keeps its "
            "own counters: ask a replica at /api/monitoring/stats",
            file=sys.stderr,
        )
        return 1
    try:
        client = await client_for(settings)
    except REDIS_ERRORS as exc:
        return _redis_failed(settings, exc)
    try:
        data = await _cluster_stats(settings, client)
    except REDIS_ERRORS as exc:
        return _redis_failed(settings, exc)
    finally:
        await client.aclose()
    print(
        orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() if as_json else render_table(data)
    )
    return 0


async def _cluster_stats(settings: Settings, client: RedisClient) -> dict[str, Any]:
    """What every replica published to Redis, with the queue depths and the cache Redis."""
    from worker.observability.cache_redis import probe_cache_redis
    from worker.observability.exposition import results_unrouted
    from worker.observability.stats import QueueNames, read_cluster
    from worker.redisio.keys import RedisKeys

    # The broker is optional here: without it the queue depths are reported as unknown.
    data, queues, cache_redis = await asyncio.gather(
        read_cluster(client, RedisKeys(settings.redis_key_prefix)),
        _queue_depths(settings, QueueNames.of(settings)),
        probe_cache_redis(settings),  # REDIS_CACHE_URL's, when set
    )
    data = {"cache": {"status": "redis_connected", "type": "redis"}, **data, "queues": queues}
    data["cache_redis"] = cache_redis
    data["results_unrouted"] = results_unrouted(queues)
    return data


async def _queue_depths(settings: Settings, names: QueueNames) -> dict[str, Any]:
    """The queue depths over a short-lived connection to one of the broker's addresses (tried in
    turn, 3 s each); unknown depths if none answers: ``stats`` needs no broker."""
    from worker.amqp.connection import CONNECTION_NAME, connect_once
    from worker.observability import stats

    unknown = stats.unknown_depths(names, stats.BROKER_UNREACHABLE)
    name = f"{CONNECTION_NAME} stats"
    try:
        connection = await connect_once(settings.rabbitmq_url, name=name, timeout_s=3.0)
    except stats.QUEUE_PROBE_ERRORS:
        return unknown
    try:
        return await stats.read_queue_depths(connection, names, timeout_s=3.0)
    except stats.QUEUE_PROBE_ERRORS:
        return unknown
    finally:
        with contextlib.suppress(*stats.QUEUE_PROBE_ERRORS):
            await connection.close()


def _redis_failed(settings: Settings, exc: BaseException) -> int:
    """Say why Redis did not answer as ``check`` does (the address, password masked, and the
    reason) in one line; exit 2 when the configuration refused the worker, else 1."""
    from worker.redisio.faults import RedisFault, classify, refusal_fix

    refused = classify(exc) is RedisFault.REFUSED
    reason = scrub(str(exc), settings.secrets) or type(exc).__name__
    fix = f"; {refusal_fix(exc)}" if refused else ""
    print(
        f"neiromatrius-worker stats: ⚠️ Redis connection failed: "
        f"{redact_url(settings.redis_url)}: {reason}{fix}",
        file=sys.stderr,
    )
    return EXIT_CONFIG if refused else EXIT_UNREACHABLE


def _demo(settings: Settings, args: argparse.Namespace) -> int:
    from worker.cli.demo import DemoOptions, run_demo

    if args.no_redis:
        redis_url = ""
    elif args.redis_url is not None:
        redis_url = load_settings(redis_url=args.redis_url).redis_url  # validated like REDIS_URL
    else:
        redis_url = settings.redis_url
    problem = _demo_problem(args)
    if problem is not None:
        print(f"neiromatrius-worker demo: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    options = DemoOptions(
        replicas=args.replicas,
        messages=args.messages,
        duplicates=args.duplicates,
        repeat_texts=args.repeat_texts,
        rate_per_s=args.rate,
        seed=args.seed,
        redis_url=redis_url,
        no_redis=args.no_redis,
        timeout_s=args.timeout,
        as_json=args.json,
    )

    async def demo() -> int:
        return await run_demo(settings, options, _stop_on_signals())

    return run_on_loop(demo(), settings.event_loop, quiet=True)


def _demo_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the demo's options, or None."""
    from worker.cli.samples import generate_sample

    if not 1 <= args.replicas <= 32:
        return "--replicas must be between 1 and 32"
    if args.messages < 1 or args.rate < 0 or args.timeout <= 0:
        return "--messages must be >= 1, --rate >= 0, --timeout > 0"
    try:
        generate_sample(args.messages, args.duplicates, args.repeat_texts)
    except ValueError as exc:
        return str(exc)
    return None


def _stop_on_signals() -> asyncio.Event:
    """An event that SIGTERM and SIGINT set, for the running loop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _check(settings: Settings) -> int:
    from worker.cli.checks import run_checks

    return await run_checks(settings)
