"""Redis ACL least privilege: forwarder works with only what it needs, and says so when not.

What forwarder sends to Redis (forwarder/sink.py): PING when idle; EVALSHA of WRITE_BATCH,
and SCRIPT LOAD when Redis does not have the script cached (fresh start, SCRIPT FLUSH); the
script runs GET/SET on its high-water marks `forwarder:hwm:*` and XADD on the streams, their
dead-letter streams and the gap stream. WAIT with `wait_replicas`; on a cluster also CLUSTER
SLOTS, COMMAND and ASKING (the Sentinel and Cluster tests run as users with those rules).
redis-py's connection handshake also sends CLIENT SETINFO (Redis >= 7.2), whose NOPERM
redis-py ignores: granting +client|setinfo only keeps those refusals out of ACL LOG.
"""

from __future__ import annotations

import logging
import secrets
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from forwarder import sink
from forwarder.daemon import Forwarder
from forwarder_sim import Simulator
from tests.conftest import ConfigFactory
from tests.helpers import RedisServer, wait_for, xrange

# The least-privilege user, as the README documents it (PASSWORD is filled in). Streams
# share a prefix so one pattern covers them, their `:dlq` streams included:
# stream = "wa:{source}:{event}" (or "wa:{event}"). Why each part:
#   reset, resetchannels   start from nothing: no commands, keys or Pub/Sub channels
#   ~forwarder:hwm:*       the writer's high-water marks (GET/SET in the script)
#   ~forwarder:gaps        redis.gap_stream, where blind intervals are recorded
#   ~wa:*                  the streams and dead-letter streams; read+write (~, not %W~)
#                          because Redis checks EVALSHA's declared keys as read-write
#   +ping                  idle health check (/readyz knows Redis answers)
#   +evalsha +script|load  the batch script, loaded again after a Redis restart
#   +get +set +xadd        what the script itself runs (scripts run with the caller's ACL)
ACL_USER = "forwarder"
ACL_RULE = (
    "reset on >PASSWORD resetchannels ~forwarder:hwm:* ~forwarder:gaps ~wa:* "
    "+ping +evalsha +script|load +get +set +xadd"
)
# With `wait_replicas` (Sentinel, Cluster): +wait. On a cluster also what redis-py's
# RedisCluster asks to learn the slot map and key positions, and ASKING for migrations:
ACL_RULE_REPLICATED = ACL_RULE + " +wait"
ACL_RULE_CLUSTER = ACL_RULE + " +wait +cluster|slots +command +asking"
STREAM = "wa:{source}:{event}"
FAST = "backoff = { initial = 0.05, maximum = 0.2, auth_initial = 0.2, auth_maximum = 10.0 }"

# Every command forwarder sends, as ACL DRYRUN takes them (the script's inner commands are
# checked exactly like top-level ones).
# The marks: forwarder:hwm:{<stream>}:<spool id> per stream, and the previous version's
# forwarder:hwm:<spool id>, read as a floor on a single Redis.
MARK = "forwarder:hwm:{wa:main:messages.upsert}:w1"
NEEDED = [
    ["PING"],
    ["EVALSHA", "0" * 40, "3", "wa:main:messages.upsert", MARK, "forwarder:hwm:w1"],
    ["SCRIPT", "LOAD", "return 1"],
    ["GET", MARK],
    ["GET", "forwarder:hwm:w1"],
    ["SET", MARK, "5", "EX", "604800"],
    ["XADD", "wa:main:messages.upsert", "MAXLEN", "~", "1000", "*", "data", "{}"],
    ["XADD", "wa:main:messages.upsert:dlq", "*", "reason", "invalid_json"],
    ["XADD", "forwarder:gaps", "*", "start", "1"],
]


