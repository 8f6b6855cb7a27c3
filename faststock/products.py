"""The products blueprint: parse, look in the cache, fall back to PostgreSQL, answer bytes.

A product is serialised to JSON once, when it is read from PostgreSQL; from then on the same bytes
are stored in Redis and sent to every client, and a list page is those bytes joined.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from flask import Blueprint, Response, current_app, request

from . import auth, db, queries, replicas, stock
from .cache import (
    BYPASS,
    HIT,
    MISS,
    MISSING,
    Cache,
    decode_entry,
    decode_page,
    encode_page,
    entry_body,
    get_cache,
    render,
)
from .errors import HARDENED, ApiError
from .metrics import NEAR_HIT, NEAR_MISS, NEAR_OFF, count_read
from .nearcache import Token, get_near
from .singleflight import get_flight
from .validation import (
    parse_id,
    parse_idempotency_key,
    parse_json_object,
    parse_page_args,
    parse_stock_change,
)

bp = Blueprint("products", __name__, url_prefix="/api/products")

T = TypeVar("T")


def _json(body: bytes, cache_state: str | None = None, status: int = 200) -> Response:
    response = Response(body, status=status, mimetype="application/json")
    if cache_state is not None:
        response.headers["X-Cache"] = cache_state
    return response


def _not_found(product_id: int, cache_state: str | None = None) -> ApiError:
    headers = {"X-Cache": cache_state} if cache_state else None
    return ApiError(404, "not_found", f"product {product_id} does not exist", headers=headers)


def _load(key: object, state: str, load: Callable[[], T]) -> tuple[T, bool]:
    """Run a database load after a cache miss, shared with concurrent misses of the same key.

    Returns (result, shared). Only a MISS joins another request's load: with Redis bypassed, a
    request could otherwise join a load that read the row before a write it must see had
    committed. A product MISS cannot be in that position, because every answered write is in
    Redis, so the miss started before it. A list page MISS can (writers never write page keys):
    a `shared` page result must be checked against Redis before it is served (`list_products`).
    """
    if state != MISS:
        return load(), False
    # Waiters outlast the leader's own limits (its read, a replica's try before it, then its
    # Redis fill), so they never give up on a load that is still allowed to succeed.
    redis_timeout = current_app.config["FASTSTOCK"].redis_timeout_ms / 1000
    limit = db.read_deadline(db.get_pool()) + replicas.added_seconds() + redis_timeout + 1
    return get_flight().do(key, load, limit)


def _load_product(cache: Cache, product_id: int, use_cache: bool, seen: int) -> bytes | None:
    """The product's entry from the database, filled into Redis; `seen` is the flight's
    `finished` count read before this request missed Redis.

    A miss that comes too late to join the load of a stampede (it read Redis before that load
    filled it, and asked to load after the load had ended) finds the entry by reading Redis
    again: a cold key costs one query per worker, not one more per straggler.
    """
    if use_cache and get_flight().finished_since(seen):
        state, raw = cache.get_product(product_id)
        if raw is not None:
            return raw
        use_cache = state == MISS
    row = replicas.read(lambda cur: queries.fetch_product(cur, product_id), replica=use_cache)
    if row is None:
        if use_cache:
            cache.remember_missing(product_id)
        return None
    _, version, _, entry = render(row)
    if use_cache:
        cache.fill([(product_id, version, entry)])
    return entry


def stock_body(product_id: int, stock: int) -> bytes:
    return b'{"id":%d,"stock":%d}' % (product_id, stock)


def list_body(items: bytes, page: int, limit: int, has_next: bool) -> bytes:
    """A list page from its products' JSON, comma-joined (the fast lane uses this too)."""
    next_page = b"%d" % (page + 1) if has_next else b"null"
    return b'{"items":[%s],"page":%d,"limit":%d,"next_page":%s}' % (
        items,
        page,
        limit,
        next_page,
    )


def _product(product_id: int, endpoint: str) -> tuple[bytes, int, str]:
    """(JSON, stock, cache state): this worker's near cache, then Redis, then PostgreSQL."""
    near = get_near()
    token = None
    if near.usable():
        hit = near.product(product_id)
        if hit is not None:
            count_read(endpoint, HIT, NEAR_HIT)
            return hit[0], hit[1], HIT
        token = near.begin(product_id)  # before Redis is read: a change after it drops the entry
    cache = get_cache()
    seen = get_flight().finished
    state, raw = cache.get_product(product_id)
    if raw is None:
        raw, _ = _load(
            ("p", product_id), state, lambda: _load_product(cache, product_id, state == MISS, seen)
        )
    count_read(endpoint, state, NEAR_OFF if token is None else NEAR_MISS)
    entry = decode_entry(raw) if raw is not None else None
    if entry is None:
        raise _not_found(product_id, state)
    if token is not None and state != BYPASS:
        near.put_product(product_id, raw, token)
    return entry[2], entry[1], state


