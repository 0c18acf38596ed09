"""The OpenAPI document shipped in the package, fitted to this server's settings, and the
HTML reference page rendered from it (self-contained: no scripts, no CDN)."""

from __future__ import annotations

import copy
import html
import json
import re
from importlib import resources
from typing import Any

from .config import Settings

DOCUMENT_RESOURCE = "openapi.json"
METHODS = ("get", "post", "patch", "put", "delete")


def shipped_document() -> dict[str, Any]:
    """The document as shipped in the package, before any settings are applied."""
    text = resources.files("dailyplay").joinpath(DOCUMENT_RESOURCE).read_text("utf-8")
    document: dict[str, Any] = json.loads(text)
    return document


def document_for(settings: Settings) -> dict[str, Any]:
    """The shipped document with the limits this server was configured with."""
    doc = copy.deepcopy(shipped_document())
    schemas = doc["components"]["schemas"]
    request = schemas["CreateSessionRequest"]["properties"]
    sessions, limits = settings.sessions, settings.limits
    expiry = request["expires_in_minutes"]
    expiry["maximum"] = sessions.max_expires_minutes
    expiry["default"] = sessions.default_expires_minutes
    expiry["description"] = (
        f"Token lifetime in minutes, 1 to {sessions.max_expires_minutes} "
        f"(sessions.max_expires_minutes). Absent or null: {sessions.default_expires_minutes} "
        "(sessions.default_expires_minutes)"
    )
    request["metadata"]["description"] = (
        "Arbitrary JSON object for your own tracking, returned by validate and consume; at most "
        f"{limits.max_metadata_bytes} bytes once serialized (limits.max_metadata_bytes) and 32 "
        "levels deep"
    )
    doc["components"]["responses"]["RequestTimeout"]["description"] = (
        f"The request body did not arrive within {limits.body_timeout_seconds} seconds "
        "(limits.body_timeout_seconds)"
    )
    doc["components"]["responses"]["PayloadTooLarge"]["description"] = (
        f"The request body is larger than {limits.max_body_bytes} bytes (limits.max_body_bytes)"
    )
    if not settings.metrics.enabled or settings.metrics.port != 0:
        del doc["paths"]["/metrics"]  # not on this port
    return doc


# --- the reference page -------------------------------------------------------------------------

_STYLE = """
body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
h1,h2,h3{line-height:1.2}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2.5rem}
code,.url{font-family:ui-monospace,monospace;font-size:.9em}
.op{border:1px solid #ddd;border-radius:6px;padding:.2rem 1rem 1rem;margin:1.5rem 0}
.method{display:inline-block;min-width:4.5rem;text-align:center;border-radius:4px;color:#fff;
font-weight:600;padding:0 .4rem;margin-right:.5rem;background:#555}
.get{background:#2f6f9f}.post{background:#3b8a3e}.patch{background:#9a6a00}.delete{background:#a33}
table{border-collapse:collapse;width:100%;margin:.5rem 0}
th,td{border:1px solid #e3e3e3;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f6f6f6}.muted{color:#666}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _prose(value: Any) -> str:
    """Escaped description text, with its `code` spans shown as code."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", _e(value))


