"""Every metric of the contract is exposed with its labels, exact across workers, and moves when
its event happens; METRICS=0 turns all of it off and leaves the fast lane working."""

from __future__ import annotations

import gc
import inspect
import math
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from faststock import queries
from faststock.cache import get_cache
from faststock.db import PoolTimeout, get_pool
from faststock.fastlane import FastLane
from faststock.metrics import BUCKETS, STOCK_KINDS, STOCK_OUTCOMES, get_metrics
from faststock.nearcache import get_near
from faststock.outbox import get_keeper
from tests.servers import get, poll, post_stock, row_locked, wait_for_lock_waiter

# name (as the text parser names the family: counters without _total) -> (type, label names)
CONTRACT = {
    "flask_http_request_duration_seconds": ("histogram", {"method", "route", "status"}),
    "flask_http_request": ("counter", {"method", "status"}),
    "faststock_cache_requests": ("counter", {"endpoint", "result"}),
    "faststock_near_cache_requests": ("counter", {"endpoint", "result"}),
    "faststock_near_cache_invalidations": ("counter", {"source"}),
    "faststock_near_cache_entries": ("gauge", set()),
    "faststock_redis_breaker_open": ("gauge", {"pid"}),
    "faststock_redis_breaker_openings": ("counter", set()),
    "faststock_db_pool_size": ("gauge", set()),
    "faststock_db_pool_in_use": ("gauge", set()),
    "faststock_db_pool_waiters": ("gauge", set()),
    "faststock_db_pool_wait_seconds": ("histogram", set()),
    "faststock_db_pool_timeouts": ("counter", set()),
    "faststock_db_statement_duration_seconds": ("histogram", {"query"}),
    "faststock_stock_changes": ("counter", {"kind", "outcome"}),
    "faststock_outbox_backlog": ("gauge", set()),
    "faststock_outbox_replays": ("counter", set()),
    "faststock_worker_cpu_seconds": ("gauge", {"pid"}),
    "faststock_worker_resident_memory_bytes": ("gauge", {"pid"}),
    "faststock_worker_open_fds": ("gauge", {"pid"}),
}
PER_WORKER = [name for name, (_, labels) in CONTRACT.items() if labels == {"pid"}]


class Scrape:
    """One /metrics text, parsed by prometheus_client's own parser."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def labels(self, family: str) -> set[str]:
        """The label names of a family's series (`le` of histogram buckets left out)."""
        return {k for s in self.families[family].samples for k in s.labels if k != "le"}

    def total(self, sample: str, **labels: str) -> float:
        """Sum of the samples called `sample` whose labels include `labels`."""
        family = self.families.get(_family_of(sample))
        if family is None:
            return 0.0
        return sum(
            s.value
            for s in family.samples
            if s.name == sample and labels.items() <= s.labels.items()
        )

    def by(self, sample: str, *names: str) -> dict[tuple[str, ...], float]:
        """The samples called `sample`, keyed by the values of `names`."""
        family = self.families[_family_of(sample)]
        return {
            tuple(s.labels[n] for n in names): s.value for s in family.samples if s.name == sample
        }


def _family_of(sample: str) -> str:
    for suffix in ("_total", "_count", "_sum", "_bucket"):
        if sample.endswith(suffix):
            return sample[: -len(suffix)]
    return sample


def scrape_client(client) -> Scrape:
    response = client.get("/metrics")
    assert response.status_code == 200
    return Scrape(response.get_data(as_text=True))


def scrape_server(server) -> Scrape:
    response = get(server, "/metrics")
    assert response.status_code == 200
    return Scrape(response.text)


@pytest.fixture
def trusted(make_app):
    """An app whose near cache is subscribed and trusted, as a worker's keeper makes it."""
    apps = []

    def make(**overrides):
        app = make_app(**overrides)
        near = get_near(app)
        if near.enabled:
            near.heartbeat()
            assert near.usable()
        apps.append(app)
        return app

    yield make
    for app in apps:
        get_near(app).invalidations.close()


