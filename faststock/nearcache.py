"""A per-worker cache in front of Redis ("near cache"), kept coherent across workers and hosts.

A hit here costs no network round trip, which is most of what a Redis hit costs a gevent worker.
An entry is served only while it is provably current:

- **Workers of this host**: a writer stores a fresh value in its product's change stamp
  (shared.py) after commit and before answering. An entry keeps the stamp read before it was
  loaded, and a hit checks the stamp is still that value.
- **Other hosts**: writers publish the ids they changed on a Redis channel, in the same call that
  writes the new rows through. Before serving a hit, a worker applies every invalidation already
  received (a non-blocking drain of its subscription) by storing fresh change stamps, so a load
  that read Redis before the change arrived cannot keep what it read either. The keeper pings on
  the subscription every sweep; a subscription that is broken, or silent past HEARTBEAT_SECONDS
  (a partition), makes the near cache flush and stand aside until it is subscribed again and
  flushed.
- **Redis trouble**: while the breaker is open or a write on this host missed Redis, the near
  cache is flushed and not used, exactly as Redis is not. A new master under Sentinel is such
  trouble: the keeper opens the breaker as it adopts one and flushes the near cache, which comes
  back subscribed on the new master once the outbox has been replayed there.

An entry also expires after NEAR_CACHE_TTL_SECONDS (never longer than Redis's TTL), and the
number of entries is bounded (least recently used first out). A list page is kept as the ids it
holds and answered from the product entries, so it is never staler than the product endpoint.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

import redis
from flask import Flask, current_app

from . import realpoll, shared
from .cache import CHANNEL, FLUSH_ALL, Cache, decode_entry
from .config import Config

log = logging.getLogger("faststock.nearcache")

HEARTBEAT_SECONDS = 3.0  # silence longer than this on the subscription: assume a partition

ProductHit = tuple[bytes, int]  # (product JSON, stock)
# (product JSON, stock, change stamp, expires, the JSON's length as a Content-Length value)
Entry = tuple[bytes, int, int, float, str]
Token = tuple[int, int]  # (change stamp, flush generation), read before a load


class Invalidations:
    """This worker's subscription to the change channel; every method is non-blocking or bounded
    by the Redis timeouts, and none raises.

    `client` comes from `Cache.subscription_client()`: the cache's server, timeouts and no
    retries, and under Sentinel its gate, so the subscription is always on the master whose
    keys the cache reads (after a failover, only once the keeper has adopted the new one).
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._pubsub: redis.client.PubSub | None = None
        self._watch: realpoll.Watch | None = None
        self._heard = 0.0  # monotonic time the subscription last proved alive
        self._lock = threading.Lock()

    def subscribe(self) -> bool:
        """(Re)subscribe; True once subscribed. Messages sent while it was down are lost, so the
        caller must flush what it holds before trusting it again."""
        with self._lock:
            self._close()
            try:
                # Subscribe confirmations are kept, not ignored: redis-py answers an ignored one
                # with None, the same None as "nothing left", and a drain that stopped there
                # would leave a change buffered behind a late confirmation, unseen by poll(2).
                pubsub = self.client.pubsub()
                pubsub.subscribe(CHANNEL)
                pubsub.get_message(timeout=self.client.get_connection_kwargs()["socket_timeout"])
            except Exception as exc:
                log.info("change channel unavailable: %s", exc)
                return False
            self._pubsub = pubsub
            self._watch = realpoll.Watch(pubsub.connection._sock.fileno())
            self._heard = time.monotonic()
            return True

    def ping(self) -> None:
        """Ask for a sign of life; the answer is noted by a later drain."""
        with self._lock:
            if self._pubsub is None:
                return
            try:
                self._pubsub.ping()
            except Exception as exc:
                log.info("change channel lost: %s", exc)
                self._close()

    def drain(self, apply: Callable[[bytes], None], now: float) -> bool:
        """Hand every change message received so far to `apply`, each as soon as it is read;
        False when the channel is down or has been silent past HEARTBEAT_SECONDS. Called before
        every hit, with the caller's `time.monotonic()` (one clock read serves the hit's checks).

        Applied as read, not collected and applied after: redis-py checks its socket with
        `select.poll`, which under gevent yields to other greenlets, and a hit served meanwhile
        finds the socket empty (its bytes read here) while the change is not applied yet.
        """
        pubsub, watch = self._pubsub, self._watch
        if pubsub is None or watch is None or now - self._heard >= HEARTBEAT_SECONDS:
            return False
        # One poll(2) when nothing came: the common case. When something did, read until
        # redis-py has nothing left, buffered or not: anything newer must then arrive on the
        # socket, which the next poll sees.
        if not watch.readable():
            return True
        with self._lock:
            try:
                while (message := pubsub.get_message(timeout=0)) is not None:
                    self._heard = time.monotonic()
                    if message["type"] == "message":
                        apply(message["data"])
            except Exception as exc:
                log.info("change channel lost: %s", exc)
                self._close()
                return False
            return True

    def _close(self) -> None:
        if self._pubsub is not None:
            try:
                self._pubsub.close()
            except Exception:  # already broken: nothing to give back
                log.debug("closing the change channel failed", exc_info=True)
        self._pubsub = None
        self._watch = None

    def close(self) -> None:
        with self._lock:
            self._close()


