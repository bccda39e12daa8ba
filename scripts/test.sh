#!/usr/bin/env bash
# Sets up .venv (scripts/setup_env.sh) and runs the whole test suite. Extra args go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup_env.sh"
cd "$repo"
exec "$repo/.venv/bin/python" -m pytest -q "$@"
