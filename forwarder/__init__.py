"""forwarder: a CodeChat WhatsApp API WebSocket event feed into Redis streams."""

__version__ = "0.1.0"
