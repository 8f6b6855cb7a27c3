"""Every SQL statement the service runs, each named for what it does.

Parametrised only: values never reach SQL text. Rows come back as tuples in `PRODUCT_COLUMNS`
order; the price is rendered by PostgreSQL as text so it keeps exactly its two decimals.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg2.extensions import cursor as Cursor

PRODUCT_COLUMNS = "id, name, price::text, stock, version, updated_at"

ProductRow = tuple[int, str, str, int, int, Any]


def ping(cur: Cursor) -> None:
    cur.execute("SELECT 1")
    cur.fetchone()


def fetch_product(cur: Cursor, product_id: int) -> ProductRow | None:
    cur.execute(f"SELECT {PRODUCT_COLUMNS} FROM products WHERE id = %s", (product_id,))
    return cur.fetchone()


def fetch_products(cur: Cursor, ids: Sequence[int]) -> list[ProductRow]:
    cur.execute(f"SELECT {PRODUCT_COLUMNS} FROM products WHERE id = ANY(%s)", (list(ids),))
    return cur.fetchall()


def fetch_page(cur: Cursor, limit: int, offset: int) -> list[ProductRow]:
    cur.execute(
        f"SELECT {PRODUCT_COLUMNS} FROM products ORDER BY id LIMIT %s OFFSET %s", (limit, offset)
    )
    return cur.fetchall()


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


def set_stock(cur: Cursor, product_id: int, stock: int) -> ProductRow | None:
    cur.execute(
        _CHANGE_WITH_OUTBOX.format(
            update="UPDATE products SET stock = %(stock)s, version = nextval('product_versions'), "
            "updated_at = now() WHERE id = %(id)s"
        ),
        {"id": product_id, "stock": stock},
    )
    return cur.fetchone()


def add_stock(cur: Cursor, product_id: int, delta: int) -> ProductRow | None:
    """Atomically add `delta`; no row when the product is absent or the result leaves 0..2^31-1."""
    cur.execute(
        _CHANGE_WITH_OUTBOX.format(
            update="UPDATE products SET stock = stock + %(delta)s, "
            "version = nextval('product_versions'), "
            "updated_at = now() "
            "WHERE id = %(id)s AND stock::bigint + %(delta)s BETWEEN 0 AND 2147483647"
        ),
        {"id": product_id, "delta": delta},
    )
    return cur.fetchone()


def fetch_stock(cur: Cursor, product_id: int) -> int | None:
    cur.execute("SELECT stock FROM products WHERE id = %s", (product_id,))
    row = cur.fetchone()
    return None if row is None else row[0]


IDEMPOTENCY_TTL = "24 hours"


def claim_idempotency_key(cur: Cursor, key: str, fingerprint: bytes) -> bool:
    """Reserve `key` for this transaction; False when a live (under 24 h) record already has it.

    A concurrent transaction holding the same key makes this wait until it commits (then False)
    or rolls back (then True). Each call also deletes a few expired keys, so the table stays
    bounded without a cron job.
    """
    cur.execute(
        f"""
        WITH expired AS (
            DELETE FROM idempotency_keys WHERE key IN (
                SELECT key FROM idempotency_keys
                WHERE created_at < now() - interval '{IDEMPOTENCY_TTL}' AND key <> %(key)s
                ORDER BY created_at LIMIT 20 FOR UPDATE SKIP LOCKED
            )
        )
        INSERT INTO idempotency_keys AS k (key, fingerprint, status, body)
        VALUES (%(key)s, %(fingerprint)s, 0, '')
        ON CONFLICT (key) DO UPDATE
            SET fingerprint = EXCLUDED.fingerprint, status = 0, body = '', created_at = now()
            WHERE k.created_at < now() - interval '{IDEMPOTENCY_TTL}'
        RETURNING 1
        """,
        {"key": key, "fingerprint": fingerprint},
    )
    return cur.fetchone() is not None


def fetch_idempotency_record(cur: Cursor, key: str) -> tuple[bytes, int, bytes] | None:
    """(fingerprint, status, body) stored for `key`."""
    cur.execute("SELECT fingerprint, status, body FROM idempotency_keys WHERE key = %s", (key,))
    row = cur.fetchone()
    return None if row is None else (bytes(row[0]), row[1], bytes(row[2]))


def store_idempotent_answer(cur: Cursor, key: str, status: int, body: bytes) -> None:
    cur.execute(
        "UPDATE idempotency_keys SET status = %s, body = %s WHERE key = %s", (status, body, key)
    )


def pending_outbox(cur: Cursor, limit: int) -> list[tuple[int, int]]:
    """Up to `limit` (product id, version) records of changes Redis may not hold yet. No lock is
    taken: the keeper talks to Redis between this and `outbox_replayed`, and a lock held across
    a Redis timeout would stall every writer of those products."""
    cur.execute(
        "SELECT product_id, version FROM cache_outbox ORDER BY product_id LIMIT %s", (limit,)
    )
    return cur.fetchall()


def outbox_replayed(cur: Cursor, ids: Sequence[int], versions: Sequence[int]) -> None:
    """Redis holds `versions[i]` (or newer) of `ids[i]`: drop their records, except where a
    change committed since has noted a newer version."""
    cur.execute(
        "DELETE FROM cache_outbox o USING unnest(%s::bigint[], %s::bigint[]) AS r(id, version) "
        "WHERE o.product_id = r.id AND o.version <= r.version",
        (list(ids), list(versions)),
    )


def count_products(cur: Cursor) -> int:
    cur.execute("SELECT count(*) FROM products")
    return cur.fetchone()[0]


def lock_products(cur: Cursor) -> None:
    """Serialises seeders: two concurrent `seed` runs must not both insert the same ids."""
    cur.execute("LOCK TABLE products IN SHARE ROW EXCLUSIVE MODE")


def truncate_products(cur: Cursor) -> None:
    cur.execute("TRUNCATE products, idempotency_keys, cache_outbox RESTART IDENTITY")


def create_seed_staging(cur: Cursor) -> None:
    cur.execute("CREATE TEMP TABLE seed_products (LIKE products INCLUDING DEFAULTS) ON COMMIT DROP")


def next_version(cur: Cursor) -> int:
    """A version newer than every one handed out before (one per seed, shared by its rows)."""
    cur.execute("SELECT nextval('product_versions')")
    return cur.fetchone()[0]


def copy_products(cur: Cursor, data: Any, table: str = "products") -> None:
    """COPY rows of `id, name, price, stock, version` (tab-separated text) into `table`."""
    if table not in ("products", "seed_products"):
        raise ValueError(table)
    cur.copy_expert(f"COPY {table} (id, name, price, stock, version) FROM STDIN", data)


def merge_seed_staging(cur: Cursor) -> int:
    cur.execute(
        "INSERT INTO products (id, name, price, stock, version) "
        "SELECT id, name, price, stock, version FROM seed_products ON CONFLICT (id) DO NOTHING"
    )
    return cur.rowcount


def sync_id_sequence(cur: Cursor) -> None:
    """Explicit ids bypass the identity sequence; move it past them so later inserts don't clash."""
    cur.execute(
        "SELECT setval(pg_get_serial_sequence('products', 'id'), "
        "GREATEST((SELECT max(id) FROM products), 1))"
    )
