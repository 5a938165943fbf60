"""The lease scripts: each rule once against a real redis-server and once against the model
the fast tests use (tests/fleet_model.py), so both behave the same."""

from __future__ import annotations

import secrets
import time
from typing import Protocol

import pytest
import redis

from forwarder.errors import FleetError
from forwarder.fleet.config import FleetConfig
from forwarder.fleet.keys import FleetKeys, Key, Token, sub_id
from forwarder.fleet.protocol import (
    AcquireStatus,
    ChangeRequest,
    FleetStore,
    HandoverAsk,
    HandoverState,
    HeartbeatRequest,
    MemberRecord,
    ReleaseStatus,
    Renewal,
    RenewReply,
    RenewStatus,
)
from forwarder.fleet.store import CHUNK, RedisFleetStore
from tests.fleet_model import FakeClock, ModelRedis, ModelStore
from tests.helpers import RedisServer, wait_for

CONFIG = FleetConfig(enabled=True, lease_ttl=5.0, renew_interval=1.0, margin=1.0)
KEY: Key = ("main", "messages.upsert")
A = MemberRecord("a", "inc-a", "host-a", 1, 0.0, "test")
B = MemberRecord("b", "inc-b", "host-b", 2, 0.0, "test")


class Backend(Protocol):
    @property
    def store(self) -> FleetStore: ...

    def end_quiet(self) -> None: ...
    def expire_lease(self, key: Key) -> None: ...
    def forget_everything(self) -> None: ...
    def lease(self, key: Key) -> str | None: ...


class RealBackend:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.store = RedisFleetStore(client, CONFIG)
        self.keys = FleetKeys(CONFIG.group)

    def end_quiet(self) -> None:
        """Pretend the epoch began long ago (instead of waiting a lease_ttl)."""
        self.store.heartbeat(HeartbeatRequest(A))  # creates the epoch if missing
        seconds, _ = self.client.time()
        self.client.set(self.keys.epoch, (int(seconds) - 3600) * 1000)

    def expire_lease(self, key: Key) -> None:
        self.client.pexpire(self.keys.lease(key), 1)
        wait_for(lambda: not self.client.exists(self.keys.lease(key)), 5.0, "lease expiry")

    def forget_everything(self) -> None:
        self.client.flushall()  # what a restart without persistence leaves

    def lease(self, key: Key) -> str | None:
        value = self.client.get(self.keys.lease(key))
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)


class ModelBackend:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.redis = ModelRedis(self.clock)
        self.store = ModelStore(self.redis, CONFIG)

    def end_quiet(self) -> None:
        self.redis.current_epoch()
        self.redis.epoch = self.redis.now_ms() - 3_600_000

    def expire_lease(self, key: Key) -> None:
        self.redis.leases[sub_id(key)].expires_ms = self.redis.now_ms()

    def forget_everything(self) -> None:
        self.redis.flush()

    def lease(self, key: Key) -> str | None:
        return self.redis.holder(key)


@pytest.fixture(params=["redis", "model"])
def backend(request: pytest.FixtureRequest, redis_client: redis.Redis) -> Backend:
    """The same contract, on a real redis-server and on the model."""
    if request.param == "redis":
        return RealBackend(redis_client)
    return ModelBackend()


def acquire(backend: Backend, member: MemberRecord, *keys: Key) -> list[Token | None]:
    reply = backend.store.change(member, ChangeRequest(acquire=keys or (KEY,)))
    return [a.token for a in reply.acquired]


def renew(
    backend: Backend, member: MemberRecord, token: Token, successor: bool = False
) -> RenewReply:
    reply = backend.store.heartbeat(HeartbeatRequest(member, (Renewal(KEY, token, successor),)))
    return reply.renewals[0]


