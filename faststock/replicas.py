"""Read replicas: cache misses of products and list pages are read from a streaming replica, but
only from one that has replayed every write acknowledged so far.

A replica lags its primary. A miss that read a lagging replica and filled Redis would put back
the row a write just replaced, wherever Redis does not hold the newer entry (it expired, was
evicted, the write-through failed, or a list page is read from the database), and nothing would
take it out again: read-your-writes would be lost. So the write path keeps a *replay mark* in
Redis (cache.py, `fs1:lsn`): a WAL position at or past the commit of every acknowledged write.
Each writer reads the primary's WAL insert position after its commit and raises the mark in the
same Lua call that writes its row through, before it answers. A miss reads the mark, then asks
its replica how far it has replayed (`pg_last_wal_replay_lsn()`): at or past the mark, the next
statement on that replica sees every acknowledged write, and the read goes there; behind it, the
read goes to the primary. The replica's answer is kept per connection (replay on a running
server only moves forward, and a restart ends the connection), so while no write comes a miss
costs the replica one statement, as on the primary.

Where the mark cannot vouch, the primary answers: Redis bypassed (this host has a write Redis
missed, or the breaker is open), no mark in Redis (first start, a flush, eviction, a new Redis
epoch: the read also sets one, from the primary), a write whose position could not be read
(that write is then treated as one Redis missed: the outbox keeper raises the mark past it,
before it deletes its record, and only then lets this host read Redis again).

A failing replica (refused, timed out, any error) is skipped for that read, which the primary
answers, and then for a back-off that doubles while it keeps failing (1 s to 16 s); after the
back-off one read tries it again. Each worker keeps its own pool and breaker per replica.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from flask import Flask, current_app

from . import db, queries
from .cache import get_cache
from .config import Config
from .errors import Unavailable

log = logging.getLogger("faststock.replicas")

T = TypeVar("T")

FIRST_BACKOFF = 1.0
MAX_BACKOFF = 16.0
# A replica is never needed: the primary can answer any read. So a replica gets little time to
# answer (to connect, for a free connection, and per statement on the server; the client adds its
# usual second), and a hung one costs the reads already on it at most about 2 s.
REPLICA_TIMEOUT = 1.0


class Replica:
    """One replica as this worker sees it: its pool, its breaker, and what each of its
    connections has been seen to have replayed."""

    def __init__(self, url: str, config: Config) -> None:
        parts = urlsplit(url)
        self.name = f"{parts.hostname or 'localhost'}:{parts.port or 5432}"  # never the password
        # Half the primary's pool: a replica connection is held for one or two short statements
        # and given back at once, not for the whole request like the primary's; writes, the
        # keeper and every read a replica cannot vouch for stay on the primary; and each of these
        # connections is a backend on the replica, times workers, times instances.
        self.pool = db.Pool(
            url,
            size=max(1, (config.db_pool_size + 1) // 2),
            timeout=min(config.db_pool_timeout, REPLICA_TIMEOUT),
            statement_timeout_ms=min(config.db_statement_timeout_ms, int(REPLICA_TIMEOUT * 1000)),
            pooled=config.behind_pooler,
        )
        self.replayed: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self.backoff = 0.0  # 0: closed
        self.retry_at = 0.0
        self._lock = threading.Lock()
        self.warned_not_replica = False

    def take_turn(self, now: float) -> tuple[bool, bool]:
        """(may be read now, as the one trial after a back-off). While a trial runs, the
        others skip the replica: its back-off clock restarts when the trial begins."""
        with self._lock:
            if not self.backoff:
                return True, False
            if now < self.retry_at:
                return False, False
            self.retry_at = now + self.backoff
            return True, True

    def failed(self, trial: bool, why: str) -> None:
        """A read on it failed: open, or after a failed trial, back off twice as long. Reads
        that were already under way when it opened fail too, and change nothing."""
        with self._lock:
            if self.backoff and not trial:
                return
            self.backoff = min(self.backoff * 2, MAX_BACKOFF) if self.backoff else FIRST_BACKOFF
            self.retry_at = time.monotonic() + self.backoff
            backoff = self.backoff
        log.warning(
            "replica %s failing (%s); reads go to the primary, retrying in %gs",
            self.name,
            why,
            backoff,
        )

    def answered(self) -> None:
        if self.backoff:
            with self._lock:
                was, self.backoff = self.backoff, 0.0
            if was:
                log.warning("replica %s answers again; reads go to it", self.name)


class Replicas:
    """This worker's replicas, taken in turn."""

    def __init__(self, config: Config, primary: db.Pool) -> None:
        self.members = [Replica(url, config) for url in config.replica_urls]
        self.primary = primary
        self._turns = itertools.count()

    def _pick(self) -> tuple[Replica, bool] | None:
        now = time.monotonic()
        start = next(self._turns)
        for k in range(len(self.members)):
            replica = self.members[(start + k) % len(self.members)]
            usable, trial = replica.take_turn(now)
            if usable:
                return replica, trial
        return None

    def attempt(self, load: Callable[[db.Cursor], T], mark: int) -> tuple[bool, T | None]:
        """(True, result) when a replica that has replayed up to `mark` ran `load`; (False,
        None) when none could (all skipped, behind, or failing): the caller reads the primary."""
        picked = self._pick()
        if picked is None:
            return False, None
        replica, trial = picked
        try:
            # Timed under the primary pool's observer: one histogram per statement name.
            with db.pooled_cursor(replica.pool, self.primary.observer) as cur:
                conn = cur.connection
                if replica.replayed.get(conn, 0) < mark:
                    position = queries.replay_position(cur)
                    if position is None:
                        self._not_a_replica(replica)
                        return False, None
                    replica.replayed[conn] = position
                    if position < mark:
                        replica.answered()  # behind, not broken
                        return False, None
                result = load(cur)
        except Unavailable as exc:
            replica.failed(trial, exc.message)
            return False, None
        replica.answered()
        return True, result

    @staticmethod
    def _not_a_replica(replica: Replica) -> None:
        """A server that replays nothing (a primary, or a promoted replica, whose history may
        have forked from DATABASE_URL's) can never be shown to hold every write: never read."""
        replica.answered()
        if not replica.warned_not_replica:
            replica.warned_not_replica = True
            log.warning(
                "%s in DATABASE_REPLICA_URLS is not a replica (it replays no WAL); "
                "reads go to the primary",
                replica.name,
            )


