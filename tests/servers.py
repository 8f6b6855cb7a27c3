"""Throwaway PostgreSQL, Redis and gunicorn processes for the suite, driven like an operator would.

PostgreSQL and Redis are started through `scripts/servers` (the same shell code `scripts/up` uses),
so the suite also exercises the set-up users run. Fault tests stop, pause (SIGSTOP) and restart
their own private instances, never the shared ones.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psycopg2
import requests

ROOT = Path(__file__).resolve().parents[1]
SERVERS = ROOT / "scripts" / "servers"
BIN = Path(sys.executable).parent
T = TypeVar("T")


def poll(predicate: Callable[[], T], within: float, every: float = 0.02) -> T:
    """Call `predicate` until it returns something truthy or `within` seconds pass; returns its
    last value. The one waiting loop of the suite: it waits on an observable state, never on time.
    """
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _servers(*args: object, env: Mapping[str, str] | None = None) -> None:
    subprocess.run(
        [str(SERVERS), *map(str, args)],
        check=True,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
    )


class RedisServer:
    def __init__(self, directory: Path, *options: str) -> None:
        """`options` go to redis-server as they are (`"--replicaof", "127.0.0.1", "6379"`)."""
        self.dir = directory
        self.port = free_port()
        self.options = options

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        return int((self.dir / "redis.pid").read_text())

    def start(self) -> RedisServer:
        _servers("redis-start", self.dir, self.port, *self.options)
        return self

    def stop(self) -> None:
        _servers("redis-stop", self.dir)

    def destroy(self) -> None:
        """Stop for good (Redis here keeps nothing on disk)."""
        self.stop()

    def pause(self) -> None:
        """Freeze the process: connections stay open but nothing answers, like a partition."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)


class SentinelServer(RedisServer):
    """A Redis Sentinel watching the master on `master_port` as `name` (quorum 2), deciding in
    about `down_ms` that the master is down."""

    def __init__(
        self, directory: Path, master_port: int, name: str, down_ms: int, failover_ms: int
    ) -> None:
        super().__init__(directory)
        self.master_port, self.name = master_port, name
        self.env = {
            "FS_SENTINEL_DOWN_MS": str(down_ms),
            "FS_SENTINEL_FAILOVER_MS": str(failover_ms),
        }

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> SentinelServer:
        _servers("sentinel-start", self.dir, self.port, self.master_port, self.name, env=self.env)
        return self


# Server options for a primary that streams to replicas, and for its replicas (a standby refuses
# to start with a smaller max_wal_senders than its primary's). The suite's own server keeps
# wal_level=minimal, which makes `seed --reset` write no WAL.
REPLICATION = "-c wal_level=replica -c max_wal_senders=4"


