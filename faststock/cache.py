"""Redis as a read-through cache that can never make an answer wrong or slow.

Entries are stored as `b"<version>|<stock>|<json>"`: the JSON is served as-is on a hit (no
re-serialisation), the stock endpoint is answered from the header without parsing JSON, and the
version lets every write into Redis be a compare-and-set, so an older row never replaces a newer
one whatever order readers and writers reach Redis in. A list page is stored as the ids it holds
and assembled from the per-product entries in the same Lua call, so a list can never show older
stock than the product endpoint.

Redis trouble of any kind turns into `BYPASS`: the request goes to PostgreSQL and succeeds. The
client has short socket timeouts and no retries, because redis-py's defaults retry with backoff,
and after a few consecutive failures a breaker stops requests from trying Redis at all.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import TypeVar

import orjson
import redis
from flask import Flask, current_app
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import realpoll, shared
from .config import Config
from .queries import ProductRow

log = logging.getLogger("faststock.cache")

HIT, MISS, BYPASS = "HIT", "MISS", "BYPASS"
T = TypeVar("T")

# Bump when the stored format changes, so a rolling deploy never misreads the old one.
PREFIX = "fs1:"
PRODUCT_PREFIX = PREFIX + "p:"
MISSING = b"0|"
NEGATIVE_TTL_SECONDS = 5

# Where writers announce the products they changed (comma-separated ids, or "*" for all), for
# the per-worker caches of every host (nearcache.py).
CHANNEL = "fs1:changed"
FLUSH_ALL = b"*"

# KEYS[1]: a page key (or any key when ARGV[2] is empty); KEYS[2..n]: product keys.
# ARGV[1]: TTL in ms; ARGV[2]: the page value or ""; ARGV[3]: a change message to publish on
# CHANNEL or ""; then a version and a value per product key. A product value is written only if
# no newer version is stored. Publishing in the same call costs a writer no extra round trip.
_FILL = (
    """
local ttl = ARGV[1]
local stored = 0
for i = 2, #KEYS do
  local version = tonumber(ARGV[i * 2])
  local current = redis.call('GET', KEYS[i])
  local newer = false
  if current then
    local v = tonumber(string.match(current, '^(%d+)|'))
    newer = v ~= nil and v > version
  end
  if not newer then
    redis.call('SET', KEYS[i], ARGV[i * 2 + 1], 'PX', ttl)
    stored = stored + 1
  end
end
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
end
if ARGV[3] ~= '' then
  redis.call('PUBLISH', '"""
    + CHANNEL
    + """', ARGV[3])
end
return stored
"""
)

# KEYS[1]: a page key. Returns nil on a miss, else the page value then each product entry.
_PAGE = """
local page = redis.call('GET', KEYS[1])
if not page then return nil end
local keys = {}
for id in string.gmatch(string.match(page, '|(.*)$'), '%d+') do
  keys[#keys + 1] = ARGV[1] .. id
end
if #keys == 0 then return {page} end
local entries = redis.call('MGET', unpack(keys))
table.insert(entries, 1, page)
return entries
"""


class _Connection(redis.Connection):
    """redis-py's TCP connection, with a cheaper check before each command.

    The pool asks every connection it hands out whether unread data waits on it (`can_read(0)`),
    with `select.poll`, which gevent replaces by an emulation (realpoll.py) costing, on a write,
    more than the rest of the Redis call. When nothing is buffered and the socket has nothing,
    the answer is no, found with the real poll(2); anything else is left to redis-py.
    """

    def can_read(self, timeout: float = 0) -> bool:
        sock = self._sock
        if timeout == 0 and sock is not None:
            reader = getattr(self._parser, "_reader", None)
            if (
                reader is not None
                and not reader.has_data()
                and not realpoll.readable(sock.fileno())
            ):
                return False
        return super().can_read(timeout)


def product_key(product_id: int) -> str:
    return f"{PRODUCT_PREFIX}{product_id}"


def page_key(page: int, limit: int) -> str:
    return f"{PREFIX}l:{page}:{limit}"


def encode_entry(version: int, stock: int, body: bytes) -> bytes:
    return b"%d|%d|%s" % (version, stock, body)