def test_heartbeat_lists_live_members_and_refuses_a_second_process_with_one_name(
    backend: Backend,
) -> None:
    """Members appear with their records; a live name used by another process conflicts."""
    backend.store.heartbeat(HeartbeatRequest(A))
    reply = backend.store.heartbeat(HeartbeatRequest(B))
    assert [m.record.name for m in reply.members] == ["a", "b"]
    assert reply.conflict is None
    twin = MemberRecord("a", "inc-other", "host-x", 9, 0.0, "test")
    reply = backend.store.heartbeat(HeartbeatRequest(twin))
    assert reply.conflict is not None
    assert reply.conflict.incarnation == "inc-a"
    assert [m.record.incarnation for m in reply.members if m.record.name == "a"] == ["inc-a"]


def test_a_fresh_epoch_is_quiet_then_the_first_acquirer_wins(backend: Backend) -> None:
    """No acquisition while the epoch is young; then SET NX: one winner, fence 1."""
    backend.store.heartbeat(HeartbeatRequest(A))
    reply = backend.store.change(A, ChangeRequest(acquire=(KEY,)))
    assert reply.acquired[0].status is AcquireStatus.QUIET
    backend.end_quiet()
    (token,) = acquire(backend, A)
    assert token == Token(1, "a", "inc-a")
    reply = backend.store.change(B, ChangeRequest(acquire=(KEY,)))
    assert reply.acquired[0].status is AcquireStatus.HELD
    assert reply.acquired[0].holder == token
    assert backend.lease(KEY) == str(token)


def test_a_lease_is_adopted_not_duplicated_when_the_reply_was_lost(backend: Backend) -> None:
    """Acquiring a lease we already hold returns the same token (same fence)."""
    backend.end_quiet()
    first = acquire(backend, A)
    again = acquire(backend, A)
    assert first == again == [Token(1, "a", "inc-a")]


def test_renew_and_release_compare_the_token(backend: Backend) -> None:
    """Only the holder's exact token renews or releases; anyone else is told 'lost'."""
    backend.end_quiet()
    (token,) = acquire(backend, A)
    assert token is not None
    assert renew(backend, A, token).status is RenewStatus.HELD
    stale = Token(token.fence, "a", "inc-old")
    lost = renew(backend, A, stale)
    assert lost.status is RenewStatus.LOST
    assert lost.holder == token
    reply = backend.store.change(A, ChangeRequest(release=((KEY, stale),)))
    assert reply.released[KEY] is ReleaseStatus.LOST
    assert backend.lease(KEY) == str(token)
    reply = backend.store.change(A, ChangeRequest(release=((KEY, token),)))
    assert reply.released[KEY] is ReleaseStatus.RELEASED
    assert backend.lease(KEY) is None
    (after,) = backend.store.change(B, ChangeRequest(acquire=(KEY,))).acquired
    assert after.token == Token(2, "b", "inc-b")
    assert after.previous is not None
    assert after.previous.released
    assert after.previous.token == token


def test_a_planned_handover_goes_requested_claimed_connected_handed(backend: Backend) -> None:
    """The successor claims with a higher fence, connects, and the release hands it over."""
    backend.end_quiet()
    (token_a,) = acquire(backend, A)
    assert token_a is not None
    ask = HandoverAsk(KEY, token_a, "b")
    assert backend.store.change(A, ChangeRequest(handovers=(ask,))).handovers[KEY] == "requested"
    claim = backend.store.change(B, ChangeRequest(acquire=(KEY,))).acquired[0]
    assert claim.status is AcquireStatus.CLAIMED
    token_b = claim.token
    assert token_b == Token(2, "b", "inc-b")
    assert renew(backend, B, token_b, successor=True).status is RenewStatus.SUCCESSOR
    held = renew(backend, A, token_a)
    assert held.handover is not None
    assert held.handover.state is HandoverState.CLAIMED
    assert backend.store.change(B, ChangeRequest(connected=((KEY, token_b),))).connected[KEY]
    held = renew(backend, A, token_a)
    assert held.handover is not None
    assert held.handover.state is HandoverState.CONNECTED
    assert held.handover.successor == token_b
    reply = backend.store.change(A, ChangeRequest(release=((KEY, token_a),)))
    assert reply.released[KEY] is ReleaseStatus.HANDED
    assert backend.lease(KEY) == str(token_b)
    assert renew(backend, B, token_b, successor=True).status is RenewStatus.PROMOTED
    gone = renew(backend, A, token_a)
    assert gone.status is RenewStatus.LOST
    assert gone.holder == token_b


