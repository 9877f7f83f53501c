// rtcvoice.js: the browser client for an rtcvoice server.
//
// A dependency-free ES module (no build step); types are in rtcvoice.d.ts next to it.
//
//   import { connect } from "/static/rtcvoice.js";
//   const call = await connect({ server: "https://voice.example.com", token });
//   call.on("final_transcript", (e) => console.log("you:", e.text));
//   call.on("ai_text", (e) => console.log("ai:", e.text));
//   call.on("error", (err) => alert(err.message));
//   ...
//   await call.hangUp();
//
// What it does for you: asks for the microphone (echo cancellation, noise suppression and
// automatic gain on), starts a session, makes the WebRTC offer (with the data channel the server
// expects) and sends it once ICE gathering is done, plays the AI's voice, turns every failure
// into an RtcVoiceError whose message a person can act on, and starts a fresh session on the
// same microphone when ICE fails mid-call (the server cannot restart ICE on a live peer).
//
// Where WebRTC is missing (or with `transport: "websocket"`) the same call runs over the
// server's WebSocket transport: the microphone is resampled to 16 kHz PCM16 in an AudioWorklet
// and sent as binary frames, the AI's 24 kHz PCM16 frames are scheduled on an AudioContext, and
// the events, meters, mute and interrupt behave as they do over WebRTC.

export const VERSION = "0.1.0";
export const API_PREFIX = "/api/v1/voice";

const DEFAULT_AUDIO = {
  echoCancellation: true,
  noiseSuppression: true,
  autoGainControl: true,
  channelCount: 1,
};

const DEFAULTS = {
  connectTimeoutMs: 20000,
  requestTimeoutMs: 15000,
  iceGatheringTimeoutMs: 4000,
  reconnect: { attempts: 3, backoffMs: 1000, disconnectedTimeoutMs: 4000 },
};

const MAX_QUEUED_SENDS = 50;

// The WebSocket transport's audio: PCM16 little-endian mono, 16 kHz up and 24 kHz down.
const WS_INPUT_RATE = 16000;
const WS_OUTPUT_RATE = 24000;
const WS_FRAME_SAMPLES = 320; // 20 ms frames to the server
const WS_PLAYBACK_LEAD_S = 0.06; // how far ahead playback (re)starts: absorbs network jitter
const WS_MAX_BUFFERED_BYTES = 64 * 1024; // ~2 s of microphone audio stuck in the socket: drop, don't pile up
const WS_NORMAL_CLOSURE = 1000;

// -- errors -------------------------------------------------------------------------------------

export class RtcVoiceError extends Error {
  /**
   * @param {string} code machine-readable reason (see ErrorCode in rtcvoice.d.ts)
   * @param {string} message what a person should read
   * @param {object} [details]
   */
  constructor(code, message, details = {}) {
    super(message, details.cause !== undefined ? { cause: details.cause } : undefined);
    this.name = "RtcVoiceError";
    this.code = code;
    this.fatal = details.fatal ?? true;
    this.source = details.source ?? "client";
    this.status = details.status;
    this.serverCode = details.serverCode;
    this.retryAfter = details.retryAfter;
    this.turnId = details.turnId;
  }
}

// session.ended reasons after which the client starts again on the same thread (another node).
const RECONNECT_REASONS = new Set(["drain"]);

const MESSAGES = {
  webrtc_unavailable:
    "This browser can't make WebRTC calls. Please use a current version of Chrome, Edge, Firefox or Safari.",
  insecure_context:
    "The microphone only works on secure pages. Open this page over https:// (or on localhost) and try again.",
  microphone_unsupported: "This browser doesn't give web pages access to a microphone.",
  microphone_denied:
    "Microphone access is blocked. Allow the microphone for this site (click the icon at the left of the address bar), then start the call again.",
  microphone_not_found: "No microphone was found. Plug one in (or check your system's sound settings) and try again.",
  microphone_in_use:
    "Your microphone couldn't be started. Another app may be using it: close that app and try again.",
  ice_failed:
    "The call couldn't connect: the network between you and the voice server blocks the audio. Try another network, or ask the site's administrator to set up a TURN server.",
  connection_lost: "The call dropped and couldn't be reconnected. Check your connection and start the call again.",
  websocket_failed:
    "The call couldn't connect: the voice server refused the audio connection, or a proxy or firewall between you and it blocks WebSockets.",
  aborted: "The call was hung up before it connected.",
  bad_response: "The voice server sent an answer this page doesn't understand. Is the address right?",
};

function serverHost(server) {
  try {
    return new URL(server || globalThis.location?.href).host || server;
  } catch {
    return server;
  }
}

function microphoneError(err) {
  const name = err && typeof err === "object" ? err.name : "";
  if (name === "NotAllowedError" || name === "SecurityError" || name === "PermissionDeniedError") {
    return new RtcVoiceError("microphone_denied", MESSAGES.microphone_denied, { cause: err });
  }
  if (name === "NotFoundError" || name === "OverconstrainedError" || name === "DevicesNotFoundError") {
    return new RtcVoiceError("microphone_not_found", MESSAGES.microphone_not_found, { cause: err });
  }
  return new RtcVoiceError("microphone_in_use", MESSAGES.microphone_in_use, { cause: err });
}

function httpError(status, body, headers, server) {
  const info = body && typeof body === "object" && body.error && typeof body.error === "object" ? body.error : {};
  const serverCode = typeof info.code === "string" ? info.code : undefined;
  const said = typeof info.message === "string" ? info.message : "";
  const details = { status, serverCode, source: "server" };
  if (status === 503 || status === 429) {
    const retry = Number.parseInt(headers?.get?.("Retry-After") ?? "", 10);
    const retryAfter = Number.isFinite(retry) ? retry : undefined;
    const when = retryAfter !== undefined ? `in ${retryAfter} second${retryAfter === 1 ? "" : "s"}` : "shortly";
    return new RtcVoiceError(
      "server_busy",
      `The voice server is busy: all of its lines are in use. Please try again ${when}.`,
      { ...details, retryAfter },
    );
  }
  if (status === 401 || status === 403) {
    return new RtcVoiceError(
      "unauthorized",
      "The voice server didn't accept this app's sign-in. Sign in again, then start the call.",
      details,
    );
  }
  if (status >= 500) {
    return new RtcVoiceError(
      "server_error",
      `The voice server ran into a problem (HTTP ${status})${said ? `: ${said}` : "."} Please try again in a moment.`,
      details,
    );
  }
  return new RtcVoiceError(
    "session_refused",
    `The voice server refused to start the call${said ? `: ${said}` : ` (HTTP ${status}).`}`,
    details,
  );
}

function toRtcVoiceError(err) {
  if (err instanceof RtcVoiceError) return err;
  const text = err && err.message ? err.message : String(err);
  return new RtcVoiceError("internal_error", `Something went wrong in the call: ${text}`, { cause: err });
}

