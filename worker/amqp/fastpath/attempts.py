"""Each connection attempt of a robust connection to the next of several broker addresses.

aio-pika's ``RobustConnection`` connects to one URL and offers no seam for "an attempt is about
to start": every attempt, the first and each reconnection, goes through one private method,
``RobustConnection.__connect_transport`` (``ATTEMPT_HOOK`` below), which connects to ``self.url``.
``RotatingRobustConnection`` overrides it to set ``self.url`` to the next address first. This is
the one internal here that is not behind the fast-path switch: a cluster list must rotate on the
stock libraries too. When the method is missing (a changed aio-pika), ``ROTATES`` is false and a
connection stays on the address it first reached (``connection.py`` warns once);
``tests/unit/test_broker_addresses.py`` fails on such a bump. Upstream, a list of URLs accepted
by ``connect_robust`` (or a public ``_before_connect`` hook) would replace this module.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Final

import aio_pika
from yarl import URL

ATTEMPT_HOOK: Final = "_RobustConnection__connect_transport"
ROTATES: Final = inspect.iscoroutinefunction(getattr(aio_pika.RobustConnection, ATTEMPT_HOOK, None))


class RotatingRobustConnection(aio_pika.RobustConnection):
    """A robust connection whose every attempt goes to the next of ``addresses`` in turn."""

    addresses: tuple[URL, ...] = ()
    attempts: int = 0

    def rotate_over(self, addresses: Sequence[URL]) -> None:
        """Make attempts to ``addresses`` in this order (the first one first), wrapping round."""
        self.addresses = tuple(addresses)
        self.attempts = 0

    @property
    def address(self) -> URL:
        """The address of the current (or last) attempt."""
        return self.url

    async def _RobustConnection__connect_transport(self) -> None:
        if self.addresses:
            self.url = self.addresses[self.attempts % len(self.addresses)]
        self.attempts += 1
        attempt = getattr(super(), ATTEMPT_HOOK)
        await attempt()
