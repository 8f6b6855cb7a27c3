"""API keys: who may change stock (and, with READS_REQUIRE_KEY=1, read it).

A client sends `Authorization: Bearer <key>`. The service holds only the SHA-256 of each key,
under a name (API_KEYS, API_KEYS_FILE): a leaked configuration or log gives nobody a key, and a
key is checked by hashing what the client sent and comparing digests with `hmac.compare_digest`,
against every entry, so the time taken says nothing about which entry came close. The name is
what the rest of the service knows a client by: idempotency keys are scoped by it (stock.py) and
write limits counted per name (ratelimit.py). No key ever reaches a log line, a metric or an
error body: messages say what was wrong with the header, never what it held.

Without any key configured, writes answer 401 unless ALLOW_ANONYMOUS_WRITES=1, and then the
service has no authentication at all: an Authorization header is not even read (so a client
that sends one to a development server is not refused). With keys configured, a request that
sends one must send a valid one, even where anonymous requests are allowed: a client with a
mistyped key learns of it at once rather than being served as somebody else.

`flask --app faststock api-key create NAME` makes a key: 32 random bytes, URL-safe, printed once,
with the API_KEYS entry that goes with it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Sequence

import click
from flask import Flask, current_app, g, request
from flask.cli import AppGroup

from .config import KEY_NAME, Config, ConfigError
from .errors import ApiError

# RFC 6750's b64token, at most 512 characters: generated keys are 43 (token_urlsafe(32)).
_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]{1,512}=*")
REALM = 'Bearer realm="faststock"'
ANONYMOUS = ""  # the client name of a request without a key (idempotency scope, limits)
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Unauthorized(ApiError):
    """401 with the challenge RFC 6750 asks for: `invalid_token` when a key was sent but is no
    good, nothing more when none was sent."""

    def __init__(self, message: str, invalid: bool) -> None:
        challenge = f'{REALM}, error="invalid_token"' if invalid else REALM
        super().__init__(401, "unauthorized", message, headers={"WWW-Authenticate": challenge})


class Keys:
    """The configured keys, as (name, digest) pairs."""

    def __init__(self, entries: Sequence[tuple[str, bytes]]) -> None:
        self.entries = tuple(entries)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def name_of(self, header: str | None) -> str | None:
        """The name of the valid key in an Authorization header value, else None (no header, a
        malformed one or an unknown key). The fast lane's check: no exception, no message."""
        if not header or header[:7].lower() != "bearer ":
            return None
        token = header[7:].lstrip(" ")
        return self._lookup(token) if _TOKEN.fullmatch(token) else None

    def identify(self, header: str | None) -> str:
        """The name of the key in an Authorization header value; Unauthorized otherwise."""
        if header is None:
            raise Unauthorized(
                "this request needs an API key: send Authorization: Bearer <key>", invalid=False
            )
        scheme, _, token = header.strip(" ").partition(" ")
        if not scheme:
            raise Unauthorized("the Authorization header is empty", invalid=True)
        if scheme.lower() != "bearer":
            raise Unauthorized("Authorization must use the Bearer scheme", invalid=True)
        token = token.lstrip(" ")
        if not _TOKEN.fullmatch(token):
            raise Unauthorized("the API key in Authorization is malformed", invalid=True)
        name = self._lookup(token)
        if name is None:
            raise Unauthorized("the API key is not valid", invalid=True)
        return name

    def _lookup(self, token: str) -> str | None:
        """Every entry is compared (no early exit), each in constant time."""
        sent = digest(token)
        found = None
        for name, expected in self.entries:
            if hmac.compare_digest(sent, expected):
                found = name
        return found


def get_keys(app: Flask | None = None) -> Keys:
    return (app or current_app).extensions["faststock.keys"]


def client() -> str:
    """The name of the key this request was made with; ANONYMOUS without one."""
    return g.get("client", ANONYMOUS)


def _checker(config: Config, keys: Keys):  # noqa: ANN202 - a before_request hook
    """The before_request hook for the API's routes (the products blueprint), made for the
    settings, so a read that needs no key costs one comparison."""
    anonymous_writes = config.allow_anonymous_writes
    reads_need_key = config.reads_require_key

    def authenticate() -> None:
        write = request.method in WRITE_METHODS
        if not (write or reads_need_key) or request.blueprint != "products":
            return
        header = request.headers.get("Authorization")
        if header is None and write and anonymous_writes:
            return
        g.client = keys.identify(header)

    return authenticate


api_key_cli = AppGroup("api-key", help="Manage API keys.")


@api_key_cli.command("create")
@click.argument("name")
@click.option(
    "--add-to",
    "add_to",
    type=click.Path(dir_okay=False, writable=True),
    help="Also append the API_KEYS entry to this file (an API_KEYS_FILE).",
)
def create_key_command(name: str, add_to: str | None) -> None:
    """Make a new random key for client NAME: print the key (once: only its digest is kept)
    and its API_KEYS entry. A name may have several keys: make a new one, hand it out, then
    delete the old entry (a rotation that keeps the client's idempotency keys and limits)."""
    if not KEY_NAME.fullmatch(name):
        raise click.BadParameter(
            "up to 64 letters, digits, '_', '.' or '-', starting with a letter or digit",
            param_hint="NAME",
        )
    key = secrets.token_urlsafe(32)
    entry = f"{name}:{digest(key).hex()}"
    if add_to is not None:
        if os.path.exists(add_to):
            try:  # the file must stay readable by the service
                Config(api_keys_file=add_to).read_api_keys()
            except ConfigError as exc:
                raise click.ClickException(str(exc)) from None
        with open(add_to, "a", encoding="utf-8") as file:
            file.write(entry + "\n")
    click.echo(f"key: {key}")
    click.echo(f"API_KEYS entry: {entry}")
    note = f"added to {add_to}; " if add_to else ""
    click.echo(
        f"({note}the key is shown only now: give it to the client, as Authorization: Bearer "
        "<key>; the server needs only the entry)",
        err=True,
    )


def init_app(app: Flask) -> None:
    """After the request id hook (a 401 carries the id) and before the rate limiter, which
    counts writes per key name."""
    config: Config = app.config["FASTSTOCK"]
    keys = Keys(config.read_api_keys())
    app.extensions["faststock.keys"] = keys
    app.cli.add_command(api_key_cli)
    if keys or not config.allow_anonymous_writes:
        app.before_request(_checker(config, keys))
    # else no key to check against: authentication is off (a development server)
