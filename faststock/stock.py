"""The write path: one atomic stock change, optionally idempotent, then the cache.

Correctness rules, in order: the change is a single SQL statement (no read-modify-write in Python,
so concurrent buyers cannot oversell); the idempotency record is written in the same transaction
as the change (a retry can never apply it twice, and a failed change leaves no record); the cache
is touched only after commit, with the row's new version, so the compare-and-set in Redis keeps
any slower reader from putting the old row back.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import orjson

from . import db, queries, replicas, shared
from .cache import get_cache, render
from .errors import ApiError, Unavailable, error_body
from .metrics import count_stock_change, count_write_invalidation
from .outbox import get_keeper
from .validation import INT32_MAX, Change

log = logging.getLogger("faststock.stock")


# What an answer's error code means for the stock-change metric; no code: applied.
_OUTCOMES = {
    None: "applied",
    "not_found": "not_found",
    "insufficient_stock": "insufficient",
    "stock_out_of_range": "out_of_range",
}


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    replayed: bool = False
    code: str | None = None  # the error code of a refused change

    @property
    def outcome(self) -> str:
        """The change's outcome as metrics.py counts it."""
        return "replayed" if self.replayed else _OUTCOMES[self.code]


def fingerprint(product_id: int, change: Change) -> bytes:
    """What a retry must repeat exactly: the target and the change, not the body's formatting."""
    field = "delta" if change.delta else "stock"
    what = orjson.dumps({"path": f"/api/products/{product_id}/update-stock", field: change.value})
    return hashlib.sha256(what).digest()


def _ok(product_id: int, stock: int) -> Answer:
    return Answer(200, b'{"id":%d,"stock":%d}' % (product_id, stock))


def _error(status: int, code: str, message: str, **extra: object) -> Answer:
    return Answer(status, error_body(code, message, extra), code=code)


def _run(
    cur: db.Cursor, product_id: int, change: Change
) -> tuple[Answer, queries.ProductRow | None]:
    if change.delta:
        row = queries.add_stock(cur, product_id, change.value)
    else:
        row = queries.set_stock(cur, product_id, change.value)
    if row is not None:
        return _ok(product_id, row[3]), row
    current = queries.fetch_stock(cur, product_id)
    if current is None:
        return _error(404, "not_found", f"product {product_id} does not exist"), None
    # The reason comes from the refused change itself, not from `current`: that is read in a
    # later snapshot, after racing changes may have moved the stock either way.
    if change.value < 0:
        message = f"not enough stock to take {-change.value}: the stock cannot go below 0"
        return _error(409, "insufficient_stock", message, stock=current), None
    message = f"adding {change.value} would take the stock above {INT32_MAX}"
    return _error(409, "stock_out_of_range", message, stock=current), None


def apply(product_id: int, change: Change, key: str | None, client: str = "") -> Answer:
    """Apply `change` once; with a key, a repeat of the same request replays the first answer.
    Keys are `client`'s own (an API key's name, '' for anonymous writes): another client's use
    of the same key is another request."""
    kind = "delta" if change.delta else "set"
    try:
        answer = _apply(product_id, change, key, client)
    except ApiError as exc:
        if exc.code == "idempotency_key_reused":
            count_stock_change(kind, "key_reused")
        raise
    count_stock_change(kind, answer.outcome)
    return answer


def _apply(product_id: int, change: Change, key: str | None, client: str) -> Answer:
    if key is None:
        # One UPDATE statement is atomic on its own: autocommit saves BEGIN/COMMIT round trips.
        with db.cursor() as cur:
            answer, row = _run(cur, product_id, change)
    else:
        answer, row = _apply_once(product_id, change, key, client)
        if answer.replayed and 200 <= answer.status < 300:
            row = _current_row(product_id)
    if row is not None:
        _write_through(row)
    return answer


def _current_row(product_id: int) -> queries.ProductRow | None:
    """The row as it is now, for a replayed success: its version is at least the one the first
    request wrote, which may not have reached Redis yet (still in flight, or lost to a 503 at
    commit). Written through before the replay answers, so a read after it sees that change."""
    try:
        with db.cursor() as cur:
            return queries.fetch_product(cur, product_id)
    except Unavailable:
        raise Unavailable("database unavailable; retry with the same Idempotency-Key") from None


def _write_through(row: queries.ProductRow) -> None:
    """After commit: Redis gets the new row (compare-and-set) and every host hears of the change
    in the same call; then this host's change stamp moves, so no worker here serves an entry
    loaded before. Only then may the write answer.

    One commit per write: the outbox record the change left is the keeper's to delete once it
    sees Redis holds this version. Nothing here may fail the request: the change is committed
    and must be acknowledged. Only a cache update that did not happen makes the host bypass
    Redis; a write whose update succeeded leaves Redis trusted, so cached reads go on answering
    through a PostgreSQL outage.

    With read replicas the same call raises the replay mark past this commit (replicas.py), so
    no miss reads a replica that lacks it; a mark that could not be read counts as an update
    that did not happen.
    """
    keeper = get_keeper()
    product_id = row[0]
    try:
        product_id, version, _, entry = render(row)
        mark = replicas.written_position()
        stored = get_cache().fill([(product_id, version, entry)], announce=True, mark=mark)
        if stored is None or (mark is None and replicas.enabled()):
            keeper.write_missed()
    except Exception:
        log.exception("cache update after a committed change failed")
        keeper.write_missed()
    finally:
        shared.changed(product_id)
        count_write_invalidation()


def _apply_once(
    product_id: int, change: Change, key: str, client: str
) -> tuple[Answer, queries.ProductRow | None]:
    mark = fingerprint(product_id, change)
    with db.transaction() as cur:
        if queries.claim_idempotency_key(cur, client, key, mark):
            answer, row = _run(cur, product_id, change)
            queries.store_idempotent_answer(cur, client, key, answer.status, answer.body)
            return answer, row
        stored = queries.fetch_idempotency_record(cur, client, key)
    if stored is None:
        # The record expired and was collected between our two statements: rare, safe to retry.
        raise ApiError(409, "idempotency_in_progress", "this key is being processed; retry")
    stored_mark, status, body = stored
    if stored_mark != mark:
        raise ApiError(
            422,
            "idempotency_key_reused",
            "this Idempotency-Key was used with a different request",
        )
    return Answer(status, body, replayed=True), None
