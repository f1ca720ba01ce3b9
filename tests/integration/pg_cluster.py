"""A PostgreSQL primary and streaming standbys of the test's own, from the installed server
binaries (``pg_config --bindir``), on free ports, as the ``postgres`` user.

Never the machine's own server: each cluster lives in a temporary folder and is stopped and
removed by :meth:`PgCluster.stop`. Used by the replica tests (issue 24).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = ["PgCluster", "PgServer", "cluster_or_skip", "server_binaries"]


def cluster_or_skip(what: str) -> PgCluster:
    """A new cluster folder, or skip the test saying how to run it: ``what`` says what the
    test starts (its servers, never the machine's)."""
    if os.environ.get("QX_TEST_SKIP_REPLICAS"):
        pytest.skip("QX_TEST_SKIP_REPLICAS is set")
    bindir = server_binaries()
    if bindir is None:
        pytest.skip(
            f"{what}: install the PostgreSQL server binaries (pg_config --bindir must name "
            "initdb, pg_ctl, pg_basebackup)"
        )
    return PgCluster(bindir)


def server_binaries() -> Path | None:
    """The folder of ``initdb``/``pg_ctl``/``pg_basebackup``, or ``None`` when absent."""
    try:
        found = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    folder = Path(found)
    needed = ("initdb", "pg_ctl", "pg_basebackup", "postgres")
    return folder if all((folder / name).exists() for name in needed) else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class PgServer:
    """One server of a cluster."""

    name: str
    data: Path
    port: int
    running: bool = False

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"


@dataclass
class PgCluster:
    """A primary and its standbys (streaming replication, hot standby)."""

    bindir: Path
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="qx-pg-")))
    primary: PgServer | None = None
    standbys: list[PgServer] = field(default_factory=list)

    # -- running commands as the postgres user (initdb refuses root) ----------------------

    def _run(self, *args: str, timeout: float = 60) -> str:
        command = [str(self.bindir / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
        return done.stdout

    def _prepare_root(self) -> None:
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)

    def _configure(self, server: PgServer, extra: dict[str, str]) -> None:
        settings = {
            "port": str(server.port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.root}'",
            "fsync": "off",  # a throw-away cluster: speed over durability on crash
            "full_page_writes": "off",
            "shared_buffers": "'32MB'",
            "max_connections": "60",
            "wal_level": "replica",
            "max_wal_senders": "10",
            "hot_standby": "on",
            "hot_standby_feedback": "on",
            "wal_receiver_status_interval": "'100ms'",
            "logging_collector": "off",
            **extra,
        }
        with (server.data / "postgresql.auto.conf").open("a") as conf:
            for key, value in settings.items():
                conf.write(f"{key} = {value}\n")

    def start_primary(self, **settings: str) -> PgServer:
        self._prepare_root()
        server = PgServer("primary", self.root / "primary", _free_port())
        self._run("initdb", "-D", str(server.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync")  # fmt: skip
        self._configure(server, settings)
        self.primary = server
        self.start(server)
        return server

    def add_standby(self, name: str, **settings: str) -> PgServer:
        assert self.primary is not None, "start the primary first"
        server = PgServer(name, self.root / name, _free_port())
        self._run("pg_basebackup", "-h", "127.0.0.1", "-p", str(self.primary.port), "-U",
                  "postgres", "-D", str(server.data), "-R", "-X", "stream", "--no-sync",
                  "--checkpoint=fast")  # fmt: skip
        # pg_basebackup copied the primary's settings: the standby's own come after them.
        self._configure(server, settings)
        self.standbys.append(server)
        self.start(server)
        return server

    def start(self, server: PgServer) -> None:
        self._run("pg_ctl", "-D", str(server.data), "-l", str(self.root / f"{server.name}.log"),
                  "-w", "-t", "60", "start")  # fmt: skip
        server.running = True

    def stop_server(self, server: PgServer, *, mode: str = "fast") -> None:
        if server.running:
            self._run("pg_ctl", "-D", str(server.data), "-m", mode, "-w", "stop")
            server.running = False

    def promote(self, server: PgServer) -> None:
        self._run("pg_ctl", "-D", str(server.data), "-w", "promote")

    def wait_caught_up(self, server: PgServer, timeout: float = 30) -> None:
        """Block until ``server`` has replayed everything the primary has written now."""
        assert self.primary is not None
        target = self.psql(self.primary, "SELECT pg_current_wal_lsn()")
        deadline = time.monotonic() + timeout
        while True:
            done = self.psql(server, f"SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn")
            if done == "t":
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{server.name} did not replay up to {target}")
            time.sleep(0.02)

    def psql(self, server: PgServer, sql: str) -> str:
        return self._run("psql", "-h", "127.0.0.1", "-p", str(server.port), "-U", "postgres",
                         "-d", "postgres", "-AtXq", "-c", sql).strip()  # fmt: skip

    def stop(self) -> None:
        """Stop every server and remove the folder."""
        for server in [*self.standbys, *([self.primary] if self.primary else [])]:
            with contextlib.suppress(Exception):  # stop the others all the same
                self.stop_server(server, mode="immediate")
        shutil.rmtree(self.root, ignore_errors=True)
