# Sourced by scripts/serve and scripts/test: make .venv with rtcvoice and the given extras.
# Installing is skipped when pyproject.toml and the extras are unchanged since the last install.

ensure_venv() {
  local extras="$1"
  local py="${PYTHON:-python3}"
  if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "rtcvoice needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
    exit 1
  fi
  if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    "$py" -m venv .venv
  fi
  local stamp=".venv/.rtcvoice-installed"
  local want
  want="$(sha256sum pyproject.toml | cut -d' ' -f1) $extras"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "==> installing rtcvoice[$extras] (the first time, llama-cpp-python compiles: about 5 minutes on 2 cores)"
    .venv/bin/python -m pip install --quiet --upgrade pip
    llama_build_flags
    .venv/bin/python -m pip install --quiet -e ".[$extras]"
    echo "$want" > "$stamp"
  fi
  ensure_smart_turn
}

# Smart Turn v3.2, pipecat's audio end-of-turn model (rtcvoice.engines.eot.smart_turn), ships inside the
# pipecat-ai wheel. Only its .onnx is taken from the wheel, so neither pipecat-ai nor its dependencies are
# installed. Pinned: another pipecat-ai release may ship another model, and the hash would no longer match.
SMART_TURN_PIPECAT_VERSION="1.14.0"
SMART_TURN_SHA256="2bb026316b14a660486a75b1733cd3fbab8c2fd0314dc9af7be49f8cca967e4f"
ensure_smart_turn() {
  local dest=".venv/share/rtcvoice/smart-turn-v3.2-cpu.onnx"
  if [ -f "$dest" ] && [ "$(sha256sum "$dest" | cut -d' ' -f1)" = "$SMART_TURN_SHA256" ]; then
    return 0
  fi
  echo "==> fetching Smart Turn v3.2 from the pipecat-ai $SMART_TURN_PIPECAT_VERSION wheel"
  local tmp
  tmp="$(mktemp -d)"
  # The model is optional (only the smart-turn end-of-turn model uses it): without it, say so and go on,
  # so that an install that cannot reach PyPI still serves.
  if ! .venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: \
      "pipecat-ai==$SMART_TURN_PIPECAT_VERSION" -d "$tmp" \
    || ! .venv/bin/python - "$tmp" "$dest" "$SMART_TURN_SHA256" <<'PY'
import glob, hashlib, os, sys, zipfile

tmp, dest, sha = sys.argv[1:]
(wheel,) = glob.glob(os.path.join(tmp, "pipecat_ai-*.whl"))
with zipfile.ZipFile(wheel) as z:
    data = z.read("pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx")
if hashlib.sha256(data).hexdigest() != sha:
    sys.exit(f"the Smart Turn model in {os.path.basename(wheel)} does not have the pinned sha256 {sha}")
os.makedirs(os.path.dirname(dest), exist_ok=True)
with open(dest + ".part", "wb") as f:
    f.write(data)
os.replace(dest + ".part", dest)  # whole or absent: an interrupted fetch leaves no half model behind
PY
  then
    echo "==> could not fetch Smart Turn v3.2: the smart-turn end-of-turn model is unavailable" >&2
  fi
  rm -rf "$tmp"
}

# llama.cpp compiles for the CPU it is built on (-march=native). A CPU that lists AMX inside a VM or
# sandbox whose kernel does not let processes use the AMX tiles kills the local agent with SIGILL at
# its first matrix product: there, build for AVX-512 without AMX (a 135M model gains nothing from AMX).
# A CMAKE_ARGS of your own wins.
llama_build_flags() {
  if [ -z "${CMAKE_ARGS:-}" ] && grep -q amx_tile /proc/cpuinfo 2>/dev/null; then
    export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
    echo "==> this CPU lists AMX: llama-cpp-python is built without it (CMAKE_ARGS=$CMAKE_ARGS)"
  fi
}
