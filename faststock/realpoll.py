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


_EVENTS = select.POLLIN | select.POLLPRI


def readable(fd: int) -> bool:
    """Whether `fd` has something to read (or is closed or in error) right now."""
    poller = poll()
    poller.register(fd, _EVENTS)
    return bool(poller.poll(0))


class Watch:
    """`readable` for one descriptor checked again and again (the near cache's, before every
    hit): the poll object is built once, so each check is the system call alone."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._poller = poll()
        self._poller.register(fd, _EVENTS)

    def readable(self) -> bool:
        try:
            return bool(self._poller.poll(0))
        except RuntimeError:  # "concurrent poll() invocation": real threads (no gevent) share it
            return readable(self._fd)
