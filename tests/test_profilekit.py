"""scripts/profilekit.py: a py-spy profile summarised by layer."""

from __future__ import annotations

from profilekit import OTHER, layer, shares, table

PROFILE = [
    "run (gunicorn/arbiter.py:1);handle (gunicorn/workers/base_async.py:2) 30\n",
    "handle (gunicorn/x.py:1);update_stock (faststock/products.py:9);"
    "execute (faststock/db.py:71);StatementCursor.execute (faststock/db.py:71) 50\n",
    "handle (gunicorn/x.py:1);get (faststock/cache.py:1);get (redis/client.py:3) 15\n",
    "<module> (python:1) 5\n",
]


def test_each_sample_goes_to_its_innermost_known_layer():
    assert layer(["a (gunicorn/x.py:1)", "b (faststock/y.py:2)"]) == "FastStock code"
    assert layer(["b (faststock/y.py:2)", "c (redis/z.py:3)"]).startswith("Redis client")
    assert layer(["<module> (python:1)"]) == OTHER


def test_shares_add_up_and_are_ordered():
    rows = shares(PROFILE)
    assert rows[0] == ("PostgreSQL client (psycopg2, psycogreen)", 0.5)
    assert [name for name, _ in rows][1:3] == [
        "gunicorn HTTP parsing and writing",
        "Redis client (redis-py, hiredis)",
    ]
    assert abs(sum(share for _, share in rows) - 1) < 1e-9
    assert shares([]) == []
    assert "| PostgreSQL client (psycopg2, psycogreen) | 50% |" in table(rows)
