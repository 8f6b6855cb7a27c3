"""Deltas, idempotent retries and versioned cache writes, through the Flask test client."""

from __future__ import annotations

import pytest

from faststock.seed import product_row

STOCK5 = product_row(5)[3]
STOCK6 = product_row(6)[3]


def post(client, product_id, body, key=None, **headers):
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.post(f"/api/products/{product_id}/update-stock", json=body, headers=headers)


def test_delta_adds_and_subtracts(client, changes):
    assert post(client, 5, {"delta": 10}).get_json() == {"id": 5, "stock": STOCK5 + 10}
    assert post(client, 5, {"delta": -3}).get_json() == {"id": 5, "stock": STOCK5 + 7}
    assert changes(5) == (STOCK5 + 7, 2)


def test_delta_to_exactly_zero(client, sql):
    sql("UPDATE products SET stock = 4 WHERE id = 5")
    assert post(client, 5, {"delta": -4}).get_json() == {"id": 5, "stock": 0}


def test_insufficient_stock_is_409_and_changes_nothing(client, sql, changes):
    sql("UPDATE products SET stock = 3 WHERE id = 5")
    response = post(client, 5, {"delta": -4})
    assert response.status_code == 409
    body = response.get_json()
    assert body["error"] == "insufficient_stock"
    assert body["stock"] == 3
    assert body["message"]
    assert changes(5) == (3, 0)


def test_delta_beyond_column_range_is_409(client, sql):
    sql("UPDATE products SET stock = 2147483000 WHERE id = 5")
    response = post(client, 5, {"delta": 2147483647})
    assert response.status_code == 409
    assert response.get_json()["error"] == "stock_out_of_range"
    assert response.get_json()["stock"] == 2147483000
    assert sql("SELECT stock FROM products WHERE id = 5") == [(2147483000,)]


@pytest.mark.parametrize(
    "body",
    [
        {"delta": 2147483648},
        {"delta": -2147483649},
        {"delta": 1.0},
        {"delta": True},
        {"delta": "1"},
        {"delta": None},
        {"stock": 1, "delta": 1},
        {},
        {"delta": 1, "note": "x"},
    ],
)
def test_bad_delta_bodies_are_400(client, body):
    response = post(client, 5, body)
    assert response.status_code == 400
    assert response.get_json()["error"] == "bad_request"


def test_delta_on_absent_product_is_404(client):
    assert post(client, 4040, {"delta": 1}).status_code == 404


def test_extreme_deltas_are_accepted(client, sql):
    assert post(client, 5, {"delta": -2147483648}).status_code == 409
    sql("UPDATE products SET stock = 0 WHERE id = 5")
    assert post(client, 5, {"delta": 2147483647}).get_json()["stock"] == 2147483647


def test_retry_with_key_replays_and_applies_once(client, changes):
    first = post(client, 5, {"delta": -1}, key="order-1")
    again = post(client, 5, {"delta": -1}, key="order-1")
    assert first.status_code == again.status_code == 200
    assert first.data == again.data
    assert "Idempotent-Replayed" not in first.headers
    assert again.headers["Idempotent-Replayed"] == "true"
    assert changes(5) == (STOCK5 - 1, 1)


def test_replay_ignores_body_formatting(client):
    post(client, 5, {"delta": -1}, key="k-format")
    again = client.post(
        "/api/products/5/update-stock",
        data=b'{ "delta" :  -1 }',
        headers={"Content-Type": "application/json", "Idempotency-Key": "k-format"},
    )
    assert again.headers["Idempotent-Replayed"] == "true"


def test_error_answers_are_replayed_too(client, sql):
    sql("UPDATE products SET stock = 0 WHERE id = 5")
    assert post(client, 5, {"delta": -1}, key="k-409").status_code == 409
    sql("UPDATE products SET stock = 10 WHERE id = 5")
    replay = post(client, 5, {"delta": -1}, key="k-409")
    assert replay.status_code == 409
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert sql("SELECT stock FROM products WHERE id = 5") == [(10,)]


@pytest.mark.parametrize(
    ("product_id", "body"), [(5, {"delta": -2}), (6, {"delta": -1}), (5, {"stock": 1})]
)
def test_same_key_different_request_is_422(client, sql, product_id, body):
    post(client, 5, {"delta": -1}, key="k-reuse")
    response = post(client, product_id, body, key="k-reuse")
    assert response.status_code == 422
    assert response.get_json()["error"] == "idempotency_key_reused"
    assert sql("SELECT stock FROM products WHERE id IN (5, 6) ORDER BY id") == [
        (STOCK5 - 1,),
        (product_row(6)[3],),
    ]


@pytest.mark.parametrize("key", ["", "a" * 256, "has space", "tab\t", "é"])
def test_bad_keys_are_400(client, sql, key):
    response = client.post(
        "/api/products/5/update-stock",
        json={"delta": -1},
        headers={"Idempotency-Key": key.encode("utf-8").decode("latin-1")},
    )
    assert response.status_code == 400
    assert sql("SELECT count(*) FROM idempotency_keys") == [(0,)]


