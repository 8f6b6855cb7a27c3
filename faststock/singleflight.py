"""Collapses concurrent identical loads in one process into one: the others wait for it.

When a hot key expires, hundreds of greenlets miss at once; without this each would run the same
query. Waiters are bounded by `timeout` and then answer 503 rather than pile up. The instance
lives in `app.extensions`, like the pool and the cache, so each app (and each test) has its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from flask import Flask, current_app

from .errors import ApiError, Unavailable

T = TypeVar("T")


class SingleFlight:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[object, _Call] = {}
        self.finished = 0  # loads completed in this process, of any key

    def finished_since(self, seen: int) -> bool:
        """Whether a load completed since `finished` was `seen`: one that began before a caller
        looked in the cache may have filled it after, so the caller should look again before
        loading (it arrived too late to join that load)."""
        return self.finished != seen

    def do(self, key: object, load: Callable[[], T], timeout: float) -> tuple[T, bool]:
        """(result, shared): `shared` is True when the result came from another caller's load,
        which may have read the database before this caller started."""
        with self._lock:
            call = self._calls.get(key)
            leader = call is None
            if leader:
                call = self._calls[key] = _Call()
        if not leader:
            call.waiters += 1
            if not call.done.wait(timeout):
                raise Unavailable("timed out waiting for the database")
            if call.error is not None:
                raise call.error
            return call.result, True
        try:
            call.result = load()
        except ApiError as exc:
            call.error = exc
            raise
        except BaseException:
            call.error = Unavailable("database unavailable")
            raise
        finally:
            with self._lock:
                del self._calls[key]
                self.finished += 1
            call.done.set()
        return call.result, False

    def waiters(self, key: object) -> int:
        """How many callers are waiting on the load of `key` now (for tests and debugging)."""
        call = self._calls.get(key)
        return 0 if call is None else call.waiters


class _Call:
    __slots__ = ("done", "error", "result", "waiters")

    def __init__(self) -> None:
        self.waiters = 0
        self.done = threading.Event()
        self.result: object = None
        self.error: ApiError | None = None


def get_flight(app: Flask | None = None) -> SingleFlight:
    return (app or current_app).extensions["faststock.singleflight"]


def init_app(app: Flask) -> None:
    app.extensions["faststock.singleflight"] = SingleFlight()