// -- feature detection --------------------------------------------------------------------------

/** What this browser can do; `connect()` checks the same things and reports them as errors. */
export function checkSupport() {
  const g = globalThis;
  return {
    webrtc: typeof g.RTCPeerConnection === "function",
    microphone: !!g.navigator?.mediaDevices?.getUserMedia,
    secureContext: g.isSecureContext !== false,
    websocket: typeof g.WebSocket === "function",
  };
}

// -- small helpers ------------------------------------------------------------------------------

function joinUrl(server, path) {
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(path)) return path;
  const base = (server || "").replace(/\/+$/, "");
  return base + (path.startsWith("/") ? path : `/${path}`);
}

/** The WebSocket URL for a path on the server (ws:// or wss:// like the page or server), with the token. */
function webSocketUrl(server, path, token) {
  const url = new URL(joinUrl(server, path), globalThis.location?.href);
  if (url.protocol === "https:") url.protocol = "wss:";
  else if (url.protocol === "http:") url.protocol = "ws:";
  // Browsers cannot set headers on a WebSocket: the server takes the token from the query.
  if (token) url.searchParams.set("token", token);
  return url.href;
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function waitForIceGathering(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", onState);
      pc.removeEventListener("icecandidate", onCandidate);
      resolve();
    };
    const onState = () => {
      if (pc.iceGatheringState === "complete") done();
    };
    const onCandidate = (event) => {
      if (!event.candidate) done();
    };
    // The server does not take trickled candidates: the offer goes once gathering is done, or
    // with what was found by then (an unreachable STUN/TURN server must not hold the call up).
    const timer = setTimeout(done, timeoutMs);
    pc.addEventListener("icegatheringstatechange", onState);
    pc.addEventListener("icecandidate", onCandidate);
  });
}

/** GET /api/v1/voice/voices: the voices the server's TTS offers, and its default. */
export async function fetchVoices(options = {}) {
  const headers = options.token ? { Authorization: `Bearer ${options.token}` } : {};
  let res;
  try {
    res = await fetch(joinUrl(options.server ?? "", `${API_PREFIX}/voices`), { headers, signal: options.signal });
  } catch (err) {
    if (err && err.name === "AbortError") throw err;
    throw new RtcVoiceError(
      "server_unreachable",
      `Can't reach the voice server at ${serverHost(options.server)}. Check that it is running and that you are online.`,
      { cause: err },
    );
  }
  let body = null;
  try {
    body = await res.json();
  } catch {
    // handled below
  }
  if (!res.ok) throw httpError(res.status, body, res.headers, options.server);
  if (!body || !Array.isArray(body.voices)) throw new RtcVoiceError("bad_response", MESSAGES.bad_response);
  return { voices: body.voices, default: body.default ?? null };
}

// -- WebSocket audio ------------------------------------------------------------------------------

/**
 * Float audio at any rate in, PCM16 frames at `outputRate` out: a windowed-sinc low-pass (cut
 * at 90% of the output's Nyquist frequency, so nothing above it folds back into speech) evaluated
 * at each output instant from a polyphase table. Self-contained: its source also runs inside the
 * capture AudioWorklet.
 */
export class PcmDownsampler {
  constructor(inputRate, outputRate, frameSamples, onFrame) {
    this.step = inputRate / outputRate; // input samples per output sample
    this.onFrame = onFrame;
    const cutoff = Math.min(0.5, (0.45 * outputRate) / inputRate); // cycles per input sample
    const half = Math.ceil(16 / (2 * cutoff)); // 16 zero crossings of the sinc each side
    const phases = 128;
    this.half = half;
    this.phases = phases;
    this.taps = 2 * half;
    this.table = new Float32Array((phases + 1) * this.taps);
    for (let p = 0; p <= phases; p++) {
      const frac = p / phases;
      let sum = 0;
      for (let k = 0; k < this.taps; k++) {
        const t = k - half + 1 - frac; // distance from the output instant, in input samples
        const x = 2 * cutoff * t;
        const sinc = x === 0 ? 1 : Math.sin(Math.PI * x) / (Math.PI * x);
        const w = Math.abs(t) >= half ? 0 : 0.42 + 0.5 * Math.cos((Math.PI * t) / half) + 0.08 * Math.cos((2 * Math.PI * t) / half);
        const h = sinc * w;
        this.table[p * this.taps + k] = h;
        sum += h;
      }
      for (let k = 0; k < this.taps; k++) this.table[p * this.taps + k] /= sum; // unity gain at DC
    }
    this.buffer = new Float32Array(4 * this.taps + 8192);
    this.length = half; // starts with `half` samples of silence as history
    this.position = half - 1; // input index (fractional) of the next output sample
    this.frameSamples = frameSamples;
    this.frame = new Int16Array(frameSamples);
    this.filled = 0;
  }

  /** Take one block of float samples (-1..1). */
  push(input) {
    if (this.length + input.length > this.buffer.length) {
      const bigger = new Float32Array(2 * (this.length + input.length));
      bigger.set(this.buffer.subarray(0, this.length));
      this.buffer = bigger;
    }
    this.buffer.set(input, this.length);
    this.length += input.length;
    const { buffer, table, taps, half, phases } = this;
    for (;;) {
      const base = Math.floor(this.position);
      const phase = Math.round((this.position - base) * phases);
      if (base + half >= this.length) break; // needs samples that have not come yet
      const row = phase * taps;
      const first = base - half + 1;
      let y = 0;
      for (let k = 0; k < taps; k++) y += buffer[first + k] * table[row + k];
      y = y > 1 ? 1 : y < -1 ? -1 : y;
      this.frame[this.filled++] = Math.round(y < 0 ? y * 32768 : y * 32767);
      if (this.filled === this.frameSamples) {
        this.onFrame(this.frame); // may transfer (detach) its buffer
        this.frame = new Int16Array(this.frameSamples);
        this.filled = 0;
      }
      this.position += this.step;
    }
    // Keep only the history the next output sample needs.
    const keepFrom = Math.max(0, Math.floor(this.position) - half + 1);
    if (keepFrom > 0) {
      buffer.copyWithin(0, keepFrom, this.length);
      this.length -= keepFrom;
      this.position -= keepFrom;
    }
  }
}

const CAPTURE_PROCESSOR = "rtcvoice-capture";

