"""`flask seed`: deterministic demo data, loaded with COPY so a million rows take seconds.

Product i always has the same name, price and stock, so benchmarks and tests can be compared
across machines, and seeding again inserts only the ids that are missing instead of duplicating.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import click
from flask import Flask, current_app
from flask.cli import with_appcontext

from . import queries
from .cache import Cache
from .config import Config
from .db import connect

CHUNK = 50_000


def product_row(i: int) -> tuple[int, str, str, int]:
    """(id, name, price, stock) of product i: prices 0.50 to 999.99, stock 0 to 1000."""
    cents = 50 + (i * 7919) % 99_950
    return i, f"Product {i:06d}", f"{cents // 100}.{cents % 100:02d}", (i * 104_729) % 1001


def _chunks(first: int, last: int) -> Iterator[tuple[int, io.StringIO]]:
    for start in range(first, last + 1, CHUNK):
        end = min(start + CHUNK - 1, last)
        buf = io.StringIO()
        buf.writelines("\t".join(map(str, product_row(i))) + "\n" for i in range(start, end + 1))
        buf.seek(0)
        yield end - start + 1, buf


def seed(config: Config, products: int, *, reset: bool = False, if_empty: bool = False) -> int:
    """Make products 1..`products` exist; returns how many rows were inserted."""
    conn = connect(config.database_url, statement_timeout_ms=0, timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute("BEGIN")
            queries.lock_products(cur)
            if reset:
                queries.truncate_products(cur)
            existing = queries.count_products(cur)
            if (if_empty and existing) or products == 0:
                cur.execute("ROLLBACK")
                return 0
            fast = existing == 0
            if not fast:
                queries.create_seed_staging(cur)
            table = "products" if fast else "seed_products"
            with click.progressbar(length=products, label="seeding") as bar:
                for n, chunk in _chunks(1, products):
                    queries.copy_products(cur, chunk, table)
                    bar.update(n)
            inserted = products if fast else queries.merge_seed_staging(cur)
            queries.sync_id_sequence(cur)
            cur.execute("COMMIT")
    finally:
        conn.close()
    if inserted or reset:
        try:
            Cache(config).clear()
        except Exception as exc:  # the data is committed; a cold cache is only slower
            click.echo(f"warning: could not clear the Redis cache: {exc}", err=True)
    return inserted


@click.command("seed")
@with_appcontext
@click.option("--products", default=10_000, show_default=True, type=click.IntRange(0, 100_000_000))
@click.option("--reset", is_flag=True, help="Delete every product first.")
@click.option("--if-empty", is_flag=True, help="Do nothing unless the table is empty.")
def seed_command(products: int, reset: bool, if_empty: bool) -> None:
    """Insert deterministic demo products 1..N (only those missing)."""
    inserted = seed(current_app.config["FASTSTOCK"], products, reset=reset, if_empty=if_empty)
    click.echo(f"inserted {inserted} products")


def init_app(app: Flask) -> None:
    app.cli.add_command(seed_command)
