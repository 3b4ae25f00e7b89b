"""The router cube's program on crafted frames (BPF_PROG_TEST_RUN).

Topology: router `r` with port `a` (10.1.0.1/24, veth u1) and port `b`
(10.2.0.1/24, veth u2) in a private namespace, plus a static route
198.51.100.0/24 via 10.2.0.253 on `b`; for path MTU, port `c` (10.3.0.1/24,
veth u3 whose MTU is 1400) and port `h` (10.4.0.1/24, veth u4, shared with
the host as a node's NIC is). Tests use their own host addresses and
compare counters before and after, so they share one compiled runtime.
"""

from __future__ import annotations

import ctypes as ct
import itertools
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from bcc.utils import get_online_cpus
from bpfunit import (
    BROADCAST,
    ETH_P_ARP,
    ETH_P_IP,
    TCP_ACK,
    UnitNet,
    arp,
    assert_fragments,
    assert_frame,
    eth,
    fragments,
    icmp_echo,
    icmp_error,
    inet_csum,
    ipv4,
    ipv4_fragment,
    parse_arp,
    parse_eth,
    parse_ipv4,
    random_mac,
    tcp,
    udp,
    unit_net,
)
from pyroute2 import IPRoute

from pcn_agent.dataplane import maps
from pcn_agent.dataplane.cubes.router import Router
from pcn_agent.dataplane.runtime import PortCounters, PortState
from pcn_testsupport.testrun import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TestRunResult

