"""The deploy/ files (README "Many nodes"): Kubernetes manifests against the real Kubernetes JSON
schemas (kubernetes-validate, strict: unknown fields fail), the HAProxy config through the real
``haproxy -c``, and the settings that keep calls alive across deploys checked against each other:
grace periods longer than the drain, readiness on /readyz, no load-balancer affinity.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from rtcvoice.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
HAPROXY_CFG = DEPLOY / "haproxy" / "haproxy.cfg"
SYSTEMD_UNIT = DEPLOY / "systemd" / "rtcvoice.service"
SYSTEMD_ENV = DEPLOY / "systemd" / "rtcvoice.env.example"
VM_TURN_CONF = DEPLOY / "coturn" / "turnserver.conf"
SECRET_EXAMPLE = "secret.example.yaml"

# The Kubernetes the manifests are written for (every kubernetes-validate >= 1.30 bundles it), and
# the newest one this kubernetes-validate bundles, so an API removed since then shows up too.
TARGET_VERSION = "1.30.0"
NEWEST_VERSION = kubernetes_validate.utils.latest_version()

# Kubernetes' SIGKILL must not come before the drain is over; the margin covers ending the calls
# still running at the drain timeout and closing the process.
DRAIN_MARGIN_S = 60

# Private and special ranges a TURN relay must never reach (coturn #1407, scale.md §3.4).
MUST_DENY = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "100.64.0.0/10",
]


# -- loading ---------------------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(p for p in KUBE.glob("*.yaml") if p.name != "kustomization.yaml")


@cache
def documents(path: Path) -> tuple[dict[str, Any], ...]:
    return tuple(d for d in yaml.safe_load_all(path.read_text()) if d)


def resources() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in manifest_files() for doc in documents(path)]


def the(kind: str, name: str) -> dict[str, Any]:
    found = [d for _, d in resources() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name} under {KUBE}, found {len(found)}"
    return found[0]


def rtcvoice_deployments() -> list[dict[str, Any]]:
    """Every Deployment whose pods run ``rtcvoice serve``."""
    found = [
        d
        for _, d in resources()
        if d["kind"] == "Deployment"
        and any(c.get("command", [])[:2] == ["rtcvoice", "serve"] for c in containers(d))
    ]
    assert found, "no Deployment runs `rtcvoice serve`"
    return found


def containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    return list(deployment["spec"]["template"]["spec"]["containers"])


def rtcvoice_container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in containers(deployment) if c.get("command", [])[:2] == ["rtcvoice", "serve"]]
    return container


def flag(argv: list[str], name: str) -> str | None:
    """The value of ``--name V`` or ``--name=V`` in an argv (the last one wins, as in argparse)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def setting_env_names() -> set[str]:
    """Every environment variable rtcvoice reads a setting from."""
    names = set()
    for f in dataclasses.fields(Settings):
        names.add("RTCVOICE_" + f.name.upper())
        if "env" in f.metadata:
            names.add(f.metadata["env"])
    return names


def env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def haproxy_lines() -> list[str]:
    """The config's directives, comments and blank lines dropped."""
    lines = []
    for raw in HAPROXY_CFG.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def haproxy_section(header: str) -> list[str]:
    lines, inside = [], False
    for raw in HAPROXY_CFG.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():
            inside = line.strip() == header
            continue
        if inside:
            lines.append(line.strip())
    assert lines, f"no section {header!r} in {HAPROXY_CFG}"
    return lines


def systemd_service() -> dict[str, str]:
    values = {}
    section = ""
    for raw in SYSTEMD_UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service":
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def turn_conf(text: str) -> list[tuple[str, str]]:
    entries = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            entries.append((key.strip(), value.strip()))
    return entries


def ip_ranges(entries: list[tuple[str, str]], key: str) -> list[tuple[Any, Any]]:
    ranges = []
    for k, value in entries:
        if k == key:
            low, _, high = value.partition("-")
            ranges.append((ipaddress.ip_address(low), ipaddress.ip_address(high or low)))
    return ranges


def covers(ranges: list[tuple[Any, Any]], network: str) -> bool:
    net = ipaddress.ip_network(network)
    return any(
        low.version == net.version and low <= net.network_address and net.broadcast_address <= high
        for low, high in ranges
    )


def haproxy_binary() -> str | None:
    # Debian installs it in /usr/sbin, which is not on a normal user's PATH.
    found = shutil.which("haproxy")
    if found:
        return found
    return "/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None


