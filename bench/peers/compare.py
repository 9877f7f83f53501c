"""rtcvoice, pipecat and fastrtc side by side on this machine: bench/peers/run calls this.

For each configuration it starts the shared LLM server and the three stacks (each in its own
virtualenv), then runs ``rtcvoice bench --peer ...`` (one caller, the same utterances, the stacks
interleaved round by round) and stops them. Reports go to ``--out``:

* ``latency-<config>.json`` for ``defaults``, ``tuned`` and ``silence`` (one end-of-turn silence
  for all, ``--silence-ms``): the same engines everywhere (Whisper tiny.en, SmolLM2 through the
  shared server with replies capped at 40 tokens, hibari);
* ``capacity.json``: instant engines (a fixed reply, the tone TTS; Whisper still transcribes), each
  server held to ``--server-cpus`` of the machine, levels of concurrent calls.

What each stack runs in each configuration is in pipecat_bot.py and fastrtc_bot.py; rtcvoice runs
its defaults for ``defaults`` and ``tuned`` (they are its settings for latency) and
``--turn-policy silence`` for ``silence``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from rtcvoice.cluster.workers import free_ports

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PYTHON = {
    "rtcvoice": Path(sys.executable),
    "pipecat": HERE / ".venv-pipecat" / "bin" / "python",
    "fastrtc": HERE / ".venv-fastrtc" / "bin" / "python",
}
SILERO_V4 = HERE / ".cache" / "silero_vad_v4.onnx"
CONFIGS = ("defaults", "tuned", "silence")


def system_prompt() -> str:
    from rtcvoice.settings import Settings

    return Settings().system_prompt


class Procs:
    """The processes of one configuration, stopped (and their logs kept) on the way out."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self, name: str, argv: list[str], ready_url: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 (kept open for the process)
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True, env=env
        )
        self.procs.append((name, proc))
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"compare: {name} exited with {proc.returncode}; see {self.logs / name}.log")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(ready_url, timeout=2).close()
                return proc
            time.sleep(0.5)
        raise SystemExit(f"compare: {name} did not answer {ready_url} within 180 s")

    def stop(self) -> None:
        for _name, proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGINT)
        for _name, proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@contextlib.contextmanager
