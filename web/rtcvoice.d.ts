// Types for rtcvoice.js, the browser client of an rtcvoice server.
// Server events are JSON objects with a `type`; every one carries `session_id`, turn events
// carry `turn_id`. Field names follow the server (snake_case).

export declare const VERSION: string;
/** The HTTP API's prefix: "/api/v1/voice". */
export declare const API_PREFIX: string;

// ---- server events ------------------------------------------------------------------------------

export type AiState = "listening" | "thinking" | "speaking";

export interface ServerEventBase {
  type: string;
  session_id: string;
  turn_id?: string;
}

/** How audio travels on a transport: the WebSocket's binary frames, or Opus over WebRTC. */
export interface AudioFormat {
  /** "pcm16" (raw little-endian samples), "wav" (each frame a whole WAV file) or "opus". */
  format: string;
  sample_rate: number;
  encoding?: string;
  channels?: number;
  /** Length of each binary frame of the AI's voice, in ms. */
  frame_ms?: number;
}

export interface SessionStartedEvent extends ServerEventBase {
  type: "session.started";
  /** null until the call's first message makes its thread (see `thread.updated`). */
  thread_id: string | null;
  agent: string;
  /** The model the session asked for; null for the server's own. */
  model: string | null;
  stt: string;
  /** null on a text-only session (the client speaks the replies itself). */
  tts: string | null;
  voice: string;
  language: string;
  /** What the client sends. */
  input_audio: AudioFormat;
  /** What the client receives; null on a text-only session. */
  output_audio: AudioFormat | null;
}

/** The server is ending the call (its connection closes next). */
export interface SessionEndedEvent extends ServerEventBase {
  type: "session.ended";
  /**
   * A code: "client_hangup", "max_call_length", "idle", "peer_timeout", "server_shutdown",
   * "websocket_closed", ...
   */
  reason: string;
}

export interface SessionUpdatedEvent extends ServerEventBase {
  type: "session.updated";
  voice: string;
  language: string;
  speed: number;
  model: string | null;
  temperature: number | null;
  max_tokens: number | null;
  /** The caller's IANA time zone, for the current_time tool; null for the server's. */
  timezone: string | null;
}

/** The AI calls a tool (README "Tools"). `client`: this page runs it (a tool given in `tools`). */
export interface ToolCallEvent extends ServerEventBase {
  type: "tool_call";
  id: string;
  name: string;
  /** The model's arguments (the raw text where they were not JSON). */
  arguments: Record<string, unknown> | string;
  client: boolean;
}

/** A tool call's outcome: `summary` is the start of its result, the error, or "cancelled". */
export interface ToolResultEvent extends ServerEventBase {
  type: "tool_result";
  id: string;
  name: string;
  ok: boolean;
  summary: string;
}

/** A tool this page runs for the AI. */
export interface BrowserTool {
  description?: string;
  /** JSON schema of the arguments object (default: no arguments). */
  parameters?: Record<string, unknown>;
  /** Its result (any JSON) goes to the AI; an error thrown is reported to it instead. */
  run(args: Record<string, unknown>, context: { id: string; call: VoiceCall }): unknown;
}

export interface StateEvent extends ServerEventBase {
  type: "state";
  state: AiState;
}

export interface SpeechStartedEvent extends ServerEventBase {
  type: "speech_started";
}

export interface SpeechStoppedEvent extends ServerEventBase {
  type: "speech_stopped";
  turn_id: string;
}

/** What the user is saying, while they say it; replaced by `final_transcript`. */
export interface PartialTranscriptEvent extends ServerEventBase {
  type: "partial_transcript";
  text: string;
}

export interface FinalTranscriptEvent extends ServerEventBase {
  type: "final_transcript";
  turn_id: string;
  text: string;
  /** The stored message (null if it could not be stored). */
  message_id?: string | null;
  /** True when the speech turned out to be noise: nothing is answered. */
  empty?: boolean;
  /**
   * The turn this one completes: it ended too early (the caller paused mid-sentence), the caller
   * went on speaking within `rejoin_ms`, its reply was dropped, and this transcript holds both halves.
   * `Transcript` folds it: this text takes the first half's place, and the dropped reply leaves.
   */
  continues?: string;
}

/**
 * The caller made a sound while the AI was thinking or speaking: its voice is held (silence plays)
 * while the server judges whether the sound was meant to interrupt. `playback_resumed` or an
 * interrupted `end_of_response` follows. On WebSocket transports up to the send lead (0.2 s) of
 * audio already sent still plays.
 */
export interface PlaybackPausedEvent extends ServerEventBase {
  type: "playback_paused";
  turn_id: string;
}

