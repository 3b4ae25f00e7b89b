"""Helpers for the BPF unit tests: a throw-away runtime in its own network
namespace, a way to test-run programs inside that namespace, and builders and
parsers for the frames the tests craft.

Nothing here touches the root namespace: the namespace, its veth pairs and
the runtime's pins all carry a per-run name and are removed on exit, also
when a test fails half-way.
"""

from __future__ import annotations

import secrets
import socket
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from pcn_agent import bpffs, testrun
from pcn_agent.runtime import Runtime
from pcn_agent.topology import PREFIX

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
BROADCAST = "ff:ff:ff:ff:ff:ff"


# ---------------------------------------------------------------------- the unit net
@dataclass
class UnitNet:
    """A Runtime pinned under `pin_root/<name>`, living in network namespace
    `name`, with veth pairs `u<i>` (for ports) / `u<i>p` (far ends), all up."""

    name: str
    prefix: str
    rt: Runtime
    pin_root: Path
    ifindex: dict[str, int] = field(default_factory=dict)

    @contextmanager
    def inside(self) -> Iterator[None]:
        """Run the body in the namespace (BPF_PROG_TEST_RUN uses the calling
        thread's namespace: its devices are the ones ifindexes name)."""
        pr_netns.pushns()
        try:
            pr_netns.setns(self.name, flags=0)  # flags=0: never create it by accident
            yield
        finally:
            pr_netns.popns()

    def run(self, prog_fd: int, frame: bytes, *, cb: Sequence[int] = (),
            ifindex: int = 0) -> testrun.TestRunResult:
        with self.inside():
            return testrun.run_sched_cls(prog_fd, frame, cb=cb, ifindex=ifindex)

    def leftovers(self) -> list[str]:
        """Anything of this run still present: namespaces, pins, saved state."""
        left = [ns for ns in pr_netns.listnetns() if ns.startswith(self.prefix)]
        paths = [self.pin_root / self.name, getattr(self.rt, "state_path", None)]
        left += [str(p) for p in paths if p is not None and p.exists()]
        return left


@contextmanager
def unit_net(veths: int, pin_root: Path = bpffs.DEFAULT_ROOT) -> Iterator[UnitNet]:
    prefix = f"{PREFIX}-{secrets.token_hex(4)}"
    name = f"{prefix}-unit"
    rt = Runtime(name, netns=name, pin_root=pin_root)
    net = UnitNet(name, prefix, rt, pin_root)
    created = False
    try:
        pr_netns.create(name)
        created = True
        with IPRoute(netns=name) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            for i in range(1, veths + 1):
                ipr.link("add", ifname=f"u{i}", kind="veth", peer=f"u{i}p")
                for ifname in (f"u{i}", f"u{i}p"):
                    idx = ipr.link_lookup(ifname=ifname)[0]
                    ipr.link("set", index=idx, state="up")
                    net.ifindex[ifname] = idx
        rt.open()
        yield net
    finally:
        try:
            rt.close()  # unpins; a no-op if open() never succeeded
        finally:
            if created:
                pr_netns.remove(name)
            # open() may have failed after making the pin dir
            if (pin_root / name).exists():
                bpffs.remove_instance(pin_root / name)
    assert net.leftovers() == [], f"unit net left {net.leftovers()}"


# ---------------------------------------------------------------------- addresses
def random_mac() -> str:
    """A locally administered unicast MAC, unique enough to keep tests apart."""
    raw = bytearray(secrets.token_bytes(6))
    raw[0] = (raw[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in raw)


def mac_b(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def mac_s(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def ip_b(ip: str) -> bytes:
    return socket.inet_aton(ip)


def ip_s(raw: bytes) -> str:
    return socket.inet_ntoa(raw)


# ---------------------------------------------------------------------- checksums
def inet_csum(data: bytes) -> int:
    """RFC 1071 checksum; 0 when computed over data that holds a valid checksum."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


# ---------------------------------------------------------------------- builders
def eth(dst: str, src: str, ethertype: int, payload: bytes) -> bytes:
    frame = mac_b(dst) + mac_b(src) + struct.pack("!H", ethertype) + payload
    return frame.ljust(60, b"\0")  # minimum Ethernet frame without FCS


def ipv4(src: str, dst: str, proto: int, payload: bytes, ttl: int = 64, ident: int = 0x1234) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000, ttl, proto, 0,
                      ip_b(src), ip_b(dst))
    csum = inet_csum(hdr)
    return hdr[:10] + struct.pack("!H", csum) + hdr[12:] + payload


def icmp_echo(ident: int, seq: int, data: bytes, kind: int = 8) -> bytes:
    msg = struct.pack("!BBHHH", kind, 0, 0, ident, seq) + data
    csum = inet_csum(msg)
    return msg[:2] + struct.pack("!H", csum) + msg[4:]


def udp(sport: int, dport: int, data: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data  # no checksum (IPv4)


def arp(op: int, sha: str, spa: str, tha: str, tpa: str) -> bytes:
    return struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, op, mac_b(sha), ip_b(spa),
                       mac_b(tha), ip_b(tpa))


# ---------------------------------------------------------------------- parsers
@dataclass(frozen=True)
class Eth:
    dst: str
    src: str
    ethertype: int
    payload: bytes


def parse_eth(frame: bytes) -> Eth:
    dst, src, ethertype = struct.unpack("!6s6sH", frame[:14])
    return Eth(mac_s(dst), mac_s(src), ethertype, frame[14:])


@dataclass(frozen=True)
class Arp:
    htype: int
    ptype: int
    hlen: int
    plen: int
    op: int
    sha: str
    spa: str
    tha: str
    tpa: str


def parse_arp(payload: bytes) -> Arp:
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = struct.unpack(
        "!HHBBH6s4s6s4s", payload[:28])
    return Arp(htype, ptype, hlen, plen, op, mac_s(sha), ip_s(spa), mac_s(tha), ip_s(tpa))


@dataclass(frozen=True)
class Ipv4:
    header: bytes
    ttl: int
    proto: int
    src: str
    dst: str
    total_len: int
    payload: bytes  # up to total_len (Ethernet padding cut off)


def parse_ipv4(payload: bytes) -> Ipv4:
    ihl = (payload[0] & 0x0F) * 4
    header = payload[:ihl]
    total_len = struct.unpack("!H", header[2:4])[0]
    return Ipv4(header, header[8], header[9], ip_s(header[12:16]), ip_s(header[16:20]),
                total_len, payload[ihl:total_len])
