"""A flag shared by every worker on this host: "Redis may hold entries older than PostgreSQL".

A write whose cache update failed leaves Redis stale for that product until the outbox is
replayed. The worker that failed knows; its siblings would go on serving the stale entry. This
page of anonymous shared memory, mapped in gunicorn's master (gunicorn.conf.py imports this
module) and inherited by every forked worker, tells them all to bypass Redis until a keeper has
replayed the outbox. Two counters, not a boolean, so a keeper only marks clean what it has seen:
a failure recorded while it was replaying keeps the flag set.
"""

from __future__ import annotations

import mmap
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
