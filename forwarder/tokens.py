"""What forwarder knows about a token: that it is a JWT, and its `exp` claim.

The upstream accepts only JWTs (three base64url segments; anything else gets the same bare
HTTP 401 as a wrong signature, see docs/upstream.md section 1). forwarder checks the shape at
load, so a wrong file is a configuration error instead of an endless series of 401s, and
reads the `exp` claim without verifying the signature: it has no key, and only wants to warn
before the upstream starts refusing reconnects. Nothing here raises with, logs or returns
the token itself.
"""

from __future__ import annotations

import base64
import math
import re
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from forwarder.config import Secret

_JWT_RE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")


def is_jwt(text: str) -> bool:
    """Whether `text` has the shape the upstream accepts: header.payload.signature."""
    return _JWT_RE.match(text) is not None


def jwt_claims(text: str) -> dict[str, Any] | None:
    """The payload of a JWT as a dict, unverified; None if it is not a JWT with JSON claims.

    Never raises.
    """
    parts = text.split(".")
    if len(parts) != 3:
        return None
    segment = parts[1]
    try:
        claims = orjson.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except ValueError:  # binascii.Error and orjson.JSONDecodeError are ValueErrors
        return None
    return claims if isinstance(claims, dict) else None


def token_expiry(token: Secret) -> float | None:
    """The `exp` claim of a JWT, read without verifying the signature; None if absent.

    Never raises and never puts the token into an exception or a log line.
    """
    claims = jwt_claims(token.reveal())
    exp = claims.get("exp") if claims is not None else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    value = float(exp)
    return value if math.isfinite(value) else None
