"""Loading the Lua scripts: ``.lua`` files shipped beside the code that calls them.

Each package keeps its scripts in a ``scripts/`` folder (package data, see ``pyproject.toml``);
each file documents at its top what it takes in KEYS and ARGV and what it answers. A script's text
is read once per process; ``register`` gives a client's handle to it, which runs ``EVALSHA`` and,
when the server does not know the script yet (``NOSCRIPT``: a restart, a failover), loads it and
runs it again (redis-py's ``AsyncScript``). Register once, in a component's constructor.

Scripts are never assembled from strings: a counter name a script writes is spelled in the script
(behaviour tests compare it with ``CounterName``), anything else comes in KEYS or ARGV.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

from redis.commands.core import AsyncScript

from worker.redisio.clients import RedisClient


@dataclass(frozen=True, slots=True)
class LuaScript:
    """The script ``scripts/{name}`` of the package ``package``, after the files of ``library``
    (Lua functions it calls, each a ``scripts/`` file of the same package)."""

    package: str
    name: str
    library: tuple[str, ...] = ()

    @property
    def source(self) -> str:
        parts = [_read(self.package, part) for part in (*self.library, self.name)]
        return "\n".join(parts)

    def register(self, client: RedisClient) -> AsyncScript:
        """``client``'s handle to this script (no round trip: the script is loaded on first use)."""
        # redis-py annotates the method for Redis only; RedisCluster inherits the same one.
        return client.register_script(self.source)  # type: ignore[misc]


@functools.cache
def _read(package: str, name: str) -> str:
    return resources.files(package).joinpath("scripts", name).read_text(encoding="utf-8")


# Owner-checked renewal of a batch of leases or locks: claims and the single flight both use it.
RENEW = LuaScript("worker.redisio", "renew.lua")
