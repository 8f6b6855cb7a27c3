"""Prometheus metrics: per-route latency and status from prometheus-flask-exporter, plus ours.

Requests are labelled by route template (`/api/products/<raw_id>`), never by raw path, so a
scan of random ids cannot explode the number of series. Under gunicorn every worker writes to
`PROMETHEUS_MULTIPROC_DIR` (gunicorn.conf.py sets it) and any worker's `/metrics` reports the sum
of all of them; a worker that exits is marked dead from gunicorn's `child_exit` hook, which drops
its per-worker gauges (the `live*` multiprocess modes) while its counts stay in the totals.

This module is the one home of metric objects. What they describe knows nothing of Prometheus:
the pool, the breaker, the keeper and the near cache report through optional hooks that
`init_app` connects to a `Metrics`, and the views call the `count_*` functions. With METRICS=0
nothing is connected, there is no `/metrics` route, and the `count_*` functions return at once.
"""

from __future__ import annotations

import atexit
import bisect
import functools
import glob
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import Flask, Request, current_app
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_flask_exporter import PrometheusMetrics
from prometheus_flask_exporter.multiprocess import GunicornInternalPrometheusMetrics

if TYPE_CHECKING:  # imported for types only: gunicorn's master imports this module
    from .cache import Breaker
    from .db import Pool
    from .nearcache import NearCache
    from .outbox import Keeper

log = logging.getLogger("faststock.metrics")

# Seconds, for requests, statements and the wait for a connection: a near-cache hit takes well
# under a millisecond, and a first bucket at 1 ms would hide every one of them.
BUCKETS = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
ENDPOINTS = ("product", "stock", "list")
CACHE_RESULTS = ("HIT", "MISS", "BYPASS")  # what the client saw in X-Cache
NEAR_HIT, NEAR_MISS, NEAR_OFF = "hit", "miss", "off"  # off: the near cache stood aside
INVALIDATION_SOURCES = ("write", "channel", "flush")
STOCK_KINDS = ("set", "delta")
STOCK_OUTCOMES = ("applied", "insufficient", "out_of_range", "replayed", "key_reused", "not_found")
SAMPLE_SECONDS = 1.0  # how often a worker refreshes its own gauges (and at every scrape)


def route(request: Request) -> str:
    """The matched route template; one label value for everything that matched no route."""
    return request.url_rule.rule if request.url_rule is not None else "<unmatched>"


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def count_read(endpoint: str, cache: str, near: str) -> None:
    """Count one read the Flask views answered: its X-Cache value and the near cache's part."""
    metrics = current_app.extensions["faststock.metrics"]
    if metrics is not None:
        metrics.read(endpoint, cache, near)


def count_stock_change(kind: str, outcome: str) -> None:
    """Count one stock change (`kind` set or delta) by how it ended."""
    metrics = current_app.extensions["faststock.metrics"]
    if metrics is not None:
        metrics.stock_changes[(kind, outcome)].inc()


def count_write_invalidation() -> None:
    """A write on this host stamped its product: no worker here serves its old entry."""
    metrics = current_app.extensions["faststock.metrics"]
    if metrics is not None:
        metrics.near_invalidated("write", 1)


def mark_process_dead(pid: int) -> None:
    """Called by gunicorn's master when a worker exits, so its live gauges stop being reported."""
    if multiprocess():
        from prometheus_client import multiprocess as mp

        mp.mark_process_dead(pid)


def _real_lock() -> threading.Lock:
    """The operating system's lock even where gevent has patched `threading` (1.5 µs of a
    1-2 µs count saved per hit). Safe under gevent only because it is never held across
    anything that could yield to another greenlet."""
    try:
        from gevent import monkey
    except ImportError:
        return threading.Lock()
    return monkey.get_original("_thread", "allocate_lock")()


