"""The Kubernetes manifests (``deploy/kubernetes/``) and the image (``Dockerfile``): every resource
validates against the Kubernetes API schema (kubernetes-validate, strict: unknown fields are
errors), and what they say agrees with the code: the image's tag is the package version, every
``FERRYMAN_*`` variable is a setting the container's role reads and its value parses, probes
and Services point at the ports the settings make the process listen on, every container is
non-root (uid 10001 for Ferryman's), read-only, capability-free and has requests and limits,
SIGTERM drains fit in the grace period, and every Secret a pod reads is in the example.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

from dataplane.basics import settings as settings_mod  # noqa: E402
from dataplane.basics.hostport import parse_hostport  # noqa: E402
from dataplane.basics.version import VERSION  # noqa: E402

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30.0"  # the oldest API the manifests promise to fit (sidecar-free, preStop sleep)
FERRYMAN_UID = 10001
ROLE_OF = {"control": "control", "edge": "edge", "connector": "connector"}  # container name -> settings role


def _documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path.name, doc))
    return out


DOCUMENTS = _documents()


def _workloads() -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name, doc in DOCUMENTS if doc["kind"] in ("Deployment", "StatefulSet")]


def _ferryman_containers() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for every container running the Ferryman image."""
    return [(doc, c) for _, doc in _workloads() for c in doc["spec"]["template"]["spec"]["containers"]
            if c["image"].split(":")[0] == "ferryman"]


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "<from-secret>") for e in container.get("env", [])}


def test_there_is_something_to_check() -> None:
    kinds = sorted({doc["kind"] for _, doc in DOCUMENTS})
    assert kinds == ["Deployment", "Namespace", "PodDisruptionBudget", "Secret", "Service", "StatefulSet"]
    assert {c["name"] for _, c in _ferryman_containers()} == set(ROLE_OF)


