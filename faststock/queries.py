"""Every SQL statement the service runs, each named for what it does.

Parametrised only: values never reach SQL text. Rows come back as tuples in `PRODUCT_COLUMNS`
order; the price is rendered by PostgreSQL as text so it keeps exactly its two decimals. Each
function is timed under its own name when its cursor carries an observer (db.py's cursors carry
their pool's, which metrics.py provides): the one place statement durations are measured.
"""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

from psycopg2.extensions import cursor as Cursor

PRODUCT_COLUMNS = "id, name, price::text, stock, version, updated_at"

ProductRow = tuple[int, str, str, int, int, Any]

P = ParamSpec("P")
R = TypeVar("R")


def statement(function: Callable[Concatenate[Cursor, P], R]) -> Callable[Concatenate[Cursor, P], R]:
    """Time `function` (failures too) when its cursor has an observer; a getattr otherwise."""
    name = function.__name__

    @functools.wraps(function)
    def timed(cur: Cursor, *args: P.args, **kwargs: P.kwargs) -> R:
        observer = getattr(cur, "observer", None)
        if observer is None:
            return function(cur, *args, **kwargs)
        started = time.perf_counter()
        try:
            return function(cur, *args, **kwargs)
        finally:
            observer.statement_ran(name, time.perf_counter() - started)

    return timed


def local_statement_timeout(milliseconds: int) -> str:
    """The text db.py puts in front of a statement that opens a transaction when DATABASE_URL
    is a transaction pooler: the limit then holds for that transaction only, on whichever server
    connection runs it, and costs no round trip of its own (one simple query, several
    statements, one implicit transaction)."""
    return f"SET LOCAL statement_timeout = {int(milliseconds)}; "


class Prepared:
    """A statement PostgreSQL parses and plans once per connection, then only executes.

    Sent as text, a statement is parsed and planned on every run: that was a third of the
    database's CPU time a stock change (one long statement, the update and its outbox record),
    and half of a miss's primary-key read or a keyed write's claim (docs/performance.md).
    `template` holds `{name}` where each parameter goes.
    Prepared on a connection's first use, and only where the session is ours from one
    statement to the next (`prepares` on db.py's cursors): through a transaction pooler, or on
    any other cursor, the same statement is sent as text. PREPARE is not transactional, so a
    statement prepared in a transaction that rolls back stays prepared, as recorded.
    """

    def __init__(self, name: str, template: str, parameters: Sequence[tuple[str, str]]) -> None:
        names = [parameter for parameter, _ in parameters]
        self.text = template.format(**{n: f"%({n})s" for n in names})
        numbered = template.format(**{n: f"${i}" for i, n in enumerate(names, 1)})
        types = ", ".join(pg_type for _, pg_type in parameters)
        self.prepare = f"PREPARE {name} ({types}) AS {numbered}"
        self.execute = f"EXECUTE {name} ({', '.join(f'%({n})s' for n in names)})"
        # The connections it is prepared on; held weakly, so a closed one is forgotten with it.
        self._prepared_on: weakref.WeakSet[Any] = weakref.WeakSet()

    def run(self, cur: Cursor, values: dict[str, Any]) -> None:
        if not getattr(cur, "prepares", False):
            cur.execute(self.text, values)
            return
        conn = cur.connection
        if conn not in self._prepared_on:
            cur.execute(self.prepare)
            self._prepared_on.add(conn)
        cur.execute(self.execute, values)


@statement
def ping(cur: Cursor) -> None:
    cur.execute("SELECT 1")
    cur.fetchone()


_FETCH_PRODUCT = Prepared(
    "faststock_fetch_product",
    f"SELECT {PRODUCT_COLUMNS} FROM products WHERE id = {{id}}",
    (("id", "bigint"),),
)


@statement
def fetch_product(cur: Cursor, product_id: int) -> ProductRow | None:
    _FETCH_PRODUCT.run(cur, {"id": product_id})
    return cur.fetchone()


@statement
def fetch_products(cur: Cursor, ids: Sequence[int]) -> list[ProductRow]:
    cur.execute(f"SELECT {PRODUCT_COLUMNS} FROM products WHERE id = ANY(%s)", (list(ids),))
    return cur.fetchall()


_FETCH_PAGE = Prepared(
    "faststock_fetch_page",
    f"SELECT {PRODUCT_COLUMNS} FROM products ORDER BY id LIMIT {{limit}} OFFSET {{offset}}",
    (("limit", "bigint"), ("offset", "bigint")),
)


