"""A TCP proxy the tests can cut and restore, to take a broker away from the code under test."""

from __future__ import annotations

import asyncio
import contextlib


class Proxy:
    """Forwards ``127.0.0.1:<port>`` to ``target``; ``stop()`` drops every connection;
    ``blackhole()`` keeps every connection open and silently forwards nothing, the way a
    dead network path looks to both ends. ``partition()`` is a dead path that heals: bytes
    sent meanwhile are held (as TCP retransmits them) and delivered, in order, by ``heal()``.
    ``cut_at(marker)`` makes a connection die around the first client message holding
    ``marker`` (say ``b"COMMIT"``): the message reaches the server and its answer is lost,
    or (``deliver=False``) the message is lost too; ``refuse=True`` refuses every connection
    after the cut; ``hold_server=True`` delivers the message and drops the client at once
    while the server's end stays open (its session lives on, answering nobody), as when
    only the client's side of the path died. ``sent`` is every byte clients sent."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.blackholed = False
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._cut: tuple[bytes, bool, bool, bool] | None = None
        self.sent = bytearray()
        self.refusing = False
        self.cuts = 0
        self.cut_made = asyncio.Event()  # set by the first cut

    def cut_at(
        self,
        marker: bytes,
        *,
        deliver: bool = True,
        refuse: bool = False,
        hold_server: bool = False,
    ) -> None:
        """Kill the next connection whose client sends ``marker`` (see the class)."""
        self._cut = (marker, deliver, refuse, hold_server)

    def _count_cut(self) -> None:
        self.cuts += 1
        self.cut_made.set()

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
        if self.refusing:
            writer.close()
            return
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
        answer_lost = asyncio.Event()
        await asyncio.gather(
            self._pipe(reader, up_writer, client=writer, answer_lost=answer_lost),
            self._pipe(up_reader, writer, answer_lost=answer_lost),
            return_exceptions=True,
        )

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        answer_lost: asyncio.Event,
        client: asyncio.StreamWriter | None = None,
    ) -> None:
        hold = False
        try:
            while data := await reader.read(65536):
                if client is not None:
                    self.sent += data
                await self._open.wait()
                if answer_lost.is_set():
                    # The server answered the cut message: the client never hears it.
                    self._count_cut()
                    for end in (writer, client):
                        if end is not None:
                            end.close()
                    return
                if self.blackholed or writer.is_closing():
                    continue
                cut = self._cut
                if client is not None and cut is not None and cut[0] in data:
                    self._cut = None
                    _, deliver, refuse, hold = cut
                    self.refusing = refuse
                    if not deliver:  # lost on the way: the server sees the client vanish
                        self._count_cut()
                        writer.close()
                        client.close()
                        return
                    if hold:  # delivered; the client's end dies, the server's lives on
                        writer.write(data)
                        await writer.drain()
                        self._count_cut()
                        client.close()
                        return
                    answer_lost.set()
                writer.write(data)
                await writer.drain()
        finally:
            if not hold:
                with contextlib.suppress(Exception):
                    writer.close()
                self._writers.discard(writer)
