"""`dailyplay demo`: a ready instance on a fresh machine (own DB, signing key, org, key, JWT)."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from . import config, db
from .clock import now_ms
from .keys import issue_api_key

DEMO_ORG_EXTERNAL_ID = "org_demo"
DEMO_ADMIN = "user_demo_admin"
TOKEN_HOURS = 24


def _signing_key(directory: Path) -> tuple[Any, Path]:
    """The demo's RSA key pair, made once and kept in the demo directory."""
    private_path = directory / "jwt-private.pem"
    public_path = directory / "jwt-public.pem"
    if private_path.exists() and public_path.exists():
        private_key = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
        return private_key, public_path
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    public_path.write_bytes(
        private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_key, public_path


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    # JSON string and array syntax is valid TOML for the plain values settings hold.
    return json.dumps(value)


def write_config(settings: config.Settings, path: Path) -> None:
    lines = ["# Written by `dailyplay demo`; `dailyplay serve --config` this file to run it again."]
    for section, values in config.as_dict(settings).items():
        lines.append(f"\n[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def prepare_demo(
    directory: Path, host: str, port: int, base: config.Settings | None = None
) -> tuple[config.Settings, dict[str, Any], str]:
    """Create (or reuse) the demo's files and data; returns settings, a JSON summary, a guide."""
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    private_key, public_path = _signing_key(directory)
    settings = (base or config.Settings()).replace("server", host=host, port=port, workers=1)
    settings = settings.replace("database", path=str(directory / "demo.db"))
    settings = settings.replace("auth", jwt_public_key=str(public_path), jwks_url="")
    settings = settings.replace("cors", allow_origins=["*"])
    config_path = directory / "config.toml"
    write_config(settings, config_path)

    now = now_ms()
    conn = db.connect(settings.database)
    with db.transaction(conn):
        row = db.find_org_by_external_id(conn, DEMO_ORG_EXTERNAL_ID)
        org_id = (
            row["id"]
            if row
            else db.create_org(conn, "Demo Studio", "business", DEMO_ORG_EXTERNAL_ID, now)["id"]
        )
        db.set_org_tier(conn, org_id, "business", now)
        db.upsert_member(conn, org_id, DEMO_ADMIN, "admin", now)
    raw_key, key_row = issue_api_key(
        conn,
        org_id,
        "demo key",
        now,
        description="made by dailyplay demo",
        per_minute=60,
        per_day=10_000,
    )
    conn.close()
    bearer = jwt.encode(
        {"sub": DEMO_ADMIN, "iat": now // 1000, "exp": now // 1000 + TOKEN_HOURS * 3600},
        private_key,
        algorithm="RS256",
    )
    url = f"http://{host}:{port}"
    env = {"DP_URL": f"{url}/api/org-api-keys", "DP_KEY": raw_key, "DP_JWT": bearer}
    curl = demo_curl_lines(org_id, key_row["id"])
    info = {
        "url": url,
        "config": str(config_path),
        "database": settings.database.path,
        "org_id": org_id,
        "api_key_id": key_row["id"],
        "api_key": raw_key,
        "bearer_token": bearer,
        "bearer_expires_in_hours": TOKEN_HOURS,
        "env": env,
        "curl": curl,
    }
    guide = "\n".join(
        [
            "",
            f"DailyPlay demo at {url}  (files in {directory})",
            f"  organization {org_id} (Business tier), admin user {DEMO_ADMIN}",
            f"  API key      {raw_key}",
            f"  bearer JWT   {bearer}",
            "",
            "Try it (copy and paste into a POSIX shell):",
            *[f"  export {name}={shlex.quote(value)}" for name, value in env.items()],
            "",
            *[f"  # {name}\n  {line}\n" for name, line in curl.items()],
            "Stop with Ctrl-C. Run it again later with:",
            f"  dailyplay serve --config {shlex.quote(str(config_path))}",
            "",
        ]
    )
    return settings, info, guide


def demo_curl_lines(org_id: int, key_id: int) -> dict[str, str]:
    """Copy-paste curl lines; they read the URL, key and JWT from DP_URL, DP_KEY and DP_JWT."""
    json_header = "-H 'content-type: application/json'"
    auth = '-H "authorization: Bearer $DP_JWT"'
    extract = 'python3 -c \'import json,sys; print(json.load(sys.stdin)["data"]["token"])\''
    create = (
        'curl -s -X POST "$DP_URL?action=create-session" -H "x-api-key: $DP_KEY" '
        f"{json_header}"
        ' -d \'{"game_id": 42, "external_ref": "player-1", "metadata": {"campaign": "demo"}}\''
    )
    return {
        "create_session": create,
        "create_session_into_TOKEN": f"TOKEN=$({create} | {extract}); echo $TOKEN",
        "validate_session": 'curl -s "$DP_URL?action=validate-session&token=$TOKEN"',
        "consume_session": (
            f'curl -s -X POST "$DP_URL?action=consume-session" {json_header}'
            ' -d \'{"token": "\'$TOKEN\'", "player_uuid": "player-1"}\''
        ),
        "list_api_keys": f'curl -s "$DP_URL?org_id={org_id}" {auth}',
        "create_api_key": (
            f'curl -s -X POST "$DP_URL" {auth} {json_header}'
            f' -d \'{{"org_id": {org_id}, "name": "CRM", "allowed_game_ids": [42]}}\''
        ),
        "revoke_api_key": (
            f'curl -s -X PATCH "$DP_URL" {auth} {json_header}'
            f' -d \'{{"id": {key_id}, "org_id": {org_id}, "is_active": false}}\''
        ),
        "delete_api_key": f'curl -s -X DELETE "$DP_URL?id={key_id}&org_id={org_id}" {auth}',
    }
