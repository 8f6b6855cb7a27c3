"""deploy/k8s/: valid Kubernetes manifests that agree with each other and with the code they run.

No cluster is available where these run. kubernetes-validate checks every manifest against the
Kubernetes JSON schemas it ships (strict: an unknown or misspelt field fails), with no network;
the rest are checks of our own that a schema cannot make (probes on the right paths and port,
selectors that match, the connection budget), and one live run of gunicorn under the pod's
constraints: a read-only root filesystem with only /tmp writable, and no capabilities.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import requests
import yaml

from faststock.config import Config
from tests import servers
from tests.servers import get, poll, post_stock

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
# Applied on their own, not through kustomization.yaml (each file says why).
APPLIED_APART = frozenset({"secret.example.yaml", "init-db-job.yaml"})
# The oldest Kubernetes the manifests are for (preStop's `sleep` action is on by default from 1.30)
# and the newest whose schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
# PostgreSQL's default max_connections, less its superuser_reserved_connections (3) and room for
# the init-db Job, the pods' short pg_terminate_backend connections and an operator's psql.
POSTGRES_CONNECTIONS_FOR_PODS = 100 - 3 - 5


# --- helpers -------------------------------------------------------------------------------------


@cache
def _documents() -> tuple[tuple[str, dict[str, Any]], ...]:
    """(file name, document) for every document of every manifest, kustomization.yaml aside."""
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                found.append((path.name, document))
    return tuple(found)


def _one(kind: str, component: str | None = None) -> dict[str, Any]:
    """The one manifest of `kind` (of that app.kubernetes.io/component, if given), as a copy."""
    matches = [
        doc
        for _, doc in _documents()
        if doc["kind"] == kind
        and (
            component is None
            or doc["metadata"]["labels"].get("app.kubernetes.io/component") == component
        )
    ]
    assert len(matches) == 1, f"expected one {kind} in deploy/k8s/, found {len(matches)}"
    return copy.deepcopy(matches[0])


def _deployment() -> dict[str, Any]:
    return _one("Deployment")


def _pod_spec() -> dict[str, Any]:
    return _deployment()["spec"]["template"]["spec"]


def _container() -> dict[str, Any]:
    containers = _pod_spec()["containers"]
    assert len(containers) == 1, [c["name"] for c in containers]
    return containers[0]


def _config_map() -> dict[str, str]:
    return _one("ConfigMap")["data"]


def _http_port() -> dict[str, Any]:
    ports = {p["name"]: p for p in _container()["ports"]}
    assert "http" in ports, ports
    return ports["http"]


def _env_names(container: dict[str, Any]) -> set[str]:
    """Every variable the container gets: its `env`, and the keys of what `envFrom` loads."""
    names = {item["name"] for item in container.get("env", [])}
    for source in container.get("envFrom", []):
        assert "prefix" not in source, source
        if "configMapRef" in source:
            assert source["configMapRef"]["name"] == _one("ConfigMap")["metadata"]["name"]
            names |= set(_config_map())
        else:
            assert source["secretRef"]["name"] == _one("Secret")["metadata"]["name"]
            names |= set(_one("Secret")["stringData"])
    return names


def _cores(quantity: str | int) -> Decimal:
    """A Kubernetes CPU quantity ("2", "1.5", "500m") in cores."""
    text = str(quantity)
    return Decimal(text[:-1]) / 1000 if text.endswith("m") else Decimal(text)


def _gunicorn_setting(name: str) -> int:
    found = re.search(rf"^{name} = (\d+)", (ROOT / "gunicorn.conf.py").read_text(), re.M)
    assert found, f"gunicorn.conf.py sets no {name}"
    return int(found.group(1))


def _dockerfile_user() -> str:
    users = re.findall(r"^USER\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert users, "the Dockerfile sets no USER"
    return users[-1]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --- the schemas ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(version: str) -> None:
    """Strict: besides types and required fields, any field Kubernetes does not know fails.
    A kind without a schema fails too, where the command line would only warn."""
    kinds = set()
    for name, document in _documents():
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(map(str, exc.path))
            pytest.fail(f"{name}: {document['kind']} at {path}: {exc.message}")
        kinds.add(document["kind"])
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ConfigMap",
    } <= kinds


@pytest.mark.parametrize(
    "where, change",
    [
        ("a misspelt field", lambda c: c["ports"][0].update(containerport=8000)),
        ("a port that is not a number", lambda c: c["ports"][0].update(containerPort="eight")),
        ("a container without a name", lambda c: c.pop("name")),
    ],
)
def test_validator_rejects_a_broken_deployment(where: str, change: Any) -> None:
    """The checks above can fail: the same validator refuses each of these faults."""
    deployment = _deployment()
    change(deployment["spec"]["template"]["spec"]["containers"][0])
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_validator_needs_no_network() -> None:
    """kubernetes-validate's command line checks deploy/k8s/ inside a network namespace with no
    interface but a down loopback: its schemas are files in the wheel, nothing is fetched."""
    unshare = shutil.which("unshare")
    if sys.platform != "linux" or unshare is None:
        pytest.skip("needs Linux network namespaces (unshare)")
    if subprocess.run([unshare, "--net", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare --net is not permitted here (needs root)")
    validate = str(Path(sys.executable).parent / "kubernetes-validate")
    manifests = sorted(str(p) for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    result = subprocess.run(
        [unshare, "--net", validate, "--strict", "--quiet", *manifests],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARN" not in result.stdout and "ERROR" not in result.stdout, result.stdout


# --- checks of our own ---------------------------------------------------------------------------


def test_container_port_is_the_port_the_app_binds() -> None:
    port = _http_port()
    assert port["containerPort"] == int(_config_map()["PORT"])
    assert _config_map()["HOST"] == "0.0.0.0", (
        "on loopback the kubelet and the Service cannot reach it"
    )


def test_probes_point_at_readyz_and_healthz_on_the_container_port() -> None:
    """Readiness asks /readyz (PostgreSQL answers); liveness and startup only /healthz, which
    touches neither PostgreSQL nor Redis, so an outage of either never restarts the pods."""
    container = _container()
    expected = {
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
        "startupProbe": "/healthz",
    }
    for probe, path in expected.items():
        get_ = container[probe]["httpGet"]
        assert get_["path"] == path, (probe, get_)
        assert get_["port"] in ("http", _http_port()["containerPort"]), (probe, get_)
        assert get_.get("scheme", "HTTP") == "HTTP", (probe, get_)


def test_termination_grace_covers_prestop_and_graceful_timeout() -> None:
    """SIGTERM comes after preStop, and gunicorn then drains for up to graceful_timeout: the
    kubelet must not send SIGKILL before both are over."""
    pod = _pod_spec()
    pre_stop = _container()["lifecycle"]["preStop"]
    assert "sleep" in pre_stop, pre_stop
    drained = pre_stop["sleep"]["seconds"] + _gunicorn_setting("graceful_timeout")
    assert pod["terminationGracePeriodSeconds"] > drained, (
        pod["terminationGracePeriodSeconds"],
        drained,
    )
    assert pre_stop["sleep"]["seconds"] >= 2, "too short for endpoints to be removed"


def test_every_env_var_the_pods_get_is_a_config_field() -> None:
    """Nothing the app would ignore (a typo is a setting silently lost), and the values parse:
    faststock.config.Config accepts the ConfigMap with the example Secret's URLs."""
    known = set(Config().env_names)
    for container in (
        _pod_spec()["containers"] + _one("Job")["spec"]["template"]["spec"]["containers"]
    ):
        unknown = _env_names(container) - known
        assert not unknown, f"{container['name']} sets variables Config does not read: {unknown}"
    secret = _one("Secret")["stringData"]
    assert set(secret) <= known
    Config.from_env({**_config_map(), **secret})


