"""Smart Turn v3.2: pipecat's audio end-of-turn classifier, run without pipecat or transformers.

Smart Turn hears *how* the words were said (pitch falling or held, a drawn-out "and...") rather
than what they say: a Whisper-tiny encoder and a small head, exported to ONNX, that turns the last
8 s of an utterance into P(the speaker has finished). The CPU build, ``smart-turn-v3.2-cpu.onnx``
(8.7 MB, int8), ships inside the pipecat-ai wheel; ``scripts/serve`` and ``scripts/test``
(``ensure_smart_turn`` in ``scripts/_venv.sh``) take just that file out of the pinned wheel at
install time and put it in ``<venv>/share/rtcvoice/``, so nothing is downloaded at run time.

Use::

    from rtcvoice.engines.eot.smart_turn import SmartTurnModel

    model = SmartTurnModel.load()     # one shared session; SmartTurnModel(path, threads=n) for your own
    p = model.probability("", audio)  # audio: the utterance so far, 16 kHz mono float32

The text is ignored. Give it what pipecat gives it: the utterance from shortly before speech began
to shortly after it stopped (pipecat: 0.5 s before, ~0.2 s of silence after). Ask early in the
silence: the model has learnt that a long silence means a finished turn, and with 0.5-1 s of
silence at the end it calls most unfinished sentences done. Anything older than 8 s is cut, and a
shorter utterance is padded with silence in front.

The features are those of transformers' ``WhisperFeatureExtractor(chunk_length=8)`` with
``do_normalize=True`` (:func:`features`), computed here in numpy exactly as pipecat's own analyzer
computes them, so both give the same probabilities.
"""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

from ...audio import STT_RATE, FloatAudio

MODEL_FILE = "smart-turn-v3.2-cpu.onnx"
PIPECAT_VERSION = "1.14.0"  # the pipecat-ai wheel the model is taken from (scripts/_venv.sh pins the same)
MODEL_ENV = "RTCVOICE_SMART_TURN_MODEL"  # a path to use instead of the installed model

WINDOW_S = 8  # the model was trained on, and its encoder takes, exactly 8 s
WINDOW = WINDOW_S * STT_RATE
N_MELS = 80
HOP = 160
N_FFT = 400

# transformers' zero_mean_unit_var_norm adds this to the variance: pure silence stays finite.
_NORM_EPS = 1e-7


class SmartTurnModelMissing(FileNotFoundError):
    """The ONNX file is not where it should be: the install step did not run or could not fetch it."""


def default_model_path() -> Path:
    """``$RTCVOICE_SMART_TURN_MODEL`` if set, else where the install step puts the model.

    ``sys.prefix`` is the virtual environment's root, so the model travels with the environment
    that has rtcvoice installed, not with the checkout.
    """
    override = os.environ.get(MODEL_ENV, "").strip()
    if override:
        return Path(override)
    return Path(sys.prefix) / "share" / "rtcvoice" / MODEL_FILE


def _missing(path: Path) -> SmartTurnModelMissing:
    return SmartTurnModelMissing(
        f"Smart Turn model not found at {path}. It is installed by scripts/serve or scripts/test "
        f"(ensure_smart_turn in scripts/_venv.sh), or by hand: "
        f"python -m pip download pipecat-ai=={PIPECAT_VERSION} --no-deps -d /tmp/pipecat "
        f"and unzip pipecat/audio/turn/smart_turn/data/{MODEL_FILE} from the wheel to {path} "
        f"(or point {MODEL_ENV} at it)."
    )


def last_window(audio: FloatAudio) -> FloatAudio:
    """The last 8 s of ``audio``, padded with zeros *in front* when shorter, as pipecat does.

    Padding in front keeps the end of the utterance, the part that decides, at the end of the
    window where the model was trained to find it.
    """
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if audio.size >= WINDOW:
        return audio[-WINDOW:]
    return np.concatenate([np.zeros(WINDOW - audio.size, np.float32), audio])


