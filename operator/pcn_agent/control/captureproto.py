"""The capture stream of the agent's local API: how `pcn-agent capture`
receives copied frames from the agent (standard library only).

On the local API socket (pcn_agent.cni.localapi), the client sends one JSON
request line:

    {"op": "capture", "namespace": "demo", "pod": "web-1", "filter": "tcp port 80",
     "snaplen": 8192, "budget": 2000, "count": 0, "duration": 0, "heartbeat": 5}

(`count`/`duration` 0: unbounded; `heartbeat`: seconds without a heartbeat
after which the agent stops the capture.) The agent answers with any number of progress lines {"progress": TEXT}
(for the user: the capture has not started; e.g. its program compiling on
first use), then one JSON line:
{"ok": false, "error": ..., "code": ...} and closes, or {"ok": true, "capture":
NAME, "node": ..., "pod": ..., "snaplen": ..., "budget": ...} followed by
frames:

    b"P" + PACKET header + the copied bytes      one copied frame
    b"E" + one JSON line                          the end: {"reason": ..., "stats": {...}}

The client sends any byte (a newline) at least every `heartbeat` seconds
while it reads; closing its side stops the capture at once.
"""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import dataclass
from typing import Any

OP = "capture"
PACKET = struct.Struct("<QIIB")  # ts (ns since the epoch), wire length, copied length, hook
TAG_PACKET = b"P"
TAG_END = b"E"
HEARTBEAT = b"\n"
DEFAULT_HEARTBEAT_S = 5.0
HOOK_FROM_POD = 0  # maps.HOOK_INGRESS: the pod's port's ingress hook, what the pod sends
HOOK_TO_POD = 1  # maps.HOOK_EGRESS: what it receives
DIRECTIONS = {HOOK_FROM_POD: "from-pod", HOOK_TO_POD: "to-pod"}


@dataclass(frozen=True)
class Packet:
    ts_ns: int  # nanoseconds since the Unix epoch
    wire_len: int
    hook: int
    data: bytes

    @property
    def direction(self) -> str:
        return DIRECTIONS.get(self.hook, str(self.hook))


def packet_frame(ts_ns: int, wire_len: int, hook: int, data: bytes) -> bytes:
    return TAG_PACKET + PACKET.pack(ts_ns, wire_len, len(data), hook) + data


def end_frame(reason: str, stats: dict[str, Any]) -> bytes:
    return TAG_END + json.dumps({"reason": reason, "stats": stats}).encode() + b"\n"


class StreamReader:
    """Reads the agent's frames from a socket (blocking)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _need(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buf)))
            if not chunk:
                raise EOFError("the agent closed the capture stream")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the agent closed the capture stream")
            self.buf += chunk
        out, _, self.buf = self.buf.partition(b"\n")
        return out

    def next(self) -> Packet | dict[str, Any]:
        """A Packet, or the end frame's JSON (a dict)."""
        tag = self._need(1)
        if tag == TAG_PACKET:
            ts, wire, caplen, hook = PACKET.unpack(self._need(PACKET.size))
            return Packet(ts, wire, hook, self._need(caplen))
        if tag == TAG_END:
            end: dict[str, Any] = json.loads(self.line())
            return end
        raise ValueError(f"unexpected frame tag {tag!r} in the capture stream")
