"""Traffic probe used by the demo and the tests: run inside a pod namespace.

    python -m pcn_lab.probe serve --tcp 8080 --udp 8081
    python -m pcn_lab.probe tcp 10.244.2.11 8080 --bytes 1000000
    python -m pcn_lab.probe udp 10.244.2.11 8081
    python -m pcn_lab.probe udp 10.96.0.10 53 --size 4000 --reply-size 4000
    python -m pcn_lab.probe serve --rr 8090
    python -m pcn_lab.probe rr 10.96.0.10 80 --count 2000
    python -m pcn_lab.probe burst 10.96.0.10 80 --count 20000 --parallel 32

The server answers each TCP connection, once the client has sent everything,
with JSON naming how many bytes arrived, their SHA-256 and the client address
it saw; each UDP datagram gets a JSON answer with its length, SHA-256 and the
client address, padded with spaces to the size the datagram asks for (a
`pcn-probe reply=N` first line), so that big datagrams, fragmented on the way,
can be checked both ways. Clients print one JSON line and exit 0 only when the
exchange succeeded.

`burst` opens COUNT short connections to a TCP server (`serve --tcp`), PARALLEL
at a time, as fast as they complete: each sends a few bytes, closes its
sending side and reads the server's answer, so the client closes first (the
client keeps the TIME_WAIT, never the server). It prints how many failed and
why, and the rate.

`rr` measures request latency: COUNT times, one after the other, a new TCP
connection, a small request line, the answer line of an `--rr` server (which
then closes the connection); each sample is the time from connect() to the
whole answer. It prints percentiles in milliseconds (and, with --raw, every
sample in microseconds).
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import math
import os
import random
import selectors
import socket
import socketserver
import statistics
import sys
import threading
import time
from typing import Any


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


UDP_HELLO = b"pcn-probe"
UDP_MAX = 65507  # the largest UDP payload over IPv4


def udp_request(size: int, reply_size: int = 0) -> bytes:
    """A probe datagram of `size` bytes asking for an answer of `reply_size`
    bytes (0: the bare JSON answer): a `pcn-probe reply=N` line, then bytes
    that depend on `size` only. The plain 9-byte hello asks for nothing.
    ValueError when the datagram cannot hold its first line or either size
    exceeds the largest UDP payload over IPv4 (65507 bytes)."""
    if not reply_size and size == len(UDP_HELLO):
        return UDP_HELLO
    head = UDP_HELLO + f" reply={reply_size}\n".encode()
    if not len(head) <= size <= UDP_MAX or not 0 <= reply_size <= UDP_MAX:
        raise ValueError(f"a probe datagram holds {len(head)} to {UDP_MAX} bytes and asks for "
                         f"at most {UDP_MAX}, not {size} asking for {reply_size}")
    return head + random.Random(size).randbytes(size - len(head))


def udp_answer(data: bytes, peer: tuple[str, int]) -> bytes:
    """The server's JSON answer to datagram `data` from `peer`, padded with
    spaces to the size the datagram asked for (never cut)."""
    reply = {"len": len(data), "sha256": hashlib.sha256(data).hexdigest(), "peer": peer[0],
             "peer_port": peer[1], "host": _my_name()}
    out = json.dumps(reply).encode()
    first = data.split(b"\n", 1)[0]
    if first.startswith(UDP_HELLO + b" reply="):
        try:
            want = int(first[len(UDP_HELLO) + len(b" reply="):])
        except ValueError:
            want = 0
        out = out.ljust(min(max(want, 0), UDP_MAX), b" ")
    return out


class _UDPHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        sock.sendto(udp_answer(data, self.client_address), self.client_address)


class _UDPServer(socketserver.ThreadingUDPServer):
    allow_reuse_address = True
    daemon_threads = True
    max_packet_size = UDP_MAX  # socketserver reads 8192 bytes of a datagram by default


def _my_name() -> str:
    return os.environ.get("PCN_PROBE_NAME", "")


class _TCPServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 1024  # `burst` clients connect many at a time


RR_ANSWER_PAD = 64  # bytes of the answer line besides the JSON (a small response)


def _rr_listener(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    sock.listen(1024)
    return sock


def recv_line(sock: socket.socket) -> bytes:
    """Read up to and including a newline, or until the peer closes."""
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf


def _rr_loop(sock: socket.socket) -> None:
    """Answer request lines one connection at a time: no thread per connection,
    so that the server adds as little as it can to the latency measured. The
    server closes first (its side keeps the TIME_WAIT, not the client's)."""
    answer = (json.dumps({"host": _my_name()}) + " " * RR_ANSWER_PAD + "\n").encode()
    while True:
        conn, _ = sock.accept()
        try:
            conn.settimeout(5.0)
            buf = recv_line(conn)
            if buf:
                conn.sendall(answer)
        except OSError:
            pass
        finally:
            conn.close()


def serve(tcp_ports: list[int], udp_ports: list[int], rr_ports: list[int] | None = None) -> None:
    rr_ports = rr_ports or []
    servers: list[socketserver.BaseServer] = []
    for p in tcp_ports:
        servers.append(_TCPServer(("0.0.0.0", p), _TCPHandler))
    for p in udp_ports:
        servers.append(_UDPServer(("0.0.0.0", p), _UDPHandler))
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    for p in rr_ports:
        threading.Thread(target=_rr_loop, args=(_rr_listener(p),), daemon=True).start()
    listening: dict[str, list[int]] = {"tcp": tcp_ports, "udp": udp_ports}
    if rr_ports:
        listening["rr"] = rr_ports
    print(json.dumps({"listening": listening}), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass


def tcp_client(host: str, port: int, nbytes: int, timeout: float, src_port: int = 0,
               rate: float = 0.0, peer: bool = False) -> dict:
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
        seen = s.getpeername() if peer else None  # as the application sees its peer
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
        buf = recv_line(s)
    done = time.monotonic()
    reply = json.loads(buf) if buf else {}
    expected = hashlib.sha256(payload).hexdigest()
    return {
        "ok": reply.get("sha256") == expected and reply.get("bytes") == nbytes,
        "bytes": nbytes, "received": reply.get("bytes"), "peer_seen": reply.get("peer"),
        "peer_port_seen": reply.get("peer_port"), "host": reply.get("host"),
        **({"peer": f"{seen[0]}:{seen[1]}"} if seen else {}),
        "connect_ms": (connected - start) * 1000, "total_ms": (done - start) * 1000,
    }


def tcp_many(host: str, port: int, count: int, timeout: float) -> dict:
    """`count` short connections, one after the other: which server answered
    each; failures tallied by errno name ("timeout", "bad-answer" for a
    wrong or missing digest), each with the connection's number and source
    port in `failed` (to find it in a capture or a conntrack dump)."""
    hosts: dict[str, int] = {}
    errors: dict[str, int] = {}
    failed: list[dict[str, Any]] = []
    for n in range(count):
        try:
            r = tcp_client(host, port, 16, timeout)
        except OSError as e:
            name = "timeout" if isinstance(e, TimeoutError) else (
                errno.errorcode.get(e.errno or 0, str(e)))
            errors[name] = errors.get(name, 0) + 1
            failed.append({"n": n, "error": name, "t": round(time.time(), 3)})
            continue
        if r["ok"]:
            hosts[r["host"]] = hosts.get(r["host"], 0) + 1
        else:
            errors["bad-answer"] = errors.get("bad-answer", 0) + 1
            failed.append({"n": n, "error": "bad-answer", "reply": r.get("received"),
                           "t": round(time.time(), 3)})
    failures = sum(errors.values())
    return {"ok": failures == 0, "count": count, "failures": failures, "hosts": hosts,
            "errors": errors, "failed": failed}


BURST_PAYLOAD = b"pcn-burst\n"


class _BurstConn:
    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.connected = False
        self.buf = b""


def tcp_burst(host: str, port: int, count: int, parallel: int, timeout: float) -> dict:
    """`count` short connections, `parallel` in flight at once (non-blocking
    sockets, one thread): each sends BURST_PAYLOAD, shuts its sending side
    and reads the `serve --tcp` answer to the end. A connection fails when it
    is refused or reset, times out (`timeout` seconds for the whole exchange)
    or gets a wrong answer; failures are tallied by errno name."""
    sel = selectors.DefaultSelector()
    live: dict[int, _BurstConn] = {}
    started = finished = failures = 0
    errors: dict[str, int] = {}
    hosts: dict[str, int] = {}
    t0 = time.monotonic()

    def finish(c: _BurstConn, error: str | None) -> None:
        nonlocal finished, failures
        sel.unregister(c.sock)
        del live[c.sock.fileno()]
        c.sock.close()
        finished += 1
        if error is not None:
            failures += 1
            errors[error] = errors.get(error, 0) + 1

    while finished < count:
        while started < count and len(live) < parallel:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            started += 1
            c = _BurstConn(sock, time.monotonic() + timeout)
            err = sock.connect_ex((host, port))
            live[sock.fileno()] = c
            sel.register(sock, selectors.EVENT_WRITE, c)
            if err not in (0, errno.EINPROGRESS):
                finish(c, errno.errorcode.get(err, str(err)))
        for key, _ in sel.select(timeout=0.05):
            c = key.data
            try:
                if not c.connected:
                    err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        finish(c, errno.errorcode.get(err, str(err)))
                        continue
                    c.connected = True
                    c.sock.send(BURST_PAYLOAD)  # a few bytes: the socket buffer takes them
                    c.sock.shutdown(socket.SHUT_WR)
                    sel.modify(c.sock, selectors.EVENT_READ, c)
                    continue
                data = c.sock.recv(65536)
            except OSError as exc:
                finish(c, errno.errorcode.get(exc.errno or 0, type(exc).__name__))
                continue
            if data:
                c.buf += data
                continue
            try:
                reply = json.loads(c.buf)
            except ValueError:
                reply = {}
            if reply.get("bytes") == len(BURST_PAYLOAD):
                name = str(reply.get("host", ""))
                hosts[name] = hosts.get(name, 0) + 1
                finish(c, None)
            else:
                finish(c, "bad-answer")
        now = time.monotonic()
        for c in [c for c in live.values() if c.deadline < now]:
            finish(c, "timeout")
    seconds = time.monotonic() - t0
    return {"ok": failures == 0, "count": count, "failures": failures, "errors": errors,
            "hosts": hosts, "seconds": round(seconds, 3),
            "per_second": round(count / seconds, 1) if seconds > 0 else None}


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def rr_client(host: str, port: int, count: int, timeout: float, size: int = 32,
              raw: bool = False) -> dict:
    """`count` request/response exchanges, each on a new TCP connection."""
    request = b"x" * max(0, size - 1) + b"\n"
    samples: list[float] = []
    hosts: dict[str, int] = {}
    failures = 0
    errors: dict[str, int] = {}
    for _ in range(count):
        try:
            start = time.perf_counter()
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect((host, port))
                s.sendall(request)
                buf = recv_line(s)
                done = time.perf_counter()
            if not buf.endswith(b"\n"):
                raise ConnectionError("connection closed before the answer")
        except OSError as exc:
            failures += 1
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            continue
        samples.append((done - start) * 1e6)
        name = json.loads(buf).get("host", "")
        hosts[name] = hosts.get(name, 0) + 1
    out: dict = {"ok": failures == 0 and bool(samples), "count": count, "failures": failures,
                 "hosts": hosts}
    if errors:
        out["errors"] = errors
    if samples:
        out.update({f"p{q}_ms": percentile(samples, q) / 1000 for q in (50, 90, 99)})
        out.update({"mean_ms": statistics.fmean(samples) / 1000, "min_ms": min(samples) / 1000,
                    "max_ms": max(samples) / 1000})
    if raw:
        out["samples_us"] = [round(x, 1) for x in samples]
    return out


def udp_client(host: str, port: int, timeout: float, size: int = len(UDP_HELLO),
               reply_size: int = 0, connected: bool = True) -> dict:
    """One datagram of `size` bytes on a connected socket (the kernel
    fragments what exceeds the path MTU), answered with `reply_size` bytes:
    ok when the answer comes from where we sent, names the length and
    SHA-256 of what we sent, and is as long as asked. `peer` is where the
    answer came from as the application sees it: getpeername() on the
    connected socket, recvfrom()'s source with `connected` False (sendto()
    and recvfrom() on an unconnected socket, "host:port")."""
    request = udp_request(size, reply_size)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        start = time.monotonic()
        if connected:
            s.connect((host, port))
            s.send(request)
            data = s.recv(UDP_MAX)
            src = s.getpeername()
        else:
            s.sendto(request, (host, port))
            while True:  # only the answer from where we sent counts
                data, src = s.recvfrom(UDP_MAX)
                if src == (host, port) or time.monotonic() - start > timeout:
                    break
        rtt = (time.monotonic() - start) * 1000
    reply = json.loads(data)
    ok = reply.get("len") == len(request) and \
        reply.get("sha256") == hashlib.sha256(request).hexdigest()
    if reply_size:
        ok = ok and len(data) == reply_size
    return {"ok": ok, "peer_seen": reply.get("peer"), "peer_port_seen": reply.get("peer_port"),
            "host": reply.get("host"), "sent": len(request), "received": len(data),
            "peer": f"{src[0]}:{src[1]}", "total_ms": rtt}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pcn_lab.probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="answer TCP and UDP probes")
    s.add_argument("--tcp", type=int, action="append", default=[], help="TCP port (repeatable)")
    s.add_argument("--udp", type=int, action="append", default=[], help="UDP port (repeatable)")
    s.add_argument("--rr", type=int, action="append", default=[],
                   help="request/response port for `rr` clients (repeatable)")
    t = sub.add_parser("tcp", help="send bytes over TCP and check what the server received")
    t.add_argument("host")
    t.add_argument("port", type=int)
    t.add_argument("--bytes", type=int, default=1000)
    t.add_argument("--timeout", type=float, default=5.0)
    t.add_argument("--src-port", type=int, default=0)
    t.add_argument("--rate", type=float, default=0.0, help="pace the upload, bytes per second")
    t.add_argument("--peer", action="store_true",
                   help="report getpeername() (the address the application sees) as `peer`")
    t.add_argument("--count", type=int, default=0,
                   help="open COUNT short connections instead and tally the servers")
    b = sub.add_parser("burst", help="COUNT short TCP connections, PARALLEL at a time, to a "
                                     "`serve --tcp` port; tally the failures")
    b.add_argument("host")
    b.add_argument("port", type=int)
    b.add_argument("--count", type=int, default=1000)
    b.add_argument("--parallel", type=int, default=16)
    b.add_argument("--timeout", type=float, default=5.0, help="seconds per connection")
    u = sub.add_parser("udp", help="send one datagram and wait for the answer")
    u.add_argument("host")
    u.add_argument("port", type=int)
    u.add_argument("--timeout", type=float, default=3.0)
    u.add_argument("--size", type=int, default=len(UDP_HELLO),
                   help="bytes of the datagram (more than the MTU: sent in fragments)")
    u.add_argument("--reply-size", type=int, default=0,
                   help="ask for an answer of this many bytes (default: the bare JSON)")
    u.add_argument("--unconnected", action="store_true",
                   help="sendto() and recvfrom() instead of connect(), send() and recv()")
    r = sub.add_parser("rr", help="request latency: COUNT new connections, each one small "
                                   "request and answer, to a `serve --rr` port")
    r.add_argument("host")
    r.add_argument("port", type=int)
    r.add_argument("--count", type=int, default=1000)
    r.add_argument("--size", type=int, default=32, help="request bytes (default 32)")
    r.add_argument("--timeout", type=float, default=2.0, help="seconds per exchange")
    r.add_argument("--raw", action="store_true", help="also print every sample (microseconds)")
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        if not args.tcp and not args.udp and not args.rr:
            ap.error("serve needs at least one --tcp, --udp or --rr port")
        serve(args.tcp, args.udp, args.rr)
        return 0
    if args.cmd == "rr" and (args.count < 1 or args.size < 1):
        ap.error("rr needs --count and --size of at least 1")
    if args.cmd == "burst" and (args.count < 1 or args.parallel < 1):
        ap.error("burst needs --count and --parallel of at least 1")
    try:
        if args.cmd == "burst":
            result = tcp_burst(args.host, args.port, args.count, args.parallel, args.timeout)
        elif args.cmd == "rr":
            result = rr_client(args.host, args.port, args.count, args.timeout, args.size,
                               args.raw)
        elif args.cmd == "tcp" and args.count:
            result = tcp_many(args.host, args.port, args.count, args.timeout)
        elif args.cmd == "tcp":
            result = tcp_client(args.host, args.port, args.bytes, args.timeout, args.src_port,
                                args.rate, args.peer)
        else:
            result = udp_client(args.host, args.port, args.timeout, args.size, args.reply_size,
                                not args.unconnected)
    except (OSError, ValueError) as exc:
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        if isinstance(exc, OSError) and exc.errno:
            result["errno"] = errno.errorcode.get(exc.errno, str(exc.errno))
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