/** The capture AudioWorklet: microphone blocks in, 16 kHz PCM16 frames posted to the page. */
function captureWorkletSource() {
  return `${PcmDownsampler.toString()}
registerProcessor(${JSON.stringify(CAPTURE_PROCESSOR)}, class extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { outputRate, frameSamples } = options.processorOptions;
    this.mono = new Float32Array(128);
    this.resampler = new PcmDownsampler(sampleRate, outputRate, frameSamples, (frame) =>
      this.port.postMessage(frame, [frame.buffer]));
  }
  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true;
    let block = channels[0];
    if (channels.length > 1) {
      if (this.mono.length !== block.length) this.mono = new Float32Array(block.length);
      this.mono.fill(0);
      for (const channel of channels) for (let i = 0; i < block.length; i++) this.mono[i] += channel[i] / channels.length;
      block = this.mono;
    }
    this.resampler.push(block);
    return true;
  }
});
`;
}

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

function swapBytes(pcm) {
  for (let i = 0; i < pcm.length; i++) {
    const x = pcm[i] & 0xffff;
    pcm[i] = ((x & 0xff) << 8) | (x >> 8);
  }
  return pcm;
}

/**
 * The audio of a WebSocket call, on one AudioContext: the microphone resampled to 16 kHz PCM16
 * frames for the socket, and the AI's 24 kHz PCM16 frames scheduled back to back on a playhead
 * that a barge-in or `interrupt()` can flush. The AI's voice also feeds a MediaStream (the
 * `track` event, as on WebRTC) so level meters and recorders work unchanged.
 */
class WebSocketAudio {
  constructor(call) {
    this.call = call;
    const Ctx = globalThis.AudioContext ?? globalThis.webkitAudioContext;
    this.context = new Ctx();
    this.context.resume?.().catch(() => {});
    this.output = this.context.createGain();
    this.stream = null;
    if (typeof this.context.createMediaStreamDestination === "function") {
      const destination = this.context.createMediaStreamDestination();
      this.output.connect(destination);
      this.stream = destination.stream;
    }
    // With an audioElement the voice plays there (its output device, its volume); otherwise
    // straight to the speakers.
    this.element = call.options.audioElement && this.stream ? call.options.audioElement : null;
    if (!this.element) this.output.connect(this.context.destination);
    this.sources = new Set();
    this.playhead = 0;
    this.closed = false;
    this._capture = null;
    this._nodes = [];
    this._blockedReported = false;
    this.counters = {
      framesSent: 0,
      secondsSent: 0,
      framesDropped: 0,
      framesReceived: 0,
      secondsReceived: 0,
      secondsPlayed: 0,
      flushes: 0,
      underruns: 0,
    };
  }

  /** Whether the AI's voice is playing (or scheduled) right now. */
  get playing() {
    return this.sources.size > 0 && this.playhead > this.context.currentTime;
  }

  stats() {
    const buffered = this.sources.size ? Math.max(0, this.playhead - this.context.currentTime) : 0;
    return { ...this.counters, bufferedSeconds: buffered, contextState: this.context.state };
  }

  /** Start sending the microphone (once per call; reconnections reuse it). */
  startCapture(stream) {
    if (!this._capture) this._capture = this._startCapture(stream);
    return this._capture;
  }

  async _startCapture(stream) {
    const ctx = this.context;
    const source = ctx.createMediaStreamSource(stream);
    // Processing nodes only run when pulled by the destination: through a muted gain.
    const sink = ctx.createGain();
    sink.gain.value = 0;
    sink.connect(ctx.destination);
    this._nodes.push(source, sink);
    const onFrame = (frame) => this._send(frame);
    let node = null;
    if (ctx.audioWorklet && typeof globalThis.AudioWorkletNode === "function") {
      const url = URL.createObjectURL(new Blob([captureWorkletSource()], { type: "text/javascript" }));
      try {
        await ctx.audioWorklet.addModule(url);
        node = new AudioWorkletNode(ctx, CAPTURE_PROCESSOR, {
          numberOfInputs: 1,
          numberOfOutputs: 1,
          outputChannelCount: [1],
          processorOptions: { outputRate: WS_INPUT_RATE, frameSamples: WS_FRAME_SAMPLES },
        });
        node.port.onmessage = (event) => onFrame(event.data);
      } catch {
        node = null; // blob: modules blocked by the page's CSP: capture on the main thread
      } finally {
        URL.revokeObjectURL(url);
      }
    }
    if (this.closed) return;
    if (!node) {
      node = ctx.createScriptProcessor(2048, 1, 1);
      const resampler = new PcmDownsampler(ctx.sampleRate, WS_INPUT_RATE, WS_FRAME_SAMPLES, onFrame);
      node.onaudioprocess = (event) => resampler.push(event.inputBuffer.getChannelData(0));
    }
    source.connect(node);
    node.connect(sink);
    this._nodes.push(node);
  }

  _send(frame) {
    const ws = this.call._socket;
    if (this.closed || !ws || ws.readyState !== 1) return;
    if (ws.bufferedAmount > WS_MAX_BUFFERED_BYTES) {
      this.counters.framesDropped++; // the network can't keep up: old speech is worth nothing
      return;
    }
    if (this.call.muted) frame.fill(0); // silence, so the server's turn taking goes on
    else if (!LITTLE_ENDIAN) swapBytes(frame);
    ws.send(frame.buffer);
    this.counters.framesSent++;
    this.counters.secondsSent += frame.length / WS_INPUT_RATE;
  }

  /** Schedule one binary frame of the AI's voice (PCM16 LE mono, 24 kHz). */
  play(data) {
    const samples = data.byteLength >> 1;
    if (this.closed || samples === 0) return;
    const pcm = new Int16Array(data, 0, samples);
    if (!LITTLE_ENDIAN) swapBytes(pcm);
    const ctx = this.context;
    const buffer = ctx.createBuffer(1, samples, WS_OUTPUT_RATE);
    const out = buffer.getChannelData(0);
    for (let i = 0; i < samples; i++) out[i] = pcm[i] / 32768;
    const now = ctx.currentTime;
    if (this.playhead < now + 0.005) {
      // First audio of a reply, or the network fell behind: start a little ahead of now.
      if (this.sources.size) this.counters.underruns++;
      this.playhead = now + WS_PLAYBACK_LEAD_S;
    }
    const source = ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(this.output);
    source.onended = () => {
      if (this.sources.delete(source)) this.counters.secondsPlayed += buffer.duration;
      source.disconnect();
    };
    source.start(this.playhead);
    this.sources.add(source);
    this.playhead += buffer.duration;
    this.counters.framesReceived++;
    this.counters.secondsReceived += buffer.duration;
    if (ctx.state === "suspended") this._reportBlocked();
  }

  /** Drop every scheduled frame (barge-in, interrupt, reconnection). */
  flush() {
    if (this.sources.size) this.counters.flushes++;
    for (const source of this.sources) {
      source.onended = null;
      try {
        source.stop();
      } catch {
        // not started
      }
      source.disconnect();
    }
    this.sources.clear();
    this.playhead = 0;
  }

