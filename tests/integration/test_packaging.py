"""What PyPI would ship: the sdist and wheel built from this checkout, their metadata, and the
wheel installed into a fresh environment outside the repository, used as a new service would
(qx's chain and the example's applied from the package's own resources)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: The extras a user may install; development tools are dependency groups, not extras.
USER_EXTRAS = {
    "api",
    "brokers",
    "cli",
    "kafka",
    "metrics",
    "nats",
    "otel",
    "postgres",
    "rabbitmq",
    "redis",
    "sqlite",
    "testing",
}


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_the_wheel_and_sdist_carry_the_license_urls_and_only_user_extras(dist: Path) -> None:
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "MIT License" in license_text
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA")).rsplit("/", 1)[0]
        assert archive.read(f"{info}/licenses/LICENSE").decode() == license_text
        metadata = Parser().parsestr(archive.read(f"{info}/METADATA").decode())
    assert metadata["License-Expression"] == "MIT"
    urls = dict(url.split(", ", 1) for url in metadata.get_all("Project-URL") or [])
    assert {"Homepage", "Repository", "Issues", "Changelog"} <= set(urls)
    assert set(metadata.get_all("Provides-Extra") or []) == USER_EXTRAS
    assert not [r for r in metadata.get_all("Requires-Dist") or [] if "ruff" in r or "mypy" in r]
    for shipped in (
        "qx/py.typed",
        "qx/migrations/versions/qx_0001_outbox_inbox.py",
        "qx/migrations/environment/env.py",
        "qx/migrations/environment/script.py.mako",
        "qx/migrations/templates/alembic.ini.tmpl",
        "qx/examples/orders/migrations/alembic.ini",
        "qx/examples/orders/migrations/versions/orders_0001_orders.py",
    ):
        assert shipped in names, shipped
    # qx's chain is developed in the top-level migrations/ and shipped whole in the package.
    chain = sorted(p.name for p in (ROOT / "migrations" / "versions").glob("qx_*.py"))
    assert len(chain) >= 8
    shipped_chain = sorted(
        n.rsplit("/", 1)[1] for n in names if n.startswith("qx/migrations/versions/qx_")
    )
    assert shipped_chain == chain
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        root = archive.getnames()[0].split("/", 1)[0]
        member = archive.extractfile(f"{root}/LICENSE")
        assert member is not None and member.read().decode() == license_text


def _fresh_environment(root: Path, wheel: Path) -> Path:
    """A virtual environment holding this one's dependencies (linked) and qx from the
    wheel (unpacked: a pure-Python wheel's install), not from the checkout."""
    import venv

    venv.EnvBuilder(with_pip=False).create(root)
    here = Path(next(p for p in sys.path if p.endswith("site-packages")))
    (target,) = root.glob("lib/python*/site-packages")
    for entry in here.iterdir():
        name = entry.name.lower()
        if name.startswith(("qx", "_editable_impl_qx", "__editable__")) or name == "qx.pth":
            continue
        if not (target / entry.name).exists():
            (target / entry.name).symlink_to(entry)
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    return root / "bin" / "python"


def test_the_installed_wheel_serves_a_new_service_outside_the_repository(
    dist: Path, tmp_path: Path
) -> None:
    (wheel,) = dist.glob("*.whl")
    python = _fresh_environment(tmp_path / "env", wheel)
    service = tmp_path / "library"
    service.mkdir()
    (service / "library_models.py").write_text(
        textwrap.dedent(
            """
            from sqlalchemy import Column, Integer, String, Table
            from qx.db import make_metadata

            metadata = make_metadata()
            Table("books", metadata, Column("id", Integer, primary_key=True),
                  Column("title", String(200), nullable=False))
            """
        )
    )
    env = {
        key: value for key, value in os.environ.items() if key not in {"PYTHONPATH", "QX_DB__URL"}
    }
    env["QX_DB__URL"] = f"sqlite+aiosqlite:///{service / 'library.sqlite3'}"

    def run(*args: str) -> str:
        done = subprocess.run(
            [str(python), *args],
            capture_output=True,
            text=True,
            cwd=service,
            env=env,
            timeout=180,
            check=False,
        )
        assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}"
        return done.stdout + done.stderr

    where = run("-c", "import qx; print(qx.__file__)")
    assert str(tmp_path / "env") in where and str(ROOT) not in where
    cli = ("-c", "import sys, qx.cli; sys.argv[0] = 'qx'; qx.cli.main()")
    run(*cli, "db", "init", "--metadata", "library_models:metadata")
    # An existing database at an earlier qx revision, then upgraded by the installed wheel,
    # whose revisions come from the repository's top-level migrations/versions.
    run(*cli, "db", "upgrade", "qx_0007")
    assert "qx_0007" in run(*cli, "db", "current")
    run(*cli, "db", "upgrade")
    assert "qx_0010 (head)" in run(*cli, "db", "current")
    run(*cli, "db", "revision", "--autogenerate", "-m", "books")
    (revision,) = (service / "migrations" / "versions").glob("*_books.py")
    assert "create_table('books'" in revision.read_text()
    assert "qx_outbox" not in revision.read_text()
    run(*cli, "db", "upgrade")
    assert "schema is current" in run(*cli, "db", "check")
    # The main job, from the wheel: the example's chain on top of qx's, on SQLite.
    env["QX_DB__URL"] = f"sqlite+aiosqlite:///{tmp_path / 'demo.sqlite3'}"
    report = run(*cli, "demo", "--orders", "3", "--concurrency", "2")
    assert "placed 3 orders" in report, report
    published = re.search(r"outbox rows: (\d+), published to memory://: (\d+)", report)
    assert published is not None and published[1] == published[2] and int(published[1]) >= 3


@pytest.mark.parametrize("database", ["sqlite-file", "sqlite-memory", "postgresql"])
def test_a_script_that_raises_before_dispose_exits_at_once(database: str, tmp_path: Path) -> None:
    # An engine left open (no dispose(), a unit of work's connection mid-use) must not keep
    # the interpreter from exiting: the error is printed and the process ends.
    if database == "postgresql":
        from tests.services import POSTGRES, resolve

        url = resolve(POSTGRES)
    elif database == "sqlite-file":
        url = f"sqlite+aiosqlite:///{tmp_path / 'script.sqlite3'}"
    else:
        url = "sqlite+aiosqlite:///:memory:"
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio, sys
            from sqlalchemy import text
            from qx.db import UnitOfWork, UnitOfWorkFactory, create_engine, create_session_factory
            from qx.settings import DatabaseSettings

            async def main():
                engine = create_engine(DatabaseSettings(url=sys.argv[1]))
                factory = UnitOfWorkFactory(UnitOfWork, create_session_factory(engine))
                async with factory() as uow:
                    await uow.session.execute(text("SELECT 1"))
                    await asyncio.sleep(0)
                    raise RuntimeError("the service's own bug")

            asyncio.run(main())
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script), url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1 and "the service's own bug" in done.stderr, done.stderr
