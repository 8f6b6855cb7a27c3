"""Request ids: the client's when sane, else a fresh one of fixed width, unique per worker."""

from __future__ import annotations

import os
import re

import pytest

from faststock import requestid
from faststock.requestid import request_id

HEX32 = re.compile(r"[0-9a-f]{32}")


def test_fresh_ids_are_32_hex_digits_and_never_repeat() -> None:
    ids = [request_id(None) for _ in range(10_000)]
    assert all(HEX32.fullmatch(i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_a_prefix_with_leading_zero_bits_still_gives_32_digits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(requestid, "_state", [1 << 64, 0])
    assert request_id(None) == "0000000000000001" + "0000000000000001"
    assert request_id("") == "0000000000000001" + "0000000000000002"


@pytest.mark.parametrize(
    "incoming",
    ["", "x" * 129, "naïve", "tab\there", "line\nbreak"],
)
def test_an_unusable_incoming_id_is_replaced(incoming: str) -> None:
    assert HEX32.fullmatch(request_id(incoming))


@pytest.mark.parametrize("incoming", ["order-7-attempt-2", "x" * 128, "a b"])
def test_a_sane_incoming_id_is_kept(incoming: str) -> None:
    assert request_id(incoming) == incoming


def test_a_forked_worker_draws_its_own_prefix() -> None:
    parent = request_id(None)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its first id and leave without running pytest's teardown
        os.write(write, request_id(None).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert HEX32.fullmatch(child)
    assert child[:16] != parent[:16]
