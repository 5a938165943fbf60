"""Shared test helpers: bounded waiting, free ports, a real redis-server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import redis

_PAUSE = threading.Event()  # never set: an interruptible pause for polling loops


def wait_for(
    predicate: Callable[[], object], timeout: float = 10.0, what: str = "", every: float = 0.02
) -> None:
    """Poll `predicate` every `every` s until true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        _PAUSE.wait(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A throwaway redis-server on a loopback port; can be stopped and restarted in place."""

    def __init__(self, workdir: Path, *extra: str, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed: the tests need a real one "
                "(`make test` installs it with apt-get when run as root)"
            )
        self.binary = binary
        self.workdir = workdir
        self.extra = extra  # e.g. "--appendonly", "yes" to survive a kill
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = self.client()
        try:
            wait_for(lambda: _pings(client), 10.0, "redis-server to accept connections")
        finally:
            client.close()

    def stop(self) -> None:
        """SIGKILL: the way a crash or an OOM kill ends Redis."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


Entries = list[tuple[bytes, dict[bytes, bytes]]]


def xrange(client: redis.Redis, key: str) -> Entries:
    """All entries of a stream, typed (redis-py's hints allow None everywhere)."""
    return cast(Entries, client.xrange(key))


class SentinelServer:
    """A Redis Sentinel on a loopback port watching `service` at a master's port."""

    def __init__(self, workdir: Path, service: str, master_port: int, quorum: int = 2) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: the tests need a real one")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.conf = workdir / f"sentinel-{self.port}.conf"
        # Sentinel rewrites its file as it learns: it must be its own, and writable.
        self.conf.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f"dir {workdir}\n"
            f"sentinel monitor {service} 127.0.0.1 {master_port} {quorum}\n"
            f"sentinel down-after-milliseconds {service} 1000\n"
            f"sentinel failover-timeout {service} 4000\n"
            f"sentinel parallel-syncs {service} 1\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, str(self.conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = self.client()
        try:
            wait_for(lambda: _pings(client), 10.0, "redis-sentinel to accept connections")
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)


class ClusterNodes:
    """Redis Cluster on loopback: `masters` masters with one replica each, built with
    `redis-cli --cluster create` like an operator would. Nodes keep their cluster
    configuration file in their own directory, so a killed node restarted rejoins."""

    def __init__(self, workdir: Path, masters: int = 3, node_timeout_ms: int = 2000) -> None:
        self.workdir = workdir
        self.nodes: list[RedisServer] = []
        for _ in range(masters * 2):
            port = free_port()
            node_dir = workdir / f"node-{port}"
            node_dir.mkdir()
            self.nodes.append(
                RedisServer(
                    node_dir,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    str(node_timeout_ms),
                    # The bus port defaults to port + 10000, beyond 65535 for ephemeral ports.
                    "--cluster-port",
                    str(free_port()),
                    port=port,
                )
            )
        self.replicas_per_master = 1

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not installed: the cluster tests need it")
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
        wait_for(self.healthy, 30.0, "the cluster to be ok on every node")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def info(self, node: RedisServer) -> dict[str, str]:
        client = node.client()
        try:
            text = client.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
        finally:
            client.close()
        raw = text.decode() if isinstance(text, bytes) else str(text)
        return dict(line.split(":", 1) for line in raw.split() if ":" in line)

    def healthy(self) -> bool:
        """Every running node says the cluster is ok and knows all of its nodes."""
        try:
            for node in self.nodes:
                if node.proc is None:
                    continue
                info = self.info(node)
                if info.get("cluster_state") != "ok" or info.get("cluster_known_nodes") != str(
                    len(self.nodes)
                ):
                    return False
        except redis.RedisError:
            return False
        return True

    def roles(self) -> dict[int, str]:
        """port -> "master" or "slave", as each running node sees itself."""
        roles = {}
        for node in self.nodes:
            if node.proc is None:
                continue
            client = node.client()
            try:
                role = client.execute_command("ROLE")  # type: ignore[no-untyped-call]
            finally:
                client.close()
            roles[node.port] = role[0].decode() if isinstance(role[0], bytes) else str(role[0])
        return roles

    def node_id(self, node: RedisServer) -> str:
        client = node.client()
        try:
            return str(client.execute_command("CLUSTER", "MYID").decode())  # type: ignore[no-untyped-call]
        finally:
            client.close()

    def owner(self, slot: int) -> RedisServer:
        """The running master that serves `slot`."""
        for node in self.nodes:
            if node.proc is None:
                continue
            client = node.client()
            try:
                for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):  # type: ignore[no-untyped-call]
                    if start <= slot <= end:
                        return self.node(int(master[1]))
            except redis.RedisError:
                continue
            finally:
                client.close()
        raise AssertionError(f"no node serves slot {slot}")

    def migrate_slot(self, slot: int, source: RedisServer, target: RedisServer) -> int:
        """Move `slot` and its keys from `source` to `target` the way redis-cli's reshard
        does (IMPORTING/MIGRATING, MIGRATE in small steps, SETSLOT NODE); returns the number
        of keys moved. Clients see ASK, TRYAGAIN and then MOVED meanwhile."""
        src, dst = source.client(), target.client()
        moved = 0
        try:
            src_id, dst_id = self.node_id(source), self.node_id(target)
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)  # type: ignore[no-untyped-call]
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)  # type: ignore[no-untyped-call]
            for _ in range(1000):  # bounded: a handful of keys per slot here
                keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1)  # type: ignore[no-untyped-call]
                if not keys:
                    break
                src.execute_command(  # type: ignore[no-untyped-call]
                    "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys
                )
                moved += len(keys)
            for node in self.nodes:
                if node.proc is None:
                    continue
                client = node.client()
                try:
                    client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)  # type: ignore[no-untyped-call]
                except redis.RedisError:
                    pass  # a replica refuses SETSLOT; masters are what matter
                finally:
                    client.close()
        finally:
            src.close()
            dst.close()
        return moved


def grant(node: RedisServer, user: str, password: str, rule: str) -> None:
    """ACL SETUSER `user` with `rule` (PASSWORD in it replaced) on one node: ACLs are per
    node, never replicated, so every node of a topology needs them (an aclfile in production)."""
    client = node.client()
    try:
        tokens = rule.replace("PASSWORD", password).split()
        client.execute_command("ACL", "SETUSER", user, *tokens)  # type: ignore[no-untyped-call]
    finally:
        client.close()
