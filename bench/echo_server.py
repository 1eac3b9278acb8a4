"""The ceiling row: a bare uvloop UDP server that sends each datagram back with the QR bit set.

No parsing and no lookup: whatever a Python DNS server on uvloop does per query costs at least
this much. Usage: `python bench/echo_server.py [PORT]` (default 0: any free port); prints
`PORT <n>` on stdout once bound, then serves until SIGTERM or SIGINT. Binds 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvloop

HOST = "127.0.0.1"


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) >= 12:
            self.transport.sendto(data[:2] + bytes((data[2] | 0x80,)) + data[3:], addr)


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=(HOST, port))
    print("PORT", transport.get_extra_info("sockname")[1], flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    transport.close()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
