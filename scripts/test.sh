#!/usr/bin/env bash
# Install what the tests need and run them: the README's test command, and what .ci/run calls.
# Arguments go to pytest as they are; without any, everything runs, then the stock pass below.
# Needs the local Redis (127.0.0.1:6379) and RabbitMQ (127.0.0.1:5672) running.
set -euo pipefail
cd "$(dirname "$0")/.."

# promtool (Debian's prometheus package; not on PyPI) checks the /metrics output. Installing it
# uses apt-get, so run this script as root when promtool is missing (or install prometheus first).
if ! command -v promtool >/dev/null 2>&1; then
  echo "test: installing promtool (Debian package prometheus)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

python -m pip install -q -e '.[dev]'

# Without arguments (CI), the integration tests of deliveries, results, acknowledgements and broker
# cuts run a second time on stock aio-pika/aiormq (AMQP_FAST_PATH=off reaches the replicas they
# start), so the fast path is never what makes them pass. About 45 s. Exit status: the first
# failure's, as with exec.
STOCK_TESTS=(
  tests/integration/test_delivery.py
  tests/integration/test_result_out.py
  tests/integration/test_fastpath.py
  tests/integration/test_reliability_broker.py
  tests/integration/test_exactly_once.py
  tests/integration/test_crashes.py
  tests/integration/test_consumer_timeout.py
)
if [ "$#" -gt 0 ]; then
  exec python -m pytest "$@"
fi
main=0
python -m pytest || main=$?
echo "test: again on stock aio-pika/aiormq (AMQP_FAST_PATH=off): ${STOCK_TESTS[*]}"
stock=0
AMQP_FAST_PATH=off python -m pytest -q "${STOCK_TESTS[@]}" || stock=$?
if [ "$main" -ne 0 ]; then
  exit "$main"
fi
exit "$stock"
