"""Discovery: the rules (fake clock), the listing client against the simulator, the config."""

from __future__ import annotations

import http.server
import json
import logging
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
import trustme
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from forwarder.cli import main as cli_main
from forwarder.config import (
    Secret,
    load_config,
)
from forwarder.discovery import (
    ABSENCES_BEFORE_REMOVAL,
    LOG_EVERY,
    DiscoveryCollector,
    DiscoveryPoller,
    DiscoveryRules,
)
from forwarder.discovery_config import DiscoveryConfig, KeyRef
from forwarder.errors import ConfigError, DiscoveryError, ExitCode
from forwarder.events import SENT_EVENTS
from forwarder.listing import ERROR_KINDS, Listing, fetch_listing, parse_listing
from forwarder_sim import Simulator, mint_token
from tests.conftest import SECRET
from tests.helpers import free_port, wait_for

API_KEY = "discovery-test-global-key"
ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "forwarder-discovery-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "forwarder-discovery-rules.test.yml"


def table(
    api_url: str = "http://127.0.0.1:9/",
    key: str = API_KEY,
    name: str = "srv",
    **kwargs: object,
) -> DiscoveryConfig:
    """A [[discovery]] table as load_config() would build it."""
    return DiscoveryConfig(
        name=name,
        api_url=api_url,
        api_key=KeyRef(value=Secret(key), origin="discovery[0].api_key_env TEST"),
        ws_url="ws://127.0.0.1:9/ws/events",
        **kwargs,  # type: ignore[arg-type]
    )


def rows(*names: str, tokens: dict[str, str] | None = None) -> list[dict[str, object]]:
    """Listing elements shaped like upstream's, with real instance tokens."""
    tokens = tokens or {}
    return [
        {
            "id": i,
            "name": n,
            "connectionStatus": "ONLINE",
            "Auth": {"id": i, "token": tokens.get(n) or mint_token(n, SECRET)},
            "Webhook": None,
        }
        for i, n in enumerate(names, 1)
    ]


def listing(*names: str, tokens: dict[str, str] | None = None) -> Listing:
    return parse_listing(orjson.dumps(rows(*names, tokens=tokens)))


class FakeApi:
    """A fetch function answering what the test sets: a body, or a DiscoveryError."""

    def __init__(self) -> None:
        self.answer: bytes | DiscoveryError = b"[]"
        self.keys: list[str] = []

    def set(self, *names: str, tokens: dict[str, str] | None = None) -> None:
        self.answer = orjson.dumps(rows(*names, tokens=tokens))

    def __call__(self, cfg: DiscoveryConfig, key: Secret) -> bytes:
        self.keys.append(key.reveal())
        if isinstance(self.answer, DiscoveryError):
            raise self.answer
        return self.answer


