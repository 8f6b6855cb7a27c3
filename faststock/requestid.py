"""Request ids: the client's `X-Request-ID` when it is sane, else a new one, unique per worker.

Shared by the Flask path and the fast lane, so both answer alike. A new id is a random prefix
drawn once per process plus a counter (32 hex digits, like a UUID's): `uuid.uuid4()` costs a
getrandom() system call per request, a noticeable share of a cache hit. The digits come from one
integer's bytes: an f-string's `:016x` took 0.74 µs here, `to_bytes().hex()` 0.22 µs.
"""

from __future__ import annotations

import os
import secrets

MAX_LENGTH = 128
_COUNTER_BITS = 64
_state = [secrets.randbits(64) << _COUNTER_BITS, 0]  # prefix, counter: redrawn in every child


def _new_process() -> None:
    _state[:] = [secrets.randbits(64) << _COUNTER_BITS, 0]


os.register_at_fork(after_in_child=_new_process)


def request_id(incoming: str | None) -> str:
    """`incoming` if it is 1..128 printable ASCII characters, else a fresh id."""
    if incoming and len(incoming) <= MAX_LENGTH and incoming.isascii() and incoming.isprintable():
        return incoming
    state = _state
    state[1] = count = state[1] + 1
    return (state[0] | count & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(16, "big").hex()
