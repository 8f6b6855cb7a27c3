"""The products blueprint: parse, look in the cache, fall back to PostgreSQL, answer bytes.

A product is serialised to JSON once, when it is read from PostgreSQL; from then on the same bytes
are stored in Redis and sent to every client, and a list page is those bytes joined.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from flask import Blueprint, Response, current_app, request

from . import db, queries, stock
from .cache import (
    MISS,
    MISSING,
    Cache,
    decode_entry,
    decode_page,
    encode_page,
    entry_body,
    get_cache,
    product_key,
    render,
)
from .errors import ApiError, Unavailable
from .metrics import count_cache
from .validation import parse_id, parse_json_object, parse_page_args, parse_stock_change

bp = Blueprint("products", __name__, url_prefix="/api/products")

T = TypeVar("T")


class SingleFlight:
    """Collapses concurrent identical loads in one process into one: the others wait for it.

    When a hot key expires, hundreds of greenlets miss at once; without this each would run the
    same query. Waiters are bounded by `timeout` and then answer 503 rather than pile up.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[object, _Call] = {}

    def do(self, key: object, load: Callable[[], T], timeout: float) -> T:
        with self._lock:
            call = self._calls.get(key)
            leader = call is None
            if leader:
                call = self._calls[key] = _Call()
        if not leader:
            call.waiters += 1
            if not call.done.wait(timeout):
                raise Unavailable("timed out waiting for the database")
            if call.error is not None:
                raise call.error
            return call.result
        try:
            call.result = load()
        except ApiError as exc:
            call.error = exc
            raise
        except BaseException:
            call.error = Unavailable("database unavailable")
            raise
        finally:
            with self._lock:
                del self._calls[key]
            call.done.set()
        return call.result

    def waiters(self, key: object) -> int:
        """How many callers are waiting on the load of `key` now (for tests and debugging)."""
        call = self._calls.get(key)
        return 0 if call is None else call.waiters


class _Call:
    __slots__ = ("done", "error", "result", "waiters")

    def __init__(self) -> None:
        self.waiters = 0
        self.done = threading.Event()
        self.result: object = None
        self.error: ApiError | None = None


_flight = SingleFlight()


def _json(body: bytes, cache_state: str | None = None, status: int = 200) -> Response:
    response = Response(body, status=status, mimetype="application/json")
    if cache_state is not None:
        response.headers["X-Cache"] = cache_state
    return response


def _not_found(product_id: int, cache_state: str | None = None) -> ApiError:
    headers = {"X-Cache": cache_state} if cache_state else None
    return ApiError(404, "not_found", f"product {product_id} does not exist", headers=headers)


def _load(key: object, state: str, load: Callable[[], T]) -> T:
    """Run a database load after a cache miss, shared with concurrent misses of the same key.

    Only on a MISS: with Redis bypassed, a request could otherwise join a load that read the row
    before a write it must see had committed; a MISS cannot, because that write is in Redis.
    """
    if state != MISS:
        return load()
    pool = db.get_pool()
    return _flight.do(key, load, pool.timeout + pool.statement_timeout_ms / 1000)


def _load_product(cache: Cache, product_id: int, use_cache: bool) -> bytes | None:
    with db.cursor() as cur:
        row = queries.fetch_product(cur, product_id)
    if row is None:
        if use_cache:
            cache.remember_missing(product_id)
        return None
    _, version, _, entry = render(row)
    if use_cache:
        cache.fill([(product_id, version, entry)])
    return entry


def _product_entry(product_id: int, endpoint: str) -> tuple[tuple[int, int, bytes], str]:
    cache = get_cache()
    state, raw = cache.get(product_key(product_id))
    if raw is None:
        raw = _load(
            ("p", product_id), state, lambda: _load_product(cache, product_id, state == MISS)
        )
    count_cache(endpoint, state)
    entry = decode_entry(raw) if raw is not None else None
    if entry is None:
        raise _not_found(product_id, state)
    return entry, state


@bp.get("/<raw_id>")
def get_product(raw_id: str) -> Response:
    product_id = parse_id(raw_id)
    (_, _, body), state = _product_entry(product_id, "product")
    return _json(body, state)


