"""Where a worker's time goes: py-spy's raw (collapsed) profile, summarised by layer.

`scripts/profile` records the profile; `python -m profilekit layers FILE` prints a Markdown table
with each layer's share of the samples, attributing each sample to the innermost frame that
belongs to a known layer (so time in psycopg2's C code called from FastStock code counts as the
PostgreSQL client's, not FastStock's).
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Iterable

# (layer, substrings of a frame that place it there); the first layer found from the innermost
# frame outwards wins.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("PostgreSQL client (psycopg2, psycogreen)", ("psycopg", "StatementCursor.execute")),
    ("Redis client (redis-py, hiredis)", ("redis/",)),
    ("metrics (prometheus)", ("prometheus",)),
    ("Flask and werkzeug", ("flask/", "werkzeug/")),
    ("gunicorn HTTP parsing and writing", ("gunicorn/",)),
    ("gevent sockets and event loop", ("gevent/",)),
    ("FastStock code", ("faststock/",)),
]
OTHER = "other (standard library, interpreter)"


def layer(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, keys in LAYERS:
            if any(key in frame for key in keys):
                return name
    return OTHER


def shares(lines: Iterable[str]) -> list[tuple[str, float]]:
    """(layer, share of samples) from collapsed-stack lines ("frame;frame;... count")."""
    counts: collections.Counter[str] = collections.Counter()
    for line in lines:
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if stack and n.isdigit():
            counts[layer(stack.split(";"))] += int(n)
    total = sum(counts.values())
    return [(name, count / total) for name, count in counts.most_common()] if total else []


def table(rows: list[tuple[str, float]]) -> str:
    out = ["| layer | share of worker samples |", "|---|---:|"]
    out += [f"| {name} | {share:.0%} |" for name, share in rows]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "layers":
        sys.stderr.write("usage: python -m profilekit layers PROFILE.raw\n")
        return 2
    with open(argv[1]) as f:
        print(table(shares(f)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