# -- Kubernetes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [TARGET_VERSION, NEWEST_VERSION])
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_kubernetes_manifest_matches_the_kubernetes_schema(path: Path, version: str) -> None:
    assert documents(path), f"{path.name} holds no resource"
    for doc in documents(path):
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata']['name']}: {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{path.name}: {exc.message}")


def test_kubernetes_manifests_leave_the_namespace_to_kubectl() -> None:
    for path, doc in resources():
        assert "namespace" not in doc["metadata"], f"{path.name}: {doc['kind']} names a namespace"
        assert doc["kind"] != "Namespace", f"{path.name} creates a namespace"
    assert "namespace" not in yaml.safe_load((KUBE / "kustomization.yaml").read_text())


def test_kustomization_applies_every_manifest_except_the_secret_example() -> None:
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    expected = {p.name for p in manifest_files()} - {SECRET_EXAMPLE}
    assert listed == expected, "kustomization.yaml must list every manifest but the Secret example"
    assert (KUBE / SECRET_EXAMPLE).exists()


def test_kustomization_builds_with_kubectl() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (the schema tests above still check every manifest)")
    built = subprocess.run(
        [kubectl, "kustomize", str(KUBE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert built.returncode == 0, built.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(built.stdout) if d]
    expected = [d["kind"] for path, d in resources() if path.name != SECRET_EXAMPLE]
    assert sorted(kinds) == sorted(expected)


def test_rtcvoice_pods_are_ready_on_readyz_and_alive_on_livez() -> None:
    for deployment in rtcvoice_deployments():
        container = rtcvoice_container(deployment)
        port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
            get = container[probe]["httpGet"]
            assert get["path"] == path, f"{probe} must GET {path}"
            port = port_names.get(get["port"], get["port"])
            assert port == int(flag(container["command"], "--port") or 0), f"{probe} checks another port"


def test_rtcvoice_pods_outlive_their_drain_before_kubernetes_kills_them() -> None:
    config = the("ConfigMap", "rtcvoice-config")["data"]
    assert "RTCVOICE_DRAIN_TIMEOUT_S" in config, (
        "the ConfigMap must set the drain timeout the grace period follows"
    )
    drain_s = float(config["RTCVOICE_DRAIN_TIMEOUT_S"])
    for deployment in rtcvoice_deployments():
        grace_s = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace_s > drain_s + DRAIN_MARGIN_S, (
            f"terminationGracePeriodSeconds {grace_s} must exceed RTCVOICE_DRAIN_TIMEOUT_S {drain_s:g} + "
            f"{DRAIN_MARGIN_S}: Kubernetes would SIGKILL calls still draining"
        )
        # SIGTERM drains by itself; a preStop hook would only eat into the grace period.
        assert "lifecycle" not in rtcvoice_container(deployment)


def test_rtcvoice_pods_register_under_their_pod_name_and_pod_ip() -> None:
    for deployment in rtcvoice_deployments():
        container = rtcvoice_container(deployment)
        env = {e["name"]: e for e in container["env"]}
        assert env["RTCVOICE_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        names = [e["name"] for e in container["env"]]
        # $(POD_IP) expands only from a variable defined before it.
        assert names.index("POD_IP") < names.index("RTCVOICE_NODE_URL")
        port = flag(container["command"], "--port")
        assert env["RTCVOICE_NODE_URL"]["value"] == f"http://$(POD_IP):{port}"
        assert flag(container["command"], "--host") == "0.0.0.0"
        assert port is not None and int(port) in {p["containerPort"] for p in container["ports"]}


def test_rtcvoice_pods_take_settings_only_from_the_configmap_secret_and_downward_api() -> None:
    config = the("ConfigMap", "rtcvoice-config")
    secret = the("Secret", "rtcvoice-secrets")
    for deployment in rtcvoice_deployments():
        # A Service named rtcvoice would otherwise put RTCVOICE_PORT=tcp://... in the pod.
        assert deployment["spec"]["template"]["spec"].get("enableServiceLinks") is False
        sources = rtcvoice_container(deployment)["envFrom"]
        assert [s.get("configMapRef", {}).get("name") for s in sources][0] == config["metadata"]["name"]
        # The Secret comes last, so a key in it wins over the ConfigMap's.
        assert sources[-1]["secretRef"]["name"] == secret["metadata"]["name"]


def test_every_setting_in_the_deploy_files_is_one_rtcvoice_reads() -> None:
    known = setting_env_names()
    given = {
        "configmap.yaml": set(the("ConfigMap", "rtcvoice-config")["data"]),
        SECRET_EXAMPLE: set(the("Secret", "rtcvoice-secrets")["stringData"]),
        SYSTEMD_ENV.name: set(env_file(SYSTEMD_ENV)),
    }
    for deployment in rtcvoice_deployments():
        given["rtcvoice.yaml"] = {
            e["name"] for e in rtcvoice_container(deployment)["env"] if e["name"].startswith("RTCVOICE_")
        }
    for where, names in given.items():
        assert names, where
        unknown = sorted(
            n for n in names if n.startswith(("RTCVOICE_", "OPENAI_", "OTEL_")) and n not in known
        )
        assert not unknown, f"{where} sets variables no setting reads: {unknown}"


def test_rtcvoice_load_is_measured_against_a_cpu_limit_the_autoscaler_stays_below() -> None:
    config = the("ConfigMap", "rtcvoice-config")["data"]
    threshold = float(config.get("RTCVOICE_LOAD_THRESHOLD", Settings().load_threshold))
    hpa = the("HorizontalPodAutoscaler", "rtcvoice")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "rtcvoice",
    }
    assert hpa["spec"]["minReplicas"] >= 2, "one pod leaves nowhere to reconnect to"
    (cpu,) = [m["resource"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
    assert cpu["name"] == "cpu"
    deployment = the("Deployment", "rtcvoice")
    assert "replicas" not in deployment["spec"], "the autoscaler owns replicas; apply would reset it"
    resources = rtcvoice_container(deployment)["resources"]
    # rtcvoice's load is CPU use over the cgroup's CPU limit: without one it is measured against the
    # whole machine. The autoscaler's utilisation is over the request: equal, the two compare.
    assert resources["limits"]["cpu"] == resources["requests"]["cpu"]
    assert cpu["target"]["averageUtilization"] / 100 < threshold


def test_service_and_ingress_spread_requests_without_affinity() -> None:
    service = the("Service", "rtcvoice")
    assert service["spec"].get("sessionAffinity", "None") != "ClientIP", (
        "ClientIP affinity does not reach a call's owner (scale.md §1.6); rtcvoice routes by owner"
    )
    assert service["spec"]["type"] == "ClusterIP"
    deployment = the("Deployment", "rtcvoice")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    ingress = the("Ingress", "rtcvoice")
    annotations = ingress["metadata"].get("annotations", {})
    assert not [
        a for a in annotations if a.endswith(("/affinity", "/upstream-hash-by", "/session-cookie-name"))
    ]
    # WebSockets (session, realtime, audio chat) live as long as a call: not ingress-nginx's 60 s.
    for key in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(annotations[f"nginx.ingress.kubernetes.io/{key}"]) >= 3600
    (backend,) = [p["backend"]["service"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]]
    assert backend["name"] == service["metadata"]["name"]


def test_disruption_budget_evicts_rtcvoice_pods_one_at_a_time() -> None:
    pdb = the("PodDisruptionBudget", "rtcvoice")
    assert pdb["spec"]["maxUnavailable"] == 1
    labels = the("Deployment", "rtcvoice")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_cluster_coturn_takes_its_secret_from_the_secret_and_relays_only_to_pods() -> None:
    config = the("ConfigMap", "coturn-config")["data"]["turnserver.conf"]
    entries = turn_conf(config)
    keys = [k for k, _ in entries]
    assert "use-auth-secret" in keys
    assert "static-auth-secret" not in keys, "the TURN secret belongs in the Secret, not a ConfigMap"
    denied = ip_ranges(entries, "denied-peer-ip")
    for network in MUST_DENY:
        assert covers(denied, network), f"the relay could reach {network}"
    assert ip_ranges(entries, "allowed-peer-ip"), "the relay must be allowed to reach the pods"
    deployment = the("Deployment", "coturn")
    assert deployment["spec"]["template"]["spec"]["hostNetwork"] is True
    (container,) = containers(deployment)
    assert "--static-auth-secret=$(TURN_SECRET)" in container["args"]
    (secret_env,) = [e for e in container["env"] if e["name"] == "TURN_SECRET"]
    ref = secret_env["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == ("rtcvoice-secrets", "RTCVOICE_TURN_SECRET")


def test_redis_keeps_the_registry_in_memory_only() -> None:
    redis = the("Deployment", "redis")
    args = containers(redis)[0]["args"]
    assert flag(args, "--save") == "" and flag(args, "--appendonly") == "no"
    url = the("ConfigMap", "rtcvoice-config")["data"]["RTCVOICE_CLUSTER_URL"]
    service = the("Service", "redis")
    assert url.startswith(f"redis://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/")


# -- HAProxy ---------------------------------------------------------------------------------------


def test_haproxy_config_is_valid() -> None:
    haproxy = haproxy_binary()
    if haproxy is None:
        pytest.skip("haproxy is not installed (scripts/test installs it: apt-get install haproxy)")
    checked = subprocess.run(
        [haproxy, "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=30, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_haproxy_balances_by_connections_checks_readyz_and_keeps_no_persistence() -> None:
    backend = haproxy_section("backend rtcvoice_nodes")
    assert "balance leastconn" in backend
    assert "option httpchk GET /readyz" in backend
    assert "http-check expect status 200" in backend
    servers = [line.split() for line in backend if line.startswith("server ")]
    assert len(servers) == 3
    for server in servers:
        assert server[3:] == ["check", "inter", "1s", "fall", "2", "rise", "2"], server
    for line in haproxy_lines():
        words = line.split()
        # Affinity would not find a call's node (scale.md §1.6); owner routing does.
        assert words[0] not in ("cookie", "stick", "stick-table", "persist", "hash-type"), line
        assert not line.startswith(("balance source", "balance uri", "balance hdr", "balance url_param")), (
            line
        )
        # A node leaving the rotation (draining) must keep its calls' WebSockets.
        assert "shutdown-sessions" not in words, line
    defaults = haproxy_section("defaults")
    assert "timeout tunnel 1h" in defaults


# -- VMs: systemd and coturn ---------------------------------------------------------------------


def test_systemd_stop_outlasts_the_drain_and_signals_only_the_parent() -> None:
    service = systemd_service()
    argv = service["ExecStart"].split()
    assert argv[0] == "/opt/rtcvoice/.venv/bin/rtcvoice" and argv[1] == "serve"
    assert flag(argv, "--workers") == "auto"
    drain = flag(argv, "--drain-timeout-s") or env_file(SYSTEMD_ENV).get("RTCVOICE_DRAIN_TIMEOUT_S")
    drain_s = float(drain) if drain else Settings().drain_timeout_s
    stop = re.fullmatch(r"(\d+)s?", service["TimeoutStopSec"])
    assert stop, f"TimeoutStopSec={service['TimeoutStopSec']}: write it in seconds"
    stop_s = int(stop.group(1))
    assert stop_s > drain_s + DRAIN_MARGIN_S, (
        f"TimeoutStopSec {stop_s} must exceed the drain timeout {drain_s:g} + {DRAIN_MARGIN_S}"
    )
    assert service["KillSignal"] == "SIGTERM"
    # The parent passes SIGTERM on to its workers; systemd sending it to them as well would be
    # their second SIGTERM, which ends every call at once.
    assert service["KillMode"] == "mixed"
    assert service["Type"] == "exec"
    assert service["Restart"] == "on-failure"
    assert service["EnvironmentFile"].lstrip("-") == "/etc/rtcvoice.env"


def test_vm_coturn_uses_rest_credentials_and_relays_only_to_the_nodes() -> None:
    entries = turn_conf(VM_TURN_CONF.read_text())
    keys = [k for k, _ in entries]
    assert "use-auth-secret" in keys and "static-auth-secret" in keys and "realm" in keys
    assert "no-tcp-relay" in keys
    denied = ip_ranges(entries, "denied-peer-ip")
    for network in MUST_DENY:
        assert covers(denied, network), f"the relay could reach {network}"
    allowed = ip_ranges(entries, "allowed-peer-ip")
    nodes = [
        line.split()[2].rsplit(":", 1)[0]
        for line in haproxy_section("backend rtcvoice_nodes")
        if line.startswith("server ")
    ]
    for node in nodes:
        assert covers(allowed, f"{node}/32"), f"the relay cannot reach node {node}"
    # Only the nodes: not their whole private network (Redis, PostgreSQL, model pools).
    assert not covers(allowed, "10.0.0.0/24")
