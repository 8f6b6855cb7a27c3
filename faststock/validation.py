"""Turning what a client sent into checked values, or a 4xx `ApiError` before any I/O.

Pure functions of their input, so they are unit-tested without a server; everything a client can
send must come out either as a value in range or as a clear 4xx.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from werkzeug.datastructures import MultiDict

from .errors import ApiError

BIGINT_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1
INT32_MIN = -(2**31)
MAX_LIMIT = 100
DEFAULT_LIMIT = 10
# The same for every limit, so the bound is simple to document; (page - 1) * limit fits a bigint.
MAX_PAGE = BIGINT_MAX // MAX_LIMIT + 1
MAX_IDEMPOTENCY_KEY_LENGTH = 255
IDEMPOTENCY_KEY_PATTERN = "^[!-~]+$"  # visible ASCII, for the OpenAPI document


@dataclass(frozen=True)
class Change:
    """A stock change: set the stock to `value`, or add `value` to it when `delta` is true."""

    value: int
    delta: bool


def bad_request(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


def _parse_positive(raw: str, what: str, maximum: int) -> int:
    digits = raw.lstrip("0")
    if not raw.isascii() or not raw.isdigit() or not digits or len(digits) > 19:
        raise bad_request(f"{what} must be a whole number from 1 to {maximum}")
    value = int(digits)
    if value > maximum:
        raise bad_request(f"{what} must be a whole number from 1 to {maximum}")
    return value


def parse_id(raw: str) -> int:
    """A product id: a decimal integer 1..2^63-1 (PostgreSQL bigint), nothing else.

    Every cached read parses one, so the common shape (1 to 18 ASCII digits, no leading zero:
    always in range) is taken at once; anything else gets the full checks.
    """
    if 0 < len(raw) < 19 and raw.isdigit() and raw.isascii() and raw[0] != "0":
        return int(raw)
    return _parse_positive(raw, "product id", BIGINT_MAX)


def _single(args: MultiDict[str, str], name: str) -> str | None:
    values = args.getlist(name)
    if len(values) > 1:
        raise bad_request(f"{name} must be given at most once")
    return values[0] if values else None


def parse_page_args(args: MultiDict[str, str]) -> tuple[int, int]:
    """(page, limit): limit 1..100, page 1..MAX_PAGE, so the offset always fits a bigint."""
    return parse_page(_single(args, "page"), _single(args, "limit"))


def parse_page(raw_page: str | None, raw_limit: str | None) -> tuple[int, int]:
    """(page, limit) from the raw values (None: not given); the fast lane parses with this too."""
    limit = DEFAULT_LIMIT if raw_limit is None else _parse_positive(raw_limit, "limit", MAX_LIMIT)
    page = 1 if raw_page is None else _parse_positive(raw_page, "page", MAX_PAGE)
    return page, limit


class _Invalid(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _Invalid("duplicate keys in JSON object")
    return result


def _no_constants(name: str) -> Any:
    raise _Invalid(f"{name} is not valid JSON")


# Made once: `json.loads` with hooks builds a decoder and its scanner on every call, a tenth of
# what parsing a write's body costs.
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constants)


def is_json_mimetype(mimetype: str) -> bool:
    return mimetype == "application/json" or (
        mimetype.startswith("application/") and mimetype.endswith("+json")
    )


def parse_json_object(mimetype: str, data: bytes) -> dict[str, Any]:
    """A JSON object from a request body: strict UTF-8, no NaN/Infinity, no duplicate keys.

    Duplicate keys are refused rather than resolved, because proxies and this service could
    otherwise disagree about which value a request meant.
    """
    if not is_json_mimetype(mimetype):
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    if not data:
        raise bad_request("the request body must be a JSON object")
    try:
        value = _DECODER.decode(data.decode("utf-8"))
    except _Invalid as exc:
        raise bad_request(str(exc)) from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad_request("the request body is not valid UTF-8 JSON") from None
    if not isinstance(value, dict):
        raise bad_request("the request body must be a JSON object")
    if not _encodable(value):
        raise bad_request("the request body holds a lone UTF-16 surrogate (\\ud800-\\udfff)")
    return value


def _encodable(value: object) -> bool:
    """Whether every string in `value` (keys included) can be encoded as UTF-8 again.

    `json.loads` accepts escapes of lone surrogates such as "\\ud800", which no UTF-8 encoder
    (orjson's included) will write back out: such a body would fail later, wherever it is echoed.
    Iterative, so a deeply nested body cannot exhaust the stack.
    """
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return False
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return True


def require_int(body: Mapping[str, Any], name: str, low: int, high: int) -> int:
    """An integer field in [low, high]; booleans, floats, strings and null are refused."""
    value = body.get(name)
    if type(value) is not int or not low <= value <= high:
        raise bad_request(f"{name} must be an integer from {low} to {high}")
    return value


def _quoted(name: str, longest: int = 40) -> str:
    """A client's field name for an error message: JSON-quoted (ASCII only) and shortened."""
    return json.dumps(name if len(name) <= longest else name[:longest] + "...")


def parse_stock_change(body: Mapping[str, Any]) -> Change:
    """`{"stock": N}` sets the stock, `{"delta": K}` adds to it; exactly one of the two."""
    if ("stock" in body) == ("delta" in body):
        raise bad_request("give exactly one of stock (set) or delta (add)")
    unknown = sorted(set(body) - {"stock", "delta"})
    if unknown:
        raise bad_request(f"unknown field(s): {', '.join(map(_quoted, unknown))}")
    if "stock" in body:
        return Change(require_int(body, "stock", 0, INT32_MAX), delta=False)
    return Change(require_int(body, "delta", INT32_MIN, INT32_MAX), delta=True)


def parse_idempotency_key(values: list[str]) -> str | None:
    """The Idempotency-Key header: 1-255 visible ASCII characters, sent at most once."""
    if not values:
        return None
    key = values[0]
    if (
        len(values) > 1
        or not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH
        or not all("!" <= ch <= "~" for ch in key)
    ):
        raise bad_request(
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} visible ASCII characters,"
            " sent once"
        )
    return key