/** The sound was a cough, a click or a backchannel ("mm-hmm"): the reply goes on where it stopped. */
export interface PlaybackResumedEvent extends ServerEventBase {
  type: "playback_resumed";
  turn_id: string;
  /** What the sound was transcribed as ("" for no words). */
  heard: string;
}

/** A piece (delta) of the AI's reply, as the model streams it. */
export interface AiTextEvent extends ServerEventBase {
  type: "ai_text";
  turn_id: string;
  text: string;
  /** Said while a slow tool runs ("One moment."), not written by the model. */
  filler?: boolean;
}

export interface EndOfResponseEvent extends ServerEventBase {
  type: "end_of_response";
  turn_id: string;
  interrupted: boolean;
  /** The whole reply as generated (an interrupted one was not all heard). */
  text: string;
  /** The stored reply: what the caller heard of it (null if nothing was stored). */
  message_id: string | null;
  /** Tokens the reply cost, where the agent reports them. */
  usage: { input_tokens: number; output_tokens: number; total_tokens: number } | null;
}

/** Per-turn latency in milliseconds; null where a stage did not happen (a typed turn has no STT). */
export interface MetricsEvent extends ServerEventBase {
  type: "metrics";
  turn_id: string;
  /** The caller's last speech to the end-of-turn decision. */
  end_of_turn: number | null;
  /** Turn end to transcript. */
  stt: number | null;
  /** Agent start to its first token. */
  llm_first_token: number | null;
  /** Agent start until the first piece (a sentence, clause or long sentence's first phrase) is ready to speak. */
  llm_first_sentence: number | null;
  /** First sentence handed to TTS until its audio is queued. */
  tts_first_audio: number | null;
  /** The caller's last speech (as the server received it) to the first reply sample sent. */
  voice_to_voice: number | null;
  /**
   * First audio ready minus turn end, floored at 0: the STT + LLM + TTS time that speculation
   * during the end-of-turn silence did not hide.
   */
  compute_after_turn_end?: number | null;
  /** Time that is neither the configured silence nor STT/LLM/TTS (VAD, queueing, pacing). */
  server_overhead?: number | null;
  /** The turn's work started during the end-of-turn silence, before the turn ended. */
  speculative?: boolean;
  /**
   * The silence that ended the turn (ms), as the turn policy chose it from what was said (shorter
   * after a finished sentence, longer inside an unfinished one); null when the client or a length
   * limit ended it.
   */
  end_of_turn_silence?: number | null;
  /** Why that silence: "finished", "unfinished", "unsure", "question", "silence" or "no_words". */
  end_of_turn_reason?: string | null;
  /** The end-of-turn models' P(the caller was done), for turn_policy=semantic. */
  end_of_turn_probability?: number | null;
  /** Older servers: the transcript was started during the silence. */
  speculative_stt?: boolean;
}

export interface ServerErrorEvent extends ServerEventBase {
  type: "error";
  code: string;
  message: string;
}

export interface PongEvent extends ServerEventBase {
  type: "pong";
  id?: unknown;
  t?: unknown;
}

export type ServerEvent =
  | SessionStartedEvent
  | SessionEndedEvent
  | SessionUpdatedEvent
  | StateEvent
  | SpeechStartedEvent
  | SpeechStoppedEvent
  | PartialTranscriptEvent
  | FinalTranscriptEvent
  | AiTextEvent
  | EndOfResponseEvent
  | PlaybackPausedEvent
  | PlaybackResumedEvent
  | MetricsEvent
  | ServerErrorEvent
  | ToolCallEvent
  | ToolResultEvent
  | PongEvent;

// ---- client events ------------------------------------------------------------------------------

export interface SessionUpdate {
  voice?: string;
  instructions?: string;
  language?: string;
  /** 0.5 to 2.0 */
  speed?: number;
  /** IANA name ("Europe/Paris"): where the caller is, for the current_time tool. */
  timezone?: string;
}

export type ClientEvent =
  | { type: "text_message"; content: string }
  | { type: "interrupt" }
  | ({ type: "session.update" } & SessionUpdate)
  | { type: "ping"; id?: number; t?: number }
  /** Push-to-talk: the user is done, end the turn without waiting for the silence. */
  | { type: "end_of_input" }
  /** Carry on in another thread (its history becomes the conversation's). */
  | { type: "set_thread"; thread_id: string }
  /** The answer to a tool_call with `client: true` (sent for you for the tools given in `tools`). */
  | { type: "tool_result"; id: string; result?: unknown; error?: string };

// ---- errors -------------------------------------------------------------------------------------

