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

Under Redis Sentinel (REDIS_SENTINELS) the client follows the master Sentinel names, and key
names carry an epoch: the replication ID of the master they were written on. A replica that
Sentinel promotes may lack the last writes its old master acknowledged, but it draws a new
replication ID as it becomes master, so none of the entries it holds is under the new epoch's
names. A connection admits only the master of the current epoch (MasterGate); meeting another,
it refuses and wakes the keeper (outbox.py), which adopts the new master, replays the outbox and
only then lets requests read Redis again.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import redis
from flask import Flask, current_app
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection

from . import realpoll, shared
from .config import Config
from .queries import ProductRow

log = logging.getLogger("faststock.cache")

HIT, MISS, BYPASS = "HIT", "MISS", "BYPASS"
T = TypeVar("T")

# Bump when the stored format changes, so a rolling deploy never misreads the old one.
PREFIX = "fs1:"
MISSING = b"0|"
NEGATIVE_TTL_SECONDS = 5

# Where writers announce the products they changed (comma-separated ids, or "*" for all), for
# the per-worker caches of every host (nearcache.py).
CHANNEL = "fs1:changed"
FLUSH_ALL = b"*"

# KEYS[1]: a page key (or any key when ARGV[2] is empty); KEYS[2]: the replay mark's key;
# KEYS[3..n]: product keys. ARGV[1]: TTL in ms; ARGV[2]: the page value or ""; ARGV[3]: a change
# message to publish on CHANNEL or ""; ARGV[4]: a replay mark (16 hex digits) or ""; then a
# version and a value per product key. A product value is written only if no newer version is
# stored, the mark only ever moves forward (equal-length hex strings compare as numbers).
# Publishing and raising the mark in the same call cost a writer no extra round trip, and a write
# whose entry reached Redis has raised the mark too.
_FILL = (
    """
local ttl = ARGV[1]
local stored = 0
for i = 3, #KEYS do
  local version = tonumber(ARGV[i * 2 - 1])
  local current = redis.call('GET', KEYS[i])
  local newer = false
  if current then
    local v = tonumber(string.match(current, '^(%d+)|'))
    newer = v ~= nil and v > version
  end
  if not newer then
    redis.call('SET', KEYS[i], ARGV[i * 2], 'PX', ttl)
    stored = stored + 1
  end
end
if ARGV[4] ~= '' then
  local mark = redis.call('GET', KEYS[2])
  if not mark or mark < ARGV[4] then
    redis.call('SET', KEYS[2], ARGV[4])
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


class _CheapReadiness:
    """A cheaper check before each command, for redis-py's TCP connections.

    The pool asks every connection it hands out whether unread data waits on it (`can_read(0)`),
    with `select.poll`, which gevent replaces by an emulation (realpoll.py) costing, on a write,
    more than the rest of the Redis call. When nothing is buffered and the socket has nothing,
    the answer is no, found with the real poll(2); anything else is left to redis-py.
    """

    _sock: Any
    _parser: Any

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
        return super().can_read(timeout)  # type: ignore[misc]


class _Connection(_CheapReadiness, redis.Connection):
    """redis-py's TCP connection, with the cheaper readiness check."""


@dataclass(frozen=True)
class Epoch:
    """Whose keys these are: the master they are written on, by its replication ID (Redis draws
    a new one whenever a server becomes master), and the key prefix that names it."""

    replid: str | None
    prefix: str


DIRECT = Epoch(None, PREFIX)  # without Sentinel: one server, and the key names as they always were


def epoch_of(replid: str) -> Epoch:
    """The epoch of the master with this replication ID: 32 bits of it in every key name."""
    return Epoch(replid, f"{PREFIX}{replid[:8]}:")


def replication_identity(info: bytes | str) -> tuple[str, str]:
    """(role, master_replid) from an `INFO replication` reply."""
    text = info.decode() if isinstance(info, bytes) else info
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return fields.get("role", ""), fields.get("master_replid", "")


class MasterGate:
    """Which master this process's cache keys belong to, under Sentinel; every new connection
    is checked against it.

    redis-py's Sentinel client follows a failover by itself: a connection opened after one goes
    to the new master, which may be a replica that missed the last writes, holding entries older
    than PostgreSQL under the old epoch's names. So a connection admits only the master of the
    current epoch; meeting any other server (a new master, a restarted one, a demoted one) it
    refuses, and the command fails like any Redis failure (BYPASS). The keeper, woken, adopts
    the master Sentinel names (`Cache.follow_master`).
    """

    def __init__(self, wake: Callable[[], None]) -> None:
        self.epoch: Epoch | None = None  # None until a first master is met: nothing is cached yet
        self.address: tuple[str, int] | None = None
        self.stranger = False  # a connection met another master: the keeper must look
        # Masters left behind. One may still answer as master for a while (Sentinels that have
        # not heard of the failover yet, a partition), holding none of what was written since:
        # a process never goes back to one.
        self.retired: set[str] = set()
        self._wake = wake

    def admit(self, address: tuple[str, int], info: bytes) -> Epoch:
        """The epoch of a new connection to `address` (`info`: its INFO replication), or
        ConnectionError if that server is not the current epoch's master."""
        role, replid = replication_identity(info)
        if role == "master" and replid:
            if self.epoch is None:
                self.adopt(address, replid)
            if self.epoch is not None and replid == self.epoch.replid:
                return self.epoch
        self.stranger = True
        self._wake()
        raise redis.ConnectionError(
            f"Redis at {address[0]}:{address[1]} ({role}) is not the master whose keys this "
            "process uses; waiting for the keeper to adopt it"
        )

    def adopt(self, address: tuple[str, int], replid: str) -> None:
        if self.epoch is not None and self.epoch.replid is not None:
            self.retired.add(self.epoch.replid)
        self.epoch = epoch_of(replid)
        self.address = address


class _SentinelConnection(_CheapReadiness, SentinelManagedConnection):
    """A connection to the master Sentinel names, admitted by the gate (one INFO per connect)."""

    def __init__(self, **kwargs: Any) -> None:
        self._gate: MasterGate = kwargs.pop("gate")
        self.epoch: Epoch | None = None
        super().__init__(**kwargs)

    def on_connect_check_health(self, check_health: bool = True) -> None:
        super().on_connect_check_health(check_health)
        self.send_command("INFO", "replication")
        self.epoch = self._gate.admit((self.host, self.port), self.read_response())

    def can_read(self, timeout: float = 0) -> bool:
        # The pool asks before handing a connection out: one opened under an earlier epoch
        # raises, and the pool reconnects it (through the gate).
        if self._sock is not None and self.epoch is not self._gate.epoch:
            raise redis.ConnectionError("connected to an earlier Redis master")
        return super().can_read(timeout)


def product_key(product_id: int, prefix: str = PREFIX) -> str:
    return f"{prefix}p:{product_id}"


def page_key(page: int, limit: int, prefix: str = PREFIX) -> str:
    return f"{prefix}l:{page}:{limit}"


def mark_key(prefix: str = PREFIX) -> str:
    """The replay mark's key (replicas.py): in the epoch's names like the entries it vouches
    for, so a promoted Redis replica, which may have lost its last raises, starts without one."""
    return f"{prefix}lsn"


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
        # Told of every opening (True) and closing (False) as it happens (metrics.py).
        self.on_change: Callable[[bool], None] | None = None

    def success(self) -> None:
        self.failures = 0

    def failure(self) -> None:
        self.failures += 1
        if not self.is_open and self.failures >= self.threshold:
            self._open()

    def trip(self) -> None:
        """Open now, whatever the count: Redis must not be read until the keeper has caught it
        up (a new master under Sentinel)."""
        if not self.is_open:
            self._open()

    def _open(self) -> None:
        self.is_open = True
        self.openings += 1
        if self.on_change is not None:
            self.on_change(True)
        if self.on_open is not None:
            self.on_open()

    def close(self) -> None:
        self.failures = 0
        was_open, self.is_open = self.is_open, False
        if was_open and self.on_change is not None:
            self.on_change(False)


class Cache:
    """Redis access for one process; every method degrades to BYPASS instead of raising."""

    def __init__(self, config: Config, on_outage: Callable[[], None] | None = None) -> None:
        """`on_outage` runs when Redis needs the keeper (outbox.py): the breaker opened, or a
        connection met a master other than the one this process's keys belong to."""
        timeout = config.redis_timeout_ms / 1000
        self.ttl_seconds = config.cache_ttl_seconds
        self.on_outage = on_outage
        self._config = config
        # For every connection, Sentinel's own included: redis-py's defaults retry with backoff.
        self._limits: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
            "health_check_interval": 0,
        }
        self.gate: MasterGate | None = None
        self.sentinel: Sentinel | None = None
        if config.redis_sentinels:
            self.gate = MasterGate(self._wake_keeper)
            self.sentinel = Sentinel(config.sentinel_addresses, sentinel_kwargs=self._limits)
            # Not a blocking pool (redis-py has no Sentinel one), but the same bound: above
            # worker_connections, so it is never reached.
            self.pool: redis.ConnectionPool = self._sentinel_pool(max_connections=1024)
        else:
            tcp = config.redis_url.startswith("redis://")
            self.pool = redis.BlockingConnectionPool.from_url(
                config.redis_url,
                **({"connection_class": _Connection} if tcp else {}),
                max_connections=1024,  # above worker_connections: a busy worker never queues here
                timeout=timeout,
                **self._limits,
            )
        self.client = redis.Redis(connection_pool=self.pool)
        self._fill = self.client.register_script(_FILL)
        self._page = self.client.register_script(_PAGE)
        self.breaker = Breaker(on_open=self._opened)

    def _sentinel_pool(self, **options: Any) -> SentinelConnectionPool:
        """Connections to the master Sentinel names, each admitted by the gate. REDIS_URL gives
        the master's db number and credentials; its host and port are not used."""
        return SentinelConnectionPool(
            self._config.redis_sentinel_master,
            self.sentinel,
            connection_class=_SentinelConnection,
            gate=self.gate,
            **self._credentials(),
            **self._limits,
            **options,
        )

    def _credentials(self) -> dict[str, Any]:
        url = parse_url(self._config.redis_url)
        return {name: url[name] for name in ("db", "username", "password") if name in url}

    def subscription_client(self) -> redis.Redis:
        """A client with a pool of its own, for a pub/sub subscription (nearcache.py): the same
        server and limits, and under Sentinel the same gate."""
        if self.gate is None:
            return redis.Redis.from_url(self._config.redis_url, **self._limits)
        return redis.Redis(connection_pool=self._sentinel_pool())

    def _wake_keeper(self) -> None:
        if self.on_outage is not None:
            self.on_outage()

    def _opened(self) -> None:
        log.warning("Redis failing; serving from PostgreSQL until it answers again")
        # Recovery must start on fresh sockets, not ones to a dead server; sockets in use are
        # left to fail in their own greenlet (closing them under it raises outside RedisError).
        self.pool.disconnect(inuse_connections=False)
        self._wake_keeper()

    def follow_master(self) -> bool:
        """Under Sentinel, adopt the master Sentinel names if this process's keys are not its
        (the keeper calls this on every pass). True when it adopted a master of a new epoch: the
        breaker is then open, and the caller must drop what this process took from the old
        master and replay the outbox before closing it. No Sentinel, no sentinel answering, or
        the same master: nothing changes."""
        gate, sentinel = self.gate, self.sentinel
        if gate is None or sentinel is None:
            return False
        try:
            address = sentinel.discover_master(self._config.redis_sentinel_master)
            if address == gate.address and not gate.stranger:
                return False
            gate.stranger = False
            role, replid = self._identify(address)
        except Exception as exc:  # as in _attempt(): the connections' own check still holds
            log.debug("Redis master not identified: %s", exc)
            return False
        if role != "master" or not replid or replid in gate.retired:
            return False  # Sentinel is ahead of the server, or behind it: the next pass looks
        if gate.epoch is not None and replid == gate.epoch.replid:
            gate.address = address
            return False
        changed = gate.epoch is not None
        if changed:
            log.warning(
                "Redis master is now %s:%d: entries cached before are no longer used", *address
            )
            self.breaker.trip()  # before the new epoch: no request reads Redis until the replay
        gate.adopt(address, replid)
        self.pool.disconnect(inuse_connections=False)
        return changed

    def _identify(self, address: tuple[str, int]) -> tuple[str, str]:
        """(role, replication ID) of the server at `address`, asked on a connection of its own."""
        conn = redis.Connection(
            host=address[0], port=address[1], **self._credentials(), **self._limits
        )
        try:
            conn.connect()
            conn.send_command("INFO", "replication")
            return replication_identity(conn.read_response())
        finally:
            conn.disconnect()

    def _epoch(self) -> Epoch:
        """The epoch to name keys in now. Under Sentinel the first call meets the master (a
        PING: its connection's admission sets the epoch)."""
        gate = self.gate
        if gate is None:
            return DIRECT
        if gate.epoch is None:
            self.client.ping()
            if gate.epoch is None:
                raise redis.ConnectionError("no Redis master admitted yet")
        return gate.epoch

    def _unchanged(self, epoch: Epoch) -> None:
        """Raise if the master changed while a call named keys in `epoch`: its connection may
        have gone to the new master, where those names hold entries of the old one."""
        if self.gate is not None and self.gate.epoch is not epoch:
            raise redis.ConnectionError("the Redis master changed during the call")

    def _attempt(self, command: Callable[[Epoch], T]) -> tuple[bool, T | None]:
        """Run one Redis command, with keys named in the current epoch, and tell the breaker how
        it went: (False, None) on failure.

        Any client failure counts, not only RedisError (hiredis raises ValueError on a socket
        closed under it): the cache must never fail a request.
        """
        try:
            epoch = self._epoch()
            result = command(epoch)
            self._unchanged(epoch)
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

    def get_product(self, product_id: int) -> tuple[str, bytes | None]:
        if not self.usable():
            return BYPASS, None
        ok, raw = self._attempt(
            lambda epoch: self.client.get(product_key(product_id, epoch.prefix))
        )
        if not ok:
            return BYPASS, None
        return (MISS, None) if raw is None else (HIT, raw)

    def stored_versions(self, ids: Sequence[int]) -> list[int | None]:
        """The version Redis holds for each product (None: no entry), raising on Redis errors
        (for the outbox keeper, which must know whether Redis already has a change)."""
        epoch = self._epoch()
        raws = self.client.mget([product_key(product_id, epoch.prefix) for product_id in ids])
        self._unchanged(epoch)
        return [None if raw is None else int(raw.split(b"|", 1)[0]) for raw in raws]

    def get_page(self, page: int, limit: int) -> tuple[str, bytes | None, list[bytes | None]]:
        """The page's stored value and the current entry of each product on it."""
        if not self.usable():
            return BYPASS, None, []
        ok, reply = self._attempt(
            lambda epoch: self._page(
                keys=[page_key(page, limit, epoch.prefix)], args=[epoch.prefix + "p:"]
            )
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
        mark: int | None = None,
    ) -> int | None:
        """Store (product id, version, entry) triples, each only if not older than what is there.

        Used by readers after a miss and by writers after commit alike: the compare-and-set is
        what makes their races harmless. Writers `announce` the change to every host's per-worker
        cache in the same call, and with replicas raise the replay `mark` (replicas.py) to a WAL
        position read after their commit. Returns how many entries were stored (fewer than given
        when Redis already held newer versions: it is then at least as fresh), or None when Redis
        was not told.
        """
        if self.breaker.is_open:
            return None
        ok, stored = self._attempt(
            lambda epoch: self._store(epoch, entries, page, ttl_seconds, announce, mark)
        )
        return stored if ok else None

    def store(
        self,
        entries: Sequence[tuple[int, int, bytes]],
        *,
        page: tuple[int, int, bytes] | None = None,
        ttl_seconds: float | None = None,
        announce: bool = False,
        mark: int | None = None,
    ) -> int:
        """`fill` without the breaker, raising on Redis errors (for the outbox keeper)."""
        epoch = self._epoch()
        stored = self._store(epoch, entries, page, ttl_seconds, announce, mark)
        self._unchanged(epoch)
        return stored

    def _store(
        self,
        epoch: Epoch,
        entries: Sequence[tuple[int, int, bytes]],
        page: tuple[int, int, bytes] | None,
        ttl_seconds: float | None,
        announce: bool,
        mark: int | None = None,
    ) -> int:
        prefix = epoch.prefix
        keys = [page_key(page[0], page[1], prefix) if page else prefix + "p:", mark_key(prefix)]
        ttl_ms = self._ttl_ms(ttl_seconds or self.ttl_seconds)
        change = b",".join(b"%d" % product_id for product_id, _, _ in entries) if announce else b""
        marked = b"%016x" % mark if mark else b""
        args: list[object] = [ttl_ms, page[2] if page else b"", change, marked]
        for product_id, version, raw in entries:
            keys.append(product_key(product_id, prefix))
            args += [version, raw]
        return int(self._fill(keys=keys, args=args))

    def replay_mark(self) -> int | None:
        """The replay mark (replicas.py): a WAL position at or past the commit of every write
        acknowledged so far. 0 when Redis holds none (never set, flushed, evicted, a new epoch),
        None when Redis may not or cannot be read."""
        if not self.usable():
            return None
        ok, raw = self._attempt(lambda epoch: self.client.get(mark_key(epoch.prefix)))
        if not ok:
            return None
        return int(raw, 16) if raw else 0

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
