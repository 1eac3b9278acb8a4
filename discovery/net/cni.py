"""`discovery-cni`: the CNI plugin executable, a thin client of the node server.

A container runtime runs the plugin once per container and command, so its start-up time
is part of every ADD. Importing pyroute2 alone takes 150-200 ms here, so this module imports
only the standard library: it reads the environment and the network config from stdin,
validates them (CNI error codes 1, 4, 6, 7), answers VERSION itself, and forwards ADD, DEL,
CHECK, STATUS and GC as HTTP over the node server's Unix socket (`discovery serve
--cni-socket`), which allocates the address and does the netlink work. The server checks
every request again with the same functions (`parse_request`).

Output follows the CNI spec 1.0.0/1.1.0: the result JSON on stdout and exit 0, or an error
JSON `{"cniVersion", "code", "msg", "details"}` on stdout and exit 1.
"""

from __future__ import annotations

import _socket  # the C module: socket.py would pull enum, selectors and more (start-up time)
import json
import os
import re
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is not imported at run time: start-up time
    from typing import Any

SUPPORTED_VERSIONS = ("1.0.0", "1.1.0")
LATEST = SUPPORTED_VERSIONS[-1]
DEFAULT_SOCKET = "/run/discovery/cni.sock"
COMMANDS = ("ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION")
NEEDS_1_1 = ("STATUS", "GC")
TIMEOUT = 60.0  # seconds the plugin waits for the node server (it bounds its own work)

# the spec's well-known error codes
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
CONTAINER_UNKNOWN = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
UNDECODABLE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50
# ours (100 and up)
ADDRESSES_EXHAUSTED = 100
INTERFACE_EXISTS = 101
NETWORK_UNKNOWN = 102
NAME_IN_USE = 103
CHECK_FAILED = 104
NETLINK_FAILED = 105
UNEXPECTED = 106

LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
CONTAINER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,254}")
IFNAME_RE = re.compile(r"[^\s/:]{1,15}")


class CniError(Exception):
    """A failure the plugin reports as CNI error JSON."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, version: str = LATEST) -> dict[str, Any]:
        body: dict[str, Any] = {"cniVersion": version, "code": self.code, "msg": self.msg}
        if self.details:
            body["details"] = self.details
        return body


def is_ifname(text: str) -> bool:
    return IFNAME_RE.fullmatch(text) is not None and text not in (".", "..")


def decode_config(raw: bytes) -> dict[str, Any]:
    """The network config from stdin; code 6 when it is not a JSON object."""
    try:
        conf = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise CniError(UNDECODABLE, "the network config on stdin is not JSON", str(error)) from None
    if not isinstance(conf, dict):
        raise CniError(UNDECODABLE, "the network config on stdin is not a JSON object")
    return conf


def config_version(conf: dict[str, Any]) -> str:
    """The version to answer in: the config's when we speak it, else our latest."""
    version = conf.get("cniVersion")
    return version if version in SUPPORTED_VERSIONS else LATEST


