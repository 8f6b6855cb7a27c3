"""Redis Sentinel: the cache follows the master Sentinel names, keeps answering through a
failover, and never trusts what the promoted replica kept from before it.

The live tests run a master and a replica redis-server and three Sentinels on loopback, with a
down-after of half a second, so that Sentinel promotes the replica about two seconds after the
master dies.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis as redis_lib
import requests
from flask import Flask

from faststock.cache import (
    DIRECT,
    MasterGate,
    decode_entry,
    encode_entry,
    epoch_of,
    get_cache,
    product_key,
    replication_identity,
)
from faststock.config import Config, ConfigError
from faststock.nearcache import get_near
from faststock.outbox import get_keeper
from tests.servers import (
    LiveServer,
    RedisServer,
    SentinelServer,
    first_hit_per_worker,
    get,
    poll,
    post_stock,
)

NAME = "fsmaster"
DOWN_MS = 500
FAILOVER_MS = 4000
UNUSED_URL = "redis://127.0.0.1:1/0"  # under Sentinel only its db number counts: this proves it
READ_IDS = range(1, 41)  # read during the failover, never written then
WRITE_IDS = range(41, 51)  # written during the failover
STALE_ID = 7  # written just before the failover; the promoted replica keeps the entry before it
UNHEARD_ID = 60  # changed during the failover where the instance cannot hear of it


@dataclass
class Sentinels:
    """A master, its replica and three Sentinels watching them."""

    master: RedisServer
    replica: RedisServer
    sentinels: list[SentinelServer]

    @property
    def env(self) -> dict[str, str]:
        return {
            "REDIS_URL": UNUSED_URL,
            "REDIS_SENTINELS": ",".join(s.address for s in self.sentinels),
            "REDIS_SENTINEL_MASTER": NAME,
        }

    def master_port(self) -> int | None:
        """The master's port once every Sentinel names the same one, else None. Asked as
        redis-py asks (SENTINEL MASTERS): GET-MASTER-ADDR-BY-NAME names the promoted replica
        before the failover has ended, and the Sentinels not leading it learn of it later."""
        ports = set()
        for watcher in self.sentinels:
            with client(watcher) as s:
                ports.add(int(s.sentinel_master(NAME)["port"]))
        return ports.pop() if len(ports) == 1 else None


def client(server: RedisServer) -> redis_lib.Redis:
    return redis_lib.Redis(port=server.port, socket_timeout=2)


def epoch(server: RedisServer) -> str:
    """The key prefix of what is cached on `server` while it is master."""
    with client(server) as r:
        info = r.info("replication")
    assert info["role"] == "master"
    return epoch_of(info["master_replid"]).prefix


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[Sentinels]:
    started: list[RedisServer] = []
    try:
        master = RedisServer(tmp_path / "master").start()
        started.append(master)
        replica = RedisServer(tmp_path / "replica", "--replicaof", "127.0.0.1", str(master.port))
        started.append(replica.start())

        def replica_online() -> bool:
            with client(master) as r:
                return "online" in str(r.info("replication").get("slave0", ""))

        assert poll(replica_online, within=10), "the replica never caught up with the master"
        watchers = []
        for i in range(3):
            watcher = SentinelServer(
                tmp_path / f"sentinel{i}", master.port, NAME, DOWN_MS, FAILOVER_MS
            )
            started.append(watcher.start())
            watchers.append(watcher)

        def acquainted() -> bool:
            for watcher in watchers:
                with client(watcher) as s:
                    state = s.sentinel_master(NAME)
                if state["num-other-sentinels"] < 2 or state["num-slaves"] < 1:
                    return False
            return True

        # Sentinels find each other on the master's hello channel, every two seconds.
        assert poll(acquainted, within=15, every=0.1), "the Sentinels never found each other"
        yield Sentinels(master, replica, watchers)
    finally:
        for server in reversed(started):  # the Sentinels first: none may fail anything over
            server.stop()


# Settings and key names


def test_sentinel_settings_are_read_and_checked():
    env = {"REDIS_SENTINELS": "s1:26379, [::1]:26380", "REDIS_SENTINEL_MASTER": "cache"}
    assert Config.from_env(env).sentinel_addresses == [("s1", 26379), ("::1", 26380)]
    assert Config.from_env({}).sentinel_addresses == []


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"REDIS_SENTINELS": "s1:26379"}, "must be set together"),
        ({"REDIS_SENTINEL_MASTER": "cache"}, "must be set together"),
        ({"REDIS_SENTINELS": "s1", "REDIS_SENTINEL_MASTER": "m"}, "list of host:port"),
        ({"REDIS_SENTINELS": "s1:0", "REDIS_SENTINEL_MASTER": "m"}, "list of host:port"),
        ({"REDIS_SENTINELS": "::1:26379", "REDIS_SENTINEL_MASTER": "m"}, "list of host:port"),
        ({"REDIS_SENTINELS": "a b:1", "REDIS_SENTINEL_MASTER": "m"}, "list of host:port"),
        ({"REDIS_SENTINELS": ",", "REDIS_SENTINEL_MASTER": "m"}, "at least one sentinel"),
        ({"REDIS_SENTINELS": "s1:1", "REDIS_SENTINEL_MASTER": "my master"}, "without spaces"),
        (
            {"REDIS_SENTINELS": "s1:1", "REDIS_SENTINEL_MASTER": "m", "REDIS_URL": "rediss://x"},
            "REDIS_URL must start with redis:// when REDIS_SENTINELS is set",
        ),
    ],
)
def test_bad_sentinel_settings_name_the_variable(env, message):
    with pytest.raises(ConfigError, match=message) as info:
        Config.from_env(env)
    assert "\n" not in str(info.value)


def test_the_masters_epoch_is_in_every_key_name():
    replid = "8a3d993d6b57f3c5c2395e0e74b70eef0aece19c"
    assert product_key(7, epoch_of(replid).prefix) == "fs1:8a3d993d:p:7"
    assert product_key(7, DIRECT.prefix) == product_key(7) == "fs1:p:7"  # without Sentinel
    info = b"# Replication\r\nrole:master\r\nconnected_slaves:1\r\nmaster_replid:" + replid.encode()
    assert replication_identity(info) == ("master", replid)


def replication(role: str, replid: str) -> bytes:
    """An INFO replication reply, as a server gives it."""
    return f"# Replication\r\nrole:{role}\r\nmaster_replid:{replid}\r\n".encode()


def test_a_connection_admits_only_the_master_of_the_current_epoch():
    woken: list[bool] = []
    gate = MasterGate(lambda: woken.append(True))
    first, second = "a" * 40, "b" * 40
    assert gate.admit(("m1", 6379), replication("master", first)) == epoch_of(first)  # adopted
    assert not woken
    for role, replid in [("master", second), ("slave", first)]:  # a new master; our replica
        with pytest.raises(redis_lib.ConnectionError):
            gate.admit(("m2", 6379), replication(role, replid))
    assert gate.stranger and len(woken) == 2  # each refusal wakes the keeper
    gate.adopt(("m2", 6379), second)
    assert gate.admit(("m2", 6379), replication("master", second)) == epoch_of(second)
    assert gate.retired == {first}  # never adopted again


# Against real Sentinels


@dataclass
class Failover:
    """An app whose product 3 is cached (Redis and near cache), after a failover Sentinel made
    on request: the old master still runs. PostgreSQL has since changed product 3, and the
    promoted replica holds the entry from before under the old names, as if it had missed it."""

    app: Flask
    old: str  # the old master's key prefix
    new: str  # the new master's
    stock: int  # product 3's stock in PostgreSQL
    generation: int  # the near cache's, before


@pytest.fixture
def failover(sentinels, make_app, sql) -> Iterator[Failover]:
    app = make_app(**{name.lower(): value for name, value in sentinels.env.items()})
    http, near = app.test_client(), get_near(app)
    near.heartbeat()  # subscribed and trusted, as a worker's keeper makes it
    assert http.get("/api/products/3").headers["X-Cache"] == "MISS"
    assert http.get("/api/products/3").headers["X-Cache"] == "HIT"  # from Redis, kept near
    assert len(near) == 1
    old = epoch(sentinels.master)
    assert client(sentinels.master).get(old + "p:3") is not None  # named in the master's epoch
    generation = near.generation
    with client(sentinels.sentinels[0]) as s:
        s.execute_command("SENTINEL", "FAILOVER", NAME)
    assert poll(lambda: sentinels.master_port() == sentinels.replica.port, within=15, every=0.1)
    new = epoch(sentinels.replica)
    assert new != old
    (stock,) = sql(
        "UPDATE products SET stock = stock + 1, version = nextval('product_versions') "
        "WHERE id = 3 RETURNING stock"
    )[0]
    with client(sentinels.replica) as r:
        r.set(old + "p:3", encode_entry(1, stock - 1, b'{"id":3,"stock":%d}' % (stock - 1)))
    yield Failover(app, old, new, stock, generation)
    near.invalidations.close()


def reads_until_cached(failover: Failover) -> list[str]:
    """X-Cache of reads of product 3 until one is not BYPASS; each must show PostgreSQL's stock."""
    http, states = failover.app.test_client(), []

    def cached() -> bool:
        response = http.get("/api/products/3")
        assert response.status_code == 200
        assert response.json["stock"] == failover.stock, f"an old entry was served: {states}"
        states.append(response.headers["X-Cache"])
        return states[-1] != "BYPASS"

    assert poll(cached, within=10, every=0.05), states
    return states