def test_release_without_a_connected_successor_does_not_hand_over(backend: Backend) -> None:
    """A claimed-but-not-connected successor does not get the lease from a release."""
    backend.end_quiet()
    (token_a,) = acquire(backend, A)
    assert token_a is not None
    backend.store.change(A, ChangeRequest(handovers=(HandoverAsk(KEY, token_a, "b"),)))
    (claim,) = backend.store.change(B, ChangeRequest(acquire=(KEY,))).acquired
    assert claim.token is not None
    reply = backend.store.change(A, ChangeRequest(release=((KEY, token_a),)))
    assert reply.released[KEY] is ReleaseStatus.RELEASED
    assert backend.lease(KEY) is None
    assert renew(backend, B, claim.token, successor=True).status is RenewStatus.LOST


def test_a_move_is_called_off_unless_the_successor_is_already_connected(
    backend: Backend,
) -> None:
    """Cancel removes a claimed move (the successor learns 'lost'); a connected one stays."""
    backend.end_quiet()
    (token_a,) = acquire(backend, A)
    assert token_a is not None
    backend.store.change(A, ChangeRequest(handovers=(HandoverAsk(KEY, token_a, "b"),)))
    (claim,) = backend.store.change(B, ChangeRequest(acquire=(KEY,))).acquired
    assert claim.token is not None
    reply = backend.store.change(A, ChangeRequest(cancel=((KEY, token_a),)))
    assert reply.cancelled[KEY] == "cancelled"
    assert renew(backend, B, claim.token, successor=True).status is RenewStatus.LOST
    backend.store.change(A, ChangeRequest(handovers=(HandoverAsk(KEY, token_a, "b"),)))
    (claim,) = backend.store.change(B, ChangeRequest(acquire=(KEY,))).acquired
    assert claim.token is not None
    backend.store.change(B, ChangeRequest(connected=((KEY, claim.token),)))
    reply = backend.store.change(A, ChangeRequest(cancel=((KEY, token_a),)))
    assert reply.cancelled[KEY] == "connected"
    assert renew(backend, B, claim.token, successor=True).status is RenewStatus.SUCCESSOR


def test_a_pending_request_is_retargeted_and_a_lost_lease_cannot_ask(backend: Backend) -> None:
    """A not-yet-claimed move can change target; a non-holder's request is refused."""
    backend.end_quiet()
    (token_a,) = acquire(backend, A)
    assert token_a is not None
    backend.store.change(A, ChangeRequest(handovers=(HandoverAsk(KEY, token_a, "b"),)))
    backend.store.change(A, ChangeRequest(handovers=(HandoverAsk(KEY, token_a, "c"),)))
    assert backend.store.change(B, ChangeRequest(acquire=(KEY,))).acquired[0].status is (
        AcquireStatus.HELD
    )
    stale = Token(9, "a", "inc-a")
    asks = (HandoverAsk(KEY, stale, "b"),)
    assert backend.store.change(A, ChangeRequest(handovers=asks)).handovers[KEY] == "lost"


def test_an_expired_lease_is_taken_over_with_the_last_heartbeat(backend: Backend) -> None:
    """After the holder's lease runs out, the next acquirer learns who held it and when
    that member last heartbeated: the start of the failover gap."""
    backend.end_quiet()
    beat = backend.store.heartbeat(HeartbeatRequest(A)).server_ms
    (token_a,) = acquire(backend, A)
    backend.expire_lease(KEY)
    (took,) = backend.store.change(B, ChangeRequest(acquire=(KEY,))).acquired
    assert took.status is AcquireStatus.ACQUIRED
    assert took.previous is not None
    assert took.previous.token == token_a
    assert not took.previous.released
    assert took.previous.last_beat_ms == beat


