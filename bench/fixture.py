"""The pieces a scenario is built from: a generator process, the clients that read from it
(forwarder, the naive baseline, a discarding client), and the loss/order oracle.

Every client subscribes as its own upstream instance, so all of them can stay connected to
one generator while traffic goes to one of them at a time (the simulator generates per
(instance, event) slot).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import redis

from bench.procs import PAUSE, PYTHON, Procs, ProcStat, free_port, http_json, wait_until
from forwarder import config as forwarder_config_module
from forwarder_sim import mint_token
from forwarder_sim.payloads import min_size, seq_of

SECRET = "bench-secret-not-for-production"  # noqa: S105 - loopback only
Kind = Literal["forwarder", "baseline", "ceiling"]


class Generator:
    """`python -m bench.generator` in its own process (it must not share our GIL)."""

    def __init__(self, procs: Procs, frame_size: int | None) -> None:
        self.frame_size = frame_size
        argv = [PYTHON, "-m", "bench.generator", "--secret", SECRET]
        if frame_size is not None:
            argv += ["--frame-size", str(frame_size)]
        self.proc = procs.spawn(f"generator-{frame_size}", argv, stdin=True, stdout=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the generator exited at start (see its log in the workdir)")
        self.port = int(json.loads(line)["port"])
        self.stat = ProcStat(self.proc.pid)
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws/events"
        self.http = f"http://127.0.0.1:{self.port}"

    def payload_size(self, event: str) -> int:
        assert self.frame_size is not None
        return max(self.frame_size, min_size(event))

    def stats(self) -> dict[str, Any]:
        reply: dict[str, Any] = http_json(f"{self.http}/stats")
        return reply

    def control(self, name: str, **params: Any) -> dict[str, Any]:
        reply: dict[str, Any] = http_json(f"{self.http}/control/{name}", params)
        return reply

    def set_rate(self, instance: str, events: Sequence[str], rate: float) -> None:
        for event in events:
            self.control("set_rate", event=event, rate=rate, instance=instance)

    def slot(self, instance: str, event: str, stats: dict[str, Any] | None = None) -> Any:
        stats = stats if stats is not None else self.stats()
        return stats["slots"].get(instance, {}).get(event, {})

    def delivered(self, instance: str, events: Sequence[str]) -> int:
        stats = self.stats()
        return sum(int(self.slot(instance, e, stats).get("delivered", 0)) for e in events)

    def connected(self, instance: str, events: Sequence[str]) -> bool:
        stats = self.stats()
        return all(self.slot(instance, e, stats).get("holder_open") for e in events)

    def summary(self) -> dict[str, int]:
        """The simulator's totals only (cheap with thousands of slots)."""
        reply: dict[str, int] = http_json(f"{self.http}/stats/summary")
        return reply

    def command(self, cmd: str, **params: Any) -> dict[str, Any]:
        """One stdin command of bench/generator.py; blocks until its reply."""
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **params}).encode() + b"\n")
        self.proc.stdin.flush()
        reply: dict[str, Any] = json.loads(self.proc.stdout.readline())
        return reply

    def pace(
        self, instance: str, event: str, rate: float, seconds: float, tick: float = 0.001
    ) -> dict[str, Any]:
        """Paced sending with send times (see bench/generator.py); blocks until done."""
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        command = {
            "cmd": "pace",
            "instance": instance,
            "event": event,
            "rate": rate,
            "seconds": seconds,
            "tick": tick,
        }
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        self.proc.stdin.flush()
        reply: dict[str, Any] = json.loads(self.proc.stdout.readline())
        return reply


@dataclass
class StreamCheck:
    """Running loss/duplicate/order check of one stream against the simulator's seqs."""

    stream: str
    event: str
    next_id: str = "-"  # XRANGE start for entries not yet checked
    last_seq: int = 0
    entries: int = 0  # checked so far (they are trimmed from Redis once checked)
    lost: int = 0
    duplicated_or_reordered: int = 0


@dataclass
class Client:
    """One process reading from the generator as upstream instance `instance`."""

    kind: Kind
    instance: str
    events: list[str]
    proc: subprocess.Popen[bytes]
    stream_template: str | None
    metrics_port: int | None = None
    checks: dict[str, StreamCheck] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)  # cumulative counts already reported

    def delta(self, totals: dict[str, int]) -> dict[str, int]:
        """What grew since the last call: per-round figures from cumulative counters."""
        out = {key: value - self.totals.get(key, 0) for key, value in totals.items()}
        self.totals.update(totals)
        return out

    @property
    def stat(self) -> ProcStat:
        return ProcStat(self.proc.pid)

    def stream(self, event: str) -> str:
        assert self.stream_template is not None
        return self.stream_template.format(source=self.instance, event=event)

    def status(self) -> dict[str, Any]:
        assert self.metrics_port is not None
        reply: dict[str, Any] = http_json(f"http://127.0.0.1:{self.metrics_port}/status")
        return reply


def token_file(workdir: Path, instance: str) -> Path:
    path = workdir / f"{instance}.token"
    path.write_text(mint_token(instance, SECRET) + "\n")
    return path