@pytest.mark.live
def test_a_connection_refuses_the_new_master_until_the_keeper_has_adopted_it(failover, sentinels):
    """When Sentinel demotes the old master it closes its clients; redis-py reconnects to the
    new master, whose entries under the old names may predate PostgreSQL. That connection is
    refused (BYPASS, from PostgreSQL) and wakes the keeper, which adopts the new master and
    flushes the near cache; Redis is read again only then, under the new names."""
    with client(sentinels.master) as r:  # what Sentinel does to a master it demotes
        r.client_kill_filter(_type="normal")
        r.client_kill_filter(_type="pubsub")
    states = reads_until_cached(failover)
    assert states[0] == "BYPASS", states
    assert get_near(failover.app).generation > failover.generation  # flushed on the way
    assert client(sentinels.replica).get(failover.new + "p:3") is not None


@pytest.mark.live
def test_the_keeper_leaves_an_old_master_that_still_answers(failover, sentinels):
    """Until Sentinel demotes it, the old master answers on the connections it has; the keeper's
    sweep asks Sentinel which server is master, sees another, and moves the cache over."""
    cache = get_cache(failover.app)
    assert cache.gate is not None and cache.gate.epoch.prefix == failover.old
    get_keeper(failover.app).wake()  # the sweep a worker's keeper makes every second
    assert poll(lambda: cache.gate.epoch.prefix == failover.new, within=5)
    reads_until_cached(failover)
    assert get_near(failover.app).generation > failover.generation
    assert client(sentinels.replica).get(failover.new + "p:3") is not None


