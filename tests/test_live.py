"""Real gunicorn with gevent workers from gunicorn.conf.py: the concurrency traps, one test each."""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
import requests

from tests.servers import (
    BIN,
    fire,
    get,
    poll,
    post_stock,
    row_locked,
    run_gunicorn,
    tcp_peer_ports,
    wait_for_lock_waiter,
)


def test_500_concurrent_requests_with_a_pool_of_3(live_server, sql):
    server = live_server(DB_POOL_SIZE="3", DB_POOL_TIMEOUT="20")
    assert requests.get(server.url("/api/products/1")).status_code == 200  # now cached
    calls: list[Callable[[], requests.Response]] = []
    for i in range(1, 101):
        calls.append(lambda i=i: requests.get(server.url(f"/api/products/{i}/stock"), timeout=30))
        calls.append(lambda i=i: post_stock(server, i, stock=1000 + i))
    for page in range(1, 51):
        calls.append(
            lambda p=page: requests.get(server.url(f"/api/products?page={p}&limit=2"), timeout=30)
        )
    calls += [lambda: requests.get(server.url("/api/products/1"), timeout=30)] * 250
    responses = fire(calls)
    statuses = [r.status_code for r in responses]
    assert statuses == [200] * 500
    assert sql("SELECT count(*) FROM products WHERE stock = 1000 + id") == [(100,)]
    assert "PoolError" not in server.log()
    assert "Traceback" not in server.log()
    for i in (1, 50, 100):
        body = requests.get(server.url(f"/api/products/{i}/stock")).json()
        assert body == {"id": i, "stock": 1000 + i}


def test_queries_do_not_block_the_event_loop(live_server, sql, fresh):
    server = live_server(WEB_CONCURRENCY="1")
    with ThreadPoolExecutor(1) as pool, row_locked(fresh.database_url, 5):
        pending = pool.submit(post_stock, server, 5, stock=55)
        wait_for_lock_waiter(sql)
        # The only worker is waiting on PostgreSQL; with a blocking driver these would hang.
        assert requests.get(server.url("/healthz"), timeout=3).status_code == 200
        assert requests.get(server.url("/api/products/6"), timeout=3).status_code == 200
        assert not pending.done()
    assert pending.result(timeout=10).json() == {"id": 5, "stock": 55}


def test_busy_pool_waits_then_answers_503(live_server, sql, fresh):
    server = live_server(WEB_CONCURRENCY="1", DB_POOL_SIZE="1", DB_POOL_TIMEOUT="0.5")
    with ThreadPoolExecutor(1) as pool, row_locked(fresh.database_url, 5):
        pending = pool.submit(post_stock, server, 5, stock=55)
        wait_for_lock_waiter(sql)
        started = time.monotonic()
        response = requests.get(server.url("/api/products/7"), timeout=10)
        elapsed = time.monotonic() - started
        assert response.status_code == 503
        assert response.json()["error"] == "unavailable"
        assert response.headers["Retry-After"] == "1"
        assert 0.5 <= elapsed < 3
    assert pending.result(timeout=10).status_code == 200
    assert requests.get(server.url("/api/products/7"), timeout=10).status_code == 200


def test_statement_timeout_answers_503_and_pool_recovers(live_server, sql, fresh):
    server = live_server(WEB_CONCURRENCY="1", DB_POOL_SIZE="1", DB_STATEMENT_TIMEOUT_MS="300")
    with row_locked(fresh.database_url, 5):
        started = time.monotonic()
        response = post_stock(server, 5, stock=55)
        assert response.status_code == 503
        assert time.monotonic() - started < 3
    assert sql("SELECT stock FROM products WHERE id = 5")[0][0] != 55
    assert post_stock(server, 5, stock=56).json() == {"id": 5, "stock": 56}
    assert "Traceback" not in server.log()


def test_connecting_is_bounded_under_gevent(live_server):
    with socket.socket() as blackhole:  # accepts TCP, never answers the PostgreSQL handshake
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(64)
        port = blackhole.getsockname()[1]
        server = live_server(
            WEB_CONCURRENCY="1",
            DB_POOL_TIMEOUT="1",
            DATABASE_URL=f"postgresql://faststock@127.0.0.1:{port}/faststock",
        )
        with ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            pending = pool.submit(requests.get, server.url("/api/products/1"), timeout=30)
            assert requests.get(server.url("/healthz"), timeout=3).status_code == 200
            response = pending.result()
        assert response.status_code == 503
        assert time.monotonic() - started < 4
        assert requests.get(server.url("/readyz"), timeout=10).status_code == 503


def test_connections_are_opened_in_workers_not_the_master(live_server, fresh):
    server = live_server(DB_POOL_SIZE="2")
    for i in range(1, 40):
        requests.get(server.url(f"/api/products/{i}"))
    pg_port = urlsplit(fresh.database_url).port
    redis_port = urlsplit(fresh.redis_url).port
    assert not {pg_port, redis_port} & tcp_peer_ports(server.proc.pid)
    from_workers = set().union(*(tcp_peer_ports(pid) for pid in server.workers))
    assert {pg_port, redis_port} <= from_workers


def test_metrics_add_up_across_workers(live_server):
    server = live_server(WEB_CONCURRENCY="2")
    for i in range(1, 41):
        with requests.Session() as s:
            assert s.get(server.url(f"/api/products/{i}")).status_code == 200
    pattern = (
        r'flask_http_request_duration_seconds_count\{method="GET",'
        r'route="/api/products/<raw_id>",status="200"\} (\S+)'
    )

    def counted() -> str | None:
        """The scrape once the worker that did not answer it has flushed (every 0.25 s)."""
        text = requests.get(server.url("/metrics")).text
        found = re.search(pattern, text)
        return text if found and float(found.group(1)) == 40 else None

    text = poll(counted, within=5)
    assert text, "40 requests counted once, across both workers"
    assert re.search(r'faststock_cache_requests_total\{endpoint="product",result="MISS"\} 40', text)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("DB_POOL_SIZE", "abc", "DB_POOL_SIZE must be a whole number"),
        ("DATABASE_URL", "mysql://x", "DATABASE_URL must be a URL starting with"),
        ("LOG_LEVEL", "chatty", "LOG_LEVEL must be one of"),
    ],
)
def test_bad_setting_stops_gunicorn_with_one_line(name, value, message, fresh):
    env = {"PATH": str(BIN), "DATABASE_URL": fresh.database_url, name: value}
    result = run_gunicorn(env, timeout=30)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_connections_above_descriptor_1024_are_not_churned(live_server, sql, fresh):
    """A worker with over 1024 descriptors (client sockets) keeps its PostgreSQL connections."""
    server = live_server(
        WEB_CONCURRENCY="1", DB_POOL_SIZE="2", GUNICORN_CMD_ARGS="--worker-connections 1300"
    )
    backends = (
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'faststock' "
        "AND datname = current_database()"
    )
    clients = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(1100)]
    try:
        worker = server.workers[0]
        assert poll(lambda: len(os.listdir(f"/proc/{worker}/fd")) > 1100, within=20)
        seen: set[int] = set()
        for pid in range(1, 41, 2):  # two uncached reads at once: both connections checked out
            pair = (pid, pid + 1)
            responses = fire([lambda i=i: get(server, f"/api/products/{i}") for i in pair])
            assert [r.status_code for r in responses] == [200, 200]
            now = {row[0] for row in sql(backends)}
            assert len(now) <= 2
            seen |= now
        assert len(seen) <= 2, f"{len(seen)} backends for a pool of 2: connections churned"
    finally:
        for c in clients:
            c.close()