def get_replicas(app: Flask | None = None) -> Replicas:
    return (app or current_app).extensions["faststock.replicas"]


def enabled() -> bool:
    return bool(get_replicas().members)


def added_seconds() -> float:
    """The most a read can spend on the mark and the replicas before the primary answers it: the
    mark's Redis read, then a replica's connection and two statements (its position, the read),
    or, with no mark, the primary's position and the Redis call that sets it."""
    replicas = get_replicas()
    if not replicas.members:
        return 0.0
    redis_timeout = current_app.config["FASTSTOCK"].redis_timeout_ms / 1000
    pool = replicas.members[0].pool
    on_replica = db.read_deadline(pool) + db.statement_deadline(pool)
    return 2 * redis_timeout + max(on_replica, db.statement_deadline(replicas.primary))


def read(load: Callable[[db.Cursor], T], *, replica: bool) -> T:
    """`load` (statements of queries.py) on a replica that provably has every acknowledged
    write, else on the primary. `replica`: the read is a cache miss with Redis in use (the mark
    lives there); anything else reads the primary."""
    replicas = get_replicas()
    if replica and replicas.members:
        cache = get_cache()
        mark = cache.replay_mark()
        if mark:
            done, result = replicas.attempt(load, mark)
            if done:
                return result  # type: ignore[return-value]
        elif mark == 0:
            return _read_and_mark(load)
    with db.cursor() as cur:
        return load(cur)


def _read_and_mark(load: Callable[[db.Cursor], T]) -> T:
    """Read the primary, and set the missing mark to where its WAL ends now: every write
    acknowledged so far committed before that. A mark set later by a writer is only higher."""
    with db.cursor() as cur:
        result = load(cur)
    try:
        with db.cursor() as cur:
            position = queries.wal_position(cur)
    except Unavailable:
        return result
    get_cache().fill([], mark=position)
    return result


def written_position() -> int | None:
    """For a writer, after its commit and before its write-through: the primary's WAL position
    now, to raise the mark with. None without replicas, or when it could not be read (the
    caller must then treat its write as one Redis missed). Never raises: the write has
    committed, and must be acknowledged."""
    if not enabled():
        return None
    try:
        with db.cursor() as cur:
            return queries.wal_position(cur)
    except Unavailable:
        return None


def init_app(app: Flask) -> None:
    from .outbox import get_keeper

    config: Config = app.config["FASTSTOCK"]
    replicas = Replicas(config, db.get_pool(app))
    app.extensions["faststock.replicas"] = replicas
    # Outbox records may be of writes that never raised the mark: the keeper raises it past them
    # before deleting them.
    get_keeper(app).raise_replay_mark = bool(replicas.members)