export type ErrorCode =
  /**
   * No RTCPeerConnection here and no WebSocket/AudioContext to fall back on (or
   * `transport: "webrtc"` in a browser without WebRTC).
   */
  | "webrtc_unavailable"
  /** The page is not https:// or localhost, so the browser hides the microphone. */
  | "insecure_context"
  | "microphone_unsupported"
  | "microphone_denied"
  | "microphone_not_found"
  | "microphone_in_use"
  /** The server could not be reached (down, wrong address, offline, CORS) or did not answer in time. */
  | "server_unreachable"
  /** HTTP 503/429 from the server: at its call limit; see `retryAfter`. */
  | "server_busy"
  | "unauthorized"
  /** Another 4xx from the server; `serverCode` and the message say why. */
  | "session_refused"
  | "server_error"
  | "bad_response"
  /** ICE did not connect (or failed with reconnection off). */
  | "ice_failed"
  /** ICE failed (or the WebSocket dropped) mid-call and every reconnection attempt failed too. */
  | "connection_lost"
  /** The WebSocket transport could not connect (refused upgrade, a proxy that blocks WebSockets, timeout). */
  | "websocket_failed"
  | "autoplay_blocked"
  | "aborted"
  | "already_started"
  | "invalid_text"
  | "timeout"
  | "internal_error"
  /** Errors the server sends on the data channel keep its code (e.g. "agent_timeout"). */
  | (string & {});

/**
 * Float audio at any rate in, PCM16 frames at `outputRate` out (a windowed-sinc low-pass then
 * polyphase resampling). `onFrame` gets each full frame; it may transfer its buffer.
 */
export declare class PcmDownsampler {
  constructor(inputRate: number, outputRate: number, frameSamples: number, onFrame: (frame: Int16Array) => void);
  push(input: Float32Array): void;
}

export declare class RtcVoiceError extends Error {
  constructor(
    code: ErrorCode,
    message: string,
    details?: {
      fatal?: boolean;
      source?: "client" | "server";
      status?: number;
      serverCode?: string;
      retryAfter?: number;
      turnId?: string;
      cause?: unknown;
    },
  );
  readonly name: "RtcVoiceError";
  readonly code: ErrorCode;
  /** A message a person can act on. */
  readonly message: string;
  /** True when the call is over because of it. Errors the server reports mid-call are not fatal. */
  readonly fatal: boolean;
  readonly source: "client" | "server";
  /** HTTP status, for errors from the signaling API. */
  readonly status?: number;
  /** The server's own error code (HTTP `error.code` or the data channel event's `code`). */
  readonly serverCode?: string;
  /** Seconds, from the server's Retry-After. */
  readonly retryAfter?: number;
  readonly turnId?: string;
}

// ---- connecting ---------------------------------------------------------------------------------

export type ConnectionState = "idle" | "connecting" | "connected" | "reconnecting" | "closed" | "failed";

export interface ConnectionEvent {
  state: ConnectionState;
  sessionId: string | null;
  /**
   * "hangup" or "remote" (the server ended the call) when closed; the cause while reconnecting
   * ("ice_failed", "ice_disconnected", "socket_closed" for the WebSocket transport, or "server_drain":
   * the server is shutting down for a deploy, and the call continues on the same thread elsewhere).
   */
  reason?: string;
  /** With reason "remote": the server's `session.ended` reason, when it said one. */
  serverReason?: string;
  attempt?: number;
  attempts?: number;
  reconnected?: boolean;
  error?: RtcVoiceError;
}

export interface ReconnectOptions {
  /** Fresh sessions to try after ICE fails (or the WebSocket drops) mid-call (default 3; 0 turns reconnection off). */
  attempts?: number;
  /** Wait before attempt n is n times this (default 1000 ms). */
  backoffMs?: number;
  /** How long "disconnected" may last before it counts as failed (default 4000 ms). */
  disconnectedTimeoutMs?: number;
}

export type Transport = "webrtc" | "websocket";
export type TransportOption = "auto" | Transport;

/** Counters of a WebSocket call's audio (`VoiceCall.websocketStats`). */
export interface WebSocketStats {
  /** Microphone frames sent (20 ms of 16 kHz PCM16 each) and their length in seconds. */
  framesSent: number;
  secondsSent: number;
  /** Microphone frames dropped because the socket could not keep up. */
  framesDropped: number;
  /** The AI's voice: binary frames received and their length in seconds. */
  framesReceived: number;
  secondsReceived: number;
  /** Seconds of the AI's voice played to the end (flushed audio is not counted). */
  secondsPlayed: number;
  /** Seconds scheduled but not played yet. */
  bufferedSeconds: number;
  /** Times buffered audio was dropped: barge-in, `interrupt()`, reconnection. */
  flushes: number;
  /** Times playback ran dry mid-reply and restarted. */
  underruns: number;
  /** The AudioContext's state ("suspended" while the browser blocks autoplay). */
  contextState: AudioContextState;
}

