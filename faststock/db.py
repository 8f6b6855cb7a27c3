"""PostgreSQL access: a bounded, gevent-aware connection pool scoped to the request.

psycopg2's own pools raise `PoolError` the moment every connection is busy, which under a burst
of greenlets turns into 500s; this pool makes a request wait up to `DB_POOL_TIMEOUT` for a free
connection and then answers 503. It is built on `threading.Condition`, which gevent's monkey
patching makes cooperative, so the same code is correct under gunicorn's gevent workers and under
plain threads (tests, the CLI). Nothing connects until the first request, so a pool is always born
in the worker process, never in gunicorn's master.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any, Protocol

import click
import psycopg2
import psycopg2.errors
import psycopg2.extensions
from flask import Flask, current_app, g
from flask.cli import with_appcontext

from . import queries, realpoll
from .config import Config
from .errors import Unavailable

log = logging.getLogger("faststock.db")

Cursor = psycopg2.extensions.cursor
_IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE


class PoolTimeout(Exception):
    """Every connection stayed busy for the whole wait."""


class QueryTimeout(Exception):
    """PostgreSQL did not answer in time: a hung server never enforces its own statement_timeout."""


class PoolObserver(Protocol):
    """What a pool reports as it happens (metrics.py provides one; the pool knows nothing of
    Flask or Prometheus). Its state (`in_use`, `waiters`) is read by whoever wants it, when it
    wants it: keeping a gauge current on every acquire would cost every query."""

    def pool_waited(self, seconds: float) -> None:
        """A connection was handed out `seconds` after it was asked for."""

    def pool_timed_out(self) -> None:
        """A request for a connection gave up (none free in time, or connecting took too long)."""

    def statement_ran(self, name: str, seconds: float) -> None:
        """A statement function of queries.py took `seconds` on a cursor of this pool."""


class StatementCursor(psycopg2.extensions.cursor):
    """A cursor that gives each statement its own client-side deadline, under gevent.

    PostgreSQL's statement_timeout covers lock waits, but a hung server never enforces it; the
    client then gives up `statement_timeout + 1 s` after the statement began. Per statement, not
    per transaction: a keyed write runs five, and lock waits the server allows must not add up
    to a client timeout. When the client does give up, psycopg2 closes the connection, and the
    backend is terminated from another connection so it cannot hold its locks for the retries.
    Not through a transaction pooler: there the pooler closes the server connection the client
    left mid-statement, and the backend ends with that statement, which its statement_timeout
    (sent with every transaction, `prelude`) bounds.
    """

    deadline: float = 0.0
    # Where to end an abandoned backend from; empty through a transaction pooler, where
    # `backend_pid` names no backend of ours (PgBouncer makes one up, and its server connections
    # serve other clients between our transactions): ending it could end someone else's work.
    dsn: str = ""
    # Through a transaction pooler: sent ahead of each statement that opens a transaction, in the
    # same query, since no startup option can give the (shared) server connection its limits.
    prelude: str = ""
    # Whether the session is ours from statement to statement, so a statement PostgreSQL parsed
    # and planned once may be run again (queries.Prepared): not through a transaction pooler,
    # where the next transaction may run on another server connection.
    prepares: bool = False
    observer: PoolObserver | None = None  # queries.py times its statements through it

    def execute(self, query: Any, vars: Any = None) -> None:
        if self.prelude and self.connection.get_transaction_status() == _IDLE:
            query = self.prelude + query
        if not self.deadline or not _green():
            super().execute(query, vars)
            return
        import gevent

        expired = QueryTimeout()
        backend = self.connection.info.backend_pid if self.dsn else 0
        timer = gevent.Timeout(self.deadline, expired)
        timer.start()
        try:
            super().execute(query, vars)
        except QueryTimeout as exc:
            if exc is expired and self.dsn:
                gevent.spawn(_terminate_backend, self.dsn, backend)
            raise
        finally:
            timer.close()


def _terminate_backend(dsn: str, pid: int) -> None:
    """End the backend a timed-out statement left behind, with its locks; best effort."""
    try:
        conn = connect(dsn, statement_timeout_ms=5000, timeout=5)
    except Exception as exc:
        log.warning("could not end PostgreSQL backend %d after a timeout: %s", pid, exc)
        return
    try:
        with _deadline(6, QueryTimeout()), conn.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
        log.info("ended PostgreSQL backend %d after a client-side timeout", pid)
    except Exception as exc:
        log.warning("could not end PostgreSQL backend %d after a timeout: %s", pid, exc)
    finally:
        conn.close()


def _green() -> bool:
    return psycopg2.extensions.get_wait_callback() is not None


@contextmanager
def _deadline(seconds: float, error: Exception) -> Iterator[None]:
    """Raise `error` in this greenlet after `seconds`; without gevent, libpq's own limits apply."""
    if not _green():
        yield
        return
    import gevent

    with gevent.Timeout(seconds, error):
        yield


