"""scripts/up and the commands it runs, as a user runs them: serving a seeded database, stopping
cleanly, one instance per port, and a bad setting or a taken port refused in one line."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg2
import pytest
import requests

from faststock.config import Config
from faststock.seed import product_row
from tests.servers import BIN, ROOT, SERVERS, children, free_port, poll, run_gunicorn

# Every test here runs the scripts as a user does: real servers, real processes.
pytestmark = pytest.mark.live

UP = ROOT / "scripts" / "up"


def refused(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) != 0


def user_env(**extra: str) -> dict[str, str]:
    """The environment of a user with no FastStock settings of their own, plus `extra`."""
    names = set(Config().env_names) | {"PROMETHEUS_MULTIPROC_DIR", "FS_RUN", "SEED_PRODUCTS"}
    env = {k: v for k, v in os.environ.items() if k not in names}
    return {**env, **extra}


class Up:
    """One `scripts/up` in a run directory of the test's own, on a port of its own."""

    def __init__(self, run_dir: Path, log: Path, port: int, *args: str, **env: str) -> None:
        self.run_dir, self.log, self.port, self.args = run_dir, log, port, args
        self.env = user_env(PORT=str(port), FS_RUN=str(run_dir), WEB_CONCURRENCY="1", **env)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def dir(self) -> Path:
        return self.run_dir / f"up-{self.port}"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> Up:
        self.proc = subprocess.Popen(
            [str(UP), *self.args],
            env=self.env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def get(self, path: str) -> requests.Response:
        # no keep-alive: an idle open connection would hold up gunicorn's graceful shutdown
        return requests.get(self.url(path), timeout=5, headers={"Connection": "close"})

    def wait_serving(self, path: str = "/readyz") -> requests.Response:
        assert self.proc is not None

        def serving() -> requests.Response | None:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                response = self.get(path)
            except requests.RequestException:
                return None
            return response if response.status_code == 200 else None

        response = poll(serving, within=180, every=0.1)
        assert response is not None, self.log.read_text()
        return response

    def server_ports(self) -> tuple[int, int]:
        """The ports of the PostgreSQL and Redis this instance started."""
        return int((self.dir / "pg" / "port").read_text()), int(
            (self.dir / "redis" / "port").read_text()
        )

    def env_urls(self) -> dict[str, str]:
        """The variables .run/up-PORT/env exports, read the way `source` would."""
        urls = {}
        for line in (self.dir / "env").read_text().splitlines():
            if line.startswith("export "):
                name, _, value = line.removeprefix("export ").partition("=")
                urls[name] = shlex.split(value)[0]
        return urls

    def stop(self, sig: signal.Signals = signal.SIGTERM, group: bool = False) -> int:
        """SIGTERM to the script, or `sig` to its whole process group (what Ctrl-C does)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            if group:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)
        return self.proc.wait(60)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Callable[..., Up]]:
    """Make `scripts/up` instances; whatever they leave running or on disk goes at the end."""
    made: list[Up] = []

    def make(port: int, *args: str, **env: str) -> Up:
        instance = Up(tmp_path / "run", tmp_path / f"up-{len(made)}.log", port, *args, **env)
        made.append(instance)
        return instance

    yield make
    for instance in made:
        if instance.proc is not None and instance.proc.poll() is None:
            os.killpg(instance.proc.pid, signal.SIGTERM)
            instance.proc.wait(60)
        if (instance.dir / "pg").exists():  # its data may live in /tmp (as root): see lib.sh
            subprocess.run([str(SERVERS), "pg-destroy", str(instance.dir / "pg")], check=False)


def gunicorn_title(script_pid: int) -> str:
    """The process title of the gunicorn master that scripts/up `script_pid` runs."""
    for pid in children(script_pid):
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if title.startswith("gunicorn"):
            return title.strip()
    return ""


@pytest.mark.slow
def test_up_serves_seeded_data_and_cleans_up(up):
    port, logs = free_port(), []
    for stop_signal, group in ((signal.SIGTERM, False), (signal.SIGINT, True)):
        instance = up(port).start()
        body = instance.wait_serving("/api/products?page=1000&limit=10").json()
        assert [item["id"] for item in body["items"]] == list(range(9991, 10001))
        assert body["next_page"] is None
        # A developer's server takes writes without a key, and says so once, at start.
        said = "[faststock] writes need no API key here (ALLOW_ANONYMOUS_WRITES=1, for development"
        assert instance.log.read_text().count(said) == 1
        write = requests.post(
            instance.url("/api/products/1/update-stock"),
            json={"delta": 0},
            headers={"Connection": "close"},
            timeout=10,
        )
        assert write.status_code == 200, write.text
        pg_port, redis_port = instance.server_ports()
        assert instance.env_urls() == {
            "DATABASE_URL": f"postgresql://faststock@127.0.0.1:{pg_port}/faststock",
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        }
        assert gunicorn_title(instance.proc.pid).startswith("gunicorn: master [faststock]")
        instance.stop(stop_signal, group)  # group: what Ctrl-C in a terminal does
        assert refused(port) and refused(pg_port) and refused(redis_port), instance.log.read_text()
        assert not (instance.dir / "env").exists()  # its URLs died with the servers
        logs.append(instance.log.read_text())
    assert [log.count("inserted 10000 products") for log in logs] == [1, 0]  # the data was kept


@pytest.mark.slow
def test_two_instances_share_nothing_and_a_third_on_a_taken_port_is_refused(up):
    """Each port has its own run directory and servers; another instance on a taken port stops
    before touching any server. The first binds loopback only; --clean removes its directory."""
    first = up(free_port(), "--clean")
    first.start().wait_serving()
    second = up(free_port()).start()
    second.wait_serving()
    assert first.server_ports() != second.server_ports()
    assert f"serving on http://127.0.0.1:{first.port} " in first.log.read_text()
    assert refused(first.port, "127.0.0.2"), "bound beyond 127.0.0.1 (0.0.0.0?)"
    # A throwaway server: no WAL kept for replicas, and little kept at all.
    database = psycopg2.connect(first.env_urls()["DATABASE_URL"])
    with contextlib.closing(database) as conn, conn.cursor() as cur:
        cur.execute("SELECT current_setting('wal_level'), current_setting('max_wal_size')")
        assert cur.fetchone() == ("minimal", "128MB")
    datadir_record = first.dir / "pg" / "datadir"  # as root the data may live under /tmp
    datadir = Path(datadir_record.read_text().strip()) if datadir_record.exists() else None

    same_port = subprocess.run([str(UP)], env=first.env, capture_output=True, text=True, timeout=60)
    assert same_port.returncode != 0
    assert same_port.stdout == ""
    lines = same_port.stderr.splitlines()
    assert len(lines) == 1 and str(first.port) in lines[0], same_port.stderr

    second_servers = second.server_ports()
    assert second.stop() == 143  # the SIGTERM status
    assert refused(second.port) and all(refused(p) for p in second_servers)
    for path in ("/readyz", "/api/products/9999"):  # PostgreSQL and Redis both still answer
        response = first.get(path)
        assert response.status_code == 200, (path, response.text)
    ready = first.get("/readyz").json()
    assert (ready["status"], ready["postgres"], ready["redis"]) == ("ok", "ok", "ok")

    first.stop()
    assert not first.dir.exists() and (datadir is None or not datadir.exists())
    assert (second.dir / "pg").is_dir(), "without --clean the data stays"


def test_up_refuses_a_port_another_program_holds(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = user_env(PORT=str(port), FS_RUN=str(tmp_path / "run"))
        result = subprocess.run([str(UP)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr.splitlines() == [
        f"[faststock] error: cannot serve on 127.0.0.1:{port}: Address already in use "
        "(set PORT or HOST)"
    ]
    assert not (tmp_path / "run" / f"up-{port}" / "pg").exists(), "started PostgreSQL anyway"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("DB_POOL_SIZE", "abc", "DB_POOL_SIZE must be a whole number, got 'abc'"),
        ("HOST", "every where", "HOST must be an IP address"),
    ],
)
def test_up_checks_settings_before_starting_anything(tmp_path, name, value, message):
    env = user_env(**{name: value, "FS_RUN": str(tmp_path / "run")})
    result = subprocess.run([str(UP)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("faststock: configuration error: "), lines
    assert message in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_failed_bind_leaves_no_metrics_directory(tmp_path):
    """gunicorn skips its on_exit hook when it cannot bind; the directory must go all the same."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        env = user_env(PORT=str(holder.getsockname()[1]), TMPDIR=str(tmp), WEB_CONCURRENCY="1")
        result = run_gunicorn(env)
    assert result.returncode != 0 and "Connection in use" in result.stderr, result.stderr
    assert not list(tmp.glob("faststock-metrics-*"))


def test_seed_reset_refuses_when_the_cache_cannot_be_cleared(fresh, sql):
    """A reset Redis never hears of leaves the API serving the old rows as HITs: refuse, unless
    --force, and change nothing."""
    sql("UPDATE products SET stock = 1 WHERE id = 10")
    env = user_env(DATABASE_URL=fresh.database_url, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    argv = [str(BIN / "flask"), "--app", "faststock", "seed", "--products", "100", "--reset"]

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*argv, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )

    refused_run = run()
    assert refused_run.returncode != 0
    lines = refused_run.stderr.splitlines()
    assert len(lines) == 1 and "nothing changed" in lines[0], refused_run.stderr
    assert "REDIS_URL" in lines[0] and "source .run/up-PORT/env" in lines[0]
    assert "--force" in lines[0]
    assert sql("SELECT stock FROM products WHERE id = 10") == [(1,)]

    sentinel = {"REDIS_SENTINELS": f"127.0.0.1:{free_port()}", "REDIS_SENTINEL_MASTER": "main"}
    env = {**env, "REDIS_URL": "redis://", **sentinel}  # under Sentinel, REDIS_URL names no host
    refused_run = run()
    assert refused_run.returncode != 0 and "nothing changed" in refused_run.stderr
    assert "Redis master main" in refused_run.stderr and "REDIS_URL" not in refused_run.stderr
    assert "Point REDIS_SENTINELS at the API's Redis" in refused_run.stderr
    env = {**env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    del env["REDIS_SENTINELS"], env["REDIS_SENTINEL_MASTER"]

    forced = run("--force")
    assert forced.returncode == 0, forced.stderr
    assert "could not clear the Redis cache" in forced.stderr
    assert sql("SELECT stock FROM products WHERE id = 10") == [(product_row(10)[3],)]


def _fake_pip_venv(venv: Path, calls: Path) -> None:
    """A virtualenv whose `python -m pip` only records its arguments: installing is not what is
    tested, deciding when to install is."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    (site / "pip").mkdir(parents=True)
    (site / "pip" / "__init__.py").write_text("")
    (site / "pip" / "__main__.py").write_text(
        "import sys\n"
        f"with open({str(calls)!r}, 'a') as f:\n"
        "    f.write(' '.join(sys.argv[1:]) + '\\n')\n"
    )


def test_switching_between_runtime_and_dev_installs_nothing(tmp_path):
    """scripts/up (runtime) after scripts/test or scripts/bench (dev) must not reinstall."""
    venv, calls = tmp_path / "venv", tmp_path / "pip-calls"
    _fake_pip_venv(venv, calls)

    def ensure(*kind: str) -> list[str]:
        calls.unlink(missing_ok=True)
        script = f"source {ROOT / 'scripts' / 'lib.sh'} && fs_ensure_venv {' '.join(kind)}"
        env = user_env(FS_VENV=str(venv), PYTHON=sys.executable)
        subprocess.run(["bash", "-c", script], env=env, check=True, capture_output=True)
        return calls.read_text().splitlines() if calls.exists() else []

    installed = ensure("dev")
    assert any("requirements-dev.txt" in call for call in installed), installed
    assert ensure() == []  # scripts/up after a dev install
    assert ensure("dev") == []  # and back
