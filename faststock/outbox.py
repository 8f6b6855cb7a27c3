"""Keeps Redis honest after it missed writes: replays `cache_outbox` and closes the breaker.

Every stock change records its product in `cache_outbox` in the change's own statement, and the
writer removes the record once Redis holds the new row. A record left behind means Redis may
still serve an older entry: Redis was unreachable (a partition keeps old entries alive), the
breaker was open, or the process died between commit and cache update. One keeper per process
then writes the current rows into Redis (compare-and-set, so never over a newer one) and deletes
the records, and only after that lets requests read Redis again. It runs only while there is
something to do (woken when the breaker opens or a write could not reach Redis), except in
gunicorn workers, where it also sweeps once a second for records another process left behind.

Under Redis Sentinel it also follows the master: every pass asks Sentinel which server is master,
and a connection that met another master than the cache's wakes it. On a new master it opens
the breaker and moves the cache to the new master's epoch (cache.py: fresh key names, so no
entry the promoted replica kept from before the failover is read again), flushes this worker's
near cache, and then recovers as from any outage: replays the outbox into the new master and
only then closes the breaker.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from flask import Flask, current_app

from . import db, queries, shared
from .cache import Cache, get_cache, render
from .errors import ApiError
from .nearcache import NearCache, get_near
from .validation import BIGINT_MAX

log = logging.getLogger("faststock.outbox")

BATCH = 500
RETRY_SECONDS = 0.25  # while Redis is out or a write is pending
SWEEP_SECONDS = 1.0  # otherwise: picks up what a crashed process or another host left


class Keeper:
    """The one owner of what happens when Redis misses writes: the shared "Redis may be stale"
    flag (shared.py), the outbox replay, and closing the cache's breaker."""

    def __init__(self, cache: Cache, pool: db.Pool, near: NearCache) -> None:
        self.cache = cache
        self.pool = pool
        self.near = near
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._pid = 0
        self._running = False
        self._forever = False
        # Records left in cache_outbox after the last pass (None until counted): /readyz shows it.
        self.backlog: int | None = None
        self.on_backlog: Callable[[int], None] | None = None  # told of every count (metrics.py)
        self.on_replayed: Callable[[int], None] | None = None  # told of rows written to Redis
        # With read replicas (replicas.py): a record may be of a write that never raised Redis's
        # replay mark (its write-through failed, or its WAL position could not be read), so each
        # batch raises the mark past its records before any of them is deleted.
        self.raise_replay_mark = False

    def start(self) -> None:
        """Keep running for the life of this process (each gunicorn worker does)."""
        self._forever = True
        self.wake()

    def write_missed(self) -> None:
        """A committed change could not be written through to Redis: no worker of this host may
        read Redis until the outbox has been replayed."""
        if not shared.is_dirty():
            log.warning("a committed change missed Redis; reading PostgreSQL until it is replayed")
        shared.mark_dirty()
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
                self._count_backlog()
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
        if self.cache.follow_master():
            # A new master (Sentinel), with the breaker open: what this process holds came from
            # the old one, which may also have carried announcements it never heard.
            self.near.distrust()
        breaker = self.cache.breaker
        openings = breaker.openings
        if breaker.is_open and not self.cache.ping():
            return False
        seen = shared.dirty_mark()
        if not self.replay():
            return False
        if breaker.openings != openings:
            return False  # Redis failed again during the pass: the next one must ping first
        shared.mark_clean(seen)
        if breaker.is_open:
            breaker.close()
            log.warning("Redis answers again; pending writes replayed, cache back in use")
        self.near.heartbeat()
        return True

    def _count_backlog(self) -> None:
        """Count what is still pending after a pass, Redis up or down: a backlog that keeps
        growing is the sign an operator needs. Best effort; the last count stands meanwhile."""
        try:
            with db.standalone_transaction(self.pool) as cur:
                backlog = queries.count_outbox(cur)
        except Exception as exc:
            log.debug("outbox backlog not counted: %s", exc)
            return
        self.backlog = backlog
        if self.on_backlog is not None:
            self.on_backlog(backlog)

    def replay(self) -> bool:
        """Make Redis hold every pending change; False if PostgreSQL or Redis failed.

        Writers leave their record behind (one commit per write); most are for changes already
        written through, and are simply deleted once Redis is seen to hold their version. The
        rest are replayed: current rows written (compare-and-set) and announced, so no worker of
        any host keeps an entry it read from Redis before. No row lock is held while Redis is
        called, so a hung Redis never stalls writers. Every process replays all it finds
        (repeats are harmless), so when it finds nothing left, Redis holds every change noted
        before it looked.
        """
        while True:
            try:
                with db.standalone_transaction(self.pool) as cur:
                    pending = queries.pending_outbox(cur, BATCH)
                    # Read after the records, in the same transaction: at or past their commits.
                    mark = queries.wal_position(cur) if pending and self.raise_replay_mark else 0
                if not pending:
                    return True
                if mark:
                    self.cache.store([], mark=mark)
                ids = [pid for pid, _ in pending]
                try:
                    held = self.cache.stored_versions(ids)
                except Exception:
                    # Redis cannot say whether it has these changes (made here or on another
                    # host): no worker of this host may go on serving its own copies of them.
                    self.near.changed(ids)
                    raise
                done = [(pid, v) for (pid, v), h in zip(pending, held, strict=True) if h and h >= v]
                stale = [pid for (pid, v), h in zip(pending, held, strict=True) if not h or h < v]
                if stale:
                    # This host's workers may hold what Redis holds for these (a change made on
                    # another host while Redis was unreachable): drop it now, and again once
                    # Redis has the rows, in case a read took the old one back meanwhile.
                    self.near.changed(stale)
                    with db.standalone_transaction(self.pool) as cur:
                        rows = queries.fetch_products(cur, stale)
                    rendered = [render(row) for row in rows]
                    entries = [(pid, version, entry) for pid, version, _, entry in rendered]
                    self.cache.store(entries, announce=True)
                    if self.on_replayed is not None:
                        self.on_replayed(len(entries))
                    self.near.changed(stale)
                    stored = {pid: version for pid, version, _ in entries}
                    # A record whose product is gone (a re-seed) has nothing left to replay.
                    done += [(pid, stored.get(pid, BIGINT_MAX)) for pid in stale]
                with db.standalone_transaction(self.pool) as cur:
                    queries.outbox_replayed(cur, [pid for pid, _ in done], [v for _, v in done])
            except ApiError as exc:
                log.info("outbox replay postponed, PostgreSQL: %s", exc.message)
                return False
            except Exception as exc:  # any Redis client failure, as in cache.py
                log.info("outbox replay postponed, Redis: %s", exc)
                # Changes this host cannot learn of may be waiting: its workers' own copies go.
                self.near.distrust()
                return False
            if len(pending) < BATCH:
                return True


def get_keeper(app: Flask | None = None) -> Keeper:
    return (app or current_app).extensions["faststock.outbox"]


def init_app(app: Flask) -> None:
    app.extensions["faststock.outbox"] = Keeper(get_cache(app), db.get_pool(app), get_near(app))
