"""Helpers for the BPF unit tests: a throw-away runtime in its own network
namespace, a way to test-run programs inside that namespace, and builders and
parsers for the frames the tests craft.

Nothing here touches the root namespace: the namespace, its veth pairs and
the runtime's pins all carry a per-run name and are removed on exit, also
when a test fails half-way.
"""

from __future__ import annotations

import secrets
import struct
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from pcn_agent.dataplane import bpffs, maps
from pcn_agent.dataplane.cubes.bridge import Bridge
from pcn_agent.dataplane.cubes.lbrp import be16
from pcn_agent.dataplane.runtime import PortState, Runtime
from pcn_agent.node import podnet
from pcn_lab.topology import PREFIX
from pcn_testsupport import testrun
from pcn_testsupport.frames import ETH_P_IP as ETH_P_IP
from pcn_testsupport.frames import IPPROTO_ICMP as IPPROTO_ICMP
from pcn_testsupport.frames import IPPROTO_SCTP as IPPROTO_SCTP
from pcn_testsupport.frames import IPPROTO_TCP as IPPROTO_TCP
from pcn_testsupport.frames import IPPROTO_UDP as IPPROTO_UDP
from pcn_testsupport.frames import TCP_ACK as TCP_ACK
from pcn_testsupport.frames import TCP_FIN as TCP_FIN
from pcn_testsupport.frames import TCP_PSH as TCP_PSH
from pcn_testsupport.frames import TCP_RST as TCP_RST
from pcn_testsupport.frames import TCP_SYN as TCP_SYN
from pcn_testsupport.frames import eth as eth
from pcn_testsupport.frames import inet_csum as inet_csum
from pcn_testsupport.frames import ip_b as ip_b
from pcn_testsupport.frames import ip_s as ip_s
from pcn_testsupport.frames import ipv4 as ipv4
from pcn_testsupport.frames import mac_b as mac_b
from pcn_testsupport.frames import mac_s as mac_s
from pcn_testsupport.frames import pseudo_header as pseudo_header
from pcn_testsupport.frames import tcp as tcp
from pcn_testsupport.frames import udp_csum as udp_csum

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
            ifindex: int = 0, gso_size: int = 0) -> testrun.TestRunResult:
        with self.inside():
            return testrun.run_sched_cls(prog_fd, frame, cb=cb, ifindex=ifindex,
                                         gso_size=gso_size)

    def leftovers(self) -> list[str]:
        """Anything of this run still present: namespaces, pins, saved state."""
        left = [ns for ns in pr_netns.listnetns() if ns.startswith(self.prefix)]
        paths = [self.pin_root / self.name, getattr(self.rt, "state_path", None)]
        left += [str(p) for p in paths if p is not None and p.exists()]
        return left


@contextmanager
def unit_net(veths: int, pin_root: Path = bpffs.DEFAULT_ROOT,
             defines: Mapping[str, int | str] | None = None) -> Iterator[UnitNet]:
    """`defines`: the runtime's -D flags (Runtime.defines, e.g. table sizes)."""
    prefix = f"{PREFIX}-{secrets.token_hex(4)}"
    name = f"{prefix}-unit"
    rt = Runtime(name, netns=name, pin_root=pin_root, defines=defines)
    net = UnitNet(name, prefix, rt, pin_root)
    created = False
    try:
        pr_netns.create(name)
        created = True
        # IPv6 off before any veth exists (new devices copy `default`): the
        # kernel's own neighbour/router discovery frames would otherwise pass
        # through the ports and make the tests' counter deltas drift
        for scope in ("default", "all"):
            podnet.write_sysctl(name, f"net.ipv6.conf.{scope}.disable_ipv6", "1")
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


# ---------------------------------------------------------------------- the cube lab
@dataclass
class CubeLab:
    """What the transparent cubes' tests share: a unit net whose bridge `b`
    has one port per name, connected to veths u1, u2, ... in that order,
    and a destination MAC learned behind port `far`, so that a frame sent to
    `dst_mac` through another port's entry program is forwarded there
    (TC_ACT_REDIRECT) once the cubes stacked on its hooks let it through."""

    net: UnitNet
    bridge: Bridge
    ports: dict[str, PortState]
    dst_mac: str

    @property
    def rt(self) -> Runtime:
        return self.net.rt


def learn(rt: Runtime, bridge: Bridge, mac: str, port: PortState) -> None:
    """The bridge's FDB entry for `mac` behind `port`, seen now."""
    rt.table("bridge_fdb", "bridge")[maps.BridgeFdbKey(bridge.cube.id, maps.mac_bytes(mac))] = \
        maps.BridgeFdbVal(port=port.id, seen_ns=time.clock_gettime_ns(time.CLOCK_MONOTONIC))