def test_every_contract_metric_is_exposed_with_its_labels(trusted):
    client = trusted().test_client()
    client.get("/api/products/3")
    client.get("/api/products/3")
    client.post("/api/products/3/update-stock", json={"delta": 1})
    scrape = scrape_client(client)
    for name, (kind, labels) in CONTRACT.items():
        assert name in scrape.families, name
        assert scrape.families[name].type == kind, name
        assert scrape.labels(name) == labels, name
    assert set(scrape.by("faststock_stock_changes_total", "kind", "outcome")) == {
        (kind, outcome) for kind in STOCK_KINDS for outcome in STOCK_OUTCOMES
    }
    assert set(scrape.by("faststock_near_cache_invalidations_total", "source")) == {
        ("write",),
        ("channel",),
        ("flush",),
    }
    reads = scrape.by("faststock_near_cache_requests_total", "endpoint", "result")
    assert set(reads) == {
        (e, r) for e in ("product", "stock", "list") for r in ("hit", "miss", "off")
    }
    for name in PER_WORKER:
        assert scrape.by(name, "pid").keys() == {(str(os.getpid()),)}, name
    assert scrape.total("faststock_redis_breaker_open") == 0
    for name in PER_WORKER[1:]:  # the process's own figures
        assert scrape.total(name) > 0, name


def test_request_latency_buckets_start_at_a_quarter_millisecond(client):
    client.get("/api/products/1")
    scrape = scrape_client(client)
    bounds = scrape.by("flask_http_request_duration_seconds_bucket", "route", "le")
    product = sorted(float(le) for route, le in bounds if route == "/api/products/<raw_id>")
    assert product == [*BUCKETS, math.inf]
    assert BUCKETS[0] == 0.00025 and BUCKETS[-1] == 5.0


def test_stock_changes_are_counted_by_kind_and_outcome(client):
    def post(product_id: int, key: str | None = None, **body: int) -> int:
        headers = {"Idempotency-Key": key} if key else {}
        path = f"/api/products/{product_id}/update-stock"
        return client.post(path, json=body, headers=headers).status_code

    assert post(1, stock=5) == 200
    assert post(1, delta=-10) == 409
    assert post(1, delta=2_147_483_647) == 409
    assert post(9999, delta=1) == 404
    assert post(2, key="order-1", delta=1) == 200
    assert post(2, key="order-1", delta=1) == 200  # replayed
    assert post(2, key="order-1", delta=2) == 422
    assert post(3, stock=-1) == 400  # refused by validation: no change to count
    counted = scrape_client(client).by("faststock_stock_changes_total", "kind", "outcome")
    assert {k: v for k, v in counted.items() if v} == {
        ("set", "applied"): 1,
        ("delta", "insufficient"): 1,
        ("delta", "out_of_range"): 1,
        ("delta", "not_found"): 1,
        ("delta", "applied"): 1,
        ("delta", "replayed"): 1,
        ("delta", "key_reused"): 1,
    }


def test_a_request_is_counted_in_memory_and_flushed_within_a_quarter_second(client):
    """A multiprocess update is a locked write to a file: a write's nine of them cost it
    measurably, so every count waits in the worker's memory for the next flush."""
    metrics = get_metrics(client.application)
    applied = metrics.stock_changes[("delta", "applied")]
    requests_seen = metrics.request_total.labels("POST", "200")
    assert client.post("/api/products/1/update-stock", json={"delta": 1}).status_code == 200
    assert (applied._value.get(), requests_seen._value.get()) == (0, 0)  # not written yet
    assert poll(lambda: applied._value.get() == 1, within=2)  # the flushing thread's doing
    assert requests_seen._value.get() == 1