export interface ConnectOptions {
  /** The server's base URL, e.g. "https://voice.example.com" (default: this page's origin). */
  server?: string;
  /** Sent as `Authorization: Bearer <token>` on every HTTP request. */
  token?: string;
  /** Overrides the ICE servers the server suggests in its session/start answer. */
  iceServers?: RTCIceServer[];
  /** "relay" forces media through a TURN server (which iceServers or the server must provide). */
  iceTransportPolicy?: RTCIceTransportPolicy;
  /** Sent to POST /session/start. */
  session?: { thread_id?: string; voice?: string; instructions?: string; [key: string]: unknown };
  /**
   * Microphone constraints merged over the defaults (echoCancellation, noiseSuppression and
   * autoGainControl on, mono), or a MediaStream you opened yourself (it is not stopped on hang-up).
   */
  audio?: MediaTrackConstraints | MediaStream;
  /** false: a listen-only call (type with sendText, hear the answers). Default true. */
  microphone?: boolean;
  /**
   * Where the AI's voice plays (default: a detached <audio autoplay> element on WebRTC, the
   * AudioContext's speakers on the WebSocket transport).
   */
  audioElement?: HTMLAudioElement;
  /**
   * "auto" (default): WebRTC where the browser has it, otherwise the server's WebSocket
   * transport (PCM audio over a WebSocket; the same events, meters, mute and interrupt).
   * "websocket" uses the WebSocket even where WebRTC works; "webrtc" never falls back.
   */
  transport?: TransportOption;
  /** Reconnection after ICE fails (or the WebSocket drops) mid-call; false turns it off. */
  reconnect?: boolean | ReconnectOptions;
  /** From the offer (or opening the WebSocket) until the call is up (default 20000 ms); then `ice_failed` (`websocket_failed`). */
  connectTimeoutMs?: number;
  /** Per HTTP request (default 15000 ms). */
  requestTimeoutMs?: number;
  /** The longest wait for ICE candidates before the offer is sent anyway (default 4000 ms). */
  iceGatheringTimeoutMs?: number;
  /** Hang up when the page is closed or navigated away (default true). */
  endOnPageHide?: boolean;
  /** Tools this page runs for the AI, by name (README "Tools"); see also `setTools`. */
  tools?: Record<string, BrowserTool>;
  /** Handlers subscribed before connecting (for `connect()`, which resolves only once connected). */
  on?: { [K in keyof VoiceCallEvents]?: (event: VoiceCallEvents[K]) => void };
}

export interface TextSentEvent {
  type: "text_sent";
  text: string;
}

export interface VoiceCallEvents {
  connection: ConnectionEvent;
  /** Every error: the client's (fatal ones end the call) and those the server reports. */
  error: RtcVoiceError;
  /** Every server event, whatever its type. */
  event: ServerEvent;
  "session.started": SessionStartedEvent;
  "session.ended": SessionEndedEvent;
  "session.updated": SessionUpdatedEvent;
  state: StateEvent;
  speech_started: SpeechStartedEvent;
  speech_stopped: SpeechStoppedEvent;
  partial_transcript: PartialTranscriptEvent;
  final_transcript: FinalTranscriptEvent;
  ai_text: AiTextEvent;
  end_of_response: EndOfResponseEvent;
  playback_paused: PlaybackPausedEvent;
  playback_resumed: PlaybackResumedEvent;
  metrics: MetricsEvent;
  pong: PongEvent;
  tool_call: ToolCallEvent;
  tool_result: ToolResultEvent;
  /**
   * The AI's audio arrived (again after a reconnection): for level meters or recording. On the
   * WebSocket transport the stream is the played PCM, from the call's AudioContext.
   */
  track: { stream: MediaStream; track: MediaStreamTrack };
  mute: { muted: boolean };
  text_sent: TextSentEvent;
}

export type Unsubscribe = () => void;

