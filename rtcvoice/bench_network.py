"""``rtcvoice bench --network 0,3,10``: the same spoken questions over a clean and a lossy network.

The bench runs itself again inside a private network namespace (``unshare --net``: nothing
else on the machine is touched), gives the namespace's loopback a second address (aioice skips
127.0.0.1, so the calls' media use this one), and sends every UDP packet through an iptables
NFQUEUE rule to :mod:`rtcvoice.netem`, which drops ``N`` % of them and delays the rest by
``--network-delay-ms`` ± ``--network-jitter-ms`` (reordering them). TCP (signaling) is left
alone. One server serves every condition; each run plays the questions once per condition, the
conditions interleaved, so a slow moment of the machine does not land on one condition.

Per condition it reports, side by side:

- the question words the server heard (its final transcript aligned with the question);
- voice-to-voice at the caller and at the server (p50, p95);
- the reply audio the caller received per second of call (1.00: every lost frame became a
  frame of concealment; under 1: lost frames were holes) and how much of it was concealed;
- what the impairment did (packets dropped, reordered, mean delay).

It needs root, ``iptables`` and the ``NetfilterQueue`` package (``scripts/test`` installs them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .audio import WEBRTC_RATE, Int16Audio
from .bench import (
    CALLER_JITTER_FRAMES,
    QUESTIONS,
    Turn,
    _read_text,
    _status,
    _write_text,
    ask,
    serve_args_of,
    synthesize_questions,
)
from .bench_nodes import one_server
from .client import VoiceCallClient
from .netem import Impairment

INSIDE_ENV = "RTCVOICE_BENCH_NETNS"  # set in the namespace the bench runs itself in
QUEUE = 7
ADDRESS = "10.77.0.1/24"

FRAME_S = 0.02


@dataclass
class CallResult:
    condition: str
    turns: list[Turn]
    received_s: float  # reply-track audio the caller received
    call_s: float  # from its first received frame to its last
    concealed_s: float  # of received_s, made up by the decoder for lost packets
    server_concealed_s: float  # of the caller's speech, made up by the server's decoder
    netem: dict[str, Any] = field(default_factory=dict)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower().replace("’", "'"))


def words_heard(said: str, heard: str) -> tuple[int, int]:
    """(words of ``said`` found in ``heard`` in order, words said): the longest common subsequence."""
    a, b = words(said), words(heard)
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, start=1):
            keep = row[j]
            row[j] = prev + 1 if x == y else max(row[j], row[j - 1])
            prev = keep
    return row[-1], len(a)


def conditions_of(args: argparse.Namespace) -> list[Impairment]:
    try:
        losses = [float(v) for v in str(args.network).split(",") if v.strip()]
    except ValueError:
        losses = []
    if not losses or min(losses) < 0 or max(losses) >= 100:
        raise SystemExit(f"rtcvoice bench: --network {args.network!r} must be loss percentages, e.g. 0,3,10")
    out = []
    for loss in dict.fromkeys(losses):
        if loss == 0:
            out.append(Impairment())  # clean: no loss and no delay
        else:
            out.append(Impairment(loss / 100.0, args.network_delay_ms, args.network_jitter_ms))
    return out


async def run_network(args: argparse.Namespace) -> int:
    conditions = conditions_of(args)
    if os.environ.get(INSIDE_ENV) != "1":
        return await asyncio.to_thread(_run_in_namespace)
    await asyncio.to_thread(_set_up_namespace)
    texts = QUESTIONS
    if args.questions:
        texts = [
            q.strip() for q in (await asyncio.to_thread(_read_text, args.questions)).splitlines() if q.strip()
        ]
    questions = await asyncio.to_thread(synthesize_questions, texts)
    serve_args = serve_args_of(args)
    results: list[CallResult] = []
    async with one_server(None, serve_args) as server:
        for run in range(max(1, args.runs)):
            for k, imp in enumerate(conditions):
                imp.seed = 1000 * run + k + 1
                print(f"== run {run + 1}: {imp.label()} ==", flush=True)
                results.append(await _impaired_call(server, questions, imp))
    report = network_report(conditions, results, serve_args)
    print(network_table(report), flush=True)
    if args.json_path == "-":
        print(json.dumps(report, indent=1))
    elif args.json_path:
        await asyncio.to_thread(_write_text, args.json_path, json.dumps(report, indent=1))
    failed = sum(row["failed_turns"] for row in report["conditions"])
    return 0 if not failed else 1


def _run_in_namespace() -> int:
    """Run this same command again in a private network namespace; its output is ours."""
    if os.geteuid() != 0:
        raise SystemExit("rtcvoice bench: --network needs root (a private network namespace and iptables)")
    for tool in ("unshare", "iptables", "ip"):
        if shutil.which(tool) is None:
            raise SystemExit(
                f"rtcvoice bench: --network needs `{tool}` (apt-get install util-linux iptables iproute2)"
            )
    try:
        import netfilterqueue  # noqa: F401
    except ImportError:
        raise SystemExit(
            "rtcvoice bench: --network needs the NetfilterQueue package (pip install NetfilterQueue; "
            "it builds against libnetfilter-queue-dev)"
        ) from None
    command = ["unshare", "--net", "--", sys.executable, "-m", "rtcvoice", *sys.argv[1:]]
    return subprocess.call(command, env={**os.environ, INSIDE_ENV: "1"})


def _set_up_namespace() -> None:
    for command in (
        ["ip", "link", "set", "lo", "up"],
        ["ip", "addr", "add", ADDRESS, "dev", "lo"],
        # --queue-bypass: with no netem bound to the queue (the clean condition) packets pass.
        [
            "iptables",
            "-A",
            "OUTPUT",
            "-p",
            "udp",
            "-j",
            "NFQUEUE",
            "--queue-num",
            str(QUEUE),
            "--queue-bypass",
        ],
    ):
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"rtcvoice bench: `{' '.join(command)}` failed: {done.stderr.strip()}")


@contextlib.asynccontextmanager
async def _netem(imp: Impairment) -> AsyncIterator[dict[str, Any]]:
    """The impairment for one call: a netem process bound to the queue, stopped after; None if clean."""
    tally: dict[str, Any] = {}
    if imp.clean:
        yield tally
        return
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "rtcvoice.netem",
        "--queue",
        str(QUEUE),
        "--loss",
        str(imp.loss * 100),
        "--delay-ms",
        str(imp.delay_ms),
        "--jitter-ms",
        str(imp.jitter_ms),
        "--seed",
        str(imp.seed),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        line = await asyncio.wait_for(proc.stderr.readline(), 30)
        if b"ready" not in line:
            raise RuntimeError(f"netem did not start: {line.decode(errors='replace')}")
        yield tally
    finally:
        if proc.returncode is None:
            proc.terminate()
        out, err = await proc.communicate()
        if out.strip():
            tally.update(json.loads(out.decode().strip().splitlines()[-1]))
        elif proc.returncode not in (0, -15):
            print(f"bench: netem exited {proc.returncode}: {err.decode(errors='replace')}", file=sys.stderr)


async def _impaired_call(
    server: str, questions: list[tuple[str, Int16Audio, int]], imp: Impairment
) -> CallResult:
    client = VoiceCallClient(server, jitter_frames=CALLER_JITTER_FRAMES)
    turns: list[Turn] = []
    before = (await asyncio.to_thread(_status, server)).get("concealed_ms", 0.0)
    async with _netem(imp) as tally:
        try:
            await client.connect(timeout=40)
            with contextlib.suppress(TimeoutError):  # that question and the rest count as failed
                await ask(client, questions, turns, concurrency=1, index=0, timeout=60)
        finally:
            inbound = client.inbound
            await client.close()
    await asyncio.sleep(0.5)  # the server has closed the session and counted its concealment
    after = (await asyncio.to_thread(_status, server)).get("concealed_ms", 0.0)
    received = client.received
    chunks = [c.size for c in received.chunks]
    call_s = (received.times[-1] - received.times[0] + FRAME_S) if len(received.times) > 1 else 0.0
    for text, _pcm, _rate in questions[len(turns) :]:
        turns.append(Turn(concurrency=1, call=0, question=text, ms={}))
    return CallResult(
        condition=imp.label(),
        turns=turns,
        received_s=round(sum(chunks) / WEBRTC_RATE, 3),
        call_s=round(call_s, 3),
        concealed_s=round((inbound.concealed if inbound is not None else 0) / WEBRTC_RATE, 3),
        server_concealed_s=round((after - before) / 1000.0, 3),
        netem=tally,
    )


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def network_report(
    conditions: list[Impairment], results: list[CallResult], serve_args: list[str]
) -> dict[str, Any]:
    rows = []
    for imp in conditions:
        mine = [r for r in results if r.condition == imp.label()]
        turns = [t for r in mine for t in r.turns]
        heard = [words_heard(t.question, t.transcript) for t in turns]
        client = [v for t in turns if (v := t.ms.get("client_voice_to_voice")) is not None]
        server = [v for t in turns if (v := t.ms.get("voice_to_voice")) is not None]
        received = sum(r.received_s for r in mine)
        call_s = sum(r.call_s for r in mine)
        packets = sum(int(r.netem.get("packets", 0)) for r in mine)
        rows.append(
            {
                "condition": imp.label(),
                "impairment": asdict(imp) | {"seed": None},
                "turns": len(turns),
                "failed_turns": sum(1 for t in turns if not t.ms),
                "words_heard": sum(h for h, _ in heard),
                "words_said": sum(n for _, n in heard),
                "client_v2v_ms": {"p50": _pct(client, 50), "p95": _pct(client, 95)},
                "server_v2v_ms": {"p50": _pct(server, 50), "p95": _pct(server, 95)},
                "received_per_call_s": round(received / call_s, 4) if call_s else None,
                "concealed_s": round(sum(r.concealed_s for r in mine), 2),
                "server_concealed_s": round(sum(r.server_concealed_s for r in mine), 2),
                "packets": packets,
                "dropped": sum(int(r.netem.get("dropped", 0)) for r in mine),
                "reordered": sum(int(r.netem.get("reordered", 0)) for r in mine),
                "per_turn": [
                    {
                        "question": t.question,
                        "heard": t.transcript,
                        **{k: t.ms.get(k) for k in ("client_voice_to_voice", "voice_to_voice")},
                    }
                    for t in turns
                ],
            }
        )
    return {"serve_args": serve_args, "conditions": rows}


def network_table(report: dict[str, Any]) -> str:
    head = (
        f"{'network':<24}{'words heard':>13}{'caller v2v p50/p95':>20}{'server v2v p50/p95':>20}"
        f"{'audio/s':>9}{'concealed in/out':>18}{'dropped':>9}{'reordered':>11}"
    )
    lines = [head]
    for row in report["conditions"]:
        c, s = row["client_v2v_ms"], row["server_v2v_ms"]
        lines.append(
            f"{row['condition']:<24}{row['words_heard']:>6}/{row['words_said']:<6}"
            f"{_ms(c['p50']):>11}/{_ms(c['p95']):<8}{_ms(s['p50']):>11}/{_ms(s['p95']):<8}"
            f"{row['received_per_call_s'] or 0:>9.3f}{row['server_concealed_s']:>10.2f}s/{row['concealed_s']:.2f}s"
            f"{row['dropped']:>9}{row['reordered']:>11}"
            + (f"  ({row['failed_turns']} turns failed)" if row["failed_turns"] else "")
        )
    return "\n".join(lines)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"
