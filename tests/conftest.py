"""Fixtures: real PostgreSQL and Redis for the whole session, a fresh database state per test.

Set TEST_DATABASE_URL / TEST_REDIS_URL to use servers of your own (the suite creates and drops a
database of its own on that PostgreSQL, and flushes that Redis database); otherwise the suite
starts throwaway servers through scripts/servers and stops them at the end.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest
import redis as redis_lib
from flask import Flask
from flask.testing import FlaskClient

from faststock import create_app
from faststock.config import Config
from faststock.db import init_db
from faststock.seed import seed
from tests.servers import LiveServer, PgServer, RedisServer

SEEDED = 100
# Tests that use any of these run real processes: they get the `live` marker without saying so.
LIVE_FIXTURES = {"live_server", "private_pg", "private_redis"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if LIVE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.live)


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
def servers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


def _given_or_started(variable: str, server: PgServer | RedisServer) -> Iterator[str]:
    """The URL in `variable` if set, else `server`'s, started now and destroyed afterwards."""
    given = os.environ.get(variable)
    if given:
        yield given
        return
    server.start()
    try:
        yield server.url
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def pg_admin_url(servers_dir: Path) -> Iterator[str]:
    yield from _given_or_started("TEST_DATABASE_URL", PgServer(servers_dir / "pg"))


@pytest.fixture(scope="session")
def database_url(pg_admin_url: str) -> Iterator[str]:
    name = f"faststock_test_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(pg_admin_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    url = _with_database(pg_admin_url, name)
    init_db(Config(database_url=url))
    with contextlib.closing(psycopg2.connect(url)) as conn, conn.cursor() as cur:
        try:
            cur.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            conn.commit()
        except psycopg2.Error:
            conn.rollback()  # tests that count queries skip without it
    try:
        yield url
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session")
def redis_url(servers_dir: Path) -> Iterator[str]:
    yield from _given_or_started("TEST_REDIS_URL", RedisServer(servers_dir / "redis"))


@pytest.fixture
def config(database_url: str, redis_url: str) -> Config:
    """The suite's app settings. Anonymous writes are allowed here, as scripts/up allows them:
    the tests of API keys (test_auth.py) turn them off where they need to."""
    return Config(
        database_url=database_url,
        redis_url=redis_url,
        web_concurrency=2,
        allow_anonymous_writes=True,
    )


@pytest.fixture
def fresh(config: Config) -> Config:
    """Products 1..100 exactly as seeded, and an empty cache."""
    seed(config, SEEDED, reset=True)
    redis_lib.Redis.from_url(config.redis_url).flushdb()
    return config


@pytest.fixture
def make_app(fresh: Config) -> Callable[..., Flask]:
    def make(**overrides: object) -> Flask:
        app = create_app(Config(**{**fresh.__dict__, **overrides}))
        app.testing = True
        return app

    return make


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def sql(database_url: str) -> Iterator[Callable[..., list[tuple]]]:
    """Run SQL directly against the test database (autocommit), to check or arrange state."""
    conn = psycopg2.connect(database_url)
    conn.autocommit = True

    def run(query: str, *params: object) -> list[tuple]:
        with conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description else []

    yield run
    conn.close()


@pytest.fixture
def changes(sql: Callable[..., list[tuple]]) -> Callable[[int], tuple[int, int]]:
    """(stock, changes since the seed) of a product. Versions come from one shared sequence, so
    the count is the distance from the version of a product no test changes (the last one)."""

    def read(product_id: int) -> tuple[int, int]:
        query = (
            "SELECT stock, version - (SELECT version FROM products WHERE id = %s) "
            "FROM products WHERE id = %s"
        )
        return sql(query, SEEDED, product_id)[0]

    return read


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, which the test may stop, pause and restart."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        with contextlib.suppress(OSError, ValueError):
            server.resume()
        server.stop()


@pytest.fixture
def private_pg(tmp_path: Path) -> Iterator[PgServer]:
    """A seeded PostgreSQL of this test's own, which the test may stop, pause and restart."""
    server = PgServer(tmp_path / "pg").start()
    config = Config(database_url=server.url)
    init_db(config)
    seed(config, SEEDED)
    try:
        yield server
    finally:
        with contextlib.suppress(OSError, ValueError, subprocess.CalledProcessError):
            server.resume()
        server.destroy()


@pytest.fixture
def live_server(fresh: Config, tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    """Start real gunicorn (gevent workers, gunicorn.conf.py) with extra environment variables."""
    started: list[LiveServer] = []

    def start(**env: str) -> LiveServer:
        base = {"DATABASE_URL": fresh.database_url, "REDIS_URL": fresh.redis_url}
        server = LiveServer({**base, **env}, tmp_path / f"gunicorn-{len(started)}.log")
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
