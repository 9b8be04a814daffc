"""Every test runs with an environment of its own: no ``.env`` and no outer setting reaches it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# A test run by a pytest of its own, in a folder holding a ``.env``, with the repository's
# autouse fixture; it fails if anything from outside reached it.
PROBE = '''
import os
from pathlib import Path

from tests.conftest import Names
from worker.core.settings import load_settings


def test_probe(names: Names) -> None:
    """The settings of a test are the defaults, whatever the shell and the .env say."""
    settings = load_settings()
    assert settings.prefetch == 1024
    assert settings.input_queue == "neiromatrius.messages"
    assert settings.redis_url == ""
    assert settings.amqp_fast_path is False  # the one setting CI passes in on purpose
    assert not {"PREFETCH", "prefetch", "OTEL_SERVICE_NAME", "REDIS_URL"} & set(os.environ)
    assert not Path(".env").exists()
    assert "PREFETCH" not in names.env(redis=False)
'''
CONFTEST = "from tests.conftest import isolated_environment, names  # noqa: F401\n"


def test_dotenv_and_outer_variables_do_not_reach_a_test(tmp_path: Path) -> None:
    """A ``.env`` where pytest runs and ``PREFETCH=7`` (any case), ``REDIS_URL`` and ``OTEL_*`` in
    the shell reach neither a test's ``Settings`` nor its replicas' environment, while
    ``AMQP_FAST_PATH`` from outside is kept."""
    (tmp_path / ".env").write_text("PREFETCH=9\nINPUT_QUEUE=from-dotenv\n", encoding="utf-8")
    (tmp_path / "test_probe.py").write_text(PROBE, encoding="utf-8")
    (tmp_path / "conftest.py").write_text(CONFTEST, encoding="utf-8")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PREFETCH": "7",
        "prefetch": "8",
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "OTEL_SERVICE_NAME": "leaked",
        "AMQP_FAST_PATH": "off",
    }
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_probe.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
