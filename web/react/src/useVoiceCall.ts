// useVoiceCall: one rtcvoice call as React state.
//
//   const voice = useVoiceCall({ server: "https://voice.example.com", token });
//   <button onClick={voice.open}>Talk</button>
//   <VoiceCallModal call={voice} />
//
// The hook owns the call: open() shows the UI and starts it, close() hangs up and hides it,
// unmounting hangs up. onEvent sees every server event (dispatch them into Redux, see
// voiceSlice.ts); the returned fields cover what a call UI usually shows.

import { useCallback, useEffect, useRef, useState } from "react";
import {
  Transcript,
  createCall,
  type AiState,
  type ConnectOptions,
  type ConnectionState,
  type MetricsEvent,
  type RtcVoiceError,
  type ServerEvent,
  type SessionUpdate,
  type ToolCallEvent,
  type TranscriptEntry,
  type Transport,
  type VoiceCall,
} from "../../rtcvoice.js";

export interface UseVoiceCallOptions extends Omit<ConnectOptions, "on"> {
  /** open() also starts the call (default true); otherwise call start() yourself. */
  autoStart?: boolean;
  /** Every server event, as it arrives. */
  onEvent?: (event: ServerEvent) => void;
  /** Every error (fatal ones end the call; the hook's `error` holds the last one). */
  onError?: (error: RtcVoiceError) => void;
  /**
   * Every tool the AI calls (those this page runs, given in `tools`, are run and answered for you;
   * this is to show them, or to dispatch them into Redux).
   */
  onToolCall?: (event: ToolCallEvent) => void;
}

export interface VoiceCallState {
  isOpen: boolean;
  status: ConnectionState;
  isConnecting: boolean;
  isConnected: boolean;
  isReconnecting: boolean;
  isMuted: boolean;
  /** listening, thinking or speaking, while connected. */
  aiState: AiState | null;
  /** What the user said last: partial while they speak, then final. */
  transcript: string;
  /** The AI's latest reply, growing while it streams. */
  aiResponse: string;
  /** The whole conversation of this call. */
  entries: TranscriptEntry[];
  lastMetrics: MetricsEvent | null;
  error: RtcVoiceError | null;
  sessionId: string | null;
  /** "webrtc", or "websocket" where the browser has no WebRTC (or it was asked for); null before connecting. */
  transport: Transport | null;
}

export interface UseVoiceCall extends VoiceCallState {
  open(): void;
  close(): Promise<void>;
  start(): Promise<void>;
  end(): Promise<void>;
  toggleMute(): void;
  sendText(text: string): void;
  interrupt(): void;
  updateSession(update: SessionUpdate): void;
  /** The underlying call, for anything the hook does not cover (null when there is none). */
  call: VoiceCall | null;
}

const INITIAL: VoiceCallState = {
  isOpen: false,
  status: "idle",
  isConnecting: false,
  isConnected: false,
  isReconnecting: false,
  isMuted: false,
  aiState: null,
  transcript: "",
  aiResponse: "",
  entries: [],
  lastMetrics: null,
  error: null,
  sessionId: null,
  transport: null,
};

function lastText(entries: TranscriptEntry[], role: TranscriptEntry["role"]): string {
  for (let i = entries.length - 1; i >= 0; i--) {
    const entry = entries[i];
    if (entry && entry.role === role) return entry.text;
  }
  return "";
}

export function useVoiceCall(options: UseVoiceCallOptions = {}): UseVoiceCall {
  const [state, setState] = useState<VoiceCallState>(INITIAL);
  const callRef = useRef<VoiceCall | null>(null);
  // The latest options, so callbacks keep a stable identity while props change.
  const optionsRef = useRef(options);
  optionsRef.current = options;

  const update = useCallback((patch: Partial<VoiceCallState>) => {
    setState((previous) => ({ ...previous, ...patch }));
  }, []);

  const start = useCallback(async () => {
    if (callRef.current) return;
    const { autoStart: _autoStart, onEvent, onError, onToolCall, ...connectOptions } = optionsRef.current;
    const call = createCall(connectOptions);
    callRef.current = call;
    const transcript = new Transcript();
    transcript.attach(call);
    transcript.subscribe((entries) => {
      const copy = entries.map((entry) => ({ ...entry }));
      update({ entries: copy, transcript: lastText(copy, "user"), aiResponse: lastText(copy, "assistant") });
    });
    update({ ...INITIAL, isOpen: true, status: "connecting", isConnecting: true });

    call.on("connection", (event) => {
      if (callRef.current !== call) return;
      const over = event.state === "closed" || event.state === "failed";
      update({
        status: event.state,
        isConnecting: event.state === "connecting",
        isConnected: event.state === "connected",
        isReconnecting: event.state === "reconnecting",
        sessionId: event.sessionId,
        transport: call.transport,
        aiState: over ? null : call.state,
      });
      if (over) callRef.current = null;
    });
    call.on("state", (event) => update({ aiState: event.state }));
    call.on("mute", (event) => update({ isMuted: event.muted }));
    call.on("metrics", (event) => update({ lastMetrics: event }));
    call.on("event", (event) => onEvent?.(event));
    call.on("tool_call", (event) => onToolCall?.(event));
    call.on("error", (error) => {
      if (error.fatal || error.source === "server") update({ error });
      onError?.(error);
    });

    try {
      await call.connect();
    } catch {
      // Already in `error` and `status`.
    }
  }, [update]);

  const end = useCallback(async () => {
    const call = callRef.current;
    callRef.current = null;
    if (call) await call.hangUp();
    update({ status: "closed", isConnecting: false, isConnected: false, isReconnecting: false, aiState: null });
  }, [update]);

  const open = useCallback(() => {
    update({ isOpen: true });
    if (optionsRef.current.autoStart !== false) void start();
  }, [start, update]);

  const close = useCallback(async () => {
    update({ isOpen: false });
    await end();
  }, [end, update]);

  const toggleMute = useCallback(() => {
    callRef.current?.toggleMute();
  }, []);

  const sendText = useCallback((text: string) => {
    callRef.current?.sendText(text);
  }, []);

  const interrupt = useCallback(() => {
    callRef.current?.interrupt();
  }, []);

  const updateSession = useCallback((patch: SessionUpdate) => {
    callRef.current?.updateSession(patch);
  }, []);

  // Unmounting hangs up, so a closed screen never leaves a live microphone behind.
  useEffect(
    () => () => {
      const call = callRef.current;
      callRef.current = null;
      void call?.hangUp();
    },
    [],
  );

  return {
    ...state,
    open,
    close,
    start,
    end,
    toggleMute,
    sendText,
    interrupt,
    updateSession,
    call: callRef.current,
  };
}
