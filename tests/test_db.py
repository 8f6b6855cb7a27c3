"""The pool, the schema and the seed command, against real PostgreSQL."""

from __future__ import annotations

import os
import pty
import resource
import subprocess
import threading
from urllib.parse import urlsplit

import psycopg2
import pytest
import redis as redis_lib

from faststock.cache import product_key
from faststock.config import Config
from faststock.db import Pool, PoolTimeout, init_db
from faststock.seed import product_row, seed
from tests.servers import BIN, ROOT, poll


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


def test_idle_connections_above_descriptor_1024_are_kept(pool):
    """select() cannot watch descriptor 1024 or above; a busy gevent worker gets there easily."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        conn = pool.acquire()
        assert conn.fileno() >= 1024
        pid = conn.info.backend_pid
        pool.release(conn)
        again = pool.acquire()
        assert again is conn and again.info.backend_pid == pid  # not closed and reconnected
        pool.release(again)
        assert pool.open_connections == 1
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


GREEN = """
from gevent import monkey

monkey.patch_all()
import sys

import gevent

from faststock import db

assert db.make_cooperative()
pool = db.Pool(sys.argv[1], size=2, timeout=2, statement_timeout_ms=1000)
if sys.argv[2] == "three-statements":
    with db.standalone_transaction(pool) as cur:
        for _ in range(3):
            cur.execute("SELECT pg_sleep(0.7)")
    print("committed", flush=True)
else:
    try:
        with db.standalone_transaction(pool) as cur:
            cur.execute("SET LOCAL statement_timeout = 0")  # only the client's deadline is left
            cur.execute("SELECT pg_advisory_xact_lock(4242)")
    except db.Unavailable as exc:
        print(exc.message, flush=True)
    gevent.sleep(30)  # the test ends this process once it has looked at the server
"""


def green(database_url: str, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN / "python"), "-c", GREEN, database_url, mode],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_each_statement_has_its_own_client_deadline(database_url):
    """Three 0.7 s statements take 2.1 s, more than one deadline (1 s + 1 s) for them all."""
    proc = green(database_url, "three-statements")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.strip() == "committed"


def test_a_statement_the_client_gave_up_on_is_ended_on_the_server(database_url, sql):
    waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    holder = psycopg2.connect(database_url)
    proc = None
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(4242)")
        proc = green(database_url, "orphan")
        assert proc.stdout.readline().strip() == "database query timed out"
        # the backend is gone, not left queued on the lock (and holding the rest) for retries
        assert poll(lambda: sql(waiting) == [(0,)], within=5), "an orphan still waits"
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        holder.close()


def test_server_side_refusals_are_503_not_500(make_app, database_url, sql):
    """A read-only database (as during a failover) refuses writes: retryable, so 503."""
    name = urlsplit(database_url).path.lstrip("/")
    sql(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    try:
        client = make_app().test_client()  # its connections are new: read-only
        response = client.post("/api/products/5/update-stock", json={"stock": 1})
        assert response.status_code == 503
        assert response.get_json()["error"] == "unavailable"
        assert response.headers["Retry-After"] == "1"
        keyed = client.post(
            "/api/products/5/update-stock", json={"delta": 1}, headers={"Idempotency-Key": "ro"}
        )
        assert keyed.status_code == 503
    finally:
        sql(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')


def test_versions_never_go_backwards_across_a_reseed(client, fresh, sql):
    """A worker's fill that lands after the re-seed cleared Redis must not outrank later writes."""
    store = redis_lib.Redis.from_url(fresh.redis_url)
    client.get("/api/products/5")
    for stock in (1, 2, 3):
        client.post("/api/products/5/update-stock", json={"stock": stock})
    before_reseed = store.get(product_key(5))
    seed(fresh, 100, reset=True)
    store.set(product_key(5), before_reseed)  # the in-flight fill lands after the clear
    assert client.post("/api/products/5/update-stock", json={"stock": 77}).status_code == 200
    assert client.get("/api/products/5").get_json()["stock"] == 77


def test_init_db_moves_the_version_sequence_past_existing_versions(fresh, sql):
    past = "(SELECT last_value + 1000 FROM product_versions)"
    sql(f"UPDATE products SET version = {past} WHERE id = 1")
    highest = sql("SELECT max(version) FROM products")[0][0]
    init_db(fresh)
    assert sql("SELECT nextval('product_versions')")[0][0] > highest
