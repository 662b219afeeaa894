"""The docs: the site builds with `mkdocs build --strict` (a broken link or anchor fails it), and the README
stays a five-minute read whose links all land."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def mkdocs_build(root: Path, site: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("mkdocs", reason="the docs site needs the test extra (mkdocs-material)")
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(root / "mkdocs.yml"),
         "--site-dir", str(site)],
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=120,
    )  # fmt: skip


def test_site_builds_strict(tmp_path) -> None:
    proc = mkdocs_build(ROOT, tmp_path / "site")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "site" / "serving" / "index.html").is_file()


@pytest.mark.parametrize("link", ["[gone](no-such-page.md)", "[gone](serving.md#no-such-section)"])
def test_a_broken_link_fails_the_build(tmp_path, link) -> None:
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    with open(tmp_path / "docs" / "index.md", "a", encoding="utf-8") as f:
        f.write(f"\n{link}\n")
    proc = mkdocs_build(tmp_path, tmp_path / "site")
    target = link.split("(")[1].rstrip(")").split("#")[-1]
    assert proc.returncode != 0 and target in proc.stderr, proc.stderr[-3000:]


def test_readme_is_short_and_its_links_land() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode()) <= 12 * 1024
    targets = re.findall(r"\]\(((?!https?://)[^)#]+)(?:#[^)]*)?\)", readme)
    assert "docs/serving.md" in targets
    missing = [t for t in targets if not (ROOT / t).is_file()]
    assert not missing, missing
