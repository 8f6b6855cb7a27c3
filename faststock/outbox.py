"""Keeps Redis honest after it missed writes: replays `cache_outbox` and closes the breaker.

Every stock change records its product in `cache_outbox` in the change's own statement, and the
writer removes the record once Redis holds the new row. A record left behind means Redis may
still serve an older entry: Redis was unreachable (a partition keeps old entries alive), the
breaker was open, or the process died between commit and cache update. One keeper per process
then writes the current rows into Redis (compare-and-set, so never over a newer one) and deletes
the records, and only after that lets requests read Redis again. It runs only while there is
something to do: it is woken when the breaker opens, when a write could not reach Redis, and
once when a worker starts (to pick up what a previous process left).
"""

from __future__ import annotations

import logging
import os
import threading
import time

import redis
from flask import Flask, current_app

from . import db, queries
from .cache import Cache, render
from .errors import ApiError

log = logging.getLogger("faststock.outbox")

BATCH = 500
RETRY_SECONDS = 0.25


class Keeper:
    def __init__(self, cache: Cache, pool: db.Pool) -> None:
        self.cache = cache
        self.pool = pool
        self._lock = threading.Lock()
        self._pid = 0
        self._running = False
        self._again = False
        cache.on_trouble = self.wake

    def wake(self) -> None:
        """Make sure a keeper pass runs soon in this process (idempotent, never blocks)."""
        with self._lock:
            if self._pid != os.getpid():
                self._pid, self._running = os.getpid(), False
            self._again = True
            if self._running:
                return
            self._running = True
        threading.Thread(target=self._run, name="faststock-outbox", daemon=True).start()

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if not self._again:
                        self._running = False
                        return
                    self._again = False
                if not self._pass():
                    with self._lock:
                        self._again = True
                    time.sleep(RETRY_SECONDS)
        except BaseException:
            with self._lock:
                self._running = False
            log.exception("outbox keeper stopped")
            raise

    def _pass(self) -> bool:
        """One attempt: True when Redis has every pending write and the breaker may be closed."""
        breaker = self.cache.breaker
        if breaker.is_open and not self.cache.ping():
            return False
        # After an outage wait for rows other workers are replaying: their entries must be in
        # Redis before this worker reads it again.
        if not self.replay(wait=breaker.is_open):
            return False
        if breaker.is_open:
            breaker.close()
            log.warning("Redis answers again; pending writes replayed, cache back in use")
        return True

    def replay(self, *, wait: bool) -> bool:
        """Write every pending product's current row into Redis; False if either store failed."""
        while True:
            try:
                with db.standalone_transaction(self.pool) as cur:
                    ids = queries.claim_outbox(cur, BATCH, wait=wait)
                    if ids:
                        rows = queries.fetch_products(cur, ids)
                        self.cache.store(
                            [(pid, v, entry) for pid, v, _, entry in map(render, rows)]
                        )
                        queries.clear_outbox(cur, ids)
            except (ApiError, redis.RedisError) as exc:
                log.info("outbox replay postponed: %s", exc)
                return False
            if len(ids) < BATCH:
                return True


def get_keeper(app: Flask | None = None) -> Keeper:
    return (app or current_app).extensions["faststock.outbox"]


def init_app(app: Flask) -> None:
    from .cache import get_cache

    app.extensions["faststock.outbox"] = Keeper(get_cache(app), db.get_pool(app))
