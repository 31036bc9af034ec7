#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: installs what is missing (scripts/setup-dev.sh: the service,
# then the test tools and the OS programs the tests run), then runs ruff and pytest.
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow" for the fast tests only.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-dev.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