  /** The AI's voice is ready: tell the call (its `track` event, for meters), start the element. */
  announce() {
    const call = this.call;
    if (this.stream) {
      call.remoteStream = this.stream;
      if (this.element) {
        call.audioElement = this.element;
        this.element.srcObject = this.stream;
        this.element.play()?.catch?.((err) => {
          if (!this.closed && !(err && err.name === "AbortError")) this._reportBlocked(err);
        });
      }
      call.emit("track", { stream: this.stream, track: this.stream.getAudioTracks()[0] });
    }
    if (this.context.state === "suspended") this._reportBlocked();
  }

  _reportBlocked(cause) {
    if (this._blockedReported) return;
    this._blockedReported = true;
    this.call.emit(
      "error",
      new RtcVoiceError("autoplay_blocked", "The browser is holding back the call's audio until you click on the page.", {
        fatal: false,
        cause,
      }),
    );
  }

  async resume() {
    if (this.closed) return;
    if (this.context.state === "suspended") {
      this.flush(); // what queued up while the browser held the audio back is stale now
      await this.context.resume();
    }
    this._blockedReported = false;
  }

  close() {
    if (this.closed) return;
    this.flush();
    this.closed = true;
    for (const node of this._nodes) {
      if (node.port) node.port.onmessage = null;
      if ("onaudioprocess" in node) node.onaudioprocess = null;
      try {
        node.disconnect();
      } catch {
        // already disconnected
      }
    }
    this._nodes = [];
    this.context.close().catch(() => {});
  }
}

// -- events -------------------------------------------------------------------------------------

class Emitter {
  #handlers = new Map();

  on(type, handler) {
    let set = this.#handlers.get(type);
    if (!set) this.#handlers.set(type, (set = new Set()));
    set.add(handler);
    return () => this.off(type, handler);
  }

  off(type, handler) {
    this.#handlers.get(type)?.delete(handler);
  }

  once(type, handler) {
    const off = this.on(type, (data) => {
      off();
      handler(data);
    });
    return off;
  }

  emit(type, data) {
    const set = this.#handlers.get(type);
    if (!set) return;
    for (const handler of [...set]) {
      try {
        handler(data);
      } catch (err) {
        // A listener's bug must not break the call; report it where developers look.
        setTimeout(() => {
          throw err;
        });
      }
    }
  }
}

// -- the call -----------------------------------------------------------------------------------

/** Browser tools as the server takes them: { name, description, parameters } each. */
function toolSpecs(tools) {
  return Object.entries(tools).map(([name, tool]) => ({
    name,
    description: tool.description ?? "",
    parameters: tool.parameters ?? { type: "object", properties: {} },
  }));
}

/**
 * One voice call. Create it with `createCall()` (subscribe first, then `connect()`), or with the
 * `connect()` function, which does both and resolves once the call is up.
 */
export class VoiceCall extends Emitter {
  constructor(options = {}) {
    super();
    this.options = { ...options };
    this.server = options.server ?? "";
    this.sessionId = null;
    this.threadId = options.session?.thread_id ?? null;
    /** @type {"idle"|"connecting"|"connected"|"reconnecting"|"closed"|"failed"} */
    this.connectionState = "idle";
    /** The AI's turn state from the server: listening, thinking or speaking. */
    this.state = null;
    this.muted = false;
    this.localStream = null;
    this.remoteStream = null;
    this.peerConnection = null;
    /** "webrtc" or "websocket" once connecting has begun. */
    this.transport = null;
    this.audioElement = options.audioElement ?? null;
    this._ownStream = false;
    // Where events go and come from: the WebRTC data channel, or the WebSocket.
    this._channel = null;
    this._socket = null;
    // The WebSocket transport's audio (kept across reconnections, like the microphone).
    this._audio = null;
    this._closed = false;
    this._reconnecting = false;
    this._endedReason = null; // from the server's session.ended, just before it closes
    this._disconnectTimer = null;
    this._pending = [];
    this._sessionPatch = {};
    // Tools this page runs for the AI (browser tools): name → { description, parameters, run }.
    this._tools = { ...(options.tools ?? {}) };
    this._controllers = new Set();
    this._pingId = 0;
    this._onPageHide = () => {
      this.hangUp();
    };
  }

  // ---- public API -----------------------------------------------------------------------------

  /** Ask for the microphone, start a session and connect. Resolves with the call once it is up. */
  async connect() {
    if (this.connectionState !== "idle") {
      throw new RtcVoiceError("already_started", "This call was already started; create a new one.");
    }
    this._setConnection("connecting");
    if (this.options.endOnPageHide !== false) globalThis.addEventListener?.("pagehide", this._onPageHide);
    try {
      const transport = this._pickTransport();
      this.transport = transport;
      // Made now, while the click that started the call still lets audio play.
      if (transport === "websocket") this._audio = new WebSocketAudio(this);
      await this._openMicrophone();
      this._checkAlive();
      await this._establish();
      this._checkAlive();
      this._setConnection("connected");
      this._flushPending();
      return this;
    } catch (err) {
      const error = this._closed ? new RtcVoiceError("aborted", MESSAGES.aborted, { cause: err }) : toRtcVoiceError(err);
      if (!this._closed) this._fail(error);
      throw error;
    }
  }

  mute() {
    this.setMuted(true);
  }

  unmute() {
    this.setMuted(false);
  }

  toggleMute() {
    this.setMuted(!this.muted);
    return this.muted;
  }

  setMuted(muted) {
    this.muted = !!muted;
    // A disabled track sends silence: the server hears nothing, and the peer stays up. Over the
    // WebSocket the frames are also zeroed before they are sent.
    for (const track of this.localStream?.getAudioTracks() ?? []) track.enabled = !this.muted;
    this.emit("mute", { muted: this.muted });
  }

  /** Stop the AI mid-sentence. */
  interrupt() {
    // Over the WebSocket the AI's voice is already here, up to ~200 ms ahead: drop it now.
    this._audio?.flush();
    this.send({ type: "interrupt" });
  }

  /** Say something by typing it: the AI answers as if it had been spoken. */
  sendText(text) {
    if (typeof text !== "string" || !text.trim()) {
      throw new RtcVoiceError("invalid_text", "A text message needs some text.", { fatal: false });
    }
    this.send({ type: "text_message", content: text });
    this.emit("text_sent", { type: "text_sent", text });
  }

  /** Change the voice, instructions, language or speed; kept across reconnections. */
  updateSession(update) {
    const patch = { ...update };
    Object.assign(this._sessionPatch, patch);
    this.send({ type: "session.update", ...patch });
  }

  /**
   * Give the AI tools this page runs (replacing those given before): name → { description,
   * parameters (JSON schema of an object), run(args, call) → any JSON, or a Promise of it }.
   * The server sends a `tool_call` with `client: true`; the result (or the error thrown) goes back.
   */
  setTools(tools) {
    this._tools = { ...(tools ?? {}) };
    this.send({ type: "session.update", tools: toolSpecs(this._tools) });
  }