def test_the_flushing_thread_ends_with_its_app(make_app):
    """Apps made and dropped (tests, `flask` commands) leave no thread behind."""
    app = make_app()
    before = set(threading.enumerate())
    assert app.test_client().get("/api/products/1").status_code == 200
    (flusher,) = (t for t in set(threading.enumerate()) - before if t.name == "faststock-tally")
    del app
    gc.collect()
    assert poll(lambda: not flusher.is_alive(), within=2)


def test_reads_are_counted_by_cache_and_near_cache_outcome(trusted):
    app = trusted()
    client = app.test_client()
    assert client.get("/api/products/5").headers["X-Cache"] == "MISS"  # kept in the near cache
    assert client.get("/api/products/5").headers["X-Cache"] == "HIT"  # the fast lane's
    assert client.get("/api/products/5/stock").headers["X-Cache"] == "HIT"
    assert client.get("/api/products/abc").status_code == 400  # not a read
    scrape = scrape_client(client)  # flushes the lane's counts
    assert {
        k: v
        for k, v in scrape.by("faststock_cache_requests_total", "endpoint", "result").items()
        if v
    } == {
        ("product", "MISS"): 1,
        ("product", "HIT"): 1,
        ("stock", "HIT"): 1,
    }
    near = scrape.by("faststock_near_cache_requests_total", "endpoint", "result")
    assert {k: v for k, v in near.items() if v} == {
        ("product", "miss"): 1,
        ("product", "hit"): 1,
        ("stock", "hit"): 1,
    }
    assert scrape.total("faststock_near_cache_entries") == get_near(app).entries == 1

    off = trusted(near_cache_size=0).test_client()
    off.get("/api/products?page=2&limit=3")
    near = scrape_client(off).by("faststock_near_cache_requests_total", "endpoint", "result")
    assert {k: v for k, v in near.items() if v} == {("list", "off"): 1}


def test_near_cache_invalidations_are_counted_by_source(trusted):
    app = trusted()
    client = app.test_client()
    near = get_near(app)

    def invalidations() -> dict[str, float]:
        by_source = scrape_client(client).by("faststock_near_cache_invalidations_total", "source")
        return {source: value for (source,), value in by_source.items()}

    before = invalidations()
    assert client.post("/api/products/6/update-stock", json={"delta": 1}).status_code == 200
    assert invalidations()["write"] == before["write"] + 1

    def heard() -> bool:
        near.usable()  # drains the change channel, as every hit does
        return invalidations()["channel"] == before["channel"] + 1

    assert poll(heard, within=5), invalidations()
    get_cache(app).clear()  # tells every near cache to drop everything

    def flushed() -> bool:
        near.usable()
        return invalidations()["flush"] == before["flush"] + 1

    assert poll(flushed, within=5), invalidations()


def test_statements_are_timed_by_query_function(client):
    client.get("/api/products/3")
    client.post("/api/products/3/update-stock", json={"delta": 1})
    timed = scrape_client(client).by("faststock_db_statement_duration_seconds_count", "query")
    assert timed[("fetch_product",)] == 1
    assert timed[("add_stock",)] == 1


def test_every_statement_function_is_timed():
    functions = [
        function
        for function in vars(queries).values()
        if inspect.isfunction(function)
        and function.__module__ == queries.__name__
        and list(inspect.signature(function).parameters)[:1] == ["cur"]
    ]
    assert len(functions) > 10
    assert all(hasattr(function, "__wrapped__") for function in functions), [
        f.__name__ for f in functions if not hasattr(f, "__wrapped__")
    ]
    # ... and timed once: a second decorator would count every statement twice.
    assert not [f.__name__ for f in functions if hasattr(f.__wrapped__, "__wrapped__")]