export declare class VoiceCall {
  constructor(options?: ConnectOptions);
  readonly options: ConnectOptions;
  readonly server: string;
  readonly sessionId: string | null;
  readonly threadId: string | null;
  readonly connectionState: ConnectionState;
  /** The AI's state from the last `state` event (null before the first one). */
  readonly state: AiState | null;
  readonly muted: boolean;
  readonly localStream: MediaStream | null;
  readonly remoteStream: MediaStream | null;
  /** Null on the WebSocket transport. */
  readonly peerConnection: RTCPeerConnection | null;
  /** Which transport carries the call, once connecting has begun. */
  readonly transport: Transport | null;
  readonly audioElement: HTMLAudioElement | null;
  /** The WebSocket transport's audio counters; null on WebRTC calls. */
  readonly websocketStats: WebSocketStats | null;

  /** Ask for the microphone, start a session and connect; rejects with the error also emitted as `error`. */
  connect(): Promise<this>;
  on<K extends keyof VoiceCallEvents>(type: K, handler: (event: VoiceCallEvents[K]) => void): Unsubscribe;
  off<K extends keyof VoiceCallEvents>(type: K, handler: (event: VoiceCallEvents[K]) => void): void;
  once<K extends keyof VoiceCallEvents>(type: K, handler: (event: VoiceCallEvents[K]) => void): Unsubscribe;
  mute(): void;
  unmute(): void;
  /** Returns the new muted state. */
  toggleMute(): boolean;
  setMuted(muted: boolean): void;
  /** Stop the AI mid-sentence. */
  interrupt(): void;
  /** Type instead of speaking: the AI answers it like speech. */
  sendText(text: string): void;
  /** Kept across reconnections. */
  updateSession(update: SessionUpdate): void;
  /** Replace the tools this page runs for the AI (sent to the server at once). */
  setTools(tools: Record<string, BrowserTool>): void;
  /** Event channel (data channel or WebSocket) round trip in ms. */
  ping(timeoutMs?: number): Promise<number>;
  /** Any client event; queued (up to 50) while connecting or reconnecting. Returns whether it was sent now. */
  send(event: ClientEvent): boolean;
  hangUp(): Promise<void>;
  /** The peer connection's statistics; null on the WebSocket transport (see `websocketStats`). */
  getStats(): Promise<RTCStatsReport | null>;
  /** Retry playback after an `autoplay_blocked` error; call it from a click handler. */
  resumeAudio(): Promise<void>;
}

/** A call that is not started yet: subscribe to its events, then `await call.connect()`. */
export declare function createCall(options?: ConnectOptions): VoiceCall;

/** Start a call; resolves once connected, rejects with an RtcVoiceError. */
export declare function connect(options?: ConnectOptions): Promise<VoiceCall>;

export interface Support {
  webrtc: boolean;
  microphone: boolean;
  secureContext: boolean;
  websocket: boolean;
}

export declare function checkSupport(): Support;

export interface Voice {
  id: string;
  name: string;
  gender: string;
  language: string;
  engine?: string;
  online?: boolean;
}

/** GET /api/v1/voice/voices. */
export declare function fetchVoices(options?: {
  server?: string;
  token?: string;
  signal?: AbortSignal;
}): Promise<{ voices: Voice[]; default: string | null }>;

// ---- transcript ---------------------------------------------------------------------------------

export interface TranscriptEntry {
  /** Stable, for list keys. */
  id: number;
  /** "tool": a tool the AI called, with its result once it came (`tool`). */
  role: "user" | "assistant" | "tool";
  text: string;
  /** false while the user is still speaking (a partial) or the AI is still answering. */
  final: boolean;
  turnId?: string;
  /** "text" for what the user typed; for a tool, "browser" (this page ran it) or "server". */
  source: "voice" | "text" | "browser" | "server";
  /** A tool entry's call: its arguments, then whether it worked and the start of its result. */
  tool?: { name: string; arguments: unknown; ok: boolean | null; summary: string };
  toolCallId?: string;
  /** The user talked over (or stopped) this reply. */
  interrupted?: boolean;
}

export declare class Transcript {
  constructor();
  readonly entries: TranscriptEntry[];
  /** Follow a call's events; returns a function that stops following it. */
  attach(call: VoiceCall): Unsubscribe;
  /** Called with the entries after every change. */
  subscribe(listener: (entries: TranscriptEntry[]) => void): Unsubscribe;
  /** Apply one server event or a `text_sent`; returns whether anything changed. */
  apply(event: ServerEvent | TextSentEvent): boolean;
  clear(): void;
}

// ---- levels -------------------------------------------------------------------------------------

export declare class LevelMeter {
  constructor(stream: MediaStream, options?: { context?: AudioContext; floorDb?: number });
  readonly context: AudioContext;
  /** 0 (at or below floorDb, default -60 dBFS) to 1 (full scale). */
  level(): number;
  /** Disconnects; closes the AudioContext if the meter made it. */
  close(): void;
}