def make_cooperative() -> bool:
    """Route libpq's waits through gevent when gevent has patched the process.

    Without this every query blocks the whole worker's event loop: one slow query stalls
    hundreds of concurrent requests. Returns whether the green wait callback is installed.
    """
    try:
        from gevent import monkey
    except ImportError:
        return False
    if not monkey.is_module_patched("socket"):
        return False
    if psycopg2.extensions.get_wait_callback() is None:
        from psycogreen.gevent import patch_psycopg

        patch_psycopg()
    return True


def connect(
    dsn: str, *, statement_timeout_ms: int, timeout: float, pooled: bool = False
) -> psycopg2.extensions.connection:
    """Open one connection, giving up after `timeout` seconds.

    libpq's `connect_timeout` is ignored once psycogreen drives the connection asynchronously, so
    under gevent the bound comes from a gevent.Timeout instead. `pooled`: `dsn` is a transaction
    pooler, which refuses startup options (PgBouncer: "unsupported startup parameter"), and would
    apply them to no server connection if told to ignore them; the caller then sends
    statement_timeout with each transaction instead. application_name passes through.
    """
    kwargs: dict[str, Any] = {
        "connect_timeout": max(2, math.ceil(timeout)),
        "application_name": "faststock",
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
    }
    if not pooled:
        kwargs["options"] = (
            f"-c statement_timeout={statement_timeout_ms} "
            "-c idle_in_transaction_session_timeout=60000"
        )
    with _deadline(timeout, PoolTimeout("connecting to PostgreSQL timed out")):
        conn = psycopg2.connect(dsn, **kwargs)
    conn.autocommit = True
    return conn


def _server_hung_up(conn: psycopg2.extensions.connection) -> bool:
    """An idle connection with something to read has been closed by the server (a restart, an
    admin's pg_terminate_backend): checking costs one poll(2) and spares the request a 503."""
    try:
        return realpoll.readable(conn.fileno())
    except (OSError, ValueError, psycopg2.InterfaceError):
        return True


