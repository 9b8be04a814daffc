"""The garbage collector's settings for a replica under load.

A replica allocates a few dozen short-lived objects per message (frames, futures, tuples), nearly
all freed by reference counting. With CPython's default thresholds (700, 10, 10) the collector
still ran about 700 young collections and five full ones per 24,000 messages, each full one
walking every object the replica holds (its modules, the local cache): 0.3-0.4 s in all, about
15 µs per message, measured with ``gc.callbacks`` in case (b) of ``bench/run.py``. Freezing what
start-up built (it lives as long as the process) and collecting the young generation every
10,000 net allocations instead of 700 brought that to 0.10-0.12 s. Reference cycles are still
collected, a little later.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000


def tune_for_throughput() -> None:
    """Call once start-up is done: what exists now is never collected, and young collections
    come every ``YOUNG_THRESHOLD`` net allocations (older generations keep their defaults)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
