#!/usr/bin/env bash
# Install what the tests and the benchmark lab need on top of the service (scripts/setup.sh): the OS
# programs the tests run for real, and requirements-dev.txt into .venv. Sourced by scripts/test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh

command -v redis-server >/dev/null 2>&1 || apt_install redis-server  # every test starts its own
[ -x /usr/bin/chromium ] || apt_install chromium  # tests/test_browser.py (Debian's package; Ubuntu's is a snap)
# Apache and apache2-dev's apxs, which pip needs to build mod_wsgi (requirements-dev.txt) against .venv's
# Python; nginx. For tests/test_apache.py and tests/test_nginx.py, which run their own on free ports.
[ -x /usr/bin/apxs ] && [ -x /usr/sbin/apache2 ] || apt_install apache2 apache2-dev
[ -x /usr/sbin/nginx ] || apt_install nginx
# tests/test_deploy_files.py: docker-compose validates docker-compose.yml (no container engine needed);
# systemd-analyze verifies the unit files in deploy/systemd (systemd need not be running).
command -v docker-compose >/dev/null 2>&1 || apt_install docker-compose
command -v systemd-analyze >/dev/null 2>&1 || apt_install systemd
# pip builds mod_wsgi and uWSGI from source: a C compiler and the headers of the Python that makes .venv
command -v gcc >/dev/null 2>&1 || apt_install gcc
"$PYTHON" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(sysconfig.get_path("include") + "/Python.h"))' ||
  apt_install python3-dev
install_requirements requirements-dev.txt