  async _runTool(event) {
    const tool = this._tools[event.name];
    let answer;
    try {
      if (!tool || typeof tool.run !== "function") throw new Error(`this page has no tool ${event.name}`);
      const result = await tool.run(event.arguments ?? {}, { id: event.id, call: this });
      answer = { type: "tool_result", id: event.id, result: result === undefined ? null : result };
    } catch (err) {
      answer = { type: "tool_result", id: event.id, error: String(err?.message ?? err) };
    }
    this.send(answer);
  }

  /** Round trip over the event channel (data channel or WebSocket), in milliseconds. */
  ping(timeoutMs = 5000) {
    const id = ++this._pingId;
    const sent = performance.now();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        off();
        reject(new RtcVoiceError("timeout", "The voice server didn't answer the ping.", { fatal: false }));
      }, timeoutMs);
      const off = this.on("pong", (event) => {
        if (event.id !== id) return;
        clearTimeout(timer);
        off();
        resolve(performance.now() - sent);
      });
      this.send({ type: "ping", id, t: Date.now() });
    });
  }

  /** Send any client event. Queued while (re)connecting, so nothing typed is lost. */
  send(event) {
    if (this._closed) return false;
    const text = JSON.stringify(event);
    if (this._channelOpen() && this.connectionState === "connected") {
      this._channel.send(text);
      return true;
    }
    if (this._pending.length < MAX_QUEUED_SENDS) this._pending.push(text);
    return false;
  }

  /** End the call: the session on the server, the peer, and the microphone (if this call opened it). */
  async hangUp() {
    if (this._closed) return;
    this._closed = true;
    const sessionId = this.sessionId;
    this._teardown();
    this._setConnection("closed", { reason: "hangup" });
    if (sessionId) await this._endSession(sessionId);
  }

  /** The peer connection's statistics (null before the offer is made, after hanging up, and over the WebSocket). */
  async getStats() {
    return this.peerConnection ? this.peerConnection.getStats() : null;
  }

  /** The WebSocket transport's audio counters (null on WebRTC calls). */
  get websocketStats() {
    return this._audio ? this._audio.stats() : null;
  }

  /** Start playback after a browser refused to autoplay (call it from a click). */
  async resumeAudio() {
    if (this._audio) await this._audio.resume();
    if (this.audioElement?.srcObject) await this.audioElement.play();
  }

  // ---- connecting -----------------------------------------------------------------------------

  _pickTransport() {
    const wanted = this.options.transport ?? "auto";
    const support = checkSupport();
    if (wanted === "webrtc" && !support.webrtc) {
      throw new RtcVoiceError("webrtc_unavailable", MESSAGES.webrtc_unavailable);
    }
    if (wanted === "websocket" || !support.webrtc) {
      // Checked before the microphone is asked for: no prompt for a call that cannot happen.
      const audioContext = typeof (globalThis.AudioContext ?? globalThis.webkitAudioContext) === "function";
      if (!support.websocket || !audioContext) {
        throw new RtcVoiceError("webrtc_unavailable", MESSAGES.webrtc_unavailable);
      }
      return "websocket";
    }
    return "webrtc";
  }

  _establish() {
    return this.transport === "websocket" ? this._establishWebSocket() : this._establishWebRtc();
  }

  _channelOpen() {
    const channel = this._channel;
    if (!channel) return false;
    return channel === this._socket ? channel.readyState === 1 : channel.readyState === "open";
  }

  async _establishWebSocket() {
    // GET /api/v1/voice/session/{id}/ws: PCM16 16 kHz mono in, the same JSON events out, and the
    // AI's voice as PCM16 24 kHz binary frames.
    const audio = this._audio;
    // The server's default for this socket is 16 kHz; 24 kHz is what its voices are made at.
    const body = { ...this._startBody(), output_sample_rate: WS_OUTPUT_RATE };
    const started = await this._post(`${API_PREFIX}/session/start`, body);
    if (!started || typeof started.session_id !== "string") {
      throw new RtcVoiceError("bad_response", MESSAGES.bad_response);
    }
    this.sessionId = started.session_id;
    this._checkAlive();
    // The capture worklet loads while the socket opens.
    const capturing = this.localStream ? audio.startCapture(this.localStream) : Promise.resolve();
    capturing.catch(() => {}); // observed below
    const path = typeof started.ws_url === "string" ? started.ws_url : `${API_PREFIX}/session/${this.sessionId}/ws`;

    let ws;
    try {
      ws = new WebSocket(webSocketUrl(this.server, path, this.options.token));
    } catch (err) {
      throw new RtcVoiceError("websocket_failed", MESSAGES.websocket_failed, { cause: err });
    }
    ws.binaryType = "arraybuffer";
    this._socket = ws;
    this._channel = ws;
    ws.onmessage = (event) => {
      if (typeof event.data === "string") this._onMessage(ws, event.data);
      else if (ws === this._socket) this._audio?.play(event.data);
    };

    const timeoutMs = this.options.connectTimeoutMs ?? DEFAULTS.connectTimeoutMs;
    let timer;
    try {
      await new Promise((resolve, reject) => {
        const failed = () => new RtcVoiceError("websocket_failed", MESSAGES.websocket_failed);
        ws.onopen = () => resolve();
        // A refused upgrade (or a blocked one) shows as a close before open; "error" says no more.
        ws.onclose = () => reject(failed());
        timer = setTimeout(() => reject(failed()), timeoutMs);
      });
      this._checkAlive();
      await capturing;
      this._checkAlive();
    } finally {
      clearTimeout(timer);
    }
    // Closed while the worklet loaded: its close event has been and gone.
    if (ws.readyState !== 1) throw new RtcVoiceError("websocket_failed", MESSAGES.websocket_failed);
    // Up: from here on a failure is handled by reconnecting.
    ws.onclose = (event) => this._onSocketClosed(ws, event);
    audio.announce();
  }

  async _openMicrophone() {
    if (this.options.microphone === false) return;
    const given = this.options.audio;
    if (given && typeof given === "object" && typeof given.getAudioTracks === "function") {
      this.localStream = given;
      this._ownStream = false;
    } else {
      const media = globalThis.navigator?.mediaDevices;
      if (!media?.getUserMedia) {
        if (globalThis.isSecureContext === false) {
          throw new RtcVoiceError("insecure_context", MESSAGES.insecure_context);
        }
        throw new RtcVoiceError("microphone_unsupported", MESSAGES.microphone_unsupported);
      }
      const constraints = { ...DEFAULT_AUDIO, ...(given && typeof given === "object" ? given : {}) };
      try {
        this.localStream = await media.getUserMedia({ audio: constraints, video: false });
      } catch (err) {
        throw microphoneError(err);
      }
      this._ownStream = true;
      if (this._closed) this._stopMicrophone();
    }
    for (const track of this.localStream?.getAudioTracks() ?? []) track.enabled = !this.muted;
  }

  _startBody() {
    const body = { ...(this.options.session ?? {}) };
    if (this.threadId && !body.thread_id) body.thread_id = this.threadId;
    if (this._sessionPatch.voice) body.voice = this._sessionPatch.voice;
    if (this._sessionPatch.instructions) body.instructions = this._sessionPatch.instructions;
    // Declared with the call itself, so they are there for its first turn (and again on reconnecting).
    if (Object.keys(this._tools).length) body.tools = toolSpecs(this._tools);
    return body;
  }

  async _establishWebRtc() {
    this.transport = "webrtc";
    const started = await this._post(`${API_PREFIX}/session/start`, this._startBody());
    if (!started || typeof started.session_id !== "string") {
      throw new RtcVoiceError("bad_response", MESSAGES.bad_response);
    }
    this.sessionId = started.session_id;
    this._checkAlive();

    const config = {
      iceServers: this.options.iceServers ?? (Array.isArray(started.ice_servers) ? started.ice_servers : []),
    };
    if (this.options.iceTransportPolicy) config.iceTransportPolicy = this.options.iceTransportPolicy;
    const pc = new RTCPeerConnection(config);
    this.peerConnection = pc;

    const tracks = this.localStream?.getAudioTracks() ?? [];
    if (tracks.length) {
      for (const track of tracks) pc.addTrack(track, this.localStream);
    } else {
      // Listen-only (no microphone): the server still needs an audio section to answer.
      pc.addTransceiver("audio", { direction: "recvonly" });
    }
    // The server's events arrive on a data channel that the client opens before its offer.
    const dc = pc.createDataChannel("events", { ordered: true });
    this._channel = dc;
    dc.onmessage = (event) => this._onMessage(dc, event.data);
    pc.ontrack = (event) => this._onRemoteTrack(pc, event);

    const timeoutMs = this.options.connectTimeoutMs ?? DEFAULTS.connectTimeoutMs;
    let settle;
    const opened = new Promise((resolve, reject) => {
      settle = { resolve, reject };
    });
    const iceFailed = () => new RtcVoiceError("ice_failed", MESSAGES.ice_failed);
    dc.onopen = () => settle.resolve();
    dc.onclose = () => settle.reject(iceFailed());
    pc.onconnectionstatechange = () => {
      if (pc.connectionState === "failed") settle.reject(iceFailed());
    };
    const timer = setTimeout(() => settle.reject(iceFailed()), timeoutMs);
    opened.catch(() => {}); // observed below; avoid an unhandled rejection while signaling runs

    try {
      await pc.setLocalDescription(await pc.createOffer());
      await waitForIceGathering(pc, this.options.iceGatheringTimeoutMs ?? DEFAULTS.iceGatheringTimeoutMs);
      this._checkAlive();
      const answer = await this._post(started.offer_url ?? `${API_PREFIX}/session/${this.sessionId}/offer`, {
        sdp: pc.localDescription.sdp,
        type: pc.localDescription.type,
      });
      this._checkAlive();
      if (!answer || typeof answer.sdp !== "string") throw new RtcVoiceError("bad_response", MESSAGES.bad_response);
      await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
      await opened;
      this._checkAlive();
    } finally {
      clearTimeout(timer);
    }

    // Up: from here on a failure is handled by reconnecting.
    dc.onclose = () => this._onChannelClosed(pc);
    pc.onconnectionstatechange = () => this._onConnectionState(pc);
  }

  async _post(path, body) {
    const url = joinUrl(this.server, path);
    const controller = new AbortController();
    this._controllers.add(controller);
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      controller.abort();
    }, this.options.requestTimeoutMs ?? DEFAULTS.requestTimeoutMs);
    const headers = { "Content-Type": "application/json" };
    if (this.options.token) headers.Authorization = `Bearer ${this.options.token}`;
    try {
      let res;
      try {
        res = await fetch(url, { method: "POST", headers, body: JSON.stringify(body), signal: controller.signal });
      } catch (err) {
        if (this._closed) throw new RtcVoiceError("aborted", MESSAGES.aborted, { cause: err });
        const host = serverHost(this.server);
        throw new RtcVoiceError(
          "server_unreachable",
          timedOut
            ? `The voice server at ${host} didn't answer in time. Please try again in a moment.`
            : `Can't reach the voice server at ${host}. Check that it is running and that you are online, then try again.`,
          { cause: err },
        );
      }
      let data = null;
      try {
        data = await res.json();
      } catch {
        // not JSON: reported below
      }
      if (!res.ok) throw httpError(res.status, data, res.headers, this.server);
      if (!data || typeof data !== "object") throw new RtcVoiceError("bad_response", MESSAGES.bad_response);
      return data;
    } finally {
      clearTimeout(timer);
      this._controllers.delete(controller);
    }
  }

  async _endSession(sessionId) {
    const headers = { "Content-Type": "application/json" };
    if (this.options.token) headers.Authorization = `Bearer ${this.options.token}`;
    try {
      // keepalive: the request outlives a page that is closing.
      await fetch(joinUrl(this.server, `${API_PREFIX}/session/end`), {
        method: "POST",
        headers,
        body: JSON.stringify({ session_id: sessionId }),
        keepalive: true,
      });
    } catch {
      // The server closes sessions whose peer went away on its own.
    }
  }

  _checkAlive() {
    if (this._closed) throw new RtcVoiceError("aborted", MESSAGES.aborted);
  }

  // ---- media and events -----------------------------------------------------------------------

  _onRemoteTrack(pc, event) {
    if (pc !== this.peerConnection || event.track.kind !== "audio") return;
    const stream = event.streams[0] ?? new MediaStream([event.track]);
    this.remoteStream = stream;
    if (!this.audioElement && typeof document !== "undefined") {
      this.audioElement = document.createElement("audio");
      this.audioElement.autoplay = true;
      this.audioElement.setAttribute("playsinline", "");
    }
    if (this.audioElement) {
      this.audioElement.srcObject = stream;
      const playing = this.audioElement.play();
      if (playing && typeof playing.catch === "function") {
        playing.catch((err) => {
          if (this._closed || (err && err.name === "AbortError")) return;
          this.emit(
            "error",
            new RtcVoiceError(
              "autoplay_blocked",
              "The browser is holding back the AI's voice until you click on the page.",
              { fatal: false, cause: err },
            ),
          );
        });
      }
    }
    this.emit("track", { stream, track: event.track });
  }

  _onMessage(channel, raw) {
    if (channel !== this._channel) return;
    let event;
    try {
      event = JSON.parse(raw);
    } catch {
      return;
    }
    if (!event || typeof event !== "object" || typeof event.type !== "string") return;
    switch (event.type) {
      case "session.started":
        if (event.thread_id) this.threadId = event.thread_id;
        break;
      case "state":
        this.state = event.state;
        break;
      case "session.ended":
        this._endedReason = typeof event.reason === "string" ? event.reason : "ended";
        break;
      case "tool_call":
        if (event.client) void this._runTool(event);
        break;
      // A sound over the AI only pauses it (playback_paused): it may resume where it stopped, so
      // what is buffered here plays on; an interrupted end_of_response drops it.
      case "end_of_response":
        if (event.interrupted) this._audio?.flush();
        break;
      case "error":
        this.emit(
          "error",
          new RtcVoiceError(event.code || "server_error", event.message || "The voice server reported an error.", {
            fatal: false,
            source: "server",
            serverCode: event.code,
            turnId: event.turn_id,
          }),
        );
        this.emit("event", event);
        return;
      default:
        break;
    }
    this.emit(event.type, event);
    this.emit("event", event);
  }

  _flushPending() {
    while (this._pending.length && this._channelOpen()) this._channel.send(this._pending.shift());
  }

  // ---- failure and reconnection ---------------------------------------------------------------

  _onConnectionState(pc) {
    if (pc !== this.peerConnection || this._closed || this._reconnecting) return;
    const state = pc.connectionState;
    if (this._endedReason && (state === "failed" || state === "disconnected" || state === "closed")) {
      this._endedByServer(); // the server said it ended the call: not a network to recover
      return;
    }
    if (state === "connected") {
      clearTimeout(this._disconnectTimer);
      this._disconnectTimer = null;
    } else if (state === "failed") {
      this._transportLost("ice_failed");
    } else if (state === "disconnected" && !this._disconnectTimer) {
      // "disconnected" often heals by itself (a Wi-Fi hiccup); "failed" can take 30 s to come.
      const wait = this._reconnectOptions().disconnectedTimeoutMs;
      this._disconnectTimer = setTimeout(() => {
        this._disconnectTimer = null;
        if (pc === this.peerConnection && pc.connectionState !== "connected") this._transportLost("ice_disconnected");
      }, wait);
    }
  }

  _onChannelClosed(pc) {
    if (pc !== this.peerConnection || this._closed || this._reconnecting) return;
    if (!this._endedReason && (pc.connectionState === "failed" || pc.connectionState === "disconnected")) {
      this._transportLost("ice_failed");
      return;
    }
    // The server closed the channel on a healthy network (or said session.ended): it ended the call.
    this._endedByServer();
  }

  _endedByServer() {
    if (RECONNECT_REASONS.has(this._endedReason)) {
      // The server is going away (a deploy): the same thread continues on another node.
      const reason = this._endedReason;
      this._endedReason = null;
      this._transportLost(`server_${reason}`);
      return;
    }
    this._closed = true;
    this._teardown();
    this._setConnection("closed", { reason: "remote", serverReason: this._endedReason ?? undefined });
  }

  _onSocketClosed(ws, event) {
    if (ws !== this._socket || this._closed || this._reconnecting) return;
    if (event.code === WS_NORMAL_CLOSURE || this._endedReason) {
      // The server closed the socket on purpose: it ended the call.
      this._endedByServer();
      return;
    }
    this._transportLost("socket_closed");
  }

  _reconnectOptions() {
    const given = this.options.reconnect;
    if (given === false) return { ...DEFAULTS.reconnect, attempts: 0 };
    return { ...DEFAULTS.reconnect, ...(given && typeof given === "object" ? given : {}) };
  }

  async _transportLost(reason) {
    const { attempts, backoffMs } = this._reconnectOptions();
    const oldSession = this.sessionId;
    this._reconnecting = true;
    this._closeTransport();
    this._audio?.flush();
    if (oldSession) this._endSession(oldSession);
    if (attempts <= 0) {
      this._reconnecting = false;
      const code = this.transport === "websocket" ? "connection_lost" : "ice_failed";
      this._fail(new RtcVoiceError(code, MESSAGES[code]));
      return;
    }
    let lastError = null;
    for (let attempt = 1; attempt <= attempts && !this._closed; attempt++) {
      this._setConnection("reconnecting", { reason, attempt, attempts });
      try {
        // aiortc cannot restart ICE on a live peer, so a fresh session on the same microphone
        // (and over a WebSocket, the server's conversation went with the socket).
        await this._establish();
        if (this._closed) return;
        this._reconnecting = false;
        this._endedReason = null;
        this.state = null;
        this._setConnection("connected", { reconnected: true, attempt });
        this._flushPending();
        return;
      } catch (err) {
        lastError = err;
        const failedSession = this.sessionId;
        this._closeTransport();
        if (this._closed) return;
        if (failedSession && failedSession !== oldSession) this._endSession(failedSession);
        if (err instanceof RtcVoiceError && (err.code === "unauthorized" || err.code === "session_refused")) break;
        if (attempt < attempts) await sleep(backoffMs * attempt);
      }
    }
    this._reconnecting = false;
    if (this._closed) return;
    this._fail(
      new RtcVoiceError("connection_lost", MESSAGES.connection_lost, { cause: lastError ?? undefined }),
    );
  }

  _fail(error) {
    const sessionId = this.sessionId;
    this._closed = true;
    this.emit("error", error);
    this._teardown();
    this._setConnection("failed", { error });
    if (sessionId) this._endSession(sessionId);
  }

  _closeTransport() {
    clearTimeout(this._disconnectTimer);
    this._disconnectTimer = null;
    const pc = this.peerConnection;
    const ws = this._socket;
    const dc = ws ? null : this._channel;
    this.peerConnection = null;
    this._channel = null;
    this._socket = null;
    if (ws) {
      ws.onopen = ws.onclose = ws.onmessage = null;
      try {
        ws.close(WS_NORMAL_CLOSURE, "hangup");
      } catch {
        // already closed
      }
    }
    if (dc) {
      dc.onopen = dc.onclose = dc.onmessage = null;
      try {
        dc.close();
      } catch {
        // already closed
      }
    }
    if (pc) {
      pc.onconnectionstatechange = pc.ontrack = null;
      try {
        pc.close();
      } catch {
        // already closed
      }
    }
  }

  _stopMicrophone() {
    if (this._ownStream && this.localStream) {
      for (const track of this.localStream.getTracks()) track.stop();
    }
  }

  _teardown() {
    for (const controller of this._controllers) controller.abort();
    this._controllers.clear();
    this._closeTransport();
    this._audio?.close();
    this._stopMicrophone();
    this._pending = [];
    if (this.audioElement) this.audioElement.srcObject = null;
    globalThis.removeEventListener?.("pagehide", this._onPageHide);
  }

  _setConnection(state, extra = {}) {
    this.connectionState = state;
    this.emit("connection", { state, sessionId: this.sessionId, ...extra });
  }
}

