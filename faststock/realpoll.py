"""The operating system's poll(2), even where gevent has patched `select`.

Three places check a socket without waiting: the pool (has the server closed this idle
connection?), the Redis client (is anything unread on this connection?) and the near cache (has
an invalidation arrived?). `select.select` cannot watch a descriptor numbered 1024 or more, which
a busy gevent worker passes easily, and gevent's `select.poll` emulates the call on its event loop
at about 20 times the cost of the system call (21.6 µs against 1.2 µs, measured here). A
zero-timeout check never blocks, so the real call is safe under gevent.
"""

from __future__ import annotations

import select
from collections.abc import Callable
from typing import Any


def _original() -> Callable[[], Any]:
    try:
        from gevent import monkey
    except ImportError:
        return select.poll
    return monkey.get_original("select", "poll")


poll = _original()


def readable(fd: int) -> bool:
    """Whether `fd` has something to read (or is closed or in error) right now."""
    poller = poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))
