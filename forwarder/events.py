"""Event names of the upstream `/ws/events` endpoint (see the protocol notes, section 4)."""

from __future__ import annotations

# Names the upstream really sends frames for on its WebSocket: the default subscription set.
SENT_EVENTS: tuple[str, ...] = (
    "qrcode.updated",
    "connection.update",
    "messages.upsert",
    "messages.update",
    "send.message",
    "contacts.upsert",
    "presence.update",
    "chats.upsert",
    "chats.update",
    "groups.upsert",
    "groups.update",
    "group-participants.update",
    "call.upsert",
)

# Accepted at upgrade but never sent on the WebSocket (webhook-only, or retired): subscribing
# works and stays silent forever, which is legal but worth a warning.
SILENT_EVENTS: tuple[str, ...] = (
    "contacts.update",
    "status.instance",
    "refresh.token",
    "messages.set",
    "chats.set",
    "contacts.set",
    "chats.delete",
    "labels.association",
    "labels.edit",
)

# The upstream's `ListEvents` (22 names): every other name is answered with HTTP 401.
ALLOWED_EVENTS: tuple[str, ...] = SENT_EVENTS + SILENT_EVENTS

REFUSED_EVENTS: dict[str, str] = {
    "messaging-history.set": (
        "'messaging-history.set' is a Baileys event name, not a CodeChat one: the server answers "
        "it with HTTP 401 and never sends history on the WebSocket (use the REST API "
        "/chat/findMessages for backfill)"
    ),
}
