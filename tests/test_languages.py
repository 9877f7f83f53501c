"""Which languages the engines serve, and a session asking for one they cannot serve."""

from __future__ import annotations

import dataclasses
import subprocess

import pytest
from test_cli import RTCVOICE, clean_env, free_port

from rtcvoice.engines import Engines
from rtcvoice.engines.agents.echo import EchoAgent
from rtcvoice.engines.languages import LanguageError, check_language, normalize_language, served_by
from rtcvoice.engines.tts.edge import EdgeTts
from rtcvoice.engines.tts.tone import ToneTts


@pytest.mark.parametrize(
    ("tag", "code"), [("en", "en"), ("en-US", "en"), ("EN_gb", "en"), ("hi", "hi"), ("zh-Hant-TW", "zh")]
)
def test_language_tags_are_read_as_their_primary_language(tag: str, code: str) -> None:
    assert normalize_language(tag) == code


@pytest.mark.parametrize("tag", ["", "english", "e", "en US", "12"])
def test_what_is_not_a_language_tag_is_refused(tag: str) -> None:
    with pytest.raises(ValueError):
        normalize_language(tag)


def test_the_embedded_engines_serve_english_only(shared_engines: Engines) -> None:
    assert served_by(shared_engines.stt) == {"en"}, "tiny.en"
    assert served_by(shared_engines.tts) == {"en"}, "hibari's voices are American and British"
    assert check_language(shared_engines, "en-US") == "en"
    with pytest.raises(LanguageError) as caught:
        check_language(shared_engines, "hi")
    message = str(caught.value)
    assert caught.value.code == "unsupported_language"
    assert "Hindi (hi)" in message and "speech recognition" in message and "English (en)" in message


def test_a_text_only_session_needs_only_the_agent_to_serve_its_language(shared_engines: Engines) -> None:
    engines = dataclasses.replace(shared_engines, agent=EchoAgent())
    assert check_language(engines, "hi", speech_in=False, speech_out=False) == "hi"
    with pytest.raises(LanguageError, match="speech synthesis"):
        check_language(engines, "hi", speech_in=False, speech_out=True)


def test_edge_serves_the_languages_of_its_voices_and_tone_any() -> None:
    assert {"en", "hi"} <= (served_by(EdgeTts()) or set())
    assert served_by(ToneTts()) is None


def test_serve_refuses_to_start_in_a_language_its_engines_cannot_serve() -> None:
    proc = subprocess.run(
        [*RTCVOICE, "serve", "--agent", "echo", "--language", "hi", "--port", str(free_port())],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Hindi (hi)" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--cors-origins", "localhost:5173/app", "cors_origins"),
        ("--public-url", "voice.example.com", "public_url"),
        ("--create-unknown-threads", "maybe", "invalid boolean value"),
    ],
)
def test_serve_says_what_is_wrong_with_a_setting_before_loading_any_model(
    flag: str, value: str, says: str
) -> None:
    proc = subprocess.run(
        [*RTCVOICE, "serve", flag, value, "--port", str(free_port())],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert says in proc.stderr and "Traceback" not in proc.stderr
    assert "engines ready" not in proc.stderr