class Clock:
    """A fake monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def poller_with(api: FakeApi, *tables: DiscoveryConfig) -> tuple[DiscoveryPoller, list[int]]:
    changes: list[int] = []
    poller = DiscoveryPoller(
        tables or (table(),), lambda: changes.append(1), api, clock=Clock(), wall=Clock()
    )
    return poller, changes


# --------------------------------------------------------------------------- the rules


def test_a_listed_instance_is_added_at_once() -> None:
    """The first listing that shows an instance adds it."""
    rules = DiscoveryRules(table())
    result = rules.listed(listing("a", "b"), 1.0)
    assert [i.name for i in result.added] == ["a", "b"]
    assert set(rules.instances) == {"a", "b"}
    assert rules.last_success == 1.0


def test_an_instance_is_removed_only_after_two_consecutive_absences() -> None:
    """Missing once then back: kept, the count resets; missing twice in a row: removed."""
    assert ABSENCES_BEFORE_REMOVAL == 2
    rules = DiscoveryRules(table())
    rules.listed(listing("a", "b", "c"), 1.0)
    assert rules.listed(listing("a", "b"), 2.0).removed == []
    assert rules.absent == {"c": 1}
    rules.listed(listing("a", "b", "c"), 3.0)
    assert rules.absent == {}
    assert rules.listed(listing("a", "b"), 4.0).removed == []
    assert rules.listed(listing("a", "b"), 5.0).removed == ["c"]
    assert set(rules.instances) == {"a", "b"}
    assert rules.absent == {}


def test_a_drop_of_more_than_half_is_kept_once_and_believed_when_it_repeats() -> None:
    """3 of 4 vanish: kept and counted as suspicious; the repeat is believed (removal at 3)."""
    rules = DiscoveryRules(table())
    rules.listed(listing("a", "b", "c", "d"), 1.0)
    first = rules.listed(listing("a"), 2.0)
    assert first.suspicious is not None
    assert not first.believed
    assert first.removed == []
    assert rules.absent == {}
    assert rules.errors["suspicious_drop"] == 1
    assert rules.last_success == 1.0  # a doubted listing is not a success
    second = rules.listed(listing("a"), 3.0)
    assert second.believed
    assert second.removed == []
    assert rules.absent == {"b": 1, "c": 1, "d": 1}
    third = rules.listed(listing("a"), 4.0)
    assert sorted(third.removed) == ["b", "c", "d"]
    assert rules.last_success == 4.0
    assert rules.errors["suspicious_drop"] == 1


def test_an_empty_listing_after_a_non_empty_one_is_suspicious_and_a_blip_changes_nothing() -> None:
    """[] once, then the full list again: nothing was removed and nothing is pending."""
    rules = DiscoveryRules(table())
    rules.listed(listing("a"), 1.0)
    blip = rules.listed(listing(), 2.0)
    assert not blip.believed
    assert set(rules.instances) == {"a"}
    rules.listed(listing("a"), 3.0)
    assert rules.suspicious_streak == 0
    assert rules.absent == {}


def test_exactly_half_gone_is_an_ordinary_listing() -> None:
    """2 of 4 vanish: not suspicious, the usual two absences apply."""
    rules = DiscoveryRules(table())
    rules.listed(listing("a", "b", "c", "d"), 1.0)
    result = rules.listed(listing("a", "b"), 2.0)
    assert result.suspicious is None
    assert rules.absent == {"c": 1, "d": 1}


def test_a_changed_token_is_reported_as_rotated_not_as_new() -> None:
    """Same name, new Auth.token: `rotated`, neither added nor removed."""
    rules = DiscoveryRules(table())
    rules.listed(listing("a"), 1.0)
    new = mint_token("a", SECRET)
    result = rules.listed(listing("a", tokens={"a": new}), 2.0)
    assert [i.name for i in result.rotated] == ["a"]
    assert not result.membership_changed
    assert rules.instances["a"].token.reveal() == new


def test_include_and_exclude_globs_filter_instances_by_name() -> None:
    """include selects, exclude removes from the selection; case-sensitive."""
    rules = DiscoveryRules(table(include=("acme-*", "beta"), exclude=("*-test",)))
    rules.listed(listing("acme-1", "acme-test", "beta", "Beta", "other"), 1.0)
    assert set(rules.instances) == {"acme-1", "beta"}


def test_unusable_elements_keep_the_instance_and_its_last_good_token() -> None:
    """A listed instance whose element is broken is neither removed nor given a bad token."""
    rules = DiscoveryRules(table())
    rules.listed(listing("a", "b"), 1.0)
    good = rules.instances["a"].token
    broken = rows("a", "b")
    broken[0]["Auth"] = None
    for t in range(3):
        result = rules.listed(parse_listing(orjson.dumps(broken)), 2.0 + t)
        assert result.removed == []
    assert rules.instances["a"].token == good
    assert rules.invalid == {"a": "no Auth.token, or it is not a JWT"}
    assert rules.errors["invalid_instance"] == 3


def test_parse_listing_reports_each_unusable_element() -> None:
    """Bad names, missing tokens, foreign tokens and duplicates are invalid; others used."""
    elements = [
        *rows("ok"),
        {"name": "no token", "Auth": {"token": mint_token("x", SECRET)}},
        {"name": "notoken"},
        {"name": "foreign", "Auth": {"token": mint_token("someone-else", SECRET)}},
        {"id": 3},
        "a string",
        *rows("twice", "twice"),
    ]
    parsed = parse_listing(orjson.dumps(elements))
    assert list(parsed.instances) == ["ok"]
    assert parsed.instances["ok"].status == "ONLINE"
    assert parsed.instances["ok"].expires_at is None
    assert set(parsed.invalid) == {"no token", "notoken", "foreign", None, "twice"}
    assert "another instance" in parsed.invalid["foreign"]
    assert parsed.invalid["twice"] == "listed twice"


def test_parse_listing_refuses_what_is_not_an_array() -> None:
    """Garbage and a JSON object are `invalid_json`, naming what came instead."""
    for body, words in ((b'[{"name": "cut', "not JSON"), (b'{"status": 200}', "JSON dict")):
        with pytest.raises(DiscoveryError) as info:
            parse_listing(body)
        assert info.value.kind == "invalid_json"
        assert words in str(info.value)


def test_token_expiry_is_read_from_the_claims() -> None:
    """An expiring token's exp claim is kept (shown by `forwarder discover`)."""
    token = mint_token("a", SECRET, expires_in=3600)
    parsed = listing("a", tokens={"a": token})
    exp = parsed.instances["a"].expires_at
    assert exp is not None
    assert abs(exp - (time.time() + 3600)) < 60


