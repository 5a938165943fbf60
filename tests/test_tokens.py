"""Tokens: the JWT shape the upstream accepts, and the `exp` claim read without the key."""

from __future__ import annotations

import base64

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from forwarder.config import Secret
from forwarder.tokens import is_jwt, jwt_claims, token_expiry
from forwarder_sim import mint_token

SECRET = "unit-secret"


def test_the_jwt_shape_is_three_base64url_parts() -> None:
    """A minted token passes; a missing part, a space or a padding '=' do not."""
    assert is_jwt(mint_token("main", SECRET))
    assert is_jwt("a.b.")  # an unsigned JWT has an empty signature
    for text in ("a.b", "a.b.c.d", "a .b.c", "a.b=.c", "", "not-a-jwt"):
        assert not is_jwt(text), text


def test_claims_are_decoded_without_the_key() -> None:
    """The claims of a token signed with a key we do not have are readable."""
    claims = jwt_claims(mint_token("main", "someone-elses-secret"))
    assert claims is not None
    assert claims["instanceName"] == "main"
    assert jwt_claims("a.b.c") is None  # not base64url JSON


def test_token_expiry_reads_the_exp_claim_without_the_secret() -> None:
    """exp comes out of a token signed with a secret we do not know; absent exp gives None."""
    token = mint_token("main", "someone-elses-secret", expires_in=600, now=1_800_000_000)
    assert token_expiry(Secret(token)) == 1_800_000_600.0
    assert token_expiry(Secret(mint_token("main", SECRET))) is None


@given(st.text(max_size=200))
def test_token_expiry_never_raises_on_garbage(value: str) -> None:
    """Any string (not a JWT, bad base64, bad JSON, odd exp types) gives a float or None."""
    result = token_expiry(Secret(value))
    assert result is None or isinstance(result, float)


@pytest.mark.parametrize(
    "claims", [{"exp": "soon"}, {"exp": True}, {"exp": None}, [1, 2], {"exp": 1e400}]
)
def test_token_expiry_ignores_an_exp_that_is_not_a_finite_number(claims: object) -> None:
    """Only a finite number is a usable exp."""
    body = base64.urlsafe_b64encode(orjson.dumps(claims, option=orjson.OPT_SERIALIZE_NUMPY))
    token = f"eyJhbGciOiJIUzI1NiJ9.{body.decode().rstrip('=')}.sig"
    assert token_expiry(Secret(token)) is None
