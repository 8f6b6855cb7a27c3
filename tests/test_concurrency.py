"""Stock under concurrent buyers, retries, stampedes and read/write storms, through real gunicorn
with gevent workers (and one deterministic in-process stampede)."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import psycopg2
import pytest
import requests

from faststock import products, queries
from tests.servers import poll
from tests.test_live import fire, wait_for_lock_waiter

FETCH_PRODUCT = f"SELECT {queries.PRODUCT_COLUMNS} FROM products WHERE id = $1"


def statement_calls(sql, query: str) -> int:
    try:
        rows = sql(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
            "WHERE query = %s AND dbid = (SELECT oid FROM pg_database "
            "WHERE datname = current_database())",
            query,
        )
    except psycopg2.Error as exc:
        pytest.skip(f"pg_stat_statements is not available: {exc}")
    return int(rows[0][0])


def delta(server, product_id: int, amount: int, key: str | None = None) -> requests.Response:
    headers = {"Idempotency-Key": key} if key else {}
    headers["Connection"] = "close"
    response = requests.post(
        server.url(f"/api/products/{product_id}/update-stock"),
        json={"delta": amount},
        headers=headers,
        timeout=60,
    )
    response.close()
    return response


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
    responses = fire([lambda: delta(server, 9, -1)] * 300)
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) == 100
    assert statuses.count(409) == 200
    assert all(r.json()["error"] == "insufficient_stock" for r in responses if r.status_code == 409)
    assert sorted(r.json()["stock"] for r in responses if r.status_code == 200) == list(range(100))
    assert sql("SELECT stock FROM products WHERE id = 9") == [(0,)]
    assert every_view_of(server, 9) == (0, 0, 0)


def test_50_concurrent_retries_apply_once(live_server, sql):
    sql("UPDATE products SET stock = 500 WHERE id = 11")
    server = live_server()
    responses = fire([lambda: delta(server, 11, -7, key="checkout-42")] * 50)
    assert {r.status_code for r in responses} == {200}
    assert {r.content for r in responses} == {b'{"id":11,"stock":493}'}
    replayed = [r for r in responses if r.headers.get("Idempotent-Replayed") == "true"]
    assert len(replayed) == 49
    assert sql("SELECT stock, version FROM products WHERE id = 11") == [(493, 2)]
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
        all_waiting = poll(lambda: products._flight.waiters(("p", 77)) >= clients - 1, within=20)
        assert all_waiting, "the misses never all waited on one load"
    finally:
        lock.rollback()
        lock.close()
    for t in threads:
        t.join(20)
    assert results == [200] * clients
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
