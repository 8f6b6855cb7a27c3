"""The gunicorn worker (faststock/worker.py) stopping under load, on real gunicorn: recycled after
max_requests, replaced on HUP, stopped by Ctrl-C. A worker finishes every connection it accepted,
whatever stops it, and says nothing about it in the log."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import requests

from tests.servers import LiveServer, poll, post_stock, row_locked, wait_for_lock_waiter

WRITTEN = 7  # the product the load's writes add to


@dataclass
class Load:
    """What the clients of `load` saw."""

    answered: int = 0
    writes: int = 0
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@contextmanager
def load(server: LiveServer, clients: int = 32) -> Iterator[Load]:
    """Clients reading products and adding 1 to product WRITTEN back to back, until the block
    ends. Half keep their connection alive (one requests.Session each); half open a new one for
    every request, so that a stopping worker always has connections it has just accepted. A
    connection error or a non-200 is a failure."""
    seen = Load()
    stop = threading.Event()

    def client(number: int) -> None:
        with requests.Session() as session:
            if number % 2:
                session.headers["Connection"] = "close"
            turn = number
            while not stop.is_set():
                turn += 1
                write = turn % 5 == 0
                try:
                    if write:
                        response = session.post(
                            server.url(f"/api/products/{WRITTEN}/update-stock"),
                            json={"delta": 1},
                            timeout=20,
                        )
                    else:
                        response = session.get(
                            server.url(f"/api/products/{1 + turn % 100}"), timeout=20
                        )
                except requests.RequestException as exc:
                    with seen.lock:
                        seen.failures.append(repr(exc))
                    continue
                with seen.lock:
                    if response.status_code != 200:
                        seen.failures.append(f"{response.status_code} {response.text[:200]}")
                    else:
                        seen.answered += 1
                        seen.writes += write

    threading.stack_size(256 * 1024)
    try:
        pool = ThreadPoolExecutor(clients)
    finally:
        threading.stack_size(0)
    with pool:
        running = [pool.submit(client, n) for n in range(clients)]
        try:
            yield seen
        finally:
            stop.set()
    for future in running:
        future.result(timeout=30)


def workers_seen(server: LiveServer) -> Callable[[], set[int]]:
    """A function returning every worker pid observed so far (each call looks again)."""
    seen: set[int] = set(server.workers)

    def look() -> set[int]:
        seen.update(server.workers)
        return seen

    return look


def assert_quiet(server: LiveServer) -> None:
    """Nothing at warning level or above and no traceback (the server logs at WARNING): a worker
    stopping is routine."""
    log = server.log()
    for word in ("Traceback", "SystemExit", "Socket error"):
        assert word not in log, log
    for line in log.splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # gevent's own prints are plain text: the words above cover them
            continue
        assert record.get("level") not in ("WARNING", "ERROR", "CRITICAL"), line


def stock(sql: Callable[..., list[tuple]]) -> int:
    return sql("SELECT stock FROM products WHERE id = %s", WRITTEN)[0][0]


def test_workers_recycled_by_max_requests_under_load_drop_nothing(live_server, sql):
    server = live_server(
        WEB_CONCURRENCY="1", GUNICORN_CMD_ARGS="--max-requests 50 --max-requests-jitter 0"
    )
    before = stock(sql)
    seen_workers = workers_seen(server)
    # a kept-alive connection gone quiet, like those a load balancer pools
    idle = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    idle.request("GET", "/healthz")
    first = idle.getresponse()
    assert (first.status, first.read(), first.getheader("Connection")) == (
        200,
        b'{"status":"ok"}',
        "keep-alive",
    )
    with load(server) as seen:
        recycled = poll(lambda: len(seen_workers()) >= 4, within=30, every=0.05)
    assert recycled, f"only {len(seen_workers())} workers in 30 s"  # three recycles at least
    assert idle.sock.recv(65536) == b""  # closed when its worker stopped, with no unsolicited 500
    idle.close()
    assert seen.failures == []
    assert seen.answered >= 150
    assert stock(sql) == before + seen.writes  # every acknowledged write, and only those
    assert_quiet(server)


def test_hup_under_load_replaces_workers_and_drops_nothing(live_server, sql):
    server = live_server(WEB_CONCURRENCY="2")
    before = stock(sql)
    with load(server) as seen:
        for _ in range(2):
            old = set(server.workers)
            assert poll(lambda: seen.answered >= 200, within=20)  # the load is running
            server.proc.send_signal(signal.SIGHUP)

            def replaced(old: set[int] = old) -> bool:
                current = set(server.workers)
                return len(current) == 2 and not current & old

            assert poll(replaced, within=30)
            with seen.lock:
                seen.answered = 0
    assert seen.failures == []
    assert stock(sql) == before + seen.writes
    assert_quiet(server)


def refused(server: LiveServer) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", server.port)) != 0


def test_ctrl_c_lets_in_flight_requests_finish_and_is_quiet(live_server, sql, fresh):
    server = live_server(WEB_CONCURRENCY="2")
    with ThreadPoolExecutor(1) as pool, row_locked(fresh.database_url, 5):
        write = pool.submit(post_stock, server, 5, delta=1)
        wait_for_lock_waiter(sql)  # the write is inside PostgreSQL
        os.killpg(server.proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
        assert poll(lambda: refused(server), within=10)
        assert server.proc.poll() is None  # still finishing the write
    assert write.result(timeout=30).status_code == 200
    assert server.proc.wait(timeout=30) == 0
    assert_quiet(server)


def test_second_ctrl_c_stops_at_once_and_is_quiet(live_server, sql, fresh):
    server = live_server(WEB_CONCURRENCY="1")
    with ThreadPoolExecutor(1) as pool, row_locked(fresh.database_url, 5):
        write = pool.submit(post_stock, server, 5, delta=1)
        wait_for_lock_waiter(sql)
        os.killpg(server.proc.pid, signal.SIGINT)
        assert poll(lambda: refused(server), within=10)
        os.killpg(server.proc.pid, signal.SIGINT)
        assert server.proc.wait(timeout=10) == 0  # not the 30 s graceful timeout
    with pytest.raises(requests.ConnectionError):
        write.result(timeout=10)
    assert_quiet(server)