def test_longest_key_is_fine(client):
    assert post(client, 5, {"delta": -1}, key="~" * 255).status_code == 200


def test_rejected_requests_store_nothing(client, sql):
    assert post(client, 5, {"delta": "x"}, key="k-bad").status_code == 400
    assert post(client, "abc", {"delta": 1}, key="k-bad").status_code == 400
    assert sql("SELECT count(*) FROM idempotency_keys") == [(0,)]
    assert post(client, 5, {"delta": -1}, key="k-bad").status_code == 200


def test_expired_keys_run_again_and_are_collected(client, sql):
    post(client, 5, {"delta": -1}, key="k-old")
    post(client, 6, {"delta": -1}, key="k-other-old")
    sql("UPDATE idempotency_keys SET created_at = now() - interval '25 hours'")
    again = post(client, 5, {"delta": -1}, key="k-old")
    assert "Idempotent-Replayed" not in again.headers
    assert again.get_json()["stock"] == STOCK5 - 2
    assert sql("SELECT key FROM idempotency_keys ORDER BY key") == [("k-old",)]


def test_write_through_carries_the_new_version(client, config, sql):
    import redis as redis_lib

    from faststock.cache import product_key

    client.get("/api/products/5")
    post(client, 5, {"delta": -1})
    raw = redis_lib.Redis.from_url(config.redis_url).get(product_key(5))
    version = sql("SELECT version FROM products WHERE id = 5")[0][0]
    assert raw.startswith(b"%d|%d|" % (version, STOCK5 - 1))


def test_reader_fill_after_writer_commit_does_not_restore_old_row(app, monkeypatch, changes):
    """Force: reader misses and reads v1, writer commits v2 and answers, reader fills v1."""
    from faststock import queries

    client, writer = app.test_client(), app.test_client()
    real_fetch = queries.fetch_product
    interleaved = []

    def fetch_then_let_writer_commit(cur, product_id):
        row = real_fetch(cur, product_id)
        if not interleaved:
            interleaved.append(post(writer, product_id, {"stock": 4242}).get_json())
        return row

    monkeypatch.setattr(queries, "fetch_product", fetch_then_let_writer_commit)
    stale = client.get("/api/products/5")
    assert interleaved == [{"id": 5, "stock": 4242}]
    assert stale.get_json()["stock"] == STOCK5  # that reader began before the write answered
    monkeypatch.setattr(queries, "fetch_product", real_fetch)
    after = client.get("/api/products/5")
    assert after.headers["X-Cache"] == "HIT"
    assert after.get_json()["stock"] == 4242
    assert client.get("/api/products/5/stock").get_json() == {"id": 5, "stock": 4242}
    assert changes(5) == (4242, 1)


def test_list_page_fill_racing_a_write_does_not_restore_old_rows(app, monkeypatch):
    from faststock import queries

    client, writer = app.test_client(), app.test_client()
    real_page = queries.fetch_page

    def page_then_write(cur, limit, offset):
        rows = real_page(cur, limit, offset)
        post(writer, 3, {"stock": 333})
        return rows

    monkeypatch.setattr(queries, "fetch_page", page_then_write)
    client.get("/api/products?page=1&limit=5")
    monkeypatch.setattr(queries, "fetch_page", real_page)
    listed = client.get("/api/products?page=1&limit=5")
    assert listed.headers["X-Cache"] == "HIT"
    assert listed.get_json()["items"][2]["stock"] == 333
    assert client.get("/api/products/3/stock").get_json()["stock"] == 333


def test_refusal_reason_follows_the_delta_sign_not_a_later_read(app, monkeypatch, sql):
    """Force the race: the delta is refused at stock 5, then another client adds 20 before the
    refusal reads the stock again. A negative delta is always refused as insufficient stock."""
    from faststock import queries

    real_add = queries.add_stock

    def add_then_race(cur, product_id, delta):
        row = real_add(cur, product_id, delta)
        assert row is None
        sql("UPDATE products SET stock = stock + 20 WHERE id = %s", product_id)
        return row

    monkeypatch.setattr(queries, "add_stock", add_then_race)
    client = app.test_client()
    for key in (None, "race-1"):
        sql("UPDATE products SET stock = 5 WHERE id = 5")
        response = post(client, 5, {"delta": -10}, key=key)
        assert response.status_code == 409
        assert response.get_json()["error"] == "insufficient_stock"
    monkeypatch.setattr(queries, "add_stock", real_add)
    replay = post(client, 5, {"delta": -10}, key="race-1")  # the stored answer is the right one
    assert replay.get_json()["error"] == "insufficient_stock"
    sql("UPDATE products SET stock = 2147483640 WHERE id = 6")
    up = post(client, 6, {"delta": 10})
    assert (up.status_code, up.get_json()["error"]) == (409, "stock_out_of_range")


