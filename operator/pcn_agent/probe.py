"""Traffic probe used by the demo and the tests: run inside a pod namespace.

    python -m pcn_agent.probe serve --tcp 8080 --udp 8081
    python -m pcn_agent.probe tcp 10.244.2.11 8080 --bytes 1000000
    python -m pcn_agent.probe udp 10.244.2.11 8081

The server answers each TCP connection, once the client has sent everything,
with JSON naming how many bytes arrived, their SHA-256 and the client address
it saw; each UDP datagram gets a JSON answer with the client address. Clients
print one JSON line and exit 0 only when the exchange succeeded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import socket
import socketserver
import sys
import threading
import time


class _TCPHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        h = hashlib.sha256()
        n = 0
        while True:
            chunk = self.request.recv(65536)
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
        reply = {"bytes": n, "sha256": h.hexdigest(), "peer": self.client_address[0],
                 "peer_port": self.client_address[1], "host": _my_name()}
        self.request.sendall(json.dumps(reply).encode() + b"\n")


class _UDPHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        reply = {"len": len(data), "peer": self.client_address[0],
                 "peer_port": self.client_address[1], "host": _my_name()}
        sock.sendto(json.dumps(reply).encode(), self.client_address)


def _my_name() -> str:
    return os.environ.get("PCN_PROBE_NAME", "")


class _TCPServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


class _UDPServer(socketserver.ThreadingUDPServer):
    allow_reuse_address = True
    daemon_threads = True


def serve(tcp_ports: list[int], udp_ports: list[int]) -> None:
    servers: list[socketserver.BaseServer] = []
    for p in tcp_ports:
        servers.append(_TCPServer(("0.0.0.0", p), _TCPHandler))
    for p in udp_ports:
        servers.append(_UDPServer(("0.0.0.0", p), _UDPHandler))
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    print(json.dumps({"listening": {"tcp": tcp_ports, "udp": udp_ports}}), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass


def tcp_client(host: str, port: int, nbytes: int, timeout: float, src_port: int = 0,
               rate: float = 0.0) -> dict:
    """Send `nbytes` (at `rate` bytes/s if set) and check the server's digest."""
    payload = random.Random(nbytes).randbytes(nbytes)
    start = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        if src_port:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", src_port))
        s.connect((host, port))
        connected = time.monotonic()
        if rate > 0:
            chunk = max(1, int(rate / 50))
            for off in range(0, nbytes, chunk):
                s.sendall(payload[off:off + chunk])
                ahead = (off + chunk) / rate - (time.monotonic() - connected)
                if ahead > 0:
                    time.sleep(ahead)
        else:
            s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        buf = b""
        while not buf.endswith(b"\n"):
            chunk_in = s.recv(4096)
            if not chunk_in:
                break
            buf += chunk_in
    done = time.monotonic()
    reply = json.loads(buf) if buf else {}
    expected = hashlib.sha256(payload).hexdigest()
    return {
        "ok": reply.get("sha256") == expected and reply.get("bytes") == nbytes,
        "bytes": nbytes, "received": reply.get("bytes"), "peer_seen": reply.get("peer"),
        "peer_port_seen": reply.get("peer_port"), "host": reply.get("host"),
        "connect_ms": (connected - start) * 1000, "total_ms": (done - start) * 1000,
    }


def tcp_many(host: str, port: int, count: int, timeout: float) -> dict:
    """`count` short connections, one after the other: which server answered each."""
    hosts: dict[str, int] = {}
    failures = 0
    for _ in range(count):
        try:
            r = tcp_client(host, port, 16, timeout)
        except OSError:
            failures += 1
            continue
        if r["ok"]:
            hosts[r["host"]] = hosts.get(r["host"], 0) + 1
        else:
            failures += 1
    return {"ok": failures == 0, "count": count, "failures": failures, "hosts": hosts}


def udp_client(host: str, port: int, timeout: float) -> dict:
    """One datagram on a connected socket: the answer must come from where we sent."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        start = time.monotonic()
        s.send(b"pcn-probe")
        data = s.recv(4096)
        rtt = (time.monotonic() - start) * 1000
    reply = json.loads(data)
    return {"ok": reply.get("len") == 9, "peer_seen": reply.get("peer"),
            "peer_port_seen": reply.get("peer_port"), "host": reply.get("host"),
            "total_ms": rtt}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pcn_agent.probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="answer TCP and UDP probes")
    s.add_argument("--tcp", type=int, action="append", default=[], help="TCP port (repeatable)")
    s.add_argument("--udp", type=int, action="append", default=[], help="UDP port (repeatable)")
    t = sub.add_parser("tcp", help="send bytes over TCP and check what the server received")
    t.add_argument("host")
    t.add_argument("port", type=int)
    t.add_argument("--bytes", type=int, default=1000)
    t.add_argument("--timeout", type=float, default=5.0)
    t.add_argument("--src-port", type=int, default=0)
    t.add_argument("--rate", type=float, default=0.0, help="pace the upload, bytes per second")
    t.add_argument("--count", type=int, default=0,
                   help="open COUNT short connections instead and tally the servers")
    u = sub.add_parser("udp", help="send one datagram and wait for the answer")
    u.add_argument("host")
    u.add_argument("port", type=int)
    u.add_argument("--timeout", type=float, default=3.0)
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        if not args.tcp and not args.udp:
            ap.error("serve needs at least one --tcp or --udp port")
        serve(args.tcp, args.udp)
        return 0
    try:
        if args.cmd == "tcp" and args.count:
            result = tcp_many(args.host, args.port, args.count, args.timeout)
        elif args.cmd == "tcp":
            result = tcp_client(args.host, args.port, args.bytes, args.timeout, args.src_port,
                                args.rate)
        else:
            result = udp_client(args.host, args.port, args.timeout)
    except (OSError, ValueError) as exc:
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
