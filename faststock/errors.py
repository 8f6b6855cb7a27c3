"""One shape for every error: `{"error": code, "message": text}` with the right status.

Clients of a stock API retry and branch on the error code, so no path — Flask's own 404/405, a
body that is too large, an exception nobody expected — may answer with HTML or a stack trace.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from flask import Flask, Response, g
from werkzeug.exceptions import HTTPException

log = logging.getLogger("faststock")

# Every error code the API can answer with, and what it tells the client. The one registry:
# the OpenAPI document's enum is built from it, and `ApiError` refuses a code missing here.
ERROR_CODES: dict[str, str] = {
    "bad_request": "the request is malformed or a value is out of range",
    "unauthorized": "no valid API key: send Authorization: Bearer <key>",
    "forbidden": "this client may not use this path",
    "not_found": "no such product, or no such path",
    "method_not_allowed": "the path exists, but not with this method",
    "unsupported_media_type": "the body is not sent as application/json",
    "payload_too_large": "the body is larger than the service accepts",
    "rate_limited": "too many requests from this client; retry after Retry-After",
    "unavailable": "a dependency cannot serve the request now; retry after Retry-After",
    "internal": "a bug; the log holds the details under the request id",
    "insufficient_stock": "a negative delta would take the stock below 0",
    "stock_out_of_range": "a positive delta would take the stock above 2147483647",
    "idempotency_key_reused": "the Idempotency-Key was used with a different request",
    "idempotency_in_progress": "a request with this Idempotency-Key is still being processed",
}

# On every error and every write: not to be sniffed into something else by a browser, nor kept by
# a cache on the way. Reads go without (the fast lane's answers are the Flask views' bytes).
HARDENED = (("X-Content-Type-Options", "nosniff"), ("Cache-Control", "no-store"))

# The code for an HTTP error raised by Flask, werkzeug or gunicorn rather than by our views.
HTTP_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    503: "unavailable",
}


def code_for_status(status: int) -> str:
    return HTTP_STATUS_CODES.get(status, "bad_request" if status < 500 else "internal")


def safe_text(text: str) -> str:
    """`text` with anything UTF-8 cannot carry (lone surrogates a client sent) escaped, so an
    error message that quotes the client can always be encoded."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class ApiError(Exception):
    """An answer the client should get as JSON; `extra` adds fields beside error and message."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unregistered error code {code!r}: add it to ERROR_CODES")
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra or {}


class Unavailable(ApiError):
    """A dependency cannot serve this request now; `Retry-After` tells clients when to come back."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(503, "unavailable", message, headers={"Retry-After": str(retry_after)})


def error_body(code: str, message: str, extra: dict[str, Any] | None = None) -> bytes:
    """The one error shape, as bytes (also what idempotent replays store)."""
    return orjson.dumps({"error": code, "message": safe_text(message), **(extra or {})})


def json_error(
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Response:
    body = error_body(code, message, extra)
    response = Response(body, status=status, mimetype="application/json")
    for name, value in (*HARDENED, *(headers or {}).items()):
        response.headers[name] = value
    return response


def _handle_api_error(error: ApiError) -> Response:
    return json_error(error.status, error.code, error.message, error.headers, error.extra)


def _handle_http_exception(error: HTTPException) -> Response:
    status = error.code or 500
    if status >= 500:
        return _handle_unexpected(error)
    code = code_for_status(status)
    message = (error.description or error.name or code).strip()
    headers = {k: v for k, v in error.get_headers() if k.lower() in ("allow", "retry-after")}
    return json_error(status, code, message, headers)


def _handle_unexpected(error: BaseException) -> Response:
    log.error("unhandled error (request %s)", g.get("request_id", "-"), exc_info=error)
    return json_error(500, "internal", "internal server error")


def init_app(app: Flask) -> None:
    app.register_error_handler(ApiError, _handle_api_error)
    app.register_error_handler(HTTPException, _handle_http_exception)
    app.register_error_handler(Exception, _handle_unexpected)
