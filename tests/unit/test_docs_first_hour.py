"""What a newcomer reads first says what the project really does: the Dokploy Compose Path, the
benchmark's RSS in prose, and that the test script needs root to install promtool."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dokploy_compose_path_is_where_the_file_is() -> None:
    """deploy/README.md tells the Compose Path to type, says it differs from the source document's
    ``dokploy/docker-compose.redis.yml``, and the file is at that path."""
    text = (ROOT / "deploy" / "README.md").read_text(encoding="utf-8")
    assert "**Compose Path:** `./deploy/dokploy/docker-compose.redis.yml`" in text
    assert "The source document expects it at `dokploy/docker-compose.redis.yml`" in text
    assert (ROOT / "deploy" / "dokploy" / "docker-compose.redis.yml").is_file()
    assert not (ROOT / "dokploy" / "docker-compose.redis.yml").exists()


def test_readme_rss_in_prose_matches_its_table() -> None:
    """The README's "Peak RSS was A–B MB" spans exactly the peak RSS column of its own table."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    header = next(line for line in text.splitlines() if "peak RSS MB" in line)
    column_end = header.index("peak RSS MB") + len("peak RSS MB")
    rows = [line for line in text.splitlines() if re.match(r"^\([a-g]\) ", line)]
    values = [int(v) for row in rows for v in re.findall(r"\d+", row[column_end - 12 : column_end])]
    (prose,) = re.findall(r"Peak RSS was (\d+)–(\d+) MB", text)
    assert len(values) >= 7
    worker_rows = [v for v in values if v > 40]  # the bare consumers (about 30 MB) are not meant
    assert (int(prose[0]), int(prose[1])) == (min(worker_rows), max(worker_rows))


def test_the_test_script_says_it_needs_root_for_apt_get() -> None:
    """scripts/test.sh's comment and the README's line about it say installing promtool with
    apt-get needs root."""
    script = (ROOT / "scripts" / "test.sh").read_text(encoding="utf-8")
    before = script.split("apt-get update", 1)[0].splitlines()
    comment = " ".join(line for line in before if line.startswith("# "))
    assert re.search(r"apt-get.*root", comment), comment
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (line,) = re.findall(r"`scripts/test.sh` installs promtool[^.]*\.", readme.replace("\n", " "))
    assert "apt-get" in line
    assert "root" in line