# --------------------------------------------------------------------------- the poller


def test_a_new_token_goes_into_the_same_cell_without_a_change_callback() -> None:
    """Rotation updates the live token the subscription reads; membership is unchanged."""
    api = FakeApi()
    poller, changes = poller_with(api)
    api.set("a")
    poller.poll("srv")
    assert changes == [1]
    (found,) = poller.discovered()
    new = mint_token("a", SECRET)
    api.set("a", tokens={"a": new})
    poller.poll("srv")
    assert changes == [1]
    (again,) = poller.discovered()
    assert again.cell is found.cell
    assert found.cell.get().reveal() == new


@pytest.mark.parametrize(
    "kind", ["timeout", "connection", "tls", "unauthorized", "http_5xx", "http_status"]
)
def test_failed_polls_change_nothing_and_are_counted_by_kind(kind: str) -> None:
    """Three failed polls in a row: same instances, same cells, no callback, kind counted."""
    api = FakeApi()
    poller, changes = poller_with(api)
    api.set("a", "b")
    poller.poll("srv")
    before = {d.name: d.cell for d in poller.discovered()}
    api.answer = DiscoveryError(kind, f"simulated {kind}")
    for _ in range(3):
        assert not poller.poll("srv").membership_changed
    assert {d.name: d.cell for d in poller.discovered()} == before
    assert changes == [1]
    (_, errors, count, last, polls), *_ = poller.snapshot_metrics()
    assert errors[kind] == 3
    assert (count, polls) == (2, 4)
    assert last is not None
    (status,) = poller.status()
    assert status["last_error_kind"] == kind


def test_garbage_for_several_polls_changes_nothing() -> None:
    """Invalid JSON, an object and an empty list, each for three polls: nothing removed."""
    api = FakeApi()
    poller, changes = poller_with(api)
    api.set("a", "b", "c")
    poller.poll("srv")
    for body in (b"<html>oops", b'{"error": 1}', b"[]"):
        api.answer = body
        for _ in range(1 if body == b"[]" else 3):
            poller.poll("srv")
    assert {d.name for d in poller.discovered()} == {"a", "b", "c"}
    assert changes == [1]
    errors = poller.snapshot_metrics()[0][1]
    assert errors["invalid_json"] == 6
    assert errors["suspicious_drop"] == 1


