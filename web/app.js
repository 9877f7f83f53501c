// The call page served at "/": a thin UI over rtcvoice.js (no framework, no build step).
//
// ?server=https://voice.example.com points the page at another rtcvoice server (that server
// must then allow this page's origin). ?transport=websocket makes the call over the server's
// WebSocket transport even where WebRTC works (?transport=webrtc: never fall back).

import { LevelMeter, Transcript, checkSupport, createCall, fetchVoices } from "./rtcvoice.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const server = params.get("server") || "";
const TRANSPORTS = new Set(["auto", "webrtc", "websocket"]);
const transportWanted = TRANSPORTS.has(params.get("transport")) ? params.get("transport") : "auto";

const ui = {
  status: $("status"),
  statusText: $("status-text"),
  alert: $("alert"),
  alertText: $("alert-text"),
  alertAction: $("alert-action"),
  alertClose: $("alert-close"),
  call: $("call"),
  mute: $("mute"),
  voice: $("voice"),
  transcript: $("transcript"),
  form: $("text-form"),
  text: $("text"),
  send: $("send"),
  latency: $("latency"),
  meterIn: $("meter-in"),
  meterOut: $("meter-out"),
  sessionInfo: $("session-info"),
  transport: $("transport"),
};

const TRANSPORT_TEXT = { webrtc: "WebRTC", websocket: "WebSocket" };

// The server's session.ended reasons that deserve more than "the server ended the call".
const ENDED_TEXT = {
  max_call_length: "The call reached the server's time limit and was ended. Start a new call to go on.",
  idle: "The call was ended after a long time with nobody speaking or typing. Start a new call to go on.",
  server_shutdown: "The voice server is restarting, so the call was ended. Start it again in a moment.",
};

const STATUS_TEXT = {
  idle: "Ready",
  connecting: "Connecting…",
  listening: "Listening",
  thinking: "Thinking…",
  speaking: "Speaking",
  reconnecting: "Reconnecting…",
  closed: "Call ended",
  failed: "Not connected",
};

const WATERFALL = [
  // [metric, label]; offsets are computed in renderMetrics.
  ["end_of_turn", "End of turn"],
  ["stt", "Speech to text"],
  ["llm_first_token", "First token"],
  ["llm_first_sentence", "First sentence"],
  ["tts_first_audio", "First audio"],
  ["voice_to_voice", "Voice to voice"],
];
const MAX_TURNS_SHOWN = 5;

let call = null;
let lastCall = null;
let transcript = new Transcript();
let audioContext = null;
let meters = { in: null, out: null };
let meterLoop = 0;
const metricsSeen = [];

// A handle for debugging in the console (and for the browser tests).
window.rtcvoiceDemo = {
  get call() {
    return call;
  },
  /** The current or most recent call, also after it ended. */
  get lastCall() {
    return lastCall;
  },
  get transcript() {
    return transcript;
  },
  metrics: metricsSeen,
};

// ---- status and alerts ----------------------------------------------------------------------------

function setStatus(state) {
  ui.status.dataset.state = state;
  ui.statusText.textContent = STATUS_TEXT[state] ?? state;
}

function showAlert(message, { kind = "error", action = null } = {}) {
  ui.alertText.textContent = message;
  ui.alert.classList.toggle("info", kind === "info");
  ui.alert.dataset.kind = kind;
  ui.alertAction.hidden = !action;
  ui.alertAction.onclick = null;
  if (action) {
    ui.alertAction.textContent = action.label;
    ui.alertAction.onclick = () => {
      hideAlert();
      action.run();
    };
  }
  ui.alert.hidden = false;
}

function hideAlert() {
  ui.alert.hidden = true;
  ui.alertText.textContent = "";
}

ui.alertClose.addEventListener("click", hideAlert);

// ---- controls -------------------------------------------------------------------------------------

function setCallButton(action) {
  ui.call.dataset.action = action;
  ui.call.textContent = { start: "Start call", cancel: "Cancel", hangup: "Hang up" }[action];
}