@bp.get("/<raw_id>")
def get_product(raw_id: str) -> Response:
    body, _, state = _product(parse_id(raw_id), "product")
    return _json(body, state)


@bp.get("/<raw_id>/stock")
def get_stock(raw_id: str) -> Response:
    product_id = parse_id(raw_id)
    _, stock, state = _product(product_id, "stock")
    return _json(stock_body(product_id, stock), state)


def _page_from_db(cache: Cache, page: int, limit: int, use_cache: bool) -> tuple[list[bytes], bool]:
    rows = replicas.read(
        lambda cur: queries.fetch_page(cur, limit + 1, (page - 1) * limit), replica=use_cache
    )
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
        rows = replicas.read(lambda cur: queries.fetch_products(cur, missing), replica=True)
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


def _after_shared_load(cache: Cache, page: int, limit: int) -> tuple[list[bytes], bool]:
    """The page as Redis holds it now that the load this request joined has filled it.

    The joined load may have read a product before a write that answered before this request
    began; that write is in Redis (or this host bypasses Redis), and the page is assembled from
    the current product entries, so reading it back gives every product at its newest version.
    When Redis cannot say, this request loads the page itself.
    """
    state, stored, entries = cache.get_page(page, limit)
    if stored is not None:
        result = _page_from_cache(cache, stored, entries)
        if result is not None:
            return result
    return _page_from_db(cache, page, limit, use_cache=state != BYPASS)


@bp.get("")
def list_products() -> Response:
    page, limit = parse_page_args(request.args)
    near = get_near()
    tokens: dict[int, Token] = {}
    generation = None
    if near.usable():
        found = near.page_items(page, limit)
        if found is not None:
            count_read("list", HIT, NEAR_HIT)
            return _json(list_body(found[0], page, limit, found[1]), HIT)
        # Products are kept only with a stamp read before Redis is; the ids must be known first,
        # so a page's products join the near cache from its second read on.
        known = near.page(page, limit)
        tokens = {pid: near.begin(pid) for pid in known[0]} if known else {}
        generation = near.generation
    cache = get_cache()
    state, stored, entries = cache.get_page(page, limit)
    result = None
    if stored is not None:
        result = _page_from_cache(cache, stored, entries)
        if result is None or None in entries:  # not everything came from Redis
            state = MISS
    if result is None:
        result, shared = _load(
            ("l", page, limit), state, lambda: _page_from_db(cache, page, limit, state == MISS)
        )
        if shared:
            result = _after_shared_load(cache, page, limit)
    count_read("list", state, NEAR_OFF if generation is None else NEAR_MISS)
    items, has_next = result
    if generation is not None and state == HIT:
        ids = decode_page(stored)[0]
        near.put_page(page, limit, ids, has_next, generation)
        for product_id, raw in zip(ids, items, strict=True):
            if product_id in tokens:
                near.put_product(product_id, raw, tokens[product_id])
    body = list_body(b",".join([entry_body(raw) for raw in items]), page, limit, has_next)
    return _json(body, state)


def _read_body(environ: dict[str, Any]) -> bytes:
    """The raw body, at most MAX_CONTENT_LENGTH bytes, chunked or not.

    Read from the server's own stream: werkzeug's limited stream silently truncates a chunked
    body at the limit instead of refusing it. gunicorn ends that stream at the body's end
    (`wsgi.input_terminated`); without that promise and a Content-Length there is no body. A
    body the server cannot decode (a broken chunked encoding, say) is the client's error,
    whatever exception the server raises for it.
    """
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit)
    if length is None and not environ.get("wsgi.input_terminated"):
        return b""
    try:
        data = environ["wsgi.input"].read(limit + 1 if length is None else length)
    except Exception:
        raise ApiError(400, "bad_request", "the request body could not be read") from None
    if len(data) > limit:
        raise _too_large(limit)
    return data


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"the body must be at most {limit} bytes")


def _mimetype(environ: dict[str, Any]) -> str:
    """The body's media type; the one every client sends is known without parsing the header."""
    if environ.get("CONTENT_TYPE") == "application/json":
        return "application/json"
    return request.mimetype


# A write's answer headers, built once: they are the same on every write.
_WRITTEN = (("Content-Type", "application/json"), *HARDENED)
_REPLAYED = (*_WRITTEN, ("Idempotent-Replayed", "true"))


@bp.post("/<raw_id>/update-stock")
def update_stock(raw_id: str) -> Response:
    product_id = parse_id(raw_id)
    # The environ read directly, not through `request.headers`: a header lookup there walks
    # every header the request has, the costliest step of a write's parsing.
    environ = request.environ
    body = parse_json_object(_mimetype(environ), _read_body(environ))
    change = parse_stock_change(body)
    sent = environ.get("HTTP_IDEMPOTENCY_KEY")
    key = parse_idempotency_key([] if sent is None else [sent])
    answer = stock.apply(product_id, change, key, auth.client())
    headers = _REPLAYED if answer.replayed else _WRITTEN
    return Response(answer.body, status=answer.status, headers=headers)