class LaneCounts:
    """Requests the fast lane answered, counted in memory and flushed into the same series the
    Flask path feeds (request duration and total, cache outcome, near-cache outcome).

    Feeding them one request at a time costs more than the rest of a fast-lane hit (the
    multiprocess values are locked and written to a file per update). Pending counts are
    flushed every FLUSH_SECONDS by a background thread, when `/metrics` is scraped from this
    worker, and at exit; so after N requests the counters have grown by exactly N once a flush
    has run, whichever path served them.
    """

    FLUSH_SECONDS = 0.25

    def __init__(self, registry: CollectorRegistry, metrics: Metrics) -> None:
        collectors = registry._names_to_collectors
        self._duration = collectors["flask_http_request_duration_seconds"]
        self._total = collectors["flask_http_request_total"]
        self._cache = metrics.cache_requests
        self._near = metrics.near_requests
        self._bounds = list(self._duration._upper_bounds)
        self._pending: dict[tuple[str, str], list] = {}
        self._lock = _real_lock()
        self._started = False
        os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        """A forked worker counts only its own requests, and flushes them itself."""
        self._pending = {}
        self._lock = _real_lock()
        self._started = False

    def hit(self, route: str, endpoint: str, seconds: float) -> None:
        """Count one 200 GET of `route` answered from the near cache in `seconds`."""
        if not self._started:
            self._start()  # outside the lock: starting a thread yields under gevent
        with self._lock:
            counts = self._pending.get((route, endpoint))
            if counts is None:
                counts = self._pending[(route, endpoint)] = [0, 0.0, [0] * len(self._bounds)]
            counts[0] += 1
            counts[1] += seconds
            counts[2][bisect.bisect_left(self._bounds, seconds)] += 1

    def _start(self) -> None:
        self._started = True  # before the thread starts: a hit meanwhile must not start another
        atexit.register(self.flush)
        threading.Thread(
            target=self._flush_forever, name="faststock-lane-metrics", daemon=True
        ).start()

    def _flush_forever(self) -> None:
        while True:
            time.sleep(self.FLUSH_SECONDS)
            self.flush()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for (route, endpoint), (count, total, buckets) in pending.items():
            child = self._duration.labels(method="GET", route=route, status="200")
            child._sum.inc(total)
            for i, n in enumerate(buckets):
                if n:
                    child._buckets[i].inc(n)
            self._total.labels(method="GET", status="200").inc(count)
            self._cache.labels(endpoint, "HIT").inc(count)
            self._near.labels(endpoint, NEAR_HIT).inc(count)


class NoLaneCounts(LaneCounts):
    """The fast lane's counts with METRICS=0: nothing is kept."""

    def __init__(self) -> None:
        pass

    def hit(self, route: str, endpoint: str, seconds: float) -> None:
        pass

    def flush(self) -> None:
        pass


def get_lane_counts(app: Flask | None = None) -> LaneCounts:
    return (app or current_app).extensions["faststock.lane_counts"]


def _per_worker_gauge(name: str, documentation: str, registry: CollectorRegistry | None) -> Any:
    """A gauge of this worker, labelled `pid`, that goes when the worker does. Under gunicorn the
    multiprocess collector adds the label itself (mode liveall); a lone process adds its own."""
    if multiprocess():
        return Gauge(name, documentation, registry=registry, multiprocess_mode="liveall")
    return Gauge(name, documentation, ["pid"], registry=registry).labels(str(os.getpid()))


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def process_sample() -> tuple[float, int, int] | None:
    """(CPU seconds, resident bytes, open descriptors) of this process, read from /proc; None
    where there is no /proc (the gauges then stay at 0)."""
    try:
        with open("/proc/self/stat", "rb") as stat, open("/proc/self/statm", "rb") as statm:
            times = stat.read().rsplit(b")", 1)[1].split()
            pages = int(statm.read().split()[1])
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        return None
    # After the command's closing parenthesis: state is field 3, utime 14 and stime 15.
    return (int(times[11]) + int(times[12])) / _CLOCK_TICKS, pages * _PAGE_BYTES, fds


