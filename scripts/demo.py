"""`make run`: a throwaway redis-server, the upstream simulator and forwarder, with a live view.

forwarder runs with one [[discovery]] table, as against a real CodeChat server: it lists the
simulator's instances with the global API key and subscribes to each; more instances appear
while it runs (one every NEW_INSTANCE_EVERY seconds) and are picked up by the next poll.
All instances share one stream per event; the `source` field says which one an entry is from.

Everything listens on 127.0.0.1 only. Ctrl-C stops the simulator and forwarder (forwarder
drains to Redis first); the redis-server stays up so the streams can be read, and the script
prints how to read them and how to stop it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import redis

from forwarder.cli import main as forwarder_main
from forwarder_sim import DEV_SECRET

FIRST_INSTANCES = ("acme-support", "acme-sales")
LATER_INSTANCES = ("acme-billing", "acme-logistics")  # created one by one while it runs
NEW_INSTANCE_EVERY = 15.0  # seconds
POLL_INTERVAL = 5.0  # the demo polls often; the default is 30 s
EVENTS = ("messages.upsert", "messages.update", "presence.update", "connection.update")
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


def add_instances_over_time(sim_port: int, stop: threading.Event) -> None:
    """Create LATER_INSTANCES one by one through the simulator's control endpoint."""
    for name in LATER_INSTANCES:
        if stop.wait(NEW_INSTANCE_EVERY):
            return
        request = urllib.request.Request(
            f"http://127.0.0.1:{sim_port}/control/create_instance",
            data=json.dumps({"name": name}).encode(),
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=5):  # noqa: S310 - our loopback simulator
                pass
        except OSError:
            return  # the simulator is stopping


def write_config(workdir: str, redis_port: int, sim_port: int, metrics_port: int) -> str:
    events = ", ".join(f'"{e}"' for e in EVENTS)
    path = os.path.join(workdir, "forwarder.toml")
    with open(path, "w") as fh:
        fh.write(
            f"""# Written by `make run` (scripts/demo.py).
[redis]
url = "redis://127.0.0.1:{redis_port}/0"

[metrics]
listen = "127.0.0.1:{metrics_port}"

[spool]
dir = "{os.path.join(workdir, "spool")}"

[[discovery]]
name = "demo"
api_url = "http://127.0.0.1:{sim_port}"
api_key_env = "FORWARDER_DEMO_API_KEY"   # the global key: environment, never argv
events = [{events}]
poll_interval = {POLL_INTERVAL}
# stream = "{{event}}"                     # the default: one stream per event, all instances
"""
        )
    return path


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
    instances = [arg for name in FIRST_INSTANCES for arg in ("--instance", name)]
    sim_args = ["simulate", "--port", str(sim_port), *instances, "--default-rate", "0.5"]
    api_key = secrets.token_urlsafe(24)  # this run's global key
    sim = subprocess.Popen(
        [sys.executable, "-m", "forwarder", *sim_args, *rates],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "FORWARDER_SIM_SECRET": DEV_SECRET, "FORWARDER_SIM_API_KEY": api_key},
        start_new_session=True,  # Ctrl-C reaches only this script, which stops them in order
    )
    wait_port(sim_port)  # else the first listing fails and waits for the next poll
    config = write_config(workdir, redis_port, sim_port, metrics_port)
    env = {**os.environ, "FORWARDER_DEMO_API_KEY": api_key}
    log_path = os.path.join(workdir, "forwarder.log")
    with open(log_path, "w") as log_file:
        fwd = subprocess.Popen(
            [sys.executable, "-m", "forwarder", "run", "--config", config],
            env=env,
            stderr=log_file,
            start_new_session=True,
        )
    stop = threading.Event()
    adder = threading.Thread(target=add_instances_over_time, args=(sim_port, stop), daemon=True)
    adder.start()
    sys.stderr.write(
        f"redis-server on 127.0.0.1:{redis_port}, simulator on 127.0.0.1:{sim_port}, "
        f"forwarder metrics on http://127.0.0.1:{metrics_port}/metrics (log: {log_path}, "
        f"configuration: {config})\n"
        f"Instances {', '.join(FIRST_INSTANCES)} exist; {', '.join(LATER_INSTANCES)} appear "
        f"every {NEW_INSTANCE_EVERY:.0f}s and are subscribed at the next poll. Ctrl-C to stop.\n"
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
        stop.set()
        adder.join(5)
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

Every instance writes to the same stream per event (fan-in); the field `source` names the
instance, so one consumer group serves them all.

Consume with a consumer group (what your services do):

  {cli} XGROUP CREATE messages.upsert billing 0
  {cli} XREADGROUP GROUP billing worker-1 COUNT 10 STREAMS messages.upsert '>'
  {cli} XACK messages.upsert billing <entry-id>

Each entry has the fields data (the frame, byte for byte), event, source (the instance),
received_at (ms).

Stop the throwaway server with:  {cli} shutdown nosave
"""
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
