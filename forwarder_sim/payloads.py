"""Realistic upstream payloads for the simulator, each carrying a recoverable sequence number.

The shapes follow the upstream protocol notes (``docs/upstream.md`` §2, §4, §6): the frame
body is the bare JSON value that CodeChat's ``whatsapp-api`` passes to ``ws.send``, encoded
compactly (no whitespace, like ``JSON.stringify``). Sizes match §6: text ``messages.upsert``
is 0.4-1 KB, media messages 2-15 KB, ``qrcode.updated`` about 13 KB with a real PNG data URL.

Where the sequence number lives (``seq_of`` reads it back):

========================================== ===================================================
event                                      field
========================================== ===================================================
``messages.upsert``, ``send.message``      ``keyId``: last 12 characters, upper-case hex
``messages.update``                        ``id`` (the message key id): last 12 hex characters
``call.upsert``                            ``id`` (the call id): last 12 hex characters
``qrcode.updated``                         ``code``: last 12 hex characters of the ref, i.e. the
                                           part before the first comma
``contacts.upsert``, ``chats.upsert``      ``[0].id``: the DB row id, equal to seq
``chats.update``, ``groups.upsert``,       ``[0].remoteJid`` / ``[0].id``: a group JID
``groups.update``                          ``120363<12 decimal digits>@g.us``
``presence.update``,                       ``id``: a group JID as above
``group-participants.update``
``connection.update``                      ``_simSeq`` (an extra key; see below)
any other accepted event                   ``id``: last 12 hex characters
========================================== ===================================================

``connection.update`` upstream is exactly ``{instance, state, statusReason}`` and none of these
fields can carry a counter, so the simulator adds one documented extra key, ``_simSeq``. It is
the only deviation from the upstream shapes.

Determinism: ``build(event, seq, seed)`` depends only on its arguments. Each event has a small
set of variants (text, media, group, API-sent, ...); the variant is a hash of ``(seed, seq)`` and
each variant is rendered once into a template with the sequence number spliced in, so building
a frame costs about a microsecond and the simulator can generate frames at load-test rates.

All functions here are pure and thread-safe (the template caches are filled idempotently).
"""

from __future__ import annotations

import base64
import hashlib
import random
import re
import struct
import urllib.parse
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from forwarder import events

__all__ = [
    "ALLOWED_EVENTS",
    "SENT_EVENTS",
    "build",
    "min_size",
    "seq_of",
    "sized",
    "sized_factory",
]

# The event lists live in forwarder.events (shared with config validation); re-exported here.
ALLOWED_EVENTS: tuple[str, ...] = events.ALLOWED_EVENTS
SENT_EVENTS: tuple[str, ...] = events.SENT_EVENTS

_ALLOWED = frozenset(ALLOWED_EVENTS)

# Markers rendered into a document and later replaced. The quoted forms replace a whole JSON
# string (so an int or an escaped name can take its place); the bare forms sit inside a string.
_M_HEX = "@SQH@"  # 12 upper-case hex digits of seq
_M_DEC = "@SQD@"  # 12 decimal digits of seq (group JIDs)
_M_INT = "@SQI@"  # seq as a JSON integer (quoted marker)
_M_INST = "@INS@"  # the instance name as a JSON string (quoted marker)
_M_PADT = "@PDT@"  # padding with chat text (sized frames only)
_M_PADB = "@PDB@"  # padding with base64 characters (sized frames only)
_MARKER_RE = re.compile(rb'"@(SQI|INS)@"|@(SQH|SQD|PDT|PDB)@')

_SEQ_MAX = 16**12 - 1  # what 12 hex digits can hold; 12 decimal digits hold less
_SEQ_DEC_MAX = 10**12 - 1

_BASE_TS = 1778850000  # 2026-05-15, the date of the upstream revision the notes describe
_N_VARIANTS = 16