def test_an_unreadable_key_file_is_an_error_of_kind_key(tmp_path: Path) -> None:
    """The key file vanishing keeps everything and counts `key`; the message names the file."""
    key_file = tmp_path / "key"
    key_file.write_text(API_KEY)
    cfg = table()
    cfg = DiscoveryConfig(
        name=cfg.name,
        api_url=cfg.api_url,
        api_key=KeyRef(file=key_file, origin=f"discovery[0].api_key_file {key_file}"),
        ws_url=cfg.ws_url,
    )
    api = FakeApi()
    api.set("a")
    poller, _ = poller_with(api, cfg)
    poller.poll("srv")
    assert api.keys == [API_KEY]
    key_file.unlink()
    poller.poll("srv")
    assert poller.snapshot_metrics()[0][1]["key"] == 1
    assert str(key_file) in str(poller.status()[0]["last_error"])
    assert [d.name for d in poller.discovered()] == ["a"]


def test_repeated_failures_log_once_per_interval_and_say_how_many_were_held(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Five 5xx in a row: one WARNING; after LOG_EVERY the next says 4 more happened."""
    api = FakeApi()
    clock = Clock()
    poller = DiscoveryPoller([table()], lambda: None, api, clock=clock, wall=clock)
    api.answer = DiscoveryError("http_5xx", "HTTP 503")
    with caplog.at_level(logging.WARNING, logger="forwarder.discovery"):
        for _ in range(5):
            poller.poll("srv")
        assert len(caplog.records) == 1
        assert caplog.records[0].levelno == logging.WARNING
        clock.now += LOG_EVERY
        poller.poll("srv")
    assert len(caplog.records) == 2
    assert "4 more since the last report" in caplog.records[1].getMessage()


def test_a_wrong_key_is_an_error_saying_so(
    caplog: pytest.LogCaptureFixture, simulator: Simulator
) -> None:
    """401 from the real listing route: an ERROR that names the global key."""
    api_url = f"http://127.0.0.1:{simulator.port}"
    poller = DiscoveryPoller([table(api_url, key="not-the-key")], lambda: None)
    with caplog.at_level(logging.WARNING, logger="forwarder.discovery"):
        poller.poll("srv")
    (record,) = caplog.records
    assert record.levelno == logging.ERROR
    assert "unauthorized" in record.getMessage()
    assert "AUTHENTICATION_GLOBAL_AUTH_TOKEN" in record.getMessage()


def test_the_thread_polls_at_once_then_every_interval_and_stops_promptly() -> None:
    """start(): a first poll immediately, more at poll_interval; stop()+join() end it."""
    api = FakeApi()
    api.set("a")
    poller = DiscoveryPoller([table(poll_interval=0.1)], lambda: None, api)
    poller.start()
    try:
        wait_for(lambda: poller.snapshot_metrics()[0][4] >= 3, 10, "three polls")
    finally:
        poller.stop()
        poller.join(5)
    assert not poller.is_alive()
    assert poller.failed is None


def test_reconfigure_keeps_tokens_drops_excluded_and_polls_new_tables() -> None:
    """A reload: the same table keeps its cells; a new exclude drops at once; a new table
    is polled at the next turn; a removed table's instances leave."""
    api = FakeApi()
    api.set("a", "b")
    poller, _ = poller_with(api)
    poller.poll("srv")
    cells = {d.name: d.cell for d in poller.discovered()}
    assert poller.reconfigure([table(exclude=("b",)), table(name="other")])
    assert {d.name: d.cell for d in poller.discovered()} == {"a": cells["a"]}
    assert poller.never_listed() == ["other"]
    poller.poll("other")
    assert sorted((d.table.name, d.name) for d in poller.discovered()) == [
        ("other", "a"),
        ("other", "b"),
        ("srv", "a"),
    ]
    assert poller.reconfigure([table(name="other")])
    assert {d.table.name for d in poller.discovered()} == {"other"}


def test_refused_instances_are_counted_once_and_shown() -> None:
    """The desired set's refusals: an ERROR and `refused` counted when new, listed in status."""
    poller, _ = poller_with(FakeApi())
    poller.refused([("srv", "a", "a name clash")])
    poller.refused([("srv", "a", "a name clash")])
    assert poller.snapshot_metrics()[0][1]["refused"] == 1
    assert poller.status()[0]["refused"] == {"a": "a name clash"}
    poller.refused([])
    assert poller.status()[0]["refused"] == {}


def test_metrics_families_and_labels() -> None:
    """The collector exports errors{discovery,kind} for every kind, the count, last success."""
    api = FakeApi()
    api.set("a", "b")
    poller, _ = poller_with(api)
    poller.poll("srv")
    registry = CollectorRegistry()
    registry.register(DiscoveryCollector(poller))
    text = generate_latest(registry).decode()
    for kind in ERROR_KINDS:
        assert f'forwarder_discovery_errors_total{{discovery="srv",kind="{kind}"}} 0.0' in text
    assert 'forwarder_discovered_sources{discovery="srv"} 2.0' in text
    assert 'forwarder_discovery_last_success_timestamp_seconds{discovery="srv"} 1000.0' in text
    assert 'forwarder_discovery_polls_total{discovery="srv"} 1.0' in text


# --------------------------------------------------------------------------- the client


@pytest.fixture
def rest() -> Iterator[Simulator]:
    """A simulator with a known key and three instances."""
    with Simulator(SECRET, api_key=API_KEY, instances=["a", "b", "c"]) as sim:
        yield sim


def kind_of(call: Callable[[], object]) -> str:
    with pytest.raises(DiscoveryError) as info:
        call()
    assert API_KEY not in str(info.value)
    return info.value.kind


def test_fetch_lists_the_simulator_with_the_global_key(rest: Simulator) -> None:
    """The real route: the instances and their current tokens."""
    cfg = table(f"http://127.0.0.1:{rest.port}")
    parsed = parse_listing(fetch_listing(cfg, Secret(API_KEY)))
    assert list(parsed.instances) == ["a", "b", "c"]
    assert parsed.instances["b"].token.reveal() == rest.instance_token("b")


def test_fetch_errors_have_bounded_kinds_and_never_the_key(rest: Simulator) -> None:
    """401, 5xx, 404, garbage, a cut, a hang and a closed port each map to their kind."""
    base = f"http://127.0.0.1:{rest.port}"
    cfg = table(base, request_timeout=0.5)
    key = Secret(API_KEY)
    assert kind_of(lambda: fetch_listing(cfg, Secret("wrong"))) == "unauthorized"
    rest.api_fault("status", status=502)
    assert kind_of(lambda: fetch_listing(cfg, key)) == "http_5xx"
    assert kind_of(lambda: fetch_listing(table(base + "/prefix"), key)) == "http_status"
    rest.api_fault("garbage")
    assert kind_of(lambda: parse_listing(fetch_listing(cfg, key))) == "invalid_json"
    rest.api_fault("reset")
    assert kind_of(lambda: fetch_listing(cfg, key)) == "connection"
    rest.api_fault("hang", seconds=30)
    assert kind_of(lambda: fetch_listing(cfg, key)) == "timeout"
    closed = table(f"http://127.0.0.1:{free_port()}")
    assert kind_of(lambda: fetch_listing(closed, key)) == "connection"


def test_a_redirect_is_not_followed_so_the_key_stays_home() -> None:
    """A 302 to elsewhere is an `http_status` error; the other place never sees the key."""
    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("apikey"))
            if self.path.startswith("/instance/"):
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:{port}/elsewhere")
                self.end_headers()
            else:
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"[]")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        cfg = table(f"http://127.0.0.1:{port}")
        assert kind_of(lambda: fetch_listing(cfg, Secret(API_KEY))) == "http_status"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert seen == [API_KEY]  # only the listing request itself


