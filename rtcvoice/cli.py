"""``rtcvoice serve`` runs the server; ``rtcvoice call`` dials it as a headless WebRTC peer."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from typing import Any

from .settings import Settings
from .telemetry.logs import setup_logging

log = logging.getLogger("rtcvoice")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rtcvoice", description="Voice calls with an AI over WebRTC.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="run the server",
        description="Run the rtcvoice server. Every setting is also read from the environment "
        "(RTCVOICE_<NAME>, plus OPENAI_API_KEY / OPENAI_BASE_URL); flags win.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    Settings.add_arguments(serve)
    # Set by the workers' parent on each worker: its own port for node-to-node requests.
    serve.add_argument("--worker-port", type=int, default=0, help=argparse.SUPPRESS)

    call = sub.add_parser(
        "call",
        help="call a server as a headless WebRTC peer, speaking a WAV file",
        description="Plays the whole WAV in real time as the microphone (any number of turns, pauses "
        "and interruptions), then waits for the replies to everything the server heard, sends --text "
        "and waits for its reply, and hangs up. Prints the server's events, then a summary with each "
        "turn's transcript and reply.",
    )
    call.add_argument("--wav", help="16-bit PCM WAV spoken as the microphone (any rate, mono or stereo)")
    call.add_argument("--text", help="send this as a text_message instead of (or after) speaking")
    call.add_argument("--server", default="http://127.0.0.1:8080", help="server base URL")
    call.add_argument("--out", help="save the AI's audio (48 kHz mono WAV) here")
    call.add_argument("--token", help="bearer token for servers with auth on")
    call.add_argument("--voice", help="ask for this voice")
    call.add_argument(
        "--timeout",
        type=float,
        default=90.0,
        help="give up (exit 1) if the replies have not all ended this many seconds after the WAV "
        "has been played (the WAV's own length never counts)",
    )
    call.add_argument("--quiet", action="store_true", help="print only the summary")
    call.add_argument(
        "--relay-only",
        action="store_true",
        help="ICE over the server's TURN relay only (iceTransportPolicy relay), to check that TURN works; "
        "the summary shows the candidate pair used",
    )
    call.add_argument(
        "--turn-transport",
        choices=["udp", "tcp", "tls"],
        help="reach TURN over this transport (aiortc uses one of the offered TURN URLs; default the first)",
    )

    bench = sub.add_parser(
        "bench",
        help="measure voice-to-voice latency and capacity with real headless calls",
        description="Starts a server (or uses --server), calls it with spoken questions from real aiortc "
        "peers, and reports per-stage latency (p50/p95), server CPU and memory per call, and capacity.",
    )
    from .bench import add_arguments as add_bench_arguments

    add_bench_arguments(bench)

    args = parser.parse_args(argv)
    if args.command == "bench":
        setup_logging("WARNING")
        from .bench import run as run_bench

        return asyncio.run(run_bench(args))
    if args.command == "serve":
        try:
            settings = Settings.from_args(args)
        except ValueError as exc:  # e.g. RTCVOICE_CREATE_UNKNOWN_THREADS=maybe
            print(f"rtcvoice: cannot start: {exc}", file=sys.stderr)
            return 2
        setup_logging(settings.log_level, settings.log_format, _node_name(settings))
        from .native_memory import limit_malloc_arenas

        limit_malloc_arenas(settings.malloc_arena_max)  # before any model or call starts a thread
        try:
            from .cluster.workers import worker_count
            from .server.nodes import node_identity
            from .server.turn import IceServers

            workers = worker_count(settings.workers)
            node_identity(settings)  # before the models load (and once, not once per worker)
            IceServers(settings)  # a bad STUN/TURN setting would otherwise stop create_app, loaded
        except ValueError as exc:
            print(f"rtcvoice: cannot start: {exc}", file=sys.stderr)
            return 2
        if workers > 1:
            serve_argv = list(argv if argv is not None else sys.argv[1:])
            serve_argv = serve_argv[serve_argv.index("serve") + 1 :]
            return asyncio.run(_supervise(settings, serve_argv, workers))
        return asyncio.run(_serve(settings, worker_port=args.worker_port))
    setup_logging("WARNING")
    if not args.wav and not args.text:
        parser.error("call needs --wav and/or --text")
    return asyncio.run(_call(args))


def _node_name(settings: Settings) -> str | None:
    """The node id log lines carry (None while the settings are still invalid: the error says why)."""
    from .server.nodes import node_identity

    try:
        return node_identity(settings)[0]
    except ValueError:
        return None


async def _supervise(settings: Settings, serve_argv: list[str], workers: int) -> int:
    from .cluster.backends import backend_kind
    from .cluster.workers import Supervisor, node_host_for
    from .server.nodes import default_node_id, machine_address

    cluster_url = settings.cluster_url.strip()
    across_machines = bool(cluster_url) and backend_kind(cluster_url) == "redis"
    supervisor = Supervisor(
        serve_argv,
        count=workers,
        node_id=settings.node_id.strip() or default_node_id(settings.port),
        node_host=node_host_for(settings.host, settings.node_url.strip(), across_machines, machine_address()),
        node_port=settings.node_port,
        listen_host=settings.host,
        cluster_url=cluster_url,
        node_cpus=settings.node_cpus,
        extra_args=_worker_threads(settings, workers),
    )
    return await supervisor.run()


def _worker_threads(settings: Settings, workers: int) -> tuple[str, ...]:
    """Each worker's model threads, where the user left them at "all cores": its share of them,
    so N workers do not run N × cores threads that only fight each other."""
    from .cluster.load import available_cpus

    share = str(max(1, int(available_cpus() / workers)))
    args: tuple[str, ...] = ()
    if settings.stt_threads == 0:
        args += ("--stt-threads", share)
    if settings.llm_threads == 0:
        args += ("--llm-threads", share)
    return args


async def _preflight(settings: Settings) -> None:
    """Reach the thread store and the cluster registry, and load the tools, before minutes of model
    loading: a wrong database_url, cluster_url or tool setting is reported at once (StoreError,
    RegistryError, ToolConfigError)."""
    from .cluster.backends import open_backend
    from .store import create_store
    from .tools import Toolbox

    tools = await Toolbox.load(settings)
    await tools.aclose()

    store = create_store(settings)
    await store.open()
    await store.close()
    if settings.cluster_url.strip():
        backend = open_backend(settings.cluster_url)
        try:
            await backend.ping()
        finally:
            await backend.close()


GIL_SWITCH_INTERVAL_S = 0.001


async def _serve(settings: Settings, *, worker_port: int = 0) -> int:
    from aiohttp import web

    # The engines' threads (the LLM's token loop, Whisper, TTS) need the GIL between native calls,
    # and the event loop holds it for the media; at Python's default of 5 ms a thread can wait
    # that long for it, several times a token. 1 ms measured: first token 102 -> 88 ms beside a
    # thread that holds the GIL a quarter of the time (the bench's "first words" notes).
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)

    from .engines import EngineError, load_engines
    from .engines.languages import check_language
    from .server import create_app
    from .server.cors import parse_origins
    from .server.keys import NODE
    from .server.nodes import RegistryError, check_node_url, drain
    from .server.urls import check_public_url
    from .store import StoreError
    from .tools import ToolConfigError

    try:
        # Settings that cannot work stop the server before minutes of model loading.
        check_public_url(settings.public_url)
        parse_origins(settings.cors_origins)
    except ValueError as exc:
        print(f"rtcvoice: cannot start: {exc}", file=sys.stderr)
        return 2
    try:
        await _preflight(settings)
    except (StoreError, RegistryError, ToolConfigError) as exc:
        print(f"rtcvoice: cannot start: {exc}", file=sys.stderr)
        return 2
    try:
        engines = await load_engines(settings)
    except EngineError as exc:
        print(f"rtcvoice: cannot start: {exc}", file=sys.stderr)
        return 2
    try:
        check_language(engines, settings.language)
    except EngineError as exc:
        await engines.aclose()
        print(f"rtcvoice: cannot start: language={settings.language}: {exc}", file=sys.stderr)
        return 2
    app = create_app(settings, engines=engines)
    runner = web.AppRunner(app, access_log=None)
    try:
        await runner.setup()  # opens the thread store, loads the tools, registers with the cluster
    except (StoreError, RegistryError, ToolConfigError) as exc:
        await engines.aclose()
        print(f"rtcvoice: cannot start: {exc}", file=sys.stderr)
        return 2
    # A worker shares the public port with its siblings and has a port of its own for them.
    listen = [(settings.host, settings.port, worker_port > 0)]
    if worker_port:
        listen.append((settings.host, worker_port, False))
    try:
        for host, port, shared in listen:
            await web.TCPSite(runner, host, port, reuse_port=shared or None).start()
        await check_node_url(app[NODE])
    except (OSError, ValueError) as exc:
        await runner.cleanup()
        await engines.aclose()
        where = f"{settings.host}:{settings.port}"
        print(
            f"rtcvoice: cannot start: {exc}"
            if isinstance(exc, ValueError)
            else f"rtcvoice: cannot listen on {where}: {exc}",
            file=sys.stderr,
        )
        return 2
    log.info(
        "rtcvoice listening on http://%s:%d  (stt=%s agent=%s tts=%s)",
        settings.host,
        settings.port,
        engines.stt.name,
        engines.agent.name,
        engines.tts.name,
    )
    stop, now = asyncio.Event(), asyncio.Event()

    def on_term() -> None:  # drain; a second SIGTERM ends the drain at once
        (now if stop.is_set() else stop).set()

    def on_int() -> None:
        stop.set()
        now.set()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGINT, on_int)
    await stop.wait()
    if not now.is_set():
        log.info("SIGTERM: draining (up to %.0f s; SIGINT ends every call now)", settings.drain_timeout_s)
        await drain(app, settings.drain_timeout_s, now)
    log.info("shutting down: ending every call")
    await runner.cleanup()
    await engines.aclose()
    return 0


async def _call(args: argparse.Namespace) -> int:
    import aiohttp

    from .audio import read_wav, write_wav
    from .client import CallError, VoiceCallClient

    def show(event: dict[str, Any]) -> None:
        if not args.quiet:
            print(json.dumps(event), flush=True)

    pcm = None
    if args.wav:
        try:
            pcm, rate = read_wav(args.wav)
        except (OSError, ValueError, EOFError) as exc:
            print(f"rtcvoice call: cannot read {args.wav}: {exc}", file=sys.stderr)
            return 2
    client = VoiceCallClient(
        args.server,
        on_event=show,
        token=args.token,
        relay_only=args.relay_only,
        turn_transport=args.turn_transport,
    )
    session: dict[str, Any] = {"voice": args.voice} if args.voice else {}
    ok = False
    try:
        await client.connect(session=session)
        if pcm is not None:
            client.play(pcm, rate)
            # Paced in real time; the slack is for a sender that starts late, not for replies.
            await client.wait_played(timeout=pcm.shape[0] / rate + 30)
        # One budget for every reply, from the moment the caller has said everything.
        deadline = time.monotonic() + args.timeout
        if pcm is not None:
            # Every turn the WAV started must end (client.TurnLedger has the rule), then the text.
            await client.wait_answered(deadline - time.monotonic())
        if args.text:
            client.send({"type": "text_message", "content": args.text})
            await client.wait_answered(deadline - time.monotonic())
        ok = True
    except CallError as exc:
        print(f"rtcvoice call: {exc}", file=sys.stderr)
    except aiohttp.ClientError as exc:
        print(f"rtcvoice call: cannot reach {args.server}: {exc}", file=sys.stderr)
    except TimeoutError:
        after = "the WAV had been played" if pcm is not None else "the message was sent"
        print(
            f"rtcvoice call: gave up {args.timeout:g} s after {after}, with {client.turns.outstanding()}; "
            "a longer --timeout waits longer",
            file=sys.stderr,
        )
    finally:
        with contextlib.suppress(Exception):
            await client.close()
    if args.out:
        write_wav(args.out, client.received.pcm(), 48_000)
    _print_summary(client)
    return 0 if ok else 1


def _print_summary(client: Any) -> None:
    summary: dict[str, Any] = {"type": "summary", "session_id": client.session_id}
    finals = [e.get("text") for e in client.of_type("final_transcript")]
    replies = [e.get("text") for e in client.of_type("end_of_response")]
    summary["you_said"] = finals
    summary["ai_said"] = replies
    # Each turn's transcript and reply, in the order the server opened them; interrupted marked.
    summary["turns"] = client.turns.summary()
    pair = getattr(client, "candidate_pair", None)
    if pair is not None:
        summary["ice"] = {"local": pair.local_type, "remote": pair.remote_type}
        if client.turn_server is not None:
            summary["ice"]["turn"] = client.turn_server.urls
    metrics = client.of_type("metrics")
    if metrics:
        summary["server_metrics_ms"] = metrics
    if client.speech_ends:
        # From the end of the WAV's last speech: the last turn's voice-to-voice.
        heard = client.received.first_sound_after(client.speech_ends[-1])
        if heard is not None:
            summary["client_voice_to_voice_ms"] = round((heard - client.speech_ends[-1]) * 1000, 1)
    print(json.dumps(summary), flush=True)
