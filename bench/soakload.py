"""The restart soak's traffic, run inside a pod's (or the external host's)
network namespace; standard library only. Every mode prints JSON lines on
stdout and stops on SIGTERM (or SIGINT).

    python -m bench.soakload sink PORT
    python -m bench.soakload stream HOST PORT --rate BYTES_PER_S
    python -m bench.soakload connect HOST PORT --rate CONNECTIONS_PER_S
    python -m bench.soakload check HOST:PORT [HOST:PORT ...]

`sink` accepts TCP connections and counts what arrives on each (bytes,
SHA-256, the longest pause between two reads); when the client closes its
side the sink answers one JSON line with those figures and prints the same
as an event `{"event": "done", ...}`; a connection that breaks first is
printed as `{"event": "error", "bytes": <received>, ...}`.

`stream` is a long transfer: one connection, a deterministic byte stream
paced at --rate until SIGTERM, then it closes its side, reads the sink's
answer and prints `{"event": "result", "ok": ..., "sent": ..., "received":
..., "retransmissions": ...}`: ok means every byte sent arrived, in order and
intact, on that one connection; retransmissions (TCP_INFO) counts the
segments the sender sent again, spurious_retransmissions those the receiver
already had (DSACK): the rest were lost on the way. Each new retransmission
is also printed when the sender notices it (`"event": "retrans"`). A failure on the way ends the stream at once, with what was
sent so far.

`connect` opens --rate short connections per second (each in a thread of
its own, so a slow one does not delay the next) to a request/response server
(`pcn_lab.probe serve --rr`): connect, one request line, the whole answer
line. Each failure is printed when it happens (`{"event": "fail", "t":
<CLOCK_MONOTONIC>, ...}`, comparable with the soak's own clock), each
exchange slower than --slow-ms too (`"event": "slow"`: a lost packet was
retransmitted), and on SIGTERM a summary after the last exchanges ended.

`check` is one such exchange with each target, in turn; exit 0 when all
succeeded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import signal
import socket
import struct
import sys
import threading
import time
from types import FrameType
from typing import Any

from pcn_lab.probe import recv_line

BLOCK = random.Random(9).randbytes(1 << 16)  # the stream repeats this block
TICK_S = 0.02  # stream pacing: one write every 20 ms
_print_lock = threading.Lock()
_stop = threading.Event()


def emit(doc: dict[str, Any]) -> None:
    with _print_lock:
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _stop.set()


# ------------------------------------------------------------------ sink
def _sink_connection(conn: socket.socket, peer: tuple[str, int]) -> None:
    h = hashlib.sha256()
    n = 0
    max_gap = 0.0
    gap_at = 0.0
    last: float | None = None
    try:
        with conn:
            conn.settimeout(None)
            while True:
                chunk = conn.recv(1 << 16)
                now = time.monotonic()
                if not chunk:
                    break
                if last is not None and now - last > max_gap:
                    max_gap, gap_at = now - last, last
                last = now
                h.update(chunk)
                n += len(chunk)
            figures = {"bytes": n, "sha256": h.hexdigest(), "max_gap_ms": max_gap * 1000,
                       "max_gap_from": gap_at}
            conn.sendall(json.dumps(figures).encode() + b"\n")
        emit({"event": "done", "peer": f"{peer[0]}:{peer[1]}", **figures})
    except OSError as exc:
        emit({"event": "error", "peer": f"{peer[0]}:{peer[1]}", "bytes": n,
              "error": f"{type(exc).__name__}: {exc}", "max_gap_ms": max_gap * 1000,
              "max_gap_from": gap_at})


def sink(port: int) -> int:
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("0.0.0.0", port))
    lsock.listen(16)
    lsock.settimeout(0.2)
    emit({"event": "listening", "port": port})
    while not _stop.is_set():
        try:
            conn, peer = lsock.accept()
        except TimeoutError:
            continue
        threading.Thread(target=_sink_connection, args=(conn, peer), daemon=True).start()
    lsock.close()
    return 0


# ------------------------------------------------------------------ stream
def _stream_bytes(off: int, n: int) -> bytes:
    """`n` bytes of the endless repetition of BLOCK, from offset `off` of a block."""
    if off + n <= len(BLOCK):
        return BLOCK[off:off + n]
    return (BLOCK * ((off + n) // len(BLOCK) + 1))[off:off + n]


def stream(host: str, port: int, rate: float, timeout: float) -> int:
    """One paced connection until stopped; see the module's docstring."""
    h = hashlib.sha256()
    sent = 0
    max_block = 0.0
    chunk = max(1, int(rate * TICK_S))
    out: dict[str, Any] = {"event": "result", "ok": False, "target": f"{host}:{port}"}
    start = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            local = s.getsockname()
            emit({"event": "connected", "local": f"{local[0]}:{local[1]}"})
            off = 0
            seen_retrans = 0
            next_write = time.monotonic()
            while not _stop.is_set():
                data = _stream_bytes(off, chunk)
                t = time.monotonic()
                s.sendall(data)
                max_block = max(max_block, time.monotonic() - t)
                h.update(data)
                sent += len(data)
                retrans = tcp_stats(s)["retransmissions"]
                if retrans > seen_retrans:  # when: compared with the soak's restarts
                    emit({"event": "retrans", "t": time.monotonic(), "total": retrans})
                    seen_retrans = retrans
                off = (off + len(data)) % len(BLOCK)
                next_write += TICK_S
                _stop.wait(max(0.0, next_write - time.monotonic()))
            s.shutdown(socket.SHUT_WR)
            out.update(tcp_stats(s))
            buf = recv_line(s)
        reply = json.loads(buf) if buf.strip() else {}
        out.update(received=reply.get("bytes"), sink_max_gap_ms=reply.get("max_gap_ms"),
                   sink_max_gap_from=reply.get("max_gap_from"),
                   intact=reply.get("sha256") == h.hexdigest())
        out["ok"] = out["intact"] and reply.get("bytes") == sent
        if not buf.strip():
            out["error"] = "the sink closed without an answer"
    except (OSError, ValueError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    out.update(sent=sent, seconds=time.monotonic() - start, max_send_block_ms=max_block * 1000)
    emit(out)
    return 0 if out["ok"] else 1


def tcp_stats(s: socket.socket) -> dict[str, int]:
    """Loss figures of a connection from struct tcp_info (linux/tcp.h; offsets of
    its fields, after 8 bytes of u8 fields): segments retransmitted, bytes
    retransmitted, retransmissions the receiver reported it already had (DSACK:
    spurious, nothing was lost) and reorderings seen."""
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    out = {"retransmissions": struct.unpack_from("I", info, 100)[0]}
    if len(info) >= 224:  # kernels >= 5.x
        out.update(bytes_retransmitted=struct.unpack_from("Q", info, 208)[0],
                   spurious_retransmissions=struct.unpack_from("I", info, 216)[0],
                   reorderings=struct.unpack_from("I", info, 220)[0])
    return out


# ------------------------------------------------------------------ connect
class _Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attempted = self.ok = self.failed = self.slow = 0
        self.max_ms = 0.0
        self.errors: dict[str, int] = {}


def exchange(host: str, port: int, timeout: float) -> float:
    """One connection: connect, a request line, the whole answer line.
    Returns its duration in ms; raises OSError (or ConnectionError) on failure."""
    t = time.monotonic()
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(b"soak\n")
        buf = b""
        while not buf.endswith(b"\n"):
            more = s.recv(4096)
            if not more:
                raise ConnectionError(f"closed after {len(buf)} bytes of the answer")
            buf += more
    return (time.monotonic() - t) * 1000


def _one(host: str, port: int, timeout: float, slow_ms: float, tally: _Tally) -> None:
    t = time.monotonic()
    try:
        ms = exchange(host, port, timeout)
    except OSError as exc:
        err = f"{type(exc).__name__}: {exc}"
        with tally.lock:
            tally.failed += 1
            tally.errors[type(exc).__name__] = tally.errors.get(type(exc).__name__, 0) + 1
        emit({"event": "fail", "t": t, "ms": (time.monotonic() - t) * 1000, "error": err})
        return
    with tally.lock:
        tally.ok += 1
        tally.max_ms = max(tally.max_ms, ms)
        if ms > slow_ms:
            tally.slow += 1
    if ms > slow_ms:
        emit({"event": "slow", "t": t, "ms": ms})


def connect(host: str, port: int, rate: float, timeout: float, slow_ms: float) -> int:
    tally = _Tally()
    threads: list[threading.Thread] = []
    start = time.monotonic()
    emit({"event": "started", "t": start})
    i = 0
    while not _stop.is_set():
        th = threading.Thread(target=_one, args=(host, port, timeout, slow_ms, tally),
                              daemon=True)
        th.start()
        threads.append(th)
        tally.attempted += 1
        i += 1
        threads = [x for x in threads if x.is_alive()]
        _stop.wait(max(0.0, start + i / rate - time.monotonic()))
    for th in threads:
        th.join(timeout + 1)
    emit({"event": "summary", "target": f"{host}:{port}", "attempted": tally.attempted,
          "ok": tally.ok, "failed": tally.failed, "slow": tally.slow,
          "unfinished": tally.attempted - tally.ok - tally.failed, "max_ms": tally.max_ms,
          "errors": tally.errors, "seconds": time.monotonic() - start})
    return 0


def check(targets: list[tuple[str, int]], timeout: float) -> int:
    ok = True
    for host, port in targets:
        try:
            emit({"event": "check", "target": f"{host}:{port}", "ok": True,
                  "ms": exchange(host, port, timeout)})
        except OSError as exc:
            ok = False
            emit({"event": "check", "target": f"{host}:{port}", "ok": False,
                  "error": f"{type(exc).__name__}: {exc}"})
    return 0 if ok else 1


def _target(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soakload", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sink", help="count and digest what TCP clients send")
    s.add_argument("port", type=int)
    t = sub.add_parser("stream", help="one long paced transfer to a sink, until SIGTERM")
    t.add_argument("host")
    t.add_argument("port", type=int)
    t.add_argument("--rate", type=float, default=256 * 1024, help="bytes per second")
    t.add_argument("--timeout", type=float, default=60.0,
                   help="seconds a connect, a write or the answer may take")
    c = sub.add_parser("connect", help="short request/response connections at a rate")
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("--rate", type=float, default=20.0, help="connections per second")
    c.add_argument("--timeout", type=float, default=5.0, help="seconds per exchange")
    c.add_argument("--slow-ms", type=float, default=500.0,
                   help="report exchanges slower than this (a retransmission)")
    k = sub.add_parser("check", help="one request/response exchange with each target")
    k.add_argument("targets", nargs="+", type=_target, metavar="HOST:PORT")
    k.add_argument("--timeout", type=float, default=5.0)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    if args.cmd == "sink":
        return sink(args.port)
    if args.cmd == "stream":
        if args.rate <= 0:
            ap.error("--rate must be positive")
        return stream(args.host, args.port, args.rate, args.timeout)
    if args.cmd == "connect":
        if args.rate <= 0:
            ap.error("--rate must be positive")
        return connect(args.host, args.port, args.rate, args.timeout, args.slow_ms)
    return check(args.targets, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