_FIRST = ["Maria", "João", "Ana", "Pedro", "Lucas", "Juliana", "Carlos", "Fernanda", "Rafael"]
_LAST = ["Souza", "Silva", "Oliveira", "Santos", "Pereira", "Costa", "Almeida", "Ribeiro"]
_TEXTS = [
    "Oi, tudo bem?",
    "Bom dia! Gostaria de saber o status do meu pedido.",
    "Pode me enviar o boleto atualizado, por favor?",
    "Obrigado pelo atendimento 👍",
    "Vou verificar e te retorno ainda hoje.",
    "Qual o horário de funcionamento da loja no sábado?",
    "Seu pedido saiu para entrega e deve chegar até as 18h.",
    "Consegue confirmar o endereço de entrega? Rua das Flores, 123, apto 45, São Paulo - SP.",
    "Recebi a nota fiscal, mas o valor está diferente do combinado. Podemos conversar?",
]
# ASCII on purpose: padding is cut at an arbitrary byte, which must not split a UTF-8 sequence.
_PAD_TEXT = (
    "Ola! Segue o resumo do atendimento de hoje: pedido confirmado, pagamento aprovado e "
    "entrega prevista para amanha entre 8h e 12h. Qualquer duvida e so responder por aqui. "
)
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_STATUSES = ["SERVER_ACK", "DELIVERY_ACK", "READ", "PLAYED", "PENDING", "ERROR"]
_PRESENCES = ["available", "unavailable", "composing", "recording", "paused"]


# --------------------------------------------------------------------------- small helpers