class NearCache:
    """The per-worker entries, and the rules for when they may be served."""

    def __init__(self, config: Config, cache: Cache) -> None:
        self.size = config.near_cache_size
        self.ttl = float(min(config.near_cache_ttl_seconds, config.cache_ttl_seconds))
        self.cache = cache
        self.invalidations = Invalidations(cache.subscription_client())
        self._products: OrderedDict[int, Entry] = OrderedDict()
        # (page, limit) -> [ids, has_next, expires, (joined items, their stamps, expires) | None]
        self._pages: OrderedDict[tuple[int, int], list] = OrderedDict()
        self._breaker = cache.breaker
        self._apply_change = self._apply  # bound once: drain() takes it on every hit
        self._trusted = False
        self._generation = 0  # bumped by every flush: loads begun before it keep nothing
        # Told of invalidations as they are applied: ("channel", ids) or ("flush", 1).
        self.on_invalidated: Callable[[str, int], None] | None = None

    @property
    def enabled(self) -> bool:
        return self.size > 0

    def usable(self) -> bool:
        """Whether entries may be served now; applies pending invalidations first.

        On every hit, so it is kept to a few attribute reads and one poll(2).
        """
        return self._trusted and self._still_trusted(time.monotonic())

    def _still_trusted(self, now: float) -> bool:
        """The checks of a trusted near cache before a hit, at `now` (`time.monotonic()`)."""
        if (
            not self.invalidations.drain(self._apply_change, now)
            or self._breaker.is_open
            or shared.is_dirty()
        ):
            self.distrust()
            return False
        return True

    def current(self, product_id: int) -> Entry | None:
        """`usable()` then `product()` in one call and one clock read: the fast lane's hit.

        A hit is the lane's whole cost beyond gunicorn's, so the clock is read once for both.
        """
        if not self._trusted:
            return None
        now = time.monotonic()
        if not self._still_trusted(now):
            return None
        return self._current_entry(product_id, now)

    def current_page(self, page: int, limit: int) -> tuple[bytes, bool] | None:
        """`usable()` then `page_items()` in one call and one clock read: the lane's list hit."""
        if not self._trusted:
            return None
        now = time.monotonic()
        if not self._still_trusted(now):
            return None
        return self._page_items((page, limit), now)

    def distrust(self) -> None:
        """Stop serving, and forget everything: invalidations may have been missed."""
        self._trusted = False
        self.flush()

    def heartbeat(self) -> None:
        """Called by the keeper on every sweep: keeps the channel proven alive, or brings the
        near cache back (flushed) once the channel and Redis are healthy again."""
        if not self.enabled:
            return
        if self._trusted:
            self.usable()
        if not self._trusted:
            if self.cache.breaker.is_open or shared.is_dirty():
                return
            if not self.invalidations.subscribe():
                return
            self.flush()
            self._trusted = True
        self.invalidations.ping()

    def _apply(self, payload: bytes) -> None:
        if payload == FLUSH_ALL:
            self.flush()
        else:
            ids = [int(i) for i in payload.split(b",") if i]
            self.changed(ids)
            if self.on_invalidated is not None:
                self.on_invalidated("channel", len(ids))

    def flush(self) -> None:
        self._generation += 1
        self._products.clear()
        self._pages.clear()
        if self.on_invalidated is not None:
            self.on_invalidated("flush", 1)

    @staticmethod
    def changed(ids: Iterable[int]) -> None:
        """Another host changed these products (or Redis may hold older rows of them): no worker
        here may serve an entry of theirs loaded before now."""
        for product_id in ids:
            shared.changed(product_id)

    def begin(self, product_id: int) -> Token:
        """Read before loading an entry you mean to keep (`put_product`)."""
        return shared.stamp(product_id), self._generation

    def product(self, product_id: int) -> ProductHit | None:
        """(JSON, stock) of a current entry, or None. Call only after `usable()` said yes."""
        entry = self._current_entry(product_id, time.monotonic())
        return None if entry is None else (entry[0], entry[1])

    def _current_entry(self, product_id: int, now: float) -> Entry | None:
        """The product's entry while its stamp is unmoved and it has not expired at `now`."""
        products = self._products
        entry = products.get(product_id)
        if entry is None:
            return None
        if entry[2] != shared.stamp(product_id) or entry[3] < now:
            products.pop(product_id, None)
            return None
        try:  # noqa: SIM105 - on every hit: contextlib.suppress costs more than the rest
            products.move_to_end(product_id)
        except KeyError:  # dropped meanwhile by another thread (tests; gevent does not preempt)
            pass
        return entry

    def page(self, page: int, limit: int) -> tuple[tuple[int, ...], bool] | None:
        """(ids, has_next) of a remembered page, or None. Call only after `usable()`."""
        entry = self._current_page((page, limit), time.monotonic())
        return None if entry is None else (entry[0], entry[1])

    def _current_page(self, key: tuple[int, int], now: float) -> list | None:
        """The remembered page's entry while it has not expired at `now`."""
        pages = self._pages
        entry = pages.get(key)
        if entry is None:
            return None
        if entry[2] < now:
            pages.pop(key, None)
            return None
        try:  # noqa: SIM105 - as in _current_entry()
            pages.move_to_end(key)
        except KeyError:
            pass
        return entry

    def page_items(self, page: int, limit: int) -> tuple[bytes, bool] | None:
        """(the items' JSON, comma-joined; has_next) of a remembered page whose products are all
        current, or None. Call only after `usable()`.

        The joined bytes are kept with the stamps of the products they were built from: while
        none has moved, they are served as they are, which saves a list page ten lookups.
        """
        return self._page_items((page, limit), time.monotonic())

    def _page_items(self, key: tuple[int, int], now: float) -> tuple[bytes, bool] | None:
        entry = self._current_page(key, now)
        if entry is None:
            return None
        ids, has_next, until, joined = entry
        if joined is not None and joined[2] >= now and shared.stamps(ids) == joined[1]:
            return joined[0], has_next
        bodies, stamps = [], []
        for product_id in ids:
            kept = self._current_entry(product_id, now)
            if kept is None:
                return None
            bodies.append(kept[0])
            stamps.append(kept[2])
            until = min(until, kept[3])
        items = b",".join(bodies)
        # The stamps the bodies were checked against, not the slots read again now: another
        # worker's write can move a slot in between, and joined bytes kept under its new stamp
        # would serve the old body until the page expired.
        entry[3] = (items, tuple(stamps), until)
        return items, has_next

    def put_product(self, product_id: int, raw: bytes, token: Token) -> None:
        """Keep Redis's entry `raw` for a product, loaded after `begin` gave `token`."""
        stamp, generation = token
        decoded = decode_entry(raw)
        if decoded is None or not self._trusted or generation != self._generation:
            return
        _, stock, body = decoded
        products = self._products
        products.pop(product_id, None)  # re-inserted last: the most recently used
        products[product_id] = (body, stock, stamp, time.monotonic() + self.ttl, str(len(body)))
        if len(products) > self.size:
            products.popitem(last=False)

    def put_page(
        self, page: int, limit: int, ids: Sequence[int], has_next: bool, generation: int
    ) -> None:
        if not self._trusted or generation != self._generation:
            return
        pages = self._pages
        pages.pop((page, limit), None)
        pages[(page, limit)] = [tuple(ids), has_next, time.monotonic() + self.ttl, None]
        if len(pages) > self.size:
            pages.popitem(last=False)

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def entries(self) -> int:
        """Products and list pages held."""
        return len(self._products) + len(self._pages)

    def __len__(self) -> int:
        return len(self._products)


def get_near(app: Flask | None = None) -> NearCache:
    return (app or current_app).extensions["faststock.nearcache"]


def init_app(app: Flask, cache: Cache) -> None:
    app.extensions["faststock.nearcache"] = NearCache(app.config["FASTSTOCK"], cache)