@bp.get("/<raw_id>/stock")
def get_stock(raw_id: str) -> Response:
    product_id = parse_id(raw_id)
    (_, stock, _), state = _product_entry(product_id, "stock")
    return _json(b'{"id":%d,"stock":%d}' % (product_id, stock), state)


def _page_from_db(cache: Cache, page: int, limit: int, use_cache: bool) -> tuple[list[bytes], bool]:
    with db.cursor() as cur:
        rows = queries.fetch_page(cur, limit + 1, (page - 1) * limit)
    has_next = len(rows) > limit
    rendered = [render(row) for row in rows[:limit]]
    if use_cache:
        ids = [r[0] for r in rendered]
        cache.fill(
            [(pid, version, entry) for pid, version, _, entry in rendered],
            page=(page, limit, encode_page(ids, has_next)),
        )
    return [entry for *_, entry in rendered], has_next


def _page_from_cache(
    cache: Cache, stored: bytes, entries: list[bytes | None]
) -> tuple[list[bytes], bool] | None:
    """The page's entries, fetching any that expired; None when the page itself is out of date."""
    ids, has_next = decode_page(stored)
    missing = [pid for pid, raw in zip(ids, entries, strict=True) if raw is None]
    if missing:
        with db.cursor() as cur:
            rows = queries.fetch_products(cur, missing)
        fresh = {pid: (version, entry) for pid, version, _, entry in map(render, rows)}
        if len(fresh) != len(missing):
            return None
        cache.fill([(pid, version, entry) for pid, (version, entry) in fresh.items()])
        entries = [
            raw if raw is not None else fresh[pid][1] for pid, raw in zip(ids, entries, strict=True)
        ]
    if any(raw == MISSING for raw in entries):
        return None
    return entries, has_next


@bp.get("")
def list_products() -> Response:
    page, limit = parse_page_args(request.args)
    cache = get_cache()
    state, stored, entries = cache.get_page(page, limit)
    result = None
    if stored is not None:
        result = _page_from_cache(cache, stored, entries)
        if result is None or None in entries:  # not everything came from Redis
            state = MISS
    if result is None:
        result = _load(
            ("l", page, limit), state, lambda: _page_from_db(cache, page, limit, state == MISS)
        )
    count_cache("list", state)
    items, has_next = result
    next_page = b"%d" % (page + 1) if has_next else b"null"
    body = b'{"items":[%s],"page":%d,"limit":%d,"next_page":%s}' % (
        b",".join(map(entry_body, items)),
        page,
        limit,
        next_page,
    )
    return _json(body, state)


def _read_body() -> bytes:
    """The raw body, at most MAX_CONTENT_LENGTH bytes, chunked or not.

    Read from the server's own stream: werkzeug's limited stream silently truncates a chunked
    body at the limit instead of refusing it. gunicorn ends that stream at the body's end
    (`wsgi.input_terminated`); without that promise and a Content-Length there is no body. A
    body the server cannot decode (a broken chunked encoding, say) is the client's error,
    whatever exception the server raises for it.
    """
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    too_large = ApiError(413, "payload_too_large", f"the body must be at most {limit} bytes")
    length = request.content_length
    if length is not None and length > limit:
        raise too_large
    if length is None and not request.environ.get("wsgi.input_terminated"):
        return b""
    try:
        data = request.environ["wsgi.input"].read(limit + 1 if length is None else length)
    except Exception:
        raise ApiError(400, "bad_request", "the request body could not be read") from None
    if len(data) > limit:
        raise too_large
    return data


@bp.post("/<raw_id>/update-stock")
def update_stock(raw_id: str) -> Response:
    product_id = parse_id(raw_id)
    body = parse_json_object(request.mimetype, _read_body())
    change = parse_stock_change(body)
    key = stock.parse_idempotency_key(request.headers.getlist("Idempotency-Key"))
    answer = stock.apply(product_id, change, key)
    response = _json(answer.body, status=answer.status)
    if answer.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response
