// A Redux Toolkit slice fed by rtcvoice events, for apps that keep the call in their store:
//
//   const voice = useVoiceCall({ server, token, onEvent: (e) => dispatch(voiceEvent(e)) });
//
// The slice keeps what other screens usually read (is a call live, the last thing said, the
// AI's last reply, latency); the hook keeps the rest.

import { createSlice, type PayloadAction } from "@reduxjs/toolkit";
import type { AiState, MetricsEvent, ServerEvent } from "../../rtcvoice.js";

export interface VoiceState {
  sessionId: string | null;
  aiState: AiState | null;
  transcript: string;
  aiResponse: string;
  turns: number;
  lastMetrics: MetricsEvent | null;
  lastError: { code: string; message: string } | null;
}

const initialState: VoiceState = {
  sessionId: null,
  aiState: null,
  transcript: "",
  aiResponse: "",
  turns: 0,
  lastMetrics: null,
  lastError: null,
};

export const voiceSlice = createSlice({
  name: "voice",
  initialState,
  reducers: {
    voiceEvent(state, action: PayloadAction<ServerEvent>) {
      const event = action.payload;
      switch (event.type) {
        case "session.started":
          return { ...initialState, sessionId: event.session_id };
        case "state":
          state.aiState = event.state;
          break;
        case "partial_transcript":
          state.transcript = event.text;
          break;
        case "final_transcript":
          state.transcript = event.text;
          state.aiResponse = "";
          break;
        case "ai_text":
          state.aiResponse += event.text;
          break;
        case "end_of_response":
          state.turns += 1;
          break;
        case "metrics":
          state.lastMetrics = event;
          break;
        case "error":
          state.lastError = { code: event.code, message: event.message };
          break;
        default:
          break;
      }
      return undefined;
    },
    voiceCallEnded() {
      return initialState;
    },
  },
});

export const { voiceEvent, voiceCallEnded } = voiceSlice.actions;
export default voiceSlice.reducer;