class Metrics:
    """Our own metrics for one app, and the hooks the modules they describe report through.

    Every call on a request's path is a dictionary lookup and an update of a child made in
    advance (a multiprocess update costs microseconds: a gauge of state that moves on every
    query, the pool's, is sampled by `sample` instead of kept current).
    """

    def __init__(self, registry: CollectorRegistry | None) -> None:
        """`registry`: the app's own, or None under gunicorn (each worker writes its files)."""
        self.cache_requests = Counter(
            "faststock_cache_requests",
            "Reads by endpoint and cache outcome (HIT, MISS, BYPASS)",
            ["endpoint", "result"],
            registry=registry,
        )
        self.near_requests = Counter(
            "faststock_near_cache_requests",
            "Reads by endpoint and near-cache outcome (hit, miss, off: standing aside)",
            ["endpoint", "result"],
            registry=registry,
        )
        self._reads = {
            (endpoint, cache, near): (
                self.cache_requests.labels(endpoint, cache),
                self.near_requests.labels(endpoint, near),
            )
            for endpoint in ENDPOINTS
            for cache in CACHE_RESULTS
            for near in (NEAR_HIT, NEAR_MISS, NEAR_OFF)
        }
        invalidations = Counter(
            "faststock_near_cache_invalidations",
            "Near-cache invalidations: products a local write stamped (write), product ids "
            "heard on the change channel (channel), whole near caches dropped (flush)",
            ["source"],
            registry=registry,
        )
        self._invalidations = {s: invalidations.labels(s) for s in INVALIDATION_SOURCES}
        self.near_entries = Gauge(
            "faststock_near_cache_entries",
            "Products and list pages held in the near caches of all live workers",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.breaker_open = _per_worker_gauge(
            "faststock_redis_breaker_open", "1 while this worker's Redis breaker is open", registry
        )
        self.breaker_openings = Counter(
            "faststock_redis_breaker_openings",
            "Times a worker's Redis breaker opened",
            registry=registry,
        )
        self.pool_size = Gauge(
            "faststock_db_pool_size",
            "PostgreSQL connections the pools of all live workers may open (DB_POOL_SIZE each)",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.pool_in_use = Gauge(
            "faststock_db_pool_in_use",
            "PostgreSQL connections handed out (or being opened), all live workers",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.pool_waiters = Gauge(
            "faststock_db_pool_waiters",
            "Requests waiting for a PostgreSQL connection, all live workers",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.pool_wait = Histogram(
            "faststock_db_pool_wait_seconds",
            "Time to get a PostgreSQL connection from the pool (opening one included)",
            registry=registry,
            buckets=BUCKETS,
        )
        self.pool_timeouts = Counter(
            "faststock_db_pool_timeouts",
            "Requests for a PostgreSQL connection that gave up (each answered 503)",
            registry=registry,
        )
        self.statements = Histogram(
            "faststock_db_statement_duration_seconds",
            "Duration of each statement function of faststock/queries.py, by its name",
            ["query"],
            registry=registry,
            buckets=BUCKETS,
        )
        self._statements: dict[str, Any] = {}
        changes = Counter(
            "faststock_stock_changes",
            "Stock changes by kind (set, delta) and outcome",
            ["kind", "outcome"],
            registry=registry,
        )
        self.stock_changes = {
            (kind, outcome): changes.labels(kind, outcome)
            for kind in STOCK_KINDS
            for outcome in STOCK_OUTCOMES
        }
        self.outbox_backlog = Gauge(
            "faststock_outbox_backlog",
            "Records pending in cache_outbox as last counted by a keeper (max over workers)",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.outbox_replays = Counter(
            "faststock_outbox_replays",
            "Rows the outbox keepers wrote into Redis because it had missed their changes",
            registry=registry,
        )
        self.cpu = _per_worker_gauge(
            "faststock_worker_cpu_seconds",
            "CPU time this worker has used (user + system)",
            registry,
        )
        self.memory = _per_worker_gauge(
            "faststock_worker_resident_memory_bytes", "Resident memory of this worker", registry
        )
        self.fds = _per_worker_gauge(
            "faststock_worker_open_fds", "File descriptors this worker holds open", registry
        )
        self._breaker: Breaker | None = None
        self._pool: Pool | None = None
        self._near: NearCache | None = None

    def watch(self, breaker: Breaker, pool: Pool, near: NearCache, keeper: Keeper) -> None:
        """Connect the hooks of one app's breaker, pool, near cache and outbox keeper."""
        self._breaker, self._pool, self._near = breaker, pool, near
        breaker.on_change = self.breaker_changed
        pool.observer = self
        near.on_invalidated = self.near_invalidated
        keeper.on_backlog = self.outbox_backlog.set
        keeper.on_replayed = self.outbox_replays.inc
        self.pool_size.set(pool.size)
        self.sample()

    def read(self, endpoint: str, cache: str, near: str) -> None:
        cache_child, near_child = self._reads[(endpoint, cache, near)]
        cache_child.inc()
        near_child.inc()

    def breaker_changed(self, is_open: bool) -> None:
        self.breaker_open.set(1 if is_open else 0)
        if is_open:
            self.breaker_openings.inc()

    def near_invalidated(self, source: str, count: int) -> None:
        if count:
            self._invalidations[source].inc(count)

    # db.PoolObserver
    def pool_waited(self, seconds: float) -> None:
        self.pool_wait.observe(seconds)

    def pool_timed_out(self) -> None:
        self.pool_timeouts.inc()

    def statement_ran(self, name: str, seconds: float) -> None:
        child = self._statements.get(name)
        if child is None:
            child = self._statements[name] = self.statements.labels(name)
        child.observe(seconds)

    def sample(self) -> None:
        """Refresh this worker's sampled gauges: its process, breaker, pool and near cache."""
        if self._breaker is not None:
            self.breaker_open.set(1 if self._breaker.is_open else 0)
        if self._pool is not None:
            self.pool_in_use.set(self._pool.in_use)
            self.pool_waiters.set(self._pool.waiters)
        if self._near is not None:
            self.near_entries.set(self._near.entries)
        process = process_sample()
        if process is not None:
            cpu, memory, fds = process
            self.cpu.set(cpu)
            self.memory.set(memory)
            self.fds.set(fds)

    def start(self) -> None:
        """Sample every SAMPLE_SECONDS for the life of this process (each gunicorn worker)."""
        threading.Thread(target=self._sample_forever, name="faststock-metrics", daemon=True).start()

    def _sample_forever(self) -> None:
        while True:
            time.sleep(SAMPLE_SECONDS)
            try:
                self.sample()
            except Exception:  # a surprise must not end the sampling for the worker's life
                log.exception("sampling the worker's gauges failed")


class _SizedFilesCollector(MultiProcessCollector):
    """The workers' files, less any still empty. prometheus_client creates a worker's file
    before sizing it, and reading it then fails the whole scrape with a 500 (client_python
    issue 1199): a worker starting, or killed in that instant, which leaves it empty for good."""

    def collect(self) -> Any:
        files = []
        for path in glob.glob(os.path.join(self._path, "*.db")):
            try:
                if os.path.getsize(path) > 0:
                    files.append(path)
            except OSError:  # removed meanwhile: a dead worker's live gauges
                continue
        return self.merge(files, accumulate=True)


class _GunicornExporter(GunicornInternalPrometheusMetrics):
    """prometheus-flask-exporter's exposition for gunicorn, through `_SizedFilesCollector`."""

    def generate_metrics(
        self, accept_header: str | None = None, names: list[str] | None = None
    ) -> tuple[str, str]:
        registry = CollectorRegistry()
        _SizedFilesCollector(registry)
        if names:
            registry = registry.restricted_registry(names)
        encode, content_type = choose_encoder(accept_header)
        return encode(registry).decode("utf-8"), content_type


def get_metrics(app: Flask | None = None) -> Metrics | None:
    """This app's metrics; None with METRICS=0."""
    return (app or current_app).extensions["faststock.metrics"]


def start(app: Flask) -> None:
    """Keep this worker's gauges fresh in the background (wsgi.py, in each gunicorn worker)."""
    metrics = get_metrics(app)
    if metrics is not None:
        metrics.start()


def init_app(app: Flask) -> None:
    """Wire the metrics in, after the modules they watch (db, cache, nearcache, outbox)."""
    from .cache import get_cache
    from .db import get_pool
    from .nearcache import get_near
    from .outbox import get_keeper

    if not app.config["FASTSTOCK"].metrics:
        app.extensions["faststock.metrics"] = None
        app.extensions["faststock.lane_counts"] = NoLaneCounts()
        return
    own_registry = None if multiprocess() else CollectorRegistry(auto_describe=True)
    metrics = Metrics(own_registry)

    def fresh(view: Callable[..., Any]) -> Callable[..., Any]:
        """A scrape of this worker sees everything it answered and its gauges as they are."""

        @functools.wraps(view)
        def scrape(*args: Any, **kwargs: Any) -> Any:
            get_lane_counts(app).flush()
            metrics.sample()
            return view(*args, **kwargs)

        return scrape

    options = {
        "group_by": route,
        "buckets": BUCKETS,
        "default_labels": {},
        "metrics_decorator": fresh,
    }
    if own_registry is None:
        exporter = _GunicornExporter(app, **options)
    else:
        exporter = PrometheusMetrics(app, registry=own_registry, **options)
    exporter.info("faststock_info", "FastStock service", version="1")
    metrics.watch(get_cache(app).breaker, get_pool(app), get_near(app), get_keeper(app))
    app.extensions["faststock.metrics"] = metrics
    app.extensions["faststock.lane_counts"] = LaneCounts(exporter.registry, metrics)