pytestmark = [pytest.mark.bpf,
              pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning")]

IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP = 1, 6, 17
_host = itertools.count(10)  # up to .249: the static next hop is 10.2.0.253


def host(net: str) -> str:
    """A fresh host address on the network of port `net`: 10.1.0.0/24 ("a"),
    10.2.0.0/24 ("b"), 10.3.0.0/24 ("c") or 10.4.0.0/24 ("h")."""
    n = next(_host)
    assert n < 250, "ran out of test host addresses"
    return f"10.{'abch'.index(net) + 1}.0.{n}"


@dataclass
class RouterLab:
    net: UnitNet
    r: Router
    ports: dict[str, PortState]

    @property
    def module(self):
        return self.net.rt.types["router"].module

    def send(self, in_port: str, frame: bytes, gso_size: int = 0) -> TestRunResult:
        port = self.ports[in_port]
        return self.net.run(self.net.rt.types["router"].fd, frame, cb=[port.id],
                            ifindex=self.net.ifindex[port.netdev or ""], gso_size=gso_size)

    def counters(self) -> dict[str, PortCounters]:
        return {name: self.net.rt.port_counters(p) for name, p in self.ports.items()}

    def drops(self) -> dict[str, int]:
        return self.net.rt.cube_drops("r")

    def mac(self, port: str) -> str:
        return self.ports[port].mac

    def add_neighbour(self, ip: str, mac: str, port: str) -> None:
        """Written straight into the map, as the ARP path would have."""
        key = maps.RouterNeighKey(self.r.cube.id, maps.ip_be(ip))
        value = maps.RouterNeigh(mac=maps.mac_bytes(mac), port=self.ports[port].id,
                                 updated_ns=time.clock_gettime_ns(time.CLOCK_MONOTONIC))
        self.net.rt.table("router_neigh", "router")[key] = value


C_MTU = 1400  # the MTU of port c's netdev


@pytest.fixture(scope="module")
def lab() -> Iterator[RouterLab]:
    with unit_net(veths=4) as net:
        rt = net.rt
        r = Router(rt, "r")
        ports = {"a": r.add_port("a", "10.1.0.1/24"), "b": r.add_port("b", "10.2.0.1/24"),
                 "c": r.add_port("c", "10.3.0.1/24"),
                 "h": r.add_port("h", "10.4.0.1/24", flags=maps.PORT_HOST_SHARED)}
        for i, name in enumerate("abch", start=1):
            rt.connect_netdev(ports[name], f"u{i}")
        with IPRoute(netns=net.name) as ipr:
            ipr.link("set", index=net.ifindex["u3"], mtu=C_MTU)
        r.add_route("198.51.100.0/24", "b", nexthop="10.2.0.253")
        yield RouterLab(net, r, ports)


@contextmanager
def slowpath_listener(lab: RouterLab) -> Iterator[list[tuple[maps.SlowMsg, bytes]]]:
    """Open the router's slow-path perf buffer (as the agent does) and collect
    what arrives; closed again on exit."""
    got: list[tuple[maps.SlowMsg, bytes]] = []

    def on_event(_cpu: int, data: int, size: int) -> None:
        raw = ct.string_at(data, size)
        msg = maps.SlowMsg.from_buffer_copy(raw[: ct.sizeof(maps.SlowMsg)])
        got.append((msg, raw[ct.sizeof(maps.SlowMsg): ct.sizeof(maps.SlowMsg) + msg.pkt_len]))

    table = lab.module["pcn_slowpath"]
    table.open_perf_buffer(on_event)
    try:
        yield got
    finally:
        for cpu in get_online_cpus():
            del table[cpu]


def poll(lab: RouterLab, got: list, want: int = 1, timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        lab.module.perf_buffer_poll(timeout=50)


def udp_frame(lab: RouterLab, src: str, dst: str, ttl: int = 64, ident: int = 0x1234,
              src_mac: str | None = None, dst_mac: str | None = None) -> bytes:
    return eth(dst_mac or lab.mac("a"), src_mac or random_mac(), ETH_P_IP,
               ipv4(src, dst, IPPROTO_UDP, udp(4000, 5000, b"hello pcn"), ttl=ttl, ident=ident))


# ---------------------------------------------------------------------------- ARP
def test_arp_request_for_port_address_gets_reply(lab: RouterLab) -> None:
    asker_mac, asker_ip = random_mac(), host("a")
    assert lab.r.neighbor(asker_ip) is None
    req = eth(BROADCAST, asker_mac, ETH_P_ARP, arp(1, asker_mac, asker_ip, "00:00:00:00:00:00",
                                                   "10.1.0.1"))
    before = lab.counters()
    res = lab.send("a", req)
    after = lab.counters()

    assert res.retval == TC_ACT_REDIRECT  # back out of u1
    assert after["a"].tx_packets - before["a"].tx_packets == 1
    assert after["b"].tx_packets == before["b"].tx_packets
    assert len(res.data) == len(req)
    e = parse_eth(res.data)
    assert (e.dst, e.src, e.ethertype) == (asker_mac, lab.mac("a"), ETH_P_ARP)
    reply = parse_arp(e.payload)
    assert (reply.htype, reply.ptype, reply.hlen, reply.plen) == (1, ETH_P_IP, 6, 4)
    assert reply.op == 2
    assert (reply.sha, reply.spa) == (lab.mac("a"), "10.1.0.1")
    assert (reply.tha, reply.tpa) == (asker_mac, asker_ip)
    assert lab.r.neighbor(asker_ip) == asker_mac  # the asker is learned


def test_arp_request_for_another_address_is_ignored(lab: RouterLab) -> None:
    asker_mac, asker_ip = random_mac(), host("a")
    req = eth(BROADCAST, asker_mac, ETH_P_ARP, arp(1, asker_mac, asker_ip, "00:00:00:00:00:00",
                                                   host("a")))
    drops, before = lab.drops(), lab.counters()
    res = lab.send("a", req)
    assert res.retval == TC_ACT_SHOT
    assert lab.counters() == before
    assert lab.drops() == drops  # not an error: someone else's question
    assert lab.r.neighbor(asker_ip) is None


def test_arp_reply_is_learned_and_reported(lab: RouterLab) -> None:
    peer_mac, peer_ip = random_mac(), host("b")
    rep = eth(lab.mac("b"), peer_mac, ETH_P_ARP, arp(2, peer_mac, peer_ip, lab.mac("b"),
                                                     "10.2.0.1"))
    with slowpath_listener(lab) as got:
        res = lab.send("b", rep)
        poll(lab, got)
    assert res.retval == TC_ACT_SHOT
    assert lab.r.neighbor(peer_ip) == peer_mac
    assert len(got) == 1
    msg, pkt = got[0]
    assert msg.reason == maps.SlowReason.NEIGH_LEARNED
    assert (msg.cube_id, msg.in_port, msg.arg) == (lab.r.cube.id, lab.ports["b"].id,
                                                   maps.ip_be(peer_ip))
    assert (msg.pkt_len, pkt) == (0, b"")


# ---------------------------------------------------------------------------- local
@pytest.mark.parametrize("target", ["10.1.0.1", "10.2.0.1"])
def test_echo_request_to_router_gets_reply(lab: RouterLab, target: str) -> None:
    """Both the address of the input port and the other port's address answer."""
    pinger_mac, pinger_ip = random_mac(), host("a")
    payload = bytes(range(40))
    req = eth(lab.mac("a"), pinger_mac, ETH_P_IP,
              ipv4(pinger_ip, target, IPPROTO_ICMP, icmp_echo(0x4242, 7, payload)))
    before = lab.counters()
    res = lab.send("a", req)
    after = lab.counters()

    assert res.retval == TC_ACT_REDIRECT
    assert after["a"].tx_packets - before["a"].tx_packets == 1
    e = parse_eth(res.data)
    assert (e.dst, e.src, e.ethertype) == (pinger_mac, lab.mac("a"), ETH_P_IP)
    ip = parse_ipv4(e.payload)
    assert (ip.src, ip.dst, ip.proto) == (target, pinger_ip, IPPROTO_ICMP)
    assert inet_csum(ip.header) == 0, "IPv4 header checksum"
    assert inet_csum(ip.payload) == 0, "ICMP checksum"
    assert ip.payload == icmp_echo(0x4242, 7, payload, kind=0)  # type 0, same id/seq/data


# ---------------------------------------------------------------------------- drops
def test_ttl_1_is_dropped(lab: RouterLab) -> None:
    lab.add_neighbour(dst := host("b"), random_mac(), "b")  # it would be forwardable
    drops, before = lab.drops(), lab.counters()
    res = lab.send("a", udp_frame(lab, host("a"), dst, ttl=1))
    assert res.retval == TC_ACT_SHOT
    assert lab.drops().get("ttl", 0) == drops.get("ttl", 0) + 1
    after = lab.counters()
    assert after["b"].tx_packets == before["b"].tx_packets
    assert after["a"].drops - before["a"].drops == 1


def test_no_route_is_dropped(lab: RouterLab) -> None:
    drops, before = lab.drops(), lab.counters()
    res = lab.send("a", udp_frame(lab, host("a"), "192.0.2.1"))
    assert res.retval == TC_ACT_SHOT
    assert lab.drops().get("no_route", 0) == drops.get("no_route", 0) + 1
    after = lab.counters()
    assert after["b"].tx_packets == before["b"].tx_packets
    assert after["a"].drops - before["a"].drops == 1


def test_unicast_for_another_mac_is_ignored(lab: RouterLab) -> None:
    lab.add_neighbour(dst := host("b"), random_mac(), "b")
    drops, before = lab.drops(), lab.counters()
    res = lab.send("a", udp_frame(lab, host("a"), dst, dst_mac=random_mac()))
    assert res.retval == TC_ACT_SHOT
    assert lab.counters() == before
    assert lab.drops() == drops


# ---------------------------------------------------------------------------- forwarding
def check_forwarded(lab: RouterLab, sent: bytes, res: TestRunResult, next_hop_mac: str) -> None:
    assert res.retval == TC_ACT_REDIRECT  # to u2
    assert len(res.data) == len(sent)
    e_in, e_out = parse_eth(sent), parse_eth(res.data)
    assert (e_out.dst, e_out.src, e_out.ethertype) == (next_hop_mac, lab.mac("b"), ETH_P_IP)
    ip_in, ip_out = parse_ipv4(e_in.payload), parse_ipv4(e_out.payload)
    assert ip_out.ttl == ip_in.ttl - 1
    assert inet_csum(ip_out.header) == 0, f"bad IPv4 checksum after TTL {ip_in.ttl}"
    # nothing else in the header changed, and the payload is untouched
    assert ip_out.header[:8] + ip_out.header[9:10] + ip_out.header[12:] == \
        ip_in.header[:8] + ip_in.header[9:10] + ip_in.header[12:]
    assert e_out.payload[20:] == e_in.payload[20:]


def test_forwards_to_known_neighbour(lab: RouterLab) -> None:
    dst, dst_mac = host("b"), random_mac()
    lab.add_neighbour(dst, dst_mac, "b")
    pkt = udp_frame(lab, host("a"), dst)
    drops, before = lab.drops(), lab.counters()
    res = lab.send("a", pkt)
    after = lab.counters()
    check_forwarded(lab, pkt, res, dst_mac)
    assert after["b"].tx_packets - before["b"].tx_packets == 1
    assert after["b"].tx_bytes - before["b"].tx_bytes == len(pkt)
    assert after["a"].tx_packets == before["a"].tx_packets
    assert lab.drops() == drops


def test_forwarding_keeps_checksum_valid_for_any_header(lab: RouterLab) -> None:
    """Incremental checksum update over many TTLs and original checksums, the
    edge values 0x0000 and 0x0001 / 0xfffe included. (0xffff cannot occur: the
    folded one's-complement sum of a non-zero header is never 0.)"""
    dst, dst_mac = host("b"), random_mac()
    src = host("a")
    lab.add_neighbour(dst, dst_mac, "b")

    def csum_of(ident: int, ttl: int) -> int:
        return struct.unpack("!H", ipv4(src, dst, IPPROTO_UDP, udp(4000, 5000, b"hello pcn"),
                                        ttl=ttl, ident=ident)[10:12])[0]

    def ident_for(want: int, ttl: int) -> int:
        """The ident making the header checksum `want` (the sum is linear in it)."""
        rest = ~csum_of(0, ttl) & 0xFFFF  # one's-complement sum without the ident
        ident = ((~want & 0xFFFF) - rest) % 0xFFFF
        assert csum_of(ident, ttl) == want
        return ident

    cases = [(ident, ttl) for ttl in (2, 3, 64, 128, 255) for ident in (0, 1, 0x8000, 0xFFFF)]
    cases += [(ident_for(want, ttl), ttl) for want in (0x0000, 0x0001, 0xFFFE)
              for ttl in (2, 64, 255)]
    for ident, ttl in cases:
        pkt = udp_frame(lab, src, dst, ttl=ttl, ident=ident)
        check_forwarded(lab, pkt, lab.send("a", pkt), dst_mac)


def test_forwards_through_static_route_to_its_next_hop(lab: RouterLab) -> None:
    gw_mac = random_mac()
    lab.add_neighbour("10.2.0.253", gw_mac, "b")
    pkt = udp_frame(lab, host("a"), "198.51.100.7")
    before = lab.counters()
    res = lab.send("a", pkt)
    check_forwarded(lab, pkt, res, gw_mac)
    assert lab.counters()["b"].tx_packets - before["b"].tx_packets == 1


def test_unreachable_route_drops_what_only_more_specific_routes_may_carry(
        lab: RouterLab) -> None:
    """The node's guard for the cluster pod CIDR: an address in it that no
    more specific route covers is dropped (no_route), not sent out by a
    wider route (here 198.51.0.0/16 stands for the default route)."""
    gw_mac = random_mac()
    lab.add_neighbour("10.2.0.253", gw_mac, "b")
    lab.r.add_route("198.0.0.0/8", "b", nexthop="10.2.0.253")
    lab.r.add_unreachable("198.51.0.0/16")
    try:
        drops, before = lab.drops(), lab.counters()
        res = lab.send("a", udp_frame(lab, host("a"), "198.51.7.7"))
        assert res.retval == TC_ACT_SHOT
        assert lab.drops().get("no_route", 0) == drops.get("no_route", 0) + 1
        assert lab.counters()["b"].tx_packets == before["b"].tx_packets
        pkt = udp_frame(lab, host("a"), "198.51.100.9")  # the /24 inside it still routes
        check_forwarded(lab, pkt, lab.send("a", pkt), gw_mac)
        pkt = udp_frame(lab, host("a"), "198.7.7.7")  # and so does the wider route outside it
        check_forwarded(lab, pkt, lab.send("a", pkt), gw_mac)
    finally:
        lab.r.remove_route("198.51.0.0/16")
        lab.r.remove_route("198.0.0.0/8")


def test_unknown_neighbour_goes_to_slow_path(lab: RouterLab) -> None:
    src, dst = host("a"), host("b")
    pkt = udp_frame(lab, src, dst)
    drops, before = lab.drops(), lab.counters()
    with slowpath_listener(lab) as got:
        res = lab.send("a", pkt)
        poll(lab, got)
    assert res.retval == TC_ACT_SHOT
    assert lab.drops() == drops, "a packet handed to the slow path is not a drop"
    after = lab.counters()
    assert after == before
    assert len(got) == 1
    msg, held = got[0]
    assert msg.reason == maps.SlowReason.ARP_MISS
    assert (msg.cube_id, msg.in_port, msg.out_port) == (lab.r.cube.id, lab.ports["a"].id,
                                                         lab.ports["b"].id)
    assert msg.arg == maps.ip_be(dst)  # the next hop to resolve
    assert msg.pkt_len == len(pkt) and held == pkt  # untouched: TTL not yet decremented
    assert lab.r.neighbor(dst) is None


def test_unknown_neighbour_without_listener_counts_slowpath_drop(lab: RouterLab) -> None:
    """No agent reading the perf buffer: the packet cannot be handed over."""
    drops = lab.drops()
    res = lab.send("a", udp_frame(lab, host("a"), host("b")))
    assert res.retval == TC_ACT_SHOT
    assert lab.drops().get("slowpath", 0) == drops.get("slowpath", 0) + 1


# ---------------------------------------------------------------------------- fragments
_ident = itertools.count(0x7000)
BIG = bytes(range(256)) * 15 + b"end"  # a 3843-byte payload: three fragments at 1480 bytes


@pytest.mark.parametrize("case", ["in-order", "out-of-order", "tiny", "overlapping"])
def test_fragments_are_forwarded_untouched_but_for_the_ttl(lab: RouterLab, case: str) -> None:
    """The router judges nothing by ports: first, middle and last fragment,
    in any order, tiny and overlapping ones alike are routed by their
    destination (the hosts, or a firewall, judge them)."""
    dst, dst_mac = host("b"), random_mac()
    lab.add_neighbour(dst, dst_mac, "b")
    src, mac = host("a"), random_mac()
    if case == "tiny":
        pieces = fragments(src, dst, IPPROTO_TCP, struct.pack("!HHII", 1, 2, 3, 4) + bytes(12),
                           next(_ident), 8)
    else:
        pieces = fragments(src, dst, IPPROTO_UDP, udp(4000, 5000, BIG), next(_ident))
    frames = [eth(lab.mac("a"), mac, ETH_P_IP, p, pad=case != "tiny") for p in pieces]
    if case == "out-of-order":
        frames = frames[::-1]
    if case == "overlapping":  # a second copy of bytes 8-23 of the first
        frames.insert(1, eth(lab.mac("a"), mac, ETH_P_IP,
                             ipv4_fragment(src, dst, IPPROTO_UDP, pieces[0][28:44], 8, True,
                                           pieces[0][4] << 8 | pieces[0][5])))
    drops = lab.drops()
    for f in frames:
        check_forwarded(lab, f, lab.send("a", f), dst_mac)
    assert lab.drops() == drops


def test_fragmented_echo_request_to_router_gets_a_whole_reply(lab: RouterLab) -> None:
    """Each fragment is answered: the first becomes the reply's first (type 0,
    checksum updated: it covers the whole message), the later ones come back
    with their addresses swapped, so the pinger reassembles a whole reply."""
    pinger_mac, pinger_ip = random_mac(), host("a")
    ident = next(_ident)
    request = icmp_echo(0x4343, 9, BIG)
    frames = [eth(lab.mac("a"), pinger_mac, ETH_P_IP, p)
              for p in fragments(pinger_ip, "10.2.0.1", IPPROTO_ICMP, request, ident)]
    drops, before = lab.drops(), lab.counters()
    results = [lab.send("a", f) for f in frames]
    assert [r.retval for r in results] == [TC_ACT_REDIRECT] * 3
    assert lab.counters()["a"].tx_packets - before["a"].tx_packets == 3
    assert lab.drops() == drops
    want = [eth(pinger_mac, lab.mac("a"), ETH_P_IP, p)
            for p in fragments("10.2.0.1", pinger_ip, IPPROTO_ICMP,
                               icmp_echo(0x4343, 9, BIG, kind=0), ident)]
    assert_fragments([r.data for r in results], want)


def test_later_fragment_to_router_without_its_echo_request_is_dropped(lab: RouterLab) -> None:
    """Nothing to answer (its first fragment was not an echo request, or has
    not come): dropped, and never mangled into a "reply" because its data
    happens to start with the byte of an echo request."""
    pinger_mac, pinger_ip = random_mac(), host("a")
    data = bytes(1480 - 8) + b"\x08" + bytes(600)  # the second fragment starts with 0x08
    pieces = fragments(pinger_ip, "10.1.0.1", IPPROTO_ICMP, icmp_echo(0x4444, 1, data),
                       next(_ident))
    assert pieces[1][20] == 8
    drops = lab.drops()
    res = lab.send("a", eth(lab.mac("a"), pinger_mac, ETH_P_IP, pieces[1]))
    assert res.retval == TC_ACT_SHOT
    assert lab.drops().get("fragment", 0) == drops.get("fragment", 0) + 1


# ---------------------------------------------------------------------------- path MTU
ROUTER_QUOTE = 32  # bytes after the IP header that a "fragmentation needed" quotes


def big_packet(src: str, dst: str, total: int, proto: int = IPPROTO_UDP, df: bool = True,
               ident: int | None = None, ttl: int = 64) -> bytes:
    """An IPv4 packet of `total` bytes (TCP with a valid checksum, UDP, or an
    ICMP echo request), DF set or not."""
    ident = next(_ident) if ident is None else ident
    room = total - 20
    if proto == IPPROTO_TCP:
        l4 = tcp(src, dst, 40000, 443, flags=TCP_ACK, data=bytes(range(256)) * 64)[:room]
        l4 = tcp(src, dst, 40000, 443, flags=TCP_ACK, data=l4[20:])
    elif proto == IPPROTO_ICMP:
        l4 = icmp_echo(0x5151, 1, bytes(room - 8))
    else:
        l4 = udp(4000, 5000, bytes(room - 8))
    assert len(l4) == room
    if df:
        return ipv4(src, dst, proto, l4, ttl=ttl, ident=ident)
    return ipv4_fragment(src, dst, proto, l4, 0, False, ident, ttl)  # no DF, no MF


def frag_needed_frame(lab: RouterLab, in_port: str, sender_mac: str, sent: bytes,
                      mtu: int) -> bytes:
    """What a Linux router answers to `sent` (an Ethernet frame): ICMP type 3
    code 4 from the input port's address to the sender, next-hop MTU `mtu`
    (RFC 1191), quoting the packet as it arrived (TTL not yet decremented)."""
    ip = parse_eth(sent).payload
    quote = ip[:20 + ROUTER_QUOTE]
    router_ip = lab.ports[in_port].ip
    sender = parse_ipv4(ip).src
    msg = icmp_error(3, 4, quote, mtu)
    return eth(sender_mac, lab.mac(in_port), ETH_P_IP,
               ipv4_fragment(router_ip, sender, IPPROTO_ICMP, msg, 0, False, ident=0, ttl=64))


def drops_moved(lab: RouterLab, before: dict[str, int]) -> dict[str, int]:
    after = lab.drops()
    return {k: after.get(k, 0) - before.get(k, 0) for k in after
            if after.get(k, 0) != before.get(k, 0)}


def tx_moved(before: dict[str, PortCounters], after: dict[str, PortCounters]) -> dict[str, int]:
    return {p: after[p].tx_packets - before[p].tx_packets for p in after
            if after[p].tx_packets != before[p].tx_packets}


@pytest.mark.parametrize("proto", [IPPROTO_UDP, IPPROTO_TCP, IPPROTO_ICMP])
@pytest.mark.parametrize("in_port", ["a", "h"])
def test_a_df_packet_too_big_for_the_next_hop_gets_fragmentation_needed(
        lab: RouterLab, proto: int, in_port: str) -> None:
    """1500 bytes with DF towards port c (its netdev's MTU is 1400): not
    forwarded, but answered as a Linux router does (ip_forward): type 3 code
    4 with the next-hop MTU, from the address of the port it came in by, back
    to the frame's sender, quoting its IP header and the start of its payload
    with every checksum right. From the node's NIC (h) alike."""
    dst, sender, sender_mac = host("c"), host(in_port), random_mac()
    lab.add_neighbour(dst, random_mac(), "c")
    sent = eth(lab.mac(in_port), sender_mac, ETH_P_IP, big_packet(sender, dst, 1500, proto))
    drops, before = lab.drops(), lab.counters()
    res = lab.send(in_port, sent)
    assert res.retval == TC_ACT_REDIRECT  # back out of the input port's netdev
    assert tx_moved(before, lab.counters()) == {in_port: 1}
    assert drops_moved(lab, drops) == {"too_big": 1}
    assert_frame(res.data, frag_needed_frame(lab, in_port, sender_mac, sent, C_MTU))
    ip = parse_ipv4(parse_eth(res.data).payload)
    assert (ip.src, ip.dst, ip.payload[:2]) == (lab.ports[in_port].ip, sender, b"\x03\x04")
    assert struct.unpack("!H", ip.payload[6:8])[0] == C_MTU


@pytest.mark.parametrize("size", [C_MTU - 1, C_MTU])
def test_a_packet_that_fits_the_next_hop_is_forwarded(lab: RouterLab, size: int) -> None:
    """Up to the MTU exactly, DF or not: forwarded as before."""
    dst, dst_mac = host("c"), random_mac()
    lab.add_neighbour(dst, dst_mac, "c")
    for df in (True, False):
        pkt = eth(lab.mac("a"), random_mac(), ETH_P_IP, big_packet(host("a"), dst, size, df=df))
        drops, before = lab.drops(), lab.counters()
        res = lab.send("a", pkt)
        assert res.retval == TC_ACT_REDIRECT and len(res.data) == len(pkt)
        e = parse_eth(res.data)
        assert (e.dst, e.src) == (dst_mac, lab.mac("c"))
        assert parse_ipv4(e.payload).ttl == 63
        assert tx_moved(before, lab.counters()) == {"c": 1}
        assert lab.drops() == drops


def test_one_byte_over_the_mtu_is_too_big(lab: RouterLab) -> None:
    dst, sender_mac = host("c"), random_mac()
    lab.add_neighbour(dst, random_mac(), "c")
    sent = eth(lab.mac("a"), sender_mac, ETH_P_IP, big_packet(host("a"), dst, C_MTU + 1))
    res = lab.send("a", sent)
    assert res.retval == TC_ACT_REDIRECT
    assert_frame(res.data, frag_needed_frame(lab, "a", sender_mac, sent, C_MTU))


def test_the_mtu_follows_the_netdev(lab: RouterLab) -> None:
    """Read from the kernel when the packet leaves: `ip link set mtu` on the
    port's netdev changes what fits at once."""
    dst, sender_mac = host("b"), random_mac()
    lab.add_neighbour(dst, random_mac(), "b")
    sent = eth(lab.mac("a"), sender_mac, ETH_P_IP, big_packet(host("a"), dst, 1300))
    assert lab.send("a", sent).retval == TC_ACT_REDIRECT  # u2: 1500
    assert parse_eth(lab.send("a", sent).data).dst != sender_mac
    with IPRoute(netns=lab.net.name) as ipr:
        ipr.link("set", index=lab.net.ifindex["u2"], mtu=1280)
        try:
            res = lab.send("a", sent)
        finally:
            ipr.link("set", index=lab.net.ifindex["u2"], mtu=1500)
    assert_frame(res.data, frag_needed_frame(lab, "a", sender_mac, sent, 1280))


def test_a_configured_mtu_is_the_ports_own(lab: RouterLab) -> None:
    """The MTU the agent sets on a port (the pods' port: peered with the
    bridge, no netdev of its own) is the one checked and reported; taking it
    away leaves the netdev's."""
    dst, sender_mac = host("c"), random_mac()
    lab.add_neighbour(dst, random_mac(), "c")
    sent = eth(lab.mac("a"), sender_mac, ETH_P_IP, big_packet(host("a"), dst, 1301))
    lab.r.set_mtu("c", 1300)
    try:
        assert lab.r.mtu("c") == 1300
        res = lab.send("a", sent)
        assert_frame(res.data, frag_needed_frame(lab, "a", sender_mac, sent, 1300))
        fits = eth(lab.mac("a"), sender_mac, ETH_P_IP, big_packet(host("a"), dst, 1300))
        assert parse_eth(lab.send("a", fits).data).src == lab.mac("c")
    finally:
        lab.r.set_mtu("c", None)
    assert lab.r.mtu("c") is None
    assert parse_eth(lab.send("a", sent).data).src == lab.mac("c")  # 1301 fits u3's 1400
    with pytest.raises(ValueError):
        lab.r.set_mtu("c", 67)


def test_a_df_packet_too_big_is_answered_before_its_next_hop_is_resolved(
        lab: RouterLab) -> None:
    """What cannot leave does not wait for an ARP reply in user space."""
    dst, sender_mac = host("c"), random_mac()
    sent = eth(lab.mac("a"), sender_mac, ETH_P_IP, big_packet(host("a"), dst, 1500))
    with slowpath_listener(lab) as got:
        res = lab.send("a", sent)
        poll(lab, got, timeout_s=0.2)
    assert got == []
    assert_frame(res.data, frag_needed_frame(lab, "a", sender_mac, sent, C_MTU))


@pytest.mark.parametrize("proto,seg,fits", [
    (IPPROTO_TCP, C_MTU - 40, True), (IPPROTO_TCP, C_MTU - 39, False),
    (IPPROTO_UDP, C_MTU - 28, True), (IPPROTO_UDP, C_MTU - 27, False)])
def test_a_gso_packet_is_judged_by_its_segments(lab: RouterLab, proto: int, seg: int,
                                                fits: bool) -> None:
    """A GSO packet (GRO merged it, or a TSO sender built it) is as long as
    all its segments together: it fits when each segment, headers and
    gso_size bytes of payload, does (Linux: skb_gso_validate_network_len).
    One whose segments are too big is answered like any packet."""
    dst, dst_mac, sender_mac = host("c"), random_mac(), random_mac()
    lab.add_neighbour(dst, dst_mac, "c")
    sent = eth(lab.mac("a"), sender_mac, ETH_P_IP, big_packet(host("a"), dst, 3000, proto))
    drops = lab.drops()
    res = lab.send("a", sent, gso_size=seg)
    assert res.retval == TC_ACT_REDIRECT
    if fits:
        assert len(res.data) == len(sent) and parse_eth(res.data).dst == dst_mac
        assert lab.drops() == drops
    else:
        assert_frame(res.data, frag_needed_frame(lab, "a", sender_mac, sent, C_MTU))
        assert drops_moved(lab, drops) == {"too_big": 1}


@pytest.mark.parametrize("case", ["icmp-error", "later-fragment", "l2-broadcast",
                                  "loopback-source", "multicast-destination"])
def test_no_error_about_what_gets_none(lab: RouterLab, case: str) -> None:
    """As Linux's icmp_send (RFC 1812 4.3.2.7): no error about an ICMP error,
    a later fragment, a frame not unicast to the router, or from an address
    that names no single host. Dropped and counted all the same."""
    src, dst, dst_mac = host("a"), host("c"), random_mac()
    frame_dst = lab.mac("a")
    if case == "icmp-error":
        quote = ipv4(dst, src, IPPROTO_UDP, udp(1, 2, b""))
        pkt = ipv4(src, dst, IPPROTO_ICMP, icmp_error(3, 3, quote + bytes(1500)))
    elif case == "later-fragment":
        hdr = bytearray(ipv4_fragment(src, dst, IPPROTO_UDP, bytes(1480), 1480, True))
        hdr[6] |= 0x40  # DF on a fragment: nonsense, but it says "do not fragment"
        hdr[10:12] = b"\0\0"
        hdr[10:12] = struct.pack("!H", inet_csum(bytes(hdr[:20])))
        pkt = bytes(hdr)
    elif case == "multicast-destination":
        dst = "239.1.2.3"
        lab.r.add_route("239.1.2.0/24", "c")
        pkt = big_packet(src, dst, 1500)
    else:
        pkt = big_packet("127.0.0.9" if case == "loopback-source" else src, dst, 1500)
        frame_dst = BROADCAST if case == "l2-broadcast" else frame_dst
    lab.add_neighbour(dst, dst_mac, "c")
    drops, before = lab.drops(), lab.counters()
    try:
        res = lab.send("a", eth(frame_dst, random_mac(), ETH_P_IP, pkt))
    finally:
        if case == "multicast-destination":
            lab.r.remove_route("239.1.2.0/24")
    assert res.retval == TC_ACT_SHOT
    assert lab.counters()["a"].tx_packets == before["a"].tx_packets
    assert lab.counters()["c"].tx_packets == before["c"].tx_packets
    assert drops_moved(lab, drops) == {"too_big": 1}


def test_a_packet_too_big_without_df_is_dropped_and_counted(lab: RouterLab) -> None:
    """Not from the node's NIC: nobody can fragment it (tc cannot)."""
    dst = host("c")
    lab.add_neighbour(dst, random_mac(), "c")
    drops, before = lab.drops(), lab.counters()
    res = lab.send("a", eth(lab.mac("a"), random_mac(), ETH_P_IP,
                            big_packet(host("a"), dst, 1500, df=False)))
    assert res.retval == TC_ACT_SHOT
    assert tx_moved(before, lab.counters()) == {}
    assert drops_moved(lab, drops) == {"too_big": 1}
    assert lab.counters()["a"].drops - before["a"].drops == 1


def test_a_datagram_too_big_without_df_from_the_nic_goes_whole_to_the_host(
        lab: RouterLab) -> None:
    """From the port shared with the host (the node's NIC) a packet too big
    without DF goes to the host stack untouched (TC_ACT_OK), whose forwarding
    fragments it on its way back through the host link. A fragmented
    datagram goes there whole: its later fragments follow the first even
    when they would fit, so a host that reassembles (conntrack) gets them
    all. Another datagram's fragments, and packets that fit, are routed."""
    src, dst, dst_mac, mac = host("h"), host("c"), random_mac(), random_mac()
    lab.add_neighbour(dst, dst_mac, "c")
    ident = next(_ident)
    pieces = fragments(src, dst, IPPROTO_UDP, udp(4000, 5000, BIG), ident)  # 1500, 1500, 911
    assert [len(p) for p in pieces] == [1500, 1500, 911]
    drops, before = lab.drops(), lab.counters()
    for p in pieces:
        frame = eth(lab.mac("h"), mac, ETH_P_IP, p)
        res = lab.send("h", frame)
        assert (res.retval, res.data) == (TC_ACT_OK, frame)
    whole = eth(lab.mac("h"), mac, ETH_P_IP, big_packet(src, dst, 1500, df=False))
    res = lab.send("h", whole)
    assert (res.retval, res.data) == (TC_ACT_OK, whole)
    assert lab.counters() == before and lab.drops() == drops

    # the record counts on the host's netdev only: the last piece, from port
    # a, is routed; and a datagram whose fragments fit is routed from h too
    res = lab.send("a", eth(lab.mac("a"), mac, ETH_P_IP, pieces[2]))
    assert res.retval == TC_ACT_REDIRECT
    small = fragments(src, dst, IPPROTO_UDP, udp(4000, 5000, BIG), next(_ident), size=1376)
    for p in small:
        res = lab.send("h", eth(lab.mac("h"), mac, ETH_P_IP, p))
        assert res.retval == TC_ACT_REDIRECT and parse_eth(res.data).dst == dst_mac


def test_fragmentation_needed_for_a_frame_without_sender_mac_goes_to_the_next_hop(
        lab: RouterLab) -> None:
    """The node's own packets that its lo hands to the host port carry no
    source MAC (lo has none): the error goes to the next hop of the route
    back to the sender, if it leaves by the same port and is resolved; with
    nowhere to send it, there is no error."""
    dst, sender, sender_mac = host("c"), host("a"), random_mac()
    lab.add_neighbour(dst, random_mac(), "c")
    sent = eth(lab.mac("a"), "00:00:00:00:00:00", ETH_P_IP, big_packet(sender, dst, 1500))
    drops = lab.drops()
    assert lab.send("a", sent).retval == TC_ACT_SHOT  # the sender is not resolved
    lab.add_neighbour(sender, sender_mac, "a")
    res = lab.send("a", sent)
    assert res.retval == TC_ACT_REDIRECT
    assert_frame(res.data, frag_needed_frame(lab, "a", sender_mac, sent, C_MTU))
    assert drops_moved(lab, drops) == {"too_big": 2}
