"""The naive baseline: how a forwarder like the seed is written.

websocket-client's `WebSocketApp` per event (one thread each), `json.loads` of every
message, and one `XADD` round trip per message, with the same stream fields as forwarder.
It is given every advantage a careful naive author would take: UTF-8 validation in
websocket-client is skipped (json.loads checks the text anyway) and the Redis client has
hiredis. No reconnection: the benchmark never drops it.

    python -m bench.baseline --url WS_URL --token-file F --redis-url R --source NAME
                             --events E1,E2 --stream 'base:{event}'
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import quote

import redis
import websocket


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline")
    parser.add_argument("--url", required=True)
    parser.add_argument("--token-file", required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--events", required=True)
    parser.add_argument("--stream", default="{event}")
    args = parser.parse_args(argv)
    token = Path(args.token_file).read_text().strip()
    client = redis.Redis.from_url(args.redis_url)
    source: str = args.source
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    apps: list[Any] = []
    for event in args.events.split(","):
        stream = args.stream.format(source=source, event=event)

        def on_message(ws: Any, message: str, stream: str = stream, event: str = event) -> None:
            json.loads(message)  # the seed validated every frame before forwarding it
            client.xadd(
                stream,
                {
                    "data": message,
                    "event": event,
                    "source": source,
                    "received_at": int(time.time() * 1000),
                },
            )

        url = f"{args.url}?event={quote(event, safe='')}&token={quote(token, safe='')}"
        app = websocket.WebSocketApp(url, on_message=on_message)
        apps.append(app)
        threading.Thread(
            target=app.run_forever,
            kwargs={"skip_utf8_validation": True},
            name=f"ws:{event}",
            daemon=True,
        ).start()
    stop.wait()
    for app in apps:
        app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
