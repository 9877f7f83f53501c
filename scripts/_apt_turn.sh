# Sourced by scripts/test: the TURN tests start a real coturn, so make sure `turnserver` exists.
# Kept apart from other apt helpers so each can change without touching the other.

ensure_coturn() {
  if command -v turnserver >/dev/null 2>&1; then
    return 0
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "the TURN tests need coturn's turnserver: install the coturn package" >&2
    exit 1
  fi
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
  fi
  echo "==> installing coturn (apt-get)"
  $sudo apt-get update -qq
  # The tests never use a system coturn service: they start their own on free ports.
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends coturn >/dev/null
}
