"""ICE servers per session: STUN/TURN URLs from the settings, with TURN credentials.

With a shared secret, credentials follow the TURN REST scheme that coturn's ``use-auth-secret``
verifies: username ``<expiry unix time>:<user>``, password ``base64(HMAC-SHA1(secret, username))``.
The TURN server recomputes the password from its copy of the secret and refuses the username
once the expiry has passed, so rtcvoice never stores TURN accounts and a leaked credential dies
on its own.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
from typing import Any

from aiortc import RTCIceServer

from ..settings import Settings
from ..transports.ice import parse_ice_url

log = logging.getLogger(__name__)


def turn_rest_credentials(
    secret: str, user: str, lifetime_s: float, *, now: float | None = None
) -> tuple[str, str]:
    """(username, password) valid for ``lifetime_s`` from ``now`` on a TURN server sharing ``secret``."""
    if ":" in user:
        raise ValueError("the TURN user may not contain ':' (it separates the expiry)")
    expiry = int((time.time() if now is None else now) + lifetime_s)
    username = f"{expiry}:{user}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii")


def turn_user_for(session_id: str) -> str:
    # The TURN username travels in clear inside STUN messages, and a session id lets its holder
    # end the call, so the TURN server sees a digest that still correlates with rtcvoice's logs.
    return "rtcvoice-" + hashlib.sha256(session_id.encode()).hexdigest()[:16]


class IceServers:
    """What ``session/start`` hands the client and what the server's own peer uses.

    Built once from the settings; ValueError (with the fix) if they cannot work.
    """

    def __init__(self, settings: Settings) -> None:
        urls = []
        for url in settings.ice_server_urls:
            try:
                urls.append(parse_ice_url(url))
            except ValueError as exc:
                raise ValueError(f"--ice-servers (RTCVOICE_ICE_SERVERS): {exc}") from None
        self.stun_urls = [u.url for u in urls if not u.is_turn]
        self.turn_urls = [u.url for u in urls if u.is_turn]
        self.secret = settings.turn_secret
        self.lifetime_s = settings.turn_credential_lifetime_s
        self.static = (settings.turn_username, settings.turn_password)
        if settings.ice_transport_policy not in ("all", "relay"):
            raise ValueError(
                f"--ice-transport-policy must be all or relay, not {settings.ice_transport_policy!r}"
            )
        self.server_relay_only = settings.ice_transport_policy == "relay"
        if self.server_relay_only and not self.turn_urls:
            raise ValueError(
                "--ice-transport-policy relay needs a turn: or turns: URL in --ice-servers (RTCVOICE_ICE_SERVERS)"
            )
        if self.secret and self.lifetime_s <= 0:
            raise ValueError("--turn-credential-lifetime-s must be positive")
        if self.turn_urls and not self.secret and not all(self.static):
            # Browsers refuse a TURN URL without credentials, so the call would silently go without it.
            raise ValueError(
                "TURN URLs need credentials: set --turn-secret (RTCVOICE_TURN_SECRET, the TURN server's "
                "static-auth-secret) or both --turn-username and --turn-password"
            )
        if self.secret and any(self.static):
            log.warning("turn_secret is set: turn_username/turn_password are ignored and never sent")

    def _turn_credentials(self, user: str) -> tuple[str, str]:
        if self.secret:
            return turn_rest_credentials(self.secret, user, self.lifetime_s)
        return self.static

    def for_client(self, session_id: str) -> list[dict[str, Any]]:
        """The ``ice_servers`` JSON of ``session/start``, shaped like the browser's RTCIceServer."""
        servers: list[dict[str, Any]] = []
        if self.stun_urls:
            servers.append({"urls": list(self.stun_urls)})
        if self.turn_urls:
            username, credential = self._turn_credentials(turn_user_for(session_id))
            servers.append({"urls": list(self.turn_urls), "username": username, "credential": credential})
        return servers

    def for_server_peer(self, session_id: str) -> list[RTCIceServer]:
        """The server peer's own servers, one per URL in the configured order (aiortc takes the first)."""
        servers = [RTCIceServer(urls=url) for url in self.stun_urls]
        if self.turn_urls:
            username, credential = self._turn_credentials(turn_user_for(session_id) + "-server")
            servers += [
                RTCIceServer(urls=url, username=username, credential=credential) for url in self.turn_urls
            ]
        return servers