def test_the_successor_takes_over_when_the_holder_dies_mid_handover(backend: Backend) -> None:
    """Holder's lease runs out while a move to us is claimed: our renewal promotes us."""
    backend.end_quiet()
    (token_a,) = acquire(backend, A)
    assert token_a is not None
    backend.store.change(A, ChangeRequest(handovers=(HandoverAsk(KEY, token_a, "b"),)))
    (claim,) = backend.store.change(B, ChangeRequest(acquire=(KEY,))).acquired
    assert claim.token is not None
    backend.expire_lease(KEY)
    promoted = renew(backend, B, claim.token, successor=True)
    assert promoted.status is RenewStatus.PROMOTED
    assert promoted.previous is not None
    assert promoted.previous.token == token_a
    assert backend.lease(KEY) == str(claim.token)


def test_after_redis_forgets_holders_reassert_and_fences_keep_growing(backend: Backend) -> None:
    """A restart without persistence: the holder's renewal sets its lease again (fresh
    epoch), others are quiet, and the next fence is above every earlier one."""
    backend.end_quiet()
    (token_a,) = acquire(backend, A)
    assert token_a is not None
    for _ in range(3):  # fence 4
        backend.store.change(A, ChangeRequest(release=((KEY, token_a),)))
        (token_a,) = acquire(backend, A)
        assert token_a is not None
    assert token_a.fence == 4
    backend.forget_everything()
    assert renew(backend, A, token_a).status is RenewStatus.REASSERTED
    assert backend.lease(KEY) == str(token_a)
    assert backend.store.change(B, ChangeRequest(acquire=(KEY,))).acquired[0].status is (
        AcquireStatus.HELD
    )
    backend.end_quiet()
    backend.store.change(A, ChangeRequest(release=((KEY, token_a),)))
    (token_b,) = acquire(backend, B)
    assert token_b is not None
    assert token_b.fence > 4


def test_a_missing_lease_in_an_old_epoch_is_lost_not_reasserted(backend: Backend) -> None:
    """Outside the quiet period a vanished lease means it expired: the holder must stop."""
    backend.end_quiet()
    (token_a,) = acquire(backend, A)
    assert token_a is not None
    backend.expire_lease(KEY)
    assert renew(backend, A, token_a).status is RenewStatus.LOST
    assert backend.lease(KEY) is None


def test_leave_removes_the_member_but_not_a_namesake(backend: Backend) -> None:
    """Leaving deletes our record; a different process with our name is left alone."""
    backend.store.heartbeat(HeartbeatRequest(A))
    backend.store.heartbeat(HeartbeatRequest(B))
    other_a = MemberRecord("a", "inc-other", "h", 3, 0.0, "test")
    backend.store.leave(other_a)
    names = [m.record.name for m in backend.store.heartbeat(HeartbeatRequest(B)).members]
    assert names == ["a", "b"]
    backend.store.leave(A)
    names = [m.record.name for m in backend.store.heartbeat(HeartbeatRequest(B)).members]
    assert names == ["b"]


def test_many_subscriptions_are_cut_into_chunks(backend: Backend) -> None:
    """More keys than one script call takes: every one is acquired and renewed."""
    backend.end_quiet()
    many = [("s", f"e{i}") for i in range(CHUNK * 2 + 7)]
    tokens = acquire(backend, A, *many)
    assert all(t is not None for t in tokens)
    renewals = tuple(Renewal(k, t, False) for k, t in zip(many, tokens, strict=True) if t)
    reply = backend.store.heartbeat(HeartbeatRequest(A, renewals))
    assert len(reply.renewals) == len(many)
    assert {r.status for r in reply.renewals} == {RenewStatus.HELD}


