"""Several instances behind nginx: two gunicorn masters with two gevent workers each and no memory
shared between them (two hosts, in effect), sharing the suite's PostgreSQL and Redis, behind a real
nginx running deploy/nginx.conf. Requests go through nginx, whose round robin alternates between
the instances; the tests' copy of the config adds `X-Upstream: $upstream_addr`, so every answer
names the instance that gave it.

Each guarantee of one host is checked across the two, and each bound that is weaker across hosts
than within one (README, "Several instances") is checked where a test can reach it, with one
instance cut off from Redis by a relay that stops passing bytes, as a partition does.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis as redis_lib
import requests
from prometheus_client.parser import text_string_to_metric_families

from faststock.cache import decode_entry, product_key
from faststock.config import Config
from faststock.nearcache import HEARTBEAT_SECONDS
from faststock.outbox import SWEEP_SECONDS
from faststock.seed import seed
from tests.servers import (
    ROOT,
    LiveServer,
    fire,
    first_hit_per_worker,
    free_port,
    get,
    install_with_fake_apt,
    poll,
    post_stock,
)

NGINX_CONF = ROOT / "deploy" / "nginx.conf"
# The one line the tests change: compose's service name becomes the instances' addresses.
SERVER_LINE = re.compile(r"^([ \t]*)server api:8000 resolve([^;]*);$", re.M)
TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
PRODUCTS = 100
live = pytest.mark.live


# --- nginx ---------------------------------------------------------------------------------------


def nginx_binary() -> str:
    for candidate in (os.environ.get("FS_NGINX"), shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(
        "nginx is not installed: scripts/test installs it (scripts/lib.sh, fs_ensure_nginx)"
    )


def _once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"deploy/nginx.conf should hold {old!r} exactly once"
    return text.replace(old, new)


def nginx_config(upstreams: Sequence[str], port: int, directory: Path) -> str:
    """deploy/nginx.conf as the tests run it: `upstreams` in place of `api:8000 resolve` (with the
    same parameters), a loopback port, temporary files under `directory`, and X-Upstream."""
    text = NGINX_CONF.read_text()
    found = SERVER_LINE.findall(text)
    assert len(found) == 1, "deploy/nginx.conf should name the api service on one server line"
    indent, parameters = found[0]
    servers = "\n".join(f"{indent}server {address}{parameters};" for address in upstreams)
    text = SERVER_LINE.sub(lambda _: servers, text)
    text = _once(text, "listen 8000;", f"listen 127.0.0.1:{port};")
    temp = "".join(f"    {name}_temp_path {directory / name};\n" for name in TEMP_DIRS)
    text = _once(text, "http {\n", "http {\n" + temp)
    return _once(
        text,
        "proxy_pass http://faststock;",
        "proxy_pass http://faststock;\n            add_header X-Upstream $upstream_addr always;",
    )


class Nginx:
    """nginx in the foreground, as root or not: config, pid, logs and temporary files all in
    `directory`, nothing written anywhere else."""

    def __init__(self, directory: Path, upstreams: Sequence[str]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.port = free_port()
        self.config = directory / "nginx.conf"
        self.config.write_text(nginx_config(upstreams, self.port, directory))
        self.log_path = directory / "nginx.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self, *extra: str) -> list[str]:
        directives = f"pid {self.dir / 'nginx.pid'}; daemon off;"
        if os.geteuid() == 0:
            directives += " user root;"  # workers as nobody could not enter the test's tmp dir
        config = ["-p", f"{self.dir}/", "-c", str(self.config), "-e", "stderr", "-g", directives]
        return [nginx_binary(), *config, *extra]

    def check(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv("-t"), capture_output=True, text=True, timeout=30)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self) -> Nginx:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited:\n{self.log()}")
            try:
                return requests.get(self.url("/nginx-health"), timeout=1).status_code == 200
            except requests.RequestException:
                return False

        if not poll(ready, within=10):
            self.stop()
            raise RuntimeError(f"nginx did not answer:\n{self.log()}")
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()  # fast shutdown: the test has nothing in flight any more
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def address(server: LiveServer) -> str:
    return f"127.0.0.1:{server.port}"


def upstream_of(response: requests.Response) -> str:
    """The instance that answered (the last one tried, when nginx retried)."""
    return response.headers["X-Upstream"].split(", ")[-1]


# --- a cluster of two instances ------------------------------------------------------------------


@dataclass
class Cluster:
    nginx: Nginx
    instances: list[LiveServer]

    def url(self, path: str) -> str:
        return self.nginx.url(path)

    @property
    def addresses(self) -> list[str]:
        return [address(server) for server in self.instances]

    def steer(self, session: requests.Session, to: str) -> None:
        """Make the session's next request land on instance `to`: round robin sends each request
        to the instance after the one the last request went to."""
        if upstream_of(session.get(self.url("/healthz"))) == to:
            session.get(self.url("/healthz"))


@pytest.fixture(scope="module")
def seeded(database_url: str, redis_url: str) -> Config:
    """Products 1..100 as seeded and an empty Redis, once for this module: each test below uses
    products of its own."""
    config = Config(database_url=database_url, redis_url=redis_url)
    seed(config, PRODUCTS, reset=True)
    redis_lib.Redis.from_url(redis_url).flushdb()
    return config


def _start_all(servers: Sequence[LiveServer]) -> None:
    with ThreadPoolExecutor(len(servers)) as pool:
        list(pool.map(LiveServer.start, servers))


def _stop_all(servers: Sequence[LiveServer]) -> None:
    """Stop them side by side: each takes a second or two to let its workers finish."""
    with ThreadPoolExecutor(len(servers)) as pool:
        list(pool.map(LiveServer.stop, servers))


@pytest.fixture(scope="module")
def cluster(seeded: Config, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two instances (two gunicorn masters, two gevent workers each) behind nginx."""
    directory = tmp_path_factory.mktemp("instances")
    env = {"DATABASE_URL": seeded.database_url, "REDIS_URL": seeded.redis_url}
    instances = [LiveServer(env, directory / f"instance-{n}.log") for n in (1, 2)]
    nginx = Nginx(directory / "nginx", [address(server) for server in instances])
    try:
        _start_all(instances)
        yield Cluster(nginx.start(), instances)
    finally:
        nginx.stop()
        _stop_all(instances)


