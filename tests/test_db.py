"""The pool, the schema and the seed command, against real PostgreSQL."""

from __future__ import annotations

import os
import pty
import subprocess
import threading

import psycopg2
import pytest

from faststock.config import Config
from faststock.db import Pool, PoolTimeout, init_db
from faststock.seed import product_row, seed
from tests.servers import BIN, ROOT


@pytest.fixture
def pool(config: Config):
    p = Pool(config.database_url, size=2, timeout=0.3, statement_timeout_ms=250)
    yield p
    p.close()


def test_pool_reuses_connections(pool):
    first = pool.acquire()
    pool.release(first)
    assert pool.acquire() is first
    assert pool.open_connections == 1


def test_pool_waits_then_times_out(pool):
    a, b = pool.acquire(), pool.acquire()
    with pytest.raises(PoolTimeout):
        pool.acquire()
    pool.release(a)
    assert pool.acquire() is a
    pool.release(b)


def test_waiter_gets_a_released_connection(pool):
    a, b = pool.acquire(), pool.acquire()
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire()))
    waiter.start()
    pool.release(b)
    waiter.join(5)
    assert got == [b]
    pool.release(a)


def test_failed_connection_is_discarded(pool):
    conn = pool.acquire()
    pool.release(conn, discard=True)
    assert conn.closed
    assert pool.open_connections == 0
    assert pool.acquire() is not conn


def test_connection_left_in_a_transaction_is_discarded(pool):
    conn = pool.acquire()
    with conn.cursor() as cur:
        cur.execute("BEGIN")
        cur.execute("SELECT 1")
    pool.release(conn)
    assert conn.closed
    assert pool.open_connections == 0


def test_connections_have_a_statement_timeout(pool):
    conn = pool.acquire()
    with conn.cursor() as cur:
        cur.execute("SHOW statement_timeout")
        assert cur.fetchone()[0] == "250ms"
        with pytest.raises(psycopg2.errors.QueryCanceled):
            cur.execute("SELECT pg_sleep(2)")
    pool.release(conn, discard=True)


def test_unreachable_server_fails_fast(config):
    bad = Pool("postgresql://x@127.0.0.1:1/x", size=1, timeout=0.5, statement_timeout_ms=100)
    with pytest.raises(psycopg2.OperationalError):
        bad.acquire()
    assert bad.open_connections == 0


def test_init_db_twice_keeps_data(fresh, sql):
    init_db(fresh)
    init_db(fresh)
    assert sql("SELECT count(*) FROM products") == [(100,)]


def test_schema_constraints(sql):
    with pytest.raises(psycopg2.errors.CheckViolation):
        sql("UPDATE products SET stock = -1 WHERE id = 1")
    with pytest.raises(psycopg2.errors.CheckViolation):
        sql("UPDATE products SET price = -0.01 WHERE id = 1")


def test_seed_is_deterministic(fresh, sql):
    rows = sql("SELECT id, name, price::text, stock FROM products WHERE id IN (1, 42, 100)")
    assert rows == [product_row(1), product_row(42), product_row(100)]
    assert product_row(42)[1] == "Product 000042"


def test_seed_values_stay_in_range():
    rows = [product_row(i) for i in range(1, 200_001)]
    prices = [float(r[2]) for r in rows]
    stocks = [r[3] for r in rows]
    assert min(prices) >= 0.5 and max(prices) <= 999.99
    assert min(stocks) == 0 and max(stocks) == 1000


def test_seed_twice_does_not_duplicate(fresh, sql):
    assert seed(fresh, 100) == 0
    assert seed(fresh, 150) == 50
    assert sql("SELECT count(*), count(DISTINCT name), max(id) FROM products") == [(150, 150, 150)]


def test_seed_keeps_changed_rows_and_fills_gaps(fresh, sql):
    sql("UPDATE products SET stock = 1 WHERE id = 10")
    sql("DELETE FROM products WHERE id = 20")
    assert seed(fresh, 100) == 1
    assert sql("SELECT stock FROM products WHERE id = 10") == [(1,)]
    assert sql("SELECT name FROM products WHERE id = 20") == [("Product 000020",)]


def test_seed_reset_and_if_empty(fresh, sql):
    sql("UPDATE products SET stock = 1 WHERE id = 10")
    assert seed(fresh, 30, reset=True) == 30
    assert sql("SELECT count(*), max(stock) FILTER (WHERE id = 10) FROM products") == [
        (30, product_row(10)[3])
    ]
    assert seed(fresh, 50, if_empty=True) == 0
    assert sql("SELECT count(*) FROM products") == [(30,)]


def test_ids_continue_after_seed(fresh, sql):
    new_id = sql("INSERT INTO products (name, price, stock) VALUES ('x', 1, 1) RETURNING id")
    assert new_id == [(101,)]


def test_seed_cli_with_progress(fresh, make_app, sql):
    runner = make_app().test_cli_runner()
    result = runner.invoke(args=["seed", "--products", "120"])
    assert result.exit_code == 0, result.output
    assert "inserted 20 products" in result.output
    result = runner.invoke(args=["seed", "--products", "5", "--reset"])
    assert "inserted 5 products" in result.output
    assert sql("SELECT count(*) FROM products") == [(5,)]
    assert runner.invoke(args=["init-db"]).exit_code == 0


def test_seed_reset_clears_cache(client, fresh):
    client.get("/api/products/1")
    client.post("/api/products/1/update-stock", json={"stock": 999_999})
    seed(fresh, 100, reset=True)
    assert client.get("/api/products/1").get_json()["stock"] == product_row(1)[3]


def test_seed_shows_a_progress_bar_on_a_terminal(fresh):
    """Only on a terminal: run the real CLI with a pseudo-terminal as its output."""
    main, secondary = pty.openpty()
    env = {**os.environ, "DATABASE_URL": fresh.database_url, "REDIS_URL": fresh.redis_url}
    proc = subprocess.run(
        [str(BIN / "flask"), "--app", "faststock", "seed", "--products", "100", "--reset"],
        cwd=ROOT,
        env=env,
        stdout=secondary,
        stderr=subprocess.STDOUT,
        timeout=60,
        check=True,
    )
    os.close(secondary)
    output = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    os.close(main)
    assert proc.returncode == 0
    assert b"seeding" in output and b"100%" in output
    assert b"inserted 100 products" in output
