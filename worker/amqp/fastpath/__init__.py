"""The AMQP fast path: every use of aiormq and aio-pika internals, behind one switch.

- ``switch``: the start-up check (library versions, every attribute relied on), ``install`` /
  ``uninstall``, and ``FastPath`` (what is active, and why);
- ``frames``: the buffered frame reader (swaps aiormq's module-level ``FrameReceiver``);
- ``inline``: deliveries handed by the channel's reader to a plain function;
- ``publishing``: a loop turn's results written to the channel in one payload;
- ``attempts``: each robust-connection attempt to the next broker address of a cluster list (not
  switched: it is used on the stock libraries too).

Nothing outside this package touches a private attribute of aiormq or aio-pika. The README
section "The AMQP fast path" names the internals and what to check when bumping aiormq.
"""

from worker.amqp.fastpath.switch import (
    NOT_INSTALLED,
    FastPath,
    Libraries,
    check,
    current,
    decide,
    install,
    uninstall,
)

__all__ = [
    "NOT_INSTALLED",
    "FastPath",
    "Libraries",
    "check",
    "current",
    "decide",
    "install",
    "uninstall",
]