def post(
    url: str, body: dict[str, int], *, key: str = "", session: requests.Session | None = None
) -> requests.Response:
    """POST update-stock; on a connection of its own unless `session` is given."""
    headers = {"Idempotency-Key": key} if key else {}
    if session is None:
        headers["Connection"] = "close"
    return (session or requests).post(url, json=body, headers=headers, timeout=30)


def views(cluster: Cluster, session: requests.Session, product_id: int) -> set[tuple[str, int]]:
    """(instance, stock) as the product endpoint, the stock endpoint and the list page (limit 10)
    show it, each asked of both instances."""
    page = (product_id - 1) // 10 + 1
    seen = set()
    for instance in cluster.addresses:
        for path in (
            f"/api/products/{product_id}",
            f"/api/products/{product_id}/stock",
            f"/api/products?page={page}&limit=10",
        ):
            cluster.steer(session, instance)
            response = session.get(cluster.url(path))
            assert response.status_code == 200 and upstream_of(response) == instance
            body = response.json()
            if "items" in body:
                body = next(item for item in body["items"] if item["id"] == product_id)
            seen.add((instance, body["stock"]))
    return seen


# --- the config ----------------------------------------------------------------------------------


def test_the_deploy_config_passes_nginx_t(tmp_path):
    """The shipped file under this nginx, changed only as the tests run it (nginx_config)."""
    result = Nginx(tmp_path, ["127.0.0.1:1", "127.0.0.1:2"]).check()
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


@live
def test_nginx_own_errors_are_the_apis_json_errors(tmp_path):
    """No instance answering, a body too large, a request line too long: nginx answers in the
    API's error shape, with the request id, never an HTML page."""
    nginx = Nginx(tmp_path, [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]).start()
    try:
        down = requests.get(nginx.url("/api/products/1"), headers={"X-Request-ID": "req-1"})
        too_large = requests.post(
            nginx.url("/api/products/1/update-stock"),
            data=b"x" * (100 * 1024),
            headers={"Content-Type": "application/json"},
        )
        too_long = requests.get(nginx.url("/api/products/" + "1" * 9000))
        health = requests.get(nginx.url("/nginx-health"))
    finally:
        nginx.stop()
    assert (down.status_code, down.json()["error"]) == (503, "unavailable")
    assert down.headers["Retry-After"] == "1" and down.headers["X-Request-ID"] == "req-1"
    assert (too_large.status_code, too_large.json()["error"]) == (413, "payload_too_large")
    assert (too_long.status_code, too_long.json()["error"]) == (400, "bad_request")
    for response in (down, too_large, too_long):
        assert response.headers["Content-Type"] == "application/json"
        assert set(response.json()) == {"error", "message"}
    assert health.json() == {"status": "ok"}


