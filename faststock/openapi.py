"""The OpenAPI 3 description of the API, served at /openapi.json.

Built from the same limits the validators use, so the document cannot drift from the code on
ranges; the test suite runs schemathesis against a live server to keep the rest of it true.
"""

from __future__ import annotations

from typing import Any

import orjson
from flask import Blueprint, Response

from .errors import ERROR_CODES
from .validation import (
    BIGINT_MAX,
    IDEMPOTENCY_KEY_PATTERN,
    INT32_MAX,
    INT32_MIN,
    MAX_IDEMPOTENCY_KEY_LENGTH,
    MAX_LIMIT,
    MAX_PAGE,
)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str, headers: dict | None = None) -> dict:
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if headers:
        answer["headers"] = headers
    return answer


def _error(description: str) -> dict:
    return _json(_ref("Error"), description)


_X_CACHE = {
    "X-Cache": {
        "description": "HIT, MISS or BYPASS (Redis not used)",
        "schema": {"type": "string", "enum": ["HIT", "MISS", "BYPASS"]},
    }
}
_RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer", "minimum": 0}}}
_UNAVAILABLE = _json(_ref("Error"), "PostgreSQL unavailable or overloaded", _RETRY_AFTER)
_UNAUTHORIZED = _json(
    _ref("Error"),
    "no valid API key (missing, malformed or unknown)",
    {"WWW-Authenticate": {"schema": {"type": "string"}}},
)
_RATE_LIMITED = _json(
    _ref("Error"),
    "over the client's rate limit",
    {
        **_RETRY_AFTER,
        "X-RateLimit-Limit": {"schema": {"type": "integer", "minimum": 1}},
        "X-RateLimit-Remaining": {"schema": {"type": "integer", "minimum": 0}},
        "X-RateLimit-Reset": {
            "description": "the Unix time the current window ends",
            "schema": {"type": "integer"},
        },
        "RateLimit-Limit": {"schema": {"type": "integer", "minimum": 1}},
        "RateLimit-Remaining": {"schema": {"type": "integer", "minimum": 0}},
        "RateLimit-Reset": {
            "description": "seconds until the current window ends",
            "schema": {"type": "integer", "minimum": 0},
        },
    },
)
# Writes need a key (unless the server allows anonymous writes); reads may carry one, and need
# one where the server says so (READS_REQUIRE_KEY=1).
_KEYED = [{"apiKey": []}]
_KEY_OPTIONAL = [{}, {"apiKey": []}]
_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "integer", "format": "int64", "minimum": 1, "maximum": BIGINT_MAX},
}


def _read(summary: str, schema: str) -> dict:
    return {
        "get": {
            "summary": summary,
            "parameters": [_ID],
            "security": _KEY_OPTIONAL,
            "responses": {
                "200": _json(_ref(schema), "found", _X_CACHE),
                "400": _error("the id is not an integer from 1 to 2^63-1"),
                "401": _UNAUTHORIZED,
                "404": _error("no such product"),
                "429": _RATE_LIMITED,
                "503": _UNAVAILABLE,
            },
        }
    }


