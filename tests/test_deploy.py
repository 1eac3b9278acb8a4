"""deploy/: every Kubernetes manifest validated against the Kubernetes schemas (offline, the
schemas ship with kubernetes-validate), and the systemd unit and environment file checked."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from discovery.cli import build_parser

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
KUBERNETES_VERSION = "1.32.0"
MANIFESTS = sorted(p for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")


def documents(path: Path) -> list[dict[str, Any]]:
    yaml = pytest.importorskip("yaml")
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def serve_variables() -> set[str]:
    """DISCOVERY_* variables `discovery serve` reads (one per flag)."""
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    flags = {opt for action in serve._actions for opt in action.option_strings}
    return {"DISCOVERY_" + f[2:].upper().replace("-", "_") for f in flags if f.startswith("--")}


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_manifest_is_valid_kubernetes(path: Path) -> None:
    validate = pytest.importorskip("kubernetes_validate")
    docs = documents(path)
    assert docs, path
    for doc in docs:
        validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises on any error


def test_a_broken_manifest_is_caught() -> None:
    """The validation above would fail on a mistake (a typo in a field name)."""
    validate = pytest.importorskip("kubernetes_validate")
    deployment = next(d for d in documents(KUBERNETES / "deployment.yaml")
                      if d["kind"] == "Deployment")  # fmt: skip
    deployment["spec"]["replica"] = 2
    with pytest.raises(validate.ValidationError):
        validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_existing_files() -> None:
    kustomization = documents(KUBERNETES / "kustomization.yaml")[0]
    for name in kustomization["resources"]:
        assert (KUBERNETES / name).is_file(), name
    assert {p.name for p in MANIFESTS} - set(kustomization["resources"]) == {"daemonset.yaml"}


def test_the_deployment_as_the_issue_asks() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for p in MANIFESTS for d in documents(p)}
    for kind in [("StatefulSet", "etcd"), ("Deployment", "discovery"), ("Service", "discovery"),
                 ("ConfigMap", "discovery"), ("PodDisruptionBudget", "discovery"),
                 ("NetworkPolicy", "discovery"), ("DaemonSet", "discovery-node")]:  # fmt: skip
        assert kind in kinds, kind
    docs = {(d["kind"], d["metadata"]["name"]): d for p in MANIFESTS for d in documents(p)}
    deployment = docs["Deployment", "discovery"]
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["capabilities"]["add"] == ["NET_BIND_SERVICE"]
    ports = {(p["port"], p["protocol"]) for p in docs["Service", "discovery"]["spec"]["ports"]}
    assert {(53, "UDP"), (53, "TCP"), (8080, "TCP")} <= ports


def test_configuration_names_only_real_variables() -> None:
    known = serve_variables()
    config = next(d for d in documents(KUBERNETES / "configmap.yaml"))
    assert set(config["data"]) <= known, set(config["data"]) - known
    env_file = (DEPLOY / "systemd" / "discovery.env").read_text()
    named = set(re.findall(r"^#?(DISCOVERY_[A-Z_]+)=", env_file, re.M))
    assert named and named <= known, named - known


def test_systemd_unit_is_hardened() -> None:
    unit = (DEPLOY / "systemd" / "discovery.service").read_text()
    for line in ("DynamicUser=yes", "AmbientCapabilities=CAP_NET_BIND_SERVICE",
                 "CapabilityBoundingSet=CAP_NET_BIND_SERVICE", "ProtectSystem=strict",
                 "NoNewPrivileges=yes", "EnvironmentFile=-/etc/default/discovery",
                 "KillSignal=SIGTERM"):  # fmt: skip
        assert re.search(rf"^{re.escape(line)}$", unit, re.M), line


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """systemd's own parser accepts the unit (ExecStart pointed at this environment's binary)."""
    binary = Path(sys.executable).parent / "discovery"
    unit = (DEPLOY / "systemd" / "discovery.service").read_text()
    unit = unit.replace("/opt/discovery/bin/discovery", str(binary))
    path = tmp_path / "discovery.service"
    path.write_text(unit)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60
    )
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if "discovery.service" in line]  # fmt: skip
    assert result.returncode == 0 and not problems, result.stdout + result.stderr


def test_the_node_agent_installs_the_sample_cni_config() -> None:
    sample = json.loads((DEPLOY / "cni" / "10-discovery.conflist").read_text())
    config = next(d for d in documents(KUBERNETES / "daemonset.yaml") if d["kind"] == "ConfigMap")
    assert json.loads(config["data"]["10-discovery.conflist"]) == sample