def _hex(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789ABCDEF") for _ in range(n))


def _b64(rng: random.Random, nbytes: int) -> str:
    return base64.b64encode(rng.randbytes(nbytes)).decode()


def _phone(rng: random.Random) -> str:
    return f"55{rng.choice([11, 21, 31, 41, 51, 61, 71, 81])}9{rng.randrange(10**7, 10**8)}"


def _jid(rng: random.Random) -> str:
    return f"{_phone(rng)}@s.whatsapp.net"


def _lid(rng: random.Random) -> str:
    return f"{rng.randrange(10**13, 10**15)}@lid"


def _group_jid(rng: random.Random) -> str:
    return f"120363{rng.randrange(10**11, 10**12):012d}@g.us"


def _name(rng: random.Random) -> str:
    return f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"


def _ts(rng: random.Random) -> int:
    return _BASE_TS + rng.randrange(0, 86400)


def _iso(ts: float) -> str:
    dt = datetime.fromtimestamp(ts, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _ulid_prefix(rng: random.Random) -> str:
    # ULIDs are Crockford base32; the 12 hex seq digits that follow are a subset of it.
    return "01JV" + "".join(rng.choice("0123456789ABCDEFGHJKMNPQRSTVWXYZ") for _ in range(10))


def _media_path(kind: str, content: dict[str, Any]) -> str:
    ref = {k: content[k] for k in ("mediaKey", "directPath", "url", "mimetype")}
    q = base64.b64encode(orjson.dumps(ref)).decode()
    return f"/chat/public/{kind}/download?q={urllib.parse.quote(q, safe='')}"


def _jpeg_thumbnail(rng: random.Random, nbytes: int) -> str:
    # A JFIF header followed by noise: base64 looks like the real "/9j/4AAQSkZJRgABAQ..." data.
    head = bytes.fromhex("ffd8ffe000104a46494600010100000100010000ffdb004300")
    return base64.b64encode(head + rng.randbytes(max(0, nbytes - len(head)))).decode()


def _png_qr(rng: random.Random, modules: int = 73, margin: int = 3, scale: int = 4) -> bytes:
    """Return a real PNG that looks like node-qrcode output (RGBA, scale 4, margin 3, level H).

    The module pattern is random apart from the three finder squares; node-qrcode's encoder
    (pngjs: deflate level 9, Z_RLE, adaptive filters) gives the ~13 KB data URLs measured upstream.
    """
    n = modules + 2 * margin
    grid = [[False] * n for _ in range(n)]
    for y in range(modules):
        for x in range(modules):
            grid[y + margin][x + margin] = rng.random() < 0.5
    for oy, ox in ((0, 0), (0, modules - 7), (modules - 7, 0)):
        for y in range(7):
            for x in range(7):
                on = y in (0, 6) or x in (0, 6) or (2 <= y <= 4 and 2 <= x <= 4)
                grid[oy + y + margin][ox + x + margin] = on
    dark, light = b"\x00\x00\x00\xff", b"\xff\xff\xff\xff"
    raw = bytearray()
    for row in grid:
        line = b"".join((dark if c else light) * scale for c in row)
        raw += b"\x00" + line
        for _ in range(scale - 1):  # filter "Up": a repeated row is all zeros
            raw += b"\x02" + bytes(len(line))
    width = n * scale

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data)
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    comp = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    idat = comp.compress(bytes(raw)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, width, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------- builders
#
# A builder returns a JSON-able document containing the markers above. Variant ``_SIZED`` asks
# for a compact form carrying one padding marker, used by ``sized()``; otherwise ``rng`` (seeded
# from the variant) picks a realistic document.

_Builder = Callable[[random.Random, int], Any]
_SIZED = -1  # the variant number that asks a builder for its compact, padded form

# messages.upsert variants cycle through this mix, so every seed gets media frames too.
_MESSAGE_KINDS = (
    ["text"] * 6
    + ["extended"] * 3
    + ["api"] * 2
    + ["image"] * 2
    + ["audio", "reaction", "document"]
)


def _message_key_id(rng: random.Random, device: str) -> str:
    if device == "web":
        return _ulid_prefix(rng) + _M_HEX
    if device == "android":
        return _hex(rng, 20) + _M_HEX  # 32 hex characters in all
    return "3EB0" + _hex(rng, 8) + _M_HEX


def _b_messages_upsert(rng: random.Random, variant: int) -> Any:
    sized = variant == _SIZED
    if sized:
        return {
            "keyId": "3EB0" + _hex(rng, 8) + _M_HEX,
            "keyFromMe": False,
            "pushName": _name(rng),
            "keyRemoteJid": _jid(rng),
            "messageType": "conversation",
            "content": {"text": _M_PADT},
            "messageTimestamp": _ts(rng),
            "instanceId": 1,
            "device": "android",
            "isGroup": False,
            "info": {"type": "notify"},
        }
    kind = _MESSAGE_KINDS[variant % len(_MESSAGE_KINDS)]
    is_group = kind != "api" and rng.random() < 0.3
    device = "web" if kind == "api" else rng.choice(["android", "ios", "android", "web"])
    ts = _ts(rng)
    doc: dict[str, Any] = {"keyId": _message_key_id(rng, device), "keyFromMe": kind == "api"}
    if kind != "api":
        doc["pushName"] = _name(rng)
    doc["keyRemoteJid"] = _group_jid(rng) if is_group else _jid(rng)
    doc["keyLid"] = _lid(rng)
    if is_group:
        doc["keyParticipant"] = _jid(rng)
        doc["keyParticipantLid"] = _lid(rng)
    content: dict[str, Any]
    if kind == "text":
        mtype, content = "conversation", {"text": " ".join(rng.sample(_TEXTS, rng.randint(1, 3)))}
    elif kind in ("extended", "api"):
        mtype = "extendedTextMessage"
        content = {"text": " ".join(rng.sample(_TEXTS, rng.randint(1, 4)))}
        if kind == "extended":
            content["contextInfo"] = {
                "stanzaId": "3EB0" + _hex(rng, 16),
                "participant": _jid(rng),
                "quotedMessage": {"conversation": rng.choice(_TEXTS)},
                "expiration": 604800,
                "ephemeralSettingTimestamp": str(ts - 90000),
                "disappearingMode": {"initiator": "CHANGED_IN_CHAT", "trigger": "CHAT_SETTING"},
            }
    elif kind == "reaction":
        mtype = "reactionMessage"
        content = {
            "key": {"remoteJid": doc["keyRemoteJid"], "fromMe": True, "id": "3EB0" + _hex(rng, 16)},
            "text": rng.choice(["👍", "❤️", "😂", "🙏"]),
            "senderTimestampMs": str(ts * 1000 + rng.randrange(1000)),
        }
    else:
        mtype = {"image": "imageMessage", "audio": "audioMessage", "document": "documentMessage"}[
            kind
        ]
        path = "/v/t62.7118-24/" + str(rng.randrange(10**7, 10**8)) + "_" + _hex(rng, 16).lower()
        content = {
            "url": f"https://mmg.whatsapp.net{path}.enc?ccb=11-4&oh=01_{_b64(rng, 24)}&mms3=true",
            "mimetype": {
                "image": "image/jpeg",
                "audio": "audio/ogg; codecs=opus",
                "document": "application/pdf",
            }[kind],
            "fileSha256": _b64(rng, 32),
            "fileLength": str(rng.randrange(10**4, 5 * 10**6)),
            "mediaKey": _b64(rng, 32),
            "fileEncSha256": _b64(rng, 32),
            "directPath": path + "?ccb=11-4&oh=01_Q5Aa" + _b64(rng, 24),
            "mediaKeyTimestamp": str(ts - rng.randrange(60)),
        }
        if kind == "image":
            content.update(
                caption=rng.choice(["nota fiscal", "comprovante", "", "foto do produto"]),
                height=1280,
                width=960,
                jpegThumbnail=_jpeg_thumbnail(rng, rng.randrange(1200, 10500)),
            )
        elif kind == "audio":
            content.update(seconds=rng.randrange(2, 90), ptt=True, waveform=_b64(rng, 64))
        else:
            content.update(
                title="boleto.pdf",
                fileName="boleto.pdf",
                pageCount=rng.randint(1, 4),
                jpegThumbnail=_jpeg_thumbnail(rng, rng.randrange(1500, 6000)),
            )
    doc.update(
        messageType=mtype,
        content=content,
        messageTimestamp=ts,
        instanceId=1,
        device=device,
        isGroup=is_group,
    )
    if kind == "api" or rng.random() < 0.5:
        doc["id"] = rng.randrange(10**4, 10**6)
    if kind == "api":
        if rng.random() < 0.5:
            doc["externalAttributes"] = {"orderId": f"A-{rng.randrange(1000, 9999)}"}
    else:
        doc["info"] = {"type": "notify" if rng.random() < 0.9 else "append"}
    if kind in ("image", "audio", "document"):
        doc["media"] = {"path": _media_path(kind, content)}
    return doc


def _b_send_message(rng: random.Random, variant: int) -> Any:
    sized = variant == _SIZED
    doc: dict[str, Any] = {
        "keyId": _ulid_prefix(rng) + _M_HEX,
        "keyFromMe": True,
        "keyRemoteJid": _jid(rng),
        "messageType": "extendedTextMessage",
        "content": {"text": _M_PADT if sized else " ".join(rng.sample(_TEXTS, rng.randint(1, 3)))},
        "messageTimestamp": _ts(rng),
        "instanceId": 1,
        "device": "web",
        "isGroup": False,
        "id": rng.randrange(10**4, 10**6),
    }
    if not sized and rng.random() < 0.5:
        doc["externalAttributes"] = {"orderId": f"A-{rng.randrange(1000, 9999)}"}
    return doc


def _b_messages_update(rng: random.Random, variant: int) -> Any:
    sized = variant == _SIZED
    is_group = not sized and rng.random() < 0.3
    doc: dict[str, Any] = {
        "remoteJid": _group_jid(rng) if is_group else _jid(rng),
        "fromMe": True if sized else rng.random() < 0.7,
        "id": "3EB0" + _hex(rng, 8) + _M_HEX,
    }
    if is_group:
        doc["participant"] = _jid(rng)
    if sized:
        doc["remoteJidAlt"] = _M_PADT
    if sized or rng.random() < 0.9:
        doc["status"] = rng.choice(_STATUSES[:4])
    doc["dateTime"] = _iso(_ts(rng) + rng.random())
    doc["instanceId"] = 1
    return doc


def _b_qrcode_updated(rng: random.Random, variant: int) -> Any:
    sized = variant == _SIZED
    keys = ",".join(_b64(rng, 32) for _ in range(3))
    code = "2@" + "".join(rng.choice(_B64) for _ in range(rng.randrange(76, 96))) + _M_HEX
    doc: dict[str, Any] = {"count": 1 if sized else rng.randint(1, 5)}
    if not sized and rng.random() < 0.2:
        doc["paringCode"] = "".join(rng.choice("ABCDEFGHJKLMNPQRSTVWXYZ23456789") for _ in range(8))
    doc["code"] = f"{code},{keys}"
    if sized:
        doc["base64"] = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAUwAAAFM" + _M_PADB
    else:
        doc["base64"] = "data:image/png;base64," + base64.b64encode(_png_qr(rng)).decode()
    return doc


def _b_connection_update(rng: random.Random, variant: int) -> Any:
    sized = variant == _SIZED
    state, reason = rng.choice(
        [("connecting", 200), ("open", 200), ("close", 515), ("close", 428), ("close", 408)]
    )
    doc: dict[str, Any] = {"instance": _M_INST, "state": state, "statusReason": reason}
    doc["_simSeq"] = _M_INT
    if sized:
        doc["instance"] = _M_PADT  # the only string field; sized frames are synthetic anyway
    return doc


def _b_contacts_upsert(rng: random.Random, variant: int) -> Any:
    sized = variant == _SIZED
    ts = _ts(rng)
    pic = (
        "https://pps.whatsapp.net/v/t61.24694-24/"
        f"{rng.randrange(10**8, 10**9)}_{rng.randrange(10**15, 10**16)}_n.jpg"
        f"?ccb=11-4&oh=01_Q5Aa{_b64(rng, 30)}&oe={rng.randrange(10**7, 10**8):X}&_nc_sid=5e03e0"
    )
    return [
        {
            "id": _M_INT,
            "remoteJid": _jid(rng),
            "pushName": _M_PADT if sized else _name(rng),
            "profilePicUrl": pic if (not sized and rng.random() < 0.7) else None,
            "createdAt": _iso(ts),
            "updatedAt": _iso(ts),
            "instanceId": 1,
        }
    ]


def _b_chats_upsert(rng: random.Random, variant: int) -> Any:
    sized = variant == _SIZED
    ts = _ts(rng)
    content: dict[str, Any] = {
        "conversationTimestamp": str(ts - 3600),
        "unreadCount": rng.randrange(0, 5),
    }
    if sized:
        content["name"] = _M_PADT
    elif rng.random() < 0.4:
        content.update(name=_name(rng), archived=False, pinned=0, muteEndTime="0")
    return [
        {
            "id": _M_INT,
            "remoteJid": _jid(rng),
            "content": content,
            "createdAt": _iso(ts),
            "updatedAt": _iso(ts + 1),
            "instanceId": 1,
        }
    ]


def _b_chats_update(rng: random.Random, variant: int) -> Any:
    sized = variant == _SIZED
    first = "120363" + _M_DEC + "@g.us"
    items: list[dict[str, Any]] = []
    for i in range(1 if sized else rng.randint(1, 4)):
        content: dict[str, Any] = {
            "conversationTimestamp": _ts(rng),
            "unreadCount": rng.randrange(0, 9),
        }
        if sized:
            content["name"] = _M_PADT
        elif rng.random() < 0.3:
            content["messages"] = [{"message": {"key": {"id": "3EB0" + _hex(rng, 16)}}}]
        items.append(
            {"remoteJid": first if i == 0 else _jid(rng), "instanceId": 1, "content": content}
        )
    return items


def _participants(rng: random.Random, n: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(n):
        admin = "superadmin" if i == 0 else ("admin" if rng.random() < 0.1 else None)
        out.append({"id": _lid(rng), "phoneNumber": _jid(rng), "admin": admin})
    return out


def _b_groups_upsert(rng: random.Random, variant: int) -> Any:
    sized = variant == _SIZED
    ts = _ts(rng)
    owner = _jid(rng)
    n = 1 if sized else rng.choice([3, 8, 20, 60, 150])
    group = {
        "id": "120363" + _M_DEC + "@g.us",
        "addressingMode": "lid",
        "subject": _M_PADT if sized else rng.choice(["Equipe Vendas", "Família", "Suporte N2"]),
        "subjectOwner": owner,
        "subjectTime": ts - 86400,
        "size": n,
        "creation": ts - 86400 * 30,
        "owner": owner,
        "desc": "" if sized else "Grupo para avisos e combinados da semana.",
        "descId": _hex(rng, 16),
        "restrict": False,
        "announce": False,
        "participants": _participants(rng, n),
    }
    return [group]


def _b_groups_update(rng: random.Random, variant: int) -> Any:
    sized = variant == _SIZED
    doc: dict[str, Any] = {"id": "120363" + _M_DEC + "@g.us", "author": _jid(rng)}
    if sized:
        doc["subject"] = _M_PADT
    else:
        change = rng.choice(["subject", "announce", "restrict", "desc"])
        if change == "subject":
            doc["subject"] = rng.choice(["Equipe Vendas 2026", "Avisos", "Suporte"])
        elif change == "desc":
            doc["desc"] = "Novas regras do grupo: sem correntes, por favor."
            doc["descId"] = _hex(rng, 16)
        else:
            doc[change] = rng.random() < 0.5
    return [doc]


def _b_group_participants_update(rng: random.Random, variant: int) -> Any:
    sized = variant == _SIZED
    author = _lid(rng)
    return {
        "id": "120363" + _M_DEC + "@g.us",
        "author": author,
        "authorPn": _M_PADT if sized else _jid(rng),
        "participants": _participants(rng, 1 if sized else rng.randint(1, 3)),
        "action": rng.choice(["add", "remove", "promote", "demote"]),
    }


def _b_presence_update(rng: random.Random, variant: int) -> Any:
    sized = variant == _SIZED
    who = _jid(rng)
    presence: dict[str, Any] = {"lastKnownPresence": rng.choice(_PRESENCES)}
    if sized:
        presence["lastKnownPresence"] = _M_PADT
    elif presence["lastKnownPresence"] == "unavailable":
        presence["lastSeen"] = _ts(rng)
    return {"id": "120363" + _M_DEC + "@g.us", "presences": {who: presence}}


def _b_call_upsert(rng: random.Random, variant: int) -> Any:
    sized = variant == _SIZED
    caller = _jid(rng)
    return {
        "chatId": caller,
        "from": _M_PADT if sized else caller,
        "id": _hex(rng, 20) + _M_HEX,
        "date": _iso(_ts(rng)),
        "status": rng.choice(["offer", "ringing", "timeout", "reject", "accept", "terminate"]),
        "offline": False,
        "isVideo": rng.random() < 0.2,
        "isGroup": False,
    }


def _b_generic(rng: random.Random, variant: int) -> Any:
    sized = variant == _SIZED
    # Events upstream accepts but never sends on WS: a small, plausible object is enough.
    return {
        "id": _hex(rng, 8) + _M_HEX,
        "instanceId": 1,
        "remoteJid": _M_PADT if sized else _jid(rng),
        "dateTime": _iso(_ts(rng)),
    }


_BUILDERS: dict[str, _Builder] = {
    "qrcode.updated": _b_qrcode_updated,
    "connection.update": _b_connection_update,
    "messages.upsert": _b_messages_upsert,
    "messages.update": _b_messages_update,
    "send.message": _b_send_message,
    "contacts.upsert": _b_contacts_upsert,
    "presence.update": _b_presence_update,
    "chats.upsert": _b_chats_upsert,
    "chats.update": _b_chats_update,
    "groups.upsert": _b_groups_upsert,
    "groups.update": _b_groups_update,
    "group-participants.update": _b_group_participants_update,
    "call.upsert": _b_call_upsert,
}


# --------------------------------------------------------------------------- templates


@dataclass(frozen=True, slots=True)
class _Template:
    """A rendered document split at its markers: ``pieces[0] kinds[0] pieces[1] ...``."""

    pieces: tuple[bytes, ...]
    kinds: tuple[bytes, ...]

    @classmethod
    def compile(cls, doc: Any) -> _Template:
        raw = orjson.dumps(doc)
        pieces: list[bytes] = []
        kinds: list[bytes] = []
        pos = 0
        for m in _MARKER_RE.finditer(raw):
            pieces.append(raw[pos : m.start()])
            kinds.append(m.group(1) or m.group(2))
            pos = m.end()
        pieces.append(raw[pos:])
        return cls(tuple(pieces), tuple(kinds))

    def fixed_len(self, instance: bytes = b"") -> int:
        """Length without seq and padding (fixed-width seq digits are counted)."""
        n = sum(map(len, self.pieces))
        for kind in self.kinds:
            n += 12 if kind in (b"SQH", b"SQD") else len(instance) if kind == b"INS" else 0
        return n

    def format(self, instance: bytes, pad: int | None) -> bytes:
        """Return a ``bytes %`` format taking ``{b"s": seq, b"p": padding}``.

        Formatting is the fastest way to splice values into bytes in CPython, which matters
        because the simulator renders every generated frame this way. With ``pad`` given,
        the padding is baked in; otherwise it is the ``%(p)s`` argument.
        """
        out = [self.pieces[0].replace(b"%", b"%%")]
        for kind, piece in zip(self.kinds, self.pieces[1:], strict=True):
            if kind == b"SQH":
                out.append(b"%(s)012X")
            elif kind == b"SQD":
                out.append(b"%(s)012d")
            elif kind == b"SQI":
                out.append(b"%(s)d")
            elif kind == b"INS":
                out.append(instance.replace(b"%", b"%%"))
            elif pad is None:
                out.append(b"%(p)s")
            else:
                src = _PAD_TEXT_B if kind == b"PDT" else _PAD_B64_B
                out.append(_pad(src, pad))
            out.append(piece.replace(b"%", b"%%"))
        return b"".join(out)


_PAD_TEXT_B = _PAD_TEXT.encode("ascii")
_PAD_B64_B = base64.b64encode(random.Random(7).randbytes(3072))


def _pad(src: bytes, n: int) -> bytes:
    if n <= len(src):
        return src[:n]
    return (src * (n // len(src) + 1))[:n]


_templates: dict[tuple[str, int, int], _Template] = {}
_formats: dict[tuple[str, int, int, bytes], bytes] = {}
_sized_templates: dict[str, _Template] = {}

_DEC_EVENTS = frozenset(
    [
        "chats.update",
        "groups.upsert",
        "groups.update",
        "presence.update",
        "group-participants.update",
    ]
)


def _check(event: str, seq: int) -> None:
    if event not in _ALLOWED:
        raise ValueError(f"unknown event {event!r}")
    limit = _SEQ_DEC_MAX if event in _DEC_EVENTS else _SEQ_MAX
    if not 0 <= seq <= limit:
        raise ValueError(f"seq {seq} out of range 0..{limit} for {event}")


def _variant(seed: int, seq: int) -> int:
    digest = hashlib.blake2b(b"%d:%d" % (seed, seq), digest_size=4).digest()
    return int.from_bytes(digest, "big") % _N_VARIANTS


def _template(event: str, seed: int, variant: int) -> _Template:
    key = (event, seed, variant)
    tpl = _templates.get(key)
    if tpl is None:
        rng = random.Random(f"{event}|{seed}|{variant}")
        tpl = _Template.compile(_BUILDERS.get(event, _b_generic)(rng, variant))
        _templates[key] = tpl  # a racing thread may build the same template: harmless
    return tpl


def _sized_template(event: str) -> _Template:
    tpl = _sized_templates.get(event)
    if tpl is None:
        rng = random.Random(f"{event}|sized")
        tpl = _Template.compile(_BUILDERS.get(event, _b_generic)(rng, _SIZED))
        _sized_templates[event] = tpl
    return tpl


# --------------------------------------------------------------------------- public API


def build(event: str, seq: int, seed: int = 0, instance: str = "sim-instance") -> bytes:
    """Return one realistic frame body (compact JSON) for ``event`` carrying ``seq``.

    Deterministic in all arguments. ``instance`` only appears in ``connection.update``.
    Raises ``ValueError`` for an event outside ``ALLOWED_EVENTS`` or a seq out of range
    (0 .. 16**12-1, or 0 .. 10**12-1 for events that carry it in a group JID).
    """
    _check(event, seq)
    variant = _variant(seed, seq)
    inst = instance.encode()
    fmt = _formats.get((event, seed, variant, inst))
    if fmt is None:
        fmt = _template(event, seed, variant).format(orjson.dumps(instance), 0)
        if len(_formats) > 4096:  # many instance names: keep the cache bounded
            _formats.clear()
        _formats[(event, seed, variant, inst)] = fmt
    return fmt % {b"s": seq}


def min_size(event: str) -> int:
    """Smallest ``size`` that ``sized(event, seq, size)`` accepts for every valid seq."""
    if event not in _ALLOWED:
        raise ValueError(f"unknown event {event!r}")
    tpl = _sized_template(event)
    seq_width = len(str(_SEQ_MAX)) if b"SQI" in tpl.kinds else 0
    return tpl.fixed_len(_SIZED_INSTANCE) + seq_width + 1


_SIZED_INSTANCE = b'"sim-instance"'


def sized_factory(event: str, size: int) -> Callable[[int], bytes]:
    """Return ``f(seq) -> bytes`` equal to ``sized(event, seq, size)`` without re-validation.

    Meant for load generation: one call costs well under a microsecond for most events.
    Raises ``ValueError`` when ``size < min_size(event)``.
    """
    if size < min_size(event):
        raise ValueError(f"size {size} is below the minimum {min_size(event)} for {event}")
    tpl = _sized_template(event)
    base = size - tpl.fixed_len(_SIZED_INSTANCE)
    if b"SQI" not in tpl.kinds:
        fmt = tpl.format(_SIZED_INSTANCE, base)  # fixed-width seq: the padding is constant

        def fixed(seq: int) -> bytes:
            return fmt % {b"s": seq}

        return fixed

    fmt = tpl.format(_SIZED_INSTANCE, None)
    src = _PAD_TEXT_B if b"PDT" in tpl.kinds else _PAD_B64_B
    long_pad = _pad(src, base)

    def variable(seq: int) -> bytes:
        return fmt % {b"s": seq, b"p": long_pad[: base - len(b"%d" % seq)]}

    return variable


def sized(event: str, seq: int, size: int) -> bytes:
    """Return a realistic-looking JSON frame of exactly ``size`` bytes carrying ``seq``.

    The frame has the event's usual shape; one natural string field (message text, the QR
    data URL, a name) is padded to reach the size. Raises ``ValueError`` when ``size`` is below
    ``min_size(event)`` or the event/seq is invalid.
    """
    _check(event, seq)
    return sized_factory(event, size)(seq)


def seq_of(event: str, data: bytes | str) -> int:
    """Return the sequence number carried by a frame produced by ``build`` or ``sized``.

    Raises ``ValueError`` (or ``KeyError``/``IndexError``/``TypeError``) when the frame does not
    have the expected shape.
    """
    doc: Any = orjson.loads(data)
    if event in ("messages.upsert", "send.message"):
        return int(doc["keyId"][-12:], 16)
    if event in ("messages.update", "call.upsert") or event not in _BUILDERS:
        return int(doc["id"][-12:], 16)
    if event == "qrcode.updated":
        return int(doc["code"].split(",", 1)[0][-12:], 16)
    if event == "connection.update":
        return int(doc["_simSeq"])
    if event in ("contacts.upsert", "chats.upsert"):
        return int(doc[0]["id"])
    if event == "chats.update":
        return _group_seq(doc[0]["remoteJid"])
    if event in ("groups.upsert", "groups.update"):
        return _group_seq(doc[0]["id"])
    return _group_seq(doc["id"])  # presence.update, group-participants.update


def _group_seq(jid: str) -> int:
    if not (jid.startswith("120363") and jid.endswith("@g.us") and len(jid) == 23):
        raise ValueError(f"not a simulator group JID: {jid!r}")
    return int(jid[6:18])
