"""The documentation site: it builds strict, a broken link fails the build, and the API
reference documents every public name of every public package."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MKDOCS = Path(sys.executable).with_name("mkdocs")
PACKAGES = (
    "qx",
    "qx.core",
    "qx.cqrs",
    "qx.db",
    "qx.db.query",
    "qx.errors",
    "qx.migrations",
    "qx.outbox",
    "qx.settings",
    "qx.testing",
)

pytestmark = pytest.mark.skipif(not MKDOCS.exists(), reason="mkdocs is in the docs group")


def _build(project: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MKDOCS), "build", "--strict", "--site-dir", str(site)],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


def _inventory(site: Path) -> set[str]:
    """The objects the site documents, from the inventory mkdocstrings writes."""
    data = (site / "objects.inv").read_bytes()
    start = 0
    for _ in range(4):  # four header lines, then zlib
        start = data.index(b"\n", start) + 1
    lines = zlib.decompress(data[start:]).decode().splitlines()
    return {line.split(" ", 1)[0] for line in lines}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("site-project")
    for name in ("mkdocs.yml", "CHANGELOG.md"):
        shutil.copy(ROOT / name, copy / name)
    for name in ("docs", "src"):
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_the_reference_documents_every_public_name(project: Path, tmp_path: Path) -> None:
    built = _build(project, tmp_path / "site")
    assert built.returncode == 0, built.stderr[-3000:]
    documented = _inventory(tmp_path / "site")
    missing = [
        f"{package}.{name}"
        for package in PACKAGES
        for name in importlib.import_module(package).__all__
        if not name.startswith("__") and f"{package}.{name}" not in documented
    ]
    assert not missing, missing


def test_a_broken_link_or_anchor_fails_the_build(project: Path, tmp_path: Path) -> None:
    page = project / "docs" / "how-to" / "testing.md"
    original = page.read_text(encoding="utf-8")
    try:
        page.write_text(original + "\n[gone](../nowhere.md), [lost](migrations.md#no-such)\n")
        built = _build(project, tmp_path / "site")
    finally:
        page.write_text(original, encoding="utf-8")
    assert built.returncode != 0
    assert "nowhere.md" in built.stderr and "#no-such" in built.stderr
