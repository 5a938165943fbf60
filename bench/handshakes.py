"""Handshake cost: `python -m bench.handshakes [--threads 32] [--count 100]`.

Starts the simulator in a child process (so its CPU is not ours), then `threads` threads each
open `count` WebSockets with forwarder's connector (forwarder/handshake.py), as the handshake
pool does at a start or a reconnect storm, and keeps the sockets open. Prints handshakes per
second and this process's user and system CPU per handshake, as JSON. Loopback only; bounded
by count (and each handshake by a 5 s timeout).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import socket
import threading
import time
from multiprocessing.queues import Queue
from typing import Any

SECRET = "bench-handshakes"  # noqa: S105 (the simulator's signing key, loopback only)


def _serve(urls: Queue[str], stop: Any) -> None:
    from forwarder_sim.server import Simulator

    sim = Simulator(secret=SECRET)
    sim.start()
    urls.put(sim.url)
    stop.wait(600)
    sim.stop()


def measure(threads: int, count: int) -> dict[str, Any]:
    from forwarder.handshake import websocket_connect
    from forwarder_sim import mint_token

    urls: Queue[str] = multiprocessing.Queue()
    stop = multiprocessing.Event()
    server = multiprocessing.Process(target=_serve, args=(urls, stop), daemon=True)
    server.start()
    try:
        url = f"{urls.get(timeout=30)}?event=messages.upsert&token={mint_token('i1', SECRET)}"
        opened: list[socket.socket] = []
        lock = threading.Lock()

        def work() -> None:
            for _ in range(count):
                conn = websocket_connect(url, 5.0)
                assert conn.sock is not None
                with lock:
                    opened.append(conn.sock)

        before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        workers = [threading.Thread(target=work) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(300)
        elapsed = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        for sock in opened:
            sock.close()
        n = len(opened)
        return {
            "threads": threads,
            "handshakes": n,
            "per_second": round(n / elapsed),
            "user_ms": round((after.ru_utime - before.ru_utime) / n * 1000, 2),
            "system_ms": round((after.ru_stime - before.ru_stime) / n * 1000, 2),
        }
    finally:
        stop.set()
        server.join(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--count", type=int, default=100)
    args = parser.parse_args()
    print(json.dumps(measure(args.threads, args.count)))


if __name__ == "__main__":
    main()
