"""Faults a deployment meets, on real gunicorn with gevent workers: Redis and PostgreSQL stopped,
paused (SIGSTOP, like a partition) and restarted; hostile requests; SIGTERM under load."""

from __future__ import annotations

import json
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg2
import pytest

from faststock.cache import Breaker
from tests.servers import (
    fire,
    get,
    poll,
    post_stock,
    row_locked,
    timed_get,
    wait_for_lock_waiter,
    writing,
)


def test_breaker_opens_after_consecutive_failures_and_closes():
    opened = []
    breaker = Breaker(threshold=3, on_open=lambda: opened.append(1))
    breaker.failure()
    breaker.failure()
    breaker.success()
    breaker.failure()
    breaker.failure()
    assert not breaker.is_open
    breaker.failure()
    assert breaker.is_open and opened == [1]
    breaker.failure()
    assert opened == [1]
    breaker.close()
    assert not breaker.is_open and breaker.failures == 0


def test_hung_redis_is_skipped_at_no_cost_once_the_breaker_opens(live_server, private_redis):
    server = live_server(WEB_CONCURRENCY="1", REDIS_URL=private_redis.url, REDIS_TIMEOUT_MS="400")
    assert get(server, "/api/products/1").headers["X-Cache"] == "MISS"
    private_redis.pause()
    try:
        timings = []
        for _ in range(10):
            response, elapsed = timed_get(server, "/api/products/1")
            assert response.status_code == 200
            assert response.headers["X-Cache"] == "BYPASS"
            timings.append(elapsed)
        assert max(timings[:3]) >= 0.35  # the failures that open the breaker wait the timeout
        assert max(timings[5:]) < 0.2  # then Redis is not even tried
    finally:
        private_redis.resume()
    started = time.monotonic()
    assert poll(lambda: get(server, "/api/products/1").headers["X-Cache"] == "HIT", within=5)
    assert time.monotonic() - started < 5


def test_writes_during_a_partition_are_never_hidden_by_old_entries(live_server, private_redis, sql):
    server = live_server(WEB_CONCURRENCY="2", REDIS_URL=private_redis.url, REDIS_TIMEOUT_MS="100")
    ids = range(1, 6)
    for pid in ids:
        for _ in range(4):
            get(server, f"/api/products/{pid}")
    assert all(get(server, f"/api/products/{pid}").headers["X-Cache"] == "HIT" for pid in ids)
    private_redis.pause()  # Redis keeps the entries cached before the outage
    try:
        for pid in ids:
            assert post_stock(server, pid, stock=5000 + pid).status_code == 200
        assert sql("SELECT count(*) FROM cache_outbox") == [(5,)]
        for pid in ids:  # during the outage, answers come from PostgreSQL
            assert get(server, f"/api/products/{pid}/stock").json()["stock"] == 5000 + pid
    finally:
        private_redis.resume()
    seen_states = set()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for pid in ids:
            response = get(server, f"/api/products/{pid}")
            assert response.json()["stock"] == 5000 + pid, "an entry cached before the outage"
            seen_states.add(response.headers["X-Cache"])
        if seen_states >= {"HIT"} and sql("SELECT count(*) FROM cache_outbox") == [(0,)]:
            break
    assert "HIT" in seen_states, "the cache was not used again within 5 s"
    assert sql("SELECT count(*) FROM cache_outbox") == [(0,)]
    for _ in range(20):  # fresh connections land on both workers
        assert get(server, "/api/products/3").json()["stock"] == 5003


def test_keepers_clean_up_the_records_of_written_through_changes(live_server, sql):
    """One commit per write: the record each change leaves is deleted by a keeper's sweep, which
    sees Redis already holds that version and so replays and announces nothing."""
    server = live_server()
    for pid in range(1, 11):
        assert post_stock(server, pid, delta=1).status_code == 200
    assert poll(lambda: sql("SELECT count(*) FROM cache_outbox") == [(0,)], within=5)


def test_postgres_stopped_cached_reads_serve_the_rest_503_then_recovers(live_server, private_pg):
    server = live_server(
        DATABASE_URL=private_pg.url, DB_POOL_TIMEOUT="1", DB_STATEMENT_TIMEOUT_MS="1000"
    )
    for _ in range(2):
        assert get(server, "/api/products/1").status_code == 200
    assert get(server, "/api/products/1").headers["X-Cache"] == "HIT"
    private_pg.stop()
    try:
        response, elapsed = timed_get(server, "/api/products/1")
        assert (response.status_code, response.headers["X-Cache"]) == (200, "HIT")
        for path in ("/api/products/50", "/api/products/50/stock", "/api/products?page=3"):
            response, elapsed = timed_get(server, path)
            assert response.status_code == 503
            assert response.json()["error"] == "unavailable"
            assert response.headers["Retry-After"]
            assert elapsed < 3
        started = time.monotonic()
        write = post_stock(server, 1, delta=1)
        assert write.status_code == 503 and time.monotonic() - started < 3
        assert get(server, "/readyz").status_code == 503
        assert get(server, "/healthz").status_code == 200
    finally:
        private_pg.start()
    assert poll(lambda: get(server, "/api/products/50").status_code == 200, within=10)
    assert post_stock(server, 50, delta=1).status_code == 200
    assert get(server, "/readyz").status_code == 200