def test_pool_metrics_follow_its_connections(make_app):
    app = make_app(db_pool_size=1, db_pool_timeout=0.3)
    client = app.test_client()
    pool = get_pool(app)

    def state() -> tuple[float, ...]:
        scrape = scrape_client(client)
        return tuple(
            scrape.total(name)
            for name in (
                "faststock_db_pool_size",
                "faststock_db_pool_in_use",
                "faststock_db_pool_waiters",
                "faststock_db_pool_timeouts_total",
                "faststock_db_pool_wait_seconds_count",
            )
        )

    assert state() == (1, 0, 0, 0, 0)
    held = pool.acquire()
    assert state() == (1, 1, 0, 0, 1)
    with ThreadPoolExecutor(1) as executor:
        waiter = executor.submit(pool.acquire)
        assert poll(lambda: state()[2] == 1, within=5), state()
        pool.release(held)
        held = waiter.result(timeout=5)
    assert state() == (1, 1, 0, 0, 2)
    with pytest.raises(PoolTimeout):
        pool.acquire()
    assert state() == (1, 1, 0, 1, 2)
    assert client.get("/api/products/77").status_code == 503  # the request's own timeout
    assert state() == (1, 1, 0, 2, 2)
    pool.release(held)
    assert state() == (1, 0, 0, 2, 2)


def test_readyz_reports_breaker_pool_and_outbox(make_app):
    app = make_app(db_pool_size=4)
    client = app.test_client()
    keeper = get_keeper(app)
    keeper.wake()  # a worker's keeper counts the backlog after every pass
    assert poll(lambda: keeper.backlog is not None, within=5)
    body = client.get("/readyz").get_json()
    assert body == {
        "status": "ok",
        "postgres": "ok",
        "redis": "ok",
        "breaker": {"state": "closed", "openings": 0},
        "pool": {"size": 4, "in_use": 0, "waiters": 0},
        "outbox": {"backlog": 0},
    }
    held = get_pool(app).acquire()
    try:
        assert client.get("/readyz").get_json()["pool"] == {"size": 4, "in_use": 1, "waiters": 0}
    finally:
        get_pool(app).release(held)
        get_near(app).invalidations.close()  # the keeper's pass subscribed it

    down = make_app(database_url="postgresql://faststock@127.0.0.1:1/faststock")
    response = down.test_client().get("/readyz")
    assert response.status_code == 503
    body = response.get_json()
    assert (body["error"], body["postgres"], body["redis"]) == ("unavailable", "unavailable", "ok")
    assert body["breaker"] == {"state": "closed", "openings": 0}
    assert body["pool"]["size"] == 10 and body["outbox"] == {"backlog": None}


def test_a_redis_outage_moves_the_breaker_and_outbox_metrics(trusted, private_redis):
    app = trusted(redis_url=private_redis.url, redis_timeout_ms=100)
    client = app.test_client()
    cache = get_cache(app)

    def state() -> tuple[float, ...]:
        scrape = scrape_client(client)
        return tuple(
            scrape.total(name)
            for name in (
                "faststock_redis_breaker_open",
                "faststock_redis_breaker_openings_total",
                "faststock_outbox_backlog",
                "faststock_outbox_replays_total",
            )
        )

    assert client.get("/api/products/8").headers["X-Cache"] == "MISS"
    assert state() == (0, 0, 0, 0)
    private_redis.stop()
    try:
        for _ in range(cache.breaker.threshold + 1):
            assert client.get("/api/products/9").headers["X-Cache"] == "BYPASS"
        assert cache.breaker.is_open
        assert client.post("/api/products/8/update-stock", json={"stock": 1}).status_code == 200
        # The write could not reach Redis: its outbox record stays until Redis is back.
        assert poll(lambda: state() == (1, 1, 1, 0), within=5), state()
        ready = client.get("/readyz").get_json()
        assert ready["redis"] == "unavailable"
        assert ready["breaker"] == {"state": "open", "openings": 1}
        assert ready["outbox"] == {"backlog": 1}
    finally:
        private_redis.start()
    assert poll(lambda: state() == (0, 1, 0, 1), within=10), state()
    assert client.get("/readyz").get_json()["breaker"] == {"state": "closed", "openings": 1}


