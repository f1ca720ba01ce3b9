"""Where a service's new revision goes: one rule for ``qx db revision`` and plain
``alembic revision``.

A service's ``alembic.ini`` lists its own versions folder and qx's chain (shipped in the
installed package). Left to itself, Alembic puts a revision beside the head it is based
on: a service's first revision, based on qx's head, would be written into the installed
package (lost on the next install, and polluting qx's chain). So every revision command
runs the service's ``env.py`` (``revision_environment = true``), whose
``process_revision_directives`` hook (:func:`place_new_revisions`, installed by
:func:`qx.migrations.run_migrations`) puts the revision on the service's own head, in the
service's folder, depending on qx's head when the service's chain does not already.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic.script import ScriptDirectory
from alembic.util import coerce_resource_to_filename

from qx.core._errors import ConfigurationError

__all__ = ["QX_VERSIONS", "Placement", "place_new_revisions", "placement", "qx_versions"]

QX_VERSIONS = "qx.migrations:versions"
"""The package resource holding qx's revisions: list it in a service's
``version_locations``."""


def qx_versions() -> Path:
    """The folder of qx's own revisions in the installed package."""
    return coerce_resource_to_filename(QX_VERSIONS).resolve()


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a new revision goes: on ``head``, written in ``version_path`` (``None``: beside
    ``head``), depending on ``depends_on``."""

    head: str
    version_path: str | None
    depends_on: tuple[str, ...]


def _locations(script: ScriptDirectory) -> list[str]:
    return [str(loc) for loc in script.version_locations] or [str(Path(script.dir) / "versions")]


def placement(script: ScriptDirectory) -> Placement | None:
    """Where a new revision of the service goes, or ``None`` when its ini does not list
    qx's chain beside its own folder (plain Alembic then).

    Raises:
        ConfigurationError: the service's own chain has several heads (merge them first).
    """
    qx_dir = qx_versions()
    own_dirs = [
        path
        for path in (coerce_resource_to_filename(str(loc)).resolve() for loc in _locations(script))
        if path != qx_dir
    ]
    # get_heads(), not get_revisions("heads"): a qx head that a service's revision depends
    # on is still the head of qx's chain.
    heads = [script.get_revision(head) for head in script.get_heads()]
    qx_heads = [
        rev for rev in heads if rev is not None and Path(rev.path).resolve().parent == qx_dir
    ]
    if not qx_heads or not own_dirs:
        return None
    own_heads = [rev for rev in heads if rev is not None and rev not in qx_heads]
    if len(own_heads) > 1:
        names = ", ".join(sorted(rev.revision for rev in own_heads))
        raise ConfigurationError(
            f"your migrations have several heads ({names}): join them with `qx db merge` first"
        )
    behind = [rev.revision for rev in qx_heads]
    if own_heads:
        reached = {rev.revision for rev in script.iterate_revisions(own_heads[0].revision, "base")}
        behind = [rev for rev in behind if rev not in reached]
    return Placement(
        head=own_heads[0].revision if own_heads else "base",
        version_path=None if own_heads else str(own_dirs[0]),
        depends_on=tuple(behind),
    )


def place_new_revisions(context: Any, revision: Any, directives: Iterable[Any]) -> None:
    """``process_revision_directives``: put each new revision where :func:`placement`
    says, unless the command named its head or folder itself (``--head``,
    ``--version-path``)."""
    script = getattr(context, "script", None)
    if script is None:
        return
    for directive in directives:
        # Alembic's command line leaves head None unless --head is given; its API says "head".
        if directive.head not in (None, "head") or directive.version_path is not None:
            continue
        where = placement(script)
        if where is None:
            continue
        directive.head = where.head
        directive.version_path = where.version_path
        if where.depends_on:
            given = directive.depends_on
            given = [given] if isinstance(given, str) else list(given or ())
            directive.depends_on = [*given, *(d for d in where.depends_on if d not in given)]
