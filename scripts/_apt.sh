# Sourced by scripts/test: Debian packages the browser tests need, installed only when missing.
# `apt-get update` runs at most once per run, and only if something has to be installed.
# One function per need; each installs only what is missing.

_RTCVOICE_APT_UPDATED=""

apt_install() {
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "the tests need the packages: $* (no apt-get here: install them yourself)" >&2
    exit 1
  fi
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "the tests need the packages: $* (run as root, or install them yourself)" >&2
      exit 1
    fi
    sudo="sudo"
  fi
  if [ -z "$_RTCVOICE_APT_UPDATED" ]; then
    echo "==> apt-get update"
    $sudo apt-get update -qq
    _RTCVOICE_APT_UPDATED=1
  fi
  echo "==> installing $* (apt-get)"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Debian's Chromium for tests/test_browser.py (Playwright drives it; it never downloads a browser).
ensure_chromium() {
  if [ ! -x "${RTCVOICE_CHROMIUM:-/usr/bin/chromium}" ]; then
    apt_install chromium
  fi
}

# Node.js and npm for the type-check of web/rtcvoice.d.ts and web/react (tests/test_web_types.py).
ensure_npm() {
  if ! command -v npm >/dev/null 2>&1; then
    apt_install nodejs npm
  fi
}

# PostgreSQL server binaries for tests/test_store.py, which runs initdb in a temp dir and starts
# its own throwaway server on a free port (tests/pg.py): the package's own cluster is never used.
ensure_postgresql() {
  if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    apt_install postgresql
  fi
}

# coturn for tests/test_turn.py, which starts its own turnserver on free ports (turn/start):
# a packaged coturn service, if any, is never used.
ensure_coturn() {
  if ! command -v turnserver >/dev/null 2>&1; then
    apt_install coturn
  fi
}

# redis-server for the cluster tests, which start their own throwaway Redis on a free port
# (`redis-server --port N --save ''`): a packaged redis-server service, if any, is never used.
ensure_redis() {
  if ! command -v redis-server >/dev/null 2>&1; then
    apt_install redis-server
  fi
}

# HAProxy for tests/test_deploy.py (`haproxy -c` on deploy/haproxy/haproxy.cfg) and the cluster
# tests, which run it in the foreground with a config of their own for local ports. Debian puts it
# in /usr/sbin, which is not on a normal user's PATH.
ensure_haproxy() {
  if ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ]; then
    apt_install haproxy
  fi
}

# iptables and libnetfilter-queue for tests/test_lossy_network.py (`rtcvoice bench --network`), which
# impairs UDP inside a private network namespace through an NFQUEUE rule; the NetfilterQueue package
# (test extra) builds against the library's headers, so this runs before the virtualenv is made.
ensure_netem() {
  local missing=()
  command -v iptables >/dev/null 2>&1 || [ -x /usr/sbin/iptables ] || missing+=(iptables)
  [ -f /usr/include/libnetfilter_queue/libnetfilter_queue.h ] || missing+=(libnetfilter-queue-dev)
  if [ ${#missing[@]} -gt 0 ]; then
    apt_install "${missing[@]}"
  fi
}

# espeak-ng voices for the turn-taking corpus (rtcvoice/turn_corpus.py): without it the corpus,
# its tests and `rtcvoice bench --turn-taking` fall back to hibari's one voice.
ensure_espeak() {
  if ! command -v espeak-ng >/dev/null 2>&1; then
    apt_install espeak-ng
  fi
}