@pytest.mark.parametrize("name,doc", DOCUMENTS, ids=[f"{n}:{d['kind']}/{d['metadata']['name']}" for n, d in DOCUMENTS])
def test_every_resource_validates_against_the_kubernetes_schema(name: str, doc: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_a_broken_manifest_is_refused_by_the_checker() -> None:
    """The checker is not a formality: a typo'd field and a wrong type are caught."""
    (_, deployment), *_ = [(n, d) for n, d in DOCUMENTS if d["kind"] == "Deployment"]
    typo = yaml.safe_load(yaml.safe_dump(deployment))
    typo["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSION, strict=True)
    wrong = yaml.safe_load(yaml.safe_dump(deployment))
    wrong["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eighty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_secrets_example() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    files = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml", "secrets.example.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    assert all(doc["metadata"].get("namespace", "ferryman") == "ferryman" for _, doc in DOCUMENTS)


def test_images_are_the_package_version_and_pinned() -> None:
    for workload, container in _ferryman_containers():
        assert container["image"] == f"ferryman:{VERSION.split('+')[0]}", (workload["metadata"]["name"], VERSION)
    for _, doc in _workloads():
        for container in doc["spec"]["template"]["spec"]["containers"]:
            image = container["image"]
            assert ":" in image and not image.endswith(":latest"), image


def test_ferryman_settings_are_known_to_the_role_and_parse() -> None:
    for workload, container in _ferryman_containers():
        role = ROLE_OF[container["name"]]
        cls = settings_mod.ROLES[role]
        env = {k: v for k, v in _env(container).items() if k.startswith("FERRYMAN_")}
        readers = {settings_mod.variable_name(f): settings_mod.readers(f) for f in settings_mod.VARIABLES}
        for name in env:
            assert name in readers, f"{workload['metadata']['name']}: {name} is not a Ferryman setting"
            assert role in readers[name] or readers[name] == ["all"], f"{name} is not read by the {role}"
        values = {k: ("postgresql://u:p@db/x" if v == "<from-secret>" else v) for k, v in env.items()}
        settings_mod.load(cls, environ=values)  # SettingsError on a value that does not parse


def _container_port(container: dict[str, Any], name_or_number: str | int, protocol: str = "TCP") -> int:
    for port in container.get("ports", []):
        if (port.get("name") == name_or_number or port["containerPort"] == name_or_number) \
                and port.get("protocol", "TCP") == protocol:
            return port["containerPort"]
    raise AssertionError(f"container {container['name']} has no {protocol} port {name_or_number!r}")


def test_probes_and_ports_match_what_the_process_listens_on() -> None:
    for workload, container in _ferryman_containers():
        role = ROLE_OF[container["name"]]
        env = _env(container)
        settings = settings_mod.load(settings_mod.ROLES[role], environ={
            k: v for k, v in env.items() if k.startswith("FERRYMAN_") and v != "<from-secret>"})
        if role == "control":
            probe_port = parse_hostport(settings.control_listen, "FERRYMAN_CONTROL_LISTEN")[1]
        else:
            host, probe_port = parse_hostport(settings.metrics_addr, "FERRYMAN_METRICS_ADDR")
            assert host == "0.0.0.0", "the kubelet probes the pod's address"
        for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/health")):
            get = container[probe]["httpGet"]
            assert get["path"] == path, (workload["metadata"]["name"], probe)
            assert _container_port(container, get["port"]) == probe_port, (workload["metadata"]["name"], probe)
        if role == "edge":
            listen = parse_hostport(settings.edge_listen, "FERRYMAN_EDGE_LISTEN")[1]
            assert _container_port(container, "tunnel-tls") == listen
            assert _container_port(container, "tunnel-quic", "UDP") == listen  # QUIC on the same port
            assert settings.edge_quic == "on"


def test_services_select_pods_and_reach_their_ports() -> None:
    workloads = {doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]: doc
                 for _, doc in _workloads()}
    services = [doc for _, doc in DOCUMENTS if doc["kind"] == "Service"]
    for service in services:
        target = workloads[service["spec"]["selector"]["app.kubernetes.io/name"]]
        (container, *_) = target["spec"]["template"]["spec"]["containers"]
        for port in service["spec"]["ports"]:
            _container_port(container, port["targetPort"], port.get("protocol", "TCP"))
    edge_lb = next(s for s in services if s["metadata"]["name"] == "ferryman-edge")
    assert edge_lb["spec"]["type"] == "LoadBalancer"
    assert {p["protocol"] for p in edge_lb["spec"]["ports"]} == {"TCP", "UDP"}
    for _, pdb in [(n, d) for n, d in DOCUMENTS if d["kind"] == "PodDisruptionBudget"]:
        assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] in workloads


def test_control_plane_is_highly_available_and_shares_its_keys() -> None:
    control = next(doc for _, doc in _workloads() if doc["metadata"]["name"] == "ferryman-control")
    assert control["kind"] == "Deployment" and control["spec"]["replicas"] >= 2
    (container,) = control["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["FERRYMAN_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "ferryman-database"
    key_file = env["FERRYMAN_SECRETS_KEY_FILE"]["value"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in control["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [n for n, path in mounts.items() if key_file.startswith(path + "/")]
    secret = volumes[mount]["secret"]
    assert secret["secretName"] == "ferryman-secrets-key"
    assert key_file.rsplit("/", 1)[1] in _example_secrets()["ferryman-secrets-key"]
    service = next(doc for _, doc in DOCUMENTS if doc["kind"] == "Service"
                   and doc["metadata"]["name"] == "ferryman-control")
    assert service["spec"]["sessionAffinity"] == "ClientIP"  # OIDC sign-ins in progress are per replica


def _service_names(service: dict[str, Any]) -> set[str]:
    """The DNS names a Service answers to inside the cluster."""
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    return {name, f"{name}.{namespace}", f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"}


def test_the_control_plane_serves_https_for_its_service_names_and_nodes_use_it() -> None:
    from urllib.parse import urlsplit

    control = next(doc for _, doc in _workloads() if doc["metadata"]["name"] == "ferryman-control")
    (container,) = control["spec"]["template"]["spec"]["containers"]
    env = _env(container)
    assert "FERRYMAN_CONTROL_INSECURE_HTTP" not in env
    settings = settings_mod.load(settings_mod.ControlSettings, environ={
        k: v for k, v in env.items() if k.startswith("FERRYMAN_") and v != "<from-secret>"})
    hosts = {host.strip() for host in settings.control_hosts.split(",")}
    service = next(doc for _, doc in DOCUMENTS if doc["kind"] == "Service"
                   and doc["metadata"]["name"] == "ferryman-control")
    assert _service_names(service) <= hosts
    assert {"localhost", "127.0.0.1"} <= hosts  # `ferryman admin` inside the pod: its default URL
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["scheme"] == "HTTPS", probe
    port = service["spec"]["ports"][0]["port"]
    for workload, node in _ferryman_containers():
        if node["name"] == "control":
            continue
        url = urlsplit(_env(node)["FERRYMAN_CONTROL_URL"])
        assert url.scheme == "https" and url.hostname in hosts and url.port == port, workload["metadata"]["name"]
        assert "FERRYMAN_CONTROL_INSECURE_HTTP" not in _env(node)


def test_edges_and_connectors_keep_their_identity_and_register_once() -> None:
    for _, doc in _workloads():
        name = doc["metadata"]["name"]
        if name not in ("ferryman-edge", "ferryman-connector"):
            continue
        assert doc["kind"] == "StatefulSet" and doc["spec"]["replicas"] >= 2
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        data_dir = _env(container)["FERRYMAN_DATA_DIR"]
        claims = {t["metadata"]["name"] for t in doc["spec"]["volumeClaimTemplates"]}
        assert any(m["mountPath"] == data_dir and m["name"] in claims for m in container["volumeMounts"])
        script = " ".join(container["args"])
        role = container["name"]
        assert f'test -f "$FERRYMAN_DATA_DIR/identity/node.json"' in script
        assert f"ferryman {role} register" in script and script.rstrip().endswith(f"exec ferryman {role}")
        tokens = next(v["secret"]["secretName"] for v in doc["spec"]["template"]["spec"]["volumes"] if "secret" in v)
        # one token per replica, named after the pod
        assert sorted(_example_secrets()[tokens]) == [f"{name}-{i}" for i in range(doc["spec"]["replicas"])]
        _flags_exist(script.split("||")[1], [role, "register"])


def _flags_exist(command: str, subcommand: list[str]) -> None:
    """Every ``--flag`` of ``command`` is one ``ferryman SUBCOMMAND`` takes (its ``--help``)."""
    done = subprocess.run([sys.executable, "-m", "dataplane", *subcommand, "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=30, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    offered = set(re.findall(r"(--[a-z][a-z-]*)", done.stdout))
    used = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", command))
    assert used and used <= offered, (subcommand, used - offered)


def test_control_plane_arguments_exist() -> None:
    for _, container in _ferryman_containers():
        if container["name"] == "control":
            assert container["args"][0] == "control"
            _flags_exist(" ".join(container["args"]), ["control"])


def test_sigterm_drain_fits_in_the_grace_period() -> None:
    drained: set[str] = set()
    for _, doc in _workloads():
        spec = doc["spec"]["template"]["spec"]
        for container in spec["containers"]:
            kind = {"connector": settings_mod.ConnectorSettings, "edge": settings_mod.EdgeSettings}.get(container["name"])
            if kind is None:
                continue
            drained.add(container["name"])
            drain = settings_mod.load(kind, environ={
                k: v for k, v in _env(container).items() if k.startswith("FERRYMAN_")}).drain_grace
            pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
            # (an edge's supervisor waits its workers' drain and one second more before killing them)
            assert spec["terminationGracePeriodSeconds"] >= pause + drain + 5, container["name"]
    assert drained == {"connector", "edge"}


def test_containers_are_non_root_read_only_and_bounded() -> None:
    for _, doc in _workloads():
        spec = doc["spec"]["template"]["spec"]
        assert spec["automountServiceAccountToken"] is False
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["seccompProfile"]["type"] == "RuntimeDefault"
        for container in spec["containers"]:
            if container["image"].startswith("ferryman:"):
                assert pod["runAsUser"] == FERRYMAN_UID
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), container["name"]


def _example_secrets() -> dict[str, dict[str, str]]:
    return {doc["metadata"]["name"]: doc["stringData"] for name, doc in DOCUMENTS
            if name == "secrets.example.yaml"}


def test_every_secret_a_pod_reads_is_in_the_example() -> None:
    examples = _example_secrets()
    for _, doc in _workloads():
        spec = doc["spec"]["template"]["spec"]
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in examples
        for container in spec["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in examples[ref["name"]], ref
    for values in examples.values():  # placeholders only: nothing real is committed
        assert all("CHANGE-ME" in value for value in values.values())
    for name in ("ferryman-edge-tokens", "ferryman-connector-tokens"):  # tokens as printed: they carry the CA hash
        assert all(re.fullmatch(r"fmr_[^.]+\.[^.]+", token) for token in examples[name].values()), name


def test_dockerfile_runs_as_10001_and_downloads_only_through_pip() -> None:
    text = (ROOT / "Dockerfile").read_text()
    instructions = [line.split(None, 1) for line in re.sub(r"\\\n", " ", text).splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
    users = [rest.strip() for word, rest in instructions if word == "USER"]
    assert users == [f"{FERRYMAN_UID}:{FERRYMAN_UID}"]
    assert f"--uid {FERRYMAN_UID}" in text
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert not re.search(r"\b(curl|wget|git clone)\b", runs)
    assert not any(word == "ADD" for word, _ in instructions)
    exposed = next(rest for word, rest in instructions if word == "EXPOSE").split()
    for _, container in _ferryman_containers():
        for port in container.get("ports", []):
            suffix = "/udp" if port.get("protocol") == "UDP" else ""
            assert f"{port['containerPort']}{suffix}" in exposed, port
