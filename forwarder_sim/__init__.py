"""A local stand-in for CodeChat ``whatsapp-api``: its event WebSocket and the instance listing.

Not part of the daemon: ``forwarder run`` never imports this package, and PyJWT (which only
the simulator needs) is the ``sim`` extra.
"""

from forwarder_sim.cli import main
from forwarder_sim.instances import API_FAULTS, DEV_API_KEY
from forwarder_sim.server import CONTROLS, REJECT_RESPONSE, WS_PATH, Simulator, encode_frame
from forwarder_sim.tokens import DEV_SECRET, mint_token

__all__ = [
    "API_FAULTS",
    "CONTROLS",
    "DEV_API_KEY",
    "DEV_SECRET",
    "REJECT_RESPONSE",
    "WS_PATH",
    "Simulator",
    "encode_frame",
    "main",
    "mint_token",
]