def test_an_unreachable_redis_is_a_fleet_error_without_secrets(redis_client: redis.Redis) -> None:
    """A refused connection becomes FleetError(kind='connection'), password not shown."""
    client = redis.Redis.from_url(
        "redis://:s3cret-pass@127.0.0.1:1/0", socket_timeout=0.5, socket_connect_timeout=0.5
    )
    store = RedisFleetStore(client, CONFIG)
    started = time.monotonic()
    with pytest.raises(FleetError) as caught:
        store.heartbeat(HeartbeatRequest(A))
    assert caught.value.kind == "connection"
    assert "s3cret" not in str(caught.value)
    assert time.monotonic() - started < 5


# The fleet's least-privilege Redis user, as docs/fleet.md documents it (scripts run with the
# caller's ACL, so the commands inside them are granted one by one).
FLEET_ACL = (
    "reset on >PASSWORD resetchannels ~forwarder:fleet:* +evalsha +script|load "
    "+script|exists +mget +time +get +set +pexpire +del +hget +hset +hincrby +hexists +hdel "
    "+zadd +zscore +zrange +zrem +zremrangebyscore"
)


def _exercise(store: RedisFleetStore, admin: redis.Redis) -> None:
    """Every script and every path a member takes: join, acquire, adopt, move, release,
    take over, cancel, leave."""
    backend = RealBackend(admin)
    backend.end_quiet()
    store.heartbeat(HeartbeatRequest(A))
    (token_a,) = [a.token for a in store.change(A, ChangeRequest(acquire=(KEY,))).acquired]
    assert token_a is not None
    store.change(A, ChangeRequest(acquire=(KEY,)))  # adopt: PEXPIRE
    store.heartbeat(HeartbeatRequest(A, (Renewal(KEY, token_a, False),)))
    store.change(A, ChangeRequest(handovers=(HandoverAsk(KEY, token_a, "b"),)))
    (claim,) = store.change(B, ChangeRequest(acquire=(KEY,))).acquired
    assert claim.token is not None
    store.change(B, ChangeRequest(connected=((KEY, claim.token),)))
    store.change(A, ChangeRequest(cancel=((KEY, token_a),)))
    store.change(A, ChangeRequest(release=((KEY, token_a),)))
    store.heartbeat(HeartbeatRequest(B, (Renewal(KEY, claim.token, True),)))
    store.change(B, ChangeRequest(release=((KEY, claim.token),)))
    (again,) = store.change(A, ChangeRequest(acquire=(KEY,))).acquired  # previous: HGET, ZSCORE
    assert again.previous is not None
    store.leave(A)


def test_a_member_needs_only_the_documented_acl(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    """A member works with FLEET_ACL, and loses a step (noperm) without any one grant."""
    password = secrets.token_hex(8)

    def as_user(rule: str) -> RedisFleetStore:
        tokens = rule.replace("PASSWORD", password).split()
        redis_client.execute_command("ACL", "SETUSER", "fleet", *tokens)  # type: ignore[no-untyped-call]
        client = redis.Redis(
            host="127.0.0.1",
            port=redis_server.port,
            username="fleet",
            password=password,
            socket_timeout=2,
        )
        return RedisFleetStore(client, CONFIG)

    try:
        _exercise(as_user(FLEET_ACL), redis_client)
        grants = [t for t in FLEET_ACL.split() if t[0] in "~+"]
        assert len(grants) == 20
        for grant in grants:
            redis_client.flushall()
            redis_client.script_flush()
            store = as_user(" ".join(t for t in FLEET_ACL.split() if t != grant))
            with pytest.raises(FleetError) as caught:
                _exercise(store, redis_client)
            assert caught.value.kind == "noperm", (grant, caught.value)
    finally:
        redis_client.acl_deluser("fleet")
