"""The load generator: the upstream `Simulator` in its own process, plus paced sending.

`python -m bench.generator --secret S [--frame-size N]` prints `{"port": P}` on stdout once
listening. The simulator's own HTTP API on that port (`GET /stats`, `POST /control/...`)
drives rate traffic and faults. Commands that need exact send times come as JSON lines on
stdin, each answered by one JSON line on stdout:

    {"cmd": "pace", "instance": I, "event": E, "rate": R, "seconds": S, "tick": T}
        send R frames/s for S seconds in a batch every T seconds (an absolute schedule);
        reply {"batches": [[unix_time_before_send, last_seq_after_send], ...],
               "delivered": n, "first_seq": s}
    {"cmd": "spread", "instances": [I, ...], "events": [E, ...], "rate": R, "seconds": S,
     "tick": T}
        send R frames/s in total for S seconds, one frame per (instance, event) slot in turn,
        in a batch every T seconds; reply {"sends": {"I\u0000E": [[unix_time_before_send,
        seq], ...]}, "delivered": n, "max_behind_s": how late the schedule ran at worst}
    {"cmd": "quit"}

The pacing thread runs here, beside the simulator's loop and away from the measuring
process, so timestamps are taken right where the frames are written.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import resource
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from forwarder_sim import Simulator

_PAUSE = threading.Event()  # never set: an interruptible pause


def pace(
    sim: Simulator, instance: str, event: str, rate: float, seconds: float, tick: float
) -> dict[str, Any]:
    """Send `rate` frames/s for `seconds`; note the wall time before each batch."""
    first_seq = int(sim.stats()["slots"].get(instance, {}).get(event, {}).get("seq", 0)) + 1
    last_seq = first_seq - 1
    batches: list[list[float]] = []
    total = int(rate * seconds)
    t0 = time.monotonic()
    sent = 0
    k = 0
    while sent < total:
        k += 1
        # Batch k carries what the fixed rate makes due by the end of tick k.
        due = min(total, int(k * tick * rate)) - sent
        if due > 0:
            before = time.time()
            delivered = sim.send(instance, event, due)
            # seqs are assigned to dropped frames too, so the slot's seq advances by `due`.
            last_seq += due
            sent += due
            if delivered:
                batches.append([before, last_seq])
        wait = t0 + k * tick - time.monotonic()
        if wait > 0:
            _PAUSE.wait(wait)
    delivered_total = int(sim.stats()["slots"][instance][event]["delivered"])
    return {"batches": batches, "delivered": delivered_total, "first_seq": first_seq}


def spread(
    sim: Simulator,
    instances: list[str],
    events: list[str],
    rate: float,
    seconds: float,
    tick: float = 0.005,
) -> dict[str, Any]:
    """`rate` frames/s over every slot in turn for `seconds`, one simulator call per tick."""
    slots = [(i, e) for i in instances for e in events]
    sends: dict[str, list[list[float]]] = {f"{i}\0{e}": [] for i, e in slots}
    total = int(rate * seconds)
    delivered = 0
    behind = 0.0
    t0 = time.monotonic()
    sent = 0
    pos = 0
    k = 0
    while sent < total:
        k += 1
        due = min(total, int(k * tick * rate)) - sent
        if due > 0:
            counts: Counter[tuple[str, str]] = Counter()
            for _ in range(due):
                counts[slots[pos % len(slots)]] += 1
                pos += 1
            batch = [(i, e, n) for (i, e), n in counts.items()]
            before = time.time()
            for (i, e, _), (got, last_seq) in zip(batch, sim.send_many(batch), strict=True):
                sends[f"{i}\0{e}"].append([before, last_seq])
                delivered += got
            sent += due
        now = time.monotonic()
        behind = max(behind, now - (t0 + k * tick))
        wait = t0 + k * tick - now
        if wait > 0:
            _PAUSE.wait(wait)
    return {"sends": sends, "delivered": delivered, "max_behind_s": round(behind, 4)}


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off while frames are paced, as `timeit` does.

    The send times recorded here (a list per batch, 600,000 of them in G's 30 s at 20,000
    frames/s) and the simulator's 10,010 connections made each full collection of this
    process cost more than the last: 55 ms growing to 220 ms, nine of them in G's 30 s,
    each stalling the sending and showing as forward latency of the process measured. A
    paced phase lasts seconds and makes no garbage cycles worth collecting in between."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
        gc.collect()


def raise_fd_limit() -> None:
    """Thousands of connections: the soft open-file limit up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.generator")
    parser.add_argument("--secret", required=True)
    parser.add_argument("--frame-size", type=int, default=None)
    args = parser.parse_args(argv)
    raise_fd_limit()
    sim = Simulator(args.secret, port=0, frame_size=args.frame_size)
    sim.start()
    try:
        sys.stdout.write(json.dumps({"port": sim.port}) + "\n")
        sys.stdout.flush()
        for line in sys.stdin:
            command = json.loads(line)
            name = command.pop("cmd")
            if name == "quit":
                break
            if name == "pace":
                with collector_paused():
                    reply = pace(sim, **command)
            elif name == "spread":
                with collector_paused():
                    reply = spread(sim, **command)
            else:
                reply = {"error": f"unknown command {name!r}"}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
    finally:
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
