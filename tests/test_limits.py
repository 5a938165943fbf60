"""The open-file limit: raised to the hard limit at start, a clear exit 2 when even that is too
small; and the shipped unit's limits sized for 10,000 subscriptions."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from forwarder.config import IOConfig
from forwarder.errors import ExitCode
from forwarder.events import SENT_EVENTS
from forwarder.limits import RESERVED_FDS, fds_needed
from forwarder_sim import mint_token
from tests.conftest import SECRET
from tests.helpers import RedisServer, wait_for

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "forwarder.service"


def config(tmp_path: Path, sources: int, redis_url: str) -> Path:
    """`sources` sources with the 13 default events each, on a closed port (never connects)."""
    token = tmp_path / "token"
    token.write_text(mint_token("main", SECRET))
    parts = [
        f'[spool]\ndir = "{tmp_path / "spool"}"',
        f'[redis]\nurl = "{redis_url}"',
        '[metrics]\nlisten = "127.0.0.1:0"',
    ]
    for n in range(sources):
        parts.append(
            textwrap.dedent(
                f"""\
                [[sources]]
                name = "s{n}"
                url = "ws://127.0.0.1:9/ws/events"
                token_file = "{token}"
                stream = "{{source}}:{{event}}"
                """
            )
        )
    path = tmp_path / "forwarder.toml"
    path.write_text("\n".join(parts))
    return path


def limited(soft: int, hard: int, *argv: str) -> list[str]:
    """argv run under these RLIMIT_NOFILE limits (util-linux prlimit: no preexec_fn in a test
    process full of threads)."""
    prlimit = shutil.which("prlimit")
    assert prlimit, "prlimit is missing (Debian/Ubuntu: apt-get install util-linux)"
    return [prlimit, f"--nofile={soft}:{hard}", *argv]


def soft_limit(pid: int) -> int | None:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    return None


def test_the_soft_open_file_limit_is_raised_to_the_hard_limit(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Started with soft 256 / hard 4096 (systemd's default soft limit is 1024): runs with
    4096, and stops cleanly on SIGTERM."""
    path = config(tmp_path, 2, redis_server.url)
    proc = subprocess.Popen(
        limited(256, 4096, sys.executable, "-m", "forwarder", "run", "--config", str(path)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    try:
        wait_for(lambda: soft_limit(proc.pid) == 4096, 20.0, "the raised limit")
        # Running (signal handlers installed) once its main loop saved the marks file.
        wait_for((tmp_path / "spool" / "lastseen.json").exists, 20.0, "the main loop")
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == ExitCode.OK, err.decode()[-2000:]


def test_a_hard_limit_too_small_for_the_sockets_is_a_clear_exit_2(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """8 sources x 13 events with a hard limit of 128: exit 2, the numbers and the fix in the
    message, no traceback, nothing started."""
    path = config(tmp_path, 8, redis_server.url)
    needed = fds_needed(8 * len(SENT_EVENTS), IOConfig().handshake_threads)
    assert needed > 128
    proc = subprocess.run(
        limited(128, 128, sys.executable, "-m", "forwarder", "run", "--config", str(path)),
        capture_output=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    err = proc.stderr.decode()
    assert proc.returncode == ExitCode.CONFIG, err
    assert f"needs about {needed} open files" in err
    assert "hard limit (RLIMIT_NOFILE) is 128" in err
    assert "LimitNOFILE=" in err
    assert "Traceback" not in err
    assert not (tmp_path / "spool").exists()  # refused before anything was set up


def test_check_config_is_not_refused_for_the_limit_of_the_shell_it_runs_in(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """check-config validates the file; the limit only matters to `run` (the unit sets it)."""
    path = config(tmp_path, 8, redis_server.url)
    proc = subprocess.run(
        limited(128, 128, sys.executable, "-m", "forwarder", "check-config", "--config", str(path)),
        capture_output=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == ExitCode.OK, proc.stderr.decode()


def unit_settings() -> dict[str, str]:
    settings = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings[key] = value
    return settings


def test_the_shipped_unit_has_room_for_10000_subscriptions() -> None:
    """LimitNOFILE holds the sockets of 10,010 subscriptions; TasksMax the daemon's threads,
    which no longer grow with subscriptions; MemoryMax above the measured need."""
    unit = unit_settings()
    assert int(unit["LimitNOFILE"]) >= fds_needed(10_010, IOConfig().handshake_threads)
    # io loops (<= 4), handshake workers, writer, fsync, http, main, and headroom.
    assert int(unit["TasksMax"]) >= 4 + IOConfig().handshake_threads + 64
    assert int(unit["TasksMax"]) < 10_010  # bounded: not one per subscription
    memory = unit["MemoryMax"]
    assert memory.endswith("G")
    assert int(memory[:-1]) >= 1
    assert RESERVED_FDS >= 32
    assert os.path.exists(UNIT)