def test_secret_refs_name_keys_of_the_example_secret() -> None:
    secret = _one("Secret")
    for container in (
        _pod_spec()["containers"] + _one("Job")["spec"]["template"]["spec"]["containers"]
    ):
        refs = [
            item["valueFrom"]["secretKeyRef"]
            for item in container.get("env", [])
            if "valueFrom" in item
        ]
        assert refs, container["name"]
        for ref in refs:
            assert ref["name"] == secret["metadata"]["name"], ref
            assert ref["key"] in secret["stringData"], ref
    assert {"DATABASE_URL", "REDIS_URL"} <= _env_names(_container())


def test_web_concurrency_matches_the_cpu_request() -> None:
    """One gevent worker per core: a worker saturates one core (docs/performance.md), so fewer
    leaves CPU idle and more only adds switching. Requests = limits: Guaranteed QoS."""
    resources = _container()["resources"]
    assert resources["requests"] == resources["limits"], resources
    cpu = _cores(resources["requests"]["cpu"])
    assert cpu == int(cpu), f"whole cores only, got {cpu}"
    assert int(_config_map()["WEB_CONCURRENCY"]) == cpu


def test_connection_budget_fits_postgres_max_connections() -> None:
    """Every pod the HPA may run, the rollout's surge and one pod still draining its requests
    each hold up to WEB_CONCURRENCY x DB_POOL_SIZE connections (docs/scaling.md)."""
    per_pod = int(_config_map()["WEB_CONCURRENCY"]) * int(_config_map()["DB_POOL_SIZE"])
    surge = _deployment()["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
    assert isinstance(surge, int), "a percentage surge makes the budget depend on the count"
    pods = _one("HorizontalPodAutoscaler")["spec"]["maxReplicas"] + surge + 1
    assert pods * per_pod <= POSTGRES_CONNECTIONS_FOR_PODS, (pods, per_pod)


def test_hpa_targets_the_deployment_on_cpu_and_owns_the_replica_count() -> None:
    hpa = _one("HorizontalPodAutoscaler")
    deployment = _deployment()
    target = hpa["spec"]["scaleTargetRef"]
    assert target == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu", metric
    assert metric["resource"]["target"]["type"] == "Utilization", metric
    assert 0 < metric["resource"]["target"]["averageUtilization"] < 100, metric
    assert "replicas" not in deployment["spec"], "kubectl apply would reset what the HPA chose"
    assert hpa["spec"]["minReplicas"] >= 2, "one pod alone cannot be drained without an outage"


def test_pdb_selects_the_deployments_pods_and_leaves_one_serving() -> None:
    pdb = _one("PodDisruptionBudget")
    labels = _deployment()["spec"]["template"]["metadata"]["labels"]
    assert _selects(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable") == 1, pdb[
        "spec"
    ]
    assert (
        pdb["spec"].get("maxUnavailable", 1)
        < _one("HorizontalPodAutoscaler")["spec"]["minReplicas"]
    )


def test_deployment_selector_matches_its_pod_template() -> None:
    deployment = _deployment()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _selects(deployment["spec"]["selector"]["matchLabels"], labels)


def test_service_selects_the_pods_and_targets_the_named_port() -> None:
    service = _one("Service")
    labels = _deployment()["spec"]["template"]["metadata"]["labels"]
    assert _selects(service["spec"]["selector"], labels)
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == _http_port()["name"], port
    # Nothing else in deploy/k8s/ is selected by mistake: the init-db Job's pods are not.
    job_labels = _one("Job")["spec"]["template"]["metadata"]["labels"]
    assert not _selects(service["spec"]["selector"], job_labels)
    assert not _selects(_one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"], job_labels)


def test_pods_run_the_images_gunicorn() -> None:
    """No command or args: the image's CMD (gunicorn -c gunicorn.conf.py faststock.wsgi:app,
    checked in tests/test_docker.py) runs, so the two cannot drift apart."""
    container = _container()
    assert "command" not in container and "args" not in container, container
    cmd = re.findall(r"^CMD\s+(.+)$", (ROOT / "Dockerfile").read_text(), re.M)[-1]
    assert cmd.startswith('["gunicorn", "-c", "gunicorn.conf.py"'), cmd


def test_pods_run_locked_down_as_the_images_user() -> None:
    uid = int(_dockerfile_user().split(":")[0])
    for name in ("Deployment", "Job"):
        pod = _one(name)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == uid, name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["enableServiceLinks"] is False, (
            "service links add variables Config does not know"
        )
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert "add" not in context["capabilities"], name


def test_tmp_is_the_one_writable_directory() -> None:
    """gunicorn's worker heartbeat files and the Prometheus multiprocess directory go to /tmp
    (gunicorn.conf.py, tempfile.mkdtemp); the live test below shows nothing else is written."""
    mounts = {m["mountPath"]: m["name"] for m in _container()["volumeMounts"]}
    assert set(mounts) == {"/tmp"}, mounts
    volumes = {v["name"]: v for v in _pod_spec()["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], volumes
    assert "PROMETHEUS_MULTIPROC_DIR" not in _env_names(_container()), "gunicorn.conf.py makes one"


def test_prometheus_annotations_name_the_metrics_port_and_path() -> None:
    annotations = _deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == _http_port()["containerPort"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert _config_map().get("METRICS", "1") == "1", "METRICS=0 removes /metrics"


def test_kustomization_lists_every_manifest_but_those_applied_apart() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk - APPLIED_APART, (listed, on_disk)
    assert on_disk >= APPLIED_APART
    images = {image["name"] for image in kustomization["images"]}
    assert images == {c["image"].split(":")[0] for c in _pod_spec()["containers"]}, images


# --- the pod's filesystem, live ------------------------------------------------------------------

# As the pod runs: a private mount namespace where / is read-only and /tmp a fresh tmpfs (the
# emptyDir), and no capabilities (root without CAP_DAC_OVERRIDE or CAP_SYS_ADMIN cannot undo it).
POD_FILESYSTEM = [
    "unshare",
    "--mount",
    "--propagation",
    "private",
    "sh",
    "-c",
    "mount -t tmpfs -o size=64m,mode=1777 tmpfs /tmp && mount -o remount,ro,bind / && "
    'exec setpriv --inh-caps=-all --bounding-set=-all --no-new-privs "$@"',
    "sh",
]


def _pod_filesystem_available() -> None:
    if sys.platform != "linux" or not (shutil.which("unshare") and shutil.which("setpriv")):
        pytest.skip("needs Linux mount namespaces (unshare, setpriv)")
    here = Path(__file__).resolve()
    if Path("/tmp") in here.parents:
        pytest.skip("this checkout is under /tmp, which the pod's fresh tmpfs on /tmp would hide")
    probe = subprocess.run([*POD_FILESYSTEM, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a private read-only mount namespace here: {probe.stderr}")


def test_app_serves_with_a_read_only_root_and_only_tmp_writable(
    live_server, fresh: Config, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The init-db Job's command and the pod's gunicorn (two workers, the ConfigMap's settings)
    with only /tmp writable: the schema is created, reads, a write and /metrics across both
    workers answer, and SIGTERM stops it cleanly."""
    _pod_filesystem_available()
    job = _one("Job")["spec"]["template"]["spec"]["containers"][0]
    env = {**_config_map(), "DATABASE_URL": fresh.database_url, "REDIS_URL": fresh.redis_url}
    env.pop("HOST")  # loopback here; PORT comes from the fixture's free port
    env.pop("PORT")
    bin_dir = Path(sys.executable).parent
    init = subprocess.run(
        [*POD_FILESYSTEM, str(bin_dir / job["command"][0]), *job["command"][1:]],
        cwd=ROOT,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "TMPDIR": "/tmp", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert init.returncode == 0, init.stdout + init.stderr

    monkeypatch.setattr(servers, "GUNICORN", [*POD_FILESYSTEM, *servers.GUNICORN])
    server = live_server(**env, TMPDIR="/tmp")
    assert len(server.workers) == int(env["WEB_CONCURRENCY"])
    assert get(server, "/readyz").status_code == 200
    assert post_stock(server, 7, stock=41).json() == {"id": 7, "stock": 41}

    reads = 40
    for _ in range(reads):
        assert get(server, "/api/products/7/stock").json() == {"id": 7, "stock": 41}

    def scrape() -> str:
        return requests.get(server.url("/metrics"), timeout=5).text

    def counted() -> int:
        found = re.findall(
            r'^faststock_cache_requests_total\{endpoint="stock",.*\} (\S+)$', scrape(), re.M
        )
        return int(sum(float(n) for n in found))

    def sampled_pids() -> set[int]:
        return {
            int(p)
            for p in re.findall(r'^faststock_worker_cpu_seconds\{pid="(\d+)"', scrape(), re.M)
        }

    # Each worker writes its metric files into the multiprocess directory under /tmp, and any
    # worker's scrape reads them all: every read counted, and both workers' own samples.
    assert poll(lambda: counted() == reads, within=10), counted()
    assert poll(lambda: sampled_pids() == set(server.workers), within=10), (
        sampled_pids(),
        server.workers,
    )
    assert server.stop() == 0, server.log()
    assert "Read-only file system" not in server.log(), server.log()


def test_the_example_deployment_can_authorise_a_write() -> None:
    """Anonymous writes are off by default: without API_KEYS from the Secret, every stock change
    of the example deployment would be refused, whatever key a client sent."""
    config = Config.from_env({**_config_map(), **_one("Secret")["stringData"]})
    assert not config.allow_anonymous_writes
    assert [name for name, _ in config.read_api_keys()] == ["shop-1"]
    refs = {
        item["name"]: item["valueFrom"]["secretKeyRef"]
        for item in _container().get("env", [])
        if "valueFrom" in item
    }
    assert refs["API_KEYS"]["key"] == "API_KEYS"
