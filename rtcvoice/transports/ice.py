"""ICE configuration shared by the server's peer and the headless client.

Browsers use every STUN and TURN URL they are given; aiortc uses only the first STUN URL and the
first TURN URL it can speak. So rtcvoice validates its URLs up front (a typo should stop the
server, not surface as a call that never connects), splits the browser-shaped ``ice_servers``
JSON into one RTCIceServer per URL with the wanted TURN URL first, and always hands aiortc an
explicit list: given ``None``, aiortc would contact Google's public STUN server.

Relay-only is aiortc's own ``RTCConfiguration.iceTransportPolicy = RELAY`` (aiortc >= 1.16, on
aioice's ``TransportPolicy.RELAY``): the peer gathers only its TURN relay candidate, so every
packet of the call goes through the TURN server.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aioice import stun, turn
from aiortc import RTCConfiguration, RTCIceServer, RTCIceTransportPolicy
from aiortc.rtcicetransport import parse_stun_turn_uri

TURN_TRANSPORTS = ("udp", "tcp", "tls")


@dataclass(frozen=True)
class IceUrl:
    url: str
    scheme: str  # stun, turn or turns
    host: str
    port: int
    transport: str | None  # TURN only: udp, tcp, or tls for turns:

    @property
    def is_turn(self) -> bool:
        return self.scheme in ("turn", "turns")


def parse_ice_url(url: str) -> IceUrl:
    """A STUN/TURN URL both browsers and aiortc accept, or ValueError saying what is wrong."""
    url = url.strip()
    hint = "use stun:HOST[:PORT], turn:HOST[:PORT][?transport=udp|tcp] or turns:HOST[:PORT]"
    if not url.startswith(("stun:", "turn:", "turns:")):
        raise ValueError(f"{url!r} is not a STUN/TURN URL: {hint}")
    try:
        parsed = parse_stun_turn_uri(url)
    except ValueError:
        raise ValueError(f"{url!r} is malformed: {hint}") from None
    scheme, transport = parsed["scheme"], parsed.get("transport")
    if scheme == "turn" and transport not in ("udp", "tcp"):
        raise ValueError(f"{url!r}: TURN runs over transport=udp or transport=tcp; turns: is TLS")
    if scheme == "turns":
        if transport != "tcp":
            raise ValueError(f"{url!r}: turns: is TLS over TCP; DTLS (transport=udp) is not supported")
        transport = "tls"
    return IceUrl(url=url, scheme=scheme, host=parsed["host"], port=parsed["port"], transport=transport)


def aiortc_ice_servers(
    servers: Sequence[Mapping[str, Any]], *, turn_transport: str | None = None
) -> list[RTCIceServer]:
    """Browser-shaped ``ice_servers`` (``urls``, ``username``, ``credential``) as aiortc's list.

    One RTCIceServer per URL, so the TURN URL aiortc will use (the first) is the one over
    ``turn_transport`` when given. ValueError if a URL is malformed or none uses that transport.
    """
    flat: list[tuple[IceUrl, RTCIceServer]] = []
    for server in servers:
        urls = server.get("urls", [])
        for url in [urls] if isinstance(urls, str) else list(urls):
            parsed = parse_ice_url(str(url))
            ice = RTCIceServer(
                urls=parsed.url, username=server.get("username"), credential=server.get("credential")
            )
            flat.append((parsed, ice))
    if turn_transport is not None:
        if turn_transport not in TURN_TRANSPORTS:
            raise ValueError(f"TURN transport {turn_transport!r}: choose udp, tcp or tls")
        wanted = [pair for pair in flat if pair[0].transport == turn_transport]
        if not wanted:
            offered = ", ".join(p.url for p, _ in flat if p.is_turn) or "none"
            raise ValueError(f"no TURN URL over {turn_transport} was offered (TURN URLs offered: {offered})")
        flat = wanted + [pair for pair in flat if pair not in wanted]
    return [ice for _parsed, ice in flat]


def chosen_turn_server(servers: Sequence[RTCIceServer]) -> RTCIceServer | None:
    """The TURN server aiortc will use from ``servers``: the first TURN URL."""
    for server in servers:
        for url in [server.urls] if isinstance(server.urls, str) else server.urls:
            if url.startswith("turn"):
                return RTCIceServer(urls=url, username=server.username, credential=server.credential)
    return None


def rtc_configuration(servers: Sequence[RTCIceServer], *, relay_only: bool = False) -> RTCConfiguration:
    policy = RTCIceTransportPolicy.RELAY if relay_only else RTCIceTransportPolicy.ALL
    # Always a list, never None: with None aiortc contacts stun.l.google.com on its own.
    return RTCConfiguration(iceServers=list(servers), iceTransportPolicy=policy)


def has_relay_candidate(sdp: str) -> bool:
    """Whether an SDP carries a TURN relay candidate (what relay-only ICE needs to connect)."""
    return any(line.startswith("a=candidate:") and " typ relay" in line for line in sdp.splitlines())


class _Released(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.closed = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def turn_allocation_error(server: RTCIceServer, timeout: float = 5.0) -> str | None:
    """Ask ``server`` for a relay allocation and give it back: None if granted, else why not.

    aioice drops the reason a TURN server refused it; this says it ("401 Unauthorized" for wrong
    or expired credentials, "no answer" for a blocked port) so a failed relay call can be explained.
    """
    url = server.urls if isinstance(server.urls, str) else server.urls[0]
    parsed = parse_ice_url(url)
    if not parsed.is_turn:
        raise ValueError(f"{url!r} is not a TURN URL")
    try:
        transport, protocol = await asyncio.wait_for(
            turn.create_turn_endpoint(
                _Released,
                server_addr=(parsed.host, parsed.port),
                username=server.username,
                password=server.credential,
                ssl=parsed.transport == "tls",
                transport="udp" if parsed.transport == "udp" else "tcp",
            ),
            timeout,
        )
    except stun.TransactionFailed as exc:
        code, reason = exc.response.attributes.get("ERROR-CODE", (0, "refused"))
        return f"{code} {reason}"
    except (stun.TransactionTimeout, TimeoutError):
        return f"no answer within {timeout:.0f} s"
    except ssl.SSLError as exc:
        return f"TLS failed: {exc.reason or exc}"
    except (OSError, ConnectionError) as exc:
        return f"cannot reach it: {exc}"
    transport.close()
    # Wait for the allocation to be deleted, so no socket or refresh task outlives the check.
    await asyncio.wait_for(protocol.closed, timeout)
    return None
