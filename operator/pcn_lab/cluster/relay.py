"""A TCP relay from 127.0.0.1:<port> of the root network namespace to an
address inside another network namespace (the API server in the
control-plane node), so that kubectl on the machine reaches the cluster
while nothing is added to the root namespace's network.

    python -m pcn_lab.cluster.relay --netns NS --target 127.0.0.1:6443 --port-file F

It binds its listening socket first (in the root namespace), then moves
itself into NS (setns(2)): a socket keeps the namespace it was made
in, so it accepts in the root namespace and connects in NS. Bytes are
copied both ways unchanged (TLS ends at the API server). The chosen port
is written to F.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from pathlib import Path


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            writer.close()
        except OSError:
            pass


async def serve(listener: socket.socket, host: str, port: int) -> None:
    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(host, port)
        except OSError:
            cw.close()
            return
        await asyncio.gather(_pipe(cr, uw), _pipe(ur, cw))

    server = await asyncio.start_server(handle, sock=listener)
    async with server:
        await server.serve_forever()


CLONE_NEWNET = 0x40000000


def enter_netns(name: str) -> None:
    """Move this (single-threaded) process into the named network namespace
    (setns(2) on /run/netns/<name>); never creates one."""
    import ctypes
    import os

    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into network namespace {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pcn-lab-relay")
    ap.add_argument("--netns", required=True)
    ap.add_argument("--target", required=True, help="HOST:PORT inside the namespace")
    ap.add_argument("--listen-port", type=int, default=0)
    ap.add_argument("--port-file", type=Path, required=True)
    args = ap.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.listen_port))
    listener.listen(128)
    enter_netns(args.netns)
    args.port_file.write_text(f"{listener.getsockname()[1]}\n")
    asyncio.run(serve(listener, host, int(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
