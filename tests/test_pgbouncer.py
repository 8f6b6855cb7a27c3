"""The API through a real PgBouncer in transaction pooling mode (DATABASE_POOLER=pgbouncer).

PgBouncer hands a server connection to a client for one transaction, then to another client: no
session state may outlive a transaction, startup options are refused, and `backend_pid` names
no backend of ours. scripts/test installs PgBouncer (scripts/lib.sh, fs_ensure_pgbouncer); each
test module runs its own, from deploy/pgbouncer.ini, on a free loopback port, with a pool of 4
server connections, so the tests also check that file loads.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest
import requests

from faststock import db
from faststock.config import Config
from faststock.db import Pool, init_db
from faststock.seed import product_row, seed
from tests.servers import (
    BIN,
    MACHINE_POLICY,
    ROOT,
    fire,
    free_port,
    install_with_fake_apt,
    poll,
    post_delta,
    post_stock,
    row_locked,
    wait_for_lock_waiter,
)

POOL_SIZE = 4


class PgBouncer:
    """PgBouncer in front of the suite's PostgreSQL: deploy/pgbouncer.ini with the database
    address, listening address, authentication (trust: loopback only) and pool sizes replaced.

    PgBouncer refuses to run as root; as root it runs as the account PostgreSQL runs as
    (scripts/lib.sh's fs_pg_user), from a directory of its own under /tmp, which that account
    can reach (pytest's tmp_path is root's alone).
    """

    def __init__(self, pg_url: str, pool_size: int = POOL_SIZE) -> None:
        self.pg = urlsplit(pg_url)
        self.port = free_port()
        self.pool_size = pool_size
        self.dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, database_url: str) -> str:
        """`database_url`, a database on the suite's PostgreSQL, reached through PgBouncer."""
        parts = urlsplit(database_url)
        return urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{self.port}"))

    def start(self) -> PgBouncer:
        binary = (
            os.environ.get("FS_PGBOUNCER")
            or shutil.which("pgbouncer")
            or shutil.which("pgbouncer", path="/usr/sbin")
        )
        assert binary, "pgbouncer is not installed: run the suite with scripts/test"
        account = _unprivileged_account() if os.geteuid() == 0 else None
        user = None if account is None else account.pw_name
        self.dir = Path(tempfile.mkdtemp(prefix="faststock-pgbouncer."))
        ini = configparser.ConfigParser(interpolation=None)
        ini.read(ROOT / "deploy" / "pgbouncer.ini")
        server = f"host=127.0.0.1 port={self.pg.port}"
        if self.pg.password:
            server += f" password={self.pg.password}"
        ini["databases"] = {"*": server}
        ini["pgbouncer"].update(
            listen_addr="127.0.0.1",
            listen_port=str(self.port),
            auth_type="trust",
            auth_file=str(self.dir / "users.txt"),
            admin_users=self.pg.username,
            default_pool_size=str(self.pool_size),
            reserve_pool_size="0",
            logfile=str(self.dir / "pgbouncer.log"),
        )
        with (self.dir / "pgbouncer.ini").open("w") as f:
            ini.write(f)
        (self.dir / "users.txt").write_text(f'"{self.pg.username}" ""\n')
        if user is not None:
            for path in (self.dir, *self.dir.iterdir()):
                shutil.chown(path, user)
        self.proc = subprocess.Popen(
            [binary, str(self.dir / "pgbouncer.ini")],
            user=user,
            group=None if account is None else account.pw_gid,
            extra_groups=None if account is None else [],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        if not poll(self._answers, within=15):
            self.stop()
            raise RuntimeError("PgBouncer did not start")
        return self

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"PgBouncer exited early:\n{self.log()}")
        try:
            self.show("POOLS")
        except psycopg2.OperationalError:
            return False
        return True

    def log(self) -> str:
        assert self.dir is not None
        path = self.dir / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def show(self, what: str) -> list[dict[str, Any]]:
        """SHOW `what` (SERVERS, CLIENTS, POOLS) on PgBouncer's admin console, as dicts."""
        conn = psycopg2.connect(f"postgresql://{self.pg.username}@127.0.0.1:{self.port}/pgbouncer")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f"SHOW {what}")
                names = [column.name for column in cur.description]
                return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        finally:
            conn.close()

    def server_pids(self, database: str) -> set[int]:
        """The PostgreSQL backends of PgBouncer's server connections to `database`."""
        return {s["remote_pid"] for s in self.show("SERVERS") if s["database"] == database}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # immediate shutdown
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def _unprivileged_account() -> pwd.struct_passwd:
    """The account PostgreSQL runs as under root (scripts/lib.sh, fs_pg_user)."""
    for name in ("postgres", "faststock"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("no postgres or faststock account: run the suite with scripts/test")


@pytest.fixture(scope="module")
def bouncer(pg_admin_url: str) -> Iterator[PgBouncer]:
    server = PgBouncer(pg_admin_url).start()
    try:
        yield server
    finally:
        server.stop()


def _database(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def _through(config: Config, bouncer: PgBouncer, **overrides: object) -> Config:
    return Config(
        **{
            **config.__dict__,
            "database_url": bouncer.url(config.database_url),
            "database_pooler": "pgbouncer",
            **overrides,
        }
    )


# --- the pool ---------------------------------------------------------------------------------


def test_pgbouncer_refuses_startup_options_so_the_pool_sends_none(bouncer, database_url):
    """Without the setting the pool cannot connect; with it, statement_timeout comes with each
    transaction instead, and application_name still reaches PostgreSQL."""
    url = bouncer.url(database_url)
    direct = Pool(url, size=1, timeout=2, statement_timeout_ms=250)
    with pytest.raises(psycopg2.OperationalError, match="unsupported startup parameter: options"):
        direct.acquire()
    pool = Pool(url, size=1, timeout=2, statement_timeout_ms=250, pooled=True)
    settings = "SELECT current_setting('statement_timeout'), current_setting('application_name')"
    try:
        started = time.monotonic()
        with (
            pytest.raises(db.Unavailable, match="database query timed out"),
            db.standalone_transaction(pool) as cur,
        ):
            cur.execute(settings)
            assert cur.fetchone() == ("250ms", "faststock")
            cur.execute("SELECT pg_sleep(3)")  # no client deadline without gevent
        assert time.monotonic() - started < 2
    finally:
        pool.close()


# --- the API through PgBouncer --------------------------------------------------------------


def test_the_api_works_through_pgbouncer(bouncer, fresh, make_app, sql):
    """init-db, seed (COPY into a temporary table, LOCK TABLE) and every endpoint, each through
    a pooler that hands server connections out per transaction."""
    through = _through(fresh, bouncer)
    init_db(through)  # its advisory lock is the transaction's: none is left on a server connection
    assert seed(through, 120) == 20
    assert sql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == [(0,)]
    client = make_app(database_url=through.database_url, database_pooler="pgbouncer").test_client()

    first = client.get("/api/products/110")
    assert (first.status_code, first.headers["X-Cache"]) == (200, "MISS")
    assert first.get_json()["stock"] == product_row(110)[3]
    assert client.get("/api/products/110").get_json() == first.get_json()
    assert client.get("/api/products/7/stock").get_json() == {"id": 7, "stock": product_row(7)[3]}
    assert client.get("/api/products/999999").status_code == 404
    page = client.get("/api/products?page=3&limit=50").get_json()
    assert [item["id"] for item in page["items"]] == list(range(101, 121))
    assert page["next_page"] is None

    def change(product_id: int, key: str | None = None, **body: int):
        headers = {"Idempotency-Key": key} if key else {}
        return client.post(f"/api/products/{product_id}/update-stock", json=body, headers=headers)

    assert change(5, stock=40).get_json() == {"id": 5, "stock": 40}
    short = change(5, delta=-41)
    assert (short.status_code, short.get_json()["error"]) == (409, "insufficient_stock")
    over = change(5, delta=2_147_483_647)
    assert (over.status_code, over.get_json()["error"]) == (409, "stock_out_of_range")
    assert change(5, delta=-1).get_json() == {"id": 5, "stock": 39}
    assert change(999_999, delta=1).status_code == 404
    keyed = change(5, key="through-pgbouncer", delta=-3)
    again = change(5, key="through-pgbouncer", delta=-3)
    assert keyed.get_json() == again.get_json() == {"id": 5, "stock": 36}
    assert again.headers["Idempotent-Replayed"] == "true"
    reused = change(6, key="through-pgbouncer", delta=-3)
    assert (reused.status_code, reused.get_json()["error"]) == (422, "idempotency_key_reused")
    refused = change(5, key="refused-through-pgbouncer", delta=-100)
    assert change(5, key="refused-through-pgbouncer", delta=-100).data == refused.data
    assert refused.status_code == 409

    assert client.get("/api/products/5").get_json()["stock"] == 36
    assert sql("SELECT stock FROM products WHERE id = 5") == [(36,)]
    ready = client.get("/readyz")
    assert (ready.status_code, ready.get_json()["postgres"]) == (200, "ok")


def test_statement_timeout_applies_through_pgbouncer(bouncer, fresh, make_app, sql):
    """A write queued behind a row lock is cancelled by PostgreSQL after DB_STATEMENT_TIMEOUT_MS
    (no client-side deadline here, without gevent: only the server's limit can end it), both as
    one autocommit statement and inside a keyed write's transaction; another client's
    transaction through the same PgBouncer is untouched."""
    through = _through(fresh, bouncer)
    client = make_app(
        database_url=through.database_url, database_pooler="pgbouncer", db_statement_timeout_ms=300
    ).test_client()
    other = psycopg2.connect(through.database_url)
    try:
        with other.cursor() as cur:
            cur.execute("UPDATE products SET stock = 777 WHERE id = 9 RETURNING pg_backend_pid()")
            other_pid = cur.fetchone()[0]
        with row_locked(fresh.database_url, 5):
            for headers in ({}, {"Idempotency-Key": "blocked"}):
                started = time.monotonic()
                response = client.post(
                    "/api/products/5/update-stock", json={"stock": 55}, headers=headers
                )
                elapsed = time.monotonic() - started
                assert response.status_code == 503, response.data
                assert response.get_json()["message"] == "database query timed out"
                assert 0.3 <= elapsed < 3, elapsed
        with other.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            assert cur.fetchone() == (other_pid,)
        other.commit()
    finally:
        other.close()
    assert sql("SELECT id, stock FROM products WHERE id IN (5, 9) ORDER BY id") == [
        (5, product_row(5)[3]),
        (9, 777),
    ]
    assert client.post("/api/products/5/update-stock", json={"stock": 55}).status_code == 200


GIVE_UP = """
import logging
import signal
import sys

signal.alarm(60)  # ends this process, and the test's reads, whatever happens

from gevent import monkey

monkey.patch_all()
import gevent

from faststock import db

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
assert db.make_cooperative()
pool = db.Pool(sys.argv[1], size=1, timeout=2, statement_timeout_ms=1000, pooled=True)
try:
    with db.standalone_transaction(pool) as cur:
        cur.execute("SET LOCAL statement_timeout = 0")  # only the client's deadline is left
        cur.execute("SELECT pg_advisory_xact_lock(4243)")
except db.Unavailable as exc:
    print(exc.message, flush=True)
gevent.wait(timeout=15)  # whatever giving up set off runs to its end
print("settled", flush=True)
"""


def test_a_client_that_gives_up_ends_no_one_elses_transaction(bouncer, database_url, sql):
    """Under gevent the client gives up after its deadline and closes its connection. Through a
    pooler it ends no backend by pid (that pid is PgBouncer's invention, and server connections
    serve other clients): PgBouncer closes the server connection the client left mid-statement,
    and the backend ends with its statement, rolling back."""
    url = bouncer.url(database_url)
    name = _database(database_url)
    holder = psycopg2.connect(url)  # another client of the same PgBouncer, in a transaction
    proc = None
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_backend_pid(), pg_advisory_xact_lock(4243)")
            holder_pid = cur.fetchone()[0]
        proc = subprocess.Popen(
            [str(BIN / "python"), "-c", GIVE_UP, url],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        waiting = "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        rows = poll(lambda: sql(waiting), within=10)
        assert rows, "the client never queued on the lock"
        orphan = rows[0][0]
        assert orphan in bouncer.server_pids(name)
        assert proc.stdout.readline().strip() == "database query timed out"
        assert poll(lambda: orphan not in bouncer.server_pids(name), within=5), (
            "PgBouncer kept the server connection its client left"
        )
        assert proc.stdout.readline().strip() == "settled"
        assert proc.wait(timeout=30) == 0
        err = proc.stderr.read()
        assert "PostgreSQL backend" not in err, err  # no backend was ended by pid
        with holder.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            assert cur.fetchone() == (holder_pid,)
        holder.commit()
        gone = "SELECT count(*) FROM pg_stat_activity WHERE pid = %s"
        assert poll(lambda: sql(gone, orphan) == [(0,)], within=10), "the orphan lives on"
        assert sql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == [(0,)]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate()
        holder.close()


SESSION_STATE = """
SELECT pg_backend_pid(),
       current_setting('statement_timeout'),
       current_setting('idle_in_transaction_session_timeout'),
       (SELECT count(*) FROM pg_prepared_statements),
       (SELECT count(*) FROM pg_cursors),
       (SELECT count(*) FROM pg_listening_channels()),
       (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()),
       (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema())
"""


def test_no_session_state_outlives_a_transaction(bouncer, fresh, make_app, sql):
    """Four keyed writes queued behind a row lock hold every server connection of the pool at
    once, so each has run the API's statements (with their 2 s statement_timeout); then four
    other clients, one per server connection, find each as a new session would."""
    through = _through(fresh, bouncer)
    app = make_app(
        database_url=through.database_url,
        database_pooler="pgbouncer",
        db_statement_timeout_ms=2000,
    )

    def keyed_write(i: int) -> int:
        response = app.test_client().post(
            "/api/products/5/update-stock", json={"delta": 1}, headers={"Idempotency-Key": f"s{i}"}
        )
        return response.status_code

    with ThreadPoolExecutor(POOL_SIZE) as pool:
        with row_locked(fresh.database_url, 5):
            pending = [pool.submit(keyed_write, i) for i in range(POOL_SIZE)]
            wait_for_lock_waiter(sql, count=POOL_SIZE)
        assert [f.result(timeout=30) for f in pending] == [200] * POOL_SIZE
    client = app.test_client()
    assert client.get("/api/products/5").status_code == 200
    assert client.post("/api/products/6/update-stock", json={"delta": 1}).status_code == 200
    name = _database(fresh.database_url)
    servers = bouncer.server_pids(name)
    assert len(servers) == POOL_SIZE, servers

    defaults = sql(
        "SELECT current_setting('statement_timeout'), "
        "current_setting('idle_in_transaction_session_timeout')"
    )[0]
    clients = [psycopg2.connect(through.database_url) for _ in range(POOL_SIZE)]
    try:
        seen = []
        for conn in clients:  # each stays in its transaction: the next one gets another server
            with conn.cursor() as cur:
                cur.execute(SESSION_STATE)
                seen.append(cur.fetchone())
    finally:
        for conn in clients:
            conn.close()
    assert {row[0] for row in seen} == servers
    assert {row[1:] for row in seen} == {(*defaults, 0, 0, 0, 0, 0)}


# --- gunicorn through PgBouncer -------------------------------------------------------------


def test_gunicorn_through_a_pool_smaller_than_its_clients(bouncer, live_server, fresh, sql):
    """2 gevent workers x DB_POOL_SIZE 8 client connections share 4 server connections: no
    oversell, each key applied once, a lock wait still cancelled by PostgreSQL before the
    client's deadline, and another client's transaction untouched by it."""
    url = bouncer.url(fresh.database_url)
    server = live_server(
        DATABASE_URL=url,
        DATABASE_POOLER="pgbouncer",
        WEB_CONCURRENCY="2",
        DB_POOL_SIZE="8",
        DB_STATEMENT_TIMEOUT_MS="2000",
    )
    sql("UPDATE products SET stock = 25 WHERE id = 9")
    sql("UPDATE products SET stock = 500 WHERE id = 11")
    before = sql("SELECT stock FROM products WHERE id = 12")[0][0]
    calls = [lambda: post_delta(server, 9, -1)] * 50
    calls += [lambda: post_delta(server, 11, -7, key="checkout-through-pgbouncer")] * 20
    calls += [lambda i=i: post_delta(server, 12, 1, key=f"add-{i}") for i in range(30)]
    responses = fire(calls)

    sold = responses[:50]
    assert sorted(r.status_code for r in sold) == [200] * 25 + [409] * 25
    assert sorted(r.json()["stock"] for r in sold if r.status_code == 200) == list(range(25))
    retried = responses[50:70]
    assert {(r.status_code, r.content) for r in retried} == {(200, b'{"id":11,"stock":493}')}
    assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in retried) == 19
    assert {r.status_code for r in responses[70:]} == {200}
    again = post_delta(server, 12, 1, key="add-0")
    assert again.headers["Idempotent-Replayed"] == "true"
    assert sql("SELECT id, stock FROM products WHERE id IN (9, 11, 12) ORDER BY id") == [
        (9, 0),
        (11, 493),
        (12, before + 30),
    ]
    name = _database(fresh.database_url)
    clients = [c for c in bouncer.show("CLIENTS") if c["database"] == name]
    assert len(clients) > POOL_SIZE, "the workers never needed more connections than the pool"
    assert len(bouncer.server_pids(name)) <= POOL_SIZE

    other = psycopg2.connect(url)
    try:
        with other.cursor() as cur:
            cur.execute("UPDATE products SET stock = 777 WHERE id = 13")
        with row_locked(fresh.database_url, 5):
            started = time.monotonic()
            response = post_stock(server, 5, stock=55)
            elapsed = time.monotonic() - started
        # PostgreSQL's 2 s, not the client's deadline (3 s), which would close the connection
        assert response.status_code == 503
        assert response.json()["message"] == "database query timed out"
        assert 2 <= elapsed < 3, elapsed
        other.commit()
    finally:
        other.close()
    assert sql("SELECT id, stock FROM products WHERE id IN (5, 13) ORDER BY id") == [
        (5, product_row(5)[3]),
        (13, 777),
    ]
    ready = requests.get(server.url("/readyz"), timeout=10)
    assert (ready.status_code, ready.json()["postgres"]) == (200, "ok")
    assert "Traceback" not in server.log()


# --- installing PgBouncer -------------------------------------------------------------------


@pytest.mark.parametrize("existing", [None, "ours", "the machine's"])
def test_installing_pgbouncer_refuses_service_starts(tmp_path, existing):
    """fs_ensure_pgbouncer, as scripts/test runs it on a machine without PgBouncer: apt-get runs
    without recommends while a policy-rc.d refuses service starts (Debian's package would start
    a PgBouncer on port 6432), and that policy is gone afterwards, unless it was the machine's."""
    done = install_with_fake_apt(
        tmp_path,
        'fs_ensure_pgbouncer && echo "$FS_PGBOUNCER"',
        "pgbouncer",
        ("pgbouncer",),
        existing,
        env={"FS_SBIN": str(tmp_path / "sbin")},  # not this machine's /usr/sbin/pgbouncer
    )
    result, lines, policy = done.result, done.lines, done.policy
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == str(done.fake_bin / "pgbouncer")
    install = done.install
    assert "--no-install-recommends" in install and install.endswith(" pgbouncer"), install
    if existing == "the machine's":
        assert "policy-rc.d: 0" in lines, lines
        assert policy.read_text() == MACHINE_POLICY
    else:
        assert "policy-rc.d: 101" in lines, lines
        assert not policy.exists(), "the policy-rc.d of the install was left behind"