def test_https_listing_is_verified_against_ca_file(tmp_path: Path) -> None:
    """An https api_url: trusted through ca_file it lists; without it, kind `tls`."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with Simulator(SECRET, api_key=API_KEY, instances=["a"], ssl_context=context) as sim:
        base = f"https://127.0.0.1:{sim.port}"
        trusted = table(base, ca_file=ca_file)
        assert list(parse_listing(fetch_listing(trusted, Secret(API_KEY))).instances) == ["a"]
        assert kind_of(lambda: fetch_listing(table(base), Secret(API_KEY))) == "tls"


# --------------------------------------------------------------------------- configuration


def write(tmp_path: Path, body: str) -> Path:
    (tmp_path / "key").write_text(API_KEY + "\n")
    if "CA_FILE" in body:
        trustme.CA().cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    path = tmp_path / "forwarder.toml"
    path.write_text(
        body.replace("KEY_FILE", str(tmp_path / "key")).replace("CA_FILE", str(tmp_path / "ca.pem"))
    )
    return path


DISCOVERY = """
[[discovery]]
api_url = "http://10.0.0.5:8084"
api_key_file = "KEY_FILE"
"""


def test_discovery_defaults(tmp_path: Path) -> None:
    """Every default: ws_url derived, the 13 events, 30 s, fan-in streams, all names."""
    config = load_config(write(tmp_path, DISCOVERY), {})
    (d,) = config.discovery
    assert d.name == "10.0.0.5:8084"
    assert d.ws_url == "ws://10.0.0.5:8084/ws/events"
    assert d.listing_url == "http://10.0.0.5:8084/instance/fetchInstances"
    assert d.events == SENT_EVENTS
    assert d.poll_interval == 30.0
    assert d.request_timeout == 10.0
    assert d.stream == "{event}"
    assert (d.include, d.exclude) == (("*",), ())
    assert d.api_key.read().reveal() == API_KEY
    assert config.sources == ()


def test_https_api_derives_wss_and_keeps_a_path_prefix(tmp_path: Path) -> None:
    """https://host/prefix gives wss://host/prefix/ws/events and the listing under prefix."""
    body = DISCOVERY.replace("http://10.0.0.5:8084", "https://api.example.com/codechat/")
    (d,) = load_config(write(tmp_path, body), {}).discovery
    assert d.ws_url == "wss://api.example.com/codechat/ws/events"
    assert d.listing_url == "https://api.example.com/codechat/instance/fetchInstances"


