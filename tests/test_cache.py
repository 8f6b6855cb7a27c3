"""Read-through caching, write-through after commit, and falling back to PostgreSQL."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg2
import pytest
import redis as redis_lib

from faststock.cache import Cache, encode_entry, product_key
from faststock.config import Config
from tests.servers import poll


def wait_for_cache(client, path: str, within: float = 5.0) -> str:
    """Poll until the cache is used again (the breaker closed); returns that X-Cache value."""
    states: list[str] = []

    def used() -> bool:
        states.append(client.get(path).headers["X-Cache"])
        return states[-1] != "BYPASS"

    poll(used, within=within, every=0.05)
    return states[-1]


def test_miss_then_hit(client):
    first = client.get("/api/products/3")
    second = client.get("/api/products/3")
    assert first.headers["X-Cache"] == "MISS"
    assert second.headers["X-Cache"] == "HIT"
    assert first.data == second.data
    assert client.get("/api/products/3/stock").headers["X-Cache"] == "HIT"


def test_list_miss_then_hit(client):
    first = client.get("/api/products?page=2&limit=5")
    second = client.get("/api/products?page=2&limit=5")
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert first.get_json() == second.get_json()
    # the page filled the product entries too
    assert client.get("/api/products/7").headers["X-Cache"] == "HIT"


def test_hit_serves_cache_not_database(client, sql):
    client.get("/api/products/3")
    sql("UPDATE products SET name = 'changed behind our back' WHERE id = 3")
    assert client.get("/api/products/3").get_json()["name"] == "Product 000003"


def test_update_is_visible_everywhere_at_once(client):
    client.get("/api/products/3")
    client.get("/api/products/3/stock")
    client.get("/api/products?page=1&limit=10")
    assert client.post("/api/products/3/update-stock", json={"stock": 4242}).status_code == 200
    product = client.get("/api/products/3")
    assert product.headers["X-Cache"] == "HIT"
    assert product.get_json()["stock"] == 4242
    assert client.get("/api/products/3/stock").get_json() == {"id": 3, "stock": 4242}
    listed = client.get("/api/products?page=1&limit=10")
    assert listed.headers["X-Cache"] == "HIT"
    assert listed.get_json()["items"][2]["stock"] == 4242


def test_expired_product_entry_on_cached_page_is_refetched(client, config, sql):
    client.get("/api/products?page=1&limit=10")
    redis_lib.Redis.from_url(config.redis_url).delete(product_key(4))
    sql("UPDATE products SET stock = 9, version = version + 1 WHERE id = 4")
    listed = client.get("/api/products?page=1&limit=10")
    assert listed.get_json()["items"][3]["stock"] == 9
    assert listed.headers["X-Cache"] == "MISS"


def test_absent_product_is_remembered_briefly(client, config, sql):
    assert client.get("/api/products/500").headers["X-Cache"] == "MISS"
    sql("INSERT INTO products (id, name, price, stock) VALUES (500, 'late', 1, 1)")
    again = client.get("/api/products/500")
    assert again.status_code == 404
    assert again.headers["X-Cache"] == "HIT"
    ttl = redis_lib.Redis.from_url(config.redis_url).pttl(product_key(500))
    assert 0 < ttl <= 5500


def test_ttl_is_set_with_jitter(client, config):
    for i in range(1, 21):
        client.get(f"/api/products/{i}")
    r = redis_lib.Redis.from_url(config.redis_url)
    ttls = {r.pttl(product_key(i)) for i in range(1, 21)}
    assert all(0.85 * 60_000 < t <= 1.1 * 60_000 for t in ttls)
    assert len(ttls) > 1


def test_cache_ttl_setting_is_used(make_app, config):
    client = make_app(cache_ttl_seconds=7).test_client()
    client.get("/api/products/1")
    assert 0 < redis_lib.Redis.from_url(config.redis_url).pttl(product_key(1)) <= 7700


def test_older_version_never_replaces_newer(fresh):
    cache = Cache(fresh)
    assert cache.fill([(1, 5, encode_entry(5, 50, b"{}"))]) == 1
    assert cache.fill([(1, 4, encode_entry(4, 40, b"{}"))]) == 0  # told, but nothing stored
    assert cache.get_product(1)[1] == encode_entry(5, 50, b"{}")
    assert cache.fill([(1, 6, encode_entry(6, 60, b"{}"))]) == 1
    assert cache.get_product(1)[1] == encode_entry(6, 60, b"{}")
    cache.remember_missing(1)
    assert cache.get_product(1)[1] == encode_entry(6, 60, b"{}")


@pytest.fixture
def outage_client(make_app, private_redis):
    app = make_app(redis_url=private_redis.url, redis_timeout_ms=100)
    return app.test_client(), private_redis


def test_redis_stopped_mid_test_serves_from_postgres(outage_client, sql):
    client, server = outage_client
    assert client.get("/api/products/8").headers["X-Cache"] == "MISS"
    assert client.get("/api/products/8").headers["X-Cache"] == "HIT"
    server.stop()
    for path in ("/api/products/8", "/api/products/8/stock", "/api/products?page=1"):
        response = client.get(path)
        assert response.status_code == 200
        assert response.headers["X-Cache"] == "BYPASS"
    assert client.post("/api/products/8/update-stock", json={"stock": 1}).status_code == 200
    assert client.get("/api/products/8/stock").get_json() == {"id": 8, "stock": 1}
    assert client.get("/api/products/9999").status_code == 404
    assert client.get("/readyz").get_json()["redis"] == "unavailable"
    server.start()
    # the write made during the outage was replayed into the restarted Redis before its use
    assert wait_for_cache(client, "/api/products/8") == "HIT"
    assert client.get("/api/products/8/stock").get_json() == {"id": 8, "stock": 1}
    assert client.get("/api/products/9").headers["X-Cache"] == "MISS"
    assert client.get("/api/products/9").headers["X-Cache"] == "HIT"


def test_hung_redis_costs_at_most_its_timeout(outage_client):
    client, server = outage_client
    client.get("/api/products/8")
    server.pause()
    try:
        started = time.monotonic()
        response = client.get("/api/products/8")
        elapsed = time.monotonic() - started
        assert response.status_code == 200
        assert response.headers["X-Cache"] == "BYPASS"
        assert elapsed < 1.0
        assert client.post("/api/products/8/update-stock", json={"stock": 2}).status_code == 200
    finally:
        server.resume()


def test_redis_client_does_not_retry(config):
    cache = Cache(Config(**{**config.__dict__, "redis_url": "redis://127.0.0.1:1/0"}))
    assert cache.pool.connection_kwargs["retry"]._retries == 0
    assert cache.get_product(1) == ("BYPASS", None)


def test_keeper_holds_no_outbox_lock_while_redis_is_called(app, fresh, sql):
    """A keeper blocked in a Redis call (hung Redis) must not stall writers of its products."""
    from faststock import outbox, queries

    keeper = outbox.get_keeper(app)
    sql("INSERT INTO cache_outbox (product_id, version) VALUES (7, 1)")
    in_redis, release = threading.Event(), threading.Event()
    real_store = keeper.cache.store

    def hung_store(*args, **kwargs):
        in_redis.set()
        assert release.wait(20)  # test-only delay standing in for a Redis timeout
        return real_store(*args, **kwargs)

    keeper.cache.store = hung_store
    try:
        with ThreadPoolExecutor(1) as pool:
            replayed = pool.submit(keeper.replay)
            assert in_redis.wait(20)
            with psycopg2.connect(fresh.database_url) as conn, conn.cursor() as cur:
                cur.execute("SET lock_timeout = '500ms'")
                assert queries.add_stock(cur, 7, 1) is not None  # not blocked by the keeper
            release.set()
            assert replayed.result(20) is True
    finally:
        release.set()
        keeper.cache.store = real_store
    # the writer's newer record is kept: Redis has not seen that version yet
    assert sql("SELECT count(*) FROM cache_outbox WHERE product_id = 7") == [(1,)]


def test_keeper_does_not_close_a_breaker_that_opened_during_its_pass(app, monkeypatch):
    from faststock import outbox

    keeper = outbox.get_keeper(app)
    breaker = keeper.cache.breaker

    def replay_while_redis_fails():
        for _ in range(breaker.threshold):
            breaker.failure()
        return True

    monkeypatch.setattr(keeper, "replay", replay_while_redis_fails)
    assert keeper._pass() is False
    assert breaker.is_open  # the next pass pings Redis before closing it
    monkeypatch.undo()
    assert keeper._pass() is True  # Redis does answer: replayed, then closed
    assert not breaker.is_open
