"""qx's ``pytest11`` entry point: loads :mod:`qx.testing.plugin` only when it can work.

Installing qx must never break pytest for a project that does not use qx's fixtures. The
fixtures need ``pytest-asyncio``; without it this module registers nothing and says so in
pytest's header, with the command that installs what is missing (``qx[testing]``). Nothing
beyond pytest is imported until pytest configures itself.
"""

from __future__ import annotations

import importlib.util
from typing import Any

__all__ = ["pytest_configure", "pytest_report_header"]

HINT = "qx fixtures off: pytest-asyncio is not installed (pip install 'qx[testing]')"


def _usable() -> bool:
    try:
        return importlib.util.find_spec("pytest_asyncio") is not None
    except (ImportError, ValueError):
        return False


def pytest_configure(config: Any) -> None:
    """Register qx's fixtures when pytest-asyncio is there."""
    if _usable() and not config.pluginmanager.has_plugin("qx.testing.plugin"):
        config.pluginmanager.import_plugin("qx.testing.plugin")


def pytest_report_header(config: Any) -> str | None:
    """Say why qx's fixtures are missing, when they are."""
    return None if _usable() else HINT
