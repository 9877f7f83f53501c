// How the pieces fit in an app with a Redux store (type-checked with the rest; not bundled).

import { configureStore } from "@reduxjs/toolkit";
import type { ReactElement } from "react";
import { VoiceCallModal } from "./VoiceCallModal.js";
import { useVoiceCall } from "./useVoiceCall.js";
import voiceReducer, { voiceCallEnded, voiceEvent } from "./voiceSlice.js";

export const store = configureStore({ reducer: { voice: voiceReducer } });
export type RootState = ReturnType<typeof store.getState>;

export function ExampleApp({ server, token }: { server: string; token?: string }): ReactElement {
  const voice = useVoiceCall({
    server,
    ...(token ? { token } : {}),
    session: { instructions: "You are the support assistant of Example Inc. Keep answers short." },
    onEvent: (event) => store.dispatch(voiceEvent(event)),
    onError: (error) => {
      if (error.fatal) store.dispatch(voiceCallEnded());
    },
  });
  return (
    <>
      <button type="button" onClick={voice.open} disabled={voice.isConnecting}>
        {voice.isConnected ? "In a call…" : "Talk to support"}
      </button>
      <VoiceCallModal call={voice} title="Example Inc. support" />
    </>
  );
}