def test_replayed_success_writes_the_cache_before_answering(app, monkeypatch, config):
    """The first attempt commits but its answer (and cache update) is lost, as with a 503 at
    commit time; the retry's replayed 200 must leave no reader seeing the old stock."""
    from faststock import stock
    from faststock.errors import Unavailable

    client = app.test_client()
    assert client.get("/api/products/5").get_json()["stock"] == STOCK5  # cached
    real_write_through = stock._write_through
    lost = []

    def lose_first_answer(row):
        if not lost:
            lost.append(row)
            raise Unavailable("database unavailable")
        real_write_through(row)

    monkeypatch.setattr(stock, "_write_through", lose_first_answer)
    assert post(client, 5, {"delta": -2}, key="order-lost").status_code == 503
    assert lost, "the change did not commit"
    again = post(client, 5, {"delta": -2}, key="order-lost")
    assert (again.status_code, again.headers.get("Idempotent-Replayed")) == (200, "true")
    assert again.get_json() == {"id": 5, "stock": STOCK5 - 2}
    read = client.get("/api/products/5")
    assert (read.headers["X-Cache"], read.get_json()["stock"]) == ("HIT", STOCK5 - 2)


def test_nothing_after_commit_turns_a_write_into_a_500(app, monkeypatch, sql):
    from faststock import shared
    from faststock.cache import Cache

    def broken_fill(self, *args, **kwargs):
        raise RuntimeError("a bug in the cache layer")

    monkeypatch.setattr(Cache, "fill", broken_fill)
    mark = shared.dirty_mark()
    response = post(app.test_client(), 5, {"stock": 55})
    assert (response.status_code, response.get_json()) == (200, {"id": 5, "stock": 55})
    assert shared.dirty_mark() > mark  # the host stops trusting Redis until the keeper replays
    assert sql("SELECT stock FROM products WHERE id = 5") == [(55,)]


def _on_app_connection(app, query: str) -> list[tuple]:
    """`query`'s rows on the connection the app's requests use (the pool's only idle one)."""
    from faststock import db

    with app.app_context(), db.cursor() as cur:
        cur.execute(query)
        return cur.fetchall()


def _prepared(app) -> dict[str, int]:
    """The statements prepared on the app's connection, each with how many times it has run."""
    query = "SELECT name, generic_plans + custom_plans FROM pg_prepared_statements"
    return dict(_on_app_connection(app, query))


def test_statements_are_prepared_once_per_connection_and_reused(app, client, changes):
    assert post(client, 5, {"delta": 2}).status_code == 200
    assert post(client, 5, {"delta": -1}).status_code == 200
    assert post(client, 5, {"stock": 40}).status_code == 200
    assert post(client, 6, {"delta": 1}, key="prepared-in-a-transaction").status_code == 200
    assert post(client, 6, {"delta": 1}, key="prepared-in-a-transaction").status_code == 200
    assert post(client, 404, {"delta": -1}).status_code == 404
    assert client.get("/api/products/7").headers["X-Cache"] == "MISS"
    assert client.get("/api/products/8").headers["X-Cache"] == "MISS"
    assert client.get("/api/products?page=3&limit=5").headers["X-Cache"] == "MISS"
    assert changes(5) == (40, 3)
    assert changes(6)[0] == STOCK6 + 1  # the retry was replayed, not applied again
    assert _prepared(app) == {
        "faststock_add_stock": 4,  # the 404 too
        "faststock_set_stock": 1,
        "faststock_claim_key": 2,
        "faststock_store_answer": 1,
        "faststock_fetch_key": 1,  # the retry's stored answer
        "faststock_fetch_stock": 1,  # why the 404's change found no row
        "faststock_fetch_product": 3,  # two misses, and the replayed success's current row
        "faststock_fetch_page": 1,
    }


def test_a_new_connection_prepares_again(app, client, sql):
    assert post(client, 5, {"delta": 1}).status_code == 200
    # The server ends the pooled connection's backend (a restart, an admin): the pool replaces
    # the connection, and the statement is prepared on the new one, not assumed. The timeout
    # makes pg_terminate_backend wait until the backend has gone (PostgreSQL 14 and later).
    [(backend,)] = _on_app_connection(app, "SELECT pg_backend_pid()")
    assert sql("SELECT pg_terminate_backend(%s, 10000)", backend) == [(True,)]
    assert post(client, 5, {"delta": 1}).get_json()["stock"] == STOCK5 + 2
    assert _prepared(app) == {"faststock_add_stock": 1}


def test_through_a_transaction_pooler_the_change_is_sent_as_text(fresh):
    from faststock import db, queries

    pool = db.Pool(fresh.database_url, size=1, timeout=2, statement_timeout_ms=1000, pooled=True)
    with db.pooled_cursor(pool) as cur:
        assert queries.add_stock(cur, 5, 1)[3] == STOCK5 + 1
        cur.execute("SELECT count(*) FROM pg_prepared_statements")
        assert cur.fetchone() == (0,)
