"""aether.preview.protocols against real asyncio servers on loopback: the owner's protocol_of
first, a look of its own otherwise (one at a time per port, kept per listener), a ``tcp`` from
the owner looked at again, a refusal never kept."""

from __future__ import annotations

import asyncio

from support.ports import free_port

from aether.ports.detect import HTTP, HTTPS, TCP, Detector
from aether.preview.protocols import UpstreamProtocols


async def http_server():
    """An HTTP/1.1 server on a free loopback port; (server, port)."""

    async def handle(reader, writer):
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


class CountingDetector(Detector):
    """The ports' detector, counting its looks (a server's own count of connections would
    include other processes' probes: every aether on the machine looks at a new port)."""

    def __init__(self):
        super().__init__()
        self.looks = 0

    async def look(self, *args, **kw):
        self.looks += 1
        return await super().look(*args, **kw)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_the_owners_answer_comes_first_and_costs_nothing():
    async def main():
        unused = free_port()
        detector = CountingDetector()
        protocols = UpstreamProtocols(lambda port: HTTPS, lambda port: ("sk", 1), detector)
        assert await protocols.protocol(unused, "127.0.0.1") == HTTPS
        assert detector.looks == 0

    run(main())


def test_a_look_is_shared_kept_per_listener_and_dropped_when_they_change():
    async def main():
        server, port = await http_server()
        identity = ["first"]
        detector = CountingDetector()
        protocols = UpstreamProtocols(None, lambda p: identity[0], detector)
        found = await asyncio.gather(*(protocols.protocol(port, "127.0.0.1") for _ in range(10)))
        assert found == [HTTP] * 10 and detector.looks == 1  # ten requests, one look
        assert await protocols.protocol(port, "127.0.0.1") == HTTP and detector.looks == 1
        identity[0] = "second"  # another socket took the port
        assert protocols.known(port) is None
        assert await protocols.protocol(port, "127.0.0.1") == HTTP and detector.looks == 2
        protocols.forget(port)
        assert protocols.known(port) is None
        server.close()

    run(main())


def test_an_owners_tcp_is_looked_at_again_and_the_owner_told():
    async def main():
        server, port = await http_server()
        rechecked = []
        protocols = UpstreamProtocols(lambda p: TCP, lambda p: "sk", recheck=rechecked.append)
        assert await protocols.protocol(port, "127.0.0.1") == HTTP
        assert rechecked == [port]
        server.close()

    run(main())


def test_a_refused_port_goes_as_http_and_is_not_kept():
    async def main():
        protocols = UpstreamProtocols(None, lambda p: "sk")
        unused = free_port()
        assert await protocols.protocol(unused, "127.0.0.1") == HTTP
        assert protocols.known(unused) is None

    run(main())


def test_a_port_that_answers_no_http_is_tcp():
    async def main():
        async def handle(reader, writer):
            await reader.read(8)
            writer.write(b"N")
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        protocols = UpstreamProtocols(lambda p: None, lambda p: "sk")
        assert await protocols.protocol(port, "127.0.0.1") == TCP
        assert protocols.known(port) == TCP
        server.close()

    run(main())
