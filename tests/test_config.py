"""Configuration is read once, with defaults, and a bad value stops start-up with one line."""

from __future__ import annotations

import subprocess

import pytest

from faststock.config import Config, ConfigError
from tests.servers import BIN, ROOT


def test_defaults():
    config = Config.from_env({})
    assert config.cache_ttl_seconds == 60
    assert config.port == 8000
    assert config.web_concurrency >= 1
    assert config.log_level == "INFO"
    assert (config.database_pooler, config.behind_pooler) == ("none", False)


def test_reads_every_variable():
    env = {
        "DATABASE_URL": "postgresql://u@db:5432/x",
        "DATABASE_POOLER": "PgBouncer",
        "DATABASE_REPLICA_URLS": " postgresql://u@r1:5432/x , postgres://u@r2/x ,",
        "REDIS_URL": "redis://cache:6379/1",
        "CACHE_TTL_SECONDS": "30",
        "DB_POOL_SIZE": "4",
        "DB_POOL_TIMEOUT": "2.5",
        "DB_STATEMENT_TIMEOUT_MS": "800",
        "REDIS_TIMEOUT_MS": "50",
        "REDIS_SENTINELS": "s1:26379,s2:26379",
        "REDIS_SENTINEL_MASTER": "cache",
        "HOST": "0.0.0.0",
        "PORT": "9000",
        "WEB_CONCURRENCY": "3",
        "LOG_LEVEL": "debug",
        "NEAR_CACHE_SIZE": "500",
        "NEAR_CACHE_TTL_SECONDS": "5",
        "FAST_LANE": "off",
        "ACCESS_LOG": "yes",
        "METRICS": "0",
        "API_KEYS": "shop:abababababababababababababababababababababababababababababababab",
        "API_KEYS_FILE": "/run/secrets/api_keys",
        "ALLOW_ANONYMOUS_WRITES": "1",
        "READS_REQUIRE_KEY": "true",
        "WRITE_RATE_LIMIT": "100/second",
        "READ_RATE_LIMIT": "1000 per minute",
        "TRUSTED_PROXIES": "10.0.0.0/8",
        "METRICS_ALLOW": "127.0.0.1",
    }
    config = Config.from_env(env)
    assert config == Config(
        database_url="postgresql://u@db:5432/x",
        database_pooler="pgbouncer",
        database_replica_urls="postgresql://u@r1:5432/x , postgres://u@r2/x ,",
        redis_url="redis://cache:6379/1",
        cache_ttl_seconds=30,
        db_pool_size=4,
        db_pool_timeout=2.5,
        db_statement_timeout_ms=800,
        redis_timeout_ms=50,
        redis_sentinels="s1:26379,s2:26379",
        redis_sentinel_master="cache",
        host="0.0.0.0",
        port=9000,
        web_concurrency=3,
        log_level="DEBUG",
        near_cache_size=500,
        near_cache_ttl_seconds=5,
        fast_lane=False,
        access_log=True,
        metrics=False,
        api_keys="shop:abababababababababababababababababababababababababababababababab",
        api_keys_file="/run/secrets/api_keys",
        allow_anonymous_writes=True,
        reads_require_key=True,
        write_rate_limit="100/second",
        read_rate_limit="1000 per minute",
        trusted_proxies="10.0.0.0/8",
        metrics_allow="127.0.0.1",
    )
    assert set(config.env_names) == set(env)
    assert config.replica_urls == ("postgresql://u@r1:5432/x", "postgres://u@r2/x")
    assert Config().replica_urls == ()


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("PORT", "http", "PORT must be a whole number"),
        ("FAST_LANE", "maybe", "FAST_LANE must be 1 or 0"),
        ("METRICS", "2", "METRICS must be 1 or 0"),
        ("ACCESS_LOG", "verbose", "ACCESS_LOG must be 1 or 0"),
        ("NEAR_CACHE_SIZE", "-1", "NEAR_CACHE_SIZE must be between 0"),
        ("PORT", "70000", "PORT must be between 1 and 65535"),
        ("DB_POOL_SIZE", "0", "DB_POOL_SIZE must be between"),
        ("DB_POOL_TIMEOUT", "nan", "DB_POOL_TIMEOUT must be a finite number"),
        ("DB_POOL_TIMEOUT", "soon", "DB_POOL_TIMEOUT must be a number"),
        ("REDIS_URL", "localhost:6379", "REDIS_URL must be a URL starting with"),
        (
            "DATABASE_REPLICA_URLS",
            "postgresql://u@r1/x,mysql://u:secret@r2/x",
            r"DATABASE_REPLICA_URLS must be comma-separated URLs starting with postgres:// or "
            r"postgresql:// \(item 2 is not\)",
        ),
        ("LOG_LEVEL", "loud", "LOG_LEVEL must be one of"),
        ("DATABASE_POOLER", "pgpool", "DATABASE_POOLER must be one of none, pgbouncer"),
        ("HOST", "0.0.0.0:80", "HOST must be an IP address"),
        ("HOST", "my host", "HOST must be an IP address"),
    ],
)
def test_bad_values_name_the_variable(name, value, message):
    with pytest.raises(ConfigError, match=message) as info:
        Config.from_env({name: value})
    assert "\n" not in str(info.value)


def test_empty_value_means_default():
    assert Config.from_env({"PORT": ""}).port == 8000


def test_bind_is_host_and_port():
    assert Config().bind == "127.0.0.1:8000"  # loopback unless HOST says otherwise
    assert Config(host="0.0.0.0", port=80).bind == "0.0.0.0:80"
    assert Config(host="::1").bind == "[::1]:8000"


BAD_POOL_SIZE = "faststock: configuration error: DB_POOL_SIZE must be a whole number, got 'many'"


@pytest.mark.parametrize(
    "argv",
    [
        ["flask", "--app", "faststock", "init-db"],
        ["flask", "--app", "faststock", "seed", "--products", "5", "--reset"],
        ["gunicorn", "-c", "gunicorn.conf.py", "faststock.wsgi:app"],
    ],
    ids=["init-db", "seed", "gunicorn"],
)
def test_entry_points_report_bad_config_in_one_line(argv):
    result = subprocess.run(
        [str(BIN / argv[0]), *argv[1:]],
        cwd=ROOT,
        env={"PATH": str(BIN), "DB_POOL_SIZE": "many"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [BAD_POOL_SIZE]
