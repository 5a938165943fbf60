"""The simulator's REST side: the instance table and ``GET /instance/fetchInstances``.

Modelled on upstream ``whatsapp-api`` 1.3.7 (see docs/discovery.md):

* ``GET /instance/fetchInstances`` needs the header ``apikey`` equal to the server's global key
  (``AUTHENTICATION_GLOBAL_AUTH_TOKEN``). Without the header the guard answers **403**; any
  other value falls through to instance-JWT checking, which this route cannot pass: **401**.
  The answer is always a JSON array of every instance in the table (also with
  ``?instanceName=NAME``; an unknown name is a 400), each element shaped like the database row:
  ``id``, ``name``, ``description``, ``connectionStatus``, ``ownerJid``, ``profilePicUrl``,
  ``createdAt``, ``updatedAt``, ``Auth: {id, token, createdAt, updatedAt}``, ``Webhook``.
* ``PUT /instance/refreshToken/NAME`` with ``{"oldToken": JWT}`` needs no key; it accepts an
  expired old token whose ``tokenId`` matches the stored one and answers 201 with the new
  Auth row. After one refresh the old token can no longer refresh (its tokenId is stale).
* Creating or deleting an instance announces nothing on the WebSocket, and a deleted
  instance's token still passes the WebSocket's purely cryptographic check.

Everything here is sans-I/O and touched only on the simulator's loop thread: `RestApi.handle`
turns a request into a `Reply`, which the server writes (or, for injected faults, withholds).
"""

from __future__ import annotations

import hmac
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
import orjson

from forwarder_sim.tokens import JWT_CODEC, mint_token

__all__ = ["API_FAULTS", "DEV_API_KEY", "InstanceTable", "Reply", "RestApi"]

#: Global API key used when neither ``--api-key`` nor ``FORWARDER_SIM_API_KEY`` is given.
#: Public (it is in this file): only for loopback.
DEV_API_KEY = "forwarder-simulator-development-api-key"

#: What ``api_fault`` can make the listing route do instead of answering normally:
#: ``status`` (an HTTP error status, default 503), ``garbage`` (200 with a body that is not
#: JSON), ``object`` (200 with a JSON object, not an array), ``empty`` (200 ``[]``), ``reset``
#: (the connection is cut without an answer), ``hang`` (no answer for ``seconds``, default 60).
API_FAULTS = ("status", "garbage", "object", "empty", "reset", "hang")

LISTING_PATH = "/instance/fetchInstances"
REFRESH_PREFIX = "/instance/refreshToken/"


def _iso(unix: float) -> str:
    """Upstream's Date serialisation: ISO 8601 in UTC with milliseconds and a Z."""
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(unix)) + f".{int(unix * 1000) % 1000:03d}Z"
    )


@dataclass
class _Instance:
    id: int
    name: str
    status: str  # connectionStatus: ONLINE | OFFLINE
    token: str
    auth_id: int
    created: float
    updated: float
    auth_created: float
    auth_updated: float

    def row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "description": None,
            "connectionStatus": self.status,
            "ownerJid": f"5511{900000000 + self.id}@s.whatsapp.net"
            if self.status == "ONLINE"
            else None,
            "profilePicUrl": None,
            "createdAt": _iso(self.created),
            "updatedAt": _iso(self.updated),
            "Auth": self.auth_row(),
            "Webhook": None,
        }

    def auth_row(self) -> dict[str, Any]:
        return {
            "id": self.auth_id,
            "token": self.token,
            "createdAt": _iso(self.auth_created),
            "updatedAt": _iso(self.auth_updated),
        }


