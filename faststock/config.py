"""Settings, read once from the environment and checked before anything starts.

Every knob the service has lives here, so that a typo in a deployment fails at start-up with one
readable line instead of surfacing later as a confusing runtime error.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from urllib.parse import urlsplit

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DATABASE_POOLERS = ("none", "pgbouncer")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
# An API key's name: logged, labelled and used to scope idempotency keys, so short and plain.
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_DIGEST = re.compile(r"[0-9a-fA-F]{64}")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_READS_NEED_A_KEY = "READS_REQUIRE_KEY=1 needs at least one key in API_KEYS or API_KEYS_FILE"


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable and what it expects."""


@dataclass(frozen=True)
class Config:
    """The service's settings; field names are the environment variables, lower-cased."""

    database_url: str = "postgresql://faststock@127.0.0.1:5432/faststock"
    # What DATABASE_URL reaches: "none" (PostgreSQL itself) or "pgbouncer" (a pooler in
    # transaction mode, which refuses startup options and shares server connections between
    # clients): db.py then sends statement_timeout with each transaction (SET LOCAL).
    database_pooler: str = "none"
    # Streaming replicas of DATABASE_URL, comma-separated: cache-miss reads of products and list
    # pages go to one that has replayed every acknowledged write (replicas.py). Empty: none.
    database_replica_urls: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"
    cache_ttl_seconds: int = 60
    db_pool_size: int = 10
    db_pool_timeout: float = 5.0
    db_statement_timeout_ms: int = 5000
    redis_timeout_ms: int = 250
    # Redis Sentinel (cache.py): "host:port,host:port,..." and the name of the master they watch,
    # both or neither. Set, they replace REDIS_URL's host and port; its db number, user name and
    # password still apply to the master.
    redis_sentinels: str = ""
    redis_sentinel_master: str = ""
    # Loopback unless told otherwise (a developer's default); the image sets 0.0.0.0.
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
    # Prometheus metrics (metrics.py); 0 drops /metrics and every count, for A/B benchmarks.
    metrics: bool = True
    # One JSON access line per request on stderr (logs.py), the fast lane's hits included.
    access_log: bool = False
    # API keys (auth.py): comma-separated NAME:SHA256HEX entries, each the SHA-256 of a key in hex,
    # never the key itself; API_KEYS_FILE names a file of the same entries, one a line (a secret
    # mounted by Docker or Kubernetes). Read with `read_api_keys`.
    api_keys: str = ""
    api_keys_file: str = ""
    # With no key configured, writes answer 401 unless this is set (scripts/up sets it).
    allow_anonymous_writes: bool = False
    # Reads need a key too (the fast lane checks it as well).
    reads_require_key: bool = False
    # Rate limits (ratelimit.py) in the `limits` notation ("100/second", "10 per minute;1000 per
    # day"): writes per API key name (per client address when anonymous), reads per client
    # address. Empty: no limit.
    write_rate_limit: str = ""
    read_rate_limit: str = ""
    # Addresses or CIDRs of the proxies whose X-Forwarded-For names the client (hardening.py).
    trusted_proxies: str = ""
    # Addresses or CIDRs that may read /metrics (403 for others); empty: anyone.
    metrics_allow: str = ""

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

    @property
    def replica_urls(self) -> tuple[str, ...]:
        """DATABASE_REPLICA_URLS as a tuple; empty without replicas."""
        return tuple(u.strip() for u in self.database_replica_urls.split(",") if u.strip())

    @property
    def behind_pooler(self) -> bool:
        """DATABASE_URL reaches a transaction pooler: no session state, no startup options."""
        return self.database_pooler != "none"

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """REDIS_SENTINELS as (host, port) pairs; empty without Sentinel."""
        return [_sentinel_address(item) for item in self.redis_sentinels.split(",") if item.strip()]

    @property
    def trusted_networks(self) -> tuple[Network, ...]:
        """TRUSTED_PROXIES as networks; empty: X-Forwarded-For is never believed."""
        return _networks("TRUSTED_PROXIES", self.trusted_proxies)

    @property
    def metrics_networks(self) -> tuple[Network, ...]:
        """METRICS_ALLOW as networks; empty: /metrics answers anyone."""
        return _networks("METRICS_ALLOW", self.metrics_allow)

    def read_api_keys(self) -> tuple[tuple[str, bytes], ...]:
        """(name, SHA-256 digest) of every key: API_KEYS's, then API_KEYS_FILE's, read now.

        Not part of `validate`: the file belongs to the machine that runs the service, not to the
        settings (a compose file names a path that exists only in its container).
        `from_env_or_exit` reads it at start, so a bad file stops start-up like a bad setting.
        Messages name the entry by its position, never by its text: a key pasted where its
        digest belongs must not reach a log.
        """
        entries = _key_entries("API_KEYS entry", enumerate(self.api_keys.split(","), 1))
        if self.api_keys_file:
            try:
                with open(self.api_keys_file, encoding="utf-8") as file:
                    lines = list(enumerate(file.read().splitlines(), 1))
            except (OSError, UnicodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise ConfigError(
                    f"API_KEYS_FILE {self.api_keys_file!r} cannot be read ({reason})"
                ) from None
            lines = [(n, line) for n, line in lines if not line.lstrip().startswith("#")]
            entries += _key_entries("API_KEYS_FILE line", lines)
        # A name may have several keys (a new one handed out before the old one is withdrawn),
        # but a key only one name.
        if len({digest for _, digest in entries}) < len(entries):
            raise ConfigError("two API key entries have the same digest: one key, two names")
        if self.reads_require_key and not entries:
            raise ConfigError(_READS_NEED_A_KEY)
        return tuple(entries)

    def validate(self) -> None:
        """Reject values that parse but cannot work, naming the variable at fault."""
        _require_url("DATABASE_URL", self.database_url, ("postgres", "postgresql"))
        if self.database_pooler not in DATABASE_POOLERS:
            choices = ", ".join(DATABASE_POOLERS)
            raise ConfigError(
                f"DATABASE_POOLER must be one of {choices}, got {self.database_pooler!r}"
            )
        for number, url in enumerate(self.replica_urls, 1):
            if urlsplit(url).scheme not in ("postgres", "postgresql"):
                # The URL itself is not echoed: it may hold a password.
                raise ConfigError(
                    "DATABASE_REPLICA_URLS must be comma-separated URLs starting with "
                    f"postgres:// or postgresql:// (item {number} is not)"
                )
        _require_url("REDIS_URL", self.redis_url, ("redis", "rediss", "unix"))
        _require_range("CACHE_TTL_SECONDS", self.cache_ttl_seconds, 1, 86_400)
        _require_range("DB_POOL_SIZE", self.db_pool_size, 1, 1000)
        _require_range("DB_POOL_TIMEOUT", self.db_pool_timeout, 0.001, 300)
        _require_range("DB_STATEMENT_TIMEOUT_MS", self.db_statement_timeout_ms, 1, 3_600_000)
        _require_range("REDIS_TIMEOUT_MS", self.redis_timeout_ms, 1, 60_000)
        _require_sentinels(self)
        _require_host("HOST", self.host)
        _require_range("PORT", self.port, 1, 65_535)
        _require_range("WEB_CONCURRENCY", self.web_concurrency, 1, 256)
        _require_range("NEAR_CACHE_SIZE", self.near_cache_size, 0, 10_000_000)
        _require_range("NEAR_CACHE_TTL_SECONDS", self.near_cache_ttl_seconds, 1, 86_400)
        if self.log_level not in LOG_LEVELS:
            choices = ", ".join(LOG_LEVELS)
            raise ConfigError(f"LOG_LEVEL must be one of {choices}, got {self.log_level!r}")
        _key_entries("API_KEYS entry", enumerate(self.api_keys.split(","), 1))
        if self.reads_require_key and not (self.api_keys or self.api_keys_file):
            raise ConfigError(_READS_NEED_A_KEY)
        _require_rate("WRITE_RATE_LIMIT", self.write_rate_limit)
        _require_rate("READ_RATE_LIMIT", self.read_rate_limit)
        _networks("TRUSTED_PROXIES", self.trusted_proxies)
        _networks("METRICS_ALLOW", self.metrics_allow)


def from_env_or_exit() -> Config:
    """`Config.from_env()` for the commands that start things (gunicorn, `flask`, scripts/up).

    A bad setting ends the process with status 1 and this one line naming the variable, before
    anything starts, instead of a traceback from wherever the value is first used.
    """
    try:
        config = Config.from_env()
        config.read_api_keys()  # a missing or malformed key file stops start-up too
    except ConfigError as exc:
        raise SystemExit(f"faststock: configuration error: {exc}") from None
    return config


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
    if name == "DATABASE_POOLER":
        return raw.lower()
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


def _sentinel_address(item: str) -> tuple[str, int]:
    """One REDIS_SENTINELS entry: host:port, an IPv6 address in brackets ([::1]:26379)."""
    item = item.strip()
    host, _, port = item.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # an IPv6 address without brackets: its last group would pass for the port
    try:
        number = int(port)
        if not host or not 1 <= number <= 65_535:
            raise ValueError(item)
        _require_host("REDIS_SENTINELS", host)
    except (ValueError, ConfigError):
        raise ConfigError(
            "REDIS_SENTINELS must be a comma-separated list of host:port "
            f"(sentinel1:26379,[::1]:26379), got {item!r}"
        ) from None
    return host, number


def _require_sentinels(config: Config) -> None:
    """Sentinel needs both settings, and takes only the db number and credentials from
    REDIS_URL: the master's address is whatever the sentinels say it is."""
    if bool(config.redis_sentinels) != bool(config.redis_sentinel_master):
        raise ConfigError(
            "REDIS_SENTINELS and REDIS_SENTINEL_MASTER must be set together "
            "(the sentinels' host:port list and the name of the master they watch), or neither"
        )
    if not config.redis_sentinels:
        return
    if not config.sentinel_addresses:
        raise ConfigError("REDIS_SENTINELS must name at least one sentinel as host:port")
    if any(c.isspace() for c in config.redis_sentinel_master):
        raise ConfigError(
            f"REDIS_SENTINEL_MASTER must be a name without spaces, "
            f"got {config.redis_sentinel_master!r}"
        )
    if urlsplit(config.redis_url).scheme != "redis":
        raise ConfigError(
            "REDIS_URL must start with redis:// when REDIS_SENTINELS is set: only its db number, "
            "user name and password are used (TLS and unix sockets are not supported with "
            "Sentinel)"
        )


def _key_entries(source: str, items: Iterable[tuple[int, str]]) -> list[tuple[str, bytes]]:
    """NAME:SHA256HEX entries as (name, digest); blank items are skipped. The message names the
    entry by number only: what is there may be a key pasted by mistake."""
    entries = []
    for number, item in items:
        if not item.strip():
            continue
        name, sep, digest = item.strip().partition(":")
        if not (sep and KEY_NAME.fullmatch(name) and _DIGEST.fullmatch(digest)):
            raise ConfigError(
                f"{source} {number} must be NAME:SHA256HEX: a name of up to 64 letters, digits, "
                "'_', '.' or '-', then the key's SHA-256 in 64 hex digits, never the key itself "
                "(`flask --app faststock api-key create NAME` makes both)"
            )
        entries.append((name, bytes.fromhex(digest)))
    return entries


def _require_rate(name: str, value: str) -> None:
    """A rate limit in the notation of the `limits` library (imported only when one is set)."""
    if not value:
        return
    from limits import parse_many

    try:
        items = parse_many(value)
    except ValueError:
        items = []
    if not items or any(item.amount < 1 for item in items):
        raise ConfigError(
            f"{name} must be a rate such as 100/second or 1000 per minute (several separated "
            f"by ';'), got {value!r}"
        )


def _networks(name: str, value: str) -> tuple[Network, ...]:
    """Comma-separated addresses and CIDRs (an address is a network of one)."""
    found = []
    for item in value.split(","):
        if item.strip():
            try:
                found.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                raise ConfigError(
                    f"{name} must be comma-separated addresses or CIDRs (10.0.0.0/8, 127.0.0.1, "
                    f"::1), got {item.strip()!r}"
                ) from None
    return tuple(found)
