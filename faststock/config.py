"""Settings, read once from the environment and checked before anything starts.

Every knob the service has lives here, so that a typo in a deployment fails at start-up with one
readable line instead of surfacing later as a confusing runtime error.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from urllib.parse import urlsplit

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable and what it expects."""


@dataclass(frozen=True)
class Config:
    """The service's settings; field names are the environment variables, lower-cased."""

    database_url: str = "postgresql://faststock@127.0.0.1:5432/faststock"
    redis_url: str = "redis://127.0.0.1:6379/0"
    cache_ttl_seconds: int = 60
    db_pool_size: int = 10
    db_pool_timeout: float = 5.0
    db_statement_timeout_ms: int = 5000
    redis_timeout_ms: int = 250
    # Loopback unless told otherwise: the API has no authentication. The image sets 0.0.0.0.
    host: str = "127.0.0.1"
    port: int = 8000
    web_concurrency: int = os.cpu_count() or 1
    log_level: str = "INFO"
    # Per-worker cache in front of Redis (nearcache.py): entries (0 turns it off), and seconds
    # (never more than CACHE_TTL_SECONDS: the shorter of the two applies).
    near_cache_size: int = 100_000
    near_cache_ttl_seconds: int = 60
    # Answer near-cache hits before Flask (fastlane.py); 0 for debugging and A/B benchmarks.
    fast_lane: bool = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Build a validated Config from `environ` (default: os.environ); unset means default."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for field in fields(cls):
            name = field.name.upper()
            raw = environ.get(name)
            if raw is None or raw.strip() == "":
                continue
            values[field.name] = _parse(name, raw.strip(), field.type)
        config = cls(**values)
        config.validate()
        return config

    @property
    def env_names(self) -> tuple[str, ...]:
        """The environment variables this object is read from (docs and compose checks use it)."""
        return tuple(f.name.upper() for f in fields(self))

    @property
    def bind(self) -> str:
        """HOST:PORT as gunicorn's `bind` takes it (an IPv6 address in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def validate(self) -> None:
        """Reject values that parse but cannot work, naming the variable at fault."""
        _require_url("DATABASE_URL", self.database_url, ("postgres", "postgresql"))
        _require_url("REDIS_URL", self.redis_url, ("redis", "rediss", "unix"))
        _require_range("CACHE_TTL_SECONDS", self.cache_ttl_seconds, 1, 86_400)
        _require_range("DB_POOL_SIZE", self.db_pool_size, 1, 1000)
        _require_range("DB_POOL_TIMEOUT", self.db_pool_timeout, 0.001, 300)
        _require_range("DB_STATEMENT_TIMEOUT_MS", self.db_statement_timeout_ms, 1, 3_600_000)
        _require_range("REDIS_TIMEOUT_MS", self.redis_timeout_ms, 1, 60_000)
        _require_host("HOST", self.host)
        _require_range("PORT", self.port, 1, 65_535)
        _require_range("WEB_CONCURRENCY", self.web_concurrency, 1, 256)
        _require_range("NEAR_CACHE_SIZE", self.near_cache_size, 0, 10_000_000)
        _require_range("NEAR_CACHE_TTL_SECONDS", self.near_cache_ttl_seconds, 1, 86_400)
        if self.log_level not in LOG_LEVELS:
            choices = ", ".join(LOG_LEVELS)
            raise ConfigError(f"LOG_LEVEL must be one of {choices}, got {self.log_level!r}")


def from_env_or_exit() -> Config:
    """`Config.from_env()` for the commands that start things (gunicorn, `flask`, scripts/up).

    A bad setting ends the process with status 1 and this one line naming the variable, before
    anything starts, instead of a traceback from wherever the value is first used.
    """
    try:
        return Config.from_env()
    except ConfigError as exc:
        raise SystemExit(f"faststock: configuration error: {exc}") from None


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _parse(name: str, raw: str, kind: object) -> object:
    if kind in ("bool", bool):
        if raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
        raise ConfigError(f"{name} must be 1 or 0 (true/false, yes/no, on/off), got {raw!r}")
    if kind in ("int", int):
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if kind in ("float", float):
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{name} must be a finite number, got {raw!r}")
        return value
    if name == "LOG_LEVEL":
        return raw.upper()
    return raw


def _require_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low:g} and {high:g}, got {value:g}")


def _require_url(name: str, value: str, schemes: tuple[str, ...]) -> None:
    scheme = urlsplit(value).scheme
    if scheme not in schemes:
        starts = " or ".join(s + "://" for s in schemes)
        raise ConfigError(f"{name} must be a URL starting with {starts}")


def _require_host(name: str, value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if len(value) > 253 or not _HOST_NAME.fullmatch(value):
            raise ConfigError(
                f"{name} must be an IP address (127.0.0.1, 0.0.0.0, ::1) or a host name, "
                f"got {value!r}"
            ) from None
