"""The OpenAPI 3 description of the HTTP API, served at /openapi.json."""

from __future__ import annotations

from functools import cache
from typing import Any

from .model import LABEL_RE, Registration

_LABEL = {"type": "string", "pattern": LABEL_RE.pattern, "maxLength": 63}


def _param(name: str, where: str = "path", schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": where, "required": where == "path", "schema": schema or _LABEL}


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
_INDEX = {"X-Discovery-Index": {"schema": {"type": "integer"}, "description": "registry revision"}}


@cache
def openapi_document() -> dict[str, Any]:
    registration = Registration.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = registration.pop("$defs", {})
    instance_params = [_param("ns"), _param("svc"), _param("inst")]
    lease = {
        "type": "object",
        "properties": {
            "id": {"type": "string", "description": "lease ID, hexadecimal"},
            "ttl": {"type": "integer"},
            "expires_at": {"type": "string", "format": "date-time"},
        },
    }
    instance = {
        "allOf": [
            {"$ref": "#/components/schemas/Registration"},
            {
                "type": "object",
                "properties": {
                    "namespace": _LABEL,
                    "service": _LABEL,
                    "name": _LABEL,
                    "lease": {"$ref": "#/components/schemas/Lease"},
                },
            },
        ]
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
        _param("index", "query", {"type": "integer", "minimum": 0}),
        _param("wait", "query", {"type": "string", "pattern": r"^\d+(\.\d+)?(ms|s|m)?$"}),
    ]
    instance_path = "/v1/services/{ns}/{svc}/instances/{inst}"
    return {
        "openapi": "3.1.0",  # pydantic emits JSON Schema 2020-12 (propertyNames)
        "info": {"title": "discovery registration API", "version": "1"},
        "paths": {
            instance_path: {
                "parameters": instance_params,
                "put": {
                    "summary": "Register or update an instance with a TTL lease",
                    "requestBody": {"required": True, "content": _json("Registration")},
                    "responses": {
                        "200": {"description": "Updated", "content": _json("Instance")},
                        "201": {"description": "Created", "content": _json("Instance")},
                        "413": _problem("Body over 64 KiB"),
                        **_ERRORS,
                    },
                },
                "get": {
                    "summary": "One live instance",
                    "responses": {
                        "200": {"description": "The instance", "content": _json("Instance")},
                        "404": _problem("Unknown instance"),
                        **_ERRORS,
                    },
                },
                "delete": {
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
                    "summary": "Renew the lease",
                    "responses": {
                        "200": {"description": "Renewed", "content": _json("Instance")},
                        "404": _problem("Lease expired or instance unknown: register again"),
                        **_ERRORS,
                    },
                },
            },
            "/v1/services": {
                "get": {
                    "summary": "Every service with its instance count",
                    "parameters": long_poll,
                    "responses": {"200": {"description": "Services", "headers": _INDEX}, **_ERRORS},
                }
            },
            "/v1/services/{ns}/{svc}": {
                "parameters": [_param("ns"), _param("svc")],
                "get": {
                    "summary": "Live instances of a service (long poll with index and wait)",
                    "parameters": [*long_poll, _param("tag", "query", {"type": "string"})],
                    "responses": {
                        "200": {"description": "Instances", "headers": _INDEX},
                        **_ERRORS,
                    },
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
            }
        },
    }
