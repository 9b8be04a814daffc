"""Readers for the deployment files, shared by the tests in this folder.

No Docker engine runs where the tests run, so the tests read the files the way Docker would:
a Dockerfile as instructions grouped into stages, `.dockerignore` as Docker's ordered patterns,
Compose files as YAML with `${VAR:-default}` interpolation.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE_FILE = REPO / "docker-compose.yml"
DOKPLOY_REDIS_FILE = REPO / "deploy" / "dokploy" / "docker-compose.redis.yml"
OPERATOR_GUIDE = REPO / "deploy" / "README.md"
LOCK_FILE = REPO / "requirements.lock"
COMPOSE_SCHEMA = REPO / "tests" / "data" / "compose-spec.json"


@dataclass(frozen=True, slots=True)
class Instruction:
    """One Dockerfile instruction with its continuation lines joined."""

    keyword: str
    arguments: str

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form CMD/HEALTHCHECK/ENTRYPOINT, or None for shell form."""
        text = self.arguments
        if self.keyword == "HEALTHCHECK":
            _, found, text = text.partition("CMD ")
            text = text.strip() if found else ""
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list)
        return [str(item) for item in value]

    def flags_and_words(self) -> tuple[dict[str, str], list[str]]:
        """`--name=value` flags and the remaining words of a COPY/FROM-style instruction."""
        flags: dict[str, str] = {}
        words: list[str] = []
        for word in shlex.split(self.arguments):
            if word.startswith("--") and not words:
                name, _, value = word[2:].partition("=")
                flags[name] = value
            else:
                words.append(word)
        return flags, words

    def env_pairs(self) -> dict[str, str]:
        """The `KEY=value` pairs of an ENV instruction."""
        pairs: dict[str, str] = {}
        for word in shlex.split(self.arguments):
            key, sep, value = word.partition("=")
            assert sep, f"ENV without '=' is deprecated: {self.arguments!r}"
            pairs[key] = value
        return pairs


@dataclass(frozen=True, slots=True)
class Stage:
    """A `FROM ... AS name` stage and its instructions."""

    name: str
    base: str
    instructions: tuple[Instruction, ...]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage {self.name!r} has no {keyword}"
        return found[-1]


def read_dockerfile(path: Path = DOCKERFILE) -> tuple[dict[str, str], list[Stage]]:
    """The global ARG defaults and the stages of a Dockerfile, in order."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    current: list[Instruction] | None = None
    for line in logical:
        keyword, _, arguments = line.partition(" ")
        instruction = Instruction(keyword.upper(), arguments.strip())
        if instruction.keyword == "FROM":
            _, words = instruction.flags_and_words()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), words[0])
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else str(len(stages))
            current = []
            stages.append(Stage(name, base, ()))
            continue
        if current is None:
            if instruction.keyword == "ARG":
                key, _, value = instruction.arguments.partition("=")
                args[key] = value
            continue
        current.append(instruction)
        stages[-1] = Stage(stages[-1].name, stages[-1].base, tuple(current))
    return args, stages


class DockerIgnore:
    """`.dockerignore` semantics: ordered patterns, `!` re-includes, a match covers a directory."""

    def __init__(self, path: Path = DOCKERIGNORE) -> None:
        self._rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in path.read_text(encoding="utf-8").splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            include = line.startswith("!")
            pattern = line.removeprefix("!").strip().strip("/")
            self._rules.append((include, re.compile(self._to_regex(pattern))))

    @staticmethod
    def _to_regex(pattern: str) -> str:
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                out += ".*"
                i += 2
            elif pattern[i] == "*":
                out += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                out += "[^/]"
                i += 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out += pattern[i : end + 1]
                i = end + 1
            else:
                out += re.escape(pattern[i])
                i += 1
        return out + r"\Z"

    def excludes(self, relative_path: str) -> bool:
        """Whether the file at this context-relative path stays out of the build context."""
        parts = relative_path.strip("/").split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        excluded = False
        for include, regex in self._rules:
            if any(regex.match(prefix) for prefix in prefixes):
                excluded = not include
        return excluded


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML document that must be a mapping."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path.name} is not a mapping"
    return data


_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<plain>\w+))"
)


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`, `$$`."""

    def substitute(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        name = match.group("braced") or match.group("plain")
        op, arg = match.group("op"), match.group("arg") or ""
        current = env.get(name)
        if op in (":-", ":?") and not current:
            assert op == ":-", f"${{{name}}} is required: {arg}"
            return arg
        if op in ("-", "?") and current is None:
            assert op == "-", f"${{{name}}} is required: {arg}"
            return arg
        return current or ""

    return _INTERPOLATION.sub(substitute, value)


def service_environment(
    service: Mapping[str, Any], env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """A service's `environment` (mapping or list form), interpolated as Compose would."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(str(item).partition("=")[::2] for item in raw)
    return {str(k): interpolate("" if v is None else str(v), env or {}) for k, v in raw.items()}


def command_words(service: Mapping[str, Any], env: Mapping[str, str] | None = None) -> list[str]:
    """A service's `command` as a list of words, interpolated."""
    raw = service["command"]
    words = shlex.split(raw) if isinstance(raw, str) else [str(w) for w in raw]
    return [interpolate(word, env or {}) for word in words]


def healthcheck_shell(service: Mapping[str, Any], env: Mapping[str, str] | None = None) -> str:
    """A service's healthcheck as a `sh -c` script (CMD-SHELL) after interpolation."""
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return interpolate(test, env or {})
    kind, *rest = test
    if kind == "CMD-SHELL":
        return interpolate(rest[0], env or {})
    assert kind == "CMD", f"unknown healthcheck form {kind!r}"
    return shlex.join(interpolate(word, env or {}) for word in rest)
