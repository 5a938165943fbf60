"""`make soak-fleet`: the fleet variant of the soak. Three `forwarder run` members share the
subscriptions under steady traffic while, every 20 s, one of them is restarted (SIGTERM,
then started again) or killed (kill -9, then started again), in turn.

At the end it compares, per subscription, the simulator's sequence numbers with what is in
Redis: any duplicate fails the run, and so does any lost frame outside a failover gap. A
frame's time is estimated from samples of each slot's sequence counter taken every 0.25 s;
a lost frame is accepted when that time falls inside a gap record (cause `failover` or
`released`) of its subscription, widened by one second for the sampling.

    python -m bench.soak_fleet [--duration 300] [--rate 200] [--lease-ttl 3]
"""

from __future__ import annotations

import argparse
import bisect
import shutil
import tempfile
import threading
import time
from pathlib import Path

import redis

from forwarder_sim import Simulator
from tests.fleet_procs import Fleet, Slot, compare, gap_records, poll, settle_writes
from tests.helpers import RedisServer

SECRET = "soak-fleet-secret-0123456789-0123456789"  # noqa: S105 - the local simulator's
SOURCES = ["soak0", "soak1", "soak2", "soak3"]
EVENTS = ["messages.upsert", "messages.update", "chats.upsert", "contacts.upsert", "call.upsert"]
NAMES = ("m1", "m2", "m3")
FAULT_EVERY = 20.0
SLACK = 1.0  # seconds: the sampling's uncertainty around a lost frame's time
_PAUSE = threading.Event()


class Sampler:
    """(unix time, last seq) per slot, every 0.25 s, on a thread of its own."""

    def __init__(self, sim: Simulator, slots: list[Slot]) -> None:
        self._sim = sim
        self._slots = slots
        self.samples: dict[Slot, list[tuple[int, float]]] = {s: [] for s in slots}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            slots = self._sim.stats()["slots"]
            now = time.time()
            for source, event in self._slots:
                seq = int(slots.get(source, {}).get(event, {}).get("seq", 0))
                self.samples[(source, event)].append((seq, now))

    def window(self, slot: Slot, seq: int) -> tuple[float, float]:
        """The unix times between which `seq` was generated."""
        samples = self.samples[slot]
        seqs = [s for s, _ in samples]
        i = bisect.bisect_left(seqs, seq)
        lo = samples[i - 1][1] if i > 0 else samples[0][1] - SLACK
        hi = samples[i][1] if i < len(samples) else samples[-1][1] + SLACK
        return lo, hi


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak_fleet")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of traffic")
    parser.add_argument("--rate", type=float, default=200.0, help="frames/s over all slots")
    parser.add_argument("--lease-ttl", type=float, default=3.0, help="the members' lease_ttl")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="forwarder-soak-fleet-"))
    (workdir / "redis").mkdir()
    store = RedisServer(workdir / "redis", "--appendonly", "yes", "--appendfsync", "always")
    store.start()
    sim = Simulator(secret=SECRET, record=True).start()
    fleet = Fleet(workdir, sim, store.url, SOURCES, EVENTS, SECRET, args.lease_ttl)
    sampler = Sampler(sim, fleet.slots)
    client = store.client()
    try:
        for name in NAMES:
            fleet.start(name)
        for name in NAMES:
            fleet.wait_ready(name, 60.0)
        poll(fleet.settled, 60.0, "the group settled")
        sampler.start()
        fleet.traffic(args.rate / len(fleet.slots))
        print(
            f"soak-fleet: {args.duration:.0f} s, {len(fleet.slots)} subscriptions, "
            f"{args.rate:.0f} frames/s, 3 members, lease_ttl {args.lease_ttl:g} s; "
            f"a restart or kill every {FAULT_EVERY:.0f} s",
            flush=True,
        )
        started = time.monotonic()
        faults = 0
        kills = restarts = 0
        while time.monotonic() - started < args.duration:
            _PAUSE.wait(FAULT_EVERY)
            name = NAMES[faults % len(NAMES)]
            kill = faults % 2 == 1
            at = time.monotonic() - started
            if kill:
                fleet.kill(name)
                kills += 1
            else:
                code = fleet.stop(name)
                restarts += 1
                if code != 0:
                    print(f"soak-fleet: {name} exited {code} on SIGTERM")
                    return 1
            print(f"  t={at:5.0f}s  {name} {'kill -9' if kill else 'SIGTERM'} + start")
            fleet.start(name)
            fleet.wait_ready(name, 60.0)
            faults += 1
        fleet.traffic(0.0)
        poll(fleet.settled, 60.0, "the group settled at the end")
        settle_writes(sim, client, fleet.slots, 60.0)
        sampler.stop()
        return _report(fleet, sim, client, sampler, kills, restarts)
    finally:
        sampler.stop()
        fleet.close()
        client.close()
        sim.stop()
        store.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _report(
    fleet: Fleet,
    sim: Simulator,
    client: redis.Redis,
    sampler: Sampler,
    kills: int,
    restarts: int,
) -> int:
    result = compare(sim, client, fleet.slots)
    gaps: dict[Slot, list[tuple[float, float]]] = {}
    causes: dict[str, int] = {}
    for g in gap_records(client):
        causes[g["cause"]] = causes.get(g["cause"], 0) + 1
        if g["cause"] in ("failover", "released"):
            slot = (g["source"], g["event"])
            gaps.setdefault(slot, []).append((int(g["start"]) / 1000, int(g["end"]) / 1000))
    # Frames never delivered (generated while no connection held the slot) are seqs
    # missing from what the simulator delivered; lost ones were delivered, never written.
    outside: list[tuple[Slot, int]] = []
    never_delivered = 0
    summary = sim.summary()
    for slot in fleet.slots:
        delivered = {int(s) for s in _delivered_seqs(sim, slot)}
        top = max(delivered) if delivered else 0
        missing = sorted(set(range(1, top + 1)) - delivered)
        never_delivered += len(missing)
        for seq in [*missing, *result.lost.get(slot, [])]:
            lo, hi = sampler.window(slot, seq)
            inside = any(
                start - SLACK <= hi and lo <= end + SLACK for start, end in gaps.get(slot, [])
            )
            if not inside:
                outside.append((slot, seq))
    print(
        f"soak-fleet: generated {summary['delivered'] + summary['dropped']}, "
        f"delivered {result.delivered}, written {result.written}, "
        f"duplicated {result.duplicated_total}, lost after delivery {result.lost_total}, "
        f"never delivered (no holder) {never_delivered}, outside failover gaps {len(outside)}; "
        f"{restarts} restarts, {kills} kills; gap records {causes}"
    )
    for slot in sorted({slot for slot, _ in outside}):
        seqs = [seq for s, seq in outside if s == slot]
        lo, hi = sampler.window(slot, seqs[0])[0], sampler.window(slot, seqs[-1])[1]
        print(
            f"soak-fleet: {slot[0]}/{slot[1]}: {len(seqs)} lost outside failover gaps, "
            f"seq {seqs[0]}-{seqs[-1]} (unix {lo:.1f}-{hi:.1f}); its gaps: {gaps.get(slot, [])}"
        )
    ok = result.duplicated_total == 0 and not outside
    print("soak-fleet: OK" if ok else "soak-fleet: FAILED")
    return 0 if ok else 1


def _delivered_seqs(sim: Simulator, slot: Slot) -> list[int]:
    from forwarder_sim.payloads import seq_of

    return [seq_of(slot[1], f) for f in sim.delivered_frames(*slot)]


if __name__ == "__main__":
    raise SystemExit(main())
