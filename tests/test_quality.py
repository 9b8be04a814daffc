"""The code stays lint-clean, type-checked, layered and readable (the checks a reviewer runs)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "worker"

MAX_MODULE_LINES = 300
MAX_FUNCTION_LINES = 40

# Modules allowed over MAX_MODULE_LINES, each with the reason. Keep it empty: split the module.
MODULE_EXCEPTIONS: dict[str, str] = {}
# Functions ("path/to/module.py:name") allowed over MAX_FUNCTION_LINES, each with the reason.
FUNCTION_EXCEPTIONS: dict[str, str] = {}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)


def package_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_ruff_reports_nothing() -> None:
    """``ruff check`` finds no problem in the package, tests and benchmarks."""
    ruff = shutil.which("ruff") or "ruff"
    done = run(ruff, "check", "worker", "tests", "bench")
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_strict_reports_nothing() -> None:
    """``mypy`` (strict, configured in pyproject.toml) finds no type error in the package."""
    done = run(sys.executable, "-m", "mypy")
    assert done.returncode == 0, done.stdout + done.stderr


def test_imports_run_down_the_layers() -> None:
    """``lint-imports`` keeps the layers contract of pyproject.toml: no module imports a higher layer."""
    lint_imports = shutil.which("lint-imports") or "lint-imports"
    done = run(lint_imports, "--no-cache")
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_module_is_longer_than_a_sitting() -> None:
    """No module under ``worker/`` has more than 300 lines unless it is a named exception."""
    too_long = {
        str(path.relative_to(ROOT)): lines
        for path in package_modules()
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert {name: n for name, n in too_long.items() if name not in MODULE_EXCEPTIONS} == {}


def test_no_function_is_longer_than_a_screen() -> None:
    """No function under ``worker/`` spans more than 40 lines (def line to its last line)."""
    too_long: dict[str, int] = {}
    for path in package_modules():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                name = f"{path.relative_to(ROOT)}:{node.name}"
                if lines > MAX_FUNCTION_LINES and name not in FUNCTION_EXCEPTIONS:
                    too_long[f"{name}:{node.lineno}"] = lines
    assert too_long == {}
