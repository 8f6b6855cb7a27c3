"""The per-worker near cache: bounded, and never serving an entry older than an answered write,
on any worker of any host, through Redis trouble included."""

from __future__ import annotations

import time

import pytest
import redis
import requests

from faststock import shared
from faststock.cache import CHANNEL, encode_entry
from faststock.nearcache import get_near
from faststock.outbox import SWEEP_SECONDS
from tests.servers import first_hit_per_worker, poll


def entry(version: int, stock: int) -> bytes:
    return encode_entry(version, stock, b'{"stock":%d}' % stock)


@pytest.fixture
def near(make_app):
    near = get_near(make_app(near_cache_size=3, near_cache_ttl_seconds=1))
    near.heartbeat()  # subscribed and trusted, as a worker's keeper makes it
    assert near.usable()
    yield near
    near.invalidations.close()


def test_an_entry_is_served_until_its_product_changes(near):
    token = near.begin(5)
    near.put_product(5, entry(7, 70), token)
    assert near.product(5) == (b'{"stock":70}', 70)
    shared.changed(5)  # a writer of this host, after commit, before answering
    assert near.product(5) is None


def test_a_load_that_straddles_a_change_keeps_nothing(near):
    token = near.begin(6)  # read before Redis...
    shared.changed(6)  # ...a change commits and is announced...
    near.put_product(6, entry(1, 10), token)  # ...and the old row arrives
    assert near.product(6) is None


def test_a_flush_drops_loads_in_flight(near):
    token = near.begin(8)
    near.flush()
    near.put_product(8, entry(1, 10), token)
    assert near.product(8) is None


def test_entries_are_bounded_least_recently_used_first(near):
    for pid in (1, 2, 3):
        near.put_product(pid, entry(1, pid), near.begin(pid))
    assert near.product(1) is not None  # 1 is now the most recently used
    near.put_product(4, entry(1, 4), near.begin(4))
    assert len(near) == 3
    assert near.product(2) is None
    assert all(near.product(pid) is not None for pid in (1, 3, 4))


def test_entries_expire(near, monkeypatch):
    near.put_product(9, entry(1, 9), near.begin(9))
    later = time.monotonic() + 1.5
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert near.product(9) is None


def test_another_hosts_change_arrives_through_redis(near, make_app):
    other = make_app()  # a second app: its writes reach this near cache only through Redis
    near.put_product(5, entry(1, 1), near.begin(5))
    assert other.test_client().post("/api/products/5/update-stock", json={"stock": 55}).json
    assert poll(lambda: near.usable() and near.product(5) is None, within=2)


def test_a_change_behind_a_late_subscribe_confirmation_is_not_left_unread(near, redis_url):
    """Under load a subscribe may be confirmed late, in the same read as the next change. The
    drain must not stop at the confirmation with the change left in redis-py's buffer, where no
    poll(2) of the socket can see it, and serve the old entry meanwhile."""
    near.put_product(12, entry(1, 12), near.begin(12))
    invalidations = near.invalidations
    invalidations._pubsub.subscribe("fs1:elsewhere")  # sent; its confirmation left unread
    assert poll(invalidations._watch.readable, within=2)  # the confirmation is on the socket
    redis.Redis.from_url(redis_url).publish(CHANNEL, b"12")  # the change is behind it
    assert near.usable() and near.product(12) is None


def test_a_hit_while_another_drain_yields_never_sees_a_read_change_unapplied(near, redis_url):
    """redis-py checks its socket with `select.poll`, which under gevent yields to other
    greenlets in the middle of a drain. A hit served then finds the socket empty, the change
    already read by the drain: the change must have been applied by then, not held back until
    the drain ends."""
    near.put_product(14, entry(1, 14), near.begin(14))
    pubsub = near.invalidations._pubsub
    redis.Redis.from_url(redis_url).publish(CHANNEL, b"14")
    assert poll(near.invalidations._watch.readable, within=2)
    read = pubsub.get_message
    served: list[object] = []

    def read_then_let_a_hit_in(**kwargs: float) -> dict | None:
        message = read(**kwargs)
        if message is None and not served:  # the drain checks for more: it may yield here
            served.append(near.usable() and near.product(14))  # another greenlet's hit
        return message

    pubsub.get_message = read_then_let_a_hit_in
    assert near.usable()
    assert served == [None]  # the hit in between did not serve stock 14


def test_the_near_cache_stands_aside_when_the_channel_breaks(near, make_app, private_redis):
    near = get_near(make_app(redis_url=private_redis.url))
    near.heartbeat()
    near.put_product(3, entry(1, 3), near.begin(3))
    assert near.usable() and near.product(3) is not None
    private_redis.stop()
    assert not near.usable()  # the next hit finds the subscription closed
    assert len(near) == 0
    private_redis.start()
    assert not near.usable()  # not by itself: only a heartbeat that resubscribes...
    near.heartbeat()
    assert near.usable() and len(near) == 0  # ...brings it back, empty
    near.invalidations.close()


