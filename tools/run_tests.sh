#!/usr/bin/env bash
# Set up the environment (idempotent) and run HARNet's test suite.
#   tools/run_tests.sh [pytest args...]
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then  # the comment above is the usage
  sed -n '2,/^[^#]/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
  exit 0
fi
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/setup_env.sh"
VENV="${HARNET_VENV:-$ROOT/.venv}"
cd "$ROOT"
# pytest exits 5 when it collected no test; that is a failure here too (set -e).
exec "$VENV/bin/python" -m pytest "$@"