def test_the_key_from_the_environment_and_from_a_systemd_credential(tmp_path: Path) -> None:
    """api_key_env reads the variable; api_key_credential reads $CREDENTIALS_DIRECTORY/NAME."""
    env_body = DISCOVERY.replace('api_key_file = "KEY_FILE"', 'api_key_env = "CODECHAT_KEY"')
    (d,) = load_config(write(tmp_path, env_body), {"CODECHAT_KEY": API_KEY}).discovery
    assert d.api_key.read().reveal() == API_KEY
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "codechat-key").write_text(API_KEY)
    cred_body = DISCOVERY.replace(
        'api_key_file = "KEY_FILE"', 'api_key_credential = "codechat-key"'
    )
    config = load_config(write(tmp_path, cred_body), {"CREDENTIALS_DIRECTORY": str(creds)})
    assert config.discovery[0].api_key.read().reveal() == API_KEY


@pytest.mark.parametrize(
    ("body", "environ", "message"),
    [
        (DISCOVERY.replace("http://", "ws://"), {}, "expected an http:// or https:// URL"),
        (DISCOVERY.replace("http://", "http://user:pw@"), {}, "no user or password"),
        (DISCOVERY.replace('api_key_file = "KEY_FILE"', ""), {}, "exactly one of api_key_file"),
        (DISCOVERY + 'api_key_env = "X"\n', {"X": "k"}, "exactly one of api_key_file"),
        (
            DISCOVERY.replace('api_key_file = "KEY_FILE"', 'api_key_env = "NOPE"'),
            {},
            "the environment variable is not set",
        ),
        (
            DISCOVERY.replace('api_key_file = "KEY_FILE"', 'api_key_env = "K"'),
            {"K": "has a space"},
            "spaces, control or non-ASCII",
        ),
        (
            DISCOVERY.replace('api_key_file = "KEY_FILE"', 'api_key_credential = "k"'),
            {},
            "CREDENTIALS_DIRECTORY is not set",
        ),
        (DISCOVERY + 'events = ["nope"]\n', {}, "unknown event 'nope'"),
        (DISCOVERY + 'stream = "{instance}"\n', {}, "unknown placeholder {instance}"),
        (DISCOVERY + "include = []\n", {}, "it would match no instance"),
        (DISCOVERY + 'exclude = [""]\n', {}, "an empty glob"),
        (DISCOVERY + "poll_interval = 0\n", {}, "poll_interval must be at least"),
        (DISCOVERY + 'ws_url = "http://x/ws/events"\n', {}, "discovery[0].ws_url: expected"),
        (DISCOVERY + 'token_file = "x"\n', {}, "unknown key 'discovery[0].token_file'"),
        (DISCOVERY + DISCOVERY, {}, "the name '10.0.0.5:8084' is used twice"),
        (DISCOVERY + 'name = "a b"\n', {}, "must be 1-64 characters"),
        (DISCOVERY + 'ca_file = "CA_FILE"\n', {}, "TLS settings need an https:// api_url"),
    ],
)
def test_invalid_discovery_tables_are_refused_with_a_precise_message(
    tmp_path: Path, body: str, environ: dict[str, str], message: str
) -> None:
    """Each mistake is a ConfigError naming the key, and never shows the key's value."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, body), environ)
    assert message in str(info.value)
    assert API_KEY not in str(info.value)


def test_an_unreadable_key_file_fails_the_start_without_the_key(tmp_path: Path) -> None:
    """A missing key file is refused at load, naming the file."""
    path = write(tmp_path, DISCOVERY.replace("KEY_FILE", str(tmp_path / "missing")))
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert "discovery[0].api_key_file" in str(info.value)
    assert "cannot read the API key" in str(info.value)


def test_several_static_sources_may_share_a_stream_but_not_a_role(tmp_path: Path) -> None:
    """Fan-in: two sources on stream "{event}" load; a data key that is a DLQ does not."""
    token = tmp_path / "token"
    token.write_text(mint_token("x", SECRET))
    source = f"""