class _Renderer:
    def __init__(self, doc: dict[str, Any]):
        self.doc = doc

    def resolve(self, node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            target: Any = self.doc
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            node = target
        return node

    def type_text(self, schema: dict[str, Any]) -> str:
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            return f'<a href="#schema-{_e(name)}">{_e(name)}</a>'
        kinds = schema.get("type", "any")
        kinds = kinds if isinstance(kinds, list) else [kinds]
        parts = []
        for kind in kinds:
            if kind == "array" and "items" in schema:
                parts.append(f"array of {self.type_text(schema['items'])}")
            else:
                parts.append(_e(kind))
        text = " or ".join(parts)
        if "format" in schema:
            text += f" <span class=muted>({_e(schema['format'])})</span>"
        return text

    @staticmethod
    def constraints(schema: dict[str, Any]) -> str:
        words = {
            "minimum": "min",
            "maximum": "max",
            "minLength": "min length",
            "maxLength": "max length",
            "maxItems": "max items",
            "pattern": "pattern",
            "default": "default",
            "enum": "one of",
            "const": "always",
        }
        found = [
            f"{label} <code>{_e(json.dumps(schema[key]))}</code>"
            for key, label in words.items()
            if key in schema
        ]
        return ", ".join(found)

    def fields_table(self, schema: dict[str, Any]) -> str:
        schema = self.resolve(schema)
        properties = schema.get("properties")
        if not properties:
            return f"<p>{self.type_text(schema)}</p>"
        required = set(schema.get("required", []))
        rows = "".join(
            f"<tr><td><code>{_e(name)}</code>{' <b>required</b>' if name in required else ''}"
            f"</td><td>{self.type_text(field)}</td><td>{self.constraints(field)}</td>"
            f"<td>{_prose(self.resolve(field).get('description', ''))}</td></tr>"
            for name, field in properties.items()
        )
        notes = []
        if schema.get("additionalProperties") is False:
            notes.append("Other fields are refused with 400.")
        if "minProperties" in schema:
            notes.append(f"At least {schema['minProperties']} fields.")
        if schema.get("description"):
            notes.insert(0, schema["description"])
        note = f"<p class=muted>{_prose(' '.join(notes))}</p>" if notes else ""
        return (
            "<table><tr><th>Field</th><th>Type</th><th>Constraints</th><th>Description</th></tr>"
            f"{rows}</table>{note}"
        )

    def operation(self, path: str, method: str, op: dict[str, Any]) -> str:
        parts = [
            f'<section class=op id="{_e(op["operationId"])}">',
            f"<h3><span class='method {method}'>{method.upper()}</span>"
            f"<span class=url>{_e(path)}</span></h3>",
            f"<p><b>{_e(op.get('summary', ''))}</b> <code>{_e(op['operationId'])}</code></p>",
            f"<p>{_prose(op.get('description', ''))}</p>",
            f"<p>Authentication: {self.security_text(op)}</p>",
        ]
        if op.get("parameters"):
            rows = "".join(
                f"<tr><td><code>{_e(p['name'])}</code></td><td>{_e(p['in'])}</td>"
                f"<td>{self.type_text(p['schema'])}</td><td>{self.constraints(p['schema'])}</td>"
                f"<td>{_prose(p.get('description', ''))}</td></tr>"
                for p in map(self.resolve, op["parameters"])
            )
            parts.append(
                "<h4>Parameters</h4><table><tr><th>Name</th><th>In</th><th>Type</th>"
                f"<th>Constraints</th><th>Description</th></tr>{rows}</table>"
            )
        if "requestBody" in op:
            body = self.resolve(op["requestBody"])
            for media_type, content in body.get("content", {}).items():
                parts.append(f"<h4>Request body <code>{_e(media_type)}</code></h4>")
                parts.append(self.fields_table(content["schema"]))
        parts.append("<h4>Responses</h4><table><tr><th>Status</th><th>Meaning</th></tr>")
        for status, response in op.get("responses", {}).items():
            response = self.resolve(response)
            extra = []
            for content in response.get("content", {}).values():
                extra.append(f"Body: {self.type_text(content['schema'])}")
            if response.get("headers"):
                names = ", ".join(f"<code>{_e(h)}</code>" for h in response["headers"])
                extra.append(f"Headers: {names}")
            for name, link in response.get("links", {}).items():
                target = link.get("operationId", "")
                extra.append(f'Link {_e(name)} → <a href="#{_e(target)}">{_e(target)}</a>')
            detail = "".join(f"<br><span class=muted>{item}</span>" for item in extra)
            parts.append(
                f"<tr><td><b>{_e(status)}</b></td><td>{_prose(response['description'])}{detail}"
                "</td></tr>"
            )
        parts.append("</table></section>")
        return "\n".join(parts)

    def security_text(self, op: dict[str, Any]) -> str:
        requirements = op.get("security", self.doc.get("security", []))
        if not requirements:
            return "none"
        schemes = self.doc["components"]["securitySchemes"]
        names = []
        for requirement in requirements:
            for name in requirement:
                scheme = schemes[name]
                if scheme["type"] == "apiKey":
                    names.append(f"<code>{_e(scheme['name'])}</code> header")
                else:
                    names.append(f"<code>Authorization: Bearer</code> ({_e(name)})")
        return (
            " or ".join(names)
            + " — "
            + _e("; ".join(schemes[n].get("description", "") for r in requirements for n in r))
        )

    def page(self) -> str:
        info = self.doc["info"]
        operations = [
            (path, method, item[method])
            for path, item in self.doc["paths"].items()
            for method in METHODS
            if method in item
        ]
        toc = "".join(
            f'<li><a href="#{_e(op["operationId"])}">{method.upper()} {_e(path)}</a> — '
            f"{_e(op.get('summary', ''))}</li>"
            for path, method, op in operations
        )
        schemas = "".join(
            f'<h3 id="schema-{_e(name)}">{_e(name)}</h3>{self.fields_table(schema)}'
            for name, schema in self.doc["components"]["schemas"].items()
        )
        description = "".join(
            f"<p>{_prose(paragraph)}</p>" for paragraph in info.get("description", "").split("\n\n")
        )
        return (
            "<!doctype html><html lang=en><head><meta charset=utf-8>"
            '<meta name=viewport content="width=device-width,initial-scale=1">'
            f"<title>{_e(info['title'])} reference</title><style>{_STYLE}</style></head><body>"
            f"<h1>{_e(info['title'])} <span class=muted>{_e(info['version'])}</span></h1>"
            f'{description}<p>Machine-readable: <a href="openapi.json">openapi.json</a></p>'
            f"<h2>Operations</h2><ul>{toc}</ul>"
            + "".join(self.operation(path, method, op) for path, method, op in operations)
            + f"<h2>Schemas</h2>{schemas}</body></html>"
        )


def render_reference(doc: dict[str, Any]) -> str:
    """A self-contained HTML reference page for an OpenAPI document."""
    return _Renderer(doc).page()
