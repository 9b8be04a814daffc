"""The worker's topology on the broker, used as it is or created (``worker.amqp.declaring``).

Queues come first (the input queue's dead-letter target before it, so nothing it dead-letters is
dropped for want of a queue), then the results exchange, its alternate exchange and the unrouted
queue. What was found is said once, in one line: each queue's type, and whether it was created.
"""

from __future__ import annotations

from collections.abc import Mapping

import structlog
from aio_pika.abc import AbstractConnection

from worker.amqp.declaring import Found, bind_queue, ensure_exchange, ensure_queue
from worker.amqp.topology import Topology

log = structlog.get_logger("worker.amqp.setup")

ALTERNATE_FIX = (
    "unrouted results are not kept: give the exchange an alternate exchange with a policy "
    "(alternate-exchange: {unrouted}), or delete it and let a replica declare it again"
)


async def declare_queues(connection: AbstractConnection, topology: Topology) -> list[Found]:
    """The dead-letter, input and retry queues, each found or created."""
    t = topology
    found = [await ensure_queue(connection, t.dead_letter_queue, t.plain_arguments())]
    found.append(await ensure_queue(connection, t.input_queue, t.input_arguments()))
    for attempt in range(1, t.max_attempts):
        found.append(
            await ensure_queue(connection, t.retry_queue(attempt), t.retry_arguments(attempt))
        )
    return found


async def declare_results(connection: AbstractConnection, topology: Topology) -> list[Found]:
    """The results exchange and, unless unrouted results are discarded, its alternate exchange
    bound to the unrouted queue; a warning if an existing results exchange has no such exchange."""
    t = topology
    arguments = t.results_arguments()
    results = await ensure_exchange(connection, t.results_exchange, "topic", arguments)
    if not t.keep_unrouted:
        return [results]
    if results.kind != "same":
        log.warning(
            "results_exchange_without_alternate",
            exchange=t.results_exchange,
            found=results.kind,
            fix=ALTERNATE_FIX.format(unrouted=t.unrouted),
        )
    await ensure_exchange(connection, t.unrouted, "fanout", {})
    unrouted = await ensure_queue(connection, t.unrouted, t.plain_arguments())
    await bind_queue(connection, t.unrouted, t.unrouted)
    return [results, unrouted]


async def declare_topology(connection: AbstractConnection, topology: Topology) -> list[Found]:
    """Everything a replica uses; logs what it found once (``topology_ready``)."""
    found = await declare_queues(connection, topology)
    found += await declare_results(connection, topology)
    log.info("topology_ready", **describe(found, topology))
    return found


def describe(found: list[Found], topology: Topology) -> Mapping[str, str]:
    """``{role: "quorum, existing"}`` for the log line; the retry queues summed up in one."""
    roles = {
        topology.input_queue: "input_queue",
        topology.dead_letter_queue: "dead_letter_queue",
        topology.results_exchange: "results_exchange",
        topology.unrouted: "unrouted_queue",
    }
    described: dict[str, str] = {}
    retries: list[str] = []
    for item in found:
        state = f"{item.kind}, {'created' if item.created else 'existing'}"
        role = roles.get(item.name)
        if role is None:
            retries.append(state)
        else:
            described[role] = state
    if retries:
        described["retry_queues"] = ", ".join(sorted(set(retries))) + f" ({len(retries)})"
    return described
