"""The upstream's instance listing: one `GET /instance/fetchInstances`, and what it means.

`fetch_listing` is the only I/O: one request with the global key in the `apikey` header,
redirects refused (a redirect would carry the key to another place), a timeout, a size limit,
and every failure translated into a `DiscoveryError` with a bounded `kind` and a message that
names the URL and the reason, never the key. `parse_listing` is pure: bytes in, instances
out. The answer's shape is described in docs/discovery.md.
"""

from __future__ import annotations

import base64
import http.client
import math
import re
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import orjson

from forwarder.config import Secret
from forwarder.discovery_config import DiscoveryConfig
from forwarder.errors import DiscoveryError, TLSFileError
from forwarder.tls import client_context

# Bounded `kind` label values of forwarder_discovery_errors_total (see README, Discovery).
ERROR_KINDS = (
    "timeout",  # no answer within request_timeout
    "connection",  # refused, reset, DNS, cut before a complete answer
    "tls",  # certificate or handshake refused
    "unauthorized",  # 401/403: the global key is wrong or missing
    "http_5xx",  # the server failed
    "http_status",  # any other unexpected status (404: wrong api_url, redirects…)
    "invalid_json",  # not JSON, not an array, or too large
    "invalid_instance",  # an element without a usable name or token (the others are used)
    "suspicious_drop",  # more than half the instances vanished at once: kept, not believed
    "refused",  # an instance clashes with a static source or another discovery's instance
    "key",  # the API key file or credential cannot be read
)
MAX_LISTING_BYTES = 64 * 1024 * 1024  # ~60,000 instances; a runaway body is an error
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # as [[sources]] names
_JWT_RE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class Instance:
    """One usable element of a listing."""

    name: str
    token: Secret  # Auth.token: the instance JWT the WebSocket accepts
    status: str | None  # connectionStatus (ONLINE/OFFLINE), informational only
    expires_at: float | None  # the token's exp claim (unverified), None: never expires


@dataclass(frozen=True)
class Listing:
    """A parsed answer: the usable instances, and the elements that were not usable.

    `invalid` maps a name (None when even the name is unusable) to the reason. A named
    invalid element still shows the instance exists: it is not counted as absent.
    """

    instances: dict[str, Instance]
    invalid: dict[str | None, str]


def parse_listing(body: bytes) -> Listing:
    """Parse a fetchInstances answer. Raises DiscoveryError("invalid_json") unless it is a
    JSON array; elements that are not usable are reported in `Listing.invalid`."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise DiscoveryError("invalid_json", f"the answer is not JSON ({exc})") from None
    if not isinstance(doc, list):
        raise DiscoveryError(
            "invalid_json",
            f"the answer is a JSON {type(doc).__name__}, not the array of instances upstream "
            "sends: is api_url the CodeChat whatsapp-api server?",
        )
    instances: dict[str, Instance] = {}
    invalid: dict[str | None, str] = {}
    for element in doc:
        name, problem, instance = _element(element)
        if name is not None and (name in instances or name in invalid):
            instances.pop(name, None)  # names are unique upstream: which one would be right?
            invalid[name] = "listed twice"
        elif instance is not None:
            instances[instance.name] = instance
        else:
            invalid.setdefault(name, problem or "unusable")
    return Listing(instances, invalid)


def _element(element: object) -> tuple[str | None, str | None, Instance | None]:
    """(name or None, problem or None, instance or None) for one array element."""
    if not isinstance(element, dict):
        return None, f"an element is a {type(element).__name__}, not an object", None
    name = element.get("name")
    if not isinstance(name, str) or not name:
        return None, "an element has no name", None
    if not _NAME_RE.match(name):
        return name, "the name is not usable as a source name (1-64 of A-Z a-z 0-9 _ . -)", None
    auth = element.get("Auth")
    token = auth.get("token") if isinstance(auth, dict) else None
    if not isinstance(token, str) or not _JWT_RE.match(token):
        return name, "no Auth.token, or it is not a JWT", None
    claims = _claims(token)
    claimed = claims.get("instanceName")
    if claimed is not None and claimed != name:
        # The upstream files a connection under the token's instanceName: these frames
        # would be another instance's.
        return name, "its token names another instance (instanceName claim)", None
    status = element.get("connectionStatus")
    return (
        name,
        None,
        Instance(
            name=name,
            token=Secret(token),
            status=status if isinstance(status, str) else None,
            expires_at=_exp(claims),
        ),
    )


def _claims(token: str) -> dict[str, Any]:
    """A JWT's payload, unverified (we are not the audience); {} when unreadable."""
    segment = token.split(".")[1]
    try:
        claims = orjson.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except ValueError:
        return {}
    return claims if isinstance(claims, dict) else {}


def _exp(claims: dict[str, Any]) -> float | None:
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return float(exp) if math.isfinite(exp) else None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """urllib would follow a redirect and send our headers, the key included, along."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def fetch_listing(cfg: DiscoveryConfig, key: Secret) -> bytes:
    """One GET of the listing; returns the body of a 200. Blocks up to request_timeout
    (per connect and per read). Raises DiscoveryError; never puts the key in a message."""
    url = cfg.listing_url
    handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
    if url.startswith("https:"):
        try:
            context = client_context(cfg.ca_file, cfg.client_cert, cfg.client_key)
        except TLSFileError as exc:
            raise DiscoveryError("tls", f"{url}: TLS files: {exc}") from None
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    # The scheme is http or https: config.py checked api_url.
    request = urllib.request.Request(  # noqa: S310
        url, headers={"apikey": key.reveal(), "Accept": "application/json"}
    )
    try:
        with opener.open(request, timeout=cfg.request_timeout) as response:
            body: bytes = response.read(MAX_LISTING_BYTES + 1)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise _status_error(url, exc.code) from None
    except urllib.error.URLError as exc:
        raise _connection_error(url, exc.reason) from None
    except (TimeoutError, OSError, http.client.HTTPException) as exc:
        raise _connection_error(url, exc) from None
    if len(body) > MAX_LISTING_BYTES:
        raise DiscoveryError(
            "invalid_json", f"{url}: the answer is larger than {MAX_LISTING_BYTES} bytes"
        )
    return body


def _status_error(url: str, status: int) -> DiscoveryError:
    if status in (401, 403):
        return DiscoveryError(
            "unauthorized",
            f"{url} answered HTTP {status}: the API key is wrong or missing; discovery needs "
            "the server's global key (AUTHENTICATION_GLOBAL_AUTH_TOKEN), not an instance token",
        )
    if 500 <= status <= 599:
        return DiscoveryError("http_5xx", f"{url} answered HTTP {status} (a server error)")
    hint = " (a redirect: set api_url to where it points)" if 300 <= status < 400 else ""
    if status == 404:
        hint = " (is api_url the base URL of the CodeChat server?)"
    return DiscoveryError("http_status", f"{url} answered HTTP {status}{hint}")


def _connection_error(url: str, reason: object) -> DiscoveryError:
    if isinstance(reason, TimeoutError):
        return DiscoveryError("timeout", f"{url}: no answer in time")
    if isinstance(reason, ssl.SSLCertVerificationError):
        return DiscoveryError(
            "tls",
            f"{url}: the server's certificate was refused ({reason.verify_message}): check "
            "ca_file and the host name in api_url",
        )
    if isinstance(reason, ssl.SSLError):
        return DiscoveryError("tls", f"{url}: TLS handshake failed ({_describe(reason)})")
    if isinstance(reason, BaseException):
        return DiscoveryError("connection", f"{url}: {_describe(reason)}")
    return DiscoveryError("connection", f"{url}: {str(reason)[:200]}")


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:200]
