"""The same consumer with FastStream's Redis stream subscriber (pip install 'faststream[redis]').

    REDIS_URL=redis://127.0.0.1:6379/0 python examples/faststream_consumer.py

- The group is created at `0` on start-up (FastStream itself would create it at `$`, after
  what is already in the stream).
- Two subscribers share one handler: one reads new entries (XREADGROUP), one takes over
  entries a crashed consumer left pending for CLAIM_IDLE_MS (XAUTOCLAIM, `min_idle_time`).
- Acknowledgement: FastStream XACKs when the handler returns; an exception leaves the entry
  pending (NACK_ON_ERROR), so the claiming subscriber retries it later.
- forwarder's entries are not FastStream envelopes: FastStream hands the handler the `data`
  field, decoded as JSON (the WhatsApp payload). `event`, `source` and `received_at` are in
  `msg.raw_message["data"]`.
- Dedupe on keyId as in redis_consumer.py: the first entry of a keyId claims it.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from typing import Any

from faststream import AckPolicy, FastStream
from faststream.redis import RedisBroker, RedisStreamMessage, StreamSub
from redis.asyncio import Redis
from redis.exceptions import ResponseError

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
STREAM = os.environ.get("STREAM", "messages.upsert")
GROUP = os.environ.get("GROUP", "billing")
CONSUMER = os.environ.get("CONSUMER", f"{socket.gethostname()}-{os.getpid()}")
CLAIM_IDLE_MS = int(os.environ.get("CLAIM_IDLE_MS", "60000"))
SEEN_TTL = 24 * 3600

broker = RedisBroker(REDIS_URL)
app = FastStream(broker)
redis = Redis.from_url(REDIS_URL)


@app.on_startup
async def create_group() -> None:
    try:
        await redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


@app.after_shutdown
async def close() -> None:
    await redis.aclose()


def handle(message: dict[str, Any], source: str) -> None:
    """Your business logic: called once per WhatsApp message (not per duplicate)."""
    line = {
        "keyId": message.get("keyId"),
        "remoteJid": message.get("keyRemoteJid"),
        "messageType": message.get("messageType"),
        "source": source,
    }
    print(json.dumps(line), flush=True)  # noqa: T201 - the example's visible effect


@broker.subscriber(
    stream=StreamSub(STREAM, group=GROUP, consumer=CONSUMER, max_records=100),
    ack_policy=AckPolicy.NACK_ON_ERROR,
)
@broker.subscriber(
    stream=StreamSub(STREAM, group=GROUP, consumer=CONSUMER, min_idle_time=CLAIM_IDLE_MS),
    ack_policy=AckPolicy.NACK_ON_ERROR,
)
async def on_message(body: dict[str, Any], msg: RedisStreamMessage) -> None:
    entry_id = msg.raw_message["message_ids"][0]
    fields = msg.raw_message["data"]
    key_id = body.get("keyId")
    seen = f"{GROUP}:seen:{key_id}"
    if (
        key_id
        and not await redis.set(seen, entry_id, nx=True, ex=SEEN_TTL)
        and await redis.get(seen) != entry_id
    ):
        print(json.dumps({"duplicate": key_id, "id": entry_id.decode()}), flush=True)  # noqa: T201
        return  # acknowledged on return: the message was handled under another entry
    try:
        handle(body, fields.get(b"source", b"").decode())
    except Exception:
        if key_id:
            await redis.delete(seen)
        raise  # left pending, retried by the claiming subscriber


if __name__ == "__main__":
    asyncio.run(app.run())