[[sources]]
name = "NAME"
url = "ws://127.0.0.1:8084/ws/events"
token_file = "{token}"
events = ["messages.upsert"]
"""
    two = source.replace("NAME", "a") + source.replace("NAME", "b")
    config = load_config(write(tmp_path, two), {})
    assert {s.stream for s in config.subscriptions()} == {"messages.upsert"}
    clash = two.replace('events = ["messages.upsert"]\n', 'stream = "{event}:dlq"\n', 1)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, clash), {})
    assert "is the dead-letter stream of source 'b'" in str(info.value)


def test_redacted_config_shows_discovery_without_the_key(tmp_path: Path) -> None:
    """check-config's document lists every discovery setting and only where the key is."""
    config = load_config(write(tmp_path, DISCOVERY), {})
    doc = config.redacted()
    (d,) = doc["discovery"]
    assert d["api_key"] == f"*** (discovery[0].api_key_file {tmp_path / 'key'})"
    assert d["ws_url"] == "ws://10.0.0.5:8084/ws/events"
    assert d["events"] == list(SENT_EVENTS)
    assert API_KEY not in json.dumps(doc)


# --------------------------------------------------------------------------- forwarder discover


def discover_config(tmp_path: Path, sim: Simulator, static: str = "") -> Path:
    (tmp_path / "key").write_text(API_KEY)
    path = tmp_path / "discover.toml"
    path.write_text(
        f"""
[[discovery]]
name = "main"
api_url = "http://127.0.0.1:{sim.port}"
api_key_file = "{tmp_path / "key"}"
events = ["messages.upsert", "call.upsert"]
"""
        + static
    )
    return path