function setTransport(transport) {
  ui.transport.hidden = !transport;
  ui.transport.dataset.transport = transport ?? "";
  ui.transport.textContent = transport ? `via ${TRANSPORT_TEXT[transport] ?? transport}` : "";
  ui.transport.title =
    transport === "websocket"
      ? transportWanted === "websocket"
        ? "The audio goes over a WebSocket, as this page was asked to (?transport=websocket)."
        : "This browser has no WebRTC, so the audio goes over a WebSocket instead."
      : transport === "webrtc"
        ? "The audio goes over WebRTC."
        : "";
}

function setInCall(inCall) {
  ui.mute.disabled = !inCall;
  ui.text.disabled = !inCall;
  ui.send.disabled = !inCall;
  ui.text.placeholder = inCall ? "Type a message instead of speaking" : "Start a call, then type here instead of speaking";
  if (!inCall) {
    ui.mute.setAttribute("aria-pressed", "false");
    ui.mute.textContent = "Mute";
  }
}

ui.call.addEventListener("click", () => {
  if (ui.call.dataset.action === "start") startCall();
  else endCall();
});

ui.mute.addEventListener("click", () => {
  if (!call) return;
  const muted = call.toggleMute();
  ui.mute.setAttribute("aria-pressed", String(muted));
  ui.mute.textContent = muted ? "Unmute" : "Mute";
});

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.text.value.trim();
  if (!call || !text) return;
  call.sendText(text);
  ui.text.value = "";
});

ui.voice.addEventListener("change", () => {
  if (call && (call.connectionState === "connected" || call.connectionState === "reconnecting")) {
    call.updateSession({ voice: ui.voice.value });
  }
});

// ---- the call -------------------------------------------------------------------------------------

async function startCall({ microphone = true } = {}) {
  if (call) return;
  hideAlert();
  const support = checkSupport();
  setCallButton("cancel");
  setStatus("connecting");

  const voice = ui.voice.disabled ? undefined : ui.voice.value || undefined;
  call = createCall({ server, microphone, transport: transportWanted, session: voice ? { voice } : {} });
  const current = call;
  lastCall = current;
  transcript = new Transcript();
  transcript.subscribe(renderTranscript);
  transcript.attach(current);
  renderTranscript(transcript.entries);

  // An AudioContext made inside the click may play and measure; one made later may start suspended.
  if ((support.webrtc || support.websocket) && !audioContext) {
    const Ctx = window.AudioContext ?? window.webkitAudioContext;
    if (Ctx) audioContext = new Ctx();
  }
  audioContext?.resume?.().catch(() => {});

  current.on("connection", (e) => onConnection(current, e));
  current.on("state", (e) => {
    if (current.connectionState === "connected") setStatus(e.state);
  });
  current.on("error", (err) => onError(current, err));
  current.on("metrics", (m) => {
    metricsSeen.push(m);
    renderMetrics();
  });
  current.on("session.started", (e) => {
    ui.sessionInfo.textContent = `Session ${e.session_id} · ${e.agent} / ${e.stt} / ${e.tts}`;
  });
  current.on("track", ({ stream }) => {
    meters.out?.close();
    meters.out = audioContext ? new LevelMeter(stream, { context: audioContext }) : null;
  });

  try {
    await current.connect();
  } catch {
    // Reported through the "error" and "connection" events.
  }
}

async function endCall() {
  const current = call;
  if (current) await current.hangUp();
}

function onConnection(current, e) {
  if (current !== call) return;
  switch (e.state) {
    case "connecting":
      setStatus("connecting");
      break;
    case "connected":
      setCallButton("hangup");
      setInCall(true);
      setTransport(current.transport);
      setStatus(current.state ?? "listening");
      if (e.reconnected) showAlert("The connection dropped for a moment; the call is back.", { kind: "info" });
      if (current.localStream && audioContext && !meters.in) {
        meters.in = new LevelMeter(current.localStream, { context: audioContext });
      }
      startMeters();
      break;
    case "reconnecting":
      setStatus("reconnecting");
      showAlert(`The connection dropped. Reconnecting (attempt ${e.attempt} of ${e.attempts})…`, { kind: "info" });
      break;
    case "closed":
    case "failed":
      setStatus(e.state);
      setCallButton("start");
      setInCall(false);
      setTransport(null);
      stopMeters();
      if (e.state === "closed" && e.reason === "remote") {
        showAlert(ENDED_TEXT[e.serverReason] ?? "The server ended the call.", { kind: "info" });
      }
      call = null;
      break;
    default:
      break;
  }
}