def _slaney_mel(hz: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    mel = 3.0 * hz / 200.0  # linear below 1 kHz, logarithmic above
    above = hz >= 1000.0
    mel[above] = 15.0 + np.log(hz[above] / 1000.0) * (27.0 / np.log(6.4))
    return mel


def _slaney_hz(mel: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    hz = 200.0 * mel / 3.0
    above = mel >= 15.0
    hz[above] = 1000.0 * np.exp(np.log(6.4) / 27.0 * (mel[above] - 15.0))
    return hz


@lru_cache(maxsize=1)
def _constants() -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The periodic Hann window and the (201, 80) Slaney-normalised triangular mel filters."""
    window = np.hanning(N_FFT + 1)[:-1]  # periodic, as torch.hann_window and transformers use
    low, high = _slaney_mel(np.array([0.0, STT_RATE / 2.0]))
    centres = _slaney_hz(np.linspace(float(low), float(high), N_MELS + 2))
    bins = np.linspace(0, STT_RATE // 2, N_FFT // 2 + 1)
    slopes = centres[np.newaxis, :] - bins[:, np.newaxis]
    gaps = np.diff(centres)
    down = -slopes[:, :-2] / gaps[:-1]
    up = slopes[:, 2:] / gaps[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    filters *= 2.0 / (centres[2:] - centres[:-2])  # equal area per filter (Slaney)
    return window, filters


def features(audio: FloatAudio) -> npt.NDArray[np.float32]:
    """The model's input for ``audio`` (16 kHz mono float32): log-mel features, shape (80, 800).

    transformers' ``WhisperFeatureExtractor(chunk_length=8)`` with ``do_normalize=True``, step for
    step and in the same precision (float32 normalisation, float64 spectrum), as pipecat's own
    numpy copy of it does. The precision is not pedantry: the model is int8 with activations
    quantised on the fly, and for some utterances a 1e-5 change in the features (float32 instead
    of float64 spectra, e.g. faster-whisper's extractor) moves P(done) by as much as 0.15.
    """
    x = last_window(audio)
    # Over the whole 8 s window, padding included, zero mean and unit variance: the model was
    # trained on that, so a quiet caller and a loud one look alike.
    x = (x - x.mean()) / np.sqrt(x.var() + _NORM_EPS)
    window, filters = _constants()
    half = N_FFT // 2
    padded = np.pad(x.astype(np.float64), (half, half), mode="reflect")  # centred frames
    frames = sliding_window_view(padded, N_FFT)[::HOP]  # 801 frames of 25 ms, 10 ms apart
    power = (np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2).T
    log_mel = np.log10(np.maximum(1e-10, filters.T @ power))[:, :-1]  # Whisper drops the last frame
    log_mel = np.maximum(log_mel, log_mel.max() - 8.0)  # an 80 dB range below the loudest bin
    scaled: npt.NDArray[np.float32] = ((log_mel + 4.0) / 4.0).astype(np.float32)
    return scaled


class SmartTurnModel:
    """P(the caller is done) from the sound of the utterance (:class:`~rtcvoice.engines.eot.EndOfTurnModel`).

    One onnxruntime session; :meth:`probability` may be called from many threads at once (a
    session's ``run`` is thread-safe and the features are pure functions).
    """

    name = "smart-turn"

    def __init__(self, path: str | Path | None = None, *, threads: int = 1) -> None:
        """``threads``: onnxruntime intra-op threads per call. One by default: a call takes tens
        of milliseconds either way, and calls from many conversations then run side by side
        instead of fighting over the same cores.
        """
        import onnxruntime

        self.path = Path(path) if path is not None else default_model_path()
        if not self.path.is_file():
            raise _missing(self.path)
        opts = onnxruntime.SessionOptions()
        opts.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = threads
        opts.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Extra threads would otherwise spin between calls, taking the cores STT and TTS need.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 4
        self._session = onnxruntime.InferenceSession(
            str(self.path), providers=["CPUExecutionProvider"], sess_options=opts
        )

    @classmethod
    def load(cls, path: str | Path | None = None, *, threads: int = 1) -> SmartTurnModel:
        """The process's shared model for ``path`` (default: :func:`default_model_path`).

        Loading takes ~0.1 s and ~70 MB; one session serves every conversation.
        """
        return _shared(str(Path(path) if path is not None else default_model_path()), threads)

    def probability(self, text: str, audio: FloatAudio) -> float:
        """P(done) for ``audio``, the utterance so far (16 kHz mono float32); ``text`` is not used.

        Blocking (CPU, ~tens of ms): call it from an executor.
        """
        del text  # Smart Turn listens only
        batch = features(audio)[np.newaxis]
        (out,) = self._session.run(["logits"], {"input_features": batch})
        # Despite the output's name, the exported graph ends in a sigmoid: this is a probability.
        return float(np.clip(np.asarray(out).reshape(-1)[0], 0.0, 1.0))


@lru_cache(maxsize=4)
def _shared(path: str, threads: int) -> SmartTurnModel:
    return SmartTurnModel(path, threads=threads)
