"""The served OpenAPI document: valid 3.1, true to the seed contract and to the app's routes."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import AppClient, assert_error, running_app
from openapi_spec_validator import OpenAPIV31SpecValidator
from starlette.routing import Route

from dailyplay import api
from dailyplay.openapi import document_for, shipped_document

# A copy of the public contract (shared/spec/dailyplay-openapi.json) the document must keep.
SEED = Path(__file__).parent / "data" / "seed-openapi.json"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def operations(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (path, method): item[method]
        for path, item in doc["paths"].items()
        for method in METHODS
        if method in item
    }


def test_the_shipped_document_is_valid_openapi_31() -> None:
    doc = shipped_document()
    assert doc["openapi"].startswith("3.1.")
    errors = [error.message for error in OpenAPIV31SpecValidator(doc).iter_errors()]
    assert errors == []


def test_served_document_is_the_shipped_one_fitted_to_the_settings(make_settings) -> None:
    settings = make_settings(
        sessions={"max_expires_minutes": 120, "default_expires_minutes": 30},
        limits={"max_body_bytes": 4096, "max_metadata_bytes": 2048},
    )
    with running_app(settings) as client:
        response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    served = response.json()
    assert served == document_for(settings)
    expiry = served["components"]["schemas"]["CreateSessionRequest"]["properties"][
        "expires_in_minutes"
    ]
    assert (expiry["maximum"], expiry["default"]) == (120, 30)
    assert (
        "2048 bytes"
        in served["components"]["schemas"]["CreateSessionRequest"]["properties"]["metadata"][
            "description"
        ]
    )
    assert "4096 bytes" in served["components"]["responses"]["PayloadTooLarge"]["description"]
    OpenAPIV31SpecValidator(served).validate()


def test_the_seed_contract_is_kept() -> None:
    """Same paths, methods, operationIds, schemas, fields, security schemes and examples."""
    seed = json.loads(SEED.read_text())
    doc = shipped_document()
    served = operations(doc)
    for key, operation in operations(seed).items():
        assert key in served, key
        assert served[key]["operationId"] == operation["operationId"]
        assert served[key]["tags"] == operation["tags"]
        assert served[key]["security"] == operation["security"], key
        for status in operation["responses"]:
            assert status in served[key]["responses"], (key, status)
    assert doc["components"]["securitySchemes"] == seed["components"]["securitySchemes"]
    schemas = doc["components"]["schemas"]
    for name, schema in seed["components"]["schemas"].items():
        assert name in schemas, name
        kept = schemas[name]
        fields = schema.get("properties", {})
        if "data" in fields:  # an envelope: compare the fields inside data
            fields = fields["data"].get("properties", {})
            kept = kept["properties"]["data"]
        for field, definition in fields.items():
            assert field in kept["properties"], (name, field)
            if "example" in definition and field != "expires_at":
                assert kept["properties"][field]["example"] == definition["example"], field


def test_every_operation_is_documented_with_its_errors() -> None:
    doc = shipped_document()
    for (path, method), operation in operations(doc).items():
        responses = operation["responses"]
        assert "200" in responses and "405" in responses, (path, method)
        if path.startswith("/api/"):
            assert {"400", "503"} <= set(responses), (path, method)
        if "requestBody" in operation:
            assert {"408", "413", "415"} <= set(responses), (path, method)
        if operation["security"]:
            assert {"401", "429"} <= set(responses), (path, method)
        assert "security" in operation, (path, method)


def test_every_answer_declares_x_request_id() -> None:
    doc = shipped_document()
    shared = doc["components"]["responses"]
    assert "X-Request-ID" in doc["info"]["description"]
    for (path, method), operation in operations(doc).items():
        for status, response in operation["responses"].items():
            if "$ref" in response:
                response = shared[response["$ref"].rsplit("/", 1)[1]]
            assert "X-Request-ID" in response["headers"], (path, method, status)


def documented_routes(doc: dict[str, Any]) -> set[tuple[str, str | None, str]]:
    """(path, action, METHOD) for every operation in the document."""
    routes = set()
    for path, method in operations(doc):
        parts = urlsplit(path)
        action = parse_qs(parts.query).get("action", [None])[0]
        routes.add((parts.path, action, method.upper()))
    return routes


def served_routes(client: AppClient) -> set[tuple[str, str | None, str]]:
    """(path, action, METHOD) for everything the app answers other than with 404/405."""
    routes = set()
    for route in client.app.routes:
        assert isinstance(route, Route)
        if route.path == "/api/org-api-keys":
            for action, by_method in api.OPERATIONS.items():
                routes.update((route.path, action, method) for method in by_method)
        else:
            routes.update((route.path, None, m) for m in route.methods or () if m != "HEAD")
    return routes


def test_document_and_app_serve_the_same_routes(client: AppClient) -> None:
    assert documented_routes(shipped_document()) == served_routes(client)


@pytest.mark.parametrize("metrics", [{"enabled": False}, {"port": 9}])
def test_without_metrics_on_the_api_port_document_and_routes_still_agree(
    make_settings, metrics: dict[str, Any]
) -> None:
    settings = make_settings(metrics=metrics)
    with running_app(settings) as client:
        served = client.get("/openapi.json").json()
        assert "/metrics" not in served["paths"]
        assert documented_routes(served) == served_routes(client)


@pytest.mark.parametrize(
    "path", ["/", "/openapi.json", "/docs", "/healthz", "/readyz", "/metrics", "/sdk/dailyplay.js"]
)
def test_document_routes_refuse_other_methods_in_the_error_shape(
    client: AppClient, path: str
) -> None:
    response = client.post(path)
    assert_error(response, 405)
    assert set(response.headers["allow"].split(", ")) == {"GET", "HEAD"}


class _PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.references: list[str] = []
        self.ids: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("href", "src", "action") and value is not None:
                self.references.append(value)
            if name == "id" and value:
                self.ids.add(value)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_the_reference_page_is_self_contained_and_covers_every_operation(
    client: AppClient,
) -> None:
    response = client.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in response.headers["content-security-policy"]
    page = _PageParser()
    page.feed(response.text)
    # Nothing is fetched from elsewhere: no scripts, no stylesheets, no absolute links.
    assert "script" not in page.tags and "link" not in page.tags and "img" not in page.tags
    for reference in page.references:
        assert reference.startswith("#") or reference == "openapi.json", reference
        if reference.startswith("#"):
            assert reference[1:] in page.ids, reference  # every in-page link has a target
    text = " ".join(page.text)
    doc = shipped_document()
    for (path, _method), operation in operations(doc).items():
        assert operation["operationId"] in page.ids
        assert path in text
        for status in operation["responses"]:
            assert re.search(rf"\b{status}\b", text), status
        for parameter in operation.get("parameters", []):
            assert parameter["name"] in text, parameter["name"]  # Idempotency-Key, filters
    for name in doc["components"]["schemas"]:
        assert f"schema-{name}" in page.ids
    for field in doc["components"]["schemas"]["CreateApiKeyRequest"]["properties"]:
        assert field in text


def test_the_reference_page_escapes_what_it_shows() -> None:
    from dailyplay.openapi import render_reference

    doc = shipped_document()
    doc["info"]["description"] = "<script>alert(1)</script>"
    page = render_reference(doc)
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


# The two schemathesis checks left out of test_conformance.py (`unsupported_method`,
# `allow_header_conformance`) by hand: per action, every method the document does not list is
# 405 with exactly the documented methods in Allow.
ALL_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")


def documented_methods() -> dict[str | None, set[str]]:
    by_action: dict[str | None, set[str]] = {}
    for path, action, method in documented_routes(shipped_document()):
        if path == "/api/org-api-keys":
            by_action.setdefault(action, set()).add(method)
    return by_action


@pytest.mark.parametrize(
    "action", ["create-session", "validate-session", "consume-session", "audit-log", None]
)
def test_every_undocumented_method_of_an_action_is_405_with_the_documented_allow(
    client: AppClient, action: str | None
) -> None:
    allowed = documented_methods()[action]
    url = "/api/org-api-keys" + (f"?action={action}" if action else "")
    for method in ALL_METHODS:
        if method in allowed:
            continue
        response = client.request(method, url)
        assert response.status_code == 405, (method, url)
        assert set(response.headers["allow"].split(", ")) == allowed, (method, url)
        if method != "HEAD":
            assert_error(response, 405, "not allowed")


def test_a_session_call_without_its_action_is_a_clear_400(client: AppClient) -> None:
    """Without `action` the URL means key management, which takes no `token` parameter."""
    response = client.get("/api/org-api-keys?token=123e4567-e89b-42d3-a456-426614174000")
    assert_error(response, 400, "unknown query parameter 'token'")