def test_pool_drops_connections_the_server_closed(live_server, private_pg):
    server = live_server(WEB_CONCURRENCY="1", DATABASE_URL=private_pg.url)
    for pid in range(1, 6):
        assert get(server, f"/api/products/{pid}").status_code == 200  # idle connections now
    private_pg.stop()
    private_pg.start()
    assert get(server, "/api/products/70").status_code == 200  # not a 503 on a dead connection


def test_hung_postgres_answers_503_in_bounded_time_then_recovers(live_server, private_pg):
    server = live_server(
        WEB_CONCURRENCY="1",
        DATABASE_URL=private_pg.url,
        DB_POOL_TIMEOUT="1",
        DB_STATEMENT_TIMEOUT_MS="500",
    )
    assert get(server, "/api/products/2").status_code == 200  # the pool holds a connection now
    private_pg.pause()
    try:
        response, elapsed = timed_get(server, "/api/products/60")
        assert response.status_code == 503
        assert elapsed < 3
        response, elapsed = timed_get(server, "/api/products/61")  # a new connection: bounded too
        assert response.status_code == 503
        assert elapsed < 3
        assert get(server, "/api/products/2").headers["X-Cache"] == "HIT"
    finally:
        private_pg.resume()
    assert poll(lambda: get(server, "/api/products/60").status_code == 200, within=10)


def test_no_acknowledged_write_is_lost_across_a_postgres_restart(live_server, private_pg):
    server = live_server(DATABASE_URL=private_pg.url, DB_POOL_TIMEOUT="1")
    initial = get(server, "/api/products/7/stock").json()["stock"]
    with writing(server, [7, 7, 7, 7]) as outcomes:
        assert poll(lambda: outcomes.count(200) >= 20, within=20)
        private_pg.stop()
        assert poll(lambda: outcomes[-1:] == [503], within=10)
        private_pg.start()
        before = len(outcomes)
        assert poll(lambda: outcomes[before:].count(200) >= 20, within=20)
    assert set(outcomes) <= {200, 503}
    with psycopg2.connect(private_pg.url) as conn, conn.cursor() as cur:
        cur.execute("SELECT stock FROM products WHERE id = 7")
        final = cur.fetchone()[0]
    acknowledged = outcomes.count(200)
    assert initial + acknowledged <= final <= initial + acknowledged + outcomes.count(503)


RAW_REQUESTS = {
    "long url": b"GET /api/products/1?x=" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "long header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
    "many headers": b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    + b"".join(b"X-%d: 1\r\n" % i for i in range(120))
    + b"\r\n",
    "garbage": b"NOT A REQUEST AT ALL\r\n\r\n",
    "bad method": b"G\x00T / HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad version": b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    "transfer coding": b"POST /api/products/1/update-stock HTTP/1.1\r\nHost: x\r\n"
    b"Transfer-Encoding: gzip\r\nContent-Type: application/json\r\n\r\n",
    "bad chunk": b"POST /api/products/1/update-stock HTTP/1.1\r\nHost: x\r\n"
    b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\nZZ\r\n",
    "big chunked body": b"POST /api/products/1/update-stock HTTP/1.1\r\nHost: x\r\n"
    b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
    + b"%x\r\n" % 20000
    + b"{" * 20000
    + b"\r\n0\r\n\r\n",
}


@pytest.fixture
def one_server(live_server):
    return live_server(WEB_CONCURRENCY="1")


def raw(server, payload: bytes) -> tuple[int, dict]:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(payload)
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        while len(body) < length:
            body += s.recv(65536)
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


@pytest.mark.parametrize("name", RAW_REQUESTS)
def test_requests_gunicorn_rejects_still_get_json_4xx(one_server, name):
    status, body = raw(one_server, RAW_REQUESTS[name])
    assert 400 <= status < 500
    assert body["error"] == ("payload_too_large" if name == "big chunked body" else "bad_request")
    assert body["message"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/products/1%20OR%201=1",
        "/api/products/1;DROP%20TABLE%20products",
        "/api/products/1'--",
        "/api/products/%FF",
        "/api/products/%00",
        "/api/products/1%00/stock",
        "/api/products?page=1%27%20OR%20%271%27=%271",
        "/api/products?limit=10;DELETE%20FROM%20products",
        "/api/products?page=%FF%FE",
        "/api/products/" + "9" * 3000,
    ],
)
def test_injection_and_junk_in_path_and_query_are_400(one_server, sql, path):
    response = get(one_server, path)
    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"
    assert sql("SELECT count(*) FROM products") == [(100,)]


