"""Read replicas (DATABASE_REPLICA_URLS) on a real streaming replica of a PostgreSQL of the
module's own (`pg_basebackup -R`): misses are read there when it has caught up, never when it
lags behind an acknowledged write, and a replica stopped or hung costs no request."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import psycopg2
import pytest
import redis as redis_lib
import requests
from flask import Flask

from faststock import create_app, shared
from faststock.cache import CHANNEL, mark_key, page_key, product_key
from faststock.config import Config
from faststock.db import init_db
from faststock.replicas import get_replicas
from faststock.seed import product_row, seed
from tests.servers import REPLICATION, PgServer, fire, get, poll, post_stock

pytestmark = pytest.mark.live

PRODUCTS = 100
# The read statements of queries.py as pg_stat_statements shows them: every one, by id, a page.
# Each is counted under its PREPARE where it is prepared (queries.Prepared), hence the first %.
ANY_READ = "%SELECT id, name, price::text, stock, version, updated_at FROM products %"
PRODUCT_READ = ANY_READ[:-1] + "WHERE id = $1"
PAGE_READ = ANY_READ + "ORDER BY id%"


def run(url: str, query: str, *params: object) -> list[tuple]:
    with contextlib.closing(psycopg2.connect(url)) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description else []


def reads(url: str, pattern: str = ANY_READ) -> int:
    """How many times the server at `url` ran the read statements matching `pattern`."""
    query = (
        "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
        "WHERE query LIKE %s AND dbid = (SELECT oid FROM pg_database WHERE datname = 'faststock')"
    )
    return int(run(url, query, pattern)[0][0])


def caught_up(primary: PgServer, replica: PgServer) -> bool:
    """Whether the replica has replayed everything the primary has written so far. A transaction
    id is drawn first, so that a WAL record follows every position read before, the replay mark
    included (a mark read just after a record that ended on a WAL page boundary lies past the
    page's header, which replay reaches only with the next record)."""
    run(primary.url, "SELECT txid_current()")
    position = run(primary.url, "SELECT pg_current_wal_insert_lsn()")[0][0]

    def replayed() -> bool:
        return run(replica.url, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", position)[0][0]

    return poll(replayed, within=30)


def pause_replay(replica: PgServer) -> None:
    run(replica.url, "SELECT pg_wal_replay_pause()")
    paused = "SELECT pg_get_wal_replay_pause_state() = 'paused'"
    assert poll(lambda: run(replica.url, paused)[0][0], within=10)


def stock_on(url: str, product_id: int) -> int:
    return run(url, "SELECT stock FROM products WHERE id = %s", product_id)[0][0]


def answering(server: PgServer) -> bool:
    try:
        run(server.url, "SELECT 1")
    except psycopg2.OperationalError:
        return False
    return True


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PgServer, PgServer]]:
    """A primary that streams WAL (wal_level=replica) and its hot standby, for the module."""
    base = tmp_path_factory.mktemp("replication")
    primary = PgServer(base / "primary", REPLICATION).start()
    try:
        init_db(Config(database_url=primary.url))
        run(primary.url, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        replica = primary.replica(base / "replica")
        try:
            yield primary, replica
        finally:
            replica.destroy()
    finally:
        primary.destroy()


@pytest.fixture
def replicated(pair: tuple[PgServer, PgServer], config: Config) -> Iterator[Config]:
    """Products 1..100 as seeded on the primary, the replica running, replaying and caught up,
    and an empty Redis. The replica is left running and replaying, whatever the test did."""
    primary, replica = pair
    if not answering(replica):
        replica.start()
    run(replica.url, "SELECT pg_wal_replay_resume()")
    config = replace(
        config,  # the suite's settings, on this module's primary and replica
        database_url=primary.url,
        database_replica_urls=replica.url,
        near_cache_size=0,  # misses are the point here; the gunicorn tests keep it on
    )
    seed(config, PRODUCTS, reset=True)
    redis_lib.Redis.from_url(config.redis_url).flushdb()
    assert caught_up(primary, replica)
    yield config
    if not answering(replica):
        replica.start()
    run(replica.url, "SELECT pg_wal_replay_resume()")


@pytest.fixture
def make(replicated: Config) -> Callable[..., Flask]:
    def build(**overrides: object) -> Flask:
        app = create_app(replace(replicated, **overrides))
        app.testing = True
        return app

    return build


@pytest.fixture
def cache(redis_url: str) -> redis_lib.Redis:
    return redis_lib.Redis.from_url(redis_url)


def forget(cache: redis_lib.Redis, ids: list[int], pages: list[tuple[int, int]] = ()) -> None:
    """What expiry or eviction does to these entries: gone from Redis, and from every worker's
    near cache (announced as another host's change would be)."""
    keys = [product_key(i) for i in ids] + [page_key(p, n) for p, n in pages]
    cache.delete(*keys)
    if ids:
        cache.publish(CHANNEL, ",".join(map(str, ids)))


def seeded_stock(product_id: int) -> int:
    return product_row(product_id)[3]


def test_misses_are_read_from_the_replica_once_it_has_caught_up(make, pair, cache):
    primary, replica = pair
    client = make().test_client()
    on_primary = reads(primary.url)
    first = client.get("/api/products/1")  # no mark yet: the primary answers, and sets it
    assert first.status_code == 200 and first.headers["X-Cache"] == "MISS"
    assert int(cache.get(mark_key()), 16) > 0
    assert reads(primary.url) == on_primary + 1
    assert caught_up(primary, replica)
    on_primary, on_replica = reads(primary.url), reads(replica.url, PRODUCT_READ)
    pages_on_replica = reads(replica.url, PAGE_READ)
    for product_id in range(2, 12):
        response = client.get(f"/api/products/{product_id}")
        assert response.status_code == 200 and response.headers["X-Cache"] == "MISS"
        assert response.json["stock"] == seeded_stock(product_id)
    listed = client.get("/api/products?page=3&limit=5")
    assert [item["id"] for item in listed.json["items"]] == [11, 12, 13, 14, 15]
    assert reads(replica.url, PRODUCT_READ) - on_replica == 10
    assert reads(replica.url, PAGE_READ) - pages_on_replica == 1
    assert reads(primary.url) == on_primary
    assert client.get("/api/products/2").headers["X-Cache"] == "HIT"


def test_statements_on_the_replica_are_timed_under_their_names(make, pair):
    client = make().test_client()
    client.get("/api/products/1")  # sets the mark, on the primary
    assert caught_up(*pair)
    client.get("/api/products/2")  # on the replica
    metrics = client.get("/metrics").get_data(as_text=True)
    timed = 'faststock_db_statement_duration_seconds_count{query="replay_position"}'
    assert timed in metrics
    assert 'faststock_db_statement_duration_seconds_count{query="fetch_product"} 2.0' in metrics


def test_read_your_writes_while_the_replica_is_paused(make, pair, cache):
    primary, replica = pair
    client = make().test_client()
    for path in ("/api/products/7", "/api/products/8", "/api/products?page=1&limit=10"):
        assert client.get(path).status_code == 200
    assert caught_up(primary, replica)
    pause_replay(replica)
    on_replica = reads(replica.url)
    assert client.post("/api/products/7/update-stock", json={"stock": 777}).status_code == 200
    assert client.post("/api/products/8/update-stock", json={"delta": 5}).status_code == 200
    eight = seeded_stock(8) + 5
    assert stock_on(replica.url, 7) == seeded_stock(7)  # the replica really is behind

    def everything_new() -> None:
        assert client.get("/api/products/7").json["stock"] == 777
        assert client.get("/api/products/7/stock").json == {"id": 7, "stock": 777}
        assert client.get("/api/products/8").json["stock"] == eight
        items = {i["id"]: i["stock"] for i in client.get("/api/products?limit=10").json["items"]}
        assert (items[7], items[8]) == (777, eight)

    everything_new()  # the write-through
    forget(cache, [7, 8], [(1, 10)])  # every entry expired: product misses, a page miss
    everything_new()
    forget(cache, [], [(1, 10)])  # the page read again from the database, entries kept
    everything_new()
    forget(cache, [7, 8])  # the page kept, its entries expired: fetched by id
    everything_new()
    assert reads(replica.url) == on_replica  # nothing came from the lagging replica

    run(replica.url, "SELECT pg_wal_replay_resume()")
    assert caught_up(primary, replica)

    def from_replica() -> bool:
        forget(cache, [7])
        assert client.get("/api/products/7").json["stock"] == 777
        return reads(replica.url) > on_replica

    assert poll(from_replica, within=30)


def test_read_your_writes_when_the_write_through_fails(make, pair, cache):
    """The write's entry and mark never reach Redis: this host bypasses Redis until the keeper
    has raised the mark past the write, and a miss after that still finds the replica behind."""
    primary, replica = pair
    client = make(redis_timeout_ms=100).test_client()
    assert client.get("/api/products/9").status_code == 200
    assert client.post("/api/products/10/update-stock", json={"stock": 1}).status_code == 200
    assert caught_up(primary, replica)  # past the mark as it stands
    pause_replay(replica)
    cache.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")  # reads answer, scripts wait
    try:
        answer = client.post("/api/products/9/update-stock", json={"stock": 999})
        assert answer.status_code == 200
        assert shared.is_dirty()
        bypassed = client.get("/api/products/9")
        assert bypassed.headers["X-Cache"] == "BYPASS" and bypassed.json["stock"] == 999
    finally:
        cache.execute_command("CLIENT", "UNPAUSE")
    assert poll(lambda: not shared.is_dirty(), within=15)  # the keeper has replayed the outbox
    forget(cache, [9], [(1, 10)])
    response = client.get("/api/products/9")
    assert response.headers["X-Cache"] == "MISS" and response.json["stock"] == 999
    listed = client.get("/api/products?limit=10").json["items"]
    assert [i["stock"] for i in listed if i["id"] == 9] == [999]
    assert stock_on(replica.url, 9) == seeded_stock(9)


def test_a_stopped_replica_costs_no_request_and_is_used_again_after_the_back_off(make, pair, cache):
    primary, replica = pair
    app = make()
    client = app.test_client()
    assert client.get("/api/products/1").status_code == 200  # the mark
    assert caught_up(primary, replica)
    replica.stop()
    for product_id in range(2, 32):
        response = client.get(f"/api/products/{product_id}")
        assert response.status_code == 200, response.json
        assert response.json["stock"] == seeded_stock(product_id)
    assert client.get("/api/products?page=5&limit=7").status_code == 200
    (member,) = get_replicas(app).members
    assert member.backoff > 0  # skipped, not tried on every read

    replica.start()
    on_replica = reads(replica.url)

    def back_in_use() -> bool:
        forget(cache, [40])
        response = client.get("/api/products/40")
        assert response.status_code == 200 and response.json["stock"] == seeded_stock(40)
        return reads(replica.url) > on_replica

    assert poll(back_in_use, within=40, every=0.1)
    assert member.backoff == 0


def test_a_server_that_is_not_a_replica_is_never_read(make, pair):
    primary, _ = pair
    app = make(database_replica_urls=primary.url)
    client = app.test_client()
    for product_id in (1, 2, 3):
        assert client.get(f"/api/products/{product_id}").status_code == 200
    assert client.post("/api/products/3/update-stock", json={"stock": 3}).status_code == 200
    run(primary.url, "SELECT pg_stat_statements_reset()")
    client.get("/api/products/4")
    assert reads(primary.url, "SELECT pg_last_wal_replay_lsn()%") == 1  # asked, then refused
    assert reads(primary.url, PRODUCT_READ) == 1  # and the product read once, as the primary


# Real gunicorn, 2 gevent workers, near caches on.


@pytest.fixture
def live(replicated: Config, live_server) -> Callable[..., object]:
    def start(**env: str) -> object:
        return live_server(
            DATABASE_URL=replicated.database_url,
            DATABASE_REPLICA_URLS=replicated.database_replica_urls,
            REDIS_URL=replicated.redis_url,
            ALLOW_ANONYMOUS_WRITES="1",
            **env,
        )

    return start


def test_under_gunicorn_replica_reads_and_read_your_writes(live, pair, cache):
    primary, replica = pair
    server = live()
    assert get(server, "/api/products/1").status_code == 200  # the mark
    assert caught_up(primary, replica)
    on_primary, on_replica = reads(primary.url), reads(replica.url)
    responses = fire([lambda i=i: get(server, f"/api/products/{i}") for i in range(2, 42)])
    assert [r.status_code for r in responses] == [200] * 40
    assert [r.json()["stock"] for r in responses] == [seeded_stock(i) for i in range(2, 42)]
    assert reads(replica.url) - on_replica == 40
    assert reads(primary.url) == on_primary

    assert caught_up(primary, replica)
    pause_replay(replica)
    assert post_stock(server, 5, stock=555).status_code == 200
    assert post_stock(server, 6, delta=-1).status_code == 200
    six = seeded_stock(6) - 1
    assert stock_on(replica.url, 5) == seeded_stock(5)
    paths = ["/api/products/5", "/api/products/5/stock", "/api/products/6"]
    paths += ["/api/products?limit=10", "/api/products?page=2&limit=3"]

    def check(responses: list[requests.Response]) -> None:
        for response in responses:
            assert response.status_code == 200
            body = response.json()
            items = body.get("items", [body])
            stocks = {item["id"]: item["stock"] for item in items}
            assert stocks.get(5, 555) == 555 and stocks.get(6, six) == six, body

    for _ in range(3):  # both workers, entries present, then expired, then the pages only
        check(fire([lambda p=p: get(server, p) for p in paths * 4]))
        forget(cache, [5, 6], [(1, 10), (2, 3)])
        check(fire([lambda p=p: get(server, p) for p in paths * 4]))
        forget(cache, [], [(1, 10), (2, 3)])

    cache.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")  # the write-through fails
    try:
        assert post_stock(server, 5, stock=5005).status_code == 200
    finally:
        cache.execute_command("CLIENT", "UNPAUSE")
    paths = ["/api/products/5", "/api/products/5/stock", "/api/products?limit=10"]

    def shows_5005(response: requests.Response) -> bool:
        body = response.json()
        return {i["id"]: i["stock"] for i in body.get("items", [body])}[5] == 5005

    for _ in range(3):
        responses = fire([lambda p=p: get(server, p) for p in paths * 4])
        assert all(r.status_code == 200 and shows_5005(r) for r in responses)
        forget(cache, [5], [(1, 10)])
    assert stock_on(replica.url, 5) == seeded_stock(5)
    assert "Traceback" not in server.log()


def test_under_gunicorn_a_stopped_or_hung_replica_costs_no_request(live, pair, cache):
    primary, replica = pair
    server = live()
    assert get(server, "/api/products/1").status_code == 200  # the mark
    assert caught_up(primary, replica)
    replica.stop()
    responses = fire([lambda i=i: get(server, f"/api/products/{i}") for i in range(2, 62)])
    assert [r.status_code for r in responses] == [200] * 60
    assert [r.json()["stock"] for r in responses] == [seeded_stock(i) for i in range(2, 62)]
    replica.start()
    on_replica = reads(replica.url)
    statuses: list[int] = []

    def back_in_use() -> bool:
        forget(cache, [70, 71])
        statuses.extend(r.status_code for r in fire([lambda: get(server, "/api/products/70")] * 2))
        statuses.append(get(server, "/api/products/71").status_code)
        return reads(replica.url) > on_replica

    assert poll(back_in_use, within=40, every=0.1)
    assert set(statuses) == {200}

    # Hung (SIGSTOP): the reads on it wait out its short timeouts (about 2 s), then the primary
    # answers them, and the ones after.
    replica.pause()
    try:
        started = time.monotonic()
        responses = fire([lambda i=i: get(server, f"/api/products/{i}") for i in range(72, 92)])
        assert [r.status_code for r in responses] == [200] * 20
        assert [r.json()["stock"] for r in responses] == [seeded_stock(i) for i in range(72, 92)]
        assert time.monotonic() - started < 8
        responses = fire([lambda i=i: get(server, f"/api/products/{i}") for i in range(92, 101)])
        assert [r.status_code for r in responses] == [200] * 9
    finally:
        replica.resume()
    assert "Traceback" not in server.log()
