"""The code stays lint-clean and type-checked (the same checks a reviewer runs)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)


def test_ruff_reports_nothing() -> None:
    """``ruff check`` finds no problem in the package, tests and benchmarks."""
    ruff = shutil.which("ruff") or "ruff"
    done = run(ruff, "check", "worker", "tests", "bench")
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_strict_reports_nothing() -> None:
    """``mypy`` (strict, configured in pyproject.toml) finds no type error in the package."""
    done = run(sys.executable, "-m", "mypy")
    assert done.returncode == 0, done.stdout + done.stderr
