// VoiceCallModal: a ready-made call dialog driven by useVoiceCall.
//
//   const voice = useVoiceCall({ server, token });
//   return (
//     <>
//       <button onClick={voice.open}>Talk to the assistant</button>
//       <VoiceCallModal call={voice} title="Assistant" />
//     </>
//   );
//
// Unstyled on purpose apart from the overlay: class names (rtcvoice-*) are yours to style.

import { useState, type CSSProperties, type FormEvent, type ReactElement } from "react";
import type { AiState, ConnectionState } from "../../rtcvoice.js";
import type { UseVoiceCall } from "./useVoiceCall.js";

export interface VoiceCallModalProps {
  call: UseVoiceCall;
  title?: string;
  /** Show the text box for typing instead of speaking (default true). */
  allowTyping?: boolean;
}

const overlay: CSSProperties = {
  position: "fixed",
  inset: 0,
  background: "rgba(0, 0, 0, 0.45)",
  display: "flex",
  alignItems: "center",
  justifyContent: "center",
  padding: 16,
  zIndex: 1000,
};

const dialog: CSSProperties = {
  background: "white",
  color: "#111",
  borderRadius: 16,
  padding: 20,
  width: "min(440px, 100%)",
  maxHeight: "90vh",
  overflowY: "auto",
};

export function statusLabel(status: ConnectionState, aiState: AiState | null): string {
  switch (status) {
    case "idle":
      return "Ready";
    case "connecting":
      return "Connecting…";
    case "reconnecting":
      return "Reconnecting…";
    case "closed":
      return "Call ended";
    case "failed":
      return "Not connected";
    case "connected":
      return aiState === "thinking" ? "Thinking…" : aiState === "speaking" ? "Speaking" : "Listening";
  }
}

export function VoiceCallModal({ call, title = "Voice call", allowTyping = true }: VoiceCallModalProps): ReactElement | null {
  const [draft, setDraft] = useState("");
  if (!call.isOpen) return null;

  const submit = (event: FormEvent<HTMLFormElement>) => {
    event.preventDefault();
    const text = draft.trim();
    if (!text || !call.isConnected) return;
    call.sendText(text);
    setDraft("");
  };
  const live = call.isConnected || call.isConnecting || call.isReconnecting;

  return (
    <div className="rtcvoice-overlay" style={overlay} onClick={() => void call.close()}>
      <div
        className="rtcvoice-modal"
        style={dialog}
        role="dialog"
        aria-modal="true"
        aria-labelledby="rtcvoice-modal-title"
        onClick={(event) => event.stopPropagation()}
        onKeyDown={(event) => {
          if (event.key === "Escape") void call.close();
        }}
      >
        <h2 id="rtcvoice-modal-title">{title}</h2>
        <p className="rtcvoice-status" role="status" data-state={call.aiState ?? call.status}>
          {statusLabel(call.status, call.aiState)}
          {call.isConnected && call.transport === "websocket" ? (
            <small className="rtcvoice-transport" title="This browser has no WebRTC (or it was turned off): the audio goes over a WebSocket.">
              {" "}
              · via WebSocket
            </small>
          ) : null}
        </p>

        {call.error ? (
          <p className="rtcvoice-error" role="alert">
            {call.error.message}
          </p>
        ) : null}

        <ol className="rtcvoice-transcript" aria-live="polite">
          {call.entries.map((entry) => (
            <li
              key={entry.id}
              className={`rtcvoice-entry ${entry.role}${entry.final ? "" : " pending"}`}
              style={entry.final ? undefined : { opacity: 0.6, fontStyle: "italic" }}
            >
              <strong>{entry.role === "user" ? "You" : entry.role === "tool" ? "Tool" : "AI"}: </strong>
              {entry.text || "…"}
              {entry.interrupted ? " (interrupted)" : null}
            </li>
          ))}
        </ol>

        {call.lastMetrics?.voice_to_voice != null ? (
          <p className="rtcvoice-latency">Answered in {Math.round(call.lastMetrics.voice_to_voice)} ms</p>
        ) : null}

        {allowTyping ? (
          <form className="rtcvoice-text" onSubmit={submit}>
            <input
              value={draft}
              onChange={(event) => setDraft(event.target.value)}
              placeholder="Type instead of speaking"
              disabled={!call.isConnected}
              aria-label="Message"
            />
            <button type="submit" disabled={!call.isConnected || !draft.trim()}>
              Send
            </button>
          </form>
        ) : null}

        <div className="rtcvoice-controls">
          {live ? (
            <>
              <button type="button" onClick={call.toggleMute} disabled={!call.isConnected} aria-pressed={call.isMuted}>
                {call.isMuted ? "Unmute" : "Mute"}
              </button>
              <button type="button" onClick={call.interrupt} disabled={call.aiState !== "speaking"}>
                Stop talking
              </button>
              <button type="button" onClick={() => void call.end()}>
                Hang up
              </button>
            </>
          ) : (
            <button type="button" onClick={() => void call.start()}>
              {call.status === "failed" ? "Try again" : "Start call"}
            </button>
          )}
          <button type="button" onClick={() => void call.close()}>
            Close
          </button>
        </div>
      </div>
    </div>
  );
}