@dataclass
class Load:
    """What readers and writers saw while the master died."""

    reads: list[tuple[int, str]] = field(default_factory=list)  # (status, X-Cache)
    wrong: list[str] = field(default_factory=list)  # answers that disagreed with the database
    writes: list[tuple[int, str | None]] = field(default_factory=list)  # (status, Retry-After)
    acked: dict[int, int] = field(default_factory=dict)  # product -> acknowledged deltas
    unacked: list[int] = field(default_factory=list)  # writes given up on


def read_loop(
    server: LiveServer, expected: dict[int, int], stop: threading.Event, load: Load, n: int
) -> None:
    """Reads products, their stock and list pages, checking every answer against `expected`."""
    paths = [f"/api/products/{pid}" for pid in READ_IDS]
    paths += [f"/api/products/{pid}/stock" for pid in READ_IDS]
    paths += [f"/api/products?page={page}&limit=10" for page in range(1, 5)]  # as warmed
    cycle = itertools.islice(itertools.cycle(paths), n * 7, None)
    with requests.Session() as s:
        while not stop.is_set() and len(load.reads) < 50_000:
            path = next(cycle)
            try:
                r = s.get(server.url(path), timeout=10)
            except requests.RequestException as exc:
                load.reads.append((0, repr(exc)))
                continue
            load.reads.append((r.status_code, r.headers.get("X-Cache", "")))
            if r.status_code != 200:
                continue
            body = r.json()
            items = body.get("items", [body])
            for item in items:
                if item["stock"] != expected[item["id"]]:
                    load.wrong.append(f"{path}: {item} ({r.headers.get('X-Cache')})")


def write_loop(server: LiveServer, ids: list[int], stop: threading.Event, load: Load) -> None:
    """Adds 1 to each product in turn, retrying a write with its Idempotency-Key until answered."""
    with requests.Session() as s:
        for pid in itertools.cycle(ids):
            if stop.is_set() or len(load.writes) > 20_000:
                return
            key = uuid.uuid4().hex
            for _ in range(50):
                try:
                    r = s.post(
                        server.url(f"/api/products/{pid}/update-stock"),
                        json={"delta": 1},
                        headers={"Idempotency-Key": key},
                        timeout=10,
                    )
                except requests.RequestException:
                    load.writes.append((0, None))
                    continue
                load.writes.append((r.status_code, r.headers.get("Retry-After")))
                if r.status_code == 200:
                    load.acked[pid] = load.acked.get(pid, 0) + 1
                    break
                if r.status_code != 503:
                    load.unacked.append(pid)
                    break
            else:
                load.unacked.append(pid)