def document() -> dict[str, Any]:
    stock_value = {"type": "integer", "minimum": 0, "maximum": INT32_MAX}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "FastStock API",
            "version": "1.0.0",
            "description": "Products and stock on PostgreSQL with a Redis read-through cache. "
            'Every error body is {"error": code, "message": text}.',
        },
        "paths": {
            "/api/products": {
                "get": {
                    "summary": "A page of products, ordered by id",
                    "parameters": [
                        {
                            "name": "page",
                            "in": "query",
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": MAX_PAGE,
                                "default": 1,
                            },
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": MAX_LIMIT,
                                "default": 10,
                            },
                        },
                    ],
                    "security": _KEY_OPTIONAL,
                    "responses": {
                        "200": _json(_ref("ProductPage"), "the page", _X_CACHE),
                        "400": _error("page or limit out of range, or given twice"),
                        "401": _UNAUTHORIZED,
                        "429": _RATE_LIMITED,
                        "503": _UNAVAILABLE,
                    },
                }
            },
            "/api/products/{id}": _read("One product", "Product"),
            "/api/products/{id}/stock": _read("A product's stock", "Stock"),
            "/api/products/{id}/update-stock": {
                "post": {
                    "summary": "Set the stock, or change it atomically by a delta",
                    "security": _KEYED,
                    "parameters": [
                        _ID,
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "description": "Retries with the same key and body replay the "
                            "first answer (kept 24 hours); each API key has keys of its own",
                            "schema": {
                                "type": "string",
                                "minLength": 1,
                                "maxLength": MAX_IDEMPOTENCY_KEY_LENGTH,
                                "pattern": IDEMPOTENCY_KEY_PATTERN,
                            },
                        },
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("StockChange")}},
                    },
                    "responses": {
                        "200": _json(
                            _ref("Stock"),
                            "applied (or replayed)",
                            {
                                "Idempotent-Replayed": {
                                    "schema": {"type": "string", "enum": ["true"]}
                                }
                            },
                        ),
                        "400": _error("bad id, body or Idempotency-Key"),
                        "401": _UNAUTHORIZED,
                        "404": _error("no such product"),
                        "409": _json(
                            _ref("StockConflict"),
                            "the change would take the stock below 0 or above 2^31-1, "
                            "or the same key is still being processed",
                        ),
                        "413": _error("body over 16 KiB"),
                        "415": _error("body not application/json"),
                        "422": _error("Idempotency-Key reused with a different request"),
                        "429": _RATE_LIMITED,
                        "503": _UNAVAILABLE,
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness; touches neither PostgreSQL nor Redis",
                    "responses": {"200": _json(_ref("Health"), "alive")},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: PostgreSQL answers (Redis, the breaker, the pool and "
                    "the outbox backlog are reported, not required)",
                    "responses": {
                        "200": _json(_ref("Ready"), "ready"),
                        "503": _json(_ref("Error"), "PostgreSQL not answering", _RETRY_AFTER),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus exposition of all workers",
                    "responses": {
                        "200": {
                            "description": "metrics",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        "403": _error("the client's address is not in METRICS_ALLOW"),
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {"200": _json({"type": "object"}, "OpenAPI 3 document")},
                }
            },
        },
        "components": {
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Authorization: Bearer <key>; `flask --app faststock api-key "
                    "create NAME` makes one",
                }
            },
            "schemas": {
                "Product": {
                    "type": "object",
                    "required": ["id", "name", "price", "stock"],
                    "properties": {
                        "id": {"type": "integer", "minimum": 1},
                        "name": {"type": "string"},
                        "price": {"type": "string", "pattern": "^[0-9]+\\.[0-9]{2}$"},
                        "stock": stock_value,
                        "updated_at": {"type": "string", "format": "date-time"},
                    },
                },
                "Stock": {
                    "type": "object",
                    "required": ["id", "stock"],
                    "additionalProperties": False,
                    "properties": {"id": {"type": "integer", "minimum": 1}, "stock": stock_value},
                },
                "ProductPage": {
                    "type": "object",
                    "required": ["items", "page", "limit", "next_page"],
                    "properties": {
                        "items": {"type": "array", "items": _ref("Product")},
                        "page": {"type": "integer", "minimum": 1},
                        "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
                        "next_page": {"type": "integer", "minimum": 2, "nullable": True},
                    },
                },
                "StockChange": {
                    "oneOf": [
                        {
                            "type": "object",
                            "required": ["stock"],
                            "additionalProperties": False,
                            "properties": {"stock": stock_value},
                        },
                        {
                            "type": "object",
                            "required": ["delta"],
                            "additionalProperties": False,
                            "properties": {
                                "delta": {
                                    "type": "integer",
                                    "minimum": INT32_MIN,
                                    "maximum": INT32_MAX,
                                }
                            },
                        },
                    ]
                },
                "Error": {
                    "type": "object",
                    "required": ["error", "message"],
                    "properties": {
                        "error": {"type": "string", "enum": list(ERROR_CODES)},
                        "message": {"type": "string"},
                    },
                },
                "StockConflict": {
                    "allOf": [
                        _ref("Error"),
                        {"type": "object", "properties": {"stock": stock_value}},
                    ]
                },
                "Health": {
                    "type": "object",
                    "required": ["status"],
                    "properties": {"status": {"type": "string", "enum": ["ok"]}},
                },
                "Ready": {
                    "type": "object",
                    "required": ["status", "postgres", "redis", "breaker", "pool", "outbox"],
                    "properties": {
                        "status": {"type": "string", "enum": ["ok"]},
                        "postgres": {"type": "string", "enum": ["ok"]},
                        "redis": {"type": "string", "enum": ["ok", "unavailable"]},
                        "breaker": {
                            "type": "object",
                            "required": ["state", "openings"],
                            "properties": {
                                "state": {"type": "string", "enum": ["open", "closed"]},
                                "openings": {"type": "integer", "minimum": 0},
                            },
                        },
                        "pool": {
                            "type": "object",
                            "required": ["size", "in_use", "waiters"],
                            "properties": {
                                "size": {"type": "integer", "minimum": 1},
                                "in_use": {"type": "integer", "minimum": 0},
                                "waiters": {"type": "integer", "minimum": 0},
                            },
                        },
                        "outbox": {
                            "type": "object",
                            "required": ["backlog"],
                            "properties": {
                                "backlog": {"type": "integer", "minimum": 0, "nullable": True}
                            },
                        },
                    },
                },
            },
        },
    }


bp = Blueprint("openapi", __name__)
_BODY = orjson.dumps(document())


@bp.get("/openapi.json")
def openapi_json() -> Response:
    return Response(_BODY, mimetype="application/json")
