#!/usr/bin/env bash
# The codeExecution tool's sandbox: bubblewrap, and ./.venv-sandbox with the libraries code may import. Code
# execution fails closed without them (a 400 naming what is missing); nothing else needs them, so a failure here
# is reported and set-up goes on.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! command -v bwrap > /dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    apt-get install -y -qq bubblewrap > /dev/null 2>&1 \
      || { apt-get update -qq > /dev/null 2>&1 && apt-get install -y -qq bubblewrap > /dev/null 2>&1; } \
      || echo "note: installing bubblewrap failed; code execution will not be available" >&2
  else
    echo "note: code execution needs bubblewrap (Debian/Ubuntu: sudo apt-get install bubblewrap); the rest of" \
         "gemserve works without it" >&2
  fi
fi
stamp=.venv-sandbox/.gemserve-setup
want=$(cat scripts/sandbox-requirements.txt scripts/setup-sandbox.sh | sha256sum | cut -d" " -f1)
[ "$(cat "$stamp" 2> /dev/null)" = "$want" ] && exit 0
base=python3
target=.venv-sandbox
rm -rf .venv-sandbox
if [ "$(id -u)" = 0 ]; then
  # Run as root, the sandbox drops to nobody, who must be able to read the interpreter and the environment:
  # the system's Python, under /usr, and an environment outside this checkout when nobody cannot enter it
  # (a checkout under /root, say), with .venv-sandbox a link to it.
  [ -x /usr/bin/python3 ] && base=/usr/bin/python3
  if ! setpriv --reuid=65534 --regid=65534 --clear-groups test -r "$PWD/scripts/setup-sandbox.sh" 2> /dev/null; then
    target=/opt/gemserve-sandbox/$(pwd | sha256sum | cut -c1-16)
    rm -rf "$target"
    mkdir -p "$(dirname "$target")" && chmod 755 "$(dirname "$target")"
    ln -s "$target" .venv-sandbox
  fi
fi
if "$base" -m venv --without-pip "$target" \
   && .venv/bin/python -m pip --python .venv-sandbox/bin/python install --quiet --progress-bar off \
        -r scripts/sandbox-requirements.txt; then
  echo "$want" > "$stamp"
else
  echo "note: the sandbox's Python environment (.venv-sandbox) could not be made; code execution will not be" \
       "available" >&2
fi