def wire_cube_lab(net: UnitNet, names: Sequence[str] = ("a", "b"), far: str = "b") -> CubeLab:
    """CubeLab's bridge, ports and learned MAC in `net` (which has at least
    len(names) veths); for a test that builds its own unit net (an agent
    restart adopting it)."""
    bridge = Bridge(net.rt, "b")
    ports = {n: bridge.add_port(n) for n in names}
    for i, n in enumerate(names, start=1):
        net.rt.connect_netdev(ports[n], f"u{i}")
    dst_mac = random_mac()
    learn(net.rt, bridge, dst_mac, ports[far])
    return CubeLab(net, bridge, ports, dst_mac)


@contextmanager
def cube_lab(names: Sequence[str] = ("a", "b"), far: str = "b") -> Iterator[CubeLab]:
    """A CubeLab in a unit net of its own, removed on exit."""
    with unit_net(veths=len(names)) as net:
        yield wire_cube_lab(net, names, far)


# ---------------------------------------------------------------------- addresses
def random_mac() -> str:
    """A locally administered unicast MAC, unique enough to keep tests apart."""
    raw = bytearray(secrets.token_bytes(6))
    raw[0] = (raw[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in raw)


# ---------------------------------------------------------------------- builders
IP_MF = 0x2000  # more fragments


def ipv4_fragment(src: str, dst: str, proto: int, chunk: bytes, offset: int, more: bool,
                  ident: int = 0x1234, ttl: int = 64) -> bytes:
    """One fragment of a datagram: `chunk`, the bytes of its payload (the L4
    datagram) from byte `offset` on (a multiple of 8), with MF set when
    `more` of it follows (RFC 791)."""
    if offset % 8 or not 0 <= offset < 8 * 0x2000:
        raise ValueError(f"fragment offset {offset} is not a multiple of 8 below 65536")
    frag = (IP_MF if more else 0) | offset // 8
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(chunk), ident, frag, ttl, proto, 0,
                      ip_b(src), ip_b(dst))
    csum = inet_csum(hdr)
    return hdr[:10] + struct.pack("!H", csum) + hdr[12:] + chunk


def fragments(src: str, dst: str, proto: int, payload: bytes, ident: int, size: int = 1480,
              ttl: int = 64) -> list[bytes]:
    """`payload` (a whole L4 datagram) as a sender fragments it: IP packets of
    `size` payload bytes (a multiple of 8; 1480 fits a 1500-byte MTU), the
    last one shorter, in order."""
    if size % 8 or size <= 0:
        raise ValueError(f"fragment size {size} is not a positive multiple of 8")
    offsets = range(0, len(payload), size)
    return [ipv4_fragment(src, dst, proto, payload[off:off + size], off, off + size < len(payload),
                          ident, ttl) for off in offsets]


@dataclass(frozen=True)
class Fragment:
    """An IPv4 fragment as parsed: where its chunk sits in the datagram."""

    header: bytes
    src: str
    dst: str
    proto: int
    ident: int
    offset: int  # bytes
    more: bool
    chunk: bytes


def parse_fragment(payload: bytes) -> Fragment:
    """An IPv4 packet (Ethernet payload, padding cut off) as a fragment."""
    ihl = (payload[0] & 0x0F) * 4
    header = payload[:ihl]
    total_len, ident, frag = struct.unpack("!HHH", header[2:8])
    return Fragment(header, ip_s(header[12:16]), ip_s(header[16:20]), header[9], ident,
                    (frag & 0x1FFF) * 8, bool(frag & IP_MF), payload[ihl:total_len])


def reassemble(packets: Sequence[bytes]) -> Ipv4:
    """The datagram a receiver rebuilds from IPv4 packets (Ethernet payloads,
    in any order): they must agree on addresses, protocol and id, and cover
    the payload exactly once, up to the one without MF."""
    frags = sorted((parse_fragment(p) for p in packets), key=lambda f: f.offset)
    first = frags[0]
    for f in frags:
        assert (f.src, f.dst, f.proto, f.ident) == (first.src, first.dst, first.proto,
                                                    first.ident), f"{f} is another datagram's"
    payload = b""
    for f in frags:
        assert f.offset == len(payload), f"hole or overlap at byte {len(payload)}: {f.offset}"
        payload += f.chunk
    assert not frags[-1].more and all(f.more for f in frags[:-1]), "MF flags are wrong"
    hdr = bytearray(first.header)
    hdr[2:4] = struct.pack("!H", len(hdr) + len(payload))
    hdr[6:8] = b"\0\0"
    return parse_ipv4(bytes(hdr) + payload)


def icmp_echo(ident: int, seq: int, data: bytes, kind: int = 8) -> bytes:
    msg = struct.pack("!BBHHH", kind, 0, 0, ident, seq) + data
    csum = inet_csum(msg)
    return msg[:2] + struct.pack("!H", csum) + msg[4:]