@statement
def fetch_page(cur: Cursor, limit: int, offset: int) -> list[ProductRow]:
    _FETCH_PAGE.run(cur, {"limit": limit, "offset": offset})
    return cur.fetchall()


@statement
def wal_position(cur: Cursor) -> int:
    """On the primary: where its WAL ends now, as a byte position. Read after a commit, it is at
    or past that commit's record whatever `synchronous_commit` says (the insert position, not the
    written or flushed one), so a replica that has replayed this far has the commit."""
    cur.execute("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn")
    return int(cur.fetchone()[0])


@statement
def replay_position(cur: Cursor) -> int | None:
    """On a replica: how far it has replayed the primary's WAL (None: not a replica). Every
    statement that starts after this one sees every commit up to there."""
    cur.execute("SELECT pg_last_wal_replay_lsn() - '0/0'::pg_lsn")
    value = cur.fetchone()[0]
    return None if value is None else int(value)


# Every stock change records its product in cache_outbox in the same statement, so the change
# and the note that Redis must learn of it commit (or fail) together.
_CHANGE_WITH_OUTBOX = f"""
    WITH changed AS ({{update}} RETURNING {PRODUCT_COLUMNS}),
    noted AS (
        INSERT INTO cache_outbox (product_id, version) SELECT id, version FROM changed
        ON CONFLICT (product_id) DO UPDATE
            SET version = EXCLUDED.version, created_at = now()
    )
    SELECT * FROM changed
"""

_SET_STOCK = Prepared(
    "faststock_set_stock",
    _CHANGE_WITH_OUTBOX.format(
        update="UPDATE products SET stock = {stock}, version = nextval('product_versions'), "
        "updated_at = now() WHERE id = {id}"
    ),
    (("id", "bigint"), ("stock", "integer")),
)
_ADD_STOCK = Prepared(
    "faststock_add_stock",
    _CHANGE_WITH_OUTBOX.format(
        update="UPDATE products SET stock = stock + {delta}, "
        "version = nextval('product_versions'), "
        "updated_at = now() "
        "WHERE id = {id} AND stock::bigint + {delta} BETWEEN 0 AND 2147483647"
    ),
    (("id", "bigint"), ("delta", "integer")),
)


@statement
def set_stock(cur: Cursor, product_id: int, stock: int) -> ProductRow | None:
    _SET_STOCK.run(cur, {"id": product_id, "stock": stock})
    return cur.fetchone()


@statement
def add_stock(cur: Cursor, product_id: int, delta: int) -> ProductRow | None:
    """Atomically add `delta`; no row when the product is absent or the result leaves 0..2^31-1."""
    _ADD_STOCK.run(cur, {"id": product_id, "delta": delta})
    return cur.fetchone()


_FETCH_STOCK = Prepared(
    "faststock_fetch_stock", "SELECT stock FROM products WHERE id = {id}", (("id", "bigint"),)
)


@statement
def fetch_stock(cur: Cursor, product_id: int) -> int | None:
    _FETCH_STOCK.run(cur, {"id": product_id})
    row = cur.fetchone()
    return None if row is None else row[0]


IDEMPOTENCY_TTL = "24 hours"


_CLAIM_KEY = Prepared(
    "faststock_claim_key",
    f"""
    WITH expired AS (
        DELETE FROM idempotency_keys WHERE (client, key) IN (
            SELECT client, key FROM idempotency_keys
            WHERE created_at < now() - interval '{IDEMPOTENCY_TTL}'
                AND (client, key) <> ({{client}}, {{key}})
            ORDER BY created_at LIMIT 20 FOR UPDATE SKIP LOCKED
        )
    )
    INSERT INTO idempotency_keys AS k (client, key, fingerprint, status, body)
    VALUES ({{client}}, {{key}}, {{fingerprint}}, 0, '')
    ON CONFLICT (client, key) DO UPDATE
        SET fingerprint = EXCLUDED.fingerprint, status = 0, body = '', created_at = now()
        WHERE k.created_at < now() - interval '{IDEMPOTENCY_TTL}'
    RETURNING 1
    """,
    (("client", "text"), ("key", "text"), ("fingerprint", "bytea")),
)


@statement
def claim_idempotency_key(cur: Cursor, client: str, key: str, fingerprint: bytes) -> bool:
    """Reserve `key` in `client`'s scope (an API key name; '' for anonymous writes) for this
    transaction; False when a live (under 24 h) record already has it.

    A concurrent transaction holding the same key makes this wait until it commits (then False)
    or rolls back (then True). Each call also deletes a few expired keys, so the table stays
    bounded without a cron job.
    """
    _CLAIM_KEY.run(cur, {"client": client, "key": key, "fingerprint": fingerprint})
    return cur.fetchone() is not None