def test_metrics_0_turns_every_metric_off_and_keeps_the_fast_lane(trusted):
    app = trusted(metrics=False)
    client = app.test_client()
    response = client.get("/metrics")
    assert response.status_code == 404
    assert response.get_json()["error"] == "not_found"
    assert get_metrics(app) is None
    assert get_pool(app).observer is None
    assert get_cache(app).breaker.on_change is None
    assert get_near(app).on_invalidated is None
    assert get_keeper(app).on_backlog is None and get_keeper(app).on_replayed is None

    assert isinstance(app.wsgi_app, FastLane)
    flask = app.wsgi_app.wsgi_app
    reached_flask: list[str] = []

    def counted(environ, start_response):
        reached_flask.append(environ["PATH_INFO"])
        return flask(environ, start_response)

    app.wsgi_app.wsgi_app = counted
    assert client.get("/api/products/4").headers["X-Cache"] == "MISS"
    assert client.get("/api/products/4").headers["X-Cache"] == "HIT"
    assert client.post("/api/products/4/update-stock", json={"delta": -1}).status_code == 200
    assert reached_flask == ["/api/products/4", "/api/products/4/update-stock"]


# Through real gunicorn with two gevent workers.


def test_counters_grow_by_exactly_the_requests_across_workers(live_server):
    server = live_server(WEB_CONCURRENCY="2")

    def counted() -> tuple[float, ...]:
        scrape = scrape_server(server)
        return (
            scrape.total("flask_http_request_total"),
            scrape.total("flask_http_request_duration_seconds_count"),
            scrape.total("faststock_cache_requests_total"),
            scrape.total("faststock_near_cache_requests_total"),
            scrape.total("faststock_stock_changes_total"),
        )

    before = counted()
    paths = [f"/api/products/{i % 7 + 1}" for i in range(200)]
    paths += [f"/api/products/{i % 5 + 1}/stock" for i in range(100)]
    paths += ["/api/products?page=2&limit=5"] * 100
    paths += ["/api/products/99999"] * 20  # 404: a read all the same
    paths += ["/api/products/abc"] * 10  # 400: a request, not a read
    writes = 20
    with requests.Session() as a, requests.Session() as b:  # two connections: both workers
        for i, path in enumerate(paths):
            assert (a if i % 2 else b).get(server.url(path)).status_code in (200, 400, 404)
        for i in range(writes):
            url = server.url("/api/products/50/update-stock")
            assert (a if i % 2 else b).post(url, json={"delta": 1}).status_code == 200
    reads = len(paths) - 10
    want = (len(paths) + writes, len(paths) + writes, reads, reads, writes)

    def grown() -> tuple[float, ...]:
        return tuple(now - then for now, then in zip(counted(), before, strict=True))

    assert poll(lambda: grown() == want, within=5), (grown(), want)
    hits = scrape_server(server).total("faststock_near_cache_requests_total", result="hit")
    assert hits > 300  # most reads were near-cache hits, answered by the fast lane


def test_every_contract_metric_is_exposed_per_worker_and_dead_workers_drop_out(live_server):
    server = live_server(WEB_CONCURRENCY="2", DB_POOL_SIZE="3")
    for path in ("/api/products/1", "/api/products/1", "/api/products?page=1"):
        assert get(server, path).status_code == 200
    assert post_stock(server, 1, delta=1).status_code == 200

    def pids(scrape: Scrape, name: str) -> set[int]:
        return {int(pid) for (pid,) in scrape.by(name, "pid")}

    workers = set(server.workers)

    def both() -> Scrape | None:
        """Both workers started (their gauges are set once their app is built) and have flushed
        what they counted (the worker that did not answer the scrape does so within 0.25 s)."""
        scrape = scrape_server(server)
        started = all(pids(scrape, name) == workers for name in PER_WORKER)
        flushed = CONTRACT.keys() <= scrape.families.keys()
        # DB_POOL_SIZE of each live worker
        return (
            scrape if started and flushed and scrape.total("faststock_db_pool_size") == 6 else None
        )

    scrape = poll(both, within=10)
    assert scrape, "both workers' gauges"
    for name, (kind, labels) in CONTRACT.items():
        assert name in scrape.families, name
        assert scrape.families[name].type == kind, name
        assert scrape.labels(name) == labels, name

    gone = min(workers)
    os.kill(gone, signal.SIGKILL)

    def replaced() -> Scrape | None:
        now = set(server.workers)
        if len(now) != 2 or gone in now:
            return None
        scrape = scrape_server(server)
        if all(pids(scrape, name) == now for name in PER_WORKER):
            return scrape
        return None

    assert poll(replaced, within=30), "the dead worker's gauges are still reported"
    # The new worker's pool, and not the dead one's, once it has started.
    assert poll(lambda: scrape_server(server).total("faststock_db_pool_size") == 6, within=10)


