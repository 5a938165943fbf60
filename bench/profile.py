"""Profile a client under flood (scenario A by default) with py-spy; summarise per thread.

    python -m bench.profile [--kind forwarder|baseline] [--events 1|13] [--frame-size 300]
                            [--seconds 10] [--rate 250] [--output DIR]

py-spy is not a project dependency: `.venv/bin/pip install py-spy`. It attaches to the
running client (`--pid`, `--nonblocking`, so the process is never paused) while the
generator floods it, and writes collapsed stacks (`--format raw`). Threads are told apart by
their entry point (`IOLoop._run`: a reader loop; `RedisWriter._run`: the writer), so no thread
names are needed. "Own" time is the leaf frame of each sample: where the CPU actually was.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.fixture import Generator, Kind, start_client
from bench.procs import PAUSE, Procs, start_redis
from forwarder.events import SENT_EVENTS

_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^:()]+)(?::(?P<line>\d+))?\)$")


def _role(frames: list[str]) -> str:
    text = ";".join(frames)
    if "loop.py" in text and "IOLoop._run" in text:
        return "reader"
    if "sink.py" in text and "_run" in text:
        return "writer"
    if "run_forever" in text or "_app.py" in text:
        return "baseline-ws-thread"
    return "other"


def _short(frame: str) -> str:
    match = _FRAME.match(frame)
    if match is None:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/", "/snap/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match['func']} ({path})"


def summarise(raw: Path, top: int = 15) -> dict[str, Any]:
    """Own and inclusive sample shares per thread role from py-spy's raw output."""
    own: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    total: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    samples: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith(("thread (", "process "))]
        if not frames:
            continue
        role = _role(frames)
        samples[role] += count
        own[role][_short(frames[-1])] += count
        for name in {_short(f) for f in frames}:
            total[role][name] += count
    out: dict[str, Any] = {}
    for role, n in samples.most_common():
        out[role] = {
            "samples": n,
            "own": [[name, round(100 * c / n, 1)] for name, c in own[role].most_common(top)],
            "inclusive": [
                [name, round(100 * c / n, 1)] for name, c in total[role].most_common(top)
            ],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--kind", choices=("forwarder", "baseline"), default="forwarder")
    parser.add_argument("--events", type=int, choices=(1, 13), default=1)
    parser.add_argument("--frame-size", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--output", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        parser.error("py-spy is not installed: .venv/bin/pip install py-spy")
    events = ["messages.upsert"] if args.events == 1 else list(SENT_EVENTS)
    kind: Kind = args.kind
    args.output.mkdir(parents=True, exist_ok=True)
    raw = args.output / f"profile-{kind}-{args.events}-{args.frame_size}.txt"
    with tempfile.TemporaryDirectory(prefix="forwarder-profile-") as tmp:
        procs = Procs(Path(tmp))
        try:
            _, redis_url = start_redis(procs)
            gen = Generator(procs, args.frame_size)
            client = start_client(procs, kind, f"{kind}-profiled", events, gen, redis_url)
            gen.set_rate(client.instance, events, 2_000_000 / len(events))
            PAUSE.wait(1.0)
            spy = procs.spawn(
                "py-spy",
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(client.proc.pid),
                    "--duration",
                    str(int(args.seconds)),
                    "--rate",
                    str(args.rate),
                    "--nonblocking",
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                ],
            )
            spy.wait(args.seconds + 60)
            gen.set_rate(client.instance, events, 0.0)
        except subprocess.TimeoutExpired:
            print("py-spy did not finish in time", file=sys.stderr)
            return 1
        finally:
            procs.close()
    summary = summarise(raw)
    (raw.with_suffix(".json")).write_text(json.dumps(summary, indent=2) + "\n")
    for role, data in summary.items():
        print(f"\n== {role}: {data['samples']} samples; own time")
        for name, share in data["own"]:
            print(f"  {share:5.1f}%  {name}")
        print(f"-- {role}: inclusive")
        for name, share in data["inclusive"][:10]:
            print(f"  {share:5.1f}%  {name}")
    print(f"\nraw stacks: {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