_FETCH_KEY = Prepared(
    "faststock_fetch_key",
    "SELECT fingerprint, status, body FROM idempotency_keys "
    "WHERE client = {client} AND key = {key}",
    (("client", "text"), ("key", "text")),
)


@statement
def fetch_idempotency_record(cur: Cursor, client: str, key: str) -> tuple[bytes, int, bytes] | None:
    """(fingerprint, status, body) stored for `key` in `client`'s scope."""
    _FETCH_KEY.run(cur, {"client": client, "key": key})
    row = cur.fetchone()
    return None if row is None else (bytes(row[0]), row[1], bytes(row[2]))


_STORE_ANSWER = Prepared(
    "faststock_store_answer",
    "UPDATE idempotency_keys SET status = {status}, body = {body} "
    "WHERE client = {client} AND key = {key}",
    (("status", "smallint"), ("body", "bytea"), ("client", "text"), ("key", "text")),
)


@statement
def store_idempotent_answer(cur: Cursor, client: str, key: str, status: int, body: bytes) -> None:
    _STORE_ANSWER.run(cur, {"status": status, "body": body, "client": client, "key": key})


@statement
def pending_outbox(cur: Cursor, limit: int) -> list[tuple[int, int]]:
    """Up to `limit` (product id, version) records of changes Redis may not hold yet. No lock is
    taken: the keeper talks to Redis between this and `outbox_replayed`, and a lock held across
    a Redis timeout would stall every writer of those products."""
    cur.execute(
        "SELECT product_id, version FROM cache_outbox ORDER BY product_id LIMIT %s", (limit,)
    )
    return cur.fetchall()


@statement
def count_outbox(cur: Cursor) -> int:
    """Records in cache_outbox: changes Redis may not hold yet (the keeper's backlog)."""
    cur.execute("SELECT count(*) FROM cache_outbox")
    return cur.fetchone()[0]


@statement
def outbox_replayed(cur: Cursor, ids: Sequence[int], versions: Sequence[int]) -> None:
    """Redis holds `versions[i]` (or newer) of `ids[i]`: drop their records, except where a
    change committed since has noted a newer version."""
    cur.execute(
        "DELETE FROM cache_outbox o USING unnest(%s::bigint[], %s::bigint[]) AS r(id, version) "
        "WHERE o.product_id = r.id AND o.version <= r.version",
        (list(ids), list(versions)),
    )


@statement
def count_products(cur: Cursor) -> int:
    cur.execute("SELECT count(*) FROM products")
    return cur.fetchone()[0]


@statement
def lock_products(cur: Cursor) -> None:
    """Serialises seeders: two concurrent `seed` runs must not both insert the same ids."""
    cur.execute("LOCK TABLE products IN SHARE ROW EXCLUSIVE MODE")


@statement
def truncate_products(cur: Cursor) -> None:
    cur.execute("TRUNCATE products, idempotency_keys, cache_outbox RESTART IDENTITY")


@statement
def create_seed_staging(cur: Cursor) -> None:
    cur.execute("CREATE TEMP TABLE seed_products (LIKE products INCLUDING DEFAULTS) ON COMMIT DROP")


@statement
def next_version(cur: Cursor) -> int:
    """A version newer than every one handed out before (one per seed, shared by its rows)."""
    cur.execute("SELECT nextval('product_versions')")
    return cur.fetchone()[0]


@statement
def copy_products(cur: Cursor, data: Any, table: str = "products") -> None:
    """COPY rows of `id, name, price, stock, version` (tab-separated text) into `table`."""
    if table not in ("products", "seed_products"):
        raise ValueError(table)
    cur.copy_expert(f"COPY {table} (id, name, price, stock, version) FROM STDIN", data)


@statement
def merge_seed_staging(cur: Cursor) -> int:
    cur.execute(
        "INSERT INTO products (id, name, price, stock, version) "
        "SELECT id, name, price, stock, version FROM seed_products ON CONFLICT (id) DO NOTHING"
    )
    return cur.rowcount


@statement
def sync_id_sequence(cur: Cursor) -> None:
    """Explicit ids bypass the identity sequence; move it past them so later inserts don't clash."""
    cur.execute(
        "SELECT setval(pg_get_serial_sequence('products', 'id'), "
        "GREATEST((SELECT max(id) FROM products), 1))"
    )
