"""The project's layout as it was specified (issue 25): qx's own migration chain at the top
level beside the package, the two test suites, the project file and the compose file."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_top_level_holds_what_the_project_was_specified_with() -> None:
    for folder in (
        "migrations",
        "migrations/versions",
        "src/qx",
        "tests/unit",
        "tests/integration",
    ):
        assert (ROOT / folder).is_dir(), folder
    for file in ("pyproject.toml", "docker-compose.yml", "migrations/env.py"):
        assert (ROOT / file).is_file(), file
    assert sorted((ROOT / "migrations" / "versions").glob("qx_0001_*.py"))
