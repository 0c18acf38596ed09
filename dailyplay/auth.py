"""Bearer JWT verification (Clerk session tokens) and who may act for which organization."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.exceptions import InvalidSubjectError
from jwt.types import Options

from .config import AuthSettings, ConfigError
from .errors import ApiError
from .jwks import JwksUnavailable, RemoteKeySet
from .storage import Store

# Asymmetric only: `none` and HS* are never accepted, whatever the token header says.
ALLOWED_ALGORITHMS = ("RS256", "ES256")
MAX_TOKEN_BYTES = 8192


@dataclass(frozen=True)
class Principal:
    """A verified bearer token: the user and the active organization claims it carries."""

    user_id: str
    claims: dict[str, Any]

    def claimed_org_role(self, external_id: str | None) -> str | None:
        """'admin' or 'member' if the token's active organization is external_id, else None.

        Clerk v1 session claims: org_id / org_role ('org:admin', 'org:member', custom roles).
        Clerk v2: o = {id, rol ('admin', ...), slg}.
        """
        if not external_id:
            return None
        v2 = self.claims.get("o")
        if isinstance(v2, dict) and v2.get("id") == external_id:
            return "admin" if v2.get("rol") == "admin" else "member"
        if self.claims.get("org_id") == external_id:
            return "admin" if self.claims.get("org_role") == "org:admin" else "member"
        return None


def _algorithm_for_key(key: Any) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    raise ConfigError("auth.jwt_public_key must be an RSA or EC P-256 public key")


class JwtVerifier:
    """Verifies Clerk session JWTs against a PEM key or a JWKS URL; fails closed."""

    def __init__(self, settings: AuthSettings):
        self.settings = settings
        self._static_key: Any = None
        self._static_alg = ""
        self._jwks: RemoteKeySet | None = None
        if settings.jwt_public_key:
            path = Path(settings.jwt_public_key)
            try:
                self._static_key = load_pem_public_key(path.read_bytes())
            except OSError as exc:
                raise ConfigError(
                    f"cannot read auth.jwt_public_key {path}: {exc.strerror}"
                ) from None
            except ValueError:
                raise ConfigError(f"auth.jwt_public_key {path} is not a PEM public key") from None
            self._static_alg = _algorithm_for_key(self._static_key)
        elif settings.jwks_url:
            self._jwks = RemoteKeySet(
                settings.jwks_url,
                timeout_seconds=settings.jwks_timeout_seconds,
                cache_seconds=settings.jwks_cache_seconds,
            )

    @property
    def configured(self) -> bool:
        return self._static_key is not None or self._jwks is not None

    async def verify(self, token: str) -> Principal:
        """The principal of a valid token; ApiError 401 (or 503 if the JWKS is unreachable)."""
        if not self.configured:
            raise ApiError(
                401,
                "bearer authentication is not configured on this server (auth.jwks_url or "
                "auth.jwt_public_key)",
                kind="bearer_not_configured",
            )
        if not token or len(token) > MAX_TOKEN_BYTES:
            raise ApiError(401, "invalid bearer token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise ApiError(401, "invalid bearer token: not a JWT") from None
        alg = header.get("alg")
        if alg not in ALLOWED_ALGORITHMS:
            raise ApiError(401, "invalid bearer token: signing algorithm not accepted")
        if self._static_key is not None:
            key, algorithms = self._static_key, [self._static_alg]
        else:
            key, algorithms = await self._jwks_key(header)
        if alg not in algorithms:
            raise ApiError(401, "invalid bearer token: algorithm does not match the signing key")
        options: Options = {
            "require": ["exp", "sub"],
            "verify_aud": bool(self.settings.audience),
        }
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=algorithms,
                issuer=self.settings.issuer or None,
                audience=self.settings.audience or None,
                leeway=self.settings.leeway_seconds,
                options=options,
            )
        except jwt.ExpiredSignatureError:
            raise ApiError(401, "invalid bearer token: expired", kind="bearer_expired") from None
        except jwt.ImmatureSignatureError:
            raise ApiError(401, "invalid bearer token: not valid yet (nbf/iat)") from None
        except jwt.InvalidIssuerError:
            raise ApiError(401, "invalid bearer token: wrong issuer") from None
        except jwt.InvalidAudienceError:
            raise ApiError(401, "invalid bearer token: wrong audience") from None
        except jwt.MissingRequiredClaimError as exc:
            raise ApiError(401, f"invalid bearer token: missing claim '{exc.claim}'") from None
        except InvalidSubjectError:
            raise ApiError(401, "invalid bearer token: 'sub' must be a non-empty string") from None
        except jwt.InvalidSignatureError:
            raise ApiError(401, "invalid bearer token: bad signature") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise ApiError(401, "invalid bearer token") from None
        if not self.settings.audience and "aud" in claims:
            raise ApiError(401, "invalid bearer token: unexpected audience")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > 255:
            raise ApiError(401, "invalid bearer token: 'sub' must be a non-empty string")
        azp = claims.get("azp")
        parties = self.settings.authorized_parties
        if parties and azp is not None and azp not in parties:
            raise ApiError(401, "invalid bearer token: authorized party (azp) not allowed")
        return Principal(user_id=sub, claims=claims)

    async def aclose(self) -> None:
        """Stop a JWKS fetch in flight (at shutdown)."""
        if self._jwks is not None:
            await self._jwks.aclose()

    async def _jwks_key(self, header: dict[str, Any]) -> tuple[Any, list[str]]:
        assert self._jwks is not None
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise ApiError(401, "invalid bearer token: no key id (kid)")
        try:
            jwk = await self._jwks.signing_key(kid)
        except JwksUnavailable as exc:
            raise ApiError(
                503,
                f"cannot verify the bearer token: {exc.reason}; try again later",
                headers={"Retry-After": str(exc.retry_after)},
            ) from None
        if jwk is None:
            raise ApiError(401, "invalid bearer token: unknown signing key")
        if jwk.algorithm_name not in ALLOWED_ALGORITHMS:
            raise ApiError(401, "invalid bearer token: signing key type not accepted")
        return jwk.key, [jwk.algorithm_name]


async def org_role(db: Store, principal: Principal, org_id: int) -> str | None:
    """The principal's role in org_id ('admin' beats 'member'), or None if not allowed at all."""
    org = await db.get_org(org_id)
    if org is None:
        return None
    roles = {
        await db.get_member_role(org_id, principal.user_id),
        principal.claimed_org_role(org.external_id),
    }
    if "admin" in roles:
        return "admin"
    if "member" in roles:
        return "member"
    return None


async def require_org_role(db: Store, principal: Principal, org_id: int, need_admin: bool) -> None:
    """ApiError 403 unless the principal may act for org_id (as admin when need_admin)."""
    role = await org_role(db, principal, org_id)
    if role is None:
        raise ApiError(403, f"you are not a member of organization {org_id}", kind="not_member")
    if need_admin and role != "admin":
        raise ApiError(
            403, f"this action needs the admin role in organization {org_id}", kind="not_admin"
        )