/** A call that is not started yet: subscribe to its events, then `await call.connect()`. */
export function createCall(options = {}) {
  return new VoiceCall(options);
}

/** Start a call and resolve once it is connected (or reject with an RtcVoiceError). */
export async function connect(options = {}) {
  const call = new VoiceCall(options);
  if (options.on) {
    for (const [type, handler] of Object.entries(options.on)) {
      if (typeof handler === "function") call.on(type, handler);
    }
  }
  return call.connect();
}

// -- transcript ---------------------------------------------------------------------------------

/**
 * Folds a call's events into a transcript a UI can render: the user's words (partial while they
 * speak, replaced by the final transcript) and the AI's replies as they stream.
 */
export class Transcript {
  constructor() {
    this.entries = [];
    this._nextId = 1;
    this._listeners = new Set();
  }

  /** Follow a call; returns a function that stops following it. */
  attach(call) {
    const offs = [call.on("event", (e) => this.apply(e)), call.on("text_sent", (e) => this.apply(e))];
    return () => offs.forEach((off) => off());
  }

  /** Called with the entries after every change. */
  subscribe(listener) {
    this._listeners.add(listener);
    return () => this._listeners.delete(listener);
  }

  clear() {
    this.entries = [];
    this._changed();
  }

  /** Apply one server event (or a local `text_sent`); returns whether the transcript changed. */
  apply(event) {
    const changed = this._apply(event);
    if (changed) this._changed();
    return changed;
  }

