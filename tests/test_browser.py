"""The call page in a real browser: Debian's Chromium, headless, driven by Playwright.

Chromium's fake microphone plays a WAV made by the project's TTS; the page is served by a real
server in this process (so Playwright's async API shares the event loop with it). WebRTC media
never flows over 127.0.0.1 (aioice skips loopback); it goes over this machine's own non-loopback
address, which is why mDNS hiding of local IPs is turned off. Screenshots go to artifacts/browser/.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from conftest import BASE_SETTINGS, ServerFactory, echo_agent, openai_agent
from fake_openai import FakeOpenAI, ToolCalls
from playwright.async_api import BrowserContext, Page, Playwright, async_playwright, expect
from speech import speak, wer

from rtcvoice.audio import WEBRTC_RATE, resample_pcm, write_wav
from rtcvoice.engines import Engines
from rtcvoice.server import create_app
from rtcvoice.server.app import SESSIONS
from rtcvoice.server.keys import NODE
from rtcvoice.server.nodes import drain

CHROMIUM = os.environ.get("RTCVOICE_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "browser"
API = "/api/v1/voice"
QUESTION = "Could you tell me how far it is from the earth to the moon?"
ANSWER = "The moon is about three hundred and eighty thousand kilometres away. The trip takes three days."
PHONE = {"width": 390, "height": 844}
NO_WEBRTC = "delete window.RTCPeerConnection; delete window.webkitRTCPeerConnection;"
# Long enough (as speech) that the reply is still playing when the test interrupts it.
LONG_TEXT = (
    "Please read this slowly: the quick brown fox jumps over the lazy dog, and then it runs "
    "all the way around the farm, past the barn, the pond and the orchard, before it comes back."
)
WATERFALL_ROWS = (
    "end_of_turn",
    "stt",
    "llm_first_token",
    "llm_first_sentence",
    "tts_first_audio",
    "voice_to_voice",
)
# Generous: two shared cores run Chromium, Whisper, the TTS and the test itself.
TURN_TIMEOUT_MS = 90_000
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
]


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def question_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The spoken question, after 2.5 s of silence: the file starts playing when the microphone
    opens, and the call must be up before the first word."""
    pcm, rate = speak(QUESTION, lead_s=2.5, tail_s=2.0)
    path = tmp_path_factory.mktemp("mic") / "question.wav"
    write_wav(path, resample_pcm(pcm, rate, WEBRTC_RATE), WEBRTC_RATE)
    return path


@pytest.fixture(scope="module")
def silence_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mic") / "silence.wav"
    write_wav(path, np.zeros(WEBRTC_RATE, np.int16), WEBRTC_RATE)
    return path


@pytest.fixture(scope="module")
async def pw() -> AsyncIterator[Playwright]:
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"Chromium is missing at {CHROMIUM}: scripts/test installs it (apt-get install chromium)."
        )
    async with async_playwright() as playwright:
        yield playwright


@asynccontextmanager
async def chromium(
    pw: Playwright, mic: Path, *, deny_microphone: bool = False, **context_options: Any
) -> AsyncIterator[BrowserContext]:
    """A fresh headless Chromium (new temporary profile) whose microphone plays ``mic`` once.

    ``deny_microphone``: every permission prompt is answered "block", as a person might.
    """
    flags = [f for f in FLAGS if not (deny_microphone and f == "--use-fake-ui-for-media-stream")]
    if deny_microphone:
        flags.append("--deny-permission-prompts")
    browser = await pw.chromium.launch(
        executable_path=CHROMIUM,
        headless=True,
        args=[*flags, f"--use-file-for-fake-audio-capture={mic}%noloop"],
    )
    try:
        yield await browser.new_context(**context_options)
    finally:
        await browser.close()


