"""API keys: writes need one, every way of not having one is a 401, no key is ever written out,
idempotency keys belong to the key that used them, and `flask api-key create` makes them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import secrets
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
import requests

from faststock import create_app
from faststock.auth import Keys, Unauthorized
from faststock.config import Config, ConfigError
from faststock.db import init_db
from faststock.seed import product_row, seed
from faststock.stock import fingerprint
from faststock.validation import Change
from tests.servers import BIN, ROOT, poll, run_gunicorn

STOCK5 = product_row(5)[3]


def make_key(name: str) -> tuple[str, str]:
    """(key, API_KEYS entry), as `flask api-key create` makes them."""
    key = secrets.token_urlsafe(32)
    return key, f"{name}:{hashlib.sha256(key.encode()).hexdigest()}"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def post(server, product_id: int, body: dict, **headers: str) -> requests.Response:
    return requests.post(
        server.url(f"/api/products/{product_id}/update-stock"),
        json=body,
        headers={"Connection": "close", **headers},
        timeout=30,
    )


def read(server, path: str, **headers: str) -> requests.Response:
    return requests.get(server.url(path), headers={"Connection": "close", **headers}, timeout=10)


def log_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


# --- the 401s -------------------------------------------------------------------------------

KEY_A, ENTRY_A = make_key("shop-a")
KEY_B, ENTRY_B = make_key("shop-b")
UNKNOWN = secrets.token_urlsafe(32)
NEAR_MISS = KEY_A[:-1] + ("A" if KEY_A[-1] != "A" else "B")

# (what the client sends as Authorization, None: no header) -> the challenge's error.
REFUSED = {
    "missing": (None, None),
    "empty": ("", "invalid_token"),
    "scheme alone": ("Bearer", "invalid_token"),
    "scheme and a space": ("Bearer ", "invalid_token"),
    "two tokens": (f"Bearer {KEY_A} {KEY_A}", "invalid_token"),
    "characters outside b64token": (f"Bearer {KEY_A[:10]}!{KEY_A[11:]}", "invalid_token"),
    "too long": ("Bearer " + "a" * 513, "invalid_token"),
    "unknown key": (f"Bearer {UNKNOWN}", "invalid_token"),
    "one character off": (f"Bearer {NEAR_MISS}", "invalid_token"),
    "Basic scheme": ("Basic " + KEY_A, "invalid_token"),
    "Token scheme": ("Token " + KEY_A, "invalid_token"),
    "the key without a scheme": (KEY_A, "invalid_token"),
}


def test_every_way_of_not_having_a_key_is_a_401_and_changes_nothing(live_server, changes):
    server = live_server(API_KEYS=f"{ENTRY_A},{ENTRY_B}", ALLOW_ANONYMOUS_WRITES="0")
    for case, (header, error) in REFUSED.items():
        headers = {} if header is None else {"Authorization": header}
        response = post(server, 5, {"delta": -1}, **headers)
        assert response.status_code == 401, (case, response.text)
        body = response.json()
        assert body["error"] == "unauthorized" and body["message"], (case, body)
        assert set(body) == {"error", "message"}
        challenge = response.headers["WWW-Authenticate"]
        assert challenge.startswith('Bearer realm="faststock"'), (case, challenge)
        assert ('error="invalid_token"' in challenge) == (error is not None), (case, challenge)
        assert response.headers["X-Content-Type-Options"] == "nosniff", case
        assert response.headers["Cache-Control"] == "no-store", case
        assert response.headers["X-Request-ID"], case
        for secret in (KEY_A, KEY_B, UNKNOWN, NEAR_MISS):
            assert secret not in response.text, case
    assert changes(5) == (STOCK5, 0)
    # Each key works, the scheme in any case; reads stay public.
    assert post(server, 5, {"delta": -1}, **bearer(KEY_A)).json() == {"id": 5, "stock": STOCK5 - 1}
    response = post(server, 5, {"delta": -1}, Authorization=f"bearer  {KEY_B}")
    assert response.json() == {"id": 5, "stock": STOCK5 - 2}
    assert response.headers["Cache-Control"] == "no-store"
    assert "WWW-Authenticate" not in response.headers
    assert read(server, "/api/products/5/stock").json() == {"id": 5, "stock": STOCK5 - 2}
    assert changes(5) == (STOCK5 - 2, 2)


def test_secure_by_default_writes_need_a_key_unless_anonymous_writes_are_allowed(make_app):
    """No key configured: 401 unless ALLOW_ANONYMOUS_WRITES=1, and then there is no
    authentication at all. Keys configured and anonymous writes allowed: no header is anonymous,
    a bad one is still refused."""

    def status(app, **headers: str) -> int:
        client = app.test_client()
        return client.post(
            "/api/products/5/update-stock", json={"delta": 1}, headers=headers
        ).status_code

    assert Config().allow_anonymous_writes is False
    locked = make_app(allow_anonymous_writes=False)
    assert status(locked) == 401
    assert status(locked, **bearer(KEY_A)) == 401  # no key is valid where none is configured
    assert locked.test_client().get("/api/products/5").status_code == 200
    open_ = make_app(allow_anonymous_writes=True)
    assert status(open_) == 200
    assert status(open_, Authorization="whatever") == 200  # authentication is off
    mixed = make_app(allow_anonymous_writes=True, api_keys=ENTRY_A)
    assert status(mixed) == 200
    assert status(mixed, **bearer(KEY_A)) == 200
    assert status(mixed, **bearer(UNKNOWN)) == 401
    assert status(mixed, Authorization="Basic x") == 401


def test_keys_are_compared_by_digest_against_every_entry():
    keys = Keys(Config(api_keys=f"{ENTRY_A},{ENTRY_B}").read_api_keys())
    assert keys.identify(f"Bearer {KEY_A}") == "shop-a"
    assert keys.identify(f"Bearer {KEY_B}") == "shop-b"
    assert keys.name_of(f"Bearer {KEY_B}") == "shop-b"
    for header, _ in REFUSED.values():
        assert keys.name_of(header) is None
        with pytest.raises(Unauthorized):
            keys.identify(header)
    assert all(len(digest) == 32 for _, digest in keys.entries)


# --- nothing writes a key out ---------------------------------------------------------------


def test_no_log_line_metric_or_body_holds_a_key(live_server, fresh):
    """With every log on (ACCESS_LOG=1, LOG_LEVEL=DEBUG) and every path taken: reads and writes
    with good keys, every refused header, idempotent replays, 429s, the fast lane."""
    server = live_server(
        API_KEYS=f"{ENTRY_A},{ENTRY_B}",
        ALLOW_ANONYMOUS_WRITES="0",
        READS_REQUIRE_KEY="1",
        WRITE_RATE_LIMIT="4/hour",
        ACCESS_LOG="1",
        LOG_LEVEL="DEBUG",
    )
    bodies = []
    for key in (KEY_A, KEY_B):
        for _ in range(6):  # 4 allowed, then 429s
            response = post(server, 5, {"delta": 1}, **bearer(key), **{"Idempotency-Key": "k"})
            assert response.status_code in (200, 429), response.text
            bodies.append(response.text)
        for _ in range(3):  # reads until the fast lane has them
            bodies.append(read(server, "/api/products/5", **bearer(key)).text)
    for header, _ in REFUSED.values():
        headers = {} if header is None else {"Authorization": header}
        bodies.append(post(server, 6, {"delta": 1}, **headers).text)
        bodies.append(read(server, "/api/products/6", **headers).text)
    bodies.append(read(server, "/api/products/7", Authorization=f"Bearer {NEAR_MISS}").text)
    # Each worker's counts reach the shared files within a quarter second, or when it is scraped:
    # the scrape may land on the worker that did not count the 429s.
    scraped: list[str] = []

    def counted() -> bool:
        scraped[:] = [read(server, "/metrics").text]
        return 'status="429"' in scraped[0] and 'status="401"' in scraped[0]

    assert poll(counted, within=5), scraped
    metrics = scraped[0]
    server.stop()
    log = server.log()
    lines = log_lines(log)
    assert any(line["level"] == "DEBUG" for line in lines), "LOG_LEVEL=DEBUG logged nothing"
    access = [line for line in lines if line["logger"] == "faststock.access"]
    assert {line["status"] for line in access} >= {200, 401, 429}
    assert any(line["fast_lane"] and line["status"] == 200 for line in access)
    for secret in (KEY_A, KEY_B, UNKNOWN, NEAR_MISS, KEY_A[:20], KEY_B[-20:]):
        assert secret not in log
        assert secret not in metrics
        assert not [body for body in bodies if secret in body]
    # Names may appear (they are what the limiter counts by); digests may not leak either.
    for entry in (ENTRY_A, ENTRY_B):
        assert entry.split(":")[1] not in log


# --- reads behind a key, the fast lane too --------------------------------------------------


def test_reads_require_key_in_flask_and_in_the_fast_lane(live_server):
    server = live_server(API_KEYS=ENTRY_A, READS_REQUIRE_KEY="1", ACCESS_LOG="1")
    session = requests.Session()  # one connection: one worker, whose near cache fills
    session.headers.update(bearer(KEY_A))

    def lane_answered() -> bool:
        rid = uuid.uuid4().hex
        response = session.get(server.url("/api/products/9"), headers={"X-Request-ID": rid})
        assert response.status_code == 200
        return any(
            line.get("request_id") == rid and line.get("fast_lane")
            for line in log_lines(server.log())
        )

    assert poll(lane_answered, within=20), "a keyed read was never answered by the fast lane"
    # The same worker holds product 9 now, but without a valid key the lane must not answer it.
    for headers in ({"Authorization": ""}, {"Authorization": f"Bearer {UNKNOWN}"}):
        response = session.get(server.url("/api/products/9"), headers=headers)
        assert response.status_code == 401, response.text
        assert response.json()["error"] == "unauthorized"
    session.headers.pop("Authorization")
    for path in ("/api/products/9", "/api/products/9/stock", "/api/products?page=1&limit=2"):
        assert session.get(server.url(path)).status_code == 401, path
    for path in ("/healthz", "/readyz", "/openapi.json", "/metrics"):  # not API reads
        assert session.get(server.url(path)).status_code == 200, path
    session.close()


# --- idempotency keys per API key -----------------------------------------------------------


def test_idempotency_keys_are_scoped_per_api_key(live_server, sql, changes):
    """Stripe's rule: two clients sending the same Idempotency-Key are two requests, and each
    one's retries replay its own answer, never the other's."""
    server = live_server(API_KEYS=f"{ENTRY_A},{ENTRY_B}")  # anonymous writes allowed too
    same = {"Idempotency-Key": "order-1"}
    first_a = post(server, 5, {"delta": -2}, **bearer(KEY_A), **same)
    first_b = post(server, 5, {"delta": -3}, **bearer(KEY_B), **same)
    anonymous = post(server, 5, {"delta": -4}, **same)
    assert first_a.json() == {"id": 5, "stock": STOCK5 - 2}
    assert first_b.json() == {"id": 5, "stock": STOCK5 - 5}
    assert anonymous.json() == {"id": 5, "stock": STOCK5 - 9}
    for response in (first_a, first_b, anonymous):
        assert "Idempotent-Replayed" not in response.headers
    for key, body, answer in ((KEY_A, -2, first_a), (KEY_B, -3, first_b), (None, -4, anonymous)):
        headers = bearer(key) if key else {}
        retry = post(server, 5, {"delta": body}, **headers, **same)
        assert retry.headers["Idempotent-Replayed"] == "true"
        assert retry.json() == answer.json()
    # Another client's body under the same key is that client's business, not a reuse.
    reused = post(server, 5, {"delta": -3}, **bearer(KEY_A), **same)
    assert reused.status_code == 422 and reused.json()["error"] == "idempotency_key_reused"
    assert changes(5) == (STOCK5 - 9, 3)
    rows = sql("SELECT client, key FROM idempotency_keys ORDER BY client")
    assert rows == [("", "order-1"), ("shop-a", "order-1"), ("shop-b", "order-1")]


OLD_ANSWER = b'{"id":5,"stock":41}'
OLD_SHAPE = """
CREATE TABLE idempotency_keys (
    key         text        PRIMARY KEY,
    fingerprint bytea       NOT NULL,
    status      smallint    NOT NULL,
    body        bytea       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idempotency_keys_created_at_idx ON idempotency_keys (created_at);
"""


@pytest.fixture
def old_database(pg_admin_url: str, redis_url: str) -> Iterator[Config]:
    """A database whose idempotency_keys table has the shape it had before keys were scoped,
    holding one answered request (a delta of -1 on product 5, key "before-upgrade")."""
    name = f"faststock_old_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(pg_admin_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    url = pg_admin_url.rsplit("/", 1)[0] + "/" + name
    try:
        with contextlib.closing(psycopg2.connect(url)) as conn, conn.cursor() as cur:
            cur.execute(OLD_SHAPE)
            cur.execute(
                "INSERT INTO idempotency_keys (key, fingerprint, status, body) "
                "VALUES (%s, %s, %s, %s)",
                ("before-upgrade", fingerprint(5, Change(-1, delta=True)), 200, OLD_ANSWER),
            )
            conn.commit()
        config = Config(database_url=url, redis_url=redis_url, allow_anonymous_writes=True)
        yield config
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def test_init_db_migrates_global_keys_to_anonymous_ones(old_database):
    url = old_database.database_url
    init_db(old_database)  # the migration (and the other tables)
    init_db(old_database)  # and again: init-db runs on every start
    seed(old_database, 10)

    with contextlib.closing(psycopg2.connect(url)) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT a.attname FROM pg_constraint c JOIN pg_attribute a "
            "ON a.attrelid = c.conrelid AND a.attnum = ANY(c.conkey) "
            "WHERE c.conrelid = 'idempotency_keys'::regclass AND c.contype = 'p' "
            "ORDER BY array_position(c.conkey, a.attnum)"
        )
        assert [row[0] for row in cur.fetchall()] == ["client", "key"]
        cur.execute("SELECT client, key, status FROM idempotency_keys")
        assert cur.fetchall() == [("", "before-upgrade", 200)]

    app = create_app(Config(**{**old_database.__dict__, "api_keys": ENTRY_A}))
    client = app.test_client()
    same = {"Idempotency-Key": "before-upgrade"}
    replay = client.post("/api/products/5/update-stock", json={"delta": -1}, headers=same)
    assert replay.headers["Idempotent-Replayed"] == "true"  # an anonymous writer's old record
    assert replay.data == OLD_ANSWER
    keyed = client.post(
        "/api/products/5/update-stock", json={"delta": -1}, headers={**same, **bearer(KEY_A)}
    )
    assert "Idempotent-Replayed" not in keyed.headers  # not shop-a's record
    assert keyed.get_json()["stock"] == product_row(5)[3] - 1


# --- making keys, reading them --------------------------------------------------------------


def flask_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "flask"), "--app", "faststock", *args],
        cwd=ROOT,
        env={"PATH": str(BIN), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_api_key_create_prints_a_new_key_once_with_its_entry(tmp_path: Path):
    made = []
    for _ in range(2):
        result = flask_cli("api-key", "create", "shop-1")
        assert result.returncode == 0, result.stderr
        found = re.fullmatch(r"key: (\S+)\nAPI_KEYS entry: (shop-1:[0-9a-f]{64})\n", result.stdout)
        assert found, result.stdout
        key, entry = found.groups()
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", key)  # 32 random bytes, URL-safe
        assert entry == f"shop-1:{hashlib.sha256(key.encode()).hexdigest()}"
        assert key not in result.stderr and "shown only now" in result.stderr
        made.append(key)
    assert made[0] != made[1]
    assert Keys(Config(api_keys=entry).read_api_keys()).identify(f"Bearer {key}") == "shop-1"

    keys_file = tmp_path / "api_keys"
    for name in ("a", "b", "a"):  # a second key for a: a rotation
        assert flask_cli("api-key", "create", name, "--add-to", str(keys_file)).returncode == 0
    entries = Config(api_keys_file=str(keys_file)).read_api_keys()
    assert [name for name, _ in entries] == ["a", "b", "a"]
    keys_file.write_text(keys_file.read_text() + "not an entry\n")
    broken = flask_cli("api-key", "create", "c", "--add-to", str(keys_file))
    assert broken.returncode != 0 and "API_KEYS_FILE line 4 must be" in broken.stderr
    assert len(keys_file.read_text().splitlines()) == 4
    bad = flask_cli("api-key", "create", "no spaces")
    assert bad.returncode != 0 and "NAME" in bad.stderr and "key:" not in bad.stdout


def test_key_settings_are_checked_without_echoing_them(tmp_path: Path):
    raw_key = secrets.token_urlsafe(32)
    for value in (f"shop:{raw_key}", raw_key, "shop:" + "0" * 63, "sh op:" + "0" * 64):
        with pytest.raises(ConfigError, match="API_KEYS entry 1 must be NAME:SHA256HEX") as info:
            Config.from_env({"API_KEYS": value})
        assert raw_key not in str(info.value)
    with pytest.raises(ConfigError, match="READS_REQUIRE_KEY=1 needs at least one key"):
        Config.from_env({"READS_REQUIRE_KEY": "1"})
    twice = f"{ENTRY_A},{ENTRY_A.replace('shop-a', 'other')}"
    with pytest.raises(ConfigError, match="same digest"):
        Config.from_env({"API_KEYS": twice}).read_api_keys()

    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# made with flask api-key create\n\n{ENTRY_B}\n")
    config = Config.from_env({"API_KEYS": ENTRY_A, "API_KEYS_FILE": str(keys_file)})
    assert [name for name, _ in config.read_api_keys()] == ["shop-a", "shop-b"]
    keys_file.write_text(f"{ENTRY_B}\n{raw_key}\n")
    with pytest.raises(ConfigError, match="API_KEYS_FILE line 2 must be") as info:
        config.read_api_keys()
    assert raw_key not in str(info.value)
    keys_file.write_text(f"{ENTRY_A}\n")
    with pytest.raises(ConfigError, match="same digest"):
        config.read_api_keys()
    second_key, second_entry = make_key("shop-a")  # a name with two keys: a rotation
    keys_file.write_text(f"{second_entry}\n")
    keys = Keys(config.read_api_keys())
    assert keys.identify(f"Bearer {KEY_A}") == keys.identify(f"Bearer {second_key}") == "shop-a"
    missing = Config.from_env({"API_KEYS_FILE": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="cannot be read"):
        missing.read_api_keys()
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(ConfigError, match="READS_REQUIRE_KEY=1 needs at least one key"):
        Config.from_env({"API_KEYS_FILE": str(empty), "READS_REQUIRE_KEY": "1"}).read_api_keys()


def test_a_bad_key_file_stops_gunicorn_with_one_line(tmp_path: Path, fresh):
    raw_key = secrets.token_urlsafe(32)
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"shop:{raw_key}\n")
    env = {"PATH": str(BIN), "DATABASE_URL": fresh.database_url, "API_KEYS_FILE": str(keys_file)}
    result = run_gunicorn(env, timeout=30)
    assert result.returncode != 0
    assert "API_KEYS_FILE line 1 must be NAME:SHA256HEX" in result.stderr
    assert raw_key not in result.stderr and "Traceback" not in result.stderr