  _apply(event) {
    switch (event?.type) {
      case "speech_started": {
        if (!this._pendingUser()) this._push({ role: "user", text: "", final: false, source: "voice" });
        return true;
      }
      case "partial_transcript": {
        const entry = this._pendingUser() ?? this._push({ role: "user", text: "", final: false, source: "voice" });
        entry.text = event.text ?? "";
        return true;
      }
      case "speech_stopped": {
        const entry = this._pendingUser();
        if (entry && event.turn_id) entry.turnId = event.turn_id;
        return !!entry;
      }
      case "final_transcript": {
        const entry =
          this.entries.find((e) => e.role === "user" && e.turnId === event.turn_id && event.turn_id) ??
          this._pendingUser();
        const text = (event.text ?? "").trim();
        if (!text || event.empty) {
          if (entry && !entry.final) this.entries.splice(this.entries.indexOf(entry), 1);
          return !!entry;
        }
        const target = entry ?? this._push({ role: "user", text: "", final: false, source: "voice" });
        Object.assign(target, { text, final: true, turnId: event.turn_id ?? target.turnId });
        if (event.continues) this._fold(event.continues, target);
        return true;
      }
      case "text_sent":
        this._push({ role: "user", text: event.text, final: true, source: "text" });
        return true;
      case "ai_text": {
        const entry = this._assistant(event.turn_id) ?? this._push(this._newAssistant(event.turn_id));
        entry.text += event.text ?? "";
        return true;
      }
      case "tool_call": {
        const args = typeof event.arguments === "string" ? event.arguments : JSON.stringify(event.arguments ?? {});
        this._push({
          role: "tool",
          text: `${event.name}(${args})`,
          final: false,
          turnId: event.turn_id,
          source: event.client ? "browser" : "server",
          toolCallId: event.id,
          tool: { name: event.name, arguments: event.arguments, ok: null, summary: "" },
        });
        return true;
      }
      case "tool_result": {
        const entry = this.entries.find((e) => e.role === "tool" && e.toolCallId === event.id);
        if (!entry) return false;
        Object.assign(entry.tool, { ok: !!event.ok, summary: event.summary ?? "" });
        entry.text += event.ok ? ` → ${event.summary ?? ""}` : ` → failed: ${event.summary ?? ""}`;
        entry.final = true;
        return true;
      }
      case "end_of_response": {
        let entry = this._assistant(event.turn_id);
        if (!entry) {
          if (!event.text) return false;
          entry = this._push({ ...this._newAssistant(event.turn_id), text: event.text });
        }
        entry.final = true;
        entry.interrupted = !!event.interrupted;
        return true;
      }
      default:
        return false;
    }
  }

