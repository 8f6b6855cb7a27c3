"""Prometheus metrics: per-route latency and status, cache, database and process metrics.

Requests are labelled by route template (`/api/products/<raw_id>`), never by raw path, so a
scan of random ids cannot explode the number of series. Under gunicorn every worker writes to
`PROMETHEUS_MULTIPROC_DIR` (gunicorn.conf.py sets it) and any worker's `/metrics` reports the sum
of all of them; a worker that exits is marked dead from gunicorn's `child_exit` hook, which drops
its per-worker gauges (the `live*` multiprocess modes) while its counts stay in the totals.

Everything a request counts goes through a `Tally`: kept in the worker's memory and written to
the multiprocess files every 0.25 s and at scrape. Each update of those files is locked and
written (3 µs a counter, 7 µs a histogram here), and a stock change made about nine.
prometheus-flask-exporter serves `/metrics` and merges the workers' files; the request series it
would make (same names and labels) are made here, so that they are counted the same way.

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
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import Flask, Request, Response, current_app, request
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
        metrics.stock_changed(kind, outcome)


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


_BOUNDS = [*BUCKETS, float("inf")]  # every histogram here uses BUCKETS; prometheus adds +Inf


def _timing() -> list:
    """[count, sum of seconds, count per bucket] of one histogram child, pending a flush."""
    return [0, 0.0, [0] * len(_BOUNDS)]


def _flush_timing(child: Any, timing: list) -> None:
    child._sum.inc(timing[1])
    for i, n in enumerate(timing[2]):
        if n:
            child._buckets[i].inc(n)


def _flush_forever(tally: weakref.ref[Tally]) -> None:
    """Flush until the tally is gone (an app a test built and dropped); a worker's lives on."""
    while True:
        time.sleep(Tally.FLUSH_SECONDS)
        live = tally()
        if live is None:
            return
        live.flush()
        del live


_REQUESTS, _HITS, _TIMINGS, _COUNTS = range(4)  # the tally's pending dicts, by what they key


class Tally:
    """Everything a request counts, kept in memory and added to the Prometheus series every
    FLUSH_SECONDS by a background thread, when `/metrics` is scraped from this worker, and at
    exit; so after N requests the counters have grown by exactly N once a flush has run,
    whichever path served them.

    Why: a multiprocess value is locked and written to its file on every update (3 µs a
    counter, 7 µs a histogram here). A write made about nine of them (its request, statements,
    wait for a connection, outcome, invalidation); a fast-lane hit, two, more than the rest of
    the hit. An update here is a dictionary entry under a lock.
    """

    FLUSH_SECONDS = 0.25

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._lock = _real_lock()
        self._reset()
        _TALLIES.add(self)

    def _reset(self) -> None:
        # Indexed by _REQUESTS: (method, route, status) -> _timing(); _HITS: fast-lane hits,
        # (route, endpoint) -> _timing(); _TIMINGS: histogram child -> _timing(); _COUNTS:
        # counter child -> amount. Swapped whole by a flush, so one lock covers them all.
        self._pending: tuple[dict[Any, Any], ...] = ({}, {}, {}, {})
        self._started = False

    def _forked(self) -> None:
        """A forked worker counts only its own requests, and flushes them itself."""
        self._lock = _real_lock()
        self._reset()

    def _start(self) -> None:
        """The flushing thread; started by the first count, outside the lock (starting a thread
        yields under gevent), in the process that counts (a thread does not survive a fork)."""
        self._started = True  # before the thread starts: a count meanwhile must not start another
        threading.Thread(
            target=_flush_forever, args=(weakref.ref(self),), name="faststock-tally", daemon=True
        ).start()

    def _time(self, which: int, key: Any, seconds: float) -> None:
        if not self._started:
            self._start()
        lock = self._lock
        lock.acquire()  # not `with`: half the cost, on every request
        try:
            pending = self._pending[which]
            timing = pending.get(key)
            if timing is None:
                timing = pending[key] = _timing()
            timing[0] += 1
            timing[1] += seconds
            timing[2][bisect.bisect_left(_BOUNDS, seconds)] += 1  # the first bucket that holds it
        finally:
            lock.release()

    def request(self, method: str, route: str, status: str, seconds: float) -> None:
        """Count one request Flask answered (request duration and total)."""
        self._time(_REQUESTS, (method, route, status), seconds)

    def hit(self, route: str, endpoint: str, seconds: float) -> None:
        """Count one 200 GET of `route` the fast lane answered from the near cache: the request
        series and the cache and near-cache outcomes, all at once."""
        self._time(_HITS, (route, endpoint), seconds)

    def observe(self, child: Any, seconds: float) -> None:
        """Observe `seconds` in a histogram's child (made with `labels` in advance)."""
        self._time(_TIMINGS, child, seconds)

    def inc(self, child: Any, amount: float = 1.0) -> None:
        """Add `amount` to a counter's child (made with `labels` in advance)."""
        if not self._started:
            self._start()
        with self._lock:
            counts = self._pending[_COUNTS]
            counts[child] = counts.get(child, 0.0) + amount

    def flush(self) -> None:
        with self._lock:
            (requests, hits, timings, counts), self._pending = self._pending, ({}, {}, {}, {})
        m = self._metrics
        for (method, route, status), timing in requests.items():
            _flush_timing(m.request_duration.labels(method, route, status), timing)
            m.request_total.labels(method, status).inc(timing[0])
        for (route, endpoint), timing in hits.items():
            _flush_timing(m.request_duration.labels("GET", route, "200"), timing)
            m.request_total.labels("GET", "200").inc(timing[0])
            m.cache_requests.labels(endpoint, "HIT").inc(timing[0])
            m.near_requests.labels(endpoint, NEAR_HIT).inc(timing[0])
        for child, timing in timings.items():
            _flush_timing(child, timing)
        for child, amount in counts.items():
            child.inc(amount)