def test_a_write_is_seen_at_once_by_every_worker_of_the_host(live_server):
    server = live_server(WEB_CONCURRENCY="2")
    first_hit_per_worker(server, "/api/products/5")
    first_hit_per_worker(server, "/api/products/5/stock")
    write = requests.post(server.url("/api/products/5/update-stock"), json={"stock": 5555})
    assert write.json() == {"id": 5, "stock": 5555}
    workers, reads = set(), 0

    def every_worker_answered_the_new_stock() -> bool:
        """Fresh connections land on either worker as the kernel pleases: read until both have
        answered (at least 40 reads), each answer the new stock."""
        nonlocal reads
        response = requests.get(server.url("/api/products/5"), headers={"Connection": "close"})
        assert response.json()["stock"] == 5555
        workers.add(response.headers["X-Request-ID"][:16])
        reads += 1
        return reads >= 40 and len(workers) == 2

    assert poll(every_worker_answered_the_new_stock, within=20, every=0)


def test_a_write_on_another_host_is_seen_there_after_it_answered(live_server):
    host_a, host_b = live_server(), live_server()  # two masters: no shared memory between them
    first_hit_per_worker(host_b, "/api/products/6")
    assert requests.post(host_a.url("/api/products/6/update-stock"), json={"stock": 66}).ok
    for _ in range(20):
        response = requests.get(host_b.url("/api/products/6"), headers={"Connection": "close"})
        assert response.json()["stock"] == 66


def test_a_write_on_another_host_during_a_redis_partition_is_seen_within_the_bound(
    live_server, private_redis
):
    """Redis hung: host A's change cannot be announced. Each worker of host B learns of it from
    the outbox record A left, on its keeper's next sweep (every SWEEP_SECONDS, plus a Redis
    timeout), and drops its copy; until then a B worker may still answer the old stock."""
    env = {"REDIS_URL": private_redis.url, "REDIS_TIMEOUT_MS": "100"}
    host_a, host_b = live_server(**env), live_server(**env)
    first_hit_per_worker(host_b, "/api/products/7")
    private_redis.pause()
    try:
        assert requests.post(host_a.url("/api/products/7/update-stock"), json={"stock": 77}).ok
        answered = time.monotonic()
        bound = SWEEP_SECONDS + 0.1 + 1.0  # a sweep, a Redis timeout, and a margin for load
        last_stale = None
        while time.monotonic() - answered < bound + 1.5:  # bounded: reads past the bound too
            response = requests.get(host_b.url("/api/products/7"), headers={"Connection": "close"})
            if response.json()["stock"] != 77:
                last_stale = time.monotonic() - answered
        assert last_stale is None or last_stale < bound, f"old stock {last_stale:.2f} s after"
    finally:
        private_redis.resume()


def test_a_page_is_never_staler_than_its_products(near):
    generation = near.generation
    near.put_page(1, 2, [1, 2], True, generation)
    for pid in (1, 2):
        near.put_product(pid, entry(1, pid), near.begin(pid))
    assert near.page_items(1, 2) == (b'{"stock":1},{"stock":2}', True)
    assert near.page_items(1, 2) == (b'{"stock":1},{"stock":2}', True)  # kept, joined
    shared.changed(2)
    assert near.page_items(1, 2) is None  # product 2 moved: the joined items go with it
    near.put_product(2, entry(2, 22), near.begin(2))
    assert near.page_items(1, 2) == (b'{"stock":1},{"stock":22}', True)


def test_a_write_while_a_page_is_joined_is_not_hidden_by_the_join(near, monkeypatch):
    """Another worker of the host can move a product's stamp while this one joins the page's
    items (workers run in parallel): the joined bytes must be kept under the stamps their bodies
    were checked against, or the old body is served until the page expires."""
    generation = near.generation
    near.put_page(1, 2, [1, 2], True, generation)
    for pid in (1, 2):
        near.put_product(pid, entry(1, pid), near.begin(pid))
    checked = near._current_entry

    def product_then_a_write_elsewhere(product_id: int, now: float):
        hit = checked(product_id, now)
        if product_id == 2:
            shared.changed(1)  # committed by another worker after product 1's body was taken
        return hit

    monkeypatch.setattr(near, "_current_entry", product_then_a_write_elsewhere)
    assert near.page_items(1, 2) == (b'{"stock":1},{"stock":2}', True)  # current when read
    monkeypatch.setattr(near, "_current_entry", checked)
    assert near.page_items(1, 2) is None  # product 1 moved since: not the joined bytes


def test_a_hung_redis_never_brings_the_near_cache_back(make_app, private_redis):
    """A stopped (SIGSTOP) Redis still accepts TCP connections: subscribing is not proof."""
    near = get_near(make_app(redis_url=private_redis.url, redis_timeout_ms=100))
    private_redis.pause()
    try:
        near.heartbeat()
        assert not near.usable()
    finally:
        private_redis.resume()
    near.heartbeat()
    assert near.usable()
    near.invalidations.close()


def test_the_change_channel_check_is_safe_from_real_threads():
    """Outside gevent (tests, `flask run`) the keeper thread and requests check the channel at
    once: one shared poll object refuses concurrent calls, which must never reach a request."""
    import socket
    import threading

    from faststock import realpoll

    left, right = socket.socketpair()
    watch = realpoll.Watch(left.fileno())
    errors: list[BaseException] = []

    def check() -> None:
        try:
            for _ in range(20_000):
                assert watch.readable() is False
        except BaseException as exc:  # any failure is the finding
            errors.append(exc)

    threads = [threading.Thread(target=check) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    right.send(b"x")
    assert watch.readable() is True
    left.close()
    right.close()
    assert errors == []