function onError(current, err) {
  if (!err.fatal) {
    if (err.code === "autoplay_blocked") {
      showAlert(err.message, { kind: "info", action: { label: "Play audio", run: () => current.resumeAudio() } });
    } else if (err.source === "server") {
      showAlert(`The AI ran into a problem: ${err.message}`);
    }
    return;
  }
  let action = null;
  if (err.code === "microphone_denied" || err.code === "microphone_not_found" || err.code === "microphone_in_use") {
    action = { label: "Continue without microphone", run: () => startCall({ microphone: false }) };
  } else if (err.code !== "webrtc_unavailable" && err.code !== "insecure_context") {
    action = { label: "Try again", run: () => startCall() };
  }
  showAlert(err.message, { action });
}

// ---- level meters ---------------------------------------------------------------------------------

function setMeter(el, meter) {
  const level = meter ? meter.level() : 0;
  el.firstElementChild.style.transform = `scaleX(${level.toFixed(3)})`;
  el.setAttribute("aria-valuenow", level.toFixed(2));
  if (level > Number(el.dataset.peak)) el.dataset.peak = level.toFixed(3);
}

function startMeters() {
  if (meterLoop) return;
  const tick = () => {
    setMeter(ui.meterIn, call && !call.muted ? meters.in : null);
    setMeter(ui.meterOut, meters.out);
    meterLoop = requestAnimationFrame(tick);
  };
  meterLoop = requestAnimationFrame(tick);
}

function stopMeters() {
  cancelAnimationFrame(meterLoop);
  meterLoop = 0;
  meters.in?.close();
  meters.out?.close();
  meters = { in: null, out: null };
  setMeter(ui.meterIn, null);
  setMeter(ui.meterOut, null);
}

// ---- rendering ------------------------------------------------------------------------------------

function renderTranscript(entries) {
  const list = ui.transcript;
  const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  list.replaceChildren();
  if (!entries.length) {
    const li = document.createElement("li");
    li.className = "empty";
    li.textContent = "Say something, or type below. What you say and what the AI answers appears here.";
    list.append(li);
    return;
  }
  for (const entry of entries) {
    const li = document.createElement("li");
    li.className = `entry ${entry.role} ${entry.final ? "final" : entry.role === "user" ? "partial" : "streaming"}`;
    if (entry.turnId) li.dataset.turnId = entry.turnId;
    li.dataset.source = entry.source;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent =
      entry.role === "user" ? (entry.source === "text" ? "You (typed)" : "You") : entry.role === "tool" ? "Tool" : "AI";
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = entry.text || (entry.role === "user" ? "…" : "");
    li.append(who, text);
    if (entry.interrupted) {
      const note = document.createElement("span");
      note.className = "note";
      note.textContent = "(interrupted)";
      li.append(note);
    }
    list.append(li);
  }
  if (nearBottom) list.scrollTop = list.scrollHeight;
}

const ms = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);

function waterfallSpans(m) {
  // Offsets in ms from the end of the caller's speech (0). A typed turn has no end of turn or STT.
  const eot = ms(m.end_of_turn);
  const stt = ms(m.stt) ?? 0;
  const sentence = ms(m.llm_first_sentence) ?? 0;
  const tts = ms(m.tts_first_audio) ?? 0;
  const afterTurnEnd = ms(m.compute_after_turn_end);
  let llmStart;
  if (eot !== null && afterTurnEnd !== null) {
    // The server may start STT, the LLM and TTS during the end-of-turn silence (speculation):
    // lay the stages out backwards from the moment the first audio was ready.
    llmStart = Math.max(0, eot + afterTurnEnd - tts - sentence);
  } else {
    llmStart = (eot ?? 0) + stt;
  }
  return {
    end_of_turn: [0, eot],
    stt: [Math.max(0, llmStart - stt), ms(m.stt)],
    llm_first_token: [llmStart, ms(m.llm_first_token)],
    llm_first_sentence: [llmStart, ms(m.llm_first_sentence)],
    tts_first_audio: [llmStart + sentence, ms(m.tts_first_audio)],
    voice_to_voice: [0, ms(m.voice_to_voice)],
  };
}

