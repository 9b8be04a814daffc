"""The command line's arguments and help: one parser, a sub-parser per command.

The help of ``run`` and ``check`` lists the main environment variables with their defaults (read
from ``Settings``, so they cannot drift); the README's "Configuration" table has them all.
"""

from __future__ import annotations

import argparse
from typing import TypeAlias

from worker import __version__
from worker.cli import dead_letters
from worker.core.settings import Settings

SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

# (variable, its Settings field or None, what it is for): the ones a newcomer sets first.
MAIN_VARIABLES: tuple[tuple[str, str | None, str], ...] = (
    ("RABBITMQ_URL", "rabbitmq_url", "the broker"),
    ("REDIS_URL", "redis_url", "dedup, cache and counters across replicas; empty: in memory"),
    ("INPUT_QUEUE", "input_queue", "the queue every replica consumes"),
    ("RESULTS_EXCHANGE", "results_exchange", "topic exchange of the results"),
    ("DEAD_LETTER_QUEUE", "dead_letter_queue", "where unprocessable messages go"),
    ("QUEUE_TYPE", "queue_type", "classic or quorum, for the queues the worker creates"),
    ("CLASSIFIER", "classifier", "keywords, or llm with LLM_BASE_URL, LLM_API_KEY, LLM_MODEL"),
    ("PREFETCH", "prefetch", "messages in flight per replica"),
    ("STATS_HOST", "stats_host", "address of the monitoring HTTP server"),
    ("STATS_PORT", "stats_port", "its port; 0: any free one (several replicas on one host)"),
    ("LOG_FORMAT", "log_format", "console, json, or auto (console on a terminal)"),
    ("LOG_LEVEL", "log_level", "debug, info, warning or error"),
)


def environment_help() -> str:
    """The main variables, one a line with its default, for the epilog of ``run`` and ``check``."""
    lines = ['environment (a .env file is read too; every variable: the README, "Configuration"):']
    for name, field, meaning in MAIN_VARIABLES:
        default = Settings.model_fields[field].default if field else None
        shown = f" (default {default})" if default not in (None, "") else ""
        lines.append(f"  {name:<18} {meaning}{shown}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neiromatrius-worker",
        description="Process each Neiromatrius chat message once across replicas; classify it once.",
        epilog="Settings come from environment variables (and a .env file); see the README.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _run_parser(sub)
    _publish_parser(sub)
    st = sub.add_parser(
        "stats",
        help="print cluster-wide counters from Redis (no replica needed)",
        description="Cluster-wide counters, throughput, live replicas and Redis memory, read "
        "from REDIS_URL; queue depths too when RABBITMQ_URL reaches the broker. Exit code 1 "
        "when Redis cannot be reached, 2 when it refuses the password.",
    )
    st.add_argument("--json", action="store_true", help="machine-readable JSON")
    _check_parser(sub)
    _demo_parser(sub)
    dead_letters.add_parser(sub)
    return parser


def _run_parser(sub: SubParsers) -> None:
    sub.add_parser(
        "run",
        help="run one replica until SIGTERM/SIGINT",
        description="Run one replica: consume INPUT_QUEUE, claim each message ID (in Redis, or in\n"
        "memory without REDIS_URL), classify the text once, publish one result per unique\n"
        "message to RESULTS_EXCHANGE, and serve monitoring on STATS_HOST:STATS_PORT.\n"
        "SIGTERM or SIGINT: stop consuming, drain within DRAIN_TIMEOUT_S, exit 0. A bad\n"
        "setting stops start-up with one line naming it, exit code 2.",
        epilog=environment_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _check_parser(sub: SubParsers) -> None:
    sub.add_parser(
        "check",
        help="test the configured connections",
        description="Connect to Redis (REDIS_URL) and RabbitMQ (RABBITMQ_URL) and build the\n"
        "classifier (CLASSIFIER) as `run` would; print one line for each: ok, FAIL with the\n"
        "reason, or info. Exit code 0 when everything configured works, else 1.",
        epilog=environment_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _publish_parser(sub: SubParsers) -> None:
    queue = Settings.model_fields["input_queue"].default
    pub = sub.add_parser(
        "publish",
        help=f"send messages to the input queue (INPUT_QUEUE, default {queue})",
        description=f"Send messages to the input queue, INPUT_QUEUE (default {queue}), on "
        "RABBITMQ_URL, with publisher confirms; print a JSON summary. Exit code 2 when the "
        "broker refuses the connection (a wrong password), 1 when it cannot be reached.",
    )
    source = pub.add_mutually_exclusive_group(required=True)
    source.add_argument("file", nargs="?", help="JSONL file, one message per line ('-' for stdin)")
    source.add_argument("--sample", type=int, metavar="N", help="generate N messages")
    pub.add_argument(
        "--duplicates",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="with --sample: share of the N that re-send an earlier message (0..1)",
    )
    pub.add_argument(
        "--repeat-texts",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="with --sample: share of unique messages reusing an earlier text (0..1)",
    )
    pub.add_argument("--seed", type=int, default=None, help="with --sample: reproducible traffic")
    pub.add_argument(
        "--rate",
        type=float,
        default=0.0,
        metavar="PER_SECOND",
        help="publish at this pace instead of as fast as possible",
    )


def _demo_parser(sub: SubParsers) -> None:
    demo = sub.add_parser(
        "demo",
        help="run replicas on generated traffic and show what dedup and the cache did",
        description="Starts replicas on the local broker under names of their own, publishes "
        "sample traffic with duplicates and repeated texts, shows progress and a final table, "
        "then stops the replicas and removes everything it created. Uses REDIS_URL when set.",
    )
    demo.add_argument("--replicas", type=int, default=3, metavar="N", help="default 3")
    demo.add_argument("--messages", type=int, default=2000, metavar="N", help="default 2000")
    demo.add_argument(
        "--duplicates",
        type=float,
        default=0.2,
        metavar="FRACTION",
        help="share of the messages that re-send an earlier one (default 0.2)",
    )
    demo.add_argument(
        "--repeat-texts",
        type=float,
        default=0.5,
        metavar="FRACTION",
        help="share of unique messages reusing an earlier text (default 0.5)",
    )
    demo.add_argument(
        "--rate", type=float, default=0.0, metavar="PER_SECOND", help="pace publishing"
    )
    demo.add_argument("--seed", type=int, default=None, help="reproducible traffic")
    redis = demo.add_mutually_exclusive_group()
    redis.add_argument("--redis-url", default=None, help="Redis to use (default: REDIS_URL)")
    redis.add_argument("--no-redis", action="store_true", help="in-memory replicas")
    demo.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="give up after this (default %(default)g)",
    )
    demo.add_argument("--json", action="store_true", help="print the summary as JSON")