def test_nginx_is_installed_without_starting_its_service(tmp_path):
    """scripts/test's fs_ensure_nginx on a machine without nginx: Debian's package would start an
    nginx on port 80, so apt-get runs with a policy-rc.d refusing service starts, removed after."""
    done = install_with_fake_apt(tmp_path, "fs_install_without_starting nginx nginx nginx", "nginx")
    result, lines, policy = done.result, done.lines, done.policy
    assert result.returncode == 0, result.stdout + result.stderr
    install = done.install
    assert "--no-install-recommends" in install and install.endswith(" nginx"), install
    assert "policy-rc.d: 101" in lines, lines
    assert not policy.exists(), "the policy-rc.d of the install was left behind"


# --- routing -------------------------------------------------------------------------------------


@live
def test_requests_alternate_between_the_instances(cluster):
    with requests.Session() as s:
        answered = [
            upstream_of(s.get(cluster.url(path)))
            for path in ["/api/products/1", "/api/products/2/stock", "/api/products", "/healthz"]
            * 5
        ]
    assert set(answered) == set(cluster.addresses)
    assert all(a != b for a, b in itertools.pairwise(answered)), answered


@live
def test_request_ids_reach_the_instance_and_nginx_logs_the_same(cluster):
    with requests.Session() as s:
        given = s.get(cluster.url("/api/products/3"), headers={"X-Request-ID": "order-7-attempt-2"})
        made = s.get(cluster.url("/api/products/3"))
    assert given.headers["X-Request-ID"] == "order-7-attempt-2"
    request_id = made.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id), request_id
    # The instance answered with the id nginx made and logged, not one of its own.
    assert poll(lambda: f'"request_id":"{request_id}"' in cluster.nginx.log(), within=5)


@live
def test_a_post_an_instance_may_have_received_is_never_sent_to_another(cluster, sql, tmp_path):
    """One upstream reads each request whole and hangs up without answering (an instance dying
    with the request in hand). A GET it swallowed is retried on the live instance; a POST is
    not, since it may have committed: its client gets a 503, and the change is applied at most
    once."""
    sql("UPDATE products SET stock = 100 WHERE id = 71")
    with Swallower() as dying:
        nginx = Nginx(tmp_path, [f"127.0.0.1:{dying.port}", address(cluster.instances[0])])
        nginx.start()
        try:
            with requests.Session() as s:
                url = nginx.url("/api/products/71/update-stock")
                posts = [post(url, {"delta": -1}, session=s) for _ in range(4)]
                gets = [s.get(nginx.url("/api/products/71/stock")) for _ in range(4)]
        finally:
            nginx.stop()
    failed = [r for r in posts if r.status_code == 503]
    applied = [r for r in posts if r.status_code == 200]
    assert failed and applied and len(failed) + len(applied) == len(posts)
    assert all(r.json()["error"] == "unavailable" and r.headers["Retry-After"] for r in failed)
    assert dying.methods.count("POST") == len(failed)
    assert sql("SELECT stock FROM products WHERE id = 71") == [(100 - len(applied),)]
    assert "GET" in dying.methods, "no GET reached the dying upstream: nothing was retried"
    assert {r.status_code for r in gets} == {200}
    assert {r.json()["stock"] for r in gets} == {100 - len(applied)}


@live
def test_a_request_no_instance_received_is_retried_whatever_its_method(cluster, sql, tmp_path):
    """A refused connection means the request went nowhere: a POST is safe to send on."""
    sql("UPDATE products SET stock = 100 WHERE id = 72")
    nginx = Nginx(tmp_path, [f"127.0.0.1:{free_port()}", address(cluster.instances[1])]).start()
    try:
        with requests.Session() as s:
            url = nginx.url("/api/products/72/update-stock")
            statuses = [post(url, {"delta": -1}, session=s).status_code for _ in range(4)]
    finally:
        nginx.stop()
    assert statuses == [200] * 4
    assert sql("SELECT stock FROM products WHERE id = 72") == [(96,)]


