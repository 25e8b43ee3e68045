"""The listening socket (server.listen): connections accepted from it have Nagle's
algorithm off. With it on, a keep-alive response written as headers then body waited
for the client's delayed ACK, 40 ms per small request (the manifest row of
scripts/bench fell to 25 requests a second per connection)."""

from __future__ import annotations

import asyncio
import socket

from mirror.server import listen


async def _accepted_nodelay(sock: socket.socket) -> int:
    got: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP,
                                                                  socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(accepted, sock=sock)
    async with server:
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        try:
            return await asyncio.wait_for(got, 10)
        finally:
            writer.close()


def test_connections_accepted_from_the_listening_socket_have_nagle_off():
    sock = listen("127.0.0.1", 0)
    assert sock.proto == socket.IPPROTO_TCP
    assert asyncio.run(_accepted_nodelay(sock)) != 0


def test_a_worker_reopening_the_inherited_socket_keeps_nagle_off():
    sock = listen("127.0.0.1", 0)
    inherited = socket.socket(fileno=sock.detach())    # as cli._worker opens it
    assert asyncio.run(_accepted_nodelay(inherited)) != 0