def icmp_error(kind: int, code: int, quote: bytes, next_mtu: int = 0) -> bytes:
    """An ICMP error (3: destination unreachable, 11: time exceeded) quoting
    `quote`, the offending packet's IP header and the start of its payload."""
    msg = struct.pack("!BBHHH", kind, code, 0, 0, next_mtu) + quote
    csum = inet_csum(msg)
    return msg[:2] + struct.pack("!H", csum) + msg[4:]


def requote(quote: bytes, src: str | None = None, dst: str | None = None,
            sport: int | None = None, dport: int | None = None) -> bytes:
    """`quote` (IP header + start of TCP/UDP, or of an ICMP echo) with fields
    replaced as a NAT translates it back: IP checksum recomputed, the L4
    checksum left as the quote had it (it covers a datagram the quote cuts)."""
    q = bytearray(quote)
    ihl = (q[0] & 0x0F) * 4
    if src is not None:
        q[12:16] = ip_b(src)
    if dst is not None:
        q[16:20] = ip_b(dst)
    q[10:12] = b"\0\0"
    q[10:12] = struct.pack("!H", inet_csum(bytes(q[:ihl])))
    if q[9] == 1:  # ICMP echo: one identifier for both "ports"
        ident = sport if sport is not None else dport
        if ident is not None:
            q[ihl + 4: ihl + 6] = struct.pack("!H", ident)
    else:
        if sport is not None:
            q[ihl: ihl + 2] = struct.pack("!H", sport)
        if dport is not None:
            q[ihl + 2: ihl + 4] = struct.pack("!H", dport)
    return bytes(q)


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


# ---------------------------------------------------------------------- L4 with checksums
def l4_csum_ok(ip: Ipv4) -> bool:
    """Recompute the TCP/UDP checksum of a parsed datagram from scratch. A UDP
    checksum must be present: 0 on the wire means "none" (a computed 0 is sent
    as 0xffff)."""
    if ip.proto == IPPROTO_UDP and ip.payload[6:8] == b"\0\0":
        return False
    return inet_csum(pseudo_header(ip.src, ip.dst, ip.proto, len(ip.payload)) + ip.payload) == 0


def without_checksums(frame: bytes) -> bytes:
    """An Ethernet/IPv4 frame with its IP and TCP/UDP/ICMP checksums zeroed: for
    comparing a rewritten frame with a freshly built one field by field, the
    checksums being verified on their own (one's complement has two zeros, so
    a correct incremental update may differ from a full recomputation)."""
    out = bytearray(frame)
    out[24:26] = b"\0\0"
    l4 = 14 + (frame[14] & 0x0F) * 4
    off = {IPPROTO_TCP: 16, IPPROTO_UDP: 6, IPPROTO_ICMP: 2}.get(frame[23])
    if off is not None and len(out) >= l4 + off + 2:
        out[l4 + off: l4 + off + 2] = b"\0\0"
    return bytes(out)


@dataclass(frozen=True)
class Ports:
    sport: int
    dport: int


def l4_ports(ip: Ipv4) -> Ports:
    """TCP/UDP ports; for ICMP echo the identifier, as both (as the cubes track it)."""
    if ip.proto == IPPROTO_ICMP:
        ident = struct.unpack("!H", ip.payload[4:6])[0]
        return Ports(ident, ident)
    sport, dport = struct.unpack("!HH", ip.payload[:4])
    return Ports(sport, dport)


def assert_frame(got: bytes, want: bytes) -> None:
    """`got` holds exactly the fields of `want` (a frame built from scratch) and
    every checksum in it is right by full recomputation. A UDP datagram sent
    without checksum must still have none."""
    a, b = without_checksums(got), without_checksums(want)
    if a != b:
        first = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
        raise AssertionError(f"frames differ from byte {first} (lengths {len(got)}/{len(want)}):"
                             f"\n got  {got[first:first + 16].hex(' ')}"
                             f"\n want {want[first:first + 16].hex(' ')}")
    ip = parse_ipv4(parse_eth(got).payload)
    assert inet_csum(ip.header) == 0, "IPv4 header checksum"
    want_ip = parse_ipv4(parse_eth(want).payload)
    if ip.proto == IPPROTO_UDP and want_ip.payload[6:8] == b"\0\0":
        assert ip.payload[6:8] == b"\0\0", "a UDP datagram without checksum got one"
    elif ip.proto in (IPPROTO_TCP, IPPROTO_UDP):
        assert l4_csum_ok(ip), f"{'TCP' if ip.proto == IPPROTO_TCP else 'UDP'} checksum"
    elif ip.proto == IPPROTO_ICMP:
        assert inet_csum(ip.payload) == 0, "ICMP checksum"


