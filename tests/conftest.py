"""Fixtures: a real redis-server and the real simulator, on free loopback ports."""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from forwarder.config import Config, load_config
from forwarder.daemon import Forwarder
from forwarder_sim import Simulator, mint_token
from tests.helpers import RedisServer

SECRET = "test-secret-please-ignore"  # the simulator's HS256 secret in tests


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session; a missing binary fails the run, never skips it."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client on an empty database."""
    if redis_server.proc is None:  # a test stopped it
        redis_server.start()
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def simulator() -> Iterator[Simulator]:
    """The upstream simulator, recording every frame it delivers."""
    sim = Simulator(secret=SECRET, record=True)
    sim.start()
    yield sim
    sim.stop()


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """Leave the root logger as each test found it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


ConfigFactory = Callable[..., Config]


@pytest.fixture
def make_config(tmp_path: Path, simulator: Simulator, redis_server: RedisServer) -> ConfigFactory:
    """Write token files and a TOML file for the given sources; load it like `forwarder run`."""

    def factory(
        sources: dict[str, list[str]] | None = None,
        stream: str = "{source}:{event}",
        extra_source: str = "",
        extra: str = "",
        environ: dict[str, str] | None = None,
        redis_extra: str = "",
        spool_extra: str = "",
    ) -> Config:
        sources = sources or {"main": ["messages.upsert"]}
        parts = [
            "shutdown_timeout = 10.0",
            "[spool]",
            f'dir = "{tmp_path / "spool"}"',
            spool_extra,
            "[redis]",
            f'url = "{redis_server.url}"',
            redis_extra,
            "[metrics]",
            'listen = "127.0.0.1:0"',
        ]
        for name, events in sources.items():
            token_file = tmp_path / f"{name}.token"
            token_file.write_text(mint_token(name, SECRET) + "\n")
            event_list = ", ".join(f'"{e}"' for e in events)
            parts.append(
                f"""
                [[sources]]
                name = "{name}"
                url = "{simulator.url}"
                token_file = "{token_file}"
                events = [{event_list}]
                stream = "{stream}"
                """
                + textwrap.indent(textwrap.dedent(extra_source), " " * 16)
            )
        text = "\n".join(textwrap.dedent(p) for p in parts) + textwrap.dedent(extra)
        path = tmp_path / "forwarder.toml"
        path.write_text(text)
        return load_config(path, environ or {})

    return factory


@pytest.fixture
def run_forwarder() -> Iterator[Callable[..., Forwarder]]:
    """Start a Forwarder in this process; it is shut down at the end of the test."""
    started: list[Forwarder] = []

    def start(config: Config, **kwargs: Any) -> Forwarder:
        forwarder = Forwarder(config, **kwargs)
        forwarder.start()
        started.append(forwarder)
        return forwarder

    yield start
    for forwarder in started:
        if not forwarder._stopping:
            forwarder.shutdown()
