"""`flask seed`: deterministic demo data, loaded with COPY so a million rows take seconds.

Product i always has the same name, price and stock, so benchmarks and tests can be compared
across machines, and seeding again inserts only the ids that are missing instead of duplicating.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

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


def _chunks(first: int, last: int, version: int) -> Iterator[tuple[int, io.StringIO]]:
    tail = f"\t{version}\n"
    for start in range(first, last + 1, CHUNK):
        end = min(start + CHUNK - 1, last)
        buf = io.StringIO()
        buf.writelines("\t".join(map(str, product_row(i))) + tail for i in range(start, end + 1))
        buf.seek(0)
        yield end - start + 1, buf


def seed(config: Config, products: int, *, reset: bool = False, if_empty: bool = False) -> int:
    """Make products 1..`products` exist; returns how many rows were inserted."""
    conn = connect(
        config.database_url, statement_timeout_ms=0, timeout=10, pooled=config.behind_pooler
    )
    try:
        with conn.cursor() as cur:
            # No limit, through a transaction pooler too (DATABASE_POOLER): COPY takes its time.
            cur.execute(queries.local_statement_timeout(0) + "BEGIN")
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
            version = queries.next_version(cur)
            with click.progressbar(length=products, label="seeding") as bar:
                for n, chunk in _chunks(1, products, version):
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
@click.option("--force", is_flag=True, help="With --reset: go on even if Redis cannot be cleared.")
def seed_command(products: int, reset: bool, if_empty: bool, force: bool) -> None:
    """Insert deterministic demo products 1..N (only those missing), then clear the Redis cache."""
    config = current_app.config["FASTSTOCK"]
    # Checked before anything is deleted: a reset the cache never hears of leaves the API
    # answering X-Cache: HIT with the old rows until their entries expire.
    if reset and not force and not Cache(config).ping():
        where, setting = _redis_where(config)
        raise click.ClickException(
            f"nothing changed: {where} does not answer, so the cache could not be cleared, and "
            f"the API would go on answering with the old products and stock (X-Cache: HIT) "
            f"until their entries expire (CACHE_TTL_SECONDS={config.cache_ttl_seconds}). Point "
            f"{setting} at the API's Redis (for scripts/up: source .run/up-PORT/env), or pass "
            f"--force to reset anyway."
        )
    inserted = seed(config, products, reset=reset, if_empty=if_empty)
    click.echo(f"inserted {inserted} products")


def _redis_where(config: Config) -> tuple[str, str]:
    """(Redis as this config finds it, the setting that says where), for error messages: under
    Sentinel REDIS_URL's address is not used, so naming it would send the reader astray."""
    if config.redis_sentinels:
        return (
            f"the Redis master {config.redis_sentinel_master} named by the sentinels at "
            f"{config.redis_sentinels} (REDIS_SENTINELS, REDIS_SENTINEL_MASTER)",
            "REDIS_SENTINELS",
        )
    return f"Redis at {_without_password(config.redis_url)} (REDIS_URL)", "REDIS_URL"


def _without_password(url: str) -> str:
    """The URL fit for an error message."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def init_app(app: Flask) -> None:
    app.cli.add_command(seed_command)