@dataclass
class AclUser:
    admin: redis.Redis
    password: str
    url: str

    def set_rule(self, rule: str) -> None:
        """Replace the user's permissions with `rule` (ACL_RULE's syntax)."""
        tokens = rule.replace("PASSWORD", self.password).split()
        # Raw tokens, exactly as an operator types them (redis-py's acl_setuser() restructures).
        self.admin.execute_command("ACL", "SETUSER", ACL_USER, *tokens)  # type: ignore[no-untyped-call]

    def dryrun(self, command: list[str]) -> str:
        """ "OK", or Redis' reason why the user may not run `command`."""
        reply = self.admin.acl_dryrun(ACL_USER, *command)
        return reply.decode() if isinstance(reply, bytes) else str(reply)


@pytest.fixture
def acl_user(redis_server: RedisServer, redis_client: redis.Redis) -> Iterator[AclUser]:
    """The ACL user with ACL_RULE on the session's redis-server; deleted afterwards."""
    password = secrets.token_hex(16)
    admin = redis_server.client()
    user = AclUser(
        admin, password, f"redis://{ACL_USER}:{password}@127.0.0.1:{redis_server.port}/0"
    )
    user.set_rule(ACL_RULE)
    yield user
    admin.acl_deluser(ACL_USER)  # the server is shared by the session
    admin.close()


def start_as_acl_user(
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    acl_user: AclUser,
    events: list[str],
) -> Forwarder:
    """A forwarder writing as the ACL user, once all its subscriptions are connected."""
    config = make_config(
        {"main": events},
        stream=STREAM,
        extra_source=FAST,
        environ={"FORWARDER_REDIS_URL": acl_user.url},
    )
    forwarder = run_forwarder(config)
    wait_for(lambda: connected(forwarder), 15, "connected")
    return forwarder


def connected(forwarder: Forwarder) -> bool:
    return all(s.state.value == "connected" for s in forwarder.stats)


def scrape(forwarder: Forwarder, path: str = "/metrics") -> tuple[int, str]:
    url = f"http://127.0.0.1:{forwarder.http.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def redis_errors(forwarder: Forwarder, kind: str) -> float:
    """forwarder_redis_errors_total{kind} as /metrics reports it."""
    _, text = scrape(forwarder)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "forwarder_redis_errors_total" and sample.labels["kind"] == kind:
                return sample.value
    return 0.0


def test_forwarder_writes_everything_with_the_least_privilege_user(
    acl_user: AclUser,
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    redis_client: redis.Redis,
) -> None:
    """With only ACL_RULE: frames, dead letters and gap records land, and /readyz is 200."""
    redis_client.script_flush()  # so the writer must SCRIPT LOAD it itself
    events = ["messages.upsert", "call.upsert"]
    forwarder = start_as_acl_user(make_config, run_forwarder, acl_user, events)
    assert simulator.send("main", "messages.upsert", 50) == 50
    assert simulator.send("main", "call.upsert", 5) == 5
    assert simulator.invalid_json("main", "call.upsert") == 1
    wait_for(lambda: sum(s.forwarded for s in forwarder.stats) == 55, 15, "all forwarded")
    simulator.drop()  # a reconnect: its blind interval goes to the gap stream
    wait_for(lambda: redis_client.xlen("forwarder:gaps") >= 2, 15, "gap records")
    for event in events:
        frames = [f[b"data"] for _, f in xrange(redis_client, f"wa:main:{event}")]
        assert frames == simulator.delivered_frames("main", event)
    dead = xrange(redis_client, "wa:main:call.upsert:dlq")
    assert [f[b"reason"] for _, f in dead] == [b"invalid_json"]
    assert not {k: v for k, v in forwarder.writer_stats.errors.items() if v}
    wait_for(lambda: scrape(forwarder, "/readyz")[0] == 200, 15, "/readyz 200")