class PgServer:
    def __init__(self, directory: Path, options: str = "") -> None:
        self.dir = directory
        self.port = free_port()
        self.options = options  # server options added to the suite's (REPLICATION, say)

    @property
    def url(self) -> str:
        return f"postgresql://faststock@127.0.0.1:{self.port}/faststock"

    def start(self, fast: bool = True) -> PgServer:
        env = {
            "FS_PG_FAST": "1" if fast else "0",
            "FS_PG_OPTS": f"-c shared_preload_libraries=pg_stat_statements {self.options}",
        }
        _servers("pg-start", self.dir, self.port, env=env)
        return self

    def replica(self, directory: Path) -> PgServer:
        """A streaming replica of this server (started with REPLICATION), made with
        `pg_basebackup -R` in `directory` and started as a hot standby; `stop` and `start`
        work on it as on any server."""
        _servers("pg-basebackup", directory, self.port)
        return PgServer(directory, self.options).start()

    def stop(self) -> None:
        _servers("pg-stop", self.dir)

    def destroy(self) -> None:
        _servers("pg-destroy", self.dir)

    def _processes(self) -> list[int]:
        record = self.dir / "datadir"
        data = Path(record.read_text().strip()) if record.exists() else self.dir / "data"
        postmaster = int((data / "postmaster.pid").read_text().split()[0])
        return [postmaster, *children(postmaster)]

    def pause(self) -> None:
        """Freeze the server and its backends: sockets stay open, nothing answers."""
        for pid in self._processes():
            _signal(pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Backends first: once the postmaster runs it reaps those that had already exited."""
        for pid in reversed(self._processes()):
            _signal(pid, signal.SIGCONT)


def _signal(pid: int, signum: int) -> None:
    """Signal a process of a server; one that has exited since it was listed needs nothing."""
    with suppress(ProcessLookupError):
        os.kill(pid, signum)


GUNICORN = [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "faststock.wsgi:app"]


def run_gunicorn(env: Mapping[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run gunicorn as production does, to completion (for starts that must fail)."""
    return subprocess.run(
        GUNICORN, cwd=ROOT, env=dict(env), capture_output=True, text=True, timeout=timeout
    )


def children(pid: int) -> list[int]:
    """Direct child processes of `pid` (gunicorn's workers), read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def tcp_peer_ports(pid: int) -> set[int]:
    """Remote ports of the TCP connections process `pid` holds open."""
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[9] in inodes and fields[3] == "01":  # ESTABLISHED
                ports.add(int(fields[2].rsplit(":", 1)[1], 16))
    return ports


class LiveServer:
    """gunicorn with gevent workers from gunicorn.conf.py, as production runs it."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.env = {
            **os.environ,
            "PORT": str(self.port),
            "WEB_CONCURRENCY": "2",
            "LOG_LEVEL": "WARNING",
            # The suite's servers take anonymous writes, as conftest's app config does; the
            # tests of API keys say ALLOW_ANONYMOUS_WRITES=0 where they need it.
            "ALLOW_ANONYMOUS_WRITES": "1",
            **env,
        }
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base + path

    def start(self, timeout: float = 30) -> LiveServer:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            GUNICORN,
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        workers = int(self.env["WEB_CONCURRENCY"])

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited early:\n{self.log()}")
            try:
                response = requests.get(
                    self.url("/healthz"), timeout=1, headers={"Connection": "close"}
                )
            except requests.RequestException:
                return False
            return response.status_code == 200 and len(children(self.proc.pid)) >= workers

        if poll(ready, within=timeout, every=0.05):
            return self
        self.stop()
        raise RuntimeError(f"gunicorn did not become ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def workers(self) -> list[int]:
        assert self.proc is not None
        return children(self.proc.pid)

    def stop(self, timeout: float = 40) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()


# HTTP helpers shared by the live tests (real gunicorn): one place, so test modules never
# import each other.


def fire(calls: list[Callable[[], requests.Response]]) -> list[requests.Response]:
    """Run every call at the same moment, each on its own thread and connection."""
    barrier = threading.Barrier(len(calls), timeout=60)

    def run(call: Callable[[], requests.Response]) -> requests.Response:
        barrier.wait()
        return call()

    threading.stack_size(256 * 1024)
    try:
        with ThreadPoolExecutor(max_workers=len(calls)) as pool:
            return list(pool.map(run, calls))
    finally:
        threading.stack_size(0)


@contextmanager
def row_locked(database_url: str, product_id: int) -> Iterator[None]:
    """Hold a row lock from another session, so a write to that row blocks inside PostgreSQL."""
    conn = psycopg2.connect(database_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM products WHERE id = %s FOR UPDATE", (product_id,))
        yield
    finally:
        conn.rollback()
        conn.close()


def wait_for_lock_waiter(
    sql: Callable[..., list[tuple]], timeout: float = 10, count: int = 1
) -> None:
    """Poll until `count` sessions are blocked on a lock: the writes have reached PostgreSQL."""
    query = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
    blocked = poll(lambda: sql(query)[0][0] >= count, within=timeout)
    assert blocked, "the write never blocked on the row lock"


def post_stock(
    server, product_id: int, *, key: str | None = None, timeout: float = 30, **body: int
) -> requests.Response:
    """POST update-stock (with an Idempotency-Key if `key`) without keep-alive: an idle
    kept-alive socket would hold gunicorn's graceful shutdown for its whole timeout when the
    fixture stops the server."""
    headers = {"Connection": "close"}
    if key:
        headers["Idempotency-Key"] = key
    response = requests.post(
        server.url(f"/api/products/{product_id}/update-stock"),
        json=body,
        timeout=timeout,
        headers=headers,
    )
    response.close()
    return response


def post_delta(server, product_id: int, amount: int, key: str | None = None) -> requests.Response:
    """A stock delta, with the minute of patience a storm of concurrent writers may need."""
    return post_stock(server, product_id, key=key, timeout=60, delta=amount)


def get(server, path: str, timeout: float = 10) -> requests.Response:
    response = requests.get(server.url(path), timeout=timeout, headers={"Connection": "close"})
    response.close()
    return response


def first_hit_per_worker(server, path: str) -> set[str]:
    """Read `path` on fresh connections until each worker has answered it from its near cache;
    returns the workers' request-id prefixes (a worker's generated ids share one)."""
    seen: set[str] = set()

    def every_worker_hit() -> bool:
        response = requests.get(server.url(path), headers={"Connection": "close"}, timeout=10)
        if response.headers["X-Cache"] == "HIT":
            seen.add(response.headers["X-Request-ID"][:16])
        return len(seen) >= 2

    assert poll(every_worker_hit, within=20, every=0)
    return seen


def timed_get(server, path: str) -> tuple[requests.Response, float]:
    started = time.monotonic()
    response = get(server, path)
    return response, time.monotonic() - started


@contextmanager
def writing(server, product_ids: list[int], limit: int = 20_000) -> Iterator[list[int]]:
    """Keep one keep-alive client per product adding 1 to its stock, in a loop, until the block
    ends (or `limit` answers); yields the statuses as they come (0: no answer)."""
    outcomes: list[int] = []
    stop = threading.Event()

    def writer(product_id: int) -> None:
        with requests.Session() as s:
            while not stop.is_set() and len(outcomes) < limit:
                try:
                    r = s.post(
                        server.url(f"/api/products/{product_id}/update-stock"),
                        json={"delta": 1},
                        timeout=10,
                    )
                    outcomes.append(r.status_code)
                except requests.RequestException:
                    outcomes.append(0)

    threads = [threading.Thread(target=writer, args=(pid,)) for pid in product_ids]
    for t in threads:
        t.start()
    try:
        yield outcomes
    finally:
        stop.set()
        for t in threads:
            t.join(30)


MACHINE_POLICY = "#!/bin/sh\nexit 0\n"  # a policy-rc.d of the machine's own: starts allowed
OUR_LEFTOVER_POLICY = "#!/bin/sh\n# faststock\nexit 101\n"  # marked: an interrupted install's


@dataclass
class FakeInstall:
    result: subprocess.CompletedProcess[str]
    lines: list[str]  # the stand-in apt-get's log: its arguments, and the policy-rc.d's answer
    policy: Path
    fake_bin: Path

    @property
    def install(self) -> str:
        """The `apt-get install` line."""
        return next(line for line in self.lines if " install " in line)


def install_with_fake_apt(
    tmp_path: Path,
    command: str,
    service: str,
    tools: Sequence[str] = (),
    existing: str | None = None,
    env: Mapping[str, str] | None = None,
) -> FakeInstall:
    """Run `command` with scripts/lib.sh sourced, the way the tests of installing without starting
    a service (nginx, Prometheus, PgBouncer) need it: apt-get is a stand-in that logs its
    arguments and what the policy-rc.d answers a start of `service` while it installs, then
    "installs" `tools` (empty scripts in the PATH directory); sudo passes through. `existing` is
    the policy-rc.d there before: None, "ours" (OUR_LEFTOVER_POLICY) or "the machine's"
    (MACHINE_POLICY)."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for tool in ("dirname", "id", "grep", "tee", "chmod", "rm", "env", "cat"):
        (fake_bin / tool).symlink_to(shutil.which(tool))
    (fake_bin / "apt-get").write_text(
        "#!/bin/sh\n"
        'echo "apt-get $*" >>"$FAKE_LOG"\n'
        'if [ "$1" = install ]; then\n'
        f'  if [ -x "$FS_POLICY_RC_D" ]; then "$FS_POLICY_RC_D" {service} start; fi\n'
        '  echo "policy-rc.d: $?" >>"$FAKE_LOG"\n'
        f"  for tool in {' '.join(tools)}; do\n"
        """    printf '#!/bin/sh\\n' >"$FAKE_BIN/$tool" && chmod +x "$FAKE_BIN/$tool"\n"""
        "  done\n"
        "fi\n"
    )
    (fake_bin / "sudo").write_text('#!/bin/sh\nexec "$@"\n')
    for stub in ("apt-get", "sudo"):
        (fake_bin / stub).chmod(0o755)
    policy, log = tmp_path / "policy-rc.d", tmp_path / "apt.log"
    if existing is not None:
        policy.write_text(OUR_LEFTOVER_POLICY if existing == "ours" else MACHINE_POLICY)
        policy.chmod(0o755)
    result = subprocess.run(
        ["/bin/bash", "-c", f'source "{ROOT / "scripts" / "lib.sh"}" && {command}'],
        env={
            "PATH": str(fake_bin),
            "FS_POLICY_RC_D": str(policy),
            "FAKE_LOG": str(log),
            "FAKE_BIN": str(fake_bin),
            **(env or {}),
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    lines = log.read_text().splitlines() if log.exists() else []
    return FakeInstall(result, lines, policy, fake_bin)
