"""The slow path: packets and events the data plane hands to user space, and
frames user space injects back into the data plane.

Injection goes through a veth pair owned by the runtime: a frame written on
one end (with a trailer naming the target port and action) arrives on the
other end's tc ingress, where the entry program strips the trailer and
delivers the frame.
"""

from __future__ import annotations

import ctypes as ct
import errno
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pyroute2.netlink.exceptions import NetlinkError

from pcn_agent.dataplane import maps
from pcn_agent.dataplane.compiler import BpfModule
from pcn_agent.dataplane.netns import entered
from pcn_agent.dataplane.runtime import Runtime

log = logging.getLogger(__name__)

INJECT_TX = "pcn-inj0"  # we write here
INJECT_RX = "pcn-inj1"  # the entry program reads here
INJECT_MTU = 9500
MAX_HELD_PER_NEIGH = 64
ARP_RETRY_S = 0.3
ARP_TRIES = 3

Handler = Callable[[maps.SlowMsg, bytes], None]


class SlowPath:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._sock: socket.socket | None = None
        self._modules: list[BpfModule] = []
        self._handlers: dict[int, Handler] = {}
        self._tickers: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.injected = 0

    # ------------------------------------------------------------------ life cycle
    def start(self) -> SlowPath:
        ipr = self.rt.ipr
        assert ipr is not None, "open the runtime first"
        if not ipr.link_lookup(ifname=INJECT_TX):
            ipr.link("add", ifname=INJECT_TX, kind="veth", peer=INJECT_RX)
        for name in (INJECT_TX, INJECT_RX):
            idx = ipr.link_lookup(ifname=name)[0]
            ipr.link("set", index=idx, mtu=INJECT_MTU, state="up")
        self.rt.attach_inject(INJECT_RX)
        self._sock = _packet_socket(self.rt.netns, INJECT_TX)
        self._thread = threading.Thread(target=self._run, name=f"pcn-slowpath-{self.rt.name}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, remove: bool = True) -> None:
        """Stop the thread; with `remove`, also delete the injection device (it
        belongs to the runtime by name, whichever agent created it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if remove and self.rt.ipr is not None:
            try:
                self.rt.ipr.link("del", ifname=INJECT_TX)
            except NetlinkError as exc:
                if exc.code not in (errno.ENODEV, errno.ENOENT):
                    raise

    # ------------------------------------------------------------------ wiring
    def listen(self, module: BpfModule, table: str = "pcn_slowpath") -> None:
        """Receive the slow-path messages of one loaded cube type."""

        def on_event(_cpu: int, data: int, size: int) -> None:
            raw = ct.string_at(data, size)
            msg = maps.SlowMsg.from_buffer_copy(raw[: ct.sizeof(maps.SlowMsg)])
            pkt = raw[ct.sizeof(maps.SlowMsg): ct.sizeof(maps.SlowMsg) + msg.pkt_len]
            handler = self._handlers.get(msg.reason)
            if handler is None:
                log.warning("slow path: no handler for reason %d", msg.reason)
                return
            try:
                handler(msg, pkt)
            except Exception:  # one bad message must not stop the thread
                log.exception("slow path handler for reason %d failed", msg.reason)

        module[table.encode()].open_perf_buffer(on_event, page_cnt=64)
        self._modules.append(module)

    def on(self, reason: int, handler: Handler) -> None:
        self._handlers[int(reason)] = handler

    def every_tick(self, fn: Callable[[], None]) -> None:
        self._tickers.append(fn)

    def inject(self, frame: bytes, port_id: int, action: int) -> None:
        if self._sock is None:
            raise RuntimeError("slow path not started")
        trailer = bytes(maps.InjectTrailer(port_id, action, maps.INJECT_MAGIC))
        self._sock.send(frame + trailer)
        self.injected += 1

    # ------------------------------------------------------------------ loop
    def _run(self) -> None:
        while not self._stop.is_set():
            if self._modules:
                for m in list(self._modules):
                    m.perf_buffer_poll(timeout=20)
            else:
                time.sleep(0.02)
            for tick in self._tickers:
                try:
                    tick()
                except Exception:
                    log.exception("slow path tick failed")


def _packet_socket(netns: str | None, ifname: str) -> socket.socket:
    """An AF_PACKET socket bound to `ifname`, created inside `netns`."""
    with entered(netns):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        s.bind((ifname, 0))
    return s


@dataclass
class _Held:
    out_port: int
    packets: list[tuple[int, bytes]] = field(default_factory=list)
    tries: int = 0
    next_try: float = 0.0


class ArpResolver:
    """Resolves next hops for router cubes: asks with ARP out of the route's
    port, holds the packets meanwhile, re-injects them once the router has
    learned the answer, and gives up (dropping them) after a few tries."""

    def __init__(self, rt: Runtime, slow: SlowPath, neigh_table: maps.BpfTable) -> None:
        self.rt = rt
        self.slow = slow
        self.neigh = neigh_table
        self._held: dict[tuple[int, int], _Held] = {}
        self._lock = threading.Lock()
        self.requests_sent = 0
        self.released = 0
        self.given_up = 0
        slow.on(maps.SlowReason.ARP_MISS, self._on_miss)
        slow.on(maps.SlowReason.NEIGH_LEARNED, self._on_learned)
        slow.every_tick(self._tick)

    def _on_miss(self, msg: maps.SlowMsg, pkt: bytes) -> None:
        """A packet waits for next hop `msg.arg`. Packets for one next hop
        leave in the order they came: one that finds the answer already
        learned while others still wait (the answer came between two misses
        of one burst, before its NEIGH_LEARNED event) goes behind them, or
        the later fragments of a datagram would overtake its first one, and
        a cube that needs the first fragment first would drop them."""
        key = (msg.cube_id, msg.arg)
        with self._lock:
            held = self._held.get(key)
            direct = held is None and self._known(key)
            if not direct:
                if held is None:
                    held = self._held[key] = _Held(msg.out_port)
                if pkt and len(held.packets) < MAX_HELD_PER_NEIGH:
                    held.packets.append((msg.in_port, pkt))
                ask = held.tries == 0
                if ask:
                    held.tries, held.next_try = 1, time.monotonic() + ARP_RETRY_S
        if direct:
            if pkt:
                self.slow.inject(complete_l4_checksum(pkt), msg.in_port, maps.INJECT_TO_CUBE)
            return
        assert held is not None
        if ask:
            self._ask(held.out_port, msg.arg)
        if self._known(key):  # learned meanwhile: everything held goes, in order
            self._release(key)

    def _on_learned(self, msg: maps.SlowMsg, _pkt: bytes) -> None:
        self._release((msg.cube_id, msg.arg))

    def _release(self, key: tuple[int, int]) -> None:
        with self._lock:
            held = self._held.pop(key, None)
        if held is None:
            return
        for in_port, pkt in held.packets:
            self.slow.inject(complete_l4_checksum(pkt), in_port, maps.INJECT_TO_CUBE)
            self.released += 1

    def _tick(self) -> None:
        now = time.monotonic()
        retry, resolved = [], []
        with self._lock:
            for key, held in list(self._held.items()):
                if self._known(key):
                    resolved.append(key)
                elif now >= held.next_try:
                    if held.tries >= ARP_TRIES:
                        del self._held[key]
                        self.given_up += len(held.packets)
                        log.info("no ARP answer for %s after %d tries; dropped %d packets",
                                 maps.ip_str(key[1]), held.tries, len(held.packets))
                    else:
                        held.tries += 1
                        held.next_try = now + ARP_RETRY_S
                        retry.append((held.out_port, key[1]))
        for key in resolved:
            self._release(key)
        for out_port, ip in retry:
            self._ask(out_port, ip)

    def _known(self, key: tuple[int, int]) -> bool:
        try:
            self.neigh[maps.RouterNeighKey(*key)]
            return True
        except KeyError:
            return False

    def _ask(self, out_port: int, target_be: int) -> None:
        port = self.rt.ports.get(out_port)
        if port is None or not port.ip:
            log.warning("cannot ARP out of port %d: it has no address", out_port)
            return
        self.slow.inject(arp_request(port.mac, port.ip, maps.ip_str(target_be)), out_port,
                         maps.INJECT_OUT_PORT)
        self.requests_sent += 1
        log.debug("ARP who-has %s tell %s on %s:%s", maps.ip_str(target_be), port.ip, port.cube,
                  port.name)


def arp_request(src_mac: str, src_ip: str, target_ip: str) -> bytes:
    mac = bytes(maps.mac_bytes(src_mac))
    eth = b"\xff" * 6 + mac + struct.pack("!H", 0x0806)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + socket.inet_aton(src_ip)
    arp += b"\x00" * 6 + socket.inet_aton(target_ip)
    return eth + arp


def _ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    words: tuple[int, ...] = struct.unpack(f"!{len(data) // 2}H", data)
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def complete_l4_checksum(frame: bytes) -> bytes:
    """Fill in the TCP/UDP checksum of an IPv4 frame.

    A packet copied to user space may carry a partial checksum (the sender's
    veth left it to "hardware"); once re-injected as a fresh frame nobody would
    finish it and the receiver would drop the packet. Recomputing is harmless
    when the checksum was already complete.
    """
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return frame
    ihl = (frame[14] & 0x0F) * 4
    proto = frame[23]
    frag = struct.unpack("!H", frame[20:22])[0]
    if proto not in (6, 17) or frag & 0x3FFF:  # not TCP/UDP, or a fragment
        return frame
    total_len = struct.unpack("!H", frame[16:18])[0]
    l4_start, l4_end = 14 + ihl, 14 + total_len
    if l4_end > len(frame) or l4_end - l4_start < (20 if proto == 6 else 8):
        return frame
    off = l4_start + (16 if proto == 6 else 6)
    seg = bytearray(frame[l4_start:l4_end])
    seg[off - l4_start: off - l4_start + 2] = b"\x00\x00"
    pseudo = frame[26:34] + struct.pack("!BBH", 0, proto, len(seg))
    csum = 0xFFFF - _ones_sum(pseudo + bytes(seg))
    if proto == 17 and csum == 0:
        csum = 0xFFFF
    return frame[:off] + struct.pack("!H", csum) + frame[off + 2:]