def test_the_user_can_do_nothing_else(acl_user: AclUser) -> None:
    """ACL_RULE allows exactly forwarder's commands: no reads, no other keys, no admin."""
    for command in NEEDED:
        assert acl_user.dryrun(command) == "OK", command
    denied = [
        ["XRANGE", "wa:main:messages.upsert", "-", "+"],  # reading the streams
        ["XREAD", "STREAMS", "wa:main:messages.upsert", "0"],
        ["DEL", "wa:main:messages.upsert"],
        ["XADD", "orders", "*", "a", "1"],  # keys outside the patterns
        ["SET", "session:1", "x"],
        ["GET", "session:1"],
        ["EVAL", "return 1", "0"],  # only cached scripts, by SHA
        ["SCRIPT", "FLUSH"],
        ["FLUSHALL"],
        ["KEYS", "*"],
        ["CONFIG", "GET", "*"],
        ["ACL", "LIST"],
        ["SELECT", "1"],  # database 0 only; another one in the URL needs +select
        ["PUBLISH", "news", "x"],
    ]
    for command in denied:
        assert acl_user.dryrun(command) != "OK", command


def test_every_grant_in_the_rule_is_needed(acl_user: AclUser) -> None:
    """Dropping any one grant of ACL_RULE denies a command forwarder sends."""
    grants = [t for t in ACL_RULE.split() if t[0] in "~+%"]
    assert len(grants) == 9
    for grant in grants:
        acl_user.set_rule(" ".join(t for t in ACL_RULE.split() if t != grant))
        refused = [c for c in NEEDED if acl_user.dryrun(c) != "OK"]
        assert refused, f"{grant} is not needed"


