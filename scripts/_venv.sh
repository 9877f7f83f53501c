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
