"""The OpenAPI 3 description of the HTTP API, served at /openapi.json."""

from __future__ import annotations

from functools import cache
from typing import Any

from .model import LABEL_RE, PORT_NAME_MAX, Registration
from .net.records import CONTAINER_ID_RE, IFNAME_RE, AttachmentRequest, NetworkSpec

_LABEL = {"type": "string", "pattern": LABEL_RE.pattern, "maxLength": 63}


# One node's block as GET /v1/networks/{net} shows it
_BLOCK = {
    "type": "object",
    "properties": {
        "subnet": {"type": "string", "description": "the block, CIDR"},
        "node": {"type": "string"},
        "node_ip": {"type": "string", "description": "the node's underlay address"},
        "vtep_mac": {"type": "string", "description": "the node's VXLAN device MAC"},
        "attachments": {"type": "integer"},
        "free": {"type": "integer"},
        "mine": {"type": "boolean", "description": "the block of the node answering"},
        "programmed": {
            "type": "boolean",
            "description": "with --overlay: another node's block has its route, neighbour and "
            "FDB entry in this node's kernel; this node's block is on its VXLAN device",
        },
    },
}


def _param(name: str, where: str = "path", schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": where, "required": where == "path", "schema": schema or _LABEL}


def _link(operation: str, params: tuple[str, ...]) -> dict[str, Any]:
    return {
        "operationId": operation,
        "parameters": {name: f"$request.path.{name}" for name in params},
    }


def _links(operations: tuple[str, ...], params: tuple[str, ...]) -> dict[str, Any]:
    return {operation: _link(operation, params) for operation in operations}


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
        },
    }


_ERRORS = {
    "400": _problem("Invalid JSON, field or name"),
    "503": _problem("The store is unreachable; retry after Retry-After seconds"),
}
_BODY_ERRORS = {"408": _problem("The body did not arrive within --http-body-timeout")}
_POLL_ERRORS = {
    "429": _problem(
        "This client address holds --http-long-polls-per-client long polls; retry after "
        "Retry-After seconds"
    )
}
_INDEX = {
    "X-Discovery-Index": {"schema": {"type": "integer"}, "description": "registry revision"},
    "Link": {"schema": {"type": "string"}, "description": 'the next page (rel="next")'},
}