def _field(conf: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = conf.get(key, default)
    # bool is an int in Python: a number field must not take true/false
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CniError(INVALID_CONFIG, f"network config: {key!r} must be a {kind.__name__}")
    return value


def _discovery_args(conf: dict[str, Any]) -> dict[str, Any]:
    """`args.cni.discovery`: {"name"?, "service"?} for the attachment."""
    args = conf.get("args", {})
    cni = args.get("cni", {}) if isinstance(args, dict) else None
    ours = cni.get("discovery", {}) if isinstance(cni, dict) else None
    if not isinstance(ours, dict):
        raise CniError(INVALID_CONFIG, "network config: args.cni.discovery must be an object")
    unknown = set(ours) - {"name", "service"}
    if unknown:
        raise CniError(
            INVALID_CONFIG, f"network config: args.cni.discovery has unknown {sorted(unknown)}"
        )
    name = ours.get("name")
    if name is not None and (not isinstance(name, str) or not LABEL_RE.fullmatch(name)):
        raise CniError(
            INVALID_CONFIG, "network config: args.cni.discovery.name must be a DNS label"
        )
    service = ours.get("service")
    if service is not None and not isinstance(service, dict):
        raise CniError(
            INVALID_CONFIG, "network config: args.cni.discovery.service must be an object"
        )
    return {"name": name, "service": service}


def check_config(conf: dict[str, Any], command: str) -> dict[str, Any]:
    """The plugin's settings from a decoded network config (codes 1, 2, 7)."""
    version = conf.get("cniVersion")
    if not isinstance(version, str):
        raise CniError(INVALID_CONFIG, "network config: 'cniVersion' is missing")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            INCOMPATIBLE_VERSION,
            f"cniVersion {version} is not supported",
            f"supported: {', '.join(SUPPORTED_VERSIONS)}",
        )
    if command in NEEDS_1_1 and version != "1.1.0":
        raise CniError(INCOMPATIBLE_VERSION, f"{command} needs cniVersion 1.1.0, not {version}")
    name = conf.get("name")
    if not isinstance(name, str) or not LABEL_RE.fullmatch(name):
        raise CniError(
            INVALID_CONFIG,
            "network config: 'name' must be the discovery network's name (a DNS label)",
        )
    if "ipam" in conf:
        raise CniError(
            UNSUPPORTED_FIELD,
            f"network config: unsupported field ipam={json.dumps(conf['ipam'])}",
            "discovery-cni takes addresses from the node server; remove 'ipam'",
        )
    bridge = _field(conf, "bridge", str, "cni0")
    if not is_ifname(bridge):
        raise CniError(
            INVALID_CONFIG, f"network config: bridge {bridge!r} is not an interface name"
        )
    mtu = conf.get("mtu")
    if mtu is not None:
        mtu = _field(conf, "mtu", int, None)
        if not 576 <= mtu <= 9000:
            raise CniError(INVALID_CONFIG, "network config: 'mtu' must be between 576 and 9000")
    path = _field(conf, "socket", str, DEFAULT_SOCKET)
    if not os.path.isabs(path):
        raise CniError(INVALID_CONFIG, "network config: 'socket' must be an absolute path")
    dns = _field(conf, "dns", dict, {})
    valid = conf.get("cni.dev/valid-attachments", [])
    if command == "GC" and not (
        isinstance(valid, list)
        and all(
            isinstance(v, dict)
            and isinstance(v.get("containerID"), str)
            and isinstance(v.get("ifname"), str)
            for v in valid
        )
    ):
        raise CniError(
            INVALID_CONFIG,
            "network config: 'cni.dev/valid-attachments' must be a list of {containerID, ifname}",
        )
    return {
        "cniVersion": version,
        "network": name,
        "bridge": bridge,
        "isGateway": _field(conf, "isGateway", bool, True),
        "isDefaultGateway": _field(conf, "isDefaultGateway", bool, False),
        "hairpinMode": _field(conf, "hairpinMode", bool, True),
        "mtu": mtu,
        "socket": path,
        "server": _field(conf, "server", str, ""),
        "token": _field(conf, "token", str, ""),
        "dns": dns,
        "discovery": _discovery_args(conf),
        "prevResult": conf.get("prevResult"),
        "validAttachments": [(v["containerID"], v["ifname"]) for v in valid]
        if command == "GC"
        else [],
    }