  /**
   * A turn ended too early and the caller went on (`continues`): the whole sentence takes the
   * place of its first half, and the reply to the half leaves, as it leaves the AI's history.
   */
  _fold(earlyTurnId, whole) {
    const early = this.entries.find((e) => e.role === "user" && e.turnId === earlyTurnId && e !== whole);
    if (early) Object.assign(early, { text: whole.text, final: true, turnId: whole.turnId });
    this.entries = this.entries.filter(
      (e) => !(e.turnId === earlyTurnId && e.role !== "user") && !(early && e === whole),
    );
  }

  _newAssistant(turnId) {
    return { role: "assistant", text: "", final: false, turnId, interrupted: false, source: "voice" };
  }

  _pendingUser() {
    for (let i = this.entries.length - 1; i >= 0; i--) {
      const e = this.entries[i];
      if (e.role === "user" && !e.final && e.source === "voice") return e;
    }
    return null;
  }

  _assistant(turnId) {
    if (!turnId) return null;
    for (let i = this.entries.length - 1; i >= 0; i--) {
      const e = this.entries[i];
      if (e.role === "assistant" && e.turnId === turnId) return e;
    }
    return null;
  }

  _push(entry) {
    const full = { id: this._nextId++, turnId: undefined, ...entry };
    this.entries.push(full);
    return full;
  }

  _changed() {
    for (const listener of [...this._listeners]) listener(this.entries);
  }
}

// -- levels -------------------------------------------------------------------------------------

/** The loudness of a stream, 0 (silence, -60 dBFS or less) to 1 (full scale), for a level meter. */
export class LevelMeter {
  constructor(stream, options = {}) {
    const Ctx = globalThis.AudioContext ?? globalThis.webkitAudioContext;
    this.context = options.context ?? new Ctx();
    this._ownContext = !options.context;
    this._source = this.context.createMediaStreamSource(stream);
    this._analyser = this.context.createAnalyser();
    this._analyser.fftSize = 1024;
    this._source.connect(this._analyser);
    this._buffer = new Float32Array(this._analyser.fftSize);
    this._floorDb = options.floorDb ?? -60;
  }

  level() {
    this._analyser.getFloatTimeDomainData(this._buffer);
    let sum = 0;
    for (const x of this._buffer) sum += x * x;
    const rms = Math.sqrt(sum / this._buffer.length);
    if (rms <= 0) return 0;
    const db = 20 * Math.log10(rms);
    return Math.min(1, Math.max(0, (db - this._floorDb) / -this._floorDb));
  }

  close() {
    try {
      this._source.disconnect();
    } catch {
      // already disconnected
    }
    if (this._ownContext) this.context.close();
  }
}