def test_sigterm_lets_in_flight_requests_finish(live_server, sql, fresh):
    server = live_server(WEB_CONCURRENCY="1", DB_POOL_SIZE="20")
    with ThreadPoolExecutor(1) as pool, row_locked(fresh.database_url, 5):
        writes = pool.submit(fire, [lambda: post_stock(server, 5, delta=1)] * 20)
        wait_for_lock_waiter(sql, count=20)  # every write is inside PostgreSQL
        server.proc.send_signal(15)

        def refused() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", server.port)) != 0

        assert poll(refused, within=10)  # no new connections once shutdown began
        assert server.proc.poll() is None  # while the writes are still in flight
    responses = writes.result(timeout=60)
    assert [r.status_code for r in responses] == [200] * 20
    assert server.proc.wait(timeout=40) == 0
    stocks = sorted(r.json()["stock"] for r in responses)
    assert stocks == list(range(stocks[0], stocks[0] + 20))
    assert sql("SELECT stock FROM products WHERE id = 5") == [(stocks[-1],)]


def test_sigterm_closes_idle_keepalive_connections_at_once(live_server):
    server = live_server(WEB_CONCURRENCY="1")
    idle = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    first = b""
    while not first.endswith(b'{"status":"ok"}'):  # headers and body may come apart
        chunk = idle.recv(65536)
        assert chunk, first
        first += chunk
    assert first.startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    server.proc.send_signal(15)
    assert server.proc.wait(timeout=20) == 0
    assert time.monotonic() - started < 5  # not the 30 s graceful timeout
    assert idle.recv(65536) == b""  # closed without an unsolicited 500
    idle.close()
    assert "Traceback" not in server.log()


def test_postgres_stopped_mid_writes_cached_reads_keep_answering(live_server, private_pg):
    """Writes in flight when PostgreSQL stops: those whose cache update succeeded must not make
    the host bypass Redis, so every product cached before the outage is still served."""
    server = live_server(
        DATABASE_URL=private_pg.url, DB_POOL_TIMEOUT="1", DB_STATEMENT_TIMEOUT_MS="1000"
    )
    ids = range(1, 101)
    for pid in ids:
        get(server, f"/api/products/{pid}")
    assert all(get(server, f"/api/products/{pid}").headers["X-Cache"] == "HIT" for pid in ids)
    with writing(server, list(range(1, 9))) as outcomes:
        assert poll(lambda: outcomes.count(200) >= 100, within=20)
        private_pg.stop()  # with writes in flight
        before = len(outcomes)
        assert poll(lambda: outcomes[before:].count(503) >= 16, within=20)
    try:
        answered = [get(server, f"/api/products/{pid}").status_code for pid in ids]
        assert answered.count(200) == 100, f"{answered.count(200)} of 100 cached reads answered"
    finally:
        private_pg.start()
    assert set(outcomes) <= {200, 503}


def test_cache_updated_then_postgres_gone_leaves_redis_trusted(make_app, private_pg, monkeypatch):
    """Deterministic: PostgreSQL stops right after a write's cache update, before its outbox
    record is cleaned up (the keeper's job): Redis is right, and must stay trusted."""
    from faststock import shared
    from faststock.cache import Cache

    client = make_app(
        database_url=private_pg.url, db_pool_timeout=1, db_statement_timeout_ms=1000
    ).test_client()
    client.get("/api/products/9")
    real_fill = Cache.fill

    def fill_then_stop_postgres(self, entries, **kwargs):
        stored = real_fill(self, entries, **kwargs)
        if kwargs.get("announce"):  # the writer's update, not a reader's fill
            private_pg.stop()
        return stored

    monkeypatch.setattr(Cache, "fill", fill_then_stop_postgres)
    mark = shared.dirty_mark()
    try:
        write = client.post("/api/products/8/update-stock", json={"stock": 88})
        assert (write.status_code, write.get_json()) == (200, {"id": 8, "stock": 88})
        assert shared.dirty_mark() == mark
        cached = client.get("/api/products/9")
        assert (cached.status_code, cached.headers["X-Cache"]) == (200, "HIT")
        written = client.get("/api/products/8")
        assert (written.status_code, written.get_json()["stock"]) == (200, 88)
    finally:
        private_pg.start()