class NoTally(Tally):
    """What is counted with METRICS=0: nothing."""

    def __init__(self) -> None:
        pass

    def request(self, method: str, route: str, status: str, seconds: float) -> None:
        pass

    def hit(self, route: str, endpoint: str, seconds: float) -> None:
        pass

    def inc(self, child: Any, amount: float = 1.0) -> None:
        pass

    def observe(self, child: Any, seconds: float) -> None:
        pass

    def flush(self) -> None:
        pass


_TALLIES: weakref.WeakSet[Tally] = weakref.WeakSet()  # held weakly: a test's app may go


def _forked() -> None:
    for tally in list(_TALLIES):
        tally._forked()


def _flush_all() -> None:
    for tally in list(_TALLIES):
        tally.flush()


os.register_at_fork(after_in_child=_forked)
atexit.register(_flush_all)


def get_tally(app: Flask | None = None) -> Tally:
    return (app or current_app).extensions["faststock.tally"]


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
        # prometheus-flask-exporter's default request metrics, same names and labels, made here
        # so that requests are counted through the tally (the exporter writes each at once).
        self.request_duration = Histogram(
            "flask_http_request_duration_seconds",
            "Flask HTTP request duration in seconds",
            ["method", "route", "status"],
            registry=registry,
            buckets=BUCKETS,
        )
        self.request_total = Counter(
            "flask_http_request_total",
            "Total number of HTTP requests",
            ["method", "status"],
            registry=registry,
        )
        self.request_exceptions = Counter(
            "flask_http_request_exceptions_total",
            "Total number of HTTP requests which resulted in an exception",
            ["method", "status"],
            registry=registry,
        )
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
        self.tally = Tally(self)

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
        self.tally.inc(cache_child)
        self.tally.inc(near_child)

    def stock_changed(self, kind: str, outcome: str) -> None:
        self.tally.inc(self.stock_changes[(kind, outcome)])

    def breaker_changed(self, is_open: bool) -> None:
        self.breaker_open.set(1 if is_open else 0)
        if is_open:
            self.breaker_openings.inc()

    def near_invalidated(self, source: str, count: int) -> None:
        if count:
            self.tally.inc(self._invalidations[source], count)

    # db.PoolObserver
    def pool_waited(self, seconds: float) -> None:
        self.tally.observe(self.pool_wait, seconds)

    def pool_timed_out(self) -> None:
        self.pool_timeouts.inc()

    def statement_ran(self, name: str, seconds: float) -> None:
        child = self._statements.get(name)
        if child is None:
            child = self._statements[name] = self.statements.labels(name)
        self.tally.observe(child, seconds)

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


def _time_requests(app: Flask, metrics: Metrics) -> None:
    """Time every request Flask answers into the request series, through the tally. Views the
    exporter's `do_not_track` marks (its `/metrics`, our `/healthz`) are left out, as the
    exporter's own hooks would leave them."""
    tally = metrics.tally

    @app.before_request
    def start_clock() -> None:
        request.metrics_started = time.perf_counter()

    @app.after_request
    def count(response: Response) -> Response:
        # The request itself, not its context-local proxy: each attribute read through the
        # proxy is a context lookup, and a missing one (`prom_do_not_track`) raises inside it.
        req = request._get_current_object()  # type: ignore[attr-defined]
        started = getattr(req, "metrics_started", None)
        if started is not None and not hasattr(req, "prom_do_not_track"):
            seconds = time.perf_counter() - started
            tally.request(req.method, route(req), str(response.status_code), seconds)
        return response

    @app.teardown_request
    def count_exception(exc: BaseException | None) -> None:
        if exc is not None and not hasattr(request, "prom_do_not_track"):
            tally.inc(metrics.request_exceptions.labels(request.method, "500"))


def init_app(app: Flask) -> None:
    """Wire the metrics in, after the modules they watch (db, cache, nearcache, outbox)."""
    from .cache import get_cache
    from .db import get_pool
    from .nearcache import get_near
    from .outbox import get_keeper

    if not app.config["FASTSTOCK"].metrics:
        app.extensions["faststock.metrics"] = None
        app.extensions["faststock.tally"] = NoTally()
        return
    own_registry = None if multiprocess() else CollectorRegistry(auto_describe=True)
    metrics = Metrics(own_registry)

    def fresh(view: Callable[..., Any]) -> Callable[..., Any]:
        """A scrape of this worker sees everything it answered and its gauges as they are."""

        @functools.wraps(view)
        def scrape(*args: Any, **kwargs: Any) -> Any:
            metrics.tally.flush()
            metrics.sample()
            return view(*args, **kwargs)

        return scrape

    # The exporter serves /metrics (all workers' files under gunicorn); the request series are
    # ours (`_time_requests`), so its default ones are not made.
    options = {"export_defaults": False, "metrics_decorator": fresh}
    if own_registry is None:
        exporter = _GunicornExporter(app, **options)
    else:
        exporter = PrometheusMetrics(app, registry=own_registry, **options)
    exporter.info(
        "flask_exporter_info",
        "Information about the Prometheus Flask exporter",
        version=exporter.version,
    )
    exporter.info("faststock_info", "FastStock service", version="1")
    _time_requests(app, metrics)
    metrics.watch(get_cache(app).breaker, get_pool(app), get_near(app), get_keeper(app))
    app.extensions["faststock.metrics"] = metrics
    app.extensions["faststock.tally"] = metrics.tally