def stacks(config: str, *, instant: bool, args: argparse.Namespace, logs: Path) -> Iterator[list[str]]:
    """The LLM server and the three stacks for ``config``; yields the ``--peer`` specs."""
    procs = Procs(logs)
    try:
        llm_port = free_ports()
        llm = ["--port", str(llm_port), "--max-tokens", str(args.max_tokens)]
        procs.start(
            "llm",
            [str(PYTHON["rtcvoice"]), str(HERE / "llm_server.py"), *llm, *(["--instant"] if instant else [])],
            f"http://127.0.0.1:{llm_port}/v1/models",
        )
        llm_url = f"http://127.0.0.1:{llm_port}/v1"
        tts = "tone" if instant else "hibari"
        common = ["--llm-url", llm_url, "--config", config, "--silence-ms", str(args.silence_ms)]
        common += ["--tts", tts, "--max-tokens", str(args.max_tokens), "--system-prompt", system_prompt()]
        specs = []
        port = free_ports()
        rtc = [str(PYTHON["rtcvoice"]), "-m", "rtcvoice", "serve", "--host", "0.0.0.0", "--port", str(port)]
        rtc += ["--agent", "openai", "--openai-base-url", llm_url, "--openai-api-key", "bench", "--tts", tts]
        rtc += ["--llm-max-tokens", str(args.max_tokens), "--db-path", str(logs / "rtcvoice.db")]
        if config == "silence":
            rtc += ["--turn-policy", "silence", "--end-of-turn-silence-ms", str(args.silence_ms)]
        proc = procs.start("rtcvoice", rtc, f"http://127.0.0.1:{port}/livez")
        # Tuned, the peers get what rtcvoice does for itself (engines/blas.py): NumPy's OpenBLAS on
        # one thread. Its spare threads spin beside Whisper's encoder; Whisper's pass went
        # 123 -> 78 ms here. pipecat and fastrtc run faster-whisper on the same NumPy.
        peer_env = None if config == "defaults" else {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
        specs.append(("rtcvoice", port, proc.pid))
        port = free_ports()
        proc = procs.start(
            "pipecat",
            [str(PYTHON["pipecat"]), str(HERE / "pipecat_bot.py"), "--port", str(port), *common],
            f"http://127.0.0.1:{port}/calls",
            peer_env,
        )
        specs.append(("pipecat", port, proc.pid))
        port = free_ports()
        proc = procs.start(
            "fastrtc",
            [str(PYTHON["fastrtc"]), str(HERE / "fastrtc_bot.py"), "--port", str(port), *common]
            + ["--silero", str(SILERO_V4)],
            f"http://127.0.0.1:{port}/calls",
            peer_env,
        )
        specs.append(("fastrtc", port, proc.pid))
        yield [f"{name}-{config}=http://127.0.0.1:{port}@{pid}" for name, port, pid in specs]
    finally:
        procs.stop()


def bench(peers: list[str], extra: list[str], log: Path) -> int:
    argv = [str(PYTHON["rtcvoice"]), "-m", "rtcvoice", "bench", *extra]
    for spec in peers:
        argv += ["--peer", spec]
    print("+ " + " ".join(argv), flush=True)
    with open(log, "w") as out:
        proc = subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out.write(proc.stdout)
    print(proc.stdout, flush=True)
    if proc.returncode != 0:
        print(f"compare: rtcvoice bench exited with {proc.returncode}", file=sys.stderr)
    return proc.returncode


def hold(pids: list[int], cpus: float, caller_cpus: float) -> object:
    """Each server in a cgroup of ``cpus``, this process (and so the bench it starts) in the rest."""
    from rtcvoice.bench_cpu import CpuShares

    shares = CpuShares.detect(True)
    print(f"compare: CPU shares by {shares.method} ({shares.reason})", flush=True)
    for pid in pids:
        shares.place(pid, f"server-{pid}", cpus)
    shares.place(os.getpid(), "caller", caller_cpus)
    return shares


def main() -> None:
    p = argparse.ArgumentParser(description="rtcvoice, pipecat and fastrtc side by side")
    p.add_argument("--configs", default=",".join(CONFIGS), help="latency configurations to run")
    p.add_argument("--capacity", default="1,2,3,4,6,8", help="capacity levels ('' for none)")
    p.add_argument(
        "--capacity-utterances", type=int, default=4, help="utterances per call in the capacity run"
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--capacity-rounds", type=int, default=3, help="rounds of each capacity level (its p95 is noisy)"
    )
    p.add_argument("--questions", default=str(ROOT / "bench" / "mixed.txt"))
    p.add_argument("--silence-ms", type=int, default=500)
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--server-cpus", type=float, default=0.8, help="each server's share in the capacity run")
    p.add_argument("--caller-cpus", type=float, default=1.2, help="the caller's share in the capacity run")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "peers"))
    p.add_argument(
        "--instant", action="store_true", help="the latency runs with instant engines too (a smoke test)"
    )
    args = p.parse_args()
    for name, python in PYTHON.items():
        if not python.exists():
            raise SystemExit(f"compare: no {python} for {name}: run bench/peers/run, which makes it")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="peers-"))
    print(f"compare: server logs in {logs}", flush=True)
    questions = ["--questions", args.questions]
    failed = 0
    for config in [c for c in args.configs.split(",") if c]:
        if config not in CONFIGS:
            raise SystemExit(f"compare: unknown configuration {config!r}; one of {', '.join(CONFIGS)}")
        with stacks(config, instant=args.instant, args=args, logs=logs) as peers:
            extra = [
                *questions,
                "--peer-rounds",
                str(args.rounds),
                "--json",
                str(out / f"latency-{config}.json"),
            ]
            failed += bench(peers, extra, out / f"latency-{config}.txt") != 0
    if args.capacity:
        with stacks("defaults", instant=True, args=args, logs=logs) as peers:
            shares = hold([int(s.rsplit("@", 1)[1]) for s in peers], args.server_cpus, args.caller_cpus)
            try:
                few = logs / "capacity-utterances.txt"
                lines = [q for q in Path(args.questions).read_text().splitlines() if q.strip()]
                few.write_text("\n".join(lines[: args.capacity_utterances]) + "\n")
                extra = ["--questions", str(few), "--concurrency", args.capacity]
                extra += ["--peer-rounds", str(args.capacity_rounds)]
                extra += ["--peer-server-cpus", str(args.server_cpus), "--json", str(out / "capacity.json")]
                failed += bench(peers, extra, out / "capacity.txt") != 0
            finally:
                shares.close()  # type: ignore[attr-defined]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