def test_missing_stream_permission_keeps_frames_until_it_is_granted(
    acl_user: AclUser,
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No key permission on the streams: noperm counted, frames kept; once granted, all land."""
    monkeypatch.setattr(sink, "CONFIG_ERROR_RETRY_SECONDS", 0.2)  # no 30 s wait in a test
    acl_user.set_rule(ACL_RULE.replace(" ~wa:*", ""))
    forwarder = start_as_acl_user(make_config, run_forwarder, acl_user, ["messages.upsert"])
    assert simulator.send("main", "messages.upsert", 20) == 20
    wait_for(lambda: redis_errors(forwarder, "noperm") >= 2, 15, "noperm errors counted")
    assert forwarder.spool.pending()[0] >= 20
    assert not redis_client.exists("wa:main:messages.upsert")
    acl_user.set_rule(ACL_RULE)  # the operator fixes the ACL: no restart needed
    wait_for(lambda: forwarder.stats[0].forwarded == 20, 15, "the kept frames written")
    frames = [f[b"data"] for _, f in xrange(redis_client, "wa:main:messages.upsert")]
    assert frames == simulator.delivered_frames("main", "messages.upsert")


def test_missing_permission_is_logged_at_error(
    acl_user: AclUser,
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refused write for lack of permission is an ERROR (a human must fix the ACL)."""
    monkeypatch.setattr(sink, "CONFIG_ERROR_RETRY_SECONDS", 0.2)  # no 30 s wait in a test
    caplog.set_level(logging.INFO, logger="forwarder")
    acl_user.set_rule(ACL_RULE.replace(" ~wa:*", ""))
    forwarder = start_as_acl_user(make_config, run_forwarder, acl_user, ["messages.upsert"])
    try:
        simulator.send("main", "messages.upsert", 3)
        wait_for(lambda: redis_errors(forwarder, "noperm") >= 1, 15, "noperm errors counted")
        wait_for(
            lambda: any(
                r.levelno >= logging.ERROR and "perm" in r.getMessage().lower()
                for r in caplog.records
            ),
            1,  # the first refusal should say it; longer only lengthens the retry backoff
            "an ERROR about the missing permission",
        )
    finally:
        # Granted, the frames drain now rather than during the shutdown (whose writer would
        # first finish its retry backoff, then wait out an idle poll).
        acl_user.set_rule(ACL_RULE)
        wait_for(lambda: forwarder.spool.pending()[0] == 0, 15, "the kept frames written")
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert acl_user.password not in messages


def test_missing_xadd_permission_loses_nothing(
    acl_user: AclUser,
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without +xadd the frames stay in the spool (noperm), and land once it is granted."""
    monkeypatch.setattr(sink, "CONFIG_ERROR_RETRY_SECONDS", 0.2)  # no 30 s wait in a test
    acl_user.set_rule(ACL_RULE.replace(" +xadd", ""))
    forwarder = start_as_acl_user(make_config, run_forwarder, acl_user, ["messages.upsert"])
    try:
        assert simulator.send("main", "messages.upsert", 5) == 5
        wait_for(lambda: forwarder.stats[0].received == 5, 15, "received")
        wait_for(lambda: redis_errors(forwarder, "noperm") >= 1, 2, "noperm errors counted")
        assert forwarder.stats[0].lost == 0
    finally:
        acl_user.set_rule(ACL_RULE)  # granted: what was kept can now be written
    wait_for(lambda: forwarder.stats[0].forwarded == 5, 5, "the kept frames written")
    frames = [f[b"data"] for _, f in xrange(redis_client, "wa:main:messages.upsert")]
    assert frames == simulator.delivered_frames("main", "messages.upsert")


@pytest.mark.parametrize("who", ["wrong password", "unknown user"])
def test_refused_credentials_are_an_auth_error_until_fixed(
    who: str,
    acl_user: AclUser,
    make_config: ConfigFactory,
    run_forwarder: Callable[..., Forwarder],
    simulator: Simulator,
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """WRONGPASS is kind="auth", /readyz 503 with the reason, one ERROR; fixed, all lands."""
    monkeypatch.setattr(sink, "AUTH_RETRY_SECONDS", 0.1)  # many refusals within the test
    caplog.set_level(logging.INFO, logger="forwarder")
    secret = secrets.token_hex(16)
    user = ACL_USER if who == "wrong password" else "ghost"
    port = acl_user.url.rsplit(":", 1)[1]
    config = make_config(
        {"main": ["messages.upsert"]},
        stream=STREAM,
        extra_source=FAST,
        environ={"FORWARDER_REDIS_URL": f"redis://{user}:{secret}@127.0.0.1:{port}"},
    )
    forwarder = run_forwarder(config)
    wait_for(lambda: connected(forwarder), 15, "connected")
    try:
        assert simulator.send("main", "messages.upsert", 5) == 5
        wait_for(lambda: redis_errors(forwarder, "auth") >= 5, 15, "auth errors counted")
        assert redis_errors(forwarder, "connection") == 0
        code, body = scrape(forwarder, "/readyz")
        assert code == 503
        assert "authentication failed" in body
        refusals = [
            r for r in caplog.records if r.levelno == logging.ERROR and "credentials" in r.message
        ]
        assert len(refusals) == 1  # rate-limited: once a minute, not once per attempt
        assert secret not in caplog.text
        assert secret not in body
    finally:
        # The operator fixes the ACL to match redis.url: no restart needed.
        if user == ACL_USER:
            acl_user.admin.execute_command("ACL", "SETUSER", ACL_USER, f">{secret}")  # type: ignore[no-untyped-call]
        else:
            rule = ACL_RULE.replace("PASSWORD", secret).split()
            acl_user.admin.execute_command("ACL", "SETUSER", "ghost", *rule)  # type: ignore[no-untyped-call]
    try:
        wait_for(lambda: forwarder.stats[0].forwarded == 5, 15, "the kept frames written")
        wait_for(lambda: scrape(forwarder, "/readyz")[0] == 200, 15, "/readyz 200")
        frames = [f[b"data"] for _, f in xrange(redis_client, "wa:main:messages.upsert")]
        assert frames == simulator.delivered_frames("main", "messages.upsert")
    finally:
        if user != ACL_USER:
            acl_user.admin.acl_deluser("ghost")
