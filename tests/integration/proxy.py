"""A TCP proxy the tests can cut and restore, to take a broker away from the code under test."""

from __future__ import annotations

import asyncio
import contextlib


class Proxy:
    """Forwards ``127.0.0.1:<port>`` to ``target``; ``stop()`` drops every connection;
    ``blackhole()`` keeps every connection open and silently forwards nothing, the way a
    dead network path looks to both ends. ``partition()`` is a dead path that heals: bytes
    sent meanwhile are held (as TCP retransmits them) and delivered, in order, by ``heal()``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.blackholed = False
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def blackhole(self) -> None:
        """From now on, accept and read but never deliver a byte, in either direction."""
        self.blackholed = True

    def partition(self) -> None:
        """Deliver nothing until :meth:`heal`, holding what is sent meanwhile."""
        self._open.clear()

    def heal(self) -> None:
        """End a :meth:`partition`: what was held goes through first."""
        self._open.set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()
        self._open.set()  # held bytes have nowhere to go now

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.blackholed:
            self._writers.add(writer)
            with contextlib.suppress(Exception):
                while await reader.read(65536):
                    pass
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._open.wait()
                if self.blackholed or writer.is_closing():
                    continue
                writer.write(data)
                await writer.drain()
        finally:
            with contextlib.suppress(Exception):
                writer.close()
            self._writers.discard(writer)
