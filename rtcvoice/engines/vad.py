"""Streaming Silero VAD v6, using the ONNX model that faster-whisper ships in its wheel.

One ``InferenceSession`` is shared by all sessions (onnxruntime sessions are thread-safe for
``run``); each call keeps its own recurrent state in a ``VadStream``.
"""

from __future__ import annotations

import threading
from importlib import resources
from pathlib import Path

import numpy as np
import numpy.typing as npt

WINDOW = 512  # samples at 16 kHz: 32 ms, the window Silero v6 is trained on
CONTEXT = 64  # samples of the previous window the model sees in front of each window
RATE = 16_000
WINDOW_MS = WINDOW * 1000 // RATE


def default_model_path() -> str:
    return str(resources.files("faster_whisper").joinpath("assets", "silero_vad_v6.onnx"))


class SileroVad:
    """The shared model; cheap per-call streams come from :meth:`stream`."""

    def __init__(self, path: str | None = None) -> None:
        import onnxruntime

        self.path = path or default_model_path()
        if not Path(self.path).is_file():
            raise FileNotFoundError(
                f"Silero VAD model not found at {self.path} (is faster-whisper installed?)"
            )
        opts = onnxruntime.SessionOptions()
        # One thread: a 32 ms window takes well under a millisecond, and sessions run in parallel.
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 4
        self._session = onnxruntime.InferenceSession(
            self.path, providers=["CPUExecutionProvider"], sess_options=opts
        )

    def stream(self) -> VadStream:
        return VadStream(self)

    def _run(
        self, window: npt.NDArray[np.float32], h: npt.NDArray[np.float32], c: npt.NDArray[np.float32]
    ) -> tuple[float, npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        out, h, c = self._session.run(None, {"input": window, "h": h, "c": c})
        return float(np.asarray(out).reshape(-1)[0]), h, c


class VadStream:
    """Speech probability for each consecutive 32 ms window of one audio stream."""

    def __init__(self, model: SileroVad) -> None:
        self._model = model
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self._h = np.zeros((1, 1, 128), dtype=np.float32)
        self._c = np.zeros((1, 1, 128), dtype=np.float32)
        self._context = np.zeros(CONTEXT, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)

    def process(self, audio: npt.NDArray[np.float32]) -> list[float]:
        """Feed any amount of 16 kHz float audio; get one probability per completed window.

        Blocking (CPU): call it from an executor.
        """
        with self._lock:
            buf = np.concatenate([self._pending, audio.astype(np.float32, copy=False)])
            probs: list[float] = []
            n = buf.size // WINDOW
            for i in range(n):
                win = buf[i * WINDOW : (i + 1) * WINDOW]
                x = np.concatenate([self._context, win]).reshape(1, -1)
                p, self._h, self._c = self._model._run(x, self._h, self._c)
                self._context = win[-CONTEXT:]
                probs.append(p)
            self._pending = buf[n * WINDOW :]
            return probs