def forwarder_config(
    workdir: Path,
    name: str,
    redis_url: str,
    ws_url: str,
    sources: dict[str, Sequence[str]],
    stream: str,
) -> tuple[Path, int]:
    """Write a forwarder TOML for `sources` ({instance: events}); return (path, metrics port)."""
    port = free_port()
    parts = [
        textwrap.dedent(
            f"""\
            shutdown_timeout = 10.0
            log_level = "INFO"
            [redis]
            url = "{redis_url}"
            [metrics]
            listen = "127.0.0.1:{port}"
            """
        )
    ]
    if hasattr(forwarder_config_module, "SpoolConfig"):
        # Since the disk spool, each forwarder needs its own spool directory (it is locked).
        spool = workdir / f"{name}.spool"
        parts.append(f'[spool]\ndir = "{spool}"\n')
    for instance, events in sources.items():
        quoted = ", ".join(f'"{e}"' for e in events)
        parts.append(
            textwrap.dedent(
                f"""\
                [[sources]]
                name = "{instance}"
                url = "{ws_url}"
                token_file = "{token_file(workdir, instance)}"
                events = [{quoted}]
                stream = "{stream}"
                """
            )
        )
    path = workdir / f"{name}.toml"
    path.write_text("\n".join(parts))
    return path, port


def start_client(
    procs: Procs,
    kind: Kind,
    instance: str,
    events: list[str],
    gen: Generator,
    redis_url: str,
    timeout: float = 30.0,
) -> Client:
    """Start one reading process and wait until the generator sees all its subscriptions."""
    workdir = procs.workdir
    joined = ",".join(events)
    metrics_port: int | None = None
    template: str | None = f"{kind}:{{source}}:{{event}}"
    if kind == "forwarder":
        config, metrics_port = forwarder_config(
            workdir, instance, redis_url, gen.ws_url, {instance: events}, template or ""
        )
        argv = [PYTHON, "-m", "forwarder", "run", "--config", str(config)]
    elif kind == "baseline":
        argv = [PYTHON, "-m", "bench.baseline", "--url", gen.ws_url]
        argv += ["--token-file", str(token_file(workdir, instance)), "--redis-url", redis_url]
        argv += ["--source", instance, "--events", joined, "--stream", template or ""]
    else:
        template = None
        argv = [PYTHON, "-m", "bench.drain", "--url", gen.ws_url, "--events", joined]
        argv += ["--token-file", str(token_file(workdir, instance))]
    proc = procs.spawn(instance, argv)
    client = Client(kind, instance, events, proc, template, metrics_port)

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{instance} exited with {proc.returncode} (see its log)")
        return gen.connected(instance, events)

    wait_until(ready, timeout, f"{instance} to connect", step=0.05)
    if kind != "ceiling":
        client.checks = {e: StreamCheck(client.stream(e), e) for e in events}
    return client


def written(client: Client, r: redis.Redis, gen: Generator) -> int:
    """Frames the client has handled: in Redis (checked + current XLEN), or as delivered."""
    if client.kind == "ceiling":
        return gen.delivered(client.instance, client.events)
    pipe = r.pipeline(transaction=False)
    for check in client.checks.values():
        pipe.xlen(check.stream)
    lengths = pipe.execute()
    return sum(int(n) for n in lengths) + sum(c.entries for c in client.checks.values())


def drain_and_verify(
    client: Client, r: redis.Redis, gen: Generator, timeout: float = 90.0
) -> dict[str, int]:
    """Wait until Redis holds everything delivered to the client, then check every new entry
    (exactly the simulator's seqs, in order, once each) and trim it to free Redis memory."""
    if client.kind == "ceiling":
        return {"entries": 0, "lost": 0, "duplicated_or_reordered": 0}
    target = gen.delivered(client.instance, client.events)

    def refused() -> int:
        # Frames forwarder refused because its buffer was full never reach Redis: waiting
        # for them would only run into the timeout. They are still reported as lost.
        if client.kind != "forwarder":
            return 0
        return sum(int(s["dropped"]) for s in client.status()["subscriptions"])

    def done() -> bool:
        return written(client, r, gen) + refused() >= target

    with contextlib.suppress(TimeoutError):  # what is missing is counted as lost below
        wait_until(done, timeout, f"{client.instance} to write everything", step=0.05)
    # Let a straggler (a duplicate would be one) land before checking.
    PAUSE.wait(0.2)
    stats = gen.stats()
    for check in client.checks.values():
        _check_stream(check, r)
        delivered = int(gen.slot(client.instance, check.event, stats).get("seq", 0))
        if delivered > check.last_seq:
            check.lost += delivered - check.last_seq
            check.last_seq = delivered
        dropped = int(gen.slot(client.instance, check.event, stats).get("dropped", 0))
        if dropped:
            raise RuntimeError(f"the generator dropped {dropped} frames for {client.instance}")
    checks = client.checks.values()
    return client.delta(
        {
            "entries": sum(c.entries for c in checks),
            "lost": sum(c.lost for c in checks),
            "duplicated_or_reordered": sum(c.duplicated_or_reordered for c in checks),
        }
    )


def _check_stream(check: StreamCheck, r: redis.Redis) -> None:
    while True:
        # Raw XRANGE reply ([id, [field, value, ...]]): redis-py's per-entry dicts would make
        # checking a million entries take minutes. Both writers put `data` first.
        entries: Any = r.execute_command(  # type: ignore[no-untyped-call]
            "XRANGE", check.stream, check.next_id, "+", "COUNT", 10_000
        )
        if not entries:
            return
        event = check.event
        last_seq = check.last_seq
        for _, fields in entries:
            seq = seq_of(event, fields[1])
            if seq == last_seq + 1:
                last_seq = seq
            elif seq <= last_seq:
                check.duplicated_or_reordered += 1
            else:
                check.lost += seq - last_seq - 1
                last_seq = seq
        check.last_seq = last_seq
        check.entries += len(entries)
        last_id = entries[-1][0].decode()
        check.next_id = f"({last_id}"
        # Checked entries go; the stream keeps its last ID, so XADD * stays monotonic.
        r.xtrim(check.stream, minid=_next_id(last_id))


def _next_id(entry_id: str) -> str:
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq) + 1}"
