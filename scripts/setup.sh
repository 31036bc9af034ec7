#!/usr/bin/env bash
# Install what the service needs, once: redis-server (Debian/Ubuntu packages) when it is not on PATH,
# and a virtual environment in .venv from requirements.txt, reinstalled when that file changes.
# Sourced by scripts/stack.sh and scripts/test.sh; safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
apt_install() {
  echo "setup: installing $* from the OS packages" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

command -v redis-server >/dev/null 2>&1 || apt_install redis-server
if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  apt_install python3-venv
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
  echo "setup: Python 3.10 or newer is needed ($PYTHON is $("$PYTHON" --version))" >&2
  exit 1
}

stamp=$(cat requirements.txt requirements-web.txt | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.requirements.sha256 2>/dev/null)" != "$stamp" ]; then
  echo "setup: installing Python packages into .venv (a few minutes the first time)" >&2
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  echo "$stamp" > .venv/.requirements.sha256
fi
