"""``qx db init``: the Alembic files a new service copies, pointing at its metadata."""

from __future__ import annotations

import re
import sys
from importlib import resources
from pathlib import Path

from qx.core._errors import ConfigurationError
from qx.migrations._environment import load_metadata

__all__ = ["init_environment"]


def _template(name: str, folder: str = "templates") -> str:
    return (resources.files("qx.migrations") / folder / name).read_text(encoding="utf-8")


def init_environment(
    directory: str | Path, *, metadata: str, scripts: str = "migrations"
) -> list[Path]:
    """Write ``alembic.ini``, ``<scripts>/env.py``, ``<scripts>/script.py.mako`` and
    ``<scripts>/versions/`` under ``directory``.

    Args:
        directory: the service's root (where ``alembic.ini`` goes).
        metadata: ``"package.module:attribute"`` of the service's ``MetaData``.
        scripts: the migrations directory name.

    Returns:
        The files written.

    Raises:
        ConfigurationError: a bad ``metadata`` target (malformed, not importable from
            ``directory``, or not a ``MetaData``), or files that already exist.
    """
    if not re.fullmatch(r"[\w\-]+", scripts):
        raise ConfigurationError(f"invalid migrations directory name {scripts[:200]!r}")
    root = Path(directory)
    _check_importable(root, metadata)  # the target's form too: load_metadata's one rule
    files = {
        root / "alembic.ini": _template("alembic.ini.tmpl").replace("{directory}", scripts),
        root / scripts / "env.py": _template("env.py.tmpl").replace("{target}", metadata),
        root / scripts / "script.py.mako": _template("script.py.mako", "environment"),
    }
    existing = [str(path) for path in files if path.exists()]
    if existing:
        raise ConfigurationError(f"refusing to overwrite {', '.join(existing)}")
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
    versions = root / scripts / "versions"
    versions.mkdir(parents=True, exist_ok=True)
    return [*files, versions]


def _check_importable(root: Path, target: str) -> None:
    """Import the metadata as ``env.py`` will (``alembic.ini`` puts the root on the path), so
    a typo fails now, in one line, rather than at the first ``upgrade``."""
    entry = str(root.resolve())
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        load_metadata(target)
    finally:
        if added:
            sys.path.remove(entry)