class Pool:
    """At most `size` connections per process; `acquire` waits up to `timeout` for one."""

    def __init__(
        self,
        dsn: str,
        size: int,
        timeout: float,
        statement_timeout_ms: int,
        observer: PoolObserver | None = None,
        pooled: bool = False,
    ) -> None:
        self.dsn = dsn
        self.size = size
        self.timeout = timeout
        self.statement_timeout_ms = statement_timeout_ms
        self.observer = observer
        # `dsn` is a transaction pooler (DATABASE_POOLER): see connect() and StatementCursor.
        self.pooled = pooled
        self.prelude = queries.local_statement_timeout(statement_timeout_ms) if pooled else ""
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._cond = threading.Condition(threading.Lock())
        self._idle: list[psycopg2.extensions.connection] = []
        self._open = 0
        self._waiting = 0

    @property
    def open_connections(self) -> int:
        return self._open

    @property
    def in_use(self) -> int:
        """Connections handed out (or being opened) and not yet given back."""
        return self._open - len(self._idle)

    @property
    def waiters(self) -> int:
        """Requests waiting for a connection to come free."""
        return self._waiting

    def acquire(self) -> psycopg2.extensions.connection:
        if self._pid != os.getpid():
            self._reset()
        started = time.monotonic()
        deadline = started + self.timeout
        with self._cond:
            if not self._idle and self._open >= self.size:
                self._wait(deadline)
            while self._idle:
                conn = self._idle.pop()
                if not _server_hung_up(conn):
                    self._handed_out(started)
                    return conn
                conn.close()
                self._open -= 1
            self._open += 1
        try:
            conn = connect(
                self.dsn,
                statement_timeout_ms=self.statement_timeout_ms,
                timeout=max(deadline - time.monotonic(), 0.5),
                pooled=self.pooled,
            )
        except BaseException as exc:
            if isinstance(exc, PoolTimeout) and self.observer is not None:
                self.observer.pool_timed_out()
            self._forget()
            raise
        self._handed_out(started)
        return conn

    def _wait(self, deadline: float) -> None:
        """Wait, lock held, until a connection is idle or may be opened; PoolTimeout at deadline."""
        self._waiting += 1
        try:
            while not self._idle and self._open >= self.size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if self.observer is not None:
                        self.observer.pool_timed_out()
                    raise PoolTimeout(f"no database connection free within {self.timeout:g}s")
                self._cond.wait(remaining)
        finally:
            self._waiting -= 1

    def _handed_out(self, started: float) -> None:
        if self.observer is not None:
            self.observer.pool_waited(time.monotonic() - started)

    def release(self, conn: psycopg2.extensions.connection, *, discard: bool = False) -> None:
        """Return `conn`, or close it if it failed, is closed or was left inside a transaction."""
        if self._pid != os.getpid():
            return
        idle = psycopg2.extensions.TRANSACTION_STATUS_IDLE
        if discard or conn.closed or conn.info.transaction_status != idle:
            try:
                conn.close()
            finally:
                self._forget()
            return
        with self._cond:
            self._idle.append(conn)
            self._cond.notify()

    def _forget(self) -> None:
        with self._cond:
            self._open -= 1
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            idle, self._idle = self._idle, []
            self._open -= len(idle)
        for conn in idle:
            conn.close()


def get_pool(app: Flask | None = None) -> Pool:
    return (app or current_app).extensions["faststock.db"]


def _request_connection() -> psycopg2.extensions.connection:
    conn = g.get("_db_conn")
    if conn is None:
        try:
            conn = get_pool().acquire()
        except PoolTimeout as exc:
            raise Unavailable(str(exc)) from None
        except psycopg2.OperationalError as exc:
            log.warning("cannot connect to PostgreSQL: %s", str(exc).strip())
            raise Unavailable("database unavailable") from None
        g._db_conn = conn
    return conn


def _translate(exc: Exception) -> BaseException:
    """Any database failure is the server's side, never the client's: a 503 with Retry-After.

    Every statement is parametrised and every value checked before it reaches SQL, so what
    PostgreSQL refuses is a timeout, a lost connection, a failover's read-only transaction, a
    serialization failure or deadlock, a full disk: each worth a retry. A ProgrammingError would
    be a bug in this service; it is logged with its traceback, and the client still gets a 503.
    """
    if isinstance(exc, QueryTimeout | psycopg2.errors.QueryCanceled):
        return Unavailable("database query timed out")
    if isinstance(exc, psycopg2.ProgrammingError):
        log.error("PostgreSQL refused a statement: %s", str(exc).strip(), exc_info=exc)
    else:
        log.warning("PostgreSQL error: %s", str(exc).strip())
    return Unavailable("database unavailable")


def statement_deadline(pool: Pool) -> float:
    """How long the client waits for one statement: the server's own limit, plus a margin."""
    return pool.statement_timeout_ms / 1000 + 1


def read_deadline(pool: Pool) -> float:
    """The longest a one-statement read can take: the wait for a connection (connecting, which
    is given at least 0.5 s, included) and the statement."""
    return pool.timeout + 0.5 + statement_deadline(pool)


def _cursor(conn: psycopg2.extensions.connection, pool: Pool) -> StatementCursor:
    cur = conn.cursor(cursor_factory=StatementCursor)
    cur.deadline = statement_deadline(pool)
    cur.dsn = "" if pool.pooled else pool.dsn
    cur.prelude = pool.prelude
    cur.prepares = not pool.pooled
    cur.observer = pool.observer
    return cur


