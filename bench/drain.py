"""A client that reads frames and throws them away: the generator's ceiling.

One connection per event, all read by one thread through `selectors` in 256 KiB chunks
(what forwarder's reader does, minus parsing and Redis). The benchmark counts what the
simulator delivered to it; flow control makes that equal to what this client read, give
or take the socket buffers.

    python -m bench.drain --url WS_URL --token-file F --events E1,E2
"""

from __future__ import annotations

import argparse
import selectors
import signal
import socket
import sys
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import quote

import websocket

RECV_BYTES = 256 * 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.drain")
    parser.add_argument("--url", required=True)
    parser.add_argument("--token-file", required=True)
    parser.add_argument("--events", required=True)
    args = parser.parse_args(argv)
    token = Path(args.token_file).read_text().strip()
    stopped = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopped
        stopped = True

    signal.signal(signal.SIGTERM, on_signal)
    selector = selectors.DefaultSelector()
    conns: list[Any] = []
    for event in args.events.split(","):
        url = f"{args.url}?event={quote(event, safe='')}&token={quote(token, safe='')}"
        ws: Any = websocket.create_connection(url, timeout=10, suppress_origin=True)
        conns.append(ws)
        sock: socket.socket = ws.sock
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    while not stopped and selector.get_map():
        for key, _ in selector.select(timeout=0.5):
            sock = key.fileobj  # type: ignore[assignment]
            try:
                data = sock.recv(RECV_BYTES)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                selector.unregister(sock)
    for ws in conns:
        ws.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
