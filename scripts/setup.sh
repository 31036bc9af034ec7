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
[ -x /usr/bin/chromium ] || apt_install chromium  # tests/test_browser.py (Debian's package; Ubuntu's is a snap)
# Apache and apache2-dev's apxs, which pip needs to build mod_wsgi (requirements.txt) against .venv's Python;
# nginx. For tests/test_apache.py and tests/test_nginx.py, which run their own on free ports.
[ -x /usr/bin/apxs ] && [ -x /usr/sbin/apache2 ] || apt_install apache2 apache2-dev
[ -x /usr/sbin/nginx ] || apt_install nginx
# tests/test_deploy_files.py: docker-compose validates docker-compose.yml (no container engine needed);
# systemd-analyze verifies the unit files in deploy/systemd (systemd need not be running).
command -v docker-compose >/dev/null 2>&1 || apt_install docker-compose
command -v systemd-analyze >/dev/null 2>&1 || apt_install systemd
# pip builds mod_wsgi from source: a C compiler and the headers of the Python that makes .venv
command -v gcc >/dev/null 2>&1 || apt_install gcc
"$PYTHON" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(sysconfig.get_path("include") + "/Python.h"))' ||
  apt_install python3-dev
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