function renderMetrics() {
  const turns = metricsSeen.slice(-MAX_TURNS_SHOWN).reverse();
  ui.latency.replaceChildren();
  turns.forEach((m, i) => {
    const spans = waterfallSpans(m);
    const total = Math.max(
      1,
      ...Object.values(spans).map(([start, length]) => start + (length ?? 0)),
    );
    const fig = document.createElement("figure");
    fig.className = "turn-metrics";
    fig.dataset.turnId = m.turn_id ?? "";
    const caption = document.createElement("figcaption");
    const v2v = ms(m.voice_to_voice);
    const turnName = document.createElement("span");
    turnName.textContent = `Turn ${metricsSeen.length - i}`;
    if (m.speculative || m.speculative_stt) {
      turnName.textContent += " · started during your pause";
      turnName.title = "The server began transcribing and answering while it waited to be sure you had finished.";
    }
    caption.append(turnName);
    const strong = document.createElement("strong");
    strong.className = "v2v";
    strong.textContent = v2v === null ? "voice to voice: —" : `voice to voice: ${Math.round(v2v)} ms`;
    caption.append(strong);
    fig.append(caption);
    for (const [key, label] of WATERFALL) {
      const [start, length] = spans[key];
      const row = document.createElement("div");
      row.className = "wf-row";
      row.dataset.metric = key;
      const name = document.createElement("span");
      name.className = "wf-label";
      name.textContent = label;
      const track = document.createElement("div");
      track.className = "wf-track";
      const value = document.createElement("span");
      value.className = "wf-value";
      value.textContent = length === null ? "—" : `${Math.round(length)} ms`;
      if (length !== null) {
        const bar = document.createElement("div");
        bar.className = `wf-bar ${key}`;
        bar.style.left = `${((start / total) * 100).toFixed(2)}%`;
        bar.style.width = `${((length / total) * 100).toFixed(2)}%`;
        bar.title = `${label}: ${Math.round(length)} ms (from ${Math.round(start)} ms)`;
        bar.dataset.ms = String(length);
        track.append(bar);
      }
      row.append(name, track, value);
      fig.append(row);
    }
    ui.latency.append(fig);
  });
}

// ---- start-up -------------------------------------------------------------------------------------

async function loadVoices() {
  try {
    const { voices, default: preferred } = await fetchVoices({ server });
    ui.voice.replaceChildren(
      ...voices.map((v) => {
        const option = document.createElement("option");
        option.value = v.id;
        const details = [v.gender !== "unknown" ? v.gender : null, v.language].filter(Boolean);
        option.textContent = [v.name, ...details].join(" · ");
        option.selected = v.id === preferred;
        return option;
      }),
    );
    ui.voice.disabled = voices.length === 0;
    if (!voices.length) ui.voice.replaceChildren(new Option("No voices"));
  } catch (err) {
    ui.voice.replaceChildren(new Option("Voices unavailable"));
    ui.voice.disabled = true;
    ui.voice.title = err.message;
  }
}

function init() {
  setStatus("idle");
  setCallButton("start");
  setInCall(false);
  setTransport(null);
  const support = checkSupport();
  const fallback = transportWanted !== "webrtc" && support.websocket;
  if ((!support.webrtc && !fallback) || (transportWanted === "websocket" && !support.websocket)) {
    // Said up front; pressing Start says it again through the client's own error.
    showAlert("This browser can't make WebRTC calls. Please use a current version of Chrome, Edge, Firefox or Safari.");
  } else if (!support.secureContext) {
    showAlert("The microphone only works on secure pages. Open this page over https:// (or on localhost).");
  }
  loadVoices();
}

init();
