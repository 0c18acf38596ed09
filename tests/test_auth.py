"""Bearer JWTs: attacks are refused with 401; org permissions: who may do what, 403 otherwise."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import pytest
from conftest import (
    API,
    SigningKey,
    World,
    add_org,
    assert_error,
    claims_for,
    running_app,
    sql,
)

pytestmark = pytest.mark.both_engines


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = (
        b"" if secret is None else hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    )
    return f"{signing_input}.{b64(signature)}"


def list_keys(world: World, token: str) -> Any:
    return world.client.get(
        f"{API}?org_id={world.org_id}", headers={"authorization": f"Bearer {token}"}
    )


def test_a_valid_token_is_accepted(world: World, rsa_key: SigningKey) -> None:
    assert list_keys(world, rsa_key.sign(claims_for(world.admin))).status_code == 200


@pytest.mark.parametrize(
    ("attack", "fragment"),
    [
        ("alg_none", "algorithm"),
        ("alg_none_upper", "algorithm"),
        ("hs256_with_public_key", "algorithm"),
        ("expired", "expired"),
        ("not_yet_valid", "not valid yet"),
        ("wrong_key", "signature"),
        ("missing_sub", "sub"),
        ("missing_exp", "exp"),
        ("empty_sub", "sub"),
        ("numeric_sub", "sub"),
        ("audience_not_configured", "audience"),
        ("garbage", "not a JWT"),
        ("tampered_payload", "signature"),
        ("es256_token_for_rsa_key", "algorithm"),
    ],
)
def test_jwt_attacks_are_401(
    world: World,
    rsa_key: SigningKey,
    other_rsa_key: SigningKey,
    ec_key: SigningKey,
    attack: str,
    fragment: str,
) -> None:
    good = claims_for(world.admin)
    now = int(time.time())
    tokens = {
        "alg_none": forge({"alg": "none", "typ": "JWT"}, good, None),
        "alg_none_upper": forge({"alg": "NONE", "typ": "JWT"}, good, None),
        "hs256_with_public_key": forge({"alg": "HS256", "typ": "JWT"}, good, rsa_key.public_pem),
        "expired": rsa_key.sign({**good, "exp": now - 60, "iat": now - 120}),
        "not_yet_valid": rsa_key.sign({**good, "nbf": now + 120}),
        "wrong_key": other_rsa_key.sign(good, headers={"kid": rsa_key.kid}),
        "missing_sub": rsa_key.sign({k: v for k, v in good.items() if k != "sub"}),
        "missing_exp": rsa_key.sign({k: v for k, v in good.items() if k != "exp"}),
        "empty_sub": rsa_key.sign({**good, "sub": ""}),
        "numeric_sub": rsa_key.sign({**good, "sub": 12}),
        "audience_not_configured": rsa_key.sign({**good, "aud": "someone-else"}),
        "garbage": "not-a-jwt",
        "tampered_payload": None,
        "es256_token_for_rsa_key": ec_key.sign(good),
    }
    if attack == "tampered_payload":
        header, _payload, signature = rsa_key.sign(good).split(".")
        evil = b64(json.dumps({**good, "sub": "someone_else"}).encode())
        tokens[attack] = f"{header}.{evil}.{signature}"
    response = list_keys(world, tokens[attack])
    assert_error(response, 401, fragment)
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_leeway_tolerates_small_clock_skew(world: World, rsa_key: SigningKey) -> None:
    now = int(time.time())
    token = rsa_key.sign({**claims_for(world.admin), "exp": now - 2, "nbf": now + 2})
    assert list_keys(world, token).status_code == 200


@pytest.mark.parametrize(
    "header",
    ["", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Token abc", "bearer"],
)
def test_missing_or_other_schemes_are_401(world: World, header: str) -> None:
    headers = {"authorization": header} if header else {}
    response = world.client.get(f"{API}?org_id={world.org_id}", headers=headers)
    assert_error(response, 401, "bearer")


def test_issuer_and_authorized_parties(make_settings, rsa_key: SigningKey) -> None:
    settings = make_settings(
        auth={
            "issuer": "https://clerk.example.com",
            "authorized_parties": ["https://game.example.com"],
        }
    )
    with running_app(settings) as client:
        world = World(
            client, settings, add_org(settings, members={"u": "member"}), "u", "u", rsa_key
        )
        base = {**claims_for("u"), "iss": "https://clerk.example.com"}
        assert list_keys(world, rsa_key.sign(base)).status_code == 200
        assert (
            list_keys(world, rsa_key.sign({**base, "azp": "https://game.example.com"})).status_code
            == 200
        )
        assert_error(
            list_keys(world, rsa_key.sign({**base, "iss": "https://evil.example.com"})),
            401,
            "issuer",
        )
        no_iss = {k: v for k, v in base.items() if k != "iss"}
        assert_error(list_keys(world, rsa_key.sign(no_iss)), 401, "iss")
        assert_error(
            list_keys(world, rsa_key.sign({**base, "azp": "https://evil.example.com"})), 401, "azp"
        )


def test_audience_when_configured(make_settings, rsa_key: SigningKey) -> None:
    settings = make_settings(auth={"audience": "dailyplay"})
    with running_app(settings) as client:
        world = World(
            client, settings, add_org(settings, members={"u": "member"}), "u", "u", rsa_key
        )
        assert (
            list_keys(world, rsa_key.sign({**claims_for("u"), "aud": "dailyplay"})).status_code
            == 200
        )
        assert_error(
            list_keys(world, rsa_key.sign({**claims_for("u"), "aud": "other"})), 401, "audience"
        )
        assert_error(list_keys(world, rsa_key.sign(claims_for("u"))), 401, "aud")


def test_es256_public_key(make_settings, ec_key: SigningKey, rsa_key: SigningKey, tmp_path) -> None:
    pem = tmp_path / "ec.pem"
    pem.write_bytes(ec_key.public_pem)
    settings = make_settings(auth={"jwt_public_key": str(pem)})
    with running_app(settings) as client:
        world = World(client, settings, add_org(settings, members={"u": "admin"}), "u", "u", ec_key)
        assert list_keys(world, ec_key.sign(claims_for("u"))).status_code == 200
        assert_error(list_keys(world, rsa_key.sign(claims_for("u"))), 401, "algorithm")


def test_no_auth_configured_refuses_every_bearer_request(
    make_settings, rsa_key: SigningKey
) -> None:
    settings = make_settings(auth={"jwt_public_key": ""})
    with running_app(settings) as client:
        org = add_org(settings, members={"u": "admin"})
        token = rsa_key.sign(claims_for("u"))
        for response in (
            client.get(f"{API}?org_id={org}", headers={"authorization": f"Bearer {token}"}),
            client.get(f"{API}?org_id={org}"),
            client.post(
                API, json={"org_id": org, "name": "x"}, headers={"authorization": f"Bearer {token}"}
            ),
        ):
            assert_error(response, 401, "not configured")
        assert sql(settings, "SELECT count(*) FROM api_keys") == [(0,)]


# --- who may act for which organization ---------------------------------------------------------

V1_ADMIN = {"org_id": "org_acme", "org_role": "org:admin"}
V1_MEMBER = {"org_id": "org_acme", "org_role": "org:member"}
V2_ADMIN = {"o": {"id": "org_acme", "rol": "admin", "slg": "acme"}}
V2_MEMBER = {"o": {"id": "org_acme", "rol": "member", "slg": "acme"}}
V1_OTHER_ORG_ADMIN = {"org_id": "org_other", "org_role": "org:admin"}

# principal -> (user, extra claims, may list, may manage)
PRINCIPALS: dict[str, tuple[str | None, dict[str, Any], bool, bool]] = {
    "no token": (None, {}, False, False),
    "bad token": ("__bad__", {}, False, False),
    "stranger": ("user_stranger", {}, False, False),
    "other org's admin": ("user_other_admin", {}, False, False),
    "other org's admin claim": ("user_stranger", V1_OTHER_ORG_ADMIN, False, False),
    "member": ("user_member", {}, True, False),
    "admin": ("user_admin", {}, True, True),
    "clerk v1 admin": ("user_clerk", V1_ADMIN, True, True),
    "clerk v1 member": ("user_clerk", V1_MEMBER, True, False),
    "clerk v2 admin": ("user_clerk", V2_ADMIN, True, True),
    "clerk v2 member": ("user_clerk", V2_MEMBER, True, False),
    "member with v1 admin claim": ("user_member", V1_ADMIN, True, True),
}


@pytest.fixture
def matrix_world(world: World, settings) -> tuple[World, dict[str, Any]]:
    sql(settings, "UPDATE orgs SET external_id = 'org_acme' WHERE id = ?", (world.org_id,))
    add_org(settings, "Other", external_id="org_other", members={"user_other_admin": "admin"})
    key = world.create_key()
    return world, key


def _headers(world: World, principal: str) -> dict[str, str]:
    user, extra, _, _ = PRINCIPALS[principal]
    if user is None:
        return {}
    if user == "__bad__":
        return {"authorization": "Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2lnbmF0dXJl"}
    return world.bearer(user, **extra)


@pytest.mark.parametrize("principal", list(PRINCIPALS))
@pytest.mark.parametrize("operation", ["list", "create", "patch", "delete"])
def test_authorization_matrix(
    matrix_world: tuple[World, dict[str, Any]], principal: str, operation: str
) -> None:
    world, key = matrix_world
    user, _extra, may_list, may_manage = PRINCIPALS[principal]
    allowed = may_list if operation == "list" else may_manage
    headers = _headers(world, principal)
    before = sql(world.settings, "SELECT * FROM api_keys ORDER BY id")
    if operation == "list":
        response = world.client.get(f"{API}?org_id={world.org_id}", headers=headers)
    elif operation == "create":
        response = world.client.post(
            API, json={"org_id": world.org_id, "name": "new"}, headers=headers
        )
    elif operation == "patch":
        response = world.client.patch(
            API, json={"id": key["id"], "org_id": world.org_id, "is_active": False}, headers=headers
        )
    else:
        response = world.client.delete(
            f"{API}?id={key['id']}&org_id={world.org_id}", headers=headers
        )
    if allowed:
        assert response.status_code == 200, response.text
        return
    expected = 401 if user in (None, "__bad__") else 403
    assert_error(response, expected)
    assert sql(world.settings, "SELECT * FROM api_keys ORDER BY id") == before


def test_unknown_org_is_403(world: World) -> None:
    assert_error(world.client.get(f"{API}?org_id=424242", headers=world.bearer()), 403, "424242")
    assert_error(
        world.client.post(API, json={"org_id": 424242, "name": "x"}, headers=world.bearer()), 403
    )


def test_removed_member_loses_access_at_once(world: World) -> None:
    assert (
        world.client.get(
            f"{API}?org_id={world.org_id}", headers=world.bearer(world.member)
        ).status_code
        == 200
    )
    sql(world.settings, "DELETE FROM org_members WHERE user_id = ?", (world.member,))
    assert_error(
        world.client.get(f"{API}?org_id={world.org_id}", headers=world.bearer(world.member)), 403
    )
