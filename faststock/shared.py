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
import struct

_PAGE = mmap.mmap(-1, mmap.PAGESIZE)
_DIRTY, _CLEAN = 0, 8


def _read(offset: int) -> int:
    return struct.unpack_from("Q", _PAGE, offset)[0]


def mark_dirty() -> None:
    """A cache update failed: every worker bypasses Redis until the outbox is replayed."""
    struct.pack_into("Q", _PAGE, _DIRTY, _read(_DIRTY) + 1)


def dirty_mark() -> int:
    """The failure count now; pass it to `mark_clean` after replaying everything pending."""
    return _read(_DIRTY)


def mark_clean(seen: int) -> None:
    struct.pack_into("Q", _PAGE, _CLEAN, seen)


def is_dirty() -> bool:
    return _read(_DIRTY) != _read(_CLEAN)


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
_process = [0, 0, 0]  # pid, nonce, counter: redrawn in each forked worker


def stamp(product_id: int) -> int:
    """The product's slot value now; record it before loading an entry you will keep."""
    return _STAMPS[product_id % STAMP_SLOTS]


def changed(product_id: int) -> None:
    """A change to the product has committed: no entry loaded before now may be served."""
    if _process[0] != os.getpid():
        _process[:] = [os.getpid(), secrets.randbits(32), 0]
    _process[2] += 1
    _STAMPS[product_id % STAMP_SLOTS] = (_process[1] << 32 | _process[2] & 0xFFFFFFFF) or 1
