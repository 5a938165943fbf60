"""Upstream-style instance tokens (HS256 JWTs) for the simulator. PyJWT lives only here."""

from __future__ import annotations

import secrets
import time
from typing import Any

import jwt
from jwt.algorithms import HMACAlgorithm

__all__ = ["DEV_SECRET", "JWT_CODEC", "mint_token", "token_instance_unverified"]

#: Development secret used when neither ``--secret`` nor ``FORWARDER_SIM_SECRET`` is given.
#: It is public (it is in this file), so only use it on loopback.
DEV_SECRET = "forwarder-simulator-development-secret-0123456789"  # noqa: S105 - public by design


class _QuietHMAC(HMACAlgorithm):
    """HMAC without PyJWT's short-key warning: upstream secrets are whatever operators set."""

    def check_key_length(self, key: bytes) -> str | None:
        return None


def _make_jwt() -> jwt.PyJWT:
    codec = jwt.PyJWT()
    # PyJWT warns (an error under ``-W error``) for HMAC keys under 32 bytes; upstream's
    # jsonwebtoken does not, and short development secrets are common, so swap the algorithms.
    # PyJWT exposes no public hook for this. Before 2.11 it had neither the warning nor this
    # attribute, and its plain codec is what we want.
    jws = getattr(codec, "_jws", None)
    if jws is None:
        return codec
    for name, digest in (
        ("HS256", HMACAlgorithm.SHA256),
        ("HS384", HMACAlgorithm.SHA384),
        ("HS512", HMACAlgorithm.SHA512),
    ):
        jws.unregister_algorithm(name)
        jws.register_algorithm(name, _QuietHMAC(digest))
    return codec


JWT_CODEC = _make_jwt()
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _ulid(now: float) -> str:
    value = (int(now * 1000) << 80) | secrets.randbits(80)
    return "".join(_CROCKFORD[(value >> (5 * i)) & 31] for i in reversed(range(26)))


def mint_token(
    instance: str, secret: str, expires_in: float | None = None, now: float | None = None
) -> str:
    """Return an HS256 JWT shaped like upstream's instance token.

    Claims, in upstream order: ``instanceName``, ``apiName`` (``"whatsapp-api"``), ``tokenId``
    (a ULID), ``iat``, ``exp`` (only when ``expires_in`` is given; negative values give an
    already-expired token) and ``sub`` (``"g-t"``). ``now`` defaults to the wall clock.
    """
    issued = time.time() if now is None else now
    claims: dict[str, Any] = {
        "instanceName": instance,
        "apiName": "whatsapp-api",
        "tokenId": _ulid(issued),
        "iat": int(issued),
    }
    if expires_in is not None:
        claims["exp"] = int(issued + expires_in)
    claims["sub"] = "g-t"
    return JWT_CODEC.encode(claims, secret, algorithm="HS256")


def token_instance_unverified(token: str) -> str | None:
    """Best-effort instance name from a token without checking it (for per-slot reject stats)."""
    try:
        claims = JWT_CODEC.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    name = claims.get("instanceName")
    return name if isinstance(name, str) else None
