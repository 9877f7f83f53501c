// Compile-time checks of rtcvoice.d.ts: every @ts-expect-error below must stay an error, so the
// types cannot silently decay into `any`. Never imported at run time.

import { connect, createCall, RtcVoiceError, type MetricsEvent, type VoiceCall } from "../../rtcvoice.js";

export async function checks(): Promise<void> {
  const call: VoiceCall = await connect({ server: "https://voice.example.com", iceTransportPolicy: "relay" });
  call.on("metrics", (m: MetricsEvent) => {
    const v2v: number | null = m.voice_to_voice;
    // @ts-expect-error a stage can be missing (null), so it must be checked before use
    m.stt.toFixed(0);
    return v2v;
  });
  call.on("final_transcript", (e) => e.text.toUpperCase());
  call.on("error", (e) => (e instanceof RtcVoiceError ? e.code : null));
  // @ts-expect-error unknown event names are rejected
  call.on("no_such_event", () => undefined);
  // @ts-expect-error session.update fields are typed
  call.updateSession({ speed: "fast" });
  // @ts-expect-error transports are a closed set
  createCall({ transport: "carrier-pigeon" });
  createCall({ transport: "websocket" });
  const transport: "webrtc" | "websocket" | null = call.transport;
  // @ts-expect-error websocketStats is null on WebRTC calls
  call.websocketStats.secondsPlayed.toFixed(1);
  call.send({ type: "end_of_input" });
  call.send({ type: "text_message", content: "hi" });
  // @ts-expect-error a text_message needs content
  call.send({ type: "text_message" });
  void transport;
  await call.hangUp();
}
