"""rtcvoice: voice calls with an AI over WebRTC."""

__version__ = "0.1.0"
