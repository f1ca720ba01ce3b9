"""qx's pytest plugin: fixtures on in-memory SQLite, each test rolled back."""

from __future__ import annotations

import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import MetaData, func, select

from qx.core import request_context
from qx.db import UnitOfWorkFactory
from qx.examples.orders.domain import Order, OrderLine
from qx.examples.orders.infrastructure import OrdersUnitOfWork, metadata, orders


@pytest.fixture
def qx_metadata() -> MetaData:
    return metadata


@pytest.fixture
def qx_uow_type() -> type[OrdersUnitOfWork]:
    return OrdersUnitOfWork


@pytest.mark.parametrize("run", [1, 2])
async def test_each_test_starts_empty_and_commits_stay_inside_it(
    uow_factory: UnitOfWorkFactory[OrdersUnitOfWork], qx_session: object, run: int
) -> None:
    with request_context(tenant_id="acme"):
        async with uow_factory() as uow:
            assert await uow.orders.count() == 0  # the other run's commit was rolled back
            line = OrderLine(sku="A", quantity=1, unit_price=Decimal("1"))
            await uow.orders.add(Order.place(f"run{run}", [line]))
            await uow.commit()
        async with uow_factory() as uow:
            assert await uow.orders.count() == 1
            rows = await uow.session.scalar(select(func.count()).select_from(orders))
            assert rows == 1


def _venv_without_pytest_asyncio(root: Path) -> Path:
    """A fresh virtual environment holding every package of this one but pytest-asyncio
    (linked, not installed: no network, a second or so)."""
    import venv

    venv.EnvBuilder(with_pip=False).create(root)
    here = Path(next(p for p in sys.path if p.endswith("site-packages")))
    (target,) = root.glob("lib/python*/site-packages")
    for entry in here.iterdir():
        if entry.name.lower().replace("-", "_").startswith("pytest_asyncio"):
            continue
        if not (target / entry.name).exists():
            (target / entry.name).symlink_to(entry)
    return root / "bin" / "python"


def test_pytest_without_pytest_asyncio_still_runs_and_says_why_qx_fixtures_are_off(
    tmp_path: Path,
) -> None:
    # Installing qx must not break pytest in a project that has no pytest-asyncio.
    python = _venv_without_pytest_asyncio(tmp_path / "env")
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_plain.py").write_text("def test_one():\n    assert 1 + 1 == 2\n")
    done = subprocess.run(
        [str(python), "-m", "pytest", "-p", "no:cacheprovider", "test_plain.py"],
        capture_output=True,
        text=True,
        cwd=project,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
    assert "pip install 'qx[testing]'" in done.stdout