class Swallower(socketserver.ThreadingTCPServer):
    """An upstream that reads each request whole, notes its method, and closes the connection
    without a word."""

    daemon_threads = True

    def __init__(self) -> None:
        self.methods: list[str] = []
        super().__init__(("127.0.0.1", 0), _Swallow)
        self.port = self.server_address[1]

    def __enter__(self) -> Swallower:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


class _Swallow(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        request_line = self.rfile.readline()
        length = 0
        while (header := self.rfile.readline()) not in (b"\r\n", b""):
            name, _, value = header.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        self.rfile.read(length)
        if request_line:
            self.server.methods.append(request_line.split()[0].decode())


# --- the guarantees, across instances ------------------------------------------------------------


@live
def test_concurrent_buyers_on_both_instances_never_oversell(cluster, sql):
    sql("UPDATE products SET stock = 60 WHERE id = 9")
    url = cluster.url("/api/products/9/update-stock")
    responses = fire([lambda: post(url, {"delta": -1})] * 150)
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 60 and statuses.count(409) == 90, sorted(set(statuses))
    sold = sorted(r.json()["stock"] for r in responses if r.status_code == 200)
    assert sold == list(range(60))  # each item sold once
    assert {upstream_of(r) for r in responses if r.status_code == 200} == set(cluster.addresses)
    assert sql("SELECT stock FROM products WHERE id = 9") == [(0,)]
    with requests.Session() as s:
        assert {stock for _, stock in views(cluster, s, 9)} == {0}


@live
def test_a_retried_key_applies_once_whichever_instances_get_it(cluster, sql):
    sql("UPDATE products SET stock = 500 WHERE id = 11")
    url = cluster.url("/api/products/11/update-stock")
    responses = fire([lambda: post(url, {"delta": -7}, key="checkout-11")] * 30)
    assert {r.status_code for r in responses} == {200}
    assert {r.content for r in responses} == {b'{"id":11,"stock":493}'}
    assert [r.headers.get("Idempotent-Replayed") for r in responses].count("true") == 29
    assert {upstream_of(r) for r in responses} == set(cluster.addresses)
    with requests.Session() as s:
        for instance in cluster.addresses:  # a late retry, on each instance: the stored answer
            cluster.steer(s, instance)
            late = post(url, {"delta": -7}, key="checkout-11", session=s)
            assert upstream_of(late) == instance
            assert late.content == b'{"id":11,"stock":493}'
            assert late.headers["Idempotent-Replayed"] == "true"
            cluster.steer(s, instance)
            reused = post(url, {"delta": -8}, key="checkout-11", session=s)
            assert (reused.status_code, reused.json()["error"]) == (422, "idempotency_key_reused")
        assert sql("SELECT stock FROM products WHERE id = 11") == [(493,)]  # applied once
        assert {stock for _, stock in views(cluster, s, 11)} == {493}


@live
def test_a_write_is_read_at_once_on_the_other_instance(cluster):
    """Write through one instance, read right after through the other, on every endpoint, in
    both directions: never the old value (both near caches are warm from the rounds before)."""
    first, second = cluster.addresses
    paths = ["/api/products/21", "/api/products/21/stock", "/api/products?page=3&limit=10"]
    with requests.Session() as s:
        for n in range(60):
            writer = first if n % 2 else second
            cluster.steer(s, writer)
            write = post(
                cluster.url("/api/products/21/update-stock"), {"stock": 2100 + n}, session=s
            )
            assert (write.status_code, upstream_of(write)) == (200, writer)
            read = s.get(cluster.url(paths[n % 3]))
            assert upstream_of(read) != writer
            body = read.json()
            if "items" in body:
                body = next(item for item in body["items"] if item["id"] == 21)
            assert body["stock"] == 2100 + n, (n, paths[n % 3], read.headers["X-Cache"])


@live
def test_lists_are_never_staler_than_products_across_instances(cluster):
    """Ten clients, each the only writer of one product of page 4, write and then read that page
    and the product, all at once and through both instances: each sees its own last write."""
    rounds, crossed = 15, []

    def client(product_id: int) -> None:
        with requests.Session() as s:
            for _ in range(rounds):
                write = post(
                    cluster.url(f"/api/products/{product_id}/update-stock"), {"delta": 1}, session=s
                )
                assert write.status_code == 200, write.text
                stock = write.json()["stock"]
                listed = s.get(cluster.url("/api/products?page=4&limit=10"))
                item = next(i for i in listed.json()["items"] if i["id"] == product_id)
                product = s.get(cluster.url(f"/api/products/{product_id}"))
                assert item["stock"] == stock == product.json()["stock"], product_id
                crossed.append(upstream_of(write) != upstream_of(listed))

    with ThreadPoolExecutor(10) as pool:
        list(pool.map(client, range(31, 41)))
    assert len(crossed) == 10 * rounds and any(crossed)


@live
def test_cache_equals_database_after_a_storm_on_both_instances(cluster, sql, redis_url):
    ids = list(range(41, 61))
    sql("UPDATE products SET stock = 10000 WHERE id BETWEEN 41 AND 60")

    def client(seed_: int) -> list[int]:
        rng = random.Random(seed_)
        statuses = []
        with requests.Session() as s:
            for _ in range(25):
                pid, roll = rng.choice(ids), rng.random()
                if roll < 0.25:
                    r = s.get(cluster.url(f"/api/products/{pid}"))
                elif roll < 0.4:
                    r = s.get(cluster.url(f"/api/products/{pid}/stock"))
                elif roll < 0.55:
                    r = s.get(cluster.url(f"/api/products?page={rng.randint(5, 6)}&limit=10"))
                elif roll < 0.9:
                    r = post(
                        cluster.url(f"/api/products/{pid}/update-stock"),
                        {"delta": rng.randint(-5, 5)},
                        session=s,
                    )
                else:
                    r = post(
                        cluster.url(f"/api/products/{pid}/update-stock"),
                        {"stock": rng.randint(0, 20000)},
                        session=s,
                    )
                statuses.append(r.status_code)
        return statuses

    with ThreadPoolExecutor(16) as pool:
        statuses = [status for result in pool.map(client, range(16)) for status in result]
    assert set(statuses) <= {200, 409}, sorted(set(statuses))
    truth = {
        pid: (stock, version)
        for pid, stock, version in sql(
            "SELECT id, stock, version FROM products WHERE id BETWEEN 41 AND 60"
        )
    }
    cache = redis_lib.Redis.from_url(redis_url)
    with requests.Session() as s:
        for pid in ids:
            assert views(cluster, s, pid) == {(a, truth[pid][0]) for a in cluster.addresses}, pid
            raw = cache.get(product_key(pid))
            assert raw is not None, f"product {pid} was read yet is not in Redis"
            version, stock, _ = decode_entry(raw)
            assert (stock, version) == truth[pid], pid


def near_hits(server: LiveServer) -> float:
    """Product reads an instance answered from a near cache, all its workers together."""
    text = get(server, "/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "faststock_near_cache_requests_total"
        and sample.labels == {"endpoint": "product", "result": "hit"}
    )


@live
def test_a_write_on_one_instance_empties_the_other_instances_near_cache_at_once(cluster):
    """Both instances answer the product from their near caches (their metrics say so); a write
    through one, then a read through the other: the new stock, at once."""
    path = "/api/products/61"
    with requests.Session() as s:
        for n in range(4):
            before = {server.port: near_hits(server) for server in cluster.instances}

            def both_warm(before: dict[int, float] = before) -> bool:
                assert s.get(cluster.url(path)).status_code == 200
                return all(near_hits(server) > before[server.port] for server in cluster.instances)

            assert poll(both_warm, within=10), "the near caches never answered"
            writer = cluster.addresses[n % 2]
            cluster.steer(s, writer)
            write = post(
                cluster.url("/api/products/61/update-stock"), {"stock": 6100 + n}, session=s
            )
            assert (write.status_code, upstream_of(write)) == (200, writer)
            read = s.get(cluster.url(path))
            assert upstream_of(read) != writer
            assert read.json()["stock"] == 6100 + n


# --- bounds across hosts: an instance cut off from Redis ----------------------------------------


class Link:
    """A TCP relay to Redis that can be cut: while cut, bytes are held rather than delivered and
    no connection is closed, as in a network partition (no reset, no FIN: only silence)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open = threading.Event()
        self.open.set()
        self.closed = False
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.target)
            except OSError:
                return
            self.sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self.open.wait()
                if self.closed:
                    return
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            return

    def cut(self) -> None:
        self.open.clear()

    def restore(self) -> None:
        self.open.set()

    def close(self) -> None:
        self.closed = True
        self.open.set()
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the pumps, and tells the instance
            sock.close()


@dataclass
class Partitioned:
    whole: LiveServer  # reaches Redis directly: one of the cluster's instances
    cut_off: LiveServer  # reaches Redis through the link
    link: Link


@pytest.fixture(scope="module")
def partitioned(
    cluster: Cluster, seeded: Config, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Partitioned]:
    redis = urlsplit(seeded.redis_url)
    link = Link((redis.hostname or "127.0.0.1", redis.port or 6379))
    userinfo = redis.netloc.rsplit("@", 1)[0] + "@" if "@" in redis.netloc else ""
    linked_url = urlunsplit(redis._replace(netloc=f"{userinfo}127.0.0.1:{link.port}"))
    env = {"DATABASE_URL": seeded.database_url, "REDIS_URL": linked_url, "REDIS_TIMEOUT_MS": "100"}
    cut_off = LiveServer(env, tmp_path_factory.mktemp("partitioned") / "cut-off.log")
    try:
        yield Partitioned(cluster.instances[0], cut_off.start(), link)
    finally:
        link.close()
        cut_off.stop()


def last_stale_read(
    server: LiveServer, product_id: int, stock: int, since: float, watch: float
) -> float | None:
    """Read the product on fresh connections (so on every worker) for `watch` seconds after
    `since`; how long after `since` the last read that answered an older stock began, or None.
    (When it began: a read that starts after the bound must be current, however long it takes.)
    """
    last = None
    while (started := time.monotonic()) - since < watch:
        response = get(server, f"/api/products/{product_id}")
        assert response.status_code == 200, response.text
        if response.json()["stock"] != stock:
            last = started - since
    return last


@live
def test_an_instance_cut_off_from_redis_stops_trusting_its_near_cache_within_the_bound(partitioned):
    """The other instance's write reaches Redis and is announced, but the cut-off instance
    cannot hear it. Its near cache stands aside once its subscription has been silent for
    HEARTBEAT_SECONDS (the keeper pings it every SWEEP_SECONDS): until then it may answer the
    old stock, after that never."""
    first_hit_per_worker(partitioned.cut_off, "/api/products/81")
    partitioned.link.cut()
    try:
        cut = time.monotonic()
        write = post_stock(partitioned.whole, 81, stock=8181)
        assert write.status_code == 200, write.text
        bound = HEARTBEAT_SECONDS + SWEEP_SECONDS
        last = last_stale_read(partitioned.cut_off, 81, 8181, since=cut, watch=bound + 1.0)
    finally:
        partitioned.link.restore()
    assert last is None or last < bound, f"old stock {last:.2f} s after the cut"


@live
def test_a_write_on_an_instance_cut_off_from_redis_reaches_the_others_within_a_sweep(partitioned):
    """The write commits but cannot reach Redis, which keeps serving the old entry to the other
    instance (the cut-off one's "Redis may be stale" flag is its own memory). The other
    instance's keepers find the change's outbox record on their next sweep, write the row into
    Redis and drop their own copies: within SWEEP_SECONDS and a pass."""
    first_hit_per_worker(partitioned.whole, "/api/products/82")
    partitioned.link.cut()
    try:
        write = post_stock(partitioned.cut_off, 82, stock=8282)
        answered = time.monotonic()
        assert write.status_code == 200, write.text
        bound = SWEEP_SECONDS + 0.1 + 1.0  # a sweep, a Redis timeout, a margin for load
        last = last_stale_read(partitioned.whole, 82, 8282, since=answered, watch=bound + 1.0)
    finally:
        partitioned.link.restore()
    assert last is None or last < bound, f"old stock {last:.2f} s after the write answered"
    assert "a committed change missed Redis" in partitioned.cut_off.log()  # the operator hears
