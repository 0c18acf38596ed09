"""Property-based conformance: schemathesis drives the app in-process from its own /openapi.json.

Every phase (examples, coverage, fuzzing, stateful) and every check runs, with a real signed JWT
for the management operations and a real API key for create-session. The seed is fixed unless
DAILYPLAY_TEST_FUZZ_SEED is set (an integer, or "random").
"""

from __future__ import annotations

import os
import tomllib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from conftest import SigningKey, add_org, claims_for, issue_api_key
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status as EngineStatus
from schemathesis.engine import events as engine_events
from schemathesis.python import asgi as schemathesis_asgi

from dailyplay import config
from dailyplay.app import create_app
from dailyplay.clock import now_ms
from dailyplay.storage import sqlite as db

FIXED_SEED = 20261128


# conftest.py turns DAILYPLAY_TEST_FUZZ_SEED=random into a number and shows it in the run's header.
SEED = int(os.environ.get("DAILYPLAY_TEST_FUZZ_SEED") or FIXED_SEED)

CONFIG = Path(__file__).parent / "schemathesis.toml"


def schemathesis_config(managed_org: int, phases: tuple[str, ...]) -> SchemathesisConfig:
    """tests/schemathesis.toml (all checks but two, hooks), with the given phases and seed."""
    data = tomllib.loads(CONFIG.read_text())
    data["hooks"] = str(Path(__file__).parent / "schemathesis_hooks.py")
    data["seed"] = SEED
    for phase in ("examples", "coverage", "fuzzing", "stateful"):
        data.setdefault("phases", {}).setdefault(phase, {})["enabled"] = phase in phases
    # Half the generated org_ids name the organization the JWT administers, so valid requests
    # get past the membership check and reach the operations themselves.
    data["dictionaries"] = {"managed_org": {"values": [managed_org]}}
    data["parameters"] = {
        "query.org_id": {"dictionary": "managed_org", "probability": 0.5},
        "body.org_id": {"dictionary": "managed_org", "probability": 0.5},
    }
    return SchemathesisConfig.from_dict(data)


class Credentials:
    """A real admin JWT for organization 1 and a real API key of organization 2.

    The key's organization is one the JWT user does not belong to, so nothing the fuzzer sends
    with the JWT can revoke or delete the key the create-session calls depend on.
    """

    def __init__(self, settings: config.Settings, signing: SigningKey):
        admin = "user_fuzz_admin"
        self.managed_org = add_org(settings, "Fuzzed Games", members={admin: "admin"})
        self.key_org = add_org(settings, "Key Holder Games")
        conn = db.connect(settings.database)
        with db.transaction(conn):
            self.api_key, _ = issue_api_key(
                conn, self.key_org, "fuzzing", now_ms(), per_minute=1_000_000, per_day=1_000_000_000
            )
        conn.close()
        self.jwt = signing.sign(claims_for(admin, lifetime=3600))


@pytest.fixture(scope="module")
def conformance_settings(
    tmp_path_factory: pytest.TempPathFactory, rsa_key: SigningKey
) -> config.Settings:
    base: Path = tmp_path_factory.mktemp("conformance")
    pem = base / "jwt-public.pem"
    pem.write_bytes(rsa_key.public_pem)
    settings = config.Settings()
    settings = settings.replace("database", path=str(base / "dailyplay.db"))
    settings = settings.replace("auth", jwt_public_key=str(pem))
    # The fuzzer sends thousands of calls, many with bad credentials, from one address.
    return settings.replace("limits", public_per_minute=0, failed_auth_per_minute=0)


def load_schema(app: Any, credentials: Credentials, phases: tuple[str, ...]) -> Any:
    """The app's own /openapi.json, with our credentials attached."""
    loaded = schemathesis.openapi.from_asgi(
        "/openapi.json", app, config=schemathesis_config(credentials.managed_org, phases)
    )

    @loaded.auth()
    class DailyPlayAuth:
        def get(self, case: Any, ctx: Any) -> Credentials:
            return credentials

        def set(self, case: Any, data: Credentials, ctx: Any) -> None:
            security = case.operation.definition.raw.get("security", [])
            names = {name for requirement in security for name in requirement}
            if "bearerAuth" in names:
                case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data.jwt}"}
            if "apiKey" in names:
                case.headers = {**(case.headers or {}), "x-api-key": data.api_key}

    return loaded


@pytest.fixture(scope="module")
def conformance_app(
    conformance_settings: config.Settings, rsa_key: SigningKey
) -> Iterator[tuple[Any, Credentials]]:
    app = create_app(conformance_settings)
    yield app, Credentials(conformance_settings, rsa_key)
    # schemathesis keeps the app's lifespan running between cases; end it with the module.
    schemathesis_asgi.shutdown_lifespans()


@pytest.fixture(scope="module")
def api_schema(conformance_app: tuple[Any, Credentials]) -> Any:
    return load_schema(*conformance_app, phases=("examples", "coverage", "fuzzing"))


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
def test_every_operation_conforms(case: Any) -> None:
    """Examples, coverage and fuzzing phases, one pytest item per operation."""
    response = case.call_and_validate()
    assert response.status_code < 500, response.text


def test_stateful_sequences_conform(conformance_app: tuple[Any, Credentials]) -> None:
    """The stateful phase, run by schemathesis' own engine (as `schemathesis run` does).

    Sequences follow the document's links (create-session -> validate/consume, create key ->
    patch/delete/list). The engine, unlike a bare Hypothesis state machine, knows that replaying
    a sequence against a server that remembers earlier ones (a token already consumed) may take
    another path, and does not count that as a failure.
    """
    stateful = load_schema(*conformance_app, phases=("stateful",))
    failures: list[str] = []
    errors: list[str] = []
    statuses: Counter[tuple[str, int]] = Counter()
    linked_steps = 0
    for event in schemathesis.engine.from_schema(stateful).execute():
        if isinstance(event, engine_events.ScenarioFinished):
            recorder = event.recorder
            linked_steps += sum(1 for node in recorder.cases.values() if node.transition)
            for interaction in recorder.interactions.values():
                if interaction.response is not None:
                    request = interaction.request
                    statuses[(request.method, interaction.response.status_code)] += 1
            for case_id, checks in recorder.checks.items():
                for check in checks:
                    if check.status == EngineStatus.FAILURE:
                        case = recorder.cases[case_id].value
                        failures.append(
                            f"{check.name}: {case.operation.label} {case.body!r} "
                            f"{check.failure_info.failure if check.failure_info else ''}"
                        )
        elif isinstance(event, engine_events.NonFatalError):
            errors.append(repr(event.value))
        elif isinstance(event, engine_events.FatalError):
            errors.append(repr(event.exception))
    assert not errors, errors
    assert not failures, "\n".join(failures[:20])
    assert not [key for key in statuses if key[1] >= 500], statuses
    # The sequences really ran through the links and reached the operations' success paths.
    assert linked_steps > 20, (linked_steps, statuses)
    for method in ("GET", "POST", "PATCH", "DELETE"):
        assert statuses[(method, 200)] > 0, statuses
