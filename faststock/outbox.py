"""Keeps Redis honest after it missed writes: replays `cache_outbox` and closes the breaker.

Every stock change records its product in `cache_outbox` in the change's own statement, and the
writer removes the record once Redis holds the new row. A record left behind means Redis may
still serve an older entry: Redis was unreachable (a partition keeps old entries alive), the
breaker was open, or the process died between commit and cache update. One keeper per process
then writes the current rows into Redis (compare-and-set, so never over a newer one) and deletes
the records, and only after that lets requests read Redis again. It runs only while there is
something to do (woken when the breaker opens or a write could not reach Redis), except in
gunicorn workers, where it also sweeps once a second for records another process left behind.
"""

from __future__ import annotations

import logging
import os
import threading

from flask import Flask, current_app

from . import db, queries, shared
from .cache import Cache, get_cache, render
from .errors import ApiError

log = logging.getLogger("faststock.outbox")

BATCH = 500
RETRY_SECONDS = 0.25  # while Redis is out or a write is pending
SWEEP_SECONDS = 1.0  # otherwise: picks up what a crashed process or another host left


class Keeper:
    def __init__(self, cache: Cache, pool: db.Pool) -> None:
        self.cache = cache
        self.pool = pool
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._pid = 0
        self._running = False
        self._forever = False
        cache.on_trouble = self.wake

    def start(self) -> None:
        """Keep running for the life of this process (each gunicorn worker does)."""
        self._forever = True
        self.wake()

    def wake(self) -> None:
        """Make a pass run now in this process; starts the keeper thread if needed."""
        self._event.set()
        with self._lock:
            if self._pid != os.getpid():
                self._pid, self._running = os.getpid(), False
            if self._running:
                return
            self._running = True
        threading.Thread(target=self._run, name="faststock-outbox", daemon=True).start()

    def _run(self) -> None:
        try:
            while True:
                self._event.clear()
                try:
                    ok = self._pass()
                except Exception:  # a surprise must not end the keeper: it would never come back
                    log.exception("outbox keeper pass failed")
                    ok = False
                idle = ok and self.cache.usable()
                if idle and not self._forever:
                    with self._lock:
                        if not self._event.is_set():
                            self._running = False
                            return
                    continue
                self._event.wait(SWEEP_SECONDS if idle else RETRY_SECONDS)
        except BaseException:
            with self._lock:
                self._running = False
            log.exception("outbox keeper stopped")
            raise

    def _pass(self) -> bool:
        """One attempt: True when Redis has every pending write and may be read again."""
        breaker = self.cache.breaker
        if breaker.is_open and not self.cache.ping():
            return False
        seen = shared.dirty_mark()
        # After an outage, wait for rows other workers are replaying: their entries must be in
        # Redis before this worker reads it again.
        if not self.replay(wait=not self.cache.usable()):
            return False
        shared.mark_clean(seen)
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
            except ApiError as exc:
                log.info("outbox replay postponed, PostgreSQL: %s", exc.message)
                return False
            except Exception as exc:  # any Redis client failure, as in cache.py
                log.info("outbox replay postponed, Redis: %s", exc)
                return False
            if len(ids) < BATCH:
                return True


def get_keeper(app: Flask | None = None) -> Keeper:
    return (app or current_app).extensions["faststock.outbox"]


def init_app(app: Flask) -> None:
    app.extensions["faststock.outbox"] = Keeper(get_cache(app), db.get_pool(app))
