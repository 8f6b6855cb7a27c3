"""Stock under concurrent buyers, retries, stampedes and read/write storms, through real gunicorn
with gevent workers (and one deterministic in-process stampede)."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import psycopg2
import pytest
import requests

from faststock import queries
from faststock.cache import get_cache
from faststock.singleflight import get_flight
from tests.servers import fire, poll, post_delta, wait_for_lock_waiter

FETCH_PRODUCT = f"SELECT {queries.PRODUCT_COLUMNS} FROM products WHERE id = $1"


def statement_calls(sql, query: str) -> int:
    """How many times `query` ran, sent as text or prepared: pg_stat_statements counts the runs
    of a prepared statement under its PREPARE (queries.Prepared)."""
    try:
        rows = sql(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
            "WHERE (query = %s OR query LIKE 'PREPARE %% AS ' || %s) "
            "AND dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
            query,
            query,
        )
    except psycopg2.Error as exc:
        pytest.skip(f"pg_stat_statements is not available: {exc}")
    return int(rows[0][0])


def every_view_of(server, product_id: int, page_limit: int = 10) -> tuple[int, int, int]:
    """The stock as the product endpoint, the stock endpoint and its list page show it."""
    product = requests.get(server.url(f"/api/products/{product_id}")).json()["stock"]
    stock = requests.get(server.url(f"/api/products/{product_id}/stock")).json()["stock"]
    page = (product_id - 1) // page_limit + 1
    listed = requests.get(server.url(f"/api/products?page={page}&limit={page_limit}")).json()
    in_list = next(i["stock"] for i in listed["items"] if i["id"] == product_id)
    return product, stock, in_list


def test_300_buyers_for_100_items_never_oversell(live_server, sql):
    sql("UPDATE products SET stock = 100 WHERE id = 9")
    server = live_server(DB_POOL_SIZE="5")
    assert every_view_of(server, 9) == (100, 100, 100)  # cached before the rush
    responses = fire([lambda: post_delta(server, 9, -1)] * 300)
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) == 100
    assert statuses.count(409) == 200
    assert all(r.json()["error"] == "insufficient_stock" for r in responses if r.status_code == 409)
    assert sorted(r.json()["stock"] for r in responses if r.status_code == 200) == list(range(100))
    assert sql("SELECT stock FROM products WHERE id = 9") == [(0,)]
    assert every_view_of(server, 9) == (0, 0, 0)


def test_50_concurrent_retries_apply_once(live_server, sql, changes):
    sql("UPDATE products SET stock = 500 WHERE id = 11")
    server = live_server()
    responses = fire([lambda: post_delta(server, 11, -7, key="checkout-42")] * 50)
    assert {r.status_code for r in responses} == {200}
    assert {r.content for r in responses} == {b'{"id":11,"stock":493}'}
    replayed = [r for r in responses if r.headers.get("Idempotent-Replayed") == "true"]
    assert len(replayed) == 49
    assert changes(11) == (493, 1)  # applied once
    assert every_view_of(server, 11) == (493, 493, 493)


def test_concurrent_misses_share_one_query_in_process(app, sql, database_url):
    """Deterministic: the first load is held inside PostgreSQL until every other miss is waiting."""
    clients = 30
    before = statement_calls(sql, FETCH_PRODUCT)
    lock = psycopg2.connect(database_url)
    results: list[int] = []
    try:
        with lock.cursor() as cur:
            cur.execute("LOCK TABLE products IN ACCESS EXCLUSIVE MODE")

        def read() -> None:
            results.append(app.test_client().get("/api/products/77").status_code)

        threads = [threading.Thread(target=read) for _ in range(clients)]
        for t in threads:
            t.start()
        all_waiting = poll(lambda: get_flight(app).waiters(("p", 77)) >= clients - 1, within=20)
        assert all_waiting, "the misses never all waited on one load"
    finally:
        lock.rollback()
        lock.close()
    for t in threads:
        t.join(20)
    assert results == [200] * clients
    assert statement_calls(sql, FETCH_PRODUCT) - before == 1


def test_a_miss_too_late_to_join_a_load_reads_redis_again(app, sql, monkeypatch):
    """A stampede's straggler: it missed Redis before the leader filled it, and asks to load
    after the leader's load has ended, so there is nothing left to join. It must find the entry
    in Redis rather than run the query again (the live stampede below, made deterministic)."""
    cache = get_cache(app)
    real_get = cache.get_product
    missed, leader_done = threading.Event(), threading.Event()

    def held_after_its_miss(product_id: int):  # the straggler's first look only
        answer = real_get(product_id)
        if threading.current_thread().name == "straggler" and not missed.is_set():
            missed.set()
            assert leader_done.wait(20)
        return answer

    monkeypatch.setattr(cache, "get_product", held_after_its_miss)
    before = statement_calls(sql, FETCH_PRODUCT)
    results: list[int] = []
    straggler = threading.Thread(
        target=lambda: results.append(app.test_client().get("/api/products/79").status_code),
        name="straggler",
    )
    straggler.start()
    assert missed.wait(20)
    leader = app.test_client().get("/api/products/79")  # loads and fills Redis
    leader_done.set()
    straggler.join(20)
    assert (leader.status_code, leader.headers["X-Cache"], results) == (200, "MISS", [200])
    assert statement_calls(sql, FETCH_PRODUCT) - before == 1


def test_stampede_on_a_cold_key_costs_one_query_per_worker(live_server, sql, database_url):
    server = live_server(WEB_CONCURRENCY="2")
    before = statement_calls(sql, FETCH_PRODUCT)
    lock = psycopg2.connect(database_url)
    try:
        with lock.cursor() as cur:
            cur.execute("LOCK TABLE products IN ACCESS EXCLUSIVE MODE")
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(
                fire, [lambda: requests.get(server.url("/api/products/78"), timeout=60)] * 200
            )
            wait_for_lock_waiter(sql, timeout=20)
            lock.rollback()
            responses = pending.result(timeout=60)
    finally:
        lock.rollback()
        lock.close()
    assert {r.status_code for r in responses} == {200}
    assert statement_calls(sql, FETCH_PRODUCT) - before <= 2


def test_random_storm_leaves_every_endpoint_agreeing_with_postgres(live_server, sql):
    ids = list(range(1, 21))
    sql("UPDATE products SET stock = 10000 WHERE id <= 20")
    server = live_server(WEB_CONCURRENCY="2", DB_POOL_SIZE="4")

    def worker(seed: int) -> list[int]:
        rng = random.Random(seed)
        statuses = []
        with requests.Session() as s:
            for _ in range(40):
                pid = rng.choice(ids)
                roll = rng.random()
                if roll < 0.3:
                    r = s.get(server.url(f"/api/products/{pid}"))
                elif roll < 0.5:
                    r = s.get(server.url(f"/api/products/{pid}/stock"))
                elif roll < 0.6:
                    r = s.get(server.url(f"/api/products?page={rng.randint(1, 2)}&limit=10"))
                elif roll < 0.9:
                    body = {"delta": rng.randint(-5, 5)}
                    r = s.post(server.url(f"/api/products/{pid}/update-stock"), json=body)
                else:
                    body = {"stock": rng.randint(0, 20000)}
                    r = s.post(server.url(f"/api/products/{pid}/update-stock"), json=body)
                statuses.append(r.status_code)
        return statuses

    with ThreadPoolExecutor(40) as pool:
        statuses = [s for result in pool.map(worker, range(40)) for s in result]
    assert set(statuses) <= {200, 409}
    truth = dict(sql("SELECT id, stock FROM products WHERE id <= 20"))
    for pid in ids:
        assert every_view_of(server, pid) == (truth[pid],) * 3, pid


def test_list_read_after_an_answered_write_never_joins_an_older_load(app, sql):
    """Leader L misses page 1 and reads product 3's row; writer W commits and answers; then
    reader R misses page 1 and joins L's load. R began after W answered: it must see W's stock."""
    client = app.test_client()
    read_rows, release = threading.Event(), threading.Event()
    real_page = queries.fetch_page

    def held_page(cur, limit, offset):
        rows = real_page(cur, limit, offset)
        if not read_rows.is_set():
            read_rows.set()
            assert release.wait(20)  # test-only delay: the leader holds its old rows here
        return rows

    queries.fetch_page = held_page
    try:
        with ThreadPoolExecutor(2) as pool:
            leader = pool.submit(client.get, "/api/products?page=1&limit=5")
            assert read_rows.wait(20)
            write = client.post("/api/products/3/update-stock", json={"stock": 3333})
            assert write.get_json() == {"id": 3, "stock": 3333}  # answered
            joiner = pool.submit(client.get, "/api/products?page=1&limit=5")
            assert poll(lambda: get_flight(app).waiters(("l", 1, 5)) == 1, within=20)
            release.set()
            leader_items = leader.result(20).get_json()["items"]
            joined = joiner.result(20)
    finally:
        release.set()
        queries.fetch_page = real_page
    assert leader_items[2]["stock"] != 3333  # the leader began before the write: either is fine
    assert joined.status_code == 200
    assert joined.get_json()["items"][2]["stock"] == 3333


def test_single_flight_waiters_outlast_the_leaders_own_limits(app, monkeypatch):
    """Waiters that gave up before the leader could answer 503 for a load that then succeeds."""
    from faststock import db
    from faststock.singleflight import SingleFlight

    given: list[float] = []
    real_do = SingleFlight.do

    def spy(self, key, load, timeout):
        given.append(timeout)
        return real_do(self, key, load, timeout)

    monkeypatch.setattr(SingleFlight, "do", spy)
    assert app.test_client().get("/api/products/5").status_code == 200
    pool, config = db.get_pool(app), app.config["FASTSTOCK"]
    # the leader may wait for a connection, connect, run its statement, then fill Redis
    leader = pool.timeout + 0.5 + pool.statement_timeout_ms / 1000 + 1
    leader += config.redis_timeout_ms / 1000
    assert given and given[0] > leader
