"""``rtcvoice bench`` end to end: it starts a server, makes real calls, and reports."""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
from pathlib import Path

from rtcvoice.bench import COLUMNS, Level, Turn, capacity
from rtcvoice.bench_nodes import summarize


async def bench(tmp_path: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``rtcvoice bench --instant`` asking one question, with ``args``, as its own process."""
    questions = tmp_path / "questions.txt"
    questions.write_text("What is the capital of France?\n")
    command = [sys.executable, "-m", "rtcvoice", "bench", "--instant", "--questions", str(questions), *args]
    return await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=timeout)


async def test_bench_reports_latency_per_stage_capacity_and_a_plot(tmp_path: Path) -> None:
    report, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = await bench(
        tmp_path, "--concurrency", "1,2", "--json", str(report), "--plot", str(plot), timeout=240
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "capacity:" in proc.stdout and "client_voice_to_voice" in proc.stdout
    data = json.loads(report.read_text())
    assert data["settings"]["engines"] == {"stt": "whisper", "agent": "echo", "tts": "tone"}
    assert [lv["concurrency"] for lv in data["levels"]] == [1, 2]
    assert [lv["turns"] for lv in data["levels"]] == [1, 2]
    single = data["levels"][0]
    for column in (
        "end_of_turn",
        "stt",
        "voice_to_voice",
        "client_voice_to_voice",
        "transport",
        "server_overhead",
    ):
        assert single["p50_ms"][column] is not None and single["p50_ms"][column] >= 0, column
    # The caller hears the reply after the server sends it.
    assert single["p50_ms"]["client_voice_to_voice"] > single["p50_ms"]["voice_to_voice"]
    assert single["server_cpu_s_per_call"] > 0 and single["server_rss_mb"] > 50
    assert single["per_turn"][0]["transcript"] and single["per_turn"][0]["reply"].startswith("You said")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def level(n: int, v2v: list[float], underruns: int = 0) -> Level:
    turns = [Turn(concurrency=n, call=0, question="q", ms={"client_voice_to_voice": v}) for v in v2v]
    return Level(
        concurrency=n, turns=turns, wall_s=1.0, cpu_s_per_call=1.0, rss_mb=1.0, late_frames=underruns
    )


def test_capacity_is_the_largest_level_within_budget_and_without_gaps() -> None:
    assert COLUMNS[-1] == "client_voice_to_voice"
    base = level(1, [800, 820, 900])
    assert capacity([base, level(2, [900, 1200, 1300]), level(4, [1500, 1700, 2000])]) == 2
    assert capacity([base, level(2, [850, 860, 870], underruns=3)]) == 1
    assert capacity([base, level(2, [850]), level(4, [3000]), level(8, [850])]) == 2


async def test_bench_across_nodes_reports_each_node_the_caller_and_the_ratios(tmp_path: Path) -> None:
    """Two nodes sharing a registry, the calls entering through the first. The CPU shares are
    cgroups where the machine has them (root, cgroup v1 or v2), else cores or nothing: the report
    says which, and the run works either way."""
    report = tmp_path / "nodes.json"
    proc = await bench(
        tmp_path,
        *("--nodes", "2", "--node-cpus", "0.9", "--caller-cpus", "0.6"),
        *("--concurrency", "1", "--json", str(report)),
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "bench: CPU shares:" in proc.stdout and "caller: busy" in proc.stdout
    data = json.loads(report.read_text())
    settings = data["settings"]
    assert settings["nodes"] == 2 and settings["workers"] == 1
    assert settings["cpu_limit"]["method"] in ("cgroup-v1", "cgroup-v2", "affinity", "none")
    single = data["levels"][0]
    assert single["turns"] == 1 and single["per_turn"][0]["reply"].startswith("You said")
    nodes = single["nodes"]
    assert sorted(n["node"] for n in nodes) == ["bench-n1", "bench-n2"]
    assert sum(n["calls_peak"] for n in nodes) == 1  # the one call is held by one node
    held = next(n for n in nodes if n["calls_peak"] == 1)
    assert held["call_s"] > 0 and held["cpu_s_per_call_s"] > 0
    assert data["levels"][0]["caller"]["busy_cpus"] > 0 and isinstance(data["valid"], bool)
    # The comparison works on reports, so runs made apart can be put together.
    summary = summarize([data, {**data, "settings": {**settings, "nodes": 1}, "capacity": 1}])
    assert [row["nodes"] for row in summary["configurations"]] == [1, 2]
    assert list(summary["ratios"]) == ["nodes 2 / 1 (workers 1)"]


async def test_the_servers_memory_levels_off_over_a_thousand_concurrent_calls(tmp_path: Path) -> None:
    """Native memory (codecs, DTLS, allocator arenas) is invisible to Python's heap counts, so
    this reads the server's RSS: 1,000 real WebRTC calls in 50 batches of 20 at once, and the
    second half of them may add under 5 MB (with glibc's default arenas 400 calls still added
    46 MB in their second half; with two arenas but no trim, 1,000 calls added 10 MB in one run
    and 3 MB in another, at 411 MB; bench/README.md, Native memory)."""
    report = tmp_path / "memory.json"
    command = [
        *(sys.executable, "-m", "rtcvoice", "bench", "--instant", "--memory", "50", "--memory-batch", "20"),
        *("--memory-reply-words", "3", "--json", str(report)),
    ]
    proc = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "MB per concurrent call" in proc.stdout
    data = json.loads(report.read_text())
    after, during = data["rss_after_batch_mb"], data["rss_during_batch_mb"]
    assert len(after) == 50 and len(during) == 50 and data["failed_calls"] == 0
    assert data["idle_rss_mb"] > 50 and data["peak_rss_mb"] == max(after + during)
    assert data["growth_last_half_mb"] == round(
        statistics.median(after[45:]) - statistics.median(after[20:25]), 1
    )
    assert data["mb_per_concurrent_call"] == round((max(during) - data["idle_rss_mb"]) / 20, 1)
    assert data["growth_last_half_mb"] < 5.0, after
    # Not a dip at the end: the second half's highest stands within 5 MB of the first half's.
    assert max(after[25:]) - max(after[:25]) < 5.0, after
    # And what the calls used comes back when they end: untrimmed, the RSS after a batch was a
    # high-water mark 130 MB over the idle server's by the end; now it is under it.
    assert max(after) < data["idle_rss_mb"] + 30, after


def test_the_plateau_report_measures_growth_over_the_last_half() -> None:
    from rtcvoice.bench_memory import plateau_report

    after = [120.0, 130.0, 131.0, 130.0, 129.0, 134.0, 133.0, 135.0, 140.0, 135.0, 136.0, 134.0]
    report = plateau_report(100.0, after, [125.0, 131.0, 135.0, 136.0], batch=10)
    # The ends of the halves are medians of 5 batches: 130 (batches 2-6) and 135 (8-12).
    assert report["growth_mb"] == 34.0 and report["growth_last_half_mb"] == 5.0
    assert report["peak_rss_mb"] == 140.0 and report["mb_per_concurrent_call"] == 3.6