@cache
def openapi_document(auth: bool = False, auth_metrics: bool = False) -> dict[str, Any]:
    """The document of a server with or without an auth file (tokens: 401 and 403)."""
    registration = Registration.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = registration.pop("$defs", {})
    network_spec = NetworkSpec.model_json_schema(ref_template="#/components/schemas/{model}")
    attachment_request = AttachmentRequest.model_json_schema(
        ref_template="#/components/schemas/{model}"
    )
    for schema in (network_spec, attachment_request):
        defs.update(schema.pop("$defs", {}))
    # what the validators check beyond the types pydantic describes
    registration["properties"]["address"]["anyOf"] = [{"format": "ipv4"}, {"format": "ipv6"}]
    registration["properties"]["address"]["examples"] = ["10.1.2.3", "fd00::1:2"]
    # a port name becomes the SRV label _<name>: at most 15 characters at registration (RFC 6335)
    defs["Port"]["properties"]["name"]["maxLength"] = PORT_NAME_MAX
    network_spec["properties"]["subnet"]["pattern"] = r"^[0-9A-Fa-f.:]+/[0-9]{1,3}$"
    network_spec["properties"]["subnet"]["examples"] = ["10.244.0.0/16"]
    # a network as stored: the spec's fields (no longer closed to others), its name and state
    network = {
        "type": "object",
        "properties": {
            **network_spec["properties"],
            "name": _LABEL,
            "attachments": {"type": "integer"},
            "blocks": {"type": "array", "items": _BLOCK},
        },
        "required": ["name", "subnet"],
    }
    route = {
        "type": "object",
        "properties": {"dst": {"type": "string"}, "gw": {"type": "string"}},
    }
    attachment = {
        "type": "object",
        "required": ["address", "prefix_len", "gateway", "routes", "subnet", "mtu", "node"],
        "properties": {
            "network": _LABEL,
            "container_id": {"type": "string"},
            "ifname": {"type": "string"},
            "name": _LABEL,
            "service": {"$ref": "#/components/schemas/ServiceRef"},
            "address": {"type": "string", "format": "ipv4"},
            "prefix_len": {"type": "integer"},
            "gateway": {"type": "string", "format": "ipv4"},
            "routes": {"type": "array", "items": route},
            "subnet": {"type": "string"},
            "mtu": {"type": "integer"},
            "node": {"type": "string"},
        },
    }
    instance_params = [_param("ns"), _param("svc"), _param("inst")]
    lease = {
        "type": "object",
        "properties": {
            "id": {"type": "string", "description": "lease ID, hexadecimal"},
            "ttl": {"type": "integer"},
            "expires_at": {"type": "string", "format": "date-time"},
        },
    }
    # the stored instance: the registration's fields (no longer closed to others) and its names
    instance = {
        "type": "object",
        "properties": {
            **registration["properties"],
            "namespace": _LABEL,
            "service": _LABEL,
            "name": _LABEL,
            "lease": {"$ref": "#/components/schemas/Lease"},
        },
        "required": ["namespace", "service", "name", "address", "lease"],
    }
    problem = {
        "type": "object",
        "required": ["title", "status", "detail"],
        "properties": {
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                },
            },
        },
    }
    long_poll = [
        _param("index", "query", {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}),
        _param(
            "wait",
            "query",
            {"type": "string", "pattern": r"^[0-9]{1,9}(\.[0-9]{1,9})?(ms|s|m|h)?$"},
        ),
    ]
    paging = [
        _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 5000}),
        _param("after", "query", {"type": "string", "maxLength": 255}),
    ]
    instance_path = "/v1/services/{ns}/{svc}/instances/{inst}"
    network_path = "/v1/networks/{net}"
    attachment_path = network_path + "/attachments/{container_id}/{ifname}"
    attachment_params = [
        _param("net"),
        _param("container_id", schema={"type": "string", "pattern": CONTAINER_ID_RE.pattern}),
        _param(
            "ifname",
            schema={"type": "string", "pattern": IFNAME_RE.pattern},
        ),
    ]
    # OpenAPI links: what a created resource lets a client call next (stateful testing follows them)
    instance_links = _links(("getInstance", "heartbeat", "deregister"), ("ns", "svc", "inst"))
    instance_links["getService"] = _link("getService", ("ns", "svc"))
    network_links = _links(("getNetwork", "listAttachments", "deleteNetwork", "attach"), ("net",))
    attachment_links = _links(("getAttachment", "detach"), ("net", "container_id", "ifname"))
    document: dict[str, Any] = {
        "openapi": "3.1.0",  # pydantic emits JSON Schema 2020-12 (propertyNames)
        "info": {"title": "discovery registration API", "version": "1"},
        "paths": {
            instance_path: {
                "parameters": instance_params,
                "put": {
                    "operationId": "register",
                    "summary": "Register or update an instance with a TTL lease",
                    "requestBody": {"required": True, "content": _json("Registration")},
                    "responses": {
                        **_BODY_ERRORS,
                        "200": {
                            "description": "Updated",
                            "content": _json("Instance"),
                            "links": instance_links,
                        },
                        "201": {
                            "description": "Created",
                            "content": _json("Instance"),
                            "links": instance_links,
                        },
                        "409": _problem(
                            "A new instance past --max-instances-per-service or "
                            "--max-instances-per-namespace"
                        ),
                        "413": _problem("Body over 64 KiB"),
                        **_ERRORS,
                    },
                },
                "get": {
                    "operationId": "getInstance",
                    "summary": "One live instance",
                    "responses": {
                        "200": {"description": "The instance", "content": _json("Instance")},
                        "404": _problem("Unknown instance"),
                        **_ERRORS,
                    },
                },
                "delete": {
                    "operationId": "deregister",
                    "summary": "Deregister now",
                    "responses": {
                        "204": {"description": "Deregistered"},
                        "404": _problem("Unknown instance"),
                        **_ERRORS,
                    },
                },
            },
            instance_path + "/heartbeat": {
                "parameters": instance_params,
                "put": {
                    "operationId": "heartbeat",
                    "summary": "Renew the lease",
                    "responses": {
                        "200": {"description": "Renewed", "content": _json("Instance")},
                        "404": _problem("Lease expired or instance unknown: register again"),
                        **_ERRORS,
                    },
                },
            },
            "/v1/heartbeats": {
                "post": {
                    "operationId": "heartbeats",
                    "summary": "Renew many leases in one call (at most 256 instances, more: "
                    "400); with tokens every instance's namespace needs write",
                    "requestBody": {"required": True, "content": _json("HeartbeatBatch")},
                    "responses": {
                        "200": {
                            "description": "One result per instance, in request order: 200 "
                            "renewed, 404 expired or unknown (register that one again)",
                            "content": _json("HeartbeatResults"),
                        },
                        "413": _problem("Body over 64 KiB"),
                        **_ERRORS,
                    },
                },
            },
            "/v1/services": {
                "get": {
                    "operationId": "listServices",
                    "summary": "Every service with its instance count and its instances' tags, a "
                    "page at a time (`next` is the `after` of the next page; also a Link header)",
                    "parameters": [*long_poll, *paging],
                    "responses": {
                        "200": {"description": "Services", "headers": _INDEX},
                        **_POLL_ERRORS,
                        **_ERRORS,
                    },
                }
            },
            "/v1/services/{ns}/{svc}": {
                "parameters": [_param("ns"), _param("svc")],
                "get": {
                    "operationId": "getService",
                    "summary": "Live instances of a service (long poll with index and wait)",
                    "parameters": [
                        *long_poll,
                        *paging,
                        _param("tag", "query", {"type": "string"}),
                    ],
                    "responses": {
                        "200": {"description": "Instances", "headers": _INDEX},
                        **_POLL_ERRORS,
                        **_ERRORS,
                    },
                },
            },
            "/v1/registry": {
                "get": {
                    "operationId": "getRegistry",
                    "summary": "Every registered instance and the store revision this replica "
                    "reflects (for `discovery check`); ?index=N&wait=… blocks until the "
                    "revision passes N; a page at a time",
                    "parameters": [*long_poll, *paging],
                    "responses": {
                        "200": {"description": "Revision and instances", "headers": _INDEX},
                        **_POLL_ERRORS,
                        **_ERRORS,
                    },
                }
            },
            "/v1/networks": {
                "get": {
                    "operationId": "listNetworks",
                    "summary": "Every network with its node blocks and attachment counts",
                    "responses": {"200": {"description": "Networks"}, **_ERRORS},
                }
            },
            network_path: {
                "parameters": [_param("net")],
                "put": {
                    "operationId": "putNetwork",
                    "summary": "Create or change a network",
                    "requestBody": {"required": True, "content": _json("NetworkSpec")},
                    "responses": {
                        **_BODY_ERRORS,
                        "200": {
                            "description": "Changed",
                            "content": _json("Network"),
                            "links": network_links,
                        },
                        "201": {
                            "description": "Created",
                            "content": _json("Network"),
                            "links": network_links,
                        },
                        "409": _problem("subnet or node_prefix changed while attachments exist"),
                        **_ERRORS,
                    },
                },
                "get": {
                    "operationId": "getNetwork",
                    "summary": "A network: config, node blocks, attachment counts",
                    "responses": {
                        "200": {"description": "The network", "content": _json("Network")},
                        "404": _problem("Unknown network"),
                        **_ERRORS,
                    },
                },
                "delete": {
                    "operationId": "deleteNetwork",
                    "summary": "Delete a network without attachments",
                    "responses": {
                        "204": {"description": "Deleted"},
                        "404": _problem("Unknown network"),
                        "409": _problem("The network has attachments"),
                        **_ERRORS,
                    },
                },
            },
            network_path + "/attachments": {
                "parameters": [_param("net")],
                "get": {
                    "operationId": "listAttachments",
                    "summary": "The network's attachments",
                    "responses": {
                        "200": {"description": "Attachments"},
                        "404": _problem("Unknown network"),
                        **_ERRORS,
                    },
                },
            },
            attachment_path: {
                "parameters": attachment_params,
                "put": {
                    "operationId": "attach",
                    "summary": "Give a container interface an address (idempotent)",
                    "requestBody": {"required": False, "content": _json("AttachmentRequest")},
                    "responses": {
                        **_BODY_ERRORS,
                        "200": {
                            "description": "Known already",
                            "content": _json("Attachment"),
                            "links": attachment_links,
                        },
                        "201": {
                            "description": "Attached",
                            "content": _json("Attachment"),
                            "links": attachment_links,
                        },
                        "404": _problem("Unknown network"),
                        "409": _problem("Name or instance in use"),
                        "507": _problem("No free block or address for this node"),
                        **_ERRORS,
                    },
                },
                "get": {
                    "operationId": "getAttachment",
                    "summary": "One attachment",
                    "responses": {
                        "200": {"description": "The attachment", "content": _json("Attachment")},
                        "404": _problem("Unknown attachment"),
                        **_ERRORS,
                    },
                },
                "delete": {
                    "operationId": "detach",
                    "summary": "Release the address (204 also when unknown, as CNI DEL)",
                    "responses": {"204": {"description": "Released"}, **_ERRORS},
                },
            },
            "/healthz": {
                "get": {"summary": "Process alive", "responses": {"200": {"description": "OK"}}}
            },
            "/readyz": {
                "get": {
                    "summary": "Cache synced with the store",
                    "responses": {
                        "200": {"description": "Ready; body says whether the store is degraded"},
                        "503": {"description": "First load not finished"},
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {"200": {"description": "Text"}},
                }
            },
            "/openapi.json": {
                "get": {"summary": "This document", "responses": {"200": {"description": "JSON"}}}
            },
        },
        "components": {
            "schemas": {
                **defs,
                "Registration": registration,
                "Lease": lease,
                "Instance": instance,
                "Problem": problem,
                "HeartbeatBatch": {
                    "type": "object",
                    "required": ["instances"],
                    "additionalProperties": False,
                    "properties": {
                        "instances": {
                            "type": "array",
                            "maxItems": 256,
                            "items": {
                                "type": "object",
                                "required": ["namespace", "service", "instance"],
                                "additionalProperties": False,
                                "properties": {
                                    "namespace": _LABEL,
                                    "service": _LABEL,
                                    "instance": _LABEL,
                                },
                            },
                        }
                    },
                },
                "HeartbeatResults": {
                    "type": "object",
                    "properties": {
                        "results": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["status"],
                                "properties": {
                                    "status": {"type": "integer", "enum": [200, 404]},
                                    "ttl": {"type": "integer"},
                                    "expires_at": {"type": "string", "format": "date-time"},
                                },
                            },
                        }
                    },
                },
                "NetworkSpec": network_spec,
                "AttachmentRequest": attachment_request,
                "Network": network,
                "Attachment": attachment,
            }
        },
    }
    return _secured(document, auth, auth_metrics)


_PUBLIC = ("/healthz", "/readyz", "/openapi.json")


def _secured(document: dict[str, Any], auth: bool, auth_metrics: bool) -> dict[str, Any]:
    """421 for a Host the server does not answer to; with an auth file, the bearer scheme
    (SPEC.md "Security") and 401/403 wherever a token is needed."""
    host = _problem("Host is not this server's address, a loopback name or an allowed host")
    for item in document["paths"].values():
        for method, operation in item.items():
            if method != "parameters":
                operation["responses"]["421"] = host
    if not auth:
        return document
    document["components"]["securitySchemes"] = {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "A token of the server's --auth-file (checked when it has one): "
            "read, write or admin on namespaces; networks need admin",
        }
    }
    document["security"] = [{"bearer": []}]
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            if (
                path in _PUBLIC
                or path.startswith("/ui")
                or (path == "/metrics" and not auth_metrics)
            ):
                operation["security"] = []
                continue
            responses = operation["responses"]
            responses["401"] = _problem("No valid bearer token (WWW-Authenticate: Bearer)")
            if path != "/metrics":
                responses["403"] = _problem("The token lacks the right on this namespace")
    return document
