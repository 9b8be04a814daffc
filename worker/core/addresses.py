"""A setting that lists several servers: ``RABBITMQ_URL=amqp://a:5672/,amqp://b:5672/``.

The list form is comma-separated addresses (a comma inside one address is written ``%2C``); one
address alone is a list of one. A client tries them in turn, starting from a random one, so that
replicas given the same list spread over the servers rather than all landing on the first.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def split_addresses(value: str) -> tuple[str, ...]:
    """The addresses of a comma-separated list, blanks around them and empty ones dropped."""
    return tuple(part.strip() for part in value.split(",") if part.strip())


def listed_urls(value: str) -> tuple[str, ...]:
    """``value`` as a list of URLs when every comma-separated part is one (``scheme://...``),
    else ``value`` alone: a URL whose own syntax has commas (the Sentinel form
    ``redis+sentinel://h1:26379,h2:26379/name``) is one address."""
    parts = split_addresses(value)
    if len(parts) > 1 and all("://" in part for part in parts):
        return parts
    return (value,)


def in_turn(addresses: Sequence[str], start: int | None = None) -> tuple[str, ...]:
    """``addresses`` in the order to try them: from ``start`` (a random one by default), wrapping
    round, each once."""
    if not addresses:
        return ()
    first = random.randrange(len(addresses)) if start is None else start % len(addresses)
    return (*addresses[first:], *addresses[:first])