def decode_entry(raw: bytes) -> tuple[int, int, bytes] | None:
    """(version, stock, json) or None for a remembered absence."""
    if raw == MISSING:
        return None
    version, stock, body = raw.split(b"|", 2)
    return int(version), int(stock), body


def render(row: ProductRow) -> tuple[int, int, int, bytes]:
    """(id, version, stock, cache entry) for a row; the JSON inside is what clients receive."""
    product_id, name, price, stock, version, updated_at = row
    body = orjson.dumps(
        {"id": product_id, "name": name, "price": price, "stock": stock, "updated_at": updated_at}
    )
    return product_id, version, stock, encode_entry(version, stock, body)


def entry_body(raw: bytes) -> bytes:
    """The JSON a client receives, from a stored entry."""
    return raw.split(b"|", 2)[2]


def encode_page(ids: Sequence[int], has_next: bool) -> bytes:
    return b"%d|%s" % (has_next, b",".join(b"%d" % i for i in ids))


def decode_page(raw: bytes) -> tuple[list[int], bool]:
    has_next, ids = raw.split(b"|", 1)
    return ([int(i) for i in ids.split(b",")] if ids else []), has_next == b"1"


class Breaker:
    """Consecutive Redis failures open it; while open, requests skip Redis at no cost.

    It does not half-open on a request's time: the process's outbox keeper (outbox.py) probes
    Redis in the background, replays the writes Redis missed, and only then closes it, so no
    request ever serves an entry cached before the outage that a later write made stale.
    """

    def __init__(self, threshold: int = 5, on_open: Callable[[], None] | None = None) -> None:
        self.threshold = threshold
        self.on_open = on_open
        self.failures = 0
        self.is_open = False
        self.openings = 0  # lets the keeper tell whether it opened again during a pass

    def success(self) -> None:
        self.failures = 0

    def failure(self) -> None:
        self.failures += 1
        if not self.is_open and self.failures >= self.threshold:
            self.is_open = True
            self.openings += 1
            if self.on_open is not None:
                self.on_open()

    def close(self) -> None:
        self.failures = 0
        self.is_open = False


