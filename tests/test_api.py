"""The HTTP contract, through the Flask test client against real PostgreSQL and Redis."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis as redis_lib

from faststock.seed import product_row

JSON = {"Content-Type": "application/json"}


def expected(i: int) -> dict:
    _, name, price, stock = product_row(i)
    return {"id": i, "name": name, "price": price, "stock": stock}


def test_product_by_id(client):
    response = client.get("/api/products/42")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert {k: body[k] for k in ("id", "name", "price", "stock")} == expected(42)
    assert body["name"] == "Product 000042"


def test_price_keeps_two_decimals(client, sql):
    sql("UPDATE products SET price = 12.5 WHERE id = 1")
    sql("UPDATE products SET price = 0 WHERE id = 2")
    assert client.get("/api/products/1").get_json()["price"] == "12.50"
    assert client.get("/api/products/2").get_json()["price"] == "0.00"


def test_stock_has_exactly_two_keys(client):
    response = client.get("/api/products/7/stock")
    assert response.status_code == 200
    assert response.get_json() == {"id": 7, "stock": product_row(7)[3]}


@pytest.mark.parametrize("path", ["/api/products/999", "/api/products/999/stock"])
def test_absent_product_is_404(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert response.get_json()["error"] == "not_found"
    assert "999" in response.get_json()["message"]


@pytest.mark.parametrize(
    "raw", ["abc", "0", "-1", "1.5", "99999999999999999999", "%27", "9223372036854775808", "1e3"]
)
@pytest.mark.parametrize("suffix", ["", "/stock"])
def test_bad_ids_are_400(client, raw, suffix):
    response = client.get(f"/api/products/{raw}{suffix}")
    assert response.status_code == 400
    assert response.get_json()["error"] == "bad_request"


def test_bad_id_on_update_is_400(client):
    response = client.post("/api/products/abc/update-stock", json={"stock": 1})
    assert response.status_code == 400


def test_largest_id_is_valid_and_absent(client):
    assert client.get("/api/products/9223372036854775807").status_code == 404


def test_list_defaults(client):
    response = client.get("/api/products")
    assert response.status_code == 200
    body = response.get_json()
    assert (body["page"], body["limit"], body["next_page"]) == (1, 10, 2)
    assert [item["id"] for item in body["items"]] == list(range(1, 11))
    assert {k: body["items"][0][k] for k in ("id", "name", "price", "stock")} == expected(1)


def test_list_pages_and_end(client):
    body = client.get("/api/products?page=3&limit=20").get_json()
    assert [item["id"] for item in body["items"]] == list(range(41, 61))
    assert body["next_page"] == 4
    last = client.get("/api/products?page=5&limit=20").get_json()
    assert [item["id"] for item in last["items"]] == list(range(81, 101))
    assert last["next_page"] is None
    past = client.get("/api/products?page=6&limit=20").get_json()
    assert past == {"items": [], "page": 6, "limit": 20, "next_page": None}


@pytest.mark.parametrize("limit", [1, 10, 100])
def test_list_largest_page_is_valid(client, limit):
    response = client.get(f"/api/products?page=92233720368547759&limit={limit}")
    assert response.status_code == 200
    assert response.get_json()["items"] == []


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=101",
        "limit=abc",
        "limit=",
        "page=0",
        "page=-1",
        "page=1.5",
        "page=x",
        "page=92233720368547760&limit=100",
        "page=92233720368547760&limit=1",
        "page=99999999999999999999",
        "page=1&page=2",
        "limit=5&limit=5",
    ],
)
def test_bad_list_queries_are_400(client, query):
    response = client.get(f"/api/products?{query}")
    assert response.status_code == 400
    assert response.get_json()["error"] == "bad_request"


def test_update_stock_sets_value(client, changes):
    response = client.post("/api/products/5/update-stock", json={"stock": 77})
    assert response.status_code == 200
    assert response.get_json() == {"id": 5, "stock": 77}
    assert changes(5) == (77, 1)


@pytest.mark.parametrize("value", [0, 2147483647])
def test_update_stock_bounds(client, value):
    response = client.post("/api/products/5/update-stock", json={"stock": value})
    assert response.status_code == 200
    assert response.get_json()["stock"] == value


@pytest.mark.parametrize(
    "body",
    [
        b'{"stock": -1}',
        b'{"stock": 2147483648}',
        b'{"stock": true}',
        b'{"stock": 1.0}',
        b'{"stock": 1.5}',
        b'{"stock": "5"}',
        b'{"stock": null}',
        b'{"stock": [1]}',
        b"{}",
        b'{"stok": 5}',
        b"[1]",
        b'"stock"',
        b"5",
        b"null",
        b"",
        b"{",
        b'{"stock": NaN}',
        b'{"stock": Infinity}',
        b'{"stock": 1, "stock": 2}',
        b'{"stock": 1e400}',
        b'{"stock": 99999999999999999999999999999}',
        b'{"stock": 5}\x00',
        b'{"stock": "\xff"}',
        b"[" * 5000 + b"]" * 5000,
    ],
)
def test_update_stock_invalid_bodies_are_400(client, changes, body):
    response = client.post("/api/products/5/update-stock", data=body, headers=JSON)
    assert response.status_code == 400, response.data
    assert response.get_json()["error"] == "bad_request"
    assert changes(5) == (product_row(5)[3], 0)


def test_update_stock_absent_product_is_404(client):
    response = client.post("/api/products/12345/update-stock", json={"stock": 3})
    assert response.status_code == 404
    assert response.get_json()["error"] == "not_found"


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_update_stock_needs_json_content_type(client, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/api/products/5/update-stock", data=b'{"stock": 1}', headers=headers)
    assert response.status_code == 415
    assert response.get_json()["error"] == "unsupported_media_type"


def test_update_stock_accepts_json_with_charset(client):
    headers = {"Content-Type": "application/json; charset=utf-8"}
    response = client.post("/api/products/5/update-stock", data=b'{"stock": 1}', headers=headers)
    assert response.status_code == 200


def test_body_over_16_kib_is_413(client):
    body = b'{"stock": 1, "pad": "' + b"x" * (16 * 1024) + b'"}'
    response = client.post("/api/products/5/update-stock", data=body, headers=JSON)
    assert response.status_code == 413
    assert response.get_json()["error"] == "payload_too_large"


def test_unknown_route_is_json_404(client):
    response = client.get("/nope")
    assert response.status_code == 404
    assert response.get_json()["error"] == "not_found"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/api/products/1"),
        ("POST", "/api/products/1"),
        ("GET", "/api/products/1/update-stock"),
        ("PUT", "/api/products/1/stock"),
    ],
)
def test_wrong_method_is_json_405(client, method, path):
    response = client.open(path, method=method)
    assert response.status_code == 405
    assert response.get_json()["error"] == "method_not_allowed"
    assert response.headers["Allow"]


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_healthz_needs_neither_database_nor_redis(make_app):
    app = make_app(
        database_url="postgresql://nobody@127.0.0.1:1/none", redis_url="redis://127.0.0.1:1/0"
    )
    response = app.test_client().get("/healthz")
    assert response.status_code == 200


def test_readyz(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json() == {
        "status": "ok",
        "postgres": "ok",
        "redis": "ok",
        "breaker": {"state": "closed", "openings": 0},
        "pool": {"size": 10, "in_use": 0, "waiters": 0},
        "outbox": {"backlog": None},  # this app's keeper has not counted yet
    }


def test_readyz_reports_redis_but_does_not_need_it(make_app):
    app = make_app(redis_url="redis://127.0.0.1:1/0")
    response = app.test_client().get("/readyz")
    assert response.status_code == 200
    assert response.get_json()["redis"] == "unavailable"


def test_readyz_is_503_without_postgres(make_app):
    app = make_app(database_url="postgresql://faststock@127.0.0.1:1/faststock")
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["error"] == "unavailable"
    assert response.headers["Retry-After"]


def test_reads_without_postgres_are_503_not_500(make_app):
    app = make_app(database_url="postgresql://faststock@127.0.0.1:1/faststock")
    response = app.test_client().get("/api/products/1")
    assert response.status_code == 503
    assert response.get_json()["error"] == "unavailable"
    assert response.headers["Retry-After"]


def test_request_id_is_echoed_or_made(client):
    assert client.get("/healthz", headers={"X-Request-ID": "abc-1"}).headers["X-Request-ID"] == (
        "abc-1"
    )
    assert len(client.get("/healthz").headers["X-Request-ID"]) == 32


def test_unexpected_error_is_json_500_without_detail(app, caplog):
    @app.get("/boom")
    def boom():
        raise RuntimeError("secret detail")

    response = app.test_client().get("/boom", headers={"X-Request-ID": "req-77"})
    assert response.status_code == 500
    assert response.get_json() == {"error": "internal", "message": "internal server error"}
    assert "secret" not in response.get_data(as_text=True)
    assert "req-77" in caplog.text


def test_metrics_are_labelled_by_route(client):
    client.get("/api/products/1")
    client.get("/api/products/2")
    client.get("/api/products/zzz")
    text = client.get("/metrics").get_data(as_text=True)
    assert 'route="/api/products/<raw_id>"' in text
    assert "/api/products/1" not in text.replace("/api/products/<raw_id>", "")
    assert 'faststock_cache_requests_total{endpoint="product",result="MISS"} 2.0' in text


def test_redis_keys_are_namespaced(client, config):
    client.get("/api/products/1")
    client.get("/api/products?page=1")
    keys = redis_lib.Redis.from_url(config.redis_url).keys("*")
    assert keys and all(k.startswith(b"fs1:") for k in keys)


@pytest.mark.parametrize(
    "body",
    [
        b'{"delta":1,"\\ud800":0}',
        b'{"stock":1,"\\udfff\\ud800x":0}',
        b'{"delta":1,"note":"\\udc80"}',
        b'{"delta":1,"deep":[{"x":["\\ud834"]}]}',
        b'{"\\ud800":1}',
    ],
)
def test_lone_surrogates_are_400_never_500(client, changes, body):
    response = client.post("/api/products/5/update-stock", data=body, headers=JSON)
    assert response.status_code == 400, response.data
    assert response.get_json()["error"] == "bad_request"
    response.data.decode("utf-8")  # strict: the answer itself is valid UTF-8
    assert changes(5) == (product_row(5)[3], 0)


def test_unknown_field_names_are_quoted_and_shortened(client):
    body = {"delta": 1, "é" + "x" * 500: 0}
    message = client.post("/api/products/5/update-stock", json=body).get_json()["message"]
    assert message.isascii() and len(message) < 120


def test_error_messages_never_fail_to_encode():
    from faststock.errors import error_body

    assert b"\\\\ud800" in error_body("bad_request", "field \ud800 unknown")


def test_one_registry_of_error_codes(client):
    from faststock.errors import ERROR_CODES, ApiError

    schema = client.get("/openapi.json").get_json()["components"]["schemas"]["Error"]
    assert schema["properties"]["error"]["enum"] == list(ERROR_CODES)
    with pytest.raises(ValueError, match="unregistered"):
        ApiError(409, "conflict", "not a code the API documents")


def test_hooks_and_views_are_checked_for_coroutines_once(app, monkeypatch):
    """Flask's own `ensure_sync` inspects every hook and view on every request; the app's
    checks each function once, and every hook and the view still run."""
    from flask import Flask

    checked: list[object] = []
    plain = Flask.ensure_sync

    def counting(self: Flask, func: Callable[..., Any]) -> Callable[..., Any]:
        checked.append(func)
        return plain(self, func)

    monkeypatch.setattr(Flask, "ensure_sync", counting)
    client = app.test_client()
    answers = [
        client.post("/api/products/5/update-stock", json={"delta": 1}, headers=JSON)
        for _ in range(3)
    ]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert all(a.headers["X-Request-ID"] for a in answers)  # a before and an after hook ran
    assert answers[2].get_json()["stock"] == answers[0].get_json()["stock"] + 2
    assert checked, "no function went through ensure_sync"
    assert len(checked) == len(set(checked)), "a function was checked again on a later request"


def test_an_unhashable_hook_still_runs(make_app):
    """A callable object with `__eq__` and no `__hash__` cannot be a key of the app's kept sync
    checks: it is checked each time, as Flask does, and runs."""

    class Hook:
        calls = 0

        def __eq__(self, other: object) -> bool:
            return self is other

        def __call__(self) -> None:
            Hook.calls += 1

    app = make_app()
    app.before_request(Hook())
    client = app.test_client()
    assert [client.get("/openapi.json").status_code for _ in range(2)] == [200, 200]
    assert Hook.calls == 2