class CallPage:
    """The page at /, with what it logged kept for failure messages."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.log: list[str] = []
        page.on("console", lambda m: self.log.append(f"console.{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.log.append(f"pageerror: {e}"))

    @classmethod
    async def open(cls, context: BrowserContext, url: str) -> CallPage:
        self = cls(await context.new_page())
        await self.page.goto(url)
        await expect(self.page.locator("#status")).to_have_attribute("data-state", "idle")
        return self

    def __str__(self) -> str:
        return "\n".join(self.log[-40:])

    @property
    def page_errors(self) -> list[str]:
        return [line for line in self.log if line.startswith("pageerror")]

    async def expect_state(self, state: str, timeout: float = 30_000) -> None:
        await expect(self.page.locator("#status"), str(self)).to_have_attribute(
            "data-state", state, timeout=timeout
        )

    async def record_states(self) -> None:
        """Keep every state the indicator shows (the test reads window.seenStates)."""
        await self.page.evaluate(
            """() => {
                const el = document.getElementById("status");
                window.seenStates = [el.dataset.state];
                window.seenPartials = [];
                new MutationObserver(() => {
                    if (window.seenStates.at(-1) !== el.dataset.state) window.seenStates.push(el.dataset.state);
                }).observe(el, {attributes: true, attributeFilter: ["data-state"]});
                const list = document.getElementById("transcript");
                new MutationObserver(() => {
                    for (const t of list.querySelectorAll(".entry.user.partial .text")) {
                        if (t.textContent !== "…") window.seenPartials.push(t.textContent);
                    }
                }).observe(list, {childList: true, subtree: true, characterData: true});
            }"""
        )

    async def alert(self) -> str:
        await expect(self.page.locator("#alert"), str(self)).to_be_visible(timeout=30_000)
        return await self.page.locator("#alert-text").inner_text()

    async def inbound_audio(self) -> dict[str, Any]:
        return dict(
            await self.page.evaluate(
                """async () => {
                    const report = await window.rtcvoiceDemo.call.getStats();
                    for (const s of report.values()) {
                        if (s.type === "inbound-rtp" && s.kind === "audio") {
                            // The browser's own jitter buffer: how long, on average, each
                            // received sample waited before playout (what rtcvoice bench's
                            // aiortc caller models with its jitter_frames).
                            const emitted = s.jitterBufferEmittedCount ?? 0;
                            return {
                                packets: s.packetsReceived,
                                energy: s.totalAudioEnergy ?? 0,
                                jitter_buffer_ms: emitted ? (1000 * s.jitterBufferDelay) / emitted : null,
                            };
                        }
                    }
                    return {packets: 0, energy: 0, jitter_buffer_ms: null};
                }"""
            )
        )

    async def websocket_stats(self) -> dict[str, Any]:
        return dict(await self.page.evaluate("window.rtcvoiceDemo.lastCall.websocketStats"))

    async def microphone_released(self) -> bool:
        return bool(
            await self.page.evaluate(
                """() => {
                    const call = window.rtcvoiceDemo.lastCall;
                    const tracks = call?.localStream?.getTracks() ?? [];
                    return tracks.every((t) => t.readyState === "ended");
                }"""
            )
        )


async def live_sessions(url: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"{url}{API}/status") as resp:
        return int((await resp.json())["sessions"])


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the call ---------------------------------------------------------------------------------------
async def test_a_spoken_question_is_heard_answered_and_timed_on_the_page(
    pw: Playwright, start_server: ServerFactory, fake_openai: FakeOpenAI, question_wav: Path
) -> None:
    fake_openai.reply = ANSWER
    url = await start_server(agent=openai_agent(fake_openai), partial_interval_ms=400)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    async with chromium(pw, question_wav, viewport=PHONE, device_scale_factor=2) as context:
        call = await CallPage.open(context, url + "/")
        page = call.page
        await expect(page.locator("#voice")).to_be_enabled()
        await expect(page.locator("#voice")).to_have_value("heart")
        await call.record_states()

        await page.click("#call")
        user = page.locator(".entry.user.final")
        ai = page.locator(".entry.assistant.final")
        await expect(ai, str(call)).to_have_count(1, timeout=TURN_TIMEOUT_MS)
        await expect(ai.locator(".text")).to_have_text(ANSWER)
        heard = await user.locator(".text").inner_text()
        assert wer(QUESTION, heard) <= 0.3, heard
        assert await page.locator(".entry.partial").count() == 0  # every partial was replaced

        # The latency waterfall of that turn, one bar per stage.
        figure = page.locator(".turn-metrics")
        await expect(figure, str(call)).to_have_count(1, timeout=30_000)
        shown: dict[str, float] = {}
        for key in WATERFALL_ROWS:
            bar = figure.locator(f'.wf-row[data-metric="{key}"] .wf-bar')
            await expect(bar).to_have_count(1)
            shown[key] = float(await bar.get_attribute("data-ms") or "nan")
            assert (await bar.bounding_box() or {"width": 0})["width"] > 0, key
        assert 0 < shown["voice_to_voice"] < 20_000, shown

        seen = await page.evaluate("window.seenStates")
        it = iter(seen)
        assert all(s in it for s in ("connecting", "listening", "thinking", "speaking", "listening")), seen
        partials = await page.evaluate("window.seenPartials")
        assert partials, "no partial transcript was shown while speaking"

        # The AI's voice arrived as RTP and was loud enough to move the output meter.
        audio = await call.inbound_audio()
        assert audio["packets"] > 100 and audio["energy"] > 0, audio
        shown["browser_jitter_buffer"] = audio["jitter_buffer_ms"]
        (ARTIFACTS / "latency.json").write_text(json.dumps(shown, indent=2))
        print("latency shown on the page (ms):", shown)
        assert float(await page.locator("#meter-out").get_attribute("data-peak") or 0) > 0.2
        assert float(await page.locator("#meter-in").get_attribute("data-peak") or 0) > 0.2

        # Phone-sized: nothing sticks out sideways.
        overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, overflow
        await page.screenshot(path=str(ARTIFACTS / "call-phone.png"), full_page=True)

        # Typing instead of speaking, in the same call.
        await page.fill("#text", "And how long does the trip take?")
        await page.press("#text", "Enter")
        await expect(ai, str(call)).to_have_count(2, timeout=60_000)
        await expect(page.locator('.entry.user[data-source="text"]')).to_have_text(
            "You (typed)And how long does the trip take?"
        )
        assert fake_openai.requests[-1]["messages"][-1]["content"] == "And how long does the trip take?"

        # Mute silences the microphone track; hanging up ends the session on the server.
        await page.click("#mute")
        await expect(page.locator("#mute")).to_have_attribute("aria-pressed", "true")
        enabled = await page.evaluate(
            "window.rtcvoiceDemo.call.localStream.getAudioTracks().map((t) => t.enabled)"
        )
        assert enabled == [False]
        await page.set_viewport_size({"width": 1280, "height": 860})
        await page.screenshot(path=str(ARTIFACTS / "call-desktop.png"))
        await page.click("#call")
        await call.expect_state("closed")
        await expect(page.locator("#call")).to_have_text("Start call")
        assert await call.microphone_released()
        assert await eventually(lambda: _no_sessions(url)), "the session outlived the hang-up"
        assert not call.page_errors, call.page_errors


async def _no_sessions(url: str) -> bool:
    return await live_sessions(url) == 0


# -- what goes wrong, said plainly ------------------------------------------------------------------
async def test_denied_microphone_says_how_to_allow_it_and_typing_still_works(
    pw: Playwright, start_server: ServerFactory, silence_wav: Path
) -> None:
    url = await start_server(agent=echo_agent())
    async with chromium(pw, silence_wav, deny_microphone=True) as context:
        call = await CallPage.open(context, url + "/")
        await call.page.click("#call")
        assert "Microphone access is blocked" in await call.alert(), str(call)
        await call.expect_state("failed")
        assert await live_sessions(url) == 0  # no session is started without a microphone

        await expect(call.page.locator("#alert-action")).to_have_text("Continue without microphone")
        await call.page.click("#alert-action")
        await call.expect_state("listening")
        await call.page.fill("#text", "Hello from the keyboard.")
        await call.page.click("#send")
        await expect(call.page.locator(".entry.assistant.final .text"), str(call)).to_have_text(
            "You said: Hello from the keyboard.", timeout=60_000
        )
        assert not call.page_errors, call.page_errors


async def test_unreachable_server_is_reported_in_plain_words(
    pw: Playwright, start_server: ServerFactory, silence_wav: Path
) -> None:
    url = await start_server(agent=echo_agent())
    port = closed_port()
    async with chromium(pw, silence_wav) as context:
        call = await CallPage.open(context, f"{url}/?server=http://127.0.0.1:{port}")
        await expect(call.page.locator("#voice")).to_have_text("Voices unavailable")
        await call.page.click("#call")
        text = await call.alert()
        assert f"Can't reach the voice server at 127.0.0.1:{port}" in text, text
        await call.expect_state("failed")
        await expect(call.page.locator("#alert-action")).to_have_text("Try again")
        assert await call.microphone_released()


async def test_a_server_at_its_call_limit_says_when_to_try_again(
    pw: Playwright, start_server: ServerFactory, silence_wav: Path
) -> None:
    url = await start_server(agent=echo_agent(), max_sessions=0)
    async with chromium(pw, silence_wav) as context:
        call = await CallPage.open(context, url + "/")
        await call.page.click("#call")
        text = await call.alert()
        assert "busy" in text and "try again in 5 seconds" in text, text
        await call.expect_state("failed")
        await expect(call.page.locator("#call")).to_have_text("Start call")
        assert await call.microphone_released()


async def test_a_browser_without_webrtc_or_websockets_is_told_so_before_the_microphone_is_asked(
    pw: Playwright, start_server: ServerFactory, silence_wav: Path
) -> None:
    url = await start_server(agent=echo_agent())
    async with chromium(pw, silence_wav) as context:
        # Without WebRTC the client falls back to the WebSocket; without both, no call can work.
        await context.add_init_script(f"{NO_WEBRTC} delete window.WebSocket;")
        call = await CallPage.open(context, url + "/")
        assert "can't make WebRTC calls" in await call.alert()
        await call.page.click("#alert-close")
        await call.page.click("#call")
        assert "can't make WebRTC calls" in await call.alert()
        await call.expect_state("failed")
        opened_microphone = await call.page.evaluate("window.rtcvoiceDemo.lastCall.localStream !== null")
        assert not opened_microphone
        assert await live_sessions(url) == 0


# -- the WebSocket fallback -------------------------------------------------------------------------
async def test_a_browser_without_webrtc_calls_over_the_websocket(
    pw: Playwright, start_server: ServerFactory, fake_openai: FakeOpenAI, question_wav: Path
) -> None:
    """No RTCPeerConnection: the page says nothing is wrong, and the call goes over the server's
    WebSocket transport: the microphone as 16 kHz PCM, the AI's voice as 24 kHz PCM played on
    an AudioContext, the same events, meters and transcript."""
    fake_openai.reply = ANSWER
    url = await start_server(agent=openai_agent(fake_openai))
    async with chromium(pw, question_wav) as context:
        await context.add_init_script(NO_WEBRTC)
        call = await CallPage.open(context, url + "/")
        page = call.page
        assert not await page.evaluate("'RTCPeerConnection' in window")
        await expect(page.locator("#voice")).to_be_enabled()
        await expect(page.locator("#alert")).to_be_hidden()  # nothing to warn about

        await page.click("#call")
        await expect(page.locator("#transport"), str(call)).to_have_text("via WebSocket")
        assert await page.evaluate("window.rtcvoiceDemo.call.transport") == "websocket"

        ai = page.locator(".entry.assistant.final")
        await expect(ai, str(call)).to_have_count(1, timeout=TURN_TIMEOUT_MS)
        await expect(ai.locator(".text")).to_have_text(ANSWER)
        heard = await page.locator(".entry.user.final .text").inner_text()
        assert wer(QUESTION, heard) <= 0.3, heard
        await expect(page.locator(".turn-metrics"), str(call)).to_have_count(1, timeout=30_000)

        # The AI's voice came as binary frames and was played to the end, loud enough to move
        # the output meter; the microphone went up as 20 ms frames and moved the input meter.
        await page.wait_for_function(
            """() => {
                const s = window.rtcvoiceDemo.lastCall.websocketStats;
                return s.secondsPlayed > 3 && s.bufferedSeconds === 0;
            }""",
            timeout=60_000,
        )
        stats = await call.websocket_stats()
        assert stats["secondsReceived"] > 3 and stats["framesDropped"] == 0, stats
        assert stats["framesSent"] > 200 and stats["contextState"] == "running", stats
        assert float(await page.locator("#meter-out").get_attribute("data-peak") or 0) > 0.2
        assert float(await page.locator("#meter-in").get_attribute("data-peak") or 0) > 0.2

        await page.click("#call")
        await call.expect_state("closed")
        await expect(page.locator("#transport")).to_be_hidden()
        assert await call.microphone_released()
        assert await eventually(lambda: _no_sessions(url)), "the session outlived the hang-up"
        assert not call.page_errors, call.page_errors


async def test_the_websocket_transport_can_be_forced_and_interrupted_reconnected_and_ended(
    pw: Playwright, app_server: tuple[str, web.Application], silence_wav: Path
) -> None:
    """?transport=websocket while WebRTC works: typed turns, an interrupt that silences the
    buffered reply at once, a socket that drops (a fresh session), and a call the server ends."""
    url, app = app_server
    async with chromium(pw, silence_wav) as context:
        call = await CallPage.open(context, url + "/?transport=websocket")
        page = call.page
        await call.record_states()
        await page.click("#call")
        await expect(page.locator("#transport"), str(call)).to_have_text("via WebSocket")
        await call.expect_state("listening")
        assert await page.evaluate(
            """() => typeof RTCPeerConnection === "function"
                && window.rtcvoiceDemo.call.transport === "websocket"
                && window.rtcvoiceDemo.call.peerConnection === null"""
        )
        assert await page.evaluate("window.rtcvoiceDemo.call.ping()") >= 0

        # A long reply, interrupted while it plays: what was buffered is dropped at once.
        await page.fill("#text", LONG_TEXT)
        await page.press("#text", "Enter")
        await page.wait_for_function(
            "window.rtcvoiceDemo.call.websocketStats.secondsPlayed > 0.5", timeout=60_000
        )
        after = await page.evaluate(
            """() => {
                const call = window.rtcvoiceDemo.call;
                call.interrupt();
                return call.websocketStats;
            }"""
        )
        assert after["flushes"] >= 1 and after["bufferedSeconds"] == 0, after
        await expect(page.locator(".entry.assistant.final .note"), str(call)).to_have_text(
            "(interrupted)", timeout=30_000
        )
        await call.expect_state("listening")

        # Muted: the microphone track is off and the frames that still go up are silence.
        await page.click("#mute")
        assert await page.evaluate(
            "window.rtcvoiceDemo.call.localStream.getAudioTracks().map((t) => t.enabled)"
        ) == [False]
        sent = (await call.websocket_stats())["framesSent"]
        await page.wait_for_function(
            f"window.rtcvoiceDemo.call.websocketStats.framesSent > {sent + 10}", timeout=10_000
        )

        # The socket drops without a goodbye: the client starts a fresh session over a new socket.
        first = await page.evaluate("window.rtcvoiceDemo.call.sessionId")
        session = app[SESSIONS].get(first)
        assert session is not None and session.peer is not None
        await session.peer.ws.close(code=aiohttp.WSCloseCode.INTERNAL_ERROR)
        await page.wait_for_function("window.seenStates.includes('reconnecting')", timeout=30_000)
        await call.expect_state("listening")
        second = await page.evaluate("window.rtcvoiceDemo.call.sessionId")
        assert second and second != first
        assert "the call is back" in await call.alert()
        assert await eventually(lambda: _session_gone(app, first)), "the dropped session lingers"

        await page.fill("#text", "Are you still there?")
        await page.press("#text", "Enter")
        await expect(page.locator(".entry.assistant.final .text").last, str(call)).to_have_text(
            "You said: Are you still there?", timeout=60_000
        )

        # The server ends the call: shown as ended (with the server's reason), not reconnected.
        await page.evaluate(
            "() => { window.rtcvoiceDemo.call.on('connection', (e) => { window.lastConnection = e; }); }"
        )
        async with aiohttp.ClientSession() as http:
            await http.post(f"{url}{API}/session/end", json={"session_id": second})
        await call.expect_state("closed")
        assert "The server ended the call." in await call.alert()
        ended = await page.evaluate("({reason: lastConnection.reason, server: lastConnection.serverReason})")
        assert ended == {"reason": "remote", "server": "client_hangup"}, ended
        assert await call.microphone_released()
        assert await eventually(lambda: _session_gone(app, second))
        assert not call.page_errors, call.page_errors


async def test_ice_that_cannot_connect_fails_with_a_network_message(
    pw: Playwright, start_server: ServerFactory, silence_wav: Path
) -> None:
    """Relay-only ICE with no TURN server can never connect: the client gives up in time, says
    why, and ends the session it started."""
    url = await start_server(agent=echo_agent())
    async with chromium(pw, silence_wav) as context:
        call = await CallPage.open(context, url + "/")
        result = await call.page.evaluate(
            """async (server) => {
                const { connect } = await import("/static/rtcvoice.js");
                const states = [];
                try {
                    await connect({
                        server, iceTransportPolicy: "relay", connectTimeoutMs: 3000, reconnect: false,
                        on: { connection: (e) => states.push(e.state) },
                    });
                    return { connected: true };
                } catch (err) {
                    return { code: err.code, message: err.message, fatal: err.fatal, states };
                }
            }""",
            url,
        )
        assert result["code"] == "ice_failed", result
        assert "couldn't connect" in result["message"] and "TURN server" in result["message"]
        assert result["states"] == ["connecting", "failed"], result
        assert await eventually(lambda: _no_sessions(url)), "the failed session was not ended"


# -- reconnection -----------------------------------------------------------------------------------
@pytest.fixture
async def app_server(shared_engines: Engines) -> AsyncIterator[tuple[str, web.Application]]:
    """A server whose app (and so its live peers) the test can reach; echo agent."""
    app = create_app(BASE_SETTINGS, engines=shared_engines)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        await runner.cleanup()


def drop_network(app: web.Application, session_id: str) -> None:
    """Black-hole the server side of one call's ICE: nothing in, nothing out, no goodbye.

    This is what a dead network looks like to the browser (unlike hanging up, which closes the
    data channel): its ICE consent checks go unanswered until it declares the pair lost.
    """
    session = app[SESSIONS].get(session_id)
    assert session is not None and session.peer is not None and session.peer.pc is not None
    pc = session.peer.pc
    transports = {t.sender.transport.transport for t in pc.getTransceivers() if t.sender.transport}
    if pc.sctp is not None:
        transports.add(pc.sctp.transport.transport)
    for ice in transports:
        for protocol in ice._connection._protocols:
            protocol.datagram_received = lambda data, addr: None
            protocol.transport.sendto = lambda data, addr=None: None


async def test_a_call_whose_network_drops_reconnects_with_a_fresh_session(
    pw: Playwright, app_server: tuple[str, web.Application], silence_wav: Path
) -> None:
    url, app = app_server
    async with chromium(pw, silence_wav) as context:
        call = await CallPage.open(context, url + "/")
        await call.record_states()
        await call.page.click("#call")
        await call.expect_state("listening")
        first = await call.page.evaluate("window.rtcvoiceDemo.call.sessionId")

        drop_network(app, first)
        # Chromium calls the pair disconnected after a few seconds of silence, and the client
        # gives "disconnected" 4 s to heal before it starts a fresh session (quickly, here).
        await call.page.wait_for_function("window.seenStates.includes('reconnecting')", timeout=45_000)
        await call.expect_state("listening", timeout=45_000)
        second = await call.page.evaluate("window.rtcvoiceDemo.call.sessionId")
        assert second and second != first
        assert "the call is back" in await call.alert()
        # The dropped session is gone (the client ends it; the server also closes a failed peer).
        assert await eventually(lambda: _session_gone(app, first), 30), "the dropped session lingers"

        await call.page.fill("#text", "Are you still there?")
        await call.page.click("#send")
        await expect(call.page.locator(".entry.assistant.final .text"), str(call)).to_have_text(
            "You said: Are you still there?", timeout=60_000
        )
        assert not call.page_errors, call.page_errors


async def _session_gone(app: web.Application, session_id: str) -> bool:
    return app[SESSIONS].get(session_id) is None


async def test_a_call_the_server_ends_is_shown_as_ended_not_reconnected(
    pw: Playwright, start_server: ServerFactory, silence_wav: Path
) -> None:
    url = await start_server(agent=echo_agent())
    async with chromium(pw, silence_wav) as context:
        call = await CallPage.open(context, url + "/")
        await call.record_states()
        await call.page.click("#call")
        await call.expect_state("listening")
        session_id = await call.page.evaluate("window.rtcvoiceDemo.call.sessionId")
        async with aiohttp.ClientSession() as http:
            await http.post(f"{url}{API}/session/end", json={"session_id": session_id})
        await call.expect_state("closed")
        assert "The server ended the call." in await call.alert()
        assert "reconnecting" not in await call.page.evaluate("window.seenStates")
        assert await call.microphone_released()
        assert await live_sessions(url) == 0


@asynccontextmanager
async def two_nodes(
    shared_engines: Engines, tmp_path: Path
) -> AsyncIterator[list[tuple[str, web.Application]]]:
    """Nodes "a" and "b" on their own ports, finding each other through a registry folder."""
    runners, nodes = [], []
    try:
        for name in ("a", "b"):
            port = closed_port()  # free now; the node listens on it below
            url = f"http://127.0.0.1:{port}"
            settings = BASE_SETTINGS.replace(
                db_path=str(tmp_path / "threads.db"),
                cluster_url=f"file://{tmp_path / 'registry'}",
                node_id=name,
                node_url=url,
            )
            app = create_app(settings, engines=dataclasses.replace(shared_engines, agent=echo_agent()))
            runner = web.AppRunner(app)
            await runner.setup()
            runners.append(runner)
            await web.TCPSite(runner, "127.0.0.1", port).start()
            nodes.append((url, app))
        await nodes[0][1][NODE].peers(fresh=True)
        yield nodes
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


async def test_a_call_on_a_draining_node_reconnects_on_its_thread_to_another_node(
    pw: Playwright, shared_engines: Engines, tmp_path: Path, silence_wav: Path
) -> None:
    async with two_nodes(shared_engines, tmp_path) as nodes, chromium(pw, silence_wav) as context:
        (url_a, app_a), (_, app_b) = nodes
        call = await CallPage.open(context, url_a + "/")  # the page, and every request, go to node a
        await call.record_states()
        await call.page.click("#call")
        await call.expect_state("listening")
        first = await call.page.evaluate("window.rtcvoiceDemo.call.sessionId")
        thread = await call.page.evaluate("window.rtcvoiceDemo.call.threadId")
        assert app_a[SESSIONS].get(first) is not None

        # A deploy: node a drains; its call outlives the drain timeout and ends with reason "drain".
        await drain(app_a, 0.5, asyncio.Event())
        await call.page.wait_for_function("window.seenStates.includes('reconnecting')", timeout=30_000)
        await call.expect_state("listening", timeout=45_000)
        second = await call.page.evaluate("window.rtcvoiceDemo.call.sessionId")
        assert second != first and app_b[SESSIONS].get(second) is not None  # on node b now
        assert await call.page.evaluate("window.rtcvoiceDemo.call.threadId") == thread

        await call.page.fill("#text", "Still here?")
        await call.page.click("#send")
        await expect(call.page.locator(".entry.assistant.final .text"), str(call)).to_have_text(
            "You said: Still here?", timeout=60_000
        )
        assert not call.page_errors, call.page_errors


async def test_an_agent_failure_mid_call_is_explained_and_the_call_goes_on(
    pw: Playwright, start_server: ServerFactory, fake_openai: FakeOpenAI, silence_wav: Path
) -> None:
    fake_openai.fault = "500"
    url = await start_server(agent=openai_agent(fake_openai))
    async with chromium(pw, silence_wav) as context:
        call = await CallPage.open(context, url + "/")
        await call.page.click("#call")
        await call.expect_state("listening")
        await call.page.fill("#text", "Hello?")
        await call.page.press("#text", "Enter")
        text = await call.alert()
        assert text.startswith("The AI ran into a problem: "), text
        # The call stays up: the next question is answered once the model is back.
        await call.expect_state("listening")
        fake_openai.fault = None
        fake_openai.reply = "I am back."
        await call.page.fill("#text", "And now?")
        await call.page.press("#text", "Enter")
        await expect(call.page.locator(".entry.assistant.final .text").last, str(call)).to_have_text(
            "I am back.", timeout=60_000
        )
        await expect(call.page.locator("#status")).to_have_attribute("data-state", "listening")


async def test_a_tool_the_page_registers_is_called_by_the_ai_run_in_the_page_and_shown(
    pw: Playwright, start_server: ServerFactory, fake_openai: FakeOpenAI, silence_wav: Path
) -> None:
    def model(messages: list[dict[str, Any]]) -> str | ToolCalls:
        if messages[-1]["role"] == "tool":
            return "Done, the page is " + json.loads(messages[-1]["content"])["color"] + " now."
        return ToolCalls([("set_color", {"color": "blue"})])

    fake_openai.reply = model
    url = await start_server(agent=openai_agent(fake_openai))
    async with chromium(pw, silence_wav) as context:
        call = await CallPage.open(context, url + "/")
        await call.page.click("#call")
        await call.expect_state("listening")
        await call.page.evaluate(
            """() => window.rtcvoiceDemo.call.setTools({
                set_color: {
                    description: "Paint the page.",
                    parameters: {type: "object", properties: {color: {type: "string"}}, required: ["color"]},
                    run: (args) => { document.body.dataset.color = args.color; return {color: args.color}; },
                },
            })"""
        )
        await call.page.fill("#text", "Make it blue.")
        await call.page.press("#text", "Enter")
        await expect(call.page.locator(".entry.assistant.final .text").last, str(call)).to_have_text(
            "Done, the page is blue now.", timeout=60_000
        )
        assert await call.page.evaluate("document.body.dataset.color") == "blue"
        tool = call.page.locator(".entry.tool .text")
        await expect(tool, str(call)).to_have_text('set_color({"color":"blue"}) → {"color": "blue"}')
        assert not call.page_errors, str(call)
    offered = [t["function"]["name"] for t in fake_openai.requests[0]["tools"]]
    assert offered == ["set_color"]
