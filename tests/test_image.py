"""The container image built and run for real with podman, and deploy/compose.yaml brought up
with podman-compose, and with docker compose when a docker engine is reachable (the images
built by podman, loaded into docker). Slow (minutes: a Debian base made with mmdebstrap when
none exists, a wheel build): only with DISCOVERY_IMAGE_TESTS=1, which `make test-image` sets."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from upstream_support import free_udp_port

ROOT = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("DISCOVERY_TEST_IMAGE", "localhost/discovery:test")
ETCD_IMAGE = os.environ.get("DISCOVERY_TEST_ETCD_IMAGE", "localhost/discovery-etcd:bookworm")
# runc and explicit limits: crun and podman's default rlimits fail on these machines (README)
RUN = ["--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("DISCOVERY_IMAGE_TESTS") != "1", reason="slow: run with make test-image"
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (podman networks, port 53)"),
    pytest.mark.skipif(
        not all(shutil.which(tool) for tool in ("podman", "mmdebstrap", "dig", "curl")),
        reason="needs podman, mmdebstrap, dig and curl (make image-deps)",
    ),
    pytest.mark.timeout(1800),
]


def podman(
    *args: str, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, check=check, timeout=timeout
    )


def wait_until(check: object, what: str, within: float = 90.0) -> None:
    """Poll a condition of another process (a container): nothing notifies us of it."""
    deadline = time.monotonic() + within
    while True:
        try:
            if check():  # type: ignore[operator]
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{what}: not within {within} s"
        time.sleep(0.5)


def ready(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
        return bool(response.status == 200)


@pytest.fixture(scope="module")
def image() -> str:
    """The image, built from the Dockerfile by the same script `make image` runs."""
    result = subprocess.run(
        [str(ROOT / "deploy" / "build-image.sh"), IMAGE],
        capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return IMAGE


@pytest.fixture(scope="module")
def etcd_image() -> str:
    """etcd from Debian's package in a locally made image (no registry to pull quay.io's)."""
    if podman("image", "exists", ETCD_IMAGE, check=False).returncode != 0:
        with tempfile.TemporaryDirectory() as tmp:
            tarball = Path(tmp) / "etcd.tar"
            subprocess.run(
                ["mmdebstrap", "--quiet", "--variant=minbase", "--include=etcd-server",
                 "--dpkgopt=path-exclude=/usr/share/doc/*", "bookworm", str(tarball)],
                check=True, timeout=1200,
            )  # fmt: skip
            podman("import", "--change", 'CMD ["etcd"]', str(tarball), ETCD_IMAGE)
    return ETCD_IMAGE


@pytest.fixture
def container(image: str) -> Iterator[tuple[str, int, int]]:
    name = f"discovery-test-{secrets.token_hex(4)}"
    dns, http = free_udp_port(), free_udp_port()
    podman(
        "run", "-d", "--name", name, *RUN,
        "-p", f"127.0.0.1:{dns}:53/udp", "-p", f"127.0.0.1:{dns}:53/tcp",
        "-p", f"127.0.0.1:{http}:8080/tcp", image,
    )  # fmt: skip
    try:
        wait_until(lambda: ready(http), "the container ready")
        yield name, dns, http
    finally:
        podman("rm", "-f", "-t", "5", name, check=False)


def test_image_answers_dig_and_a_curl_registration(container: tuple[str, int, int]) -> None:
    name, dns, http = container
    url = f"http://127.0.0.1:{http}/v1/services/default/web/instances/web-1"
    registered = subprocess.run(
        ["curl", "-s", "-X", "PUT", url, "-d", '{"address": "10.1.2.3", "ttl": 60}',
         "-o", "/dev/null", "-w", "%{http_code}"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert registered.stdout == "201", registered
    for transport in ("+notcp", "+tcp"):
        answer = subprocess.run(
            ["dig", "@127.0.0.1", "-p", str(dns), "+short", transport,
             "web.default.svc.cluster.local"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert answer.stdout.split() == ["10.1.2.3"], answer
    # port 53 inside, yet no root: the user is 10053 and only CAP_NET_BIND_SERVICE is granted
    assert podman("exec", name, "id", "-u").stdout.strip() == "10053"
    assert podman("healthcheck", "run", name, check=False).returncode == 0
    config = json.loads(podman("image", "inspect", IMAGE).stdout)[0]["Config"]
    assert config["StopSignal"] in ("SIGTERM", "15")
    assert config["Labels"]["org.opencontainers.image.title"] == "discovery"
    assert config["Labels"]["org.opencontainers.image.licenses"] == "Apache-2.0"
    # SIGTERM: a clean shutdown, exit 0
    podman("stop", "-t", "20", name)
    state = json.loads(podman("inspect", name).stdout)[0]["State"]
    assert state["ExitCode"] == 0, state


def test_image_size_is_reported(image: str) -> None:
    size = int(json.loads(podman("image", "inspect", image).stdout)[0]["Size"])
    print(f"\nimage {image}: {size / 1e6:.1f} MB")
    assert size < 500e6


@pytest.mark.skipif(shutil.which("podman-compose") is None, reason="needs podman-compose")
def test_compose_brings_up_a_cluster_whose_client_resolves_the_service(
    image: str, etcd_image: str
) -> None:
    project = f"dsc{secrets.token_hex(3)}"
    compose = ["podman-compose", "-p", project, "-f", str(ROOT / "deploy" / "compose.yaml")]
    dns, http = free_udp_port(), free_udp_port()
    env = {**os.environ, "DISCOVERY_IMAGE": image, "ETCD_IMAGE": etcd_image,
           "DNS_PORT": str(dns), "HTTP_PORT": str(http),
           "CONTAINERS_CONF": str(_containers_conf())}  # fmt: skip
    up = subprocess.run([*compose, "up", "-d"], env=env, capture_output=True, text=True,
                        timeout=600)  # fmt: skip
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        client = f"{project}_client_1"
        code = podman("wait", client, timeout=300).stdout.strip()
        logs = podman("logs", client).stdout + podman("logs", client).stderr
        assert code == "0", logs
        assert logs.count("nameserver ") == 2, logs  # the two replicas, nothing else
        web = _address(f"{project}_web_1")
        assert f"web.default.svc.cluster.local -> {web}" in logs, logs
        # both replicas answer: replica 1 from the host, replica 2 from inside the network
        wait_until(lambda: ready(http), "replica 1 ready")
        answer = subprocess.run(
            ["dig", "@127.0.0.1", "-p", str(dns), "+short", "web.default.svc.cluster.local"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert answer.stdout.split() == [web], answer
        network = next(iter(_networks(client)))
        replica_2 = _address(f"{project}_discovery-2_1")
        second = podman(
            "run", "--rm", *RUN, "--network", network, "--dns", replica_2,
            "--entrypoint", "getent", image, "hosts", "web.default.svc.cluster.local",
        )  # fmt: skip
        assert second.stdout.split()[0] == web, second
    finally:
        subprocess.run([*compose, "down", "-t", "5"], env=env, capture_output=True, timeout=300)
        podman("network", "rm", f"{project}_default", check=False)  # podman-compose 1.0 leaves it


def docker(
    *args: str, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, check=check, timeout=timeout
    )


def _docker_compose() -> list[str] | None:
    """The compose command of a reachable docker engine: the plugin or docker-compose."""
    if shutil.which("docker") is None:
        return None
    try:
        if docker("info", check=False, timeout=30).returncode != 0:
            return None
        if docker("compose", "version", check=False, timeout=30).returncode == 0:
            return ["docker", "compose"]
    except subprocess.TimeoutExpired:
        return None
    return ["docker-compose"] if shutil.which("docker-compose") else None


@pytest.fixture(scope="module")
def docker_compose() -> list[str]:
    command = _docker_compose()
    if command is None:
        pytest.skip(
            "no docker engine with compose reachable (`docker info` fails or no compose): "
            "start one, e.g. `dockerd --iptables=false --storage-driver=vfs &`"
        )
    return command


def _in_docker(image: str) -> str:
    """The podman-built image, loaded into the docker engine under the same name."""
    saved = subprocess.run(
        f"podman save {image} | docker load", shell=True, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert saved.returncode == 0, saved.stderr[-2000:]
    docker("image", "inspect", image)
    return image


def test_docker_compose_brings_up_a_cluster_whose_client_resolves_the_service(
    image: str, etcd_image: str, docker_compose: list[str]
) -> None:
    """`docker compose up` on deploy/compose.yaml as written, with the images built here."""
    project = f"dsc{secrets.token_hex(3)}"
    compose = [*docker_compose, "-p", project, "-f", str(ROOT / "deploy" / "compose.yaml")]
    dns, http = free_udp_port(), free_udp_port()
    env = {**os.environ, "DISCOVERY_IMAGE": _in_docker(image), "ETCD_IMAGE": _in_docker(etcd_image),
           "DNS_PORT": str(dns), "HTTP_PORT": str(http)}  # fmt: skip

    def container(service: str) -> str:
        found = subprocess.run([*compose, "ps", "-q", service], env=env, capture_output=True,
                               text=True, timeout=60)  # fmt: skip
        return found.stdout.strip()

    def address(container_id: str) -> str:
        networks = json.loads(docker("inspect", container_id).stdout)[0]["NetworkSettings"]
        return str(next(iter(networks["Networks"].values()))["IPAddress"])

    up = subprocess.run([*compose, "up", "-d"], env=env, capture_output=True, text=True,
                        timeout=600)  # fmt: skip
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        client = container("client")
        code = docker("wait", client, timeout=300).stdout.strip()
        logs = docker("logs", client).stdout + docker("logs", client).stderr
        assert code == "0", logs
        assert logs.count("nameserver ") == 2, logs  # the two replicas, nothing else
        web = address(container("web"))
        assert f"web.default.svc.cluster.local -> {web}" in logs, logs
        wait_until(lambda: ready(http), "replica 1 ready")
        answer = subprocess.run(
            ["dig", "@127.0.0.1", "-p", str(dns), "+short", "web.default.svc.cluster.local"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert answer.stdout.split() == [web], answer
        network = next(iter(json.loads(docker("inspect", client).stdout)[0]["NetworkSettings"]
                            ["Networks"]))  # fmt: skip
        second = docker(
            "run", "--rm", "--network", network, "--dns", address(container("discovery-2")),
            "--entrypoint", "getent", image, "hosts", "web.default.svc.cluster.local",
        )  # fmt: skip
        assert second.stdout.split()[0] == web, second
    finally:
        subprocess.run([*compose, "down", "-t", "5"], env=env, capture_output=True, timeout=300)


def _networks(container: str) -> dict[str, Any]:
    networks: dict[str, Any] = json.loads(podman("inspect", container).stdout)[0][
        "NetworkSettings"
    ]["Networks"]
    return networks


def _address(container: str) -> str:
    return str(next(iter(_networks(container).values()))["IPAddress"])


def _containers_conf() -> Path:
    """runc and explicit ulimits for every container podman-compose starts (README)."""
    path = Path(tempfile.gettempdir()) / "discovery-test-containers.conf"
    path.write_text(
        '[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
        '[engine]\nruntime = "runc"\n'
    )
    return path
