#!/usr/bin/env bash
# Install what running the service needs, once: redis-server (Debian/Ubuntu packages) when it is not on
# PATH and no Redis is configured (REDIS_URL, REDIS_HOST or REDIS_PORT), and a virtual environment in .venv
# from requirements.txt, reinstalled when that file changes. Nothing for tests: scripts/setup-dev.sh adds those.
# Sourced by scripts/stack.sh (and, through setup-dev.sh, scripts/test.sh); safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
apt_install() {
  echo "setup: installing $* from the OS packages" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}
# install_requirements FILE: pip install -r FILE into .venv unless the files it stands on are unchanged
install_requirements() {
  local file=$1 stamp_file=".venv/.${1%.txt}.sha256" stamp
  stamp=$(cat requirements-web.txt requirements.txt "$file" | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp" ]; then
    echo "setup: installing $file into .venv (a few minutes the first time)" >&2
    .venv/bin/python -m pip install -q -r "$file"
    echo "$stamp" > "$stamp_file"
  fi
}

if [ -z "${REDIS_URL:-}${REDIS_HOST:-}${REDIS_PORT:-}${REDIS_SENTINELS:-}" ]; then  # settings.REDIS_CONFIGURED
  command -v redis-server >/dev/null 2>&1 || apt_install redis-server  # scripts/stack.sh starts its own
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "setup: Python 3.11 or newer is needed ($PYTHON is $("$PYTHON" --version))" >&2
  exit 1
}
if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  apt_install python3-venv
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
install_requirements requirements.txt