class InstanceTable:
    """The instances the server knows (upstream's database table). Not thread-safe."""

    def __init__(self, secret: str, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret
        self._clock = clock
        self._rows: dict[str, _Instance] = {}
        self._next_id = 1

    def __contains__(self, name: object) -> bool:
        return name in self._rows

    def names(self) -> list[str]:
        return list(self._rows)

    def create(
        self, name: str, expires_in: float | None = None, status: str = "ONLINE"
    ) -> dict[str, Any]:
        """Add an instance with a fresh token; returns its row. ValueError if it exists."""
        if not name:
            raise ValueError("an instance needs a name")
        if name in self._rows:
            raise ValueError(f"instance {name!r} already exists")
        if status not in ("ONLINE", "OFFLINE"):
            raise ValueError("status must be ONLINE or OFFLINE")
        now = self._clock()
        row = _Instance(
            id=self._next_id,
            name=name,
            status=status,
            token=mint_token(name, self._secret, expires_in, now),
            auth_id=self._next_id,
            created=now,
            updated=now,
            auth_created=now,
            auth_updated=now,
        )
        self._next_id += 1
        self._rows[name] = row
        return row.row()

    def delete(self, name: str) -> None:
        """Remove an instance from the table (its tokens keep passing the WebSocket check)."""
        if self._rows.pop(name, None) is None:
            raise KeyError(f"instance {name!r} not found")

    def rotate(self, name: str, expires_in: float | None = None) -> dict[str, Any]:
        """Store a new token for the instance; returns the new Auth row."""
        row = self._rows.get(name)
        if row is None:
            raise KeyError(f"instance {name!r} not found")
        now = self._clock()
        row.token = mint_token(name, self._secret, expires_in, now)
        row.auth_updated = row.updated = now
        return row.auth_row()

    def set_status(self, name: str, status: str) -> None:
        row = self._rows.get(name)
        if row is None:
            raise KeyError(f"instance {name!r} not found")
        if status not in ("ONLINE", "OFFLINE"):
            raise ValueError("status must be ONLINE or OFFLINE")
        row.status = status
        row.updated = self._clock()

    def token(self, name: str) -> str:
        return self._rows[name].token

    def rows(self, name: str | None = None) -> list[dict[str, Any]]:
        if name is None:
            return [r.row() for r in self._rows.values()]
        return [self._rows[name].row()]

    def refresh(self, name: str, old_token: object) -> dict[str, Any] | None:
        """Upstream's refreshToken: the old token must be ours (signature checked, expiry not)
        and carry the stored tokenId. Returns the new Auth row, or None if refused."""
        row = self._rows.get(name)
        if row is None or not isinstance(old_token, str):
            return None
        try:
            old = JWT_CODEC.decode(
                old_token, self._secret, algorithms=["HS256"], options={"verify_exp": False}
            )
            stored = JWT_CODEC.decode(
                row.token, self._secret, algorithms=["HS256"], options={"verify_exp": False}
            )
        except jwt.PyJWTError:
            return None
        if old.get("tokenId") != stored.get("tokenId") or old.get("instanceName") != name:
            return None
        exp = stored.get("exp")
        iat = stored.get("iat")
        expires_in = float(exp - iat) if isinstance(exp, int) and isinstance(iat, int) else None
        return self.rotate(name, expires_in)


@dataclass(frozen=True)
class Reply:
    """What to answer: an HTTP status and JSON body, or (faults) a cut or a long silence."""

    status: str
    body: bytes
    reset: bool = False  # cut the connection without answering
    delay: float = 0.0  # answer only after this many seconds


def _json(status: str, doc: object) -> Reply:
    return Reply(status, orjson.dumps(doc))


class RestApi:
    """Routes ``/instance/...`` requests; holds the injected API faults. Not thread-safe."""

    def __init__(self, table: InstanceTable, api_key: str) -> None:
        self.table = table
        self._api_key = api_key
        self._faults: list[list[Any]] = []  # [mode, remaining (-1 = until heal), params]
        self.requests: dict[str, int] = {}  # by outcome, for stats
        self.listings = 0  # listing answers actually served (200, faults excluded)

    def handles(self, path: str) -> bool:
        return path == LISTING_PATH or path.startswith(REFRESH_PREFIX)

    def fault(self, mode: str, count: int = 1, status: int = 503, seconds: float = 60.0) -> int:
        """Make the next ``count`` listing requests (-1: all until `heal`) fail as ``mode``."""
        if mode not in API_FAULTS:
            raise ValueError(f"unknown API fault {mode!r}; known: {', '.join(API_FAULTS)}")
        if count == 0 or count < -1:
            raise ValueError("count must be positive or -1")
        if not 100 <= status <= 599:
            raise ValueError("status must be an HTTP status code")
        self._faults.append([mode, count, {"status": status, "seconds": seconds}])
        return len(self._faults)

    def heal(self) -> int:
        n = len(self._faults)
        self._faults.clear()
        return n

    def _count(self, outcome: str) -> None:
        self.requests[outcome] = self.requests.get(outcome, 0) + 1

    def handle(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> Reply:
        url = urllib.parse.urlsplit(target)
        if url.path.startswith(REFRESH_PREFIX):
            return self._refresh(
                method, urllib.parse.unquote(url.path[len(REFRESH_PREFIX) :]), body
            )
        if method != "GET":
            self._count("method")
            return _json("404 Not Found", {"status": 404, "message": f"Cannot {method} {url.path}"})
        key = headers.get("apikey")
        if key is None:
            self._count("403")
            return _json(
                "403 Forbidden",
                {"status": 403, "error": "Forbidden", "message": ["Missing global api key"]},
            )
        if not hmac.compare_digest(key.encode(), self._api_key.encode()):
            self._count("401")
            return _json(
                "401 Unauthorized",
                {"status": 401, "error": "Unauthorized", "message": ["Unauthorized"]},
            )
        fault = self._next_fault()
        if fault is not None:
            return fault
        query = dict(urllib.parse.parse_qsl(url.query))
        name = query.get("instanceName")
        if name is not None and name not in self.table:
            self._count("400")
            return _json(
                "400 Bad Request",
                {"status": 400, "error": "Bad Request", "message": ["Instance not found"]},
            )
        self._count("200")
        self.listings += 1
        return _json("200 OK", self.table.rows(name))

    def _next_fault(self) -> Reply | None:
        if not self._faults:
            return None
        rule = self._faults[0]
        mode, params = rule[0], rule[2]
        if rule[1] > 0:
            rule[1] -= 1
            if rule[1] == 0:
                self._faults.pop(0)
        self._count(f"fault:{mode}")
        if mode == "status":
            code = int(params["status"])
            return _json(f"{code} Simulated", {"status": code, "message": ["simulated fault"]})
        if mode == "garbage":
            return Reply("200 OK", b'[{"id": 1, "name": "cut he')
        if mode == "object":
            return _json("200 OK", {"status": 200, "message": "not a list"})
        if mode == "empty":
            return _json("200 OK", [])
        if mode == "reset":
            return Reply("", b"", reset=True)
        return Reply(
            "200 OK", orjson.dumps(self.table.rows()), delay=float(params["seconds"])
        )  # hang

    def _refresh(self, method: str, name: str, body: bytes) -> Reply:
        if method != "PUT":
            self._count("method")
            return _json("404 Not Found", {"status": 404, "message": f"Cannot {method}"})
        try:
            doc = orjson.loads(body) if body.strip() else {}
        except orjson.JSONDecodeError:
            doc = {}
        old = doc.get("oldToken") if isinstance(doc, dict) else None
        if name not in self.table:
            self._count("400")
            return _json("400 Bad Request", {"status": 400, "message": ["Instance not found"]})
        auth = self.table.refresh(name, old)
        if auth is None:
            self._count("refresh_refused")
            return _json("401 Unauthorized", {"status": 401, "message": ["Unauthorized"]})
        self._count("refresh")
        return _json("201 Created", auth)
