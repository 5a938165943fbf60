"""The load generator: the upstream `Simulator` in its own process, plus paced sending.

`python -m bench.generator --secret S [--frame-size N]` prints `{"port": P}` on stdout once
listening. The simulator's own HTTP API on that port (`GET /stats`, `POST /control/...`)
drives rate traffic and faults. Commands that need exact send times come as JSON lines on
stdin, each answered by one JSON line on stdout:

    {"cmd": "pace", "instance": I, "event": E, "rate": R, "seconds": S, "tick": T}
        send R frames/s for S seconds in a batch every T seconds (an absolute schedule);
        reply {"batches": [[unix_time_before_send, last_seq_after_send], ...],
               "delivered": n, "first_seq": s}
    {"cmd": "quit"}

The pacing thread runs here, beside the simulator's loop and away from the measuring
process, so timestamps are taken right where the frames are written.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.generator")
    parser.add_argument("--secret", required=True)
    parser.add_argument("--frame-size", type=int, default=None)
    args = parser.parse_args(argv)
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
                reply = pace(sim, **command)
            else:
                reply = {"error": f"unknown command {name!r}"}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
    finally:
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
