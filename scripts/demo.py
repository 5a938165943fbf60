"""`make run`: a throwaway redis-server, the upstream simulator and forwarder, with a live view.

Everything listens on 127.0.0.1 only. Ctrl-C stops the simulator and forwarder (forwarder
drains to Redis first); the redis-server stays up so the streams can be read, and the script
prints how to read them and how to stop it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import redis

from forwarder.cli import main as forwarder_main
from forwarder_sim import DEV_SECRET, mint_token

INSTANCE = "demo"
RATES = {  # frames per second, roughly a busy support number
    "messages.upsert": 20,
    "messages.update": 15,
    "presence.update": 5,
    "chats.update": 3,
    "contacts.upsert": 2,
    "connection.update": 0.2,
    "qrcode.updated": 0.1,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_redis(port: int) -> None:
    client = redis.Redis(port=port, socket_timeout=1)
    deadline = time.monotonic() + 10
    pause = threading.Event()
    while time.monotonic() < deadline:
        try:
            if client.ping():
                return
        except redis.RedisError:
            pause.wait(0.05)
    raise SystemExit("redis-server did not start")


def wait_port(port: int) -> None:
    deadline = time.monotonic() + 10
    pause = threading.Event()
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            pause.wait(0.05)
    raise SystemExit(f"the simulator did not start on port {port}")


def main() -> int:
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        raise SystemExit("redis-server is missing: sudo apt-get install redis-server")
    redis_port, sim_port, metrics_port = free_port(), free_port(), free_port()
    workdir = tempfile.mkdtemp(prefix="forwarder-demo-")
    redis_proc = subprocess.Popen(
        [redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", workdir],
        stdout=subprocess.DEVNULL,
        start_new_session=True,  # survives Ctrl-C so the streams stay readable
    )
    wait_redis(redis_port)
    rates = [arg for event, rate in RATES.items() for arg in ("--rate", f"{event}={rate}")]
    sim_args = [
        "simulate",
        "--port",
        str(sim_port),
        "--instance",
        INSTANCE,
        "--default-rate",
        "0.5",
    ]
    sim = subprocess.Popen(
        [sys.executable, "-m", "forwarder", *sim_args, *rates],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "FORWARDER_SIM_SECRET": DEV_SECRET},
        start_new_session=True,  # Ctrl-C reaches only this script, which stops them in order
    )
    wait_port(sim_port)  # else the first connection attempts are refused and retried
    env = {
        **os.environ,
        "FORWARDER_URL": f"ws://127.0.0.1:{sim_port}/ws/events",
        "FORWARDER_TOKEN": mint_token(INSTANCE, DEV_SECRET),  # environment, never argv
        "FORWARDER_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "FORWARDER_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
        "FORWARDER_SPOOL_DIR": os.path.join(workdir, "spool"),  # throwaway, like the rest
    }
    log_path = os.path.join(workdir, "forwarder.log")
    with open(log_path, "w") as log_file:
        fwd = subprocess.Popen(
            [sys.executable, "-m", "forwarder", "run"],
            env=env,
            stderr=log_file,
            start_new_session=True,
        )
    sys.stderr.write(
        f"redis-server on 127.0.0.1:{redis_port}, simulator on 127.0.0.1:{sim_port}, "
        f"forwarder metrics on http://127.0.0.1:{metrics_port}/metrics (log: {log_path})\n"
        "Ctrl-C to stop.\n"
    )
    try:
        forwarder_main(
            [
                "watch",
                "--status-url",
                f"http://127.0.0.1:{metrics_port}/status",
                "--redis-url",
                f"redis://127.0.0.1:{redis_port}/0",
            ]
        )
    finally:
        for proc in (fwd, sim):
            proc.send_signal(signal.SIGTERM)
        for proc in (fwd, sim):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    cli = f"redis-cli -p {redis_port}"
    sys.stdout.write(
        f"""
forwarder stopped (exit code {fwd.returncode}). The streams are still in redis-server
127.0.0.1:{redis_port} (pid {redis_proc.pid}). Read them:

  {cli} XLEN messages.upsert
  {cli} XRANGE messages.upsert - + COUNT 2
  {cli} XREVRANGE connection.update + - COUNT 1

Consume with a consumer group (what your services do):

  {cli} XGROUP CREATE messages.upsert billing 0
  {cli} XREADGROUP GROUP billing worker-1 COUNT 10 STREAMS messages.upsert '>'
  {cli} XACK messages.upsert billing <entry-id>

Each entry has the fields data (the frame, byte for byte), event, source, received_at (ms).
Stop the throwaway server with:  {cli} shutdown nosave
"""
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
