"""Smart Turn v3.2 without pipecat: the features it was trained on, the installed model, its errors."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from faster_whisper.feature_extractor import FeatureExtractor
from speech import at_16k, normalize, speak

from rtcvoice.audio import STT_RATE, FloatAudio, int16_to_float
from rtcvoice.engines.eot.smart_turn import (
    MODEL_ENV,
    SmartTurnModel,
    SmartTurnModelMissing,
    default_model_path,
    features,
)


def whisper_log_mel_reference(audio: FloatAudio) -> npt.NDArray[np.float64]:
    """transformers' WhisperFeatureExtractor(chunk_length=8, do_normalize=True) written out frame by
    frame, with librosa's Slaney filters as faster-whisper builds them: a second, independent
    route to the numbers the model was trained on."""
    x = np.asarray(audio, np.float32)[-8 * STT_RATE :]
    x = np.concatenate([np.zeros(8 * STT_RATE - x.size, np.float32), x])  # silence in front
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    padded = np.pad(x.astype(np.float64), 200, mode="reflect")
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)  # periodic
    power = np.stack(
        [np.abs(np.fft.rfft(padded[i * 160 : i * 160 + 400] * hann)) ** 2 for i in range(801)], axis=1
    )
    mel = FeatureExtractor.get_mel_filters(STT_RATE, 400, n_mels=80) @ power
    log_mel = np.log10(np.maximum(mel, 1e-10))[:, :800]
    log_mel = np.maximum(log_mel, log_mel.max() - 8.0)
    return np.asarray((log_mel + 4.0) / 4.0, np.float64)


def tone(seconds: float, hz: float = 1000.0) -> FloatAudio:
    t = np.arange(int(seconds * STT_RATE)) / STT_RATE
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def test_features_match_the_whisper_formula_on_a_tone() -> None:
    audio = np.concatenate([tone(1.5, 440.0), tone(1.5, 2000.0)])
    got = features(audio)
    assert got.shape == (80, 800) and got.dtype == np.float32
    np.testing.assert_allclose(got, whisper_log_mel_reference(audio), atol=1e-4)

    # 3 s of sound end the 8 s window: 5 s of padding in front sit on the 80 dB floor, which the
    # (x + 4) / 4 scaling puts 2.0 below the loudest bin.
    floor = got.max() - 2.0
    assert np.allclose(got[:, :480], floor, atol=1e-6)
    # The 2 kHz tone at the end is loudest in the mel band around 2 kHz, not the 440 Hz one.
    centres = np.linspace(0, 45.245640471924965, 82)[1:-1]  # Slaney mels of the bands' centres
    band_2k = int(np.argmin(np.abs(centres - (15.0 + np.log(2.0) * 27.0 / np.log(6.4)))))
    assert abs(int(np.argmax(got[:, 700])) - band_2k) <= 1


def test_features_hear_only_the_last_eight_seconds() -> None:
    audio: FloatAudio = np.concatenate([tone(4.0, 300.0), tone(8.0, 1200.0)])
    np.testing.assert_array_equal(features(audio), features(audio[-8 * STT_RATE :]))


def test_features_do_not_depend_on_loudness() -> None:
    # The waveform is normalised before the spectrum, as in training: a quiet caller is not "done".
    # (Only the 1e-7 added to the variance, which keeps silence finite, tells them apart at all.)
    audio = np.concatenate([tone(1.0, 500.0), tone(1.0, 900.0)])
    np.testing.assert_allclose(features(audio), features(audio * np.float32(0.25)), atol=1e-3)


def test_a_missing_model_file_says_how_to_install_it(tmp_path: Path) -> None:
    missing = tmp_path / "smart-turn-v3.2-cpu.onnx"
    with pytest.raises(SmartTurnModelMissing) as info:
        SmartTurnModel(missing)
    message = str(info.value)
    assert str(missing) in message
    assert "scripts/serve" in message and "scripts/test" in message
    assert "pip download pipecat-ai==" in message and MODEL_ENV in message
    # The engine factory and the bench catch FileNotFoundError for every optional model.
    assert isinstance(info.value, FileNotFoundError)


def test_the_model_lives_in_the_environment_unless_overridden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(MODEL_ENV, raising=False)
    assert default_model_path() == Path(sys.prefix) / "share" / "rtcvoice" / "smart-turn-v3.2-cpu.onnx"
    monkeypatch.setenv(MODEL_ENV, str(tmp_path / "mine.onnx"))
    assert default_model_path() == tmp_path / "mine.onnx"
    with pytest.raises(SmartTurnModelMissing):
        SmartTurnModel.load()


@pytest.fixture(scope="module")
def model() -> SmartTurnModel:
    path = default_model_path()
    if not path.is_file():
        pytest.skip(
            f"the Smart Turn model is not installed at {path}: scripts/test installs it "
            "(ensure_smart_turn in scripts/_venv.sh)"
        )
    return SmartTurnModel.load()


def words_end(audio: FloatAudio, n: int) -> tuple[float, str]:
    """Where the n-th word ends (faster-whisper's word timestamps), and the n words heard."""
    from faster_whisper import WhisperModel

    from rtcvoice.engines.stt.whisper import embedded_model_path

    whisper = WhisperModel(embedded_model_path(), device="cpu", compute_type="int8", cpu_threads=1)
    segments, _ = whisper.transcribe(audio, language="en", word_timestamps=True, beam_size=1)
    words = [w for s in segments for w in s.words]
    # Just past the word, but before the next one starts: none of its onset may leak in.
    end = min(words[n - 1].end + 0.03, max(words[n].start, words[n - 1].end))
    return end, " ".join(w.word for w in words[:n])


def test_a_finished_question_sounds_more_done_than_its_words_cut_short(model: SmartTurnModel) -> None:
    # Cut after "when you", the prosody is mid-sentence: the model hears a speaker who is not done
    # (P ~0.01), where the whole question gets ~0.98. (The same words spoken as a sentence of their
    # own would end with a sentence's fall, and the model would rightly hear that as done.)
    lead, tail = np.zeros(STT_RATE // 2, np.float32), np.zeros(STT_RATE // 5, np.float32)
    question = int16_to_float(at_16k(speak("Can you tell me when you open tomorrow?", 0.0, 0.0)))
    cut_s, heard = words_end(question, 6)
    assert normalize(heard) == "can you tell me when you"
    cut = question[: int(cut_s * STT_RATE)]

    finished = model.probability("", np.concatenate([lead, question, tail]))
    unfinished = model.probability("", np.concatenate([lead, cut, tail]))
    assert finished > 0.8, finished
    assert unfinished < 0.2, unfinished
    assert model.name == "smart-turn"


def test_calls_from_many_threads_get_the_answers_of_one(model: SmartTurnModel) -> None:
    rng = np.random.default_rng(0)
    clips = [
        np.concatenate([tone(0.5 + i / 4, 300.0 + 100 * i), 0.01 * rng.standard_normal(3200)]).astype(
            np.float32
        )
        for i in range(4)
    ]
    serial = [model.probability("", c) for c in clips]
    got: dict[int, float] = {}

    def run(i: int) -> None:
        got[i] = model.probability("", clips[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(4)] == serial
    assert all(0.0 <= p <= 1.0 for p in serial)
