"""Shared fixtures: engines loaded once, real servers on free ports, the fake OpenAI endpoint."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from fake_openai import FakeOpenAI
from pg import PostgresCluster

from rtcvoice.engines import Engines, load_engines
from rtcvoice.engines.agents.echo import EchoAgent
from rtcvoice.engines.agents.openai_chat import OpenAIChatAgent
from rtcvoice.engines.base import Agent, SpeechToText, TextToSpeech
from rtcvoice.server import create_app
from rtcvoice.settings import Settings

BASE_SETTINGS = Settings.from_env({}, agent="echo", llm_max_tokens=60)


@pytest.fixture(scope="session")
async def shared_engines() -> AsyncIterator[Engines]:
    """Whisper, hibari and Silero, loaded and warmed once for the whole run."""
    engines = await load_engines(BASE_SETTINGS)
    yield engines
    await engines.aclose()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL server for the run, started on first use (tests/pg.py)."""
    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as fake:
        yield fake


ServerFactory = Callable[..., Awaitable[str]]


@pytest.fixture
async def start_server(shared_engines: Engines, tmp_path: Path) -> AsyncIterator[ServerFactory]:
    """Start a real rtcvoice server: ``await start_server(agent=..., **settings)`` → base URL.

    ``agent``, ``stt`` and ``tts`` replace the shared engines for that server (and are closed after).
    """
    runners: list[web.AppRunner] = []
    owned: list[Agent | SpeechToText | TextToSpeech] = []

    async def start(
        agent: Agent | None = None,
        *,
        stt: SpeechToText | None = None,
        tts: TextToSpeech | None = None,
        **overrides: Any,
    ) -> str:
        overrides.setdefault("db_path", str(tmp_path / f"rtcvoice-{len(runners)}.db"))
        settings = BASE_SETTINGS.replace(**overrides)
        replaced = {k: v for k, v in (("agent", agent), ("stt", stt), ("tts", tts)) if v is not None}
        engines = dataclasses.replace(shared_engines, **replaced) if replaced else shared_engines
        owned.extend(replaced.values())
        app = create_app(settings, engines=engines)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()
    for engine in owned:
        await engine.aclose()


def openai_agent(fake: FakeOpenAI, **overrides: Any) -> OpenAIChatAgent:
    return OpenAIChatAgent(
        BASE_SETTINGS.replace(agent="openai", openai_base_url=fake.base_url, llm_model="fake", **overrides)
    )


def echo_agent() -> EchoAgent:
    return EchoAgent()


def record_threads(
    monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, *, static: bool = False
) -> set[int]:
    """Wrap ``owner.name`` so each call notes its thread: the returned set fills as it runs."""
    threads: set[int] = set()
    original = getattr(owner, name)

    def recorded(*args: Any, **kwargs: Any) -> Any:
        threads.add(threading.get_ident())
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, staticmethod(recorded) if static else recorded)
    return threads


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def serve_process(db: Path, fake: FakeOpenAI) -> tuple[subprocess.Popen[bytes], str]:
    """``rtcvoice serve`` as its own process (for signals), answering with ``fake``, once healthy."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RTCVOICE_", "OPENAI_"))}
    proc = await asyncio.to_thread(
        subprocess.Popen,
        [
            sys.executable,
            "-m",
            "rtcvoice",
            "serve",
            "--port",
            str(port),
            "--db-path",
            str(db),
            "--agent",
            "openai",
            "--openai-base-url",
            fake.base_url,
            "--llm-model",
            "fake",
            "--log-level",
            "WARNING",
        ],
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(600):
                try:
                    async with http.get(f"{url}/api/v1/voice/health") as resp:
                        if resp.status == 200:
                            return proc, url
                except aiohttp.ClientError:
                    pass
                assert proc.poll() is None, "the server exited"
                await asyncio.sleep(0.2)
        raise AssertionError("the server did not start")
    except BaseException:
        proc.kill()  # a server that never became ready must not outlive the test
        await asyncio.to_thread(proc.wait, 10)
        raise