def assert_fragments(got: Sequence[bytes], want: Sequence[bytes]) -> None:
    """Translated fragments (frames, in order) against fragments built from
    scratch: each holds exactly the fields of its counterpart with a right IP
    header checksum (a later fragment byte for byte: it has no L4 header to
    change), and together they reassemble to a datagram whose L4 checksum is
    right by full recomputation (it lives in the first fragment and covers
    them all)."""
    assert len(got) == len(want), f"{len(got)} fragments, want {len(want)}"
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        a, b = bytearray(g), bytearray(w)
        for x in (a, b):
            x[24:26] = b"\0\0"
            frag = parse_fragment(parse_eth(bytes(x)).payload)
            off = {IPPROTO_TCP: 16, IPPROTO_UDP: 6, IPPROTO_ICMP: 2}.get(frag.proto)
            if frag.offset == 0 and off is not None:
                l4 = 14 + len(frag.header)
                x[l4 + off: l4 + off + 2] = b"\0\0"
        if a != b:
            first = next((j for j in range(min(len(a), len(b))) if a[j] != b[j]),
                         min(len(a), len(b)))
            raise AssertionError(f"fragment {i} differs from byte {first} (lengths "
                                 f"{len(g)}/{len(w)}):\n got  {g[first:first + 16].hex(' ')}"
                                 f"\n want {w[first:first + 16].hex(' ')}")
        assert inet_csum(parse_fragment(parse_eth(g).payload).header) == 0, \
            f"IPv4 header checksum of fragment {i}"
    ip = reassemble([parse_eth(g).payload for g in got])
    if ip.proto in (IPPROTO_TCP, IPPROTO_UDP):
        assert l4_csum_ok(ip), "L4 checksum of the reassembled datagram"
    elif ip.proto == IPPROTO_ICMP:
        assert inet_csum(ip.payload) == 0, "ICMP checksum of the reassembled datagram"


# ---------------------------------------------------------------------- session clocks
def age_sessions(table: maps.BpfTable, keys: Sequence[maps.Flow], seconds: float,
                 born_only: bool = False) -> None:
    """Make `seconds` pass for the session entries at `keys` (both directions
    of a connection, usually): their last packet (unless `born_only`) and
    their start move that far into the past. Lifetimes are hours and days:
    tests move the clock instead of waiting."""
    ns = round(seconds * 1e9)
    for key in keys:
        v = table[key]
        if not born_only:
            v.seen_ns -= ns
        v.born_ms = (v.born_ms - ns // 1_000_000) & 0xFFFFFFFF
        table[key] = v


# ---------------------------------------------------------------------- hashes and ports
# The C hash (pcn_flow_hash in bpf/include/pcn_lb.h) over the flow as the
# kernel holds it: addresses and ports are the network-order bytes read as
# little-endian integers.
_M32 = 0xFFFFFFFF


def _mix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    h ^= h >> 16
    return h


def flow_hash(saddr: str, daddr: str, sport: int, dport: int, proto: int) -> int:
    ports = ((be16(sport) << 16) | be16(dport)) & _M32
    return _mix32(maps.ip_be(saddr) ^ _mix32(maps.ip_be(daddr) ^ _mix32(ports ^ proto)))


PORT_TRIES, PORT_HARDER = 16, 4  # PCN_PORT_TRIES, PCN_PORT_HARDER (bpf/include/pcn_session.h)


def port_tries(h: int, lo: int, hi: int) -> list[int]:
    """The masquerading ports (host order) a flow of hash `h` tries in
    [lo, hi], in order (pcn_port_try): the first PORT_TRIES, then the
    PORT_HARDER harder ones."""
    span = hi - lo + 1
    step = 7919 if span % 7919 else 7907
    return [lo + (h + n * step) % span for n in range(PORT_TRIES + PORT_HARDER)]


def port_missed_by_a_wrapping_sum(saddr: str, daddr: str, dport: int, lo: int,
                                  hi: int) -> tuple[int, int] | None:
    """A TCP source port from `saddr` to `daddr`:`dport` whose hash plus a
    few steps passes 2**32, and a port of [lo, hi] that its tries would
    miss if the sum wrapped at 32 bits (pcn_port_try once did): (source
    port, missed port), or None when no source port has one."""
    span = hi - lo + 1
    tries = PORT_TRIES + PORT_HARDER
    for sport in range(1024, 65536):
        h = flow_hash(saddr, daddr, sport, dport, IPPROTO_TCP)
        if h < 2**32 - tries * 7919:
            continue
        wrapped = {lo + ((h + n * 7919) & _M32) % span for n in range(tries)}
        missed = sorted(set(range(lo, hi + 1)) - wrapped)
        if missed:
            return sport, missed[0]
    return None