def parse_cni_args(text: str) -> dict[str, str]:
    """CNI_ARGS: `KEY=VALUE;KEY=VALUE` (code 4 when malformed)."""
    pairs: dict[str, str] = {}
    for item in filter(None, text.split(";")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CniError(INVALID_ENVIRONMENT, f"CNI_ARGS: {item!r} is not KEY=VALUE")
        pairs[key] = value
    return pairs


def check_environment(environ: dict[str, str]) -> dict[str, Any]:
    """The CNI_* variables a command needs (code 4 naming the bad ones)."""
    command = environ.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(
            INVALID_ENVIRONMENT,
            f"CNI_COMMAND {command!r} is not one of {', '.join(COMMANDS)}",
        )
    needed = {
        "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
        "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
        "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    }.get(command, ())
    missing = [name for name in needed if not environ.get(name)]
    if missing:
        raise CniError(
            INVALID_ENVIRONMENT, f"{command} needs the environment variables {', '.join(missing)}"
        )
    container_id = environ.get("CNI_CONTAINERID", "")
    ifname = environ.get("CNI_IFNAME", "")
    netns = environ.get("CNI_NETNS", "")
    bad = []
    if needed and not CONTAINER_ID_RE.fullmatch(container_id):
        bad.append("CNI_CONTAINERID (letters, digits, '_', '.', '-'; up to 255)")
    if needed and not is_ifname(ifname):
        bad.append("CNI_IFNAME (an interface name: 1-15 characters, no '/', ':' or space)")
    if netns and not os.path.isabs(netns):
        bad.append("CNI_NETNS (an absolute path)")
    if bad:
        raise CniError(INVALID_ENVIRONMENT, f"invalid {'; '.join(bad)}")
    args = parse_cni_args(environ.get("CNI_ARGS", ""))
    return {
        "command": command,
        "containerId": container_id,
        "netns": netns,
        "ifname": ifname,
        "args": args,
    }


def parse_request(environ: dict[str, str], conf: dict[str, Any]) -> dict[str, Any]:
    """Environment and config checked together: what the node server acts on."""
    env = check_environment(environ)
    settings = check_config(conf, env["command"])
    name = settings["discovery"]["name"]
    pod = env["args"].get("K8S_POD_NAME")
    if name is None and pod:
        if not LABEL_RE.fullmatch(pod):
            raise CniError(
                INVALID_ENVIRONMENT,
                f"CNI_ARGS: K8S_POD_NAME {pod!r} is not a DNS label; "
                "name the container in args.cni.discovery.name",
            )
        name = pod
    service = settings["discovery"]["service"]
    namespace = env["args"].get("K8S_POD_NAMESPACE")
    if service is not None and "namespace" not in service and namespace:
        service = {**service, "namespace": namespace}
    return {**env, **settings, "name": name, "service": service, "podNamespace": namespace}


def post(path: str, target: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    """One HTTP/1.1 request over a Unix socket (http.client would cost 50 ms to import)."""
    lines = [f"POST {target} HTTP/1.1", "Host: localhost", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(TIMEOUT)
        sock.connect(path)
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    finally:
        sock.close()
    head, _, payload = b"".join(chunks).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP answer: {status_line[:80]!r}")
    fields = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    if "content-length" in fields:
        payload = payload[: int(fields["content-length"])]
    return int(parts[1]), payload


def forward(
    environ: dict[str, str], conf: dict[str, Any], command: str, path: str, token: str
) -> tuple[int, bytes]:
    """POST the command to the node server; its status and body."""
    keys = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH")
    body = json.dumps({"env": {k: environ[k] for k in keys if k in environ}, "config": conf})
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    unavailable = NOT_AVAILABLE if command == "STATUS" else TRY_AGAIN_LATER
    try:
        return post(path, f"/v1/cni/{command}", body.encode(), headers)
    except (FileNotFoundError, ConnectionRefusedError, PermissionError) as error:
        raise CniError(
            unavailable,
            f"the discovery node server is not answering at {path}",
            f"{error.strerror}; is `discovery serve --cni-socket {path}` running?",
        ) from None
    except TimeoutError:
        raise CniError(
            unavailable, f"the discovery node server did not answer within {TIMEOUT:.0f} s"
        ) from None
    except (OSError, ValueError) as error:
        raise CniError(
            unavailable, "the connection to the discovery node server failed", str(error)
        ) from None


def run(environ: dict[str, str], stdin: bytes) -> tuple[int, dict[str, Any] | None]:
    """One plugin invocation: exit code and what to print (None: nothing)."""
    version = LATEST
    try:
        command = environ.get("CNI_COMMAND", "")
        if command == "VERSION":
            conf = decode_config(stdin) if stdin.strip() else {}
            return 0, {
                "cniVersion": config_version(conf),
                "supportedVersions": list(SUPPORTED_VERSIONS),
            }
        conf = decode_config(stdin)
        version = config_version(conf)
        request = parse_request(environ, conf)
        status, body = forward(environ, conf, command, request["socket"], request["token"])
        try:
            answer = json.loads(body) if body else None
        except ValueError:
            text = body[:200].decode(errors="replace")
            raise CniError(UNEXPECTED, "the node server's answer is not JSON", text) from None
        if status < 300:
            return 0, answer if isinstance(answer, dict) else None
        if isinstance(answer, dict) and isinstance(answer.get("code"), int):
            return 1, answer
        raise CniError(UNEXPECTED, f"the node server answered HTTP {status}", str(answer))
    except CniError as error:
        return 1, error.to_json(version)
    except Exception as error:  # a bug here must still answer in CNI's terms
        return 1, CniError(UNEXPECTED, "discovery-cni failed", repr(error)).to_json(version)


def main() -> int:
    output: dict[str, Any] | None
    try:
        stdin = sys.stdin.buffer.read()
    except OSError as error:
        code, output = 1, CniError(IO_FAILURE, "cannot read stdin", str(error)).to_json()
    else:
        code, output = run(dict(os.environ), stdin)
    if output is not None:
        sys.stdout.write(json.dumps(output) + "\n")
        sys.stdout.flush()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