def running(target: Callable[..., None], *args: object) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def test_a_failover_under_load_fails_no_request_and_serves_nothing_the_old_master_kept(
    sentinels, live_server, sql
):
    """Two gevent workers under reads and writes; the master is killed and Sentinel promotes
    the replica, which never received the last write of product 7. Every read answers 200 with
    what PostgreSQL holds (BYPASS while Redis is out), every write is acknowledged and applied
    once, and afterwards Redis (under the new master's key names), both workers' near caches and
    the database agree."""
    server = live_server(**sentinels.env)
    master, replica = client(sentinels.master), client(sentinels.replica)
    old = epoch(sentinels.master)
    # Redis, then near caches. List pages too: a page filled later would write product 7's
    # entry again, and the replica would receive it.
    pages = [f"/api/products?page={page}&limit=10" for page in range(1, 5)]
    for path in ([f"/api/products/{pid}" for pid in READ_IDS] + pages) * 3:
        assert get(server, path).status_code == 200
    first_hit_per_worker(server, f"/api/products/{UNHEARD_ID}")
    stale_key = old + f"p:{STALE_ID}"
    before = poll(lambda: replica.get(stale_key), within=5)  # replicated
    assert post_stock(server, STALE_ID, stock=7777).status_code == 200
    assert poll(lambda: replica.get(stale_key) == master.get(stale_key), within=5)
    # The replica had not received that write when the master died: it keeps the entry before.
    replica.config_set("replica-read-only", "no")
    replica.set(stale_key, before, px=60_000)
    replica.config_set("replica-read-only", "yes")
    assert decode_entry(master.get(stale_key))[1] == 7777
    assert decode_entry(before)[1] != 7777

    expected = dict(sql("SELECT id, stock FROM products WHERE id <= %s", max(READ_IDS)))
    seeded = dict(sql("SELECT id, stock FROM products WHERE id BETWEEN %s AND %s", 41, 50))
    load, stop = Load(), threading.Event()
    threads = [running(read_loop, server, expected, stop, load, n) for n in range(3)]
    threads += [running(write_loop, server, list(WRITE_IDS)[n::2], stop, load) for n in range(2)]
    try:
        assert poll(lambda: len(load.reads) >= 200 and load.acked, within=10)
        os.kill(sentinels.master.pid, signal.SIGKILL)
        # A change made where this instance cannot hear of it (another host, while the channel
        # was down): only a flushed near cache answers it.
        (unheard,) = sql(
            "UPDATE products SET stock = stock + 100, version = nextval('product_versions') "
            "WHERE id = %s RETURNING stock",
            UNHEARD_ID,
        )[0]
        promoted = poll(lambda: sentinels.master_port() == sentinels.replica.port, within=20)
        assert promoted, "Sentinel did not promote the replica"
        streak = [0]

        def redis_in_use() -> bool:
            """Twenty reads in a row, each on a new connection (either worker), not BYPASS."""
            cached = get(server, "/api/products/2").headers["X-Cache"] != "BYPASS"
            streak[0] = streak[0] + 1 if cached else 0
            return streak[0] >= 20

        assert poll(redis_in_use, within=15), "the workers never used the new master"
        mark = len(load.reads)
        assert poll(lambda: len(load.reads) >= mark + 200, within=10)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)

    assert {status for status, _ in load.reads} == {200}, [r for r in load.reads if r[0] != 200]
    assert not load.wrong, load.wrong[:5]  # not one answer older than the database
    assert "BYPASS" in {state for _, state in load.reads}  # the failover was in the read path
    assert not load.unacked
    assert all(s == 200 or (s == 503 and after) for s, after in load.writes), set(load.writes)
    final = dict(sql("SELECT id, stock FROM products WHERE id BETWEEN %s AND %s", 41, 50))
    assert final == {pid: seeded[pid] + load.acked.get(pid, 0) for pid in WRITE_IDS}

    # What the promoted replica kept from the old master is still there, and never read.
    assert replica.get(stale_key) == before
    new = epoch(sentinels.replica)
    assert new != old
    assert get(server, f"/api/products/{STALE_ID}").json()["stock"] == 7777
    # Each worker's near cache was flushed: neither serves the copy it held from before.
    answers: dict[str, int] = {}

    def both_workers_answered() -> bool:
        response = get(server, f"/api/products/{UNHEARD_ID}")
        answers[response.headers["X-Request-ID"][:16]] = response.json()["stock"]
        return len(answers) >= 2

    assert poll(both_workers_answered, within=10, every=0)
    assert set(answers.values()) == {unheard}, answers
    # Redis under the new names, the near caches (the second round answers from them) and
    # PostgreSQL agree on every product and list page.
    rows = sql("SELECT id, stock, version FROM products ORDER BY id")
    for _ in range(2):
        for pid, stock, _ in rows:
            assert get(server, f"/api/products/{pid}").json()["stock"] == stock, pid
        for page in range(1, len(rows) // 10 + 1):
            items = get(server, f"/api/products?page={page}&limit=10").json()["items"]
            assert [(i["id"], i["stock"]) for i in items] == [
                (pid, stock) for pid, stock, _ in rows[(page - 1) * 10 : page * 10]
            ]
    held = 0
    for key in replica.scan_iter(match=new + "p:*", count=1000):
        pid = int(key.rsplit(b":", 1)[1])
        version, stock, _ = decode_entry(replica.get(key))
        assert (pid, stock, version) in rows, pid
        held += 1
    assert held == len(rows)