@contextmanager
def cursor() -> Iterator[Cursor]:
    """A cursor on the request's connection, in autocommit: a read costs one round trip."""
    conn = _request_connection()
    try:
        with _cursor(conn, get_pool()) as cur:
            yield cur
    except (psycopg2.Error, QueryTimeout) as exc:
        g._db_broken = True
        raise _translate(exc) from exc
    except BaseException:
        g._db_broken = True
        raise


@contextmanager
def transaction() -> Iterator[Cursor]:
    """One transaction on the request's connection: committed when the block ends normally.

    Any exception rolls back by discarding the connection, which also guarantees a connection
    that raised is never handed to another request.
    """
    with cursor() as cur:
        cur.execute("BEGIN")
        yield cur
        cur.execute("COMMIT")


@contextmanager
def standalone_transaction(pool: Pool) -> Iterator[Cursor]:
    """A transaction on a pooled connection outside any request (background work).

    Errors surface as `Unavailable`, and the connection is discarded after any error.
    """
    with pooled_cursor(pool, pool.observer) as cur:
        cur.execute("BEGIN")
        yield cur
        cur.execute("COMMIT")


@contextmanager
def pooled_cursor(pool: Pool, observer: PoolObserver | None = None) -> Iterator[Cursor]:
    """An autocommit cursor on a connection of `pool` held only for the block, not for the
    request: for a replica's pool (replicas.py), whose connection a request gives back as soon
    as its read is done. Statements are timed through `observer` (the primary pool's, so they
    share its per-query histogram; the replica pool's own waits are not the primary's). Every
    failure, connecting included, is `Unavailable`; the connection is then discarded.
    """
    try:
        conn = pool.acquire()
    except (PoolTimeout, psycopg2.OperationalError) as exc:
        raise Unavailable(f"database unavailable: {str(exc).strip()}") from None
    broken = True
    try:
        with _cursor(conn, pool) as cur:
            cur.observer = observer
            yield cur
        broken = False
    except (psycopg2.Error, QueryTimeout) as exc:
        raise _translate(exc) from exc
    finally:
        pool.release(conn, discard=broken)


def _teardown(exc: BaseException | None) -> None:
    """Return the request's connection. Runs after the answer is built, so a failure here is
    logged, never raised: it would turn an answer (an acknowledged write) into a 500."""
    conn = g.pop("_db_conn", None)
    if conn is not None:
        broken = g.pop("_db_broken", False) or exc is not None
        try:
            get_pool().release(conn, discard=broken)
        except Exception:
            log.exception("returning a connection to the pool failed")


@click.command("init-db")
@with_appcontext
def init_db_command() -> None:
    """Create the schema; safe to run again, data is kept."""
    config: Config = current_app.config["FASTSTOCK"]
    init_db(config)
    click.echo("schema ready")


def init_db(config: Config) -> None:
    """Run schema.sql in one transaction under a transaction-level advisory lock, so concurrent
    runs (every instance starting at once) take turns. A session lock would outlive the
    transaction on a transaction pooler's server connection, which the next client then gets."""
    schema = resources.files("faststock").joinpath("schema.sql").read_text()
    conn = connect(
        config.database_url, statement_timeout_ms=0, timeout=10, pooled=config.behind_pooler
    )
    try:
        with conn.cursor() as cur:
            cur.execute(queries.local_statement_timeout(0) + "BEGIN")
            cur.execute("SELECT pg_advisory_xact_lock(74119)")
            cur.execute(schema)
            cur.execute("COMMIT")
    finally:
        conn.close()


def init_app(app: Flask) -> None:
    config: Config = app.config["FASTSTOCK"]
    make_cooperative()
    app.extensions["faststock.db"] = Pool(
        config.database_url,
        size=config.db_pool_size,
        timeout=config.db_pool_timeout,
        statement_timeout_ms=config.db_statement_timeout_ms,
        pooled=config.behind_pooler,
    )
    app.teardown_appcontext(_teardown)
    app.cli.add_command(init_db_command)
