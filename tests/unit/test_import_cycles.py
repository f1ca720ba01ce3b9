"""No module of ``qx.db`` imports, at run time or for type checking, a module that imports it
back: each layer depends on the ones below it only."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import qx

SRC = Path(qx.__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, package: str) -> set[str]:
    """Every ``qx.*`` module a module imports anywhere (module level, ``TYPE_CHECKING``
    blocks, functions), with the packages whose ``__init__`` that import runs."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        for name in names:
            if not name.startswith("qx."):
                continue
            parts = name.split(".")
            for end in range(2, len(parts) + 1):
                candidate = ".".join(parts[:end])
                if package == candidate or package.startswith(candidate + "."):
                    continue  # the importer's own packages are initialised already
                found.add(candidate)
    return found


def test_no_import_cycle_inside_qx_db() -> None:
    modules = {module_name(p): p for p in (SRC / "qx" / "db").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        graph[name] = {m for m in imports_of(path, package) if m in modules and m != name}

    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == [], "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_domain_layer_imports_no_sqlalchemy_and_no_pydantic() -> None:
    # A domain module's one import (issue 23): `from qx import AggregateRoot` or qx.core.
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from qx import AggregateRoot, DomainEvent, IntegrationEvent, NotFound\n"
        "import qx.core\n"
        "heavy = sorted(m for m in ('sqlalchemy', 'pydantic', 'qx.db', 'qx.outbox')"
        " if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "import qx\n"
        "assert qx.Repository.__module__.startswith('qx.db')  # loaded on first use\n"
        "assert 'sqlalchemy' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "module",
    [
        "qx", "qx.core", "qx.cqrs", "qx.db", "qx.db.query", "qx.outbox", "qx.outbox.publishers",
        "qx.migrations", "qx.settings", "qx.testing", "qx.cli", "qx._schema", "qx.cqrs._table",
        "qx.outbox._table", "qx.outbox._relay", "qx.db._uow", "qx.examples.orders.api",
    ],
)  # fmt: skip
def test_every_package_imports_first_in_a_fresh_interpreter(module: str) -> None:
    # The lazy re-exports change which module loads first; none may meet a half-made one.
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]


ABOVE_THE_DATABASE = ("qx.outbox", "qx.cqrs", "qx.testing", "qx.migrations", "qx.cli", "qx._schema")


def test_the_database_layer_imports_nothing_above_it() -> None:
    # qx.db knows nothing of the outbox or the bus: they plug into the commit from above
    # (commit stages, the dispatcher), issue 23.
    found = []
    for path in sorted((SRC / "qx" / "db").rglob("*.py")):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for target in sorted(imports_of(path, package)):
            if target.startswith(ABOVE_THE_DATABASE):
                found.append(f"{name} imports {target}")
    assert found == []


def test_importing_the_database_layer_loads_nothing_above_it() -> None:
    import subprocess
    import sys

    code = (
        "import sys, qx.db, qx.db.query\n"
        f"above = sorted(m for m in sys.modules if m.startswith({ABOVE_THE_DATABASE!r}))\n"
        "assert not above, above\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


# A backend's name compared with a string, either way round, or a dialect's name compared.
_DIALECT_TEST = re.compile(
    r"""(==|!=)\s*["'](postgresql|sqlite)["']|["'](postgresql|sqlite)["']\s*(==|!=)"""
    r"""|in\s*\(\s*["'](postgresql|sqlite)["']|dialect\.name\s*(==|!=)"""
    r"""|get_backend_name\(\)\s*(==|!=)"""
)
DIALECT_STRATEGIES = {
    "qx/db/_dialect.py",
    "qx/db/_dialect_base.py",
    "qx/db/_postgresql.py",
    "qx/db/_sqlite.py",
}


def test_no_dialect_name_is_compared_outside_the_dialect_strategies() -> None:
    found = []
    for path in sorted((SRC / "qx").rglob("*.py")):
        relative = path.relative_to(SRC).as_posix()
        if relative in DIALECT_STRATEGIES:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if _DIALECT_TEST.search(line):
                found.append(f"{relative}:{number}: {line.strip()}")
    assert found == [], "ask the backend's Dialect (qx.db._dialect) instead:\n" + "\n".join(found)


def test_the_dialect_rule_sees_the_shapes_it_forbids() -> None:
    # The rule above is only as good as its pattern: each shape it must catch, caught.
    for shape in (
        'if engine.dialect.name == "postgresql":',
        "render_as_batch = name != 'sqlite'",
        'if "sqlite" == backend:',
        "if url.get_backend_name() == backend:",
        'if name in ("postgresql", "sqlite"):',
    ):
        assert _DIALECT_TEST.search(shape), shape
    assert not _DIALECT_TEST.search('JSON().with_variant(JSONB(), "postgresql")')