def run_discover(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli_main(["discover", "--config", str(path), "--json"])
    return code, capsys.readouterr().out


def test_discover_prints_what_would_be_subscribed_without_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Names, status, event count and token expiry from one listing; no WebSocket opened."""
    with Simulator(SECRET, api_key=API_KEY) as sim:
        sim.create_instance("acme")
        sim.create_instance("beta", expires_in=3600, status="OFFLINE")
        code, out = run_discover(discover_config(tmp_path, sim), capsys)
        assert sim.stats()["connections_total"] == 0
    assert code == 0
    (doc,) = json.loads(out)
    assert doc["error"] is None
    by_name = {i["name"]: i for i in doc["instances"]}
    assert by_name["acme"] == {
        "name": "acme",
        "connection_status": "ONLINE",
        "events": 2,
        "token_expires_at": None,
    }
    assert by_name["beta"]["connection_status"] == "OFFLINE"
    assert abs(by_name["beta"]["token_expires_at"] - (time.time() + 3600)) < 60
    assert API_KEY not in out
    code = cli_main(["discover", "--config", str(discover_config(tmp_path, sim))])
    assert code != 0  # the simulator is stopped now
    text = capsys.readouterr().out
    assert "listing failed: connection" in text


def test_discover_exit_codes_say_what_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A refused key or a name clash: CONFIG (2); a failing server: FAILURE (1)."""
    with Simulator(SECRET, api_key="another-key", instances=["acme"]) as sim:
        code, out = run_discover(discover_config(tmp_path, sim), capsys)
        assert code == ExitCode.CONFIG
        assert json.loads(out)[0]["error"].startswith("unauthorized: ")
    with Simulator(SECRET, api_key=API_KEY, instances=["acme", "beta"]) as sim:
        sim.api_fault("status", status=500)
        code, out = run_discover(discover_config(tmp_path, sim), capsys)
        assert code == ExitCode.FAILURE
        token = tmp_path / "token"
        token.write_text(mint_token("acme", SECRET))
        static = f"""
[[sources]]
name = "acme"
url = "{sim.url}"
token_file = "{token}"
"""
        code, out = run_discover(discover_config(tmp_path, sim, static), capsys)
        assert code == ExitCode.CONFIG
        (doc,) = json.loads(out)
        assert "name clash" in doc["refused"]["acme"]
        assert [(i["name"], i["events"]) for i in doc["instances"]] == [("acme", 0), ("beta", 2)]


def test_discover_without_a_discovery_table_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only [[sources]]: exit 2 with a message, no traceback."""
    token = tmp_path / "token"
    token.write_text(mint_token("a", SECRET))
    path = tmp_path / "f.toml"
    path.write_text(
        f'[[sources]]\nname = "a"\nurl = "ws://127.0.0.1:9/ws/events"\ntoken_file = "{token}"\n'
    )
    assert cli_main(["discover", "--config", str(path)]) == ExitCode.CONFIG
    assert "no [[discovery]] table" in capsys.readouterr().err


# --------------------------------------------------------------------------- alert rules


def promtool() -> str:
    import shutil

    binary = shutil.which("promtool")
    assert binary, "promtool is missing: apt-get install prometheus (make test does it)"
    return binary


def test_discovery_alert_rules_pass_promtool() -> None:
    """The rules file is valid, and its unit tests show every alert firing and quiet."""
    check = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run(
        [promtool(), "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert test.returncode == 0, test.stdout + test.stderr
    alerts = set(_alerts(RULES.read_text()))
    cases = RULE_TESTS.read_text().split("- alertname: ")[1:]
    fires = {c.split()[0] for c in cases if "exp_labels:" in c.split("- alertname:")[0]}
    quiet = {c.split()[0] for c in cases if "exp_labels:" not in c}
    assert alerts
    assert alerts <= fires, "an alert never shown firing"
    assert alerts <= quiet, "an alert never shown quiet"


def _alerts(text: str) -> list[str]:
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if "- alert:" in line]
