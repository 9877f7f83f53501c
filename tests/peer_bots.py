"""Bots that answer pipecat's and fastrtc's signaling, for the side-by-side harness's smoke test.

The real pipecat and fastrtc bots (bench/peers/) need virtualenvs of their own, which the suite
does not install; these speak the same two offer protocols with real aiortc peers, so the caller's
dialing, recording and timing are tested end to end:

* ``POST /api/offer`` ``{sdp, type, pc_id?}`` → ``{sdp, type, pc_id}`` (pipecat's
  ``SmallWebRTCRequestHandler``);
* ``POST /webrtc/offer`` ``{sdp, type, webrtc_id}`` → ``{sdp, type}``, or ``{"status": "failed"}``
  (fastrtc's ``Stream.offer``), which refuses an offer without a data channel here, as fastrtc's
  docs say it needs one.

Each bot replies to speech the way a voice bot does: after ``QUIET_S`` of silence following
sound, a 0.6 s tone on its outbound track.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import av
import numpy as np
from aiohttp import web
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from rtcvoice.audio import WEBRTC_RATE, rms_dbfs
from rtcvoice.transports.tracks import PacedAudioTrack

QUIET_S = 0.3
TONE_S = 0.6


class PeerBots:
    def __init__(self) -> None:
        self.pcs: set[RTCPeerConnection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.offers: dict[str, int] = {"pipecat": 0, "fastrtc": 0}
        self.replies = 0
        self.app = web.Application()
        self.app.router.add_post("/api/offer", self.pipecat_offer)
        self.app.router.add_post("/webrtc/offer", self.fastrtc_offer)
        self.app.on_cleanup.append(self._close)

    async def _answer(self, body: dict[str, Any]) -> RTCPeerConnection:
        pc = RTCPeerConnection()
        self.pcs.add(pc)
        voice = PacedAudioTrack()
        pc.addTrack(voice)

        @pc.on("track")
        def _track(track: MediaStreamTrack) -> None:
            task = asyncio.ensure_future(self._listen(track, voice))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

        await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
        await pc.setLocalDescription(await pc.createAnswer())
        return pc

    async def _listen(self, track: MediaStreamTrack, voice: PacedAudioTrack) -> None:
        heard = False
        quiet = 0.0
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            assert isinstance(frame, av.AudioFrame)
            pcm = frame.to_ndarray().reshape(-1)
            if rms_dbfs(pcm) > -45.0:
                heard, quiet = True, 0.0
                continue
            quiet += frame.samples / frame.sample_rate
            if heard and quiet >= QUIET_S:
                heard = False
                self.replies += 1
                t = np.arange(int(TONE_S * WEBRTC_RATE), dtype=np.float32) / WEBRTC_RATE
                voice.write((0.3 * 32767 * np.sin(2 * np.pi * 440.0 * t)).astype(np.int16))

    async def pipecat_offer(self, request: web.Request) -> web.Response:
        body = await request.json()
        pc = await self._answer(body)
        self.offers["pipecat"] += 1
        desc = pc.localDescription
        return web.json_response({"sdp": desc.sdp, "type": desc.type, "pc_id": uuid.uuid4().hex})

    async def fastrtc_offer(self, request: web.Request) -> web.Response:
        body = await request.json()
        if not body.get("webrtc_id") or "m=application" not in body.get("sdp", ""):
            return web.json_response({"status": "failed", "meta": {"error": "no webrtc_id or data channel"}})
        pc = await self._answer(body)
        self.offers["fastrtc"] += 1
        desc = pc.localDescription
        return web.json_response({"sdp": desc.sdp, "type": desc.type})

    async def _close(self, _app: web.Application) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.gather(*(pc.close() for pc in self.pcs))
