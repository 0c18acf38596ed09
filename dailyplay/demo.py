"""`dailyplay demo`: a ready instance on a fresh machine (own DB, signing key, org, key, JWT)."""

from __future__ import annotations

import asyncio
import html
import http.server
import json
import os
import shlex
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from importlib import resources
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from . import config
from .clock import now_ms
from .keys import new_api_key
from .storage import Store, with_store
from .storage.types import CLI, ApiKey

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


def _admin_bearer(private_key: Any, now: int) -> str:
    """A bearer JWT for the demo's admin, valid TOKEN_HOURS."""
    return jwt.encode(
        {"sub": DEMO_ADMIN, "iat": now // 1000, "exp": now // 1000 + TOKEN_HOURS * 3600},
        private_key,
        algorithm="RS256",
    )


def fresh_bearer(directory: Path) -> str:
    """A new bearer JWT for the admin of the demo kept in directory; FileNotFoundError if no
    demo was made there."""
    private_path = directory / "jwt-private.pem"
    private_key = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
    return _admin_bearer(private_key, now_ms())


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
    directory: Path,
    host: str,
    port: int,
    base: config.Settings | None = None,
    game_port: int | None = None,
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

    async def make(store: Store) -> tuple[int, str, ApiKey]:
        org = await store.find_org_by_external_id(DEMO_ORG_EXTERNAL_ID)
        if org is None:
            org = await store.create_org("Demo Studio", "business", DEMO_ORG_EXTERNAL_ID, now, CLI)
        await store.set_org_tier(org.id, "business", now, CLI)
        await store.upsert_member(org.id, DEMO_ADMIN, "admin", now, CLI)
        raw_key, values = new_api_key(
            org.id,
            "demo key",
            now,
            description="made by dailyplay demo",
            per_minute=60,
            per_day=10_000,
        )
        return org.id, raw_key, await store.insert_api_key(values, CLI)

    org_id, raw_key, key_row = asyncio.run(with_store(settings.database, make))
    bearer = _admin_bearer(private_key, now)
    url = f"http://{host}:{port}"
    game = f"http://{host}:{game_port}" if game_port else None
    env = {"DP_URL": f"{url}/api/org-api-keys", "DP_KEY": raw_key, "DP_JWT": bearer}
    curl = demo_curl_lines(org_id)
    info = {
        "url": url,
        "config": str(config_path),
        "database": (
            settings.database.path
            if settings.database.engine == "sqlite"
            else settings.database.display
        ),
        "org_id": org_id,
        "api_key_id": key_row.id,
        "api_key": raw_key,
        "bearer_token": bearer,
        "bearer_expires_in_hours": TOKEN_HOURS,
        "env": env,
        "curl": curl,
        "game_url": game,
        "play_url": f"{game}/new-play" if game else None,
    }
    play = [
        "Play the demo game (a page on another origin using /sdk/dailyplay.js); each visit of",
        "this link hands out a fresh one-time token, as a shop or CRM would:",
        f"  {info['play_url']}",
        "",
    ]
    # The interpreter's own path: works as written whether or not a venv is on PATH.
    rerun = f"{shlex.quote(sys.executable)} -m dailyplay demo --dir {shlex.quote(str(directory))}"
    guide = "\n".join(
        [
            "",
            f"DailyPlay demo at {url}  (files in {directory})",
            f"  organization {org_id} (Business tier), admin user {DEMO_ADMIN}",
            f"  API key      {raw_key}",
            f"  bearer JWT   {bearer}",
            "",
            *(play if game else []),
            "Try it (copy and paste into a POSIX shell):",
            *[f"  export {name}={shlex.quote(value)}" for name, value in env.items()],
            "",
            *[f"  # {name}\n  {line}\n" for name, line in curl.items()],
            "Stop with Ctrl-C. Run it again later (same database and game, a new API key) with:",
            f"  {rerun}",
            f"A fresh bearer token (valid {TOKEN_HOURS} h) for the demo's admin:",
            f"  {rerun} --token",
            "",
        ]
    )
    return settings, info, guide


def demo_curl_lines(org_id: int) -> dict[str, str]:
    """Copy-paste curl lines; they read the URL, key and JWT from DP_URL, DP_KEY and DP_JWT.
    Pasted in order, they never touch the demo's own key: the revoke and delete examples act
    on the key the line before them created (KEY_ID)."""
    json_header = "-H 'content-type: application/json'"
    auth = '-H "authorization: Bearer $DP_JWT"'

    def extract(field: str) -> str:
        return f'python3 -c \'import json,sys; print(json.load(sys.stdin)["data"]["{field}"])\''

    create_key = (
        f'curl -s -X POST "$DP_URL" {auth} {json_header}'
        f' -d \'{{"org_id": {org_id}, "name": "CRM", "allowed_game_ids": [42]}}\''
    )
    create = (
        'curl -s -X POST "$DP_URL?action=create-session" -H "x-api-key: $DP_KEY" '
        f"{json_header}"
        ' -d \'{"game_id": 42, "external_ref": "player-1", "metadata": {"campaign": "demo"}}\''
    )
    return {
        "create_session": create,
        "create_session_into_TOKEN": f"TOKEN=$({create} | {extract('token')}); echo $TOKEN",
        "validate_session": 'curl -s "$DP_URL?action=validate-session&token=$TOKEN"',
        "consume_session": (
            f'curl -s -X POST "$DP_URL?action=consume-session" {json_header}'
            ' -d \'{"token": "\'$TOKEN\'", "player_uuid": "player-1"}\''
        ),
        "list_api_keys": f'curl -s "$DP_URL?org_id={org_id}" {auth}',
        "create_api_key_into_KEY_ID": f"KEY_ID=$({create_key} | {extract('id')}); echo $KEY_ID",
        "revoke_api_key": (
            f'curl -s -X PATCH "$DP_URL" {auth} {json_header}'
            f' -d \'{{"id": \'$KEY_ID\', "org_id": {org_id}, "is_active": false}}\''
        ),
        "delete_api_key": f'curl -s -X DELETE "$DP_URL?id=$KEY_ID&org_id={org_id}" {auth}',
    }


# --- the demo game, served from an origin of its own --------------------------------------------

DEMO_GAME_ID = 42
GAME_FILES = {
    "/game.js": ("game.js", "text/javascript; charset=utf-8"),
    "/game.css": ("game.css", "text/css; charset=utf-8"),
}


class GameServer(http.server.ThreadingHTTPServer):
    """The demo's game site, on another port (so another origin) than the API, as a real game's
    site would be: the page loads dailyplay.js from the API and plays a token from its URL.
    `/new-play` stands in for the shop or CRM that hands out plays: it mints a token with the
    demo's API key, server side, and sends the browser to the game with it."""

    daemon_threads = True

    def __init__(self, host: str, port: int, api_url: str, api_key: str):
        super().__init__((host, port), _GameHandler)
        self.api_url = api_url
        self.api_key = api_key
        files = resources.files("dailyplay").joinpath("demo_game")
        page = files.joinpath("index.html").read_text(encoding="utf-8")
        self.page = page.replace("{{API_URL}}", html.escape(api_url, quote=True)).encode()
        self.files = {
            path: (files.joinpath(name).read_bytes(), media_type)
            for path, (name, media_type) in GAME_FILES.items()
        }
        self.security_headers = {
            "Content-Security-Policy": (
                f"default-src 'none'; script-src 'self' {api_url}; connect-src {api_url}; "
                "style-src 'self'; base-uri 'none'; form-action 'none'"
            ),
            "X-Content-Type-Options": "nosniff",
            # The page's URL holds the token: never send it along to anyone.
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store",
        }

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def mint_token(self) -> str:
        """A fresh token from the API, with the demo's key (what a shop's backend does)."""
        body = json.dumps({"game_id": DEMO_GAME_ID, "external_ref": "demo-player"}).encode()
        request = urllib.request.Request(  # noqa: S310 - the demo's own http(s) API URL
            f"{self.api_url}/api/org-api-keys?action=create-session",
            data=body,
            headers={"content-type": "application/json", "x-api-key": self.api_key},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return str(json.load(response)["data"]["token"])


class _GameHandler(http.server.BaseHTTPRequestHandler):
    server: GameServer

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path in ("/", "/index.html"):
            self._send(200, self.server.page, "text/html; charset=utf-8")
        elif path in self.server.files:
            self._send(200, *self.server.files[path])
        elif path == "/new-play":
            try:
                token = self.server.mint_token()
            except urllib.error.HTTPError as exc:
                self._send(502, _refusal_page(exc).encode(), "text/plain; charset=utf-8")
                return
            except (OSError, ValueError, KeyError) as exc:
                message = (
                    f"No new play: the demo's API at {self.server.api_url} could not be reached"
                    f" or gave no token ({exc}).\nIs `dailyplay demo` still running? Start it"
                    " again if not.\n"
                )
                self._send(502, message.encode(), "text/plain; charset=utf-8")
                return
            self._send(303, b"", "text/plain", {"Location": f"/?token={token}"})
        else:
            self._send(404, b"not found", "text/plain; charset=utf-8")

    def _send(
        self, status: int, body: bytes, media_type: str, extra: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        headers = {**self.server.security_headers, "Content-Type": media_type, **(extra or {})}
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the API's log tells what happened to each token


def _refusal_page(exc: urllib.error.HTTPError) -> str:
    """What /new-play says when the API refused to hand out a token, and what to do."""
    try:
        reason = str(json.loads(exc.read())["error"])
    except (OSError, ValueError, KeyError, TypeError):
        reason = exc.reason
    text = f"No new play: the API answered HTTP {exc.code} to the demo's create-session: {reason}\n"
    if exc.code == 401:
        text += (
            "\nThe demo's API key no longer works: it was revoked, deleted or has expired."
            "\nStop the demo (Ctrl-C) and start it again: `dailyplay demo` makes a new key each"
            " time it starts.\n"
        )
    elif exc.code == 429:
        text += "\nThe demo's key is at its rate limit: wait for the next minute and try again.\n"
    return text


def start_game_server(host: str, port: int, api_url: str, api_key: str) -> GameServer:
    """Serve the demo game on a daemon thread; stop it with shutdown()."""
    server = GameServer(host, port, api_url, api_key)
    threading.Thread(target=server.serve_forever, name="dailyplay-demo-game", daemon=True).start()
    return server
