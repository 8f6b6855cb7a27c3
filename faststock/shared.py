"""Memory shared by every worker on this host: a "Redis may be stale" flag and change stamps.

A write whose cache update failed leaves Redis stale for that product until the outbox is
replayed. The worker that failed knows; its siblings would go on serving the stale entry. This
page of anonymous shared memory, mapped in gunicorn's master (gunicorn.conf.py imports this
module) and inherited by every forked worker, tells them all to bypass Redis until a keeper has
replayed the outbox. Two counters, not a boolean, so a keeper only marks clean what it has seen:
a failure recorded while it was replaying keeps the flag set.
"""

from __future__ import annotations

import mmap
import os
import secrets

_PAGE = mmap.mmap(-1, mmap.PAGESIZE)
_FLAGS = memoryview(_PAGE).cast("Q")  # aligned 8-byte words: each read or store is one access
_DIRTY, _CLEAN = 0, 1


def mark_dirty() -> None:
    """A cache update failed: every worker bypasses Redis until the outbox is replayed."""
    _FLAGS[_DIRTY] += 1


def dirty_mark() -> int:
    """The failure count now; pass it to `mark_clean` after replaying everything pending."""
    return _FLAGS[_DIRTY]


def mark_clean(seen: int) -> None:
    _FLAGS[_CLEAN] = seen


def is_dirty() -> bool:
    return _FLAGS[_DIRTY] != _FLAGS[_CLEAN]


# Change stamps: one 8-byte slot per product id modulo STAMP_SLOTS, in memory every worker of the
# host shares. A writer stores a value never stored before into its product's slot after commit
# and before answering; a worker's in-process cache (nearcache.py) keeps the slot's value read
# before it loaded an entry, and serves the entry only while the slot still holds that value.
# Stores, not increments: two workers incrementing the same slot at once could both write the
# same value and hide the second change, while two fresh values always differ from what a reader
# saw before either. Products sharing a slot only cost each other a reload.
STAMP_SLOTS = 1 << 16
_STAMP_MAP = mmap.mmap(-1, STAMP_SLOTS * 8)
_STAMPS = memoryview(_STAMP_MAP).cast("Q")
_process = [secrets.randbits(32), 0]  # nonce, counter: redrawn in every forked child


def _new_process() -> None:
    _process[:] = [secrets.randbits(32), 0]


os.register_at_fork(after_in_child=_new_process)


def stamp(product_id: int) -> int:
    """The product's slot value now; record it before loading an entry you will keep."""
    return _STAMPS[product_id % STAMP_SLOTS]


def stamps(product_ids: tuple[int, ...]) -> tuple[int, ...]:
    """The slot values of several products at once (a cached list page checks its items)."""
    return tuple([_STAMPS[i % STAMP_SLOTS] for i in product_ids])


def changed(product_id: int) -> None:
    """A change to the product has committed: no entry loaded before now may be served."""
    _process[1] += 1
    _STAMPS[product_id % STAMP_SLOTS] = (_process[0] << 32 | _process[1] & 0xFFFFFFFF) or 1