class Cache:
    """Redis access for one process; every method degrades to BYPASS instead of raising."""

    def __init__(self, config: Config, on_outage: Callable[[], None] | None = None) -> None:
        """`on_outage` runs when the breaker opens: the keeper (outbox.py) recovers from there."""
        timeout = config.redis_timeout_ms / 1000
        self.ttl_seconds = config.cache_ttl_seconds
        fast = {"connection_class": _Connection} if config.redis_url.startswith("redis://") else {}
        self.pool = redis.BlockingConnectionPool.from_url(
            config.redis_url,
            **fast,
            max_connections=1024,  # above worker_connections: a busy worker never queues here
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self.client = redis.Redis(connection_pool=self.pool)
        self._fill = self.client.register_script(_FILL)
        self._page = self.client.register_script(_PAGE)
        self.breaker = Breaker(on_open=self._opened)
        self.on_outage = on_outage

    def _opened(self) -> None:
        log.warning("Redis failing; serving from PostgreSQL until it answers again")
        # Recovery must start on fresh sockets, not ones to a dead server; sockets in use are
        # left to fail in their own greenlet (closing them under it raises outside RedisError).
        self.pool.disconnect(inuse_connections=False)
        if self.on_outage is not None:
            self.on_outage()

    def _attempt(self, command: Callable[[], T]) -> tuple[bool, T | None]:
        """Run one Redis command and tell the breaker how it went: (False, None) on failure.

        Any client failure counts, not only RedisError (hiredis raises ValueError on a socket
        closed under it): the cache must never fail a request.
        """
        try:
            result = command()
        except Exception as exc:
            log.debug("Redis error: %s", exc)
            self.breaker.failure()
            return False, None
        self.breaker.success()
        return True, result

    def _ttl_ms(self, seconds: float) -> int:
        """TTL with ±10% jitter, so keys filled together do not all expire together."""
        return max(1, int(seconds * 1000 * random.uniform(0.9, 1.1)))

    def usable(self) -> bool:
        """Whether reads may trust Redis: breaker closed, and no worker here has a write that
        Redis missed (shared.py)."""
        return not self.breaker.is_open and not shared.is_dirty()

    def get(self, key: str) -> tuple[str, bytes | None]:
        if not self.usable():
            return BYPASS, None
        ok, raw = self._attempt(lambda: self.client.get(key))
        if not ok:
            return BYPASS, None
        return (MISS, None) if raw is None else (HIT, raw)

    def stored_versions(self, ids: Sequence[int]) -> list[int | None]:
        """The version Redis holds for each product (None: no entry), raising on Redis errors
        (for the outbox keeper, which must know whether Redis already has a change)."""
        raws = self.client.mget([product_key(product_id) for product_id in ids])
        return [None if raw is None else int(raw.split(b"|", 1)[0]) for raw in raws]

    def get_page(self, page: int, limit: int) -> tuple[str, bytes | None, list[bytes | None]]:
        """The page's stored value and the current entry of each product on it."""
        if not self.usable():
            return BYPASS, None, []
        ok, reply = self._attempt(
            lambda: self._page(keys=[page_key(page, limit)], args=[PRODUCT_PREFIX])
        )
        if not ok:
            return BYPASS, None, []
        if reply is None:
            return MISS, None, []
        return HIT, reply[0], reply[1:]

    def fill(
        self,
        entries: Sequence[tuple[int, int, bytes]],
        *,
        page: tuple[int, int, bytes] | None = None,
        ttl_seconds: float | None = None,
        announce: bool = False,
    ) -> int | None:
        """Store (product id, version, entry) triples, each only if not older than what is there.

        Used by readers after a miss and by writers after commit alike: the compare-and-set is
        what makes their races harmless. Writers `announce` the change to every host's per-worker
        cache in the same call. Returns how many entries were stored (fewer than given when Redis
        already held newer versions: it is then at least as fresh), or None when Redis was not
        told.
        """
        if self.breaker.is_open:
            return None
        ok, stored = self._attempt(
            lambda: self.store(entries, page=page, ttl_seconds=ttl_seconds, announce=announce)
        )
        return stored if ok else None

    def store(
        self,
        entries: Sequence[tuple[int, int, bytes]],
        *,
        page: tuple[int, int, bytes] | None = None,
        ttl_seconds: float | None = None,
        announce: bool = False,
    ) -> int:
        """`fill` without the breaker, raising on Redis errors (for the outbox keeper)."""
        keys = [page_key(page[0], page[1]) if page else PRODUCT_PREFIX]
        ttl_ms = self._ttl_ms(ttl_seconds or self.ttl_seconds)
        change = b",".join(b"%d" % product_id for product_id, _, _ in entries) if announce else b""
        args: list[object] = [ttl_ms, page[2] if page else b"", change]
        for product_id, version, raw in entries:
            keys.append(product_key(product_id))
            args += [version, raw]
        return int(self._fill(keys=keys, args=args))

    def remember_missing(self, product_id: int) -> None:
        """A short-lived absence marker, so a flood of 404s does not reach PostgreSQL."""
        self.fill([(product_id, 0, MISSING)], ttl_seconds=NEGATIVE_TTL_SECONDS)

    def ping(self) -> bool:
        """Whether Redis answers now (ignores the breaker)."""
        try:
            return bool(self.client.ping())
        except Exception:  # as in _attempt()
            return False

    def clear(self) -> int:
        """Remove every FastStock key (after a re-seed); returns how many were removed."""
        removed = 0
        batch: list[bytes] = []
        for key in self.client.scan_iter(match=PREFIX + "*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                removed += self.client.unlink(*batch)
                batch.clear()
        if batch:
            removed += self.client.unlink(*batch)
        self.client.publish(CHANNEL, FLUSH_ALL)  # and every worker's own copies
        return removed


def get_cache(app: Flask | None = None) -> Cache:
    return (app or current_app).extensions["faststock.cache"]


def init_app(app: Flask, on_outage: Callable[[], None] | None = None) -> None:
    app.extensions["faststock.cache"] = Cache(app.config["FASTSTOCK"], on_outage)
