#!/usr/bin/env bash
# Create or refresh ./.venv-clients with the third-party client libraries of tests/clients/requirements.txt.
# Re-runs are quick: nothing is reinstalled unless the requirements changed.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-clients/bin/python ] || python3 -m venv .venv-clients
stamp=.venv-clients/.gemserve-setup
want=$(sha256sum tests/clients/requirements.txt | cut -d" " -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv-clients/bin/python -m pip install --quiet --progress-bar off -r tests/clients/requirements.txt
  echo "$want" > "$stamp"
fi
