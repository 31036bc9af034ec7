#!/usr/bin/env bash
# The whole stack on this machine: installs what is missing, then redis-server (unless REDIS_URL,
# REDIS_HOST, REDIS_PORT or REDIS_SENTINELS names one), the model worker and gunicorn. Ctrl-C stops all
# of it. Arguments go to stack.py.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec .venv/bin/python stack.py "$@"