def test_a_metrics_file_left_empty_does_not_fail_the_scrape(live_server, tmp_path):
    """prometheus_client creates a worker's file before sizing it: a scrape in that instant, or
    after the worker was killed in it, must still answer."""
    server = live_server(TMPDIR=str(tmp_path))  # gunicorn.conf.py's metrics dir goes there
    (directory,) = tmp_path.glob("faststock-metrics-*")
    (directory / "counter_1.db").touch()
    (directory / "gauge_liveall_1.db").touch()
    assert get(server, "/api/products/1").status_code == 200

    def counted() -> Scrape | None:
        """Once the worker that answered has flushed (at once if it also answers the scrape)."""
        scrape = scrape_server(server)
        found = scrape.total("faststock_cache_requests_total", endpoint="product")
        return scrape if found else None

    scrape = poll(counted, within=5)
    assert scrape and scrape.total("faststock_cache_requests_total", endpoint="product") == 1
    assert "1" not in {pid for (pid,) in scrape.by("faststock_worker_open_fds", "pid")}


def test_pool_waiters_and_timeouts_under_gunicorn(live_server, fresh, sql):
    """The worker's keeper uses the pool too (once a second), hence the lower bounds."""
    server = live_server(WEB_CONCURRENCY="1", DB_POOL_SIZE="1", DB_POOL_TIMEOUT="1")
    assert get(server, "/api/products/5").status_code == 200  # the connection is open

    def pool() -> tuple[float, float, float]:
        scrape = scrape_server(server)
        return (
            scrape.total("faststock_db_pool_in_use"),
            scrape.total("faststock_db_pool_waiters"),
            scrape.total("faststock_db_pool_timeouts_total"),
        )

    assert poll(lambda: pool() == (0, 0, 0), within=5), pool()
    reads = [f"/api/products/{i}" for i in (71, 72, 73)]  # not cached: each needs PostgreSQL
    with ThreadPoolExecutor(4) as executor, row_locked(fresh.database_url, 5):
        write = executor.submit(post_stock, server, 5, delta=1)
        wait_for_lock_waiter(sql)  # the write holds the only connection
        waiting = [executor.submit(get, server, path) for path in reads]
        assert poll(lambda: pool()[0] == 1 and pool()[1] >= len(reads), within=5), pool()
        assert [r.result(timeout=10).status_code for r in waiting] == [503] * len(reads)
        assert pool()[2] >= len(reads)
    assert write.result(timeout=10).status_code == 200
    assert poll(lambda: pool()[:2] == (0, 0), within=5), pool()


def test_metrics_0_under_gunicorn_writes_no_metric(live_server, tmp_path):
    server = live_server(METRICS="0", TMPDIR=str(tmp_path))  # gunicorn.conf.py's metrics dir
    assert get(server, "/metrics").status_code == 404
    states = [get(server, "/api/products/2").headers["X-Cache"] for _ in range(6)]
    assert states[0] == "MISS" and "HIT" in states
    assert post_stock(server, 2, delta=1).status_code == 200
    assert get(server, "/readyz").status_code == 200
    directories = list(tmp_path.glob("faststock-metrics-*"))
    assert len(directories) == 1 and not list(directories[0].glob("*.db"))
