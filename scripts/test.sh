#!/usr/bin/env bash
# Install what the tests need and run them: the README's test command, and what .ci/run calls.
# Needs the local Redis (127.0.0.1:6379) and RabbitMQ (127.0.0.1:5672) running.
set -euo pipefail
cd "$(dirname "$0")/.."

# promtool (Debian's prometheus package; not on PyPI) checks the /metrics output.
if ! command -v promtool >/dev/null 2>&1; then
  echo "test: installing promtool (Debian package prometheus)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

python -m pip install -q -e '.[dev]'
exec python -m pytest "$@"
