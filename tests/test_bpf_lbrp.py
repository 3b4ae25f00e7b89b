"""The lbrp cube's program on crafted frames (BPF_PROG_TEST_RUN).

Topology, as a node stacks it: bridge `b` with ports `client` (veth u1) and
`backend` (u2), each with the lbrp `lb` on its ingress and egress hooks, and
port `gw` (u3, no hooks) behind which the gateway MAC is learned. A pod's
frame enters through the entry program on its veth: ingress hook (lbrp), then
the bridge, which forwards it to the gateway (TC_ACT_REDIRECT, `gw` tx +1). A
frame for a pod leaves through the egress entry program of its veth: egress
hook (lbrp), then TC_ACT_OK (the kernel transmits it). Port `host` (u4, the
lbrp on both hooks) stands for the router's port to the node's own stack,
which the lbrp is told of (LbConfig), with the node's lo handing it the
node's connections to its NodePorts; the bridge forwards its MAC to `gw`.

Every test has its own service address, clients and backends and compares
counters before and after, so the tests share one compiled runtime.
"""

from __future__ import annotations

import ctypes as ct
import itertools
import struct
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from bpfunit import (
    ETH_P_IP,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    PORT_HARDER,
    PORT_TRIES,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    UnitNet,
    age_sessions,
    assert_fragments,
    assert_frame,
    eth,
    flow_hash,
    fragments,
    icmp_echo,
    icmp_error,
    inet_csum,
    ipv4,
    ipv4_fragment,
    l4_ports,
    parse_eth,
    parse_ipv4,
    port_missed_by_a_wrapping_sum,
    port_tries,
    random_mac,
    requote,
    tcp,
    udp,
    udp_csum,
    unit_net,
)

from pcn_agent.dataplane import maps
from pcn_agent.dataplane.cubes.bridge import Bridge
from pcn_agent.dataplane.cubes.lbrp import (
    Backend,
    LbConfig,
    LoadBalancer,
    be16,
    weighted_slots,
)
from pcn_agent.dataplane.runtime import PortCounters, PortState
from pcn_agent.dataplane.sessions import State
from pcn_testsupport import testrun
from pcn_testsupport.testrun import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TestRunResult

pytestmark = [pytest.mark.bpf,
              pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning")]

CTX_CUBE = 0  # PCN_CTX_CUBE: how pcn_hook_run marks a hook run by tail calls
SERVICE_CIDR = "10.96.0.0/12"
GW_IP = "10.244.1.1"  # the pods' gateway: the source of hairpin connections
NODE_IP, HOST_POD_IP, LOCAL_PODS = "192.168.50.10", "10.244.1.0", "10.244.1.0/24"
MASQ_LO, MASQ_HI = 61000, 61099
LOOPBACK = 1  # lo's ifindex
ZERO_MAC = "00:00:00:00:00:00"
_vip = itertools.count(10)
_client = itertools.count(10)
_backend = itertools.count(1)


def vip() -> str:
    n = next(_vip)
    assert n < 250, "ran out of service addresses"
    return f"10.96.0.{n}"


def client() -> str:
    n = next(_client)
    assert n < 250, "ran out of client addresses"
    return f"10.244.1.{n}"


def backend_ip() -> str:
    n = next(_backend)
    assert n < 250 * 250, "ran out of backend addresses"
    return f"10.244.{100 + n // 250}.{n % 250 + 1}"


@dataclass
class LbLab:
    net: UnitNet
    b: Bridge
    lb: LoadBalancer
    ports: dict[str, PortState]
    gw_mac: str
    client_mac: str

    def from_pod(self, frame: bytes, port: str = "client") -> TestRunResult:
        """`frame` sent by the pod behind `port`: tc ingress of its veth."""
        return self.net.run(self.net.rt._entry_fds["pcn_ingress"], frame,
                            ifindex=self.net.ifindex[self.ports[port].netdev or ""])

    def to_pod(self, frame: bytes, port: str = "client") -> TestRunResult:
        """`frame` on its way to the pod behind `port`: tc egress of its veth."""
        return self.net.run(self.net.rt._entry_fds["pcn_egress"], frame,
                            ifindex=self.net.ifindex[self.ports[port].netdev or ""])

    def from_loopback(self, frame: bytes) -> TestRunResult:
        """`frame` leaving the node's own stack through lo: tc egress of lo."""
        return self.net.run(self.net.rt._entry_fds["pcn_egress"], frame, ifindex=LOOPBACK)

    def counters(self) -> dict[str, PortCounters]:
        return {name: self.net.rt.port_counters(p) for name, p in self.ports.items()}

    def drops(self) -> dict[str, int]:
        return self.net.rt.cube_drops("lb")

    def sessions(self) -> list[dict]:
        return self.lb.services.sessions()

    def raw_session(self, saddr: str, daddr: str, sport: int, dport: int,
                    proto: int) -> maps.Xlate | None:
        key = maps.Flow(maps.ip_be(saddr), maps.ip_be(daddr), be16(sport), be16(dport), proto)
        try:
            return self.net.rt.table("lb_sessions", "lbrp")[key]
        except KeyError:
            return None


@pytest.fixture(scope="module")
def lab() -> Iterator[LbLab]:
    with unit_net(veths=4) as net:
        rt = net.rt
        b = Bridge(rt, "b")
        lb = LoadBalancer(rt, "lb")
        names = ("client", "backend", "gw", "host")
        ports = {name: b.add_port(name) for name in names}
        for name in ("client", "backend", "host"):  # as NodeDataplane stacks it
            rt.set_hook(ports[name], maps.HOOK_INGRESS, [rt.stacked("lb")])
            rt.set_hook(ports[name], maps.HOOK_EGRESS, [rt.stacked("lb")])
        for i, name in enumerate(names, start=1):
            rt.connect_netdev(ports[name], f"u{i}")
        lb.configure(LbConfig(service_cidr=SERVICE_CIDR, hairpin_ip=GW_IP, node_ip=NODE_IP,
                              host_pod_ip=HOST_POD_IP, local_pods=LOCAL_PODS,
                              host_port=ports["host"].id, masq_range=(MASQ_LO, MASQ_HI)))
        rt.attach_loopback(ports["host"])
        gw_mac = random_mac()
        fdb = rt.table("bridge_fdb", "bridge")
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        for mac in (gw_mac, ports["host"].mac):
            fdb[maps.BridgeFdbKey(b.cube.id, maps.mac_bytes(mac))] = maps.BridgeFdbVal(
                port=ports["gw"].id, seen_ns=now)
        yield LbLab(net, b, lb, ports, gw_mac, random_mac())


# ---------------------------------------------------------------------------- frames
def tcp_frame(lab: LbLab, src: str, dst: str, sport: int, dport: int, flags: int = TCP_SYN,
              seq: int = 1000, ack: int = 0, outbound: bool = True) -> bytes:
    """Outbound: from the client pod to the gateway; else from the gateway to it."""
    macs = (lab.gw_mac, lab.client_mac) if outbound else (lab.client_mac, lab.gw_mac)
    return eth(*macs, ETH_P_IP,
               ipv4(src, dst, IPPROTO_TCP, tcp(src, dst, sport, dport, flags, seq, ack)))


def udp_frame(lab: LbLab, src: str, dst: str, sport: int, dport: int, data: bytes = b"dns?",
              outbound: bool = True, checksum: bool = True) -> bytes:
    macs = (lab.gw_mac, lab.client_mac) if outbound else (lab.client_mac, lab.gw_mac)
    dgram = udp_csum(src, dst, sport, dport, data) if checksum else udp(sport, dport, data)
    return eth(*macs, ETH_P_IP, ipv4(src, dst, IPPROTO_UDP, dgram))


def dest_of(res: TestRunResult) -> tuple[str, int]:
    ip = parse_ipv4(parse_eth(res.data).payload)
    return ip.dst, l4_ports(ip).dport


def gw_tx(before: dict[str, PortCounters], after: dict[str, PortCounters]) -> int:
    return after["gw"].tx_packets - before["gw"].tx_packets


# ---------------------------------------------------------------------------- ClusterIP
def test_syn_to_service_goes_to_a_backend(lab: LbLab) -> None:
    svc, cl = vip(), client()
    backends = [Backend(backend_ip(), 8080), Backend(backend_ip(), 8080)]
    lab.lb.set_service(svc, 80, "tcp", backends)
    drops, before = lab.drops(), lab.counters()
    res = lab.from_pod(tcp_frame(lab, cl, svc, 40000, 80))
    after = lab.counters()

    assert res.retval == TC_ACT_REDIRECT  # the bridge sent it on to the gateway
    assert gw_tx(before, after) == 1
    assert after["client"].rx_packets - before["client"].rx_packets == 1
    chosen, port = dest_of(res)
    assert (chosen, port) in {(b.ip, b.port) for b in backends}
    # Only the destination changed; IP and TCP checksums recomputed from scratch.
    assert_frame(res.data, tcp_frame(lab, cl, chosen, 40000, 8080))
    assert lab.drops() == drops

    assert {"client": f"{cl}:40000", "service": f"{svc}:80", "backend": f"{chosen}:8080",
            "proto": IPPROTO_TCP} in lab.sessions()
    rev = lab.raw_session(chosen, cl, 8080, 40000, IPPROTO_TCP)  # the reply, as it will come
    assert rev is not None
    assert (rev.kind, rev.is_src, maps.ip_str(rev.ip), rev.port) == (2, 1, svc, be16(80))


def test_same_flow_keeps_its_backend_even_after_the_service_changes(lab: LbLab) -> None:
    svc, cl = vip(), client()
    backends = [Backend(backend_ip(), 8080) for _ in range(4)]
    lab.lb.set_service(svc, 80, "tcp", backends)
    first = dest_of(lab.from_pod(tcp_frame(lab, cl, svc, 41000, 80)))
    for _ in range(5):  # retransmitted SYNs
        assert dest_of(lab.from_pod(tcp_frame(lab, cl, svc, 41000, 80))) == first

    # The chosen backend leaves the slot table: established flows keep it,
    # new flows never get it.
    rest = [b for b in backends if (b.ip, b.port) != first]
    lab.lb.set_service(svc, 80, "tcp", rest)
    res = lab.from_pod(tcp_frame(lab, cl, svc, 41000, 80, flags=TCP_ACK, seq=1001, ack=1))
    assert dest_of(res) == first
    assert_frame(res.data, tcp_frame(lab, cl, first[0], 41000, 8080, flags=TCP_ACK, seq=1001,
                                     ack=1))
    for sport in range(42000, 42020):
        assert dest_of(lab.from_pod(tcp_frame(lab, cl, svc, sport, 80))) in \
            {(b.ip, b.port) for b in rest}


def test_reply_from_backend_gets_the_service_address_back(lab: LbLab) -> None:
    svc, cl = vip(), client()
    be = Backend(backend_ip(), 9000)
    lab.lb.set_service(svc, 443, "tcp", [be])
    assert dest_of(lab.from_pod(tcp_frame(lab, cl, svc, 43000, 443))) == (be.ip, 9000)

    reply = tcp_frame(lab, be.ip, cl, 9000, 43000, flags=TCP_SYN | TCP_ACK, seq=777, ack=1001,
                      outbound=False)
    before = lab.counters()
    res = lab.to_pod(reply)
    assert res.retval == TC_ACT_OK  # end of the egress hook of a netdev: the kernel sends it
    assert_frame(res.data, tcp_frame(lab, svc, cl, 443, 43000, flags=TCP_SYN | TCP_ACK, seq=777,
                                     ack=1001, outbound=False))
    assert lab.counters() == before  # the egress hook counts nothing of its own


def test_lbrp_program_run_directly_with_chain_metadata(lab: LbLab) -> None:
    """The lbrp's own program with skb->cb as pcn_hook_run sets it: after the
    translation, pcn_pass continues to the owner of the port (the bridge)."""
    svc, cl = vip(), client()
    be = Backend(backend_ip(), 8080)
    lab.lb.set_service(svc, 80, "tcp", [be])
    port = lab.ports["client"]
    cb = [port.id, maps.HOOK_INGRESS | 0 << 8 | CTX_CUBE << 16, lab.lb.cube.id]
    before = lab.counters()
    res = lab.net.run(lab.net.rt.types["lbrp"].fd, tcp_frame(lab, cl, svc, 44000, 80), cb=cb,
                      ifindex=lab.net.ifindex["u1"])
    after = lab.counters()
    assert res.retval == TC_ACT_REDIRECT
    assert gw_tx(before, after) == 1
    assert after["client"].rx_packets == before["client"].rx_packets  # no entry program ran
    assert_frame(res.data, tcp_frame(lab, cl, be.ip, 44000, 8080))
    assert res.cb[:3] == (port.id, maps.HOOK_INGRESS, 0)  # pcn_to_cube's metadata for the bridge


@pytest.mark.parametrize("kind", ["pod", "outside", "udp", "icmp"])
def test_traffic_not_for_a_service_passes_unchanged(lab: LbLab, kind: str) -> None:
    """Outside the Service range, whatever is not a service goes on untouched."""
    svc, cl = vip(), client()
    lab.lb.set_service(svc, 80, "tcp", [Backend(backend_ip(), 8080)])
    pkt = {
        "pod": lambda: tcp_frame(lab, cl, backend_ip(), 45000, 80),
        "outside": lambda: tcp_frame(lab, cl, "192.0.2.80", 45000, 80),
        "udp": lambda: udp_frame(lab, cl, "192.0.2.53", 45000, 53),
        "icmp": lambda: eth(lab.gw_mac, lab.client_mac, ETH_P_IP,
                            ipv4(cl, "192.0.2.1", IPPROTO_ICMP, icmp_echo(1, 1, b"ping"))),
    }[kind]()
    sessions, drops, before = lab.sessions(), lab.drops(), lab.counters()
    res = lab.from_pod(pkt)
    assert res.retval == TC_ACT_REDIRECT
    assert res.data == pkt
    assert gw_tx(before, lab.counters()) == 1
    assert lab.sessions() == sessions
    assert lab.drops() == drops


def test_reply_without_session_passes_unchanged(lab: LbLab) -> None:
    pkt = tcp_frame(lab, "192.0.2.80", client(), 80, 46000, flags=TCP_SYN | TCP_ACK,
                    outbound=False)
    res = lab.to_pod(pkt)
    assert res.retval == TC_ACT_OK
    assert res.data == pkt


@pytest.mark.parametrize("checksum", [True, False], ids=["checksum", "no-checksum"])
def test_udp_service_both_directions(lab: LbLab, checksum: bool) -> None:
    svc, cl = vip(), client()
    be = Backend(backend_ip(), 5353)
    lab.lb.set_service(svc, 53, "udp", [be])
    res = lab.from_pod(udp_frame(lab, cl, svc, 47000, 53, checksum=checksum))
    assert res.retval == TC_ACT_REDIRECT
    # assert_frame also checks that a datagram sent without checksum keeps none
    assert_frame(res.data, udp_frame(lab, cl, be.ip, 47000, 5353, checksum=checksum))
    assert {"client": f"{cl}:47000", "service": f"{svc}:53", "backend": f"{be.ip}:5353",
            "proto": IPPROTO_UDP} in lab.sessions()

    res = lab.to_pod(udp_frame(lab, be.ip, cl, 5353, 47000, b"answer", outbound=False,
                               checksum=checksum))
    assert res.retval == TC_ACT_OK
    assert_frame(res.data, udp_frame(lab, svc, cl, 53, 47000, b"answer", outbound=False,
                                     checksum=checksum))


@pytest.mark.parametrize("proto", [IPPROTO_TCP, IPPROTO_UDP])
def test_a_new_direct_flow_is_not_captured_by_an_old_service_session(lab: LbLab,
                                                                     proto: int) -> None:
    """A pod reaches a Service from port 41001 (landing on web-2), then web-2's
    own address from the same port: the replies of the direct flow must come
    from web-2, not be rewritten to the VIP by the old session's reverse entry."""
    svc, cl = vip(), client()
    web2 = Backend(backend_ip(), 8080)
    if proto == IPPROTO_TCP:
        lab.lb.set_service(svc, 80, "tcp", [web2])
        frame = lambda src, dst, sp, dp, out=True, fl=TCP_SYN: tcp_frame(  # noqa: E731
            lab, src, dst, sp, dp, flags=fl, outbound=out)
    else:
        lab.lb.set_service(svc, 80, "udp", [web2])
        frame = lambda src, dst, sp, dp, out=True, fl=0: udp_frame(  # noqa: E731
            lab, src, dst, sp, dp, outbound=out)
    assert dest_of(lab.from_pod(frame(cl, svc, 41001, 80))) == (web2.ip, 8080)
    # an established flow's packets to the backend itself do not end the session
    if proto == IPPROTO_TCP:
        lab.from_pod(frame(cl, web2.ip, 41001, 8080, fl=TCP_ACK))
        assert lab.raw_session(web2.ip, cl, 8080, 41001, proto) is not None
    direct = frame(cl, web2.ip, 41001, 8080)
    res = lab.from_pod(direct)
    assert res.retval == TC_ACT_REDIRECT and res.data == direct  # not a service: untouched
    reply = frame(web2.ip, cl, 8080, 41001, out=False, fl=TCP_SYN | TCP_ACK)
    res = lab.to_pod(reply)
    assert (res.retval, res.data) == (TC_ACT_OK, reply)  # from web-2, as the pod expects
    assert lab.raw_session(web2.ip, cl, 8080, 41001, proto) is None
    assert lab.raw_session(cl, svc, 41001, 80, proto) is None


def test_udp_sessions_leave_with_their_backend(lab: LbLab) -> None:
    """A connected UDP socket keeps sending to the VIP: when its backend leaves
    the Service (or the Service goes), its sessions go both ways, as
    kube-proxy clears UDP conntrack, so the next datagram picks a live
    backend. Other backends' sessions and TCP sessions are kept."""
    svc, cl = vip(), client()
    gone, stays = Backend(backend_ip(), 5353), Backend(backend_ip(), 5353)
    lab.lb.set_service(svc, 53, "udp", [gone])
    assert dest_of(lab.from_pod(udp_frame(lab, cl, svc, 47100, 53))) == (gone.ip, 5353)
    lab.lb.set_service(svc, 53, "udp", [gone, stays])
    sport_stays = next(p for p in range(47101, 47300)
                       if dest_of(lab.from_pod(udp_frame(lab, cl, svc, p, 53))) == (stays.ip, 5353))
    tcp_svc = vip()
    lab.lb.set_service(tcp_svc, 80, "tcp", [Backend(gone.ip, 8080)])
    lab.from_pod(tcp_frame(lab, cl, tcp_svc, 47400, 80))

    lab.lb.set_service(svc, 53, "udp", [stays])
    assert lab.raw_session(cl, svc, 47100, 53, IPPROTO_UDP) is None
    assert lab.raw_session(gone.ip, cl, 5353, 47100, IPPROTO_UDP) is None
    assert dest_of(lab.from_pod(udp_frame(lab, cl, svc, 47100, 53))) == (stays.ip, 5353)
    assert lab.raw_session(cl, svc, sport_stays, 53, IPPROTO_UDP) is not None
    lab.lb.set_service(tcp_svc, 80, "tcp", [])  # TCP: the connection may still finish
    assert lab.raw_session(cl, tcp_svc, 47400, 80, IPPROTO_TCP) is not None

    lab.lb.delete_service(svc, 53, "udp")
    assert lab.raw_session(cl, svc, 47100, 53, IPPROTO_UDP) is None
    assert lab.raw_session(stays.ip, cl, 5353, 47100, IPPROTO_UDP) is None
    assert lab.raw_session(cl, svc, sport_stays, 53, IPPROTO_UDP) is None


# ---------------------------------------------------------------------------- ICMP errors
def quote_of(frame: bytes, nbytes: int = 8) -> bytes:
    """What an ICMP error quotes of `frame`: its IP header and `nbytes` more."""
    ip = parse_eth(frame).payload
    return ip[:(ip[0] & 0x0F) * 4 + nbytes]


def icmp_frame(lab: LbLab, src: str, dst: str, message: bytes, outbound: bool) -> bytes:
    macs = (lab.gw_mac, lab.client_mac) if outbound else (lab.client_mac, lab.gw_mac)
    return eth(*macs, ETH_P_IP, ipv4(src, dst, IPPROTO_ICMP, message))


@pytest.mark.parametrize("proto", [IPPROTO_UDP, IPPROTO_TCP])
@pytest.mark.parametrize("reporter", ["backend", "router", "router-mtu"])
def test_icmp_error_about_a_service_flow_reaches_the_client_translated(
        lab: LbLab, proto: int, reporter: str) -> None:
    """The backend's port unreachable (or a router's error on the way: time
    exceeded, or fragmentation needed with its next-hop MTU, which a pcn
    router sends too) quotes the packet as the backend got it; the client
    must see it quote what it sent, to the service, or its socket never
    hears of the error."""
    svc, cl, be = vip(), client(), Backend(backend_ip(), 5353)
    lab.lb.set_service(svc, 53, "udp" if proto == IPPROTO_UDP else "tcp", [be])
    sent = (udp_frame(lab, cl, svc, 47001, 53) if proto == IPPROTO_UDP
            else tcp_frame(lab, cl, svc, 47001, 53))
    res = lab.from_pod(sent)
    assert dest_of(res) == (be.ip, 5353)
    at_backend = quote_of(res.data, 20)  # a TCP header whole: its checksum must stay
    source = be.ip if reporter == "backend" else "10.244.200.1"
    kind, code, mtu = {"backend": (3, 3, 0), "router": (11, 0, 0),
                       "router-mtu": (3, 4, 1400)}[reporter]
    res = lab.to_pod(icmp_frame(lab, source, cl, icmp_error(kind, code, at_backend, mtu), False))
    assert res.retval == TC_ACT_OK
    want_src = svc if reporter == "backend" else source
    want = icmp_frame(lab, want_src, cl,
                      icmp_error(kind, code, requote(at_backend, dst=svc, dport=53), mtu), False)
    assert_frame(res.data, want)
    # the quote's IP header and ports are what the client sent
    inner = parse_ipv4(parse_eth(res.data).payload).payload[8:]
    assert inner[:24] == quote_of(sent, 4)


def test_client_icmp_error_about_a_service_reply_goes_to_the_backend(lab: LbLab) -> None:
    svc, cl, be = vip(), client(), Backend(backend_ip(), 5353)
    lab.lb.set_service(svc, 53, "udp", [be])
    lab.from_pod(udp_frame(lab, cl, svc, 47002, 53))
    reply = lab.to_pod(udp_frame(lab, be.ip, cl, 5353, 47002, b"late", outbound=False)).data
    assert dest_of(lab.from_pod(udp_frame(lab, cl, svc, 47002, 53))) == (be.ip, 5353)
    at_client = quote_of(reply)
    res = lab.from_pod(icmp_frame(lab, cl, svc, icmp_error(3, 3, at_client), True))
    assert res.retval == TC_ACT_REDIRECT
    assert_frame(res.data, icmp_frame(
        lab, cl, be.ip, icmp_error(3, 3, requote(at_client, src=be.ip, sport=5353)), True))


def test_icmp_error_about_no_service_flow_passes_unchanged(lab: LbLab) -> None:
    cl, other = client(), backend_ip()
    unrelated = quote_of(udp_frame(lab, cl, other, 47003, 9))
    frame = icmp_frame(lab, other, cl, icmp_error(3, 3, unrelated), False)
    res = lab.to_pod(frame)
    assert res.retval == TC_ACT_OK and res.data == frame


# ---------------------------------------------------------------------------- selection
def test_weighted_backends_share_new_flows_in_proportion(lab: LbLab) -> None:
    svc, cl = vip(), client()
    backends = [Backend(backend_ip(), 8080, weight=w) for w in (1, 2, 1)]
    lab.lb.set_service(svc, 80, "tcp", backends)
    slots = weighted_slots(backends)
    slot_share = {b.ip: slots.count(b) / len(slots) for b in backends}
    assert slot_share == {backends[0].ip: 0.25, backends[1].ip: 0.5, backends[2].ip: 0.25}

    n = 2000
    fd, ifindex = lab.net.rt._entry_fds["pcn_ingress"], lab.net.ifindex["u1"]
    got: Counter[str] = Counter()
    with lab.net.inside():
        for sport in range(20000, 20000 + n):
            res = testrun.run_sched_cls(fd, tcp_frame(lab, cl, svc, sport, 80), ifindex=ifindex)
            got[dest_of(res)[0]] += 1
    assert sum(got.values()) == n
    # Each flow lands on a slot by a 32-bit mix of its 5-tuple, which spreads
    # consecutive ports like independent uniform draws: a backend owning a
    # share p of the slots gets Binomial(n, p) flows, whose standard deviation
    # as a share is sqrt(p(1-p)/n) = 1.1 points for p=1/2 and 1.0 for p=1/4 at
    # n=2000. A tolerance of 5 points is 4.5 sigma or more (a false alarm
    # rarer than 1e-5), while ignoring the weights (1/3 each) would miss by
    # 8 and 17 points.
    for b in backends:
        assert abs(got[b.ip] / n - slot_share[b.ip]) < 0.05, (b, got)


def test_slot_choice_is_the_flow_hash_modulo_the_slot_table(lab: LbLab) -> None:
    """Exact: the backend of a new flow is slot hash(flow) % n_slots of the
    table weighted_slots() wrote, with the hash mirrored from pcn_lb.h (it must
    stay stable: the same flow picks the same backend on every node)."""
    svc, cl = vip(), client()
    backends = [Backend(backend_ip(), 7000 + i, weight=w) for i, w in enumerate((3, 1, 2, 5))]
    lab.lb.set_service(svc, 8443, "tcp", backends)
    slots = weighted_slots(backends)
    for sport in range(30000, 30200):
        want = slots[flow_hash(cl, svc, sport, 8443, IPPROTO_TCP) % len(slots)]
        assert dest_of(lab.from_pod(tcp_frame(lab, cl, svc, sport, 8443))) == (want.ip, want.port)


def test_client_ip_affinity_sends_a_client_to_one_backend(lab: LbLab) -> None:
    backends = [Backend(backend_ip(), 8080) for _ in range(3)]
    sticky, plain = vip(), vip()
    lab.lb.set_service(sticky, 80, "tcp", backends, affinity_timeout_s=10800)
    lab.lb.set_service(plain, 80, "tcp", backends)
    cl = client()
    slots = weighted_slots(backends)
    first = slots[flow_hash(cl, sticky, 50000, 80, IPPROTO_TCP) % len(slots)]

    seen_sticky = {dest_of(lab.from_pod(tcp_frame(lab, cl, sticky, sport, 80)))
                   for sport in range(50000, 50030)}
    assert seen_sticky == {(first.ip, 8080)}  # the first flow's choice, for all of them
    # Without affinity the same client's flows spread (all 30 on one of three
    # equally weighted backends: probability 3^-29).
    seen_plain = {dest_of(lab.from_pod(tcp_frame(lab, cl, plain, sport, 80)))
                  for sport in range(50000, 50030)}
    assert len(seen_plain) > 1


def test_affinity_forgets_a_backend_that_left_the_service(lab: LbLab) -> None:
    backends = [Backend(backend_ip(), 8080) for _ in range(3)]
    svc, cl = vip(), client()
    lab.lb.set_service(svc, 80, "tcp", backends, affinity_timeout_s=10800)
    first = dest_of(lab.from_pod(tcp_frame(lab, cl, svc, 51000, 80)))
    rest = [b for b in backends if (b.ip, b.port) != first]
    lab.lb.set_service(svc, 80, "tcp", rest, affinity_timeout_s=10800)
    # New connections of the client go to a backend that is still there, and
    # stick to it again.
    seen = {dest_of(lab.from_pod(tcp_frame(lab, cl, svc, sport, 80)))
            for sport in range(51001, 51011)}
    assert len(seen) == 1 and seen <= {(b.ip, b.port) for b in rest}


def test_affinity_does_not_outlive_its_service(lab: LbLab) -> None:
    """A deleted service's id goes to the next new service: the new one must
    not inherit the old one's client -> backend choices."""
    old, cl = Backend(backend_ip(), 8080), client()
    svc_a = vip()
    a = lab.lb.set_service(svc_a, 80, "tcp", [old], affinity_timeout_s=10800)
    assert dest_of(lab.from_pod(tcp_frame(lab, cl, svc_a, 52000, 80))) == (old.ip, 8080)
    assert lab.lb.delete_service(svc_a, 80, "tcp")
    new = [Backend(backend_ip(), 9090), Backend(backend_ip(), 9090)]
    b = lab.lb.set_service(vip(), 80, "tcp", new, affinity_timeout_s=10800)
    assert b.id == a.id  # what makes the leak possible
    got = dest_of(lab.from_pod(tcp_frame(lab, cl, b.vip, 52001, 80)))
    assert got in {(x.ip, x.port) for x in new}


# ---------------------------------------------------------------------------- reject
def test_service_without_backends_answers_syn_with_rst(lab: LbLab) -> None:
    svc, cl = vip(), client()
    lab.lb.set_service(svc, 80, "tcp", [])
    port = lab.ports["client"]
    drops, before = lab.drops(), lab.counters()
    res = lab.from_pod(tcp_frame(lab, cl, svc, 48000, 80, seq=0xFFFFFFFF))
    after = lab.counters()

    assert res.retval == TC_ACT_REDIRECT  # back out of the pod's own veth
    # RST|ACK from the service to the client: MACs, addresses and ports
    # swapped, seq 0, ack = seq + 1 (wrapping), checksums valid.
    assert_frame(res.data, tcp_frame(lab, svc, cl, 80, 48000, flags=TCP_RST | TCP_ACK, seq=0,
                                     ack=0, outbound=False))
    assert lab.drops().get("rejected", 0) == drops.get("rejected", 0) + 1
    assert after["client"].drops - before["client"].drops == 1
    assert gw_tx(before, after) == 0
    assert port.peer == lab.net.ifindex["u1"]

    res = lab.from_pod(tcp_frame(lab, cl, svc, 48001, 80, seq=41))
    assert res.retval == TC_ACT_REDIRECT
    assert_frame(res.data, tcp_frame(lab, svc, cl, 80, 48001, flags=TCP_RST | TCP_ACK, seq=0,
                                     ack=42, outbound=False))


def test_service_without_backends_drops_what_is_not_a_connection_attempt(lab: LbLab) -> None:
    svc, cl = vip(), client()
    lab.lb.set_service(svc, 80, "tcp", [])
    pkt = tcp_frame(lab, cl, svc, 48100, 80, flags=TCP_ACK, seq=5, ack=9)
    before = lab.counters()
    res = lab.from_pod(pkt)
    assert res.retval == TC_ACT_SHOT  # never answer a RST or ACK with a RST
    assert gw_tx(before, lab.counters()) == 0


def test_service_without_backends_answers_udp_with_port_unreachable(lab: LbLab) -> None:
    svc, cl = vip(), client()
    lab.lb.set_service(svc, 53, "udp", [])
    sent = udp_frame(lab, cl, svc, 49000, 53, b"a question longer than eight bytes")
    drops, before = lab.drops(), lab.counters()
    res = lab.from_pod(sent)
    after = lab.counters()

    assert res.retval == TC_ACT_REDIRECT
    assert lab.drops().get("rejected", 0) == drops.get("rejected", 0) + 1
    assert gw_tx(before, after) == 0
    e = parse_eth(res.data)
    assert (e.dst, e.src, e.ethertype) == (lab.client_mac, lab.gw_mac, ETH_P_IP)
    assert len(res.data) == 14 + 20 + 8 + 20 + 8  # nothing past the quote
    ip = parse_ipv4(e.payload)
    assert (ip.src, ip.dst, ip.proto, ip.ttl, ip.total_len) == (svc, cl, IPPROTO_ICMP, 64, 56)
    assert inet_csum(ip.header) == 0, "IPv4 header checksum"
    assert inet_csum(ip.payload) == 0, "ICMP checksum"
    icmp_type, code, _csum, unused = struct.unpack("!BBHI", ip.payload[:8])
    assert (icmp_type, code, unused) == (3, 3, 0)  # destination / port unreachable
    original = parse_eth(sent).payload
    assert ip.payload[8:] == original[:20 + 8]  # its IP header and first 8 bytes


# ---------------------------------------------------------------------------- fragments
_ident = itertools.count(0x5000)
BIG = bytes(range(256)) * 15 + b"end"  # a 3843-byte payload: three fragments at 1480 bytes


def datagram(proto: int, src: str, dst: str, sport: int, dport: int, data: bytes = BIG) -> bytes:
    """A whole L4 datagram with its checksum (TCP: a data segment, ACK|PSH)."""
    if proto == IPPROTO_TCP:
        return tcp(src, dst, sport, dport, TCP_ACK | 0x08, seq=1001, ack=1, data=data)
    return udp_csum(src, dst, sport, dport, data)


def frag_frames(lab: LbLab, proto: int, src: str, dst: str, sport: int, dport: int,
                ident: int, outbound: bool = True, size: int = 1480,
                data: bytes = BIG) -> list[bytes]:
    """`datagram(...)` fragmented as its sender would, as frames (see tcp_frame
    for `outbound`)."""
    macs = (lab.gw_mac, lab.client_mac) if outbound else (lab.client_mac, lab.gw_mac)
    return [eth(*macs, ETH_P_IP, p)
            for p in fragments(src, dst, proto, datagram(proto, src, dst, sport, dport, data),
                               ident, size)]


def fragment_drops(lab: LbLab, before: dict[str, int]) -> int:
    return lab.drops().get("fragment", 0) - before.get("fragment", 0)


@pytest.mark.parametrize("proto", [IPPROTO_UDP, IPPROTO_TCP], ids=["udp", "tcp"])
def test_a_fragmented_datagram_to_a_service_reaches_the_backend_whole(lab: LbLab,
                                                                      proto: int) -> None:
    """First, middle and last fragment all go to the backend the first one
    chose (only the first has ports), and the answer, fragmented too, all
    comes back from the service address."""
    svc, cl = vip(), client()
    be = Backend(backend_ip(), 5353)
    name = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp"}[proto]
    lab.lb.set_service(svc, 53, name, [be])
    if proto == IPPROTO_TCP:  # the connection, before its big segment
        assert dest_of(lab.from_pod(tcp_frame(lab, cl, svc, 47100, 53))) == (be.ip, 5353)
    ident = next(_ident)
    sent = frag_frames(lab, proto, cl, svc, 47100, 53, ident)
    assert len(sent) == 3
    drops, before = lab.drops(), lab.counters()
    results = [lab.from_pod(f) for f in sent]
    assert [r.retval for r in results] == [TC_ACT_REDIRECT] * 3
    assert gw_tx(before, lab.counters()) == 3
    assert_fragments([r.data for r in results],
                     frag_frames(lab, proto, cl, be.ip, 47100, 5353, ident))

    ident = next(_ident)
    answer = frag_frames(lab, proto, be.ip, cl, 5353, 47100, ident, outbound=False)
    results = [lab.to_pod(f) for f in answer]
    assert [r.retval for r in results] == [TC_ACT_OK] * 3
    assert_fragments([r.data for r in results],
                     frag_frames(lab, proto, svc, cl, 53, 47100, ident, outbound=False))
    assert lab.drops() == drops


def test_a_later_fragment_before_its_first_is_dropped_not_sent_to_the_vip(lab: LbLab) -> None:
    svc, cl = vip(), client()
    be = Backend(backend_ip(), 5353)
    lab.lb.set_service(svc, 53, "udp", [be])
    ident = next(_ident)
    first, middle, last = frag_frames(lab, IPPROTO_UDP, cl, svc, 47200, 53, ident)
    drops, before = lab.drops(), lab.counters()
    res = lab.from_pod(middle)
    assert res.retval == TC_ACT_SHOT
    assert fragment_drops(lab, drops) == 1
    assert gw_tx(before, lab.counters()) == 0
    want = frag_frames(lab, IPPROTO_UDP, cl, be.ip, 47200, 5353, ident)
    results = [lab.from_pod(f) for f in (first, last, middle)]  # the middle one again
    assert [r.retval for r in results] == [TC_ACT_REDIRECT] * 3
    assert_fragments([results[0].data, results[2].data, results[1].data], want)
    # the answer's later fragments, before its first: not sent on from the backend
    answer = frag_frames(lab, IPPROTO_UDP, be.ip, cl, 5353, 47200, next(_ident), outbound=False)
    assert lab.to_pod(answer[2]).retval == TC_ACT_SHOT
    assert fragment_drops(lab, drops) == 2


@pytest.mark.parametrize("size", [8, 16])
def test_tiny_fragments_to_a_service_are_dropped(lab: LbLab, size: int) -> None:
    """A first fragment without the whole TCP header cannot be translated (the
    checksum to update is not in it) nor trusted (RFC 1858); the later one
    overlaps that header."""
    svc, cl = vip(), client()
    lab.lb.set_service(svc, 80, "tcp", [Backend(backend_ip(), 8080)])
    syn = tcp(cl, svc, 47300, 80)
    frames = [eth(lab.gw_mac, lab.client_mac, ETH_P_IP, p, pad=False)
              for p in fragments(cl, svc, IPPROTO_TCP, syn, next(_ident), size)]
    drops, before, sessions = lab.drops(), lab.counters(), lab.sessions()
    assert [lab.from_pod(f).retval for f in frames[:2]] == [TC_ACT_SHOT] * 2
    assert fragment_drops(lab, drops) == 2
    assert gw_tx(before, lab.counters()) == 0
    assert lab.sessions() == sessions


def test_a_later_fragment_overlapping_the_header_is_dropped(lab: LbLab) -> None:
    """RFC 1858 §4: a later fragment starting inside the TCP header the first
    one carried would rewrite what the session was chosen by; one after the
    header is translated."""
    svc, cl = vip(), client()
    be = Backend(backend_ip(), 8080)
    lab.lb.set_service(svc, 80, "tcp", [be])
    seg = tcp(cl, svc, 47350, 80, TCP_ACK, data=b"q" * 40)
    ident = next(_ident)

    def piece(chunk: bytes, offset: int, more: bool, dst: str = svc) -> bytes:
        return eth(lab.gw_mac, lab.client_mac, ETH_P_IP,
                   ipv4_fragment(cl, dst, IPPROTO_TCP, chunk, offset, more, ident))

    drops = lab.drops()
    assert dest_of(lab.from_pod(piece(seg[:24], 0, True))) == (be.ip, 8080)
    assert lab.from_pod(piece(seg[8:24], 8, True)).retval == TC_ACT_SHOT
    assert fragment_drops(lab, drops) == 1
    res = lab.from_pod(piece(seg[24:], 24, False))
    assert res.retval == TC_ACT_REDIRECT
    want = piece(seg[24:], 24, False, dst=be.ip)  # only the address (and IP checksum) changed
    assert (res.data[:24], res.data[26:]) == (want[:24], want[26:])
    assert inet_csum(res.data[14:34]) == 0


def test_later_fragments_of_a_rejected_datagram_are_dropped(lab: LbLab) -> None:
    """A service without backends answers the first fragment (it holds the
    ports) with port unreachable; the later ones have nowhere to go."""
    svc, cl = vip(), client()
    lab.lb.set_service(svc, 53, "udp", [])
    first, middle, last = frag_frames(lab, IPPROTO_UDP, cl, svc, 47400, 53, next(_ident))
    drops, before = lab.drops(), lab.counters()
    res = lab.from_pod(first)
    assert res.retval == TC_ACT_REDIRECT  # the port unreachable, back to the pod
    assert parse_ipv4(parse_eth(res.data).payload).proto == IPPROTO_ICMP
    assert [lab.from_pod(f).retval for f in (middle, last)] == [TC_ACT_SHOT] * 2
    assert fragment_drops(lab, drops) == 2
    assert lab.drops().get("rejected", 0) == drops.get("rejected", 0) + 1
    assert gw_tx(before, lab.counters()) == 0


def test_fragments_not_for_a_service_pass_unchanged(lab: LbLab) -> None:
    svc, cl = vip(), client()
    lab.lb.set_service(svc, 53, "udp", [Backend(backend_ip(), 5353)])
    frames = frag_frames(lab, IPPROTO_UDP, cl, backend_ip(), 47500, 53, next(_ident))
    drops, sessions = lab.drops(), lab.sessions()
    results = [lab.from_pod(f) for f in frames]
    assert [(r.retval, r.data) for r in results] == [(TC_ACT_REDIRECT, f) for f in frames]
    answer = frag_frames(lab, IPPROTO_UDP, "192.0.2.53", cl, 53, 47500, next(_ident),
                         outbound=False)
    results = [lab.to_pod(f) for f in answer]
    assert [(r.retval, r.data) for r in results] == [(TC_ACT_OK, f) for f in answer]
    assert (lab.drops(), lab.sessions()) == (drops, sessions)


def test_a_gso_packet_past_64k_is_translated_like_any(lab: LbLab) -> None:
    """IPv4 BIG TCP sends GSO packets whose total length field is 0 (their
    length is the skb's): not a cut-short header, translated as usual."""
    svc, cl = vip(), client()
    be = Backend(backend_ip(), 8080)
    lab.lb.set_service(svc, 80, "tcp", [be])
    frame = bytearray(tcp_frame(lab, cl, svc, 47600, 80))
    frame[16:18] = b"\0\0"  # total length 0
    frame[24:26] = b"\0\0"
    frame[24:26] = struct.pack("!H", inet_csum(bytes(frame[14:34])))
    res = lab.from_pod(bytes(frame))
    assert res.retval == TC_ACT_REDIRECT
    assert (res.data[30:34], res.data[36:38]) == (bytes(map(int, be.ip.split("."))),
                                                  struct.pack("!H", 8080))


def test_internal_traffic_policy_local_with_endpoints_elsewhere_drops(lab: LbLab) -> None:
    """internalTrafficPolicy Local with no endpoint on this node but some on
    others: kube-proxy drops the traffic (its "drop" verdict), it does not
    reject it as for a Service with no endpoint at all."""
    svc, cl = vip(), client()
    lab.lb.set_service(svc, 80, "tcp", [], drop_if_empty=True)
    lab.lb.set_service(svc, 53, "udp", [], drop_if_empty=True)
    drops, before = lab.drops(), lab.counters()
    for frame in (tcp_frame(lab, cl, svc, 48200, 80), udp_frame(lab, cl, svc, 48200, 53)):
        assert lab.from_pod(frame).retval == TC_ACT_SHOT
    after = lab.drops()
    assert after.get("no_backend", 0) == drops.get("no_backend", 0) + 2
    assert after.get("rejected", 0) == drops.get("rejected", 0)
    assert gw_tx(before, lab.counters()) == 0


# ---------------------------------------------------------------------------- Service range
def icmp_unreachable_of(lab: LbLab, res: TestRunResult, sent: bytes, svc: str, cl: str) -> None:
    """`res` is ICMP port unreachable from `svc` to `cl` quoting `sent`."""
    e = parse_eth(res.data)
    assert (e.dst, e.src, e.ethertype) == (lab.client_mac, lab.gw_mac, ETH_P_IP)
    ip = parse_ipv4(e.payload)
    assert (ip.src, ip.dst, ip.proto) == (svc, cl, IPPROTO_ICMP)
    assert inet_csum(ip.header) == 0 and inet_csum(ip.payload) == 0
    assert ip.payload[:2] == bytes([3, 3])
    assert ip.payload[8:] == parse_eth(sent).payload[:28]


@pytest.mark.parametrize("proto", [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP])
def test_another_port_of_a_service_address_is_rejected(lab: LbLab, proto: int) -> None:
    """kube-proxy's nftables mode: "Reject traffic to invalid ports of
    ClusterIPs" (any port, protocol or ping the address does not serve)."""
    svc, cl = vip(), client()
    lab.lb.set_service(svc, 80, "tcp", [Backend(backend_ip(), 8080)])
    if proto == IPPROTO_TCP:
        sent = tcp_frame(lab, cl, svc, 45100, 81, seq=99)
    elif proto == IPPROTO_UDP:
        sent = udp_frame(lab, cl, svc, 45100, 80)  # the TCP service's port, in UDP
    else:
        sent = eth(lab.gw_mac, lab.client_mac, ETH_P_IP,
                   ipv4(cl, svc, IPPROTO_ICMP, icmp_echo(7, 1, b"ping")))
    drops, before = lab.drops(), lab.counters()
    res = lab.from_pod(sent)
    assert res.retval == TC_ACT_REDIRECT  # back out of the pod's own veth
    assert gw_tx(before, lab.counters()) == 0
    assert lab.drops().get("rejected", 0) == drops.get("rejected", 0) + 1
    if proto == IPPROTO_TCP:
        assert_frame(res.data, tcp_frame(lab, svc, cl, 81, 45100, flags=TCP_RST | TCP_ACK,
                                         seq=0, ack=100, outbound=False))
    else:
        icmp_unreachable_of(lab, res, sent, svc, cl)
    assert not [s for s in lab.sessions() if s["client"] == f"{cl}:45100"]


@pytest.mark.parametrize("proto", [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP])
def test_an_unallocated_address_of_the_service_range_is_dropped(lab: LbLab, proto: int) -> None:
    """kube-proxy's nftables mode: "Drop traffic to unallocated ClusterIPs";
    an address whose last service port goes is unallocated again, one with a
    port left still rejects the others."""
    cl, gone, kept = client(), vip(), vip()
    lab.lb.set_service(gone, 80, "tcp", [Backend(backend_ip(), 8080)])
    lab.lb.set_service(kept, 80, "tcp", [Backend(backend_ip(), 8080)])
    lab.lb.set_service(kept, 443, "tcp", [Backend(backend_ip(), 8443)])
    assert lab.lb.delete_service(gone, 80, "tcp")
    assert lab.lb.delete_service(kept, 443, "tcp")

    def frame(dst: str) -> bytes:
        if proto == IPPROTO_TCP:
            return tcp_frame(lab, cl, dst, 45150, 443)
        if proto == IPPROTO_UDP:
            return udp_frame(lab, cl, dst, 45150, 443)
        return eth(lab.gw_mac, lab.client_mac, ETH_P_IP,
                   ipv4(cl, dst, IPPROTO_ICMP, icmp_echo(8, 1, b"ping")))

    for dst in ("10.96.255.1", gone):
        drops, before = lab.drops(), lab.counters()
        res = lab.from_pod(frame(dst))
        assert res.retval == TC_ACT_SHOT, dst
        assert lab.drops().get("no_backend", 0) == drops.get("no_backend", 0) + 1, dst
        assert gw_tx(before, lab.counters()) == 0
    drops = lab.drops()
    assert lab.from_pod(frame(kept)).retval == TC_ACT_REDIRECT
    assert lab.drops().get("rejected", 0) == drops.get("rejected", 0) + 1


# ---------------------------------------------------------------------------- hairpin
def l4_frame(lab: LbLab, proto: int, src: str, dst: str, sport: int, dport: int,
             flags: int = TCP_SYN, outbound: bool = True) -> bytes:
    if proto == IPPROTO_TCP:
        return tcp_frame(lab, src, dst, sport, dport, flags=flags, outbound=outbound)
    return udp_frame(lab, src, dst, sport, dport, outbound=outbound)


def src_of(res: TestRunResult) -> tuple[str, int]:
    ip = parse_ipv4(parse_eth(res.data).payload)
    return ip.src, l4_ports(ip).sport


@pytest.mark.parametrize("proto", [IPPROTO_TCP, IPPROTO_UDP])
def test_a_pod_reaching_itself_through_its_service_is_masqueraded(lab: LbLab,
                                                                  proto: int) -> None:
    """Hairpin: the pod is the backend chosen for its own connection. With its
    own address as the source its kernel would drop the packet (a martian),
    every time; kube-proxy masquerades such traffic ("ip saddr <endpoint>
    jump mark-for-masquerade"). The connection comes from the pods' gateway
    instead, and the pod's answers are translated back as they leave it."""
    svc, cl = vip(), client()
    name = "tcp" if proto == IPPROTO_TCP else "udp"
    lab.lb.set_service(svc, 80, name, [Backend(cl, 8080)])
    res = lab.from_pod(l4_frame(lab, proto, cl, svc, 45200, 80))
    assert res.retval == TC_ACT_REDIRECT  # on to the router, which brings it back
    src, sport = src_of(res)
    assert src == GW_IP and MASQ_LO <= sport <= MASQ_HI
    assert_frame(res.data, l4_frame(lab, proto, GW_IP, cl, sport, 8080))
    # into the pod it goes as it is
    delivered = l4_frame(lab, proto, GW_IP, cl, sport, 8080, outbound=False)
    assert lab.to_pod(delivered).data == delivered
    # the pod's answer, to the gateway, leaves it as the service's answer
    res = lab.from_pod(l4_frame(lab, proto, cl, GW_IP, 8080, sport, TCP_SYN | TCP_ACK))
    assert res.retval == TC_ACT_REDIRECT
    assert_frame(res.data, l4_frame(lab, proto, svc, cl, 80, 45200, TCP_SYN | TCP_ACK))
    answer = l4_frame(lab, proto, svc, cl, 80, 45200, TCP_SYN | TCP_ACK, outbound=False)
    assert lab.to_pod(answer).data == answer  # and reaches the pod untouched
    # the client's next packet takes the same way
    res = lab.from_pod(l4_frame(lab, proto, cl, svc, 45200, 80, TCP_ACK))
    assert_frame(res.data, l4_frame(lab, proto, GW_IP, cl, sport, 8080, TCP_ACK))
    assert {"client": f"{cl}:45200", "service": f"{svc}:80", "backend": f"{cl}:8080",
            "proto": proto} in lab.sessions()


def test_a_hairpin_connection_carries_its_state_in_both_halves(lab: LbLab) -> None:
    """The hairpin's reply half (looked up on the pod's ingress hook, kind
    LB_HAIRPIN_REV) is the other half of the LB entry: the pod's answers
    count as replies and both halves advance together, so a hairpin
    connection gets the lifetimes of its real state (SYN_RECV, then
    ESTABLISHED), not those of a connection that never got an answer."""
    svc, cl = vip(), client()
    lab.lb.set_service(svc, 80, "tcp", [Backend(cl, 8080)])
    _, mport = src_of(lab.from_pod(tcp_frame(lab, cl, svc, 45250, 80)))
    table = lab.net.rt.table("lb_sessions", "lbrp")
    fwd = maps.Flow(maps.ip_be(cl), maps.ip_be(svc), be16(45250), be16(80), IPPROTO_TCP)
    rev = maps.Flow(maps.ip_be(cl), maps.ip_be(GW_IP), be16(8080), be16(mport), IPPROTO_TCP)
    assert table[rev].kind == 7
    assert (table[fwd].state, table[rev].state) == (State.SYN_SENT, State.SYN_SENT)
    lab.from_pod(tcp_frame(lab, cl, GW_IP, 8080, mport, flags=TCP_SYN | TCP_ACK))
    assert (table[fwd].state, table[rev].state) == (State.SYN_RECV, State.SYN_RECV)
    lab.from_pod(tcp_frame(lab, cl, svc, 45250, 80, flags=TCP_ACK))
    assert (table[fwd].state, table[rev].state) == (State.ESTABLISHED, State.ESTABLISHED)


def test_only_the_connections_that_pick_the_pod_itself_are_masqueraded(lab: LbLab) -> None:
    svc, cl, other = vip(), client(), backend_ip()
    backends = [Backend(cl, 8080), Backend(other, 8080)]
    lab.lb.set_service(svc, 80, "tcp", backends)
    slots = weighted_slots(backends)
    seen = set()
    for sport in range(45300, 45340):
        want = slots[flow_hash(cl, svc, sport, 80, IPPROTO_TCP) % len(slots)]
        res = lab.from_pod(tcp_frame(lab, cl, svc, sport, 80))
        assert dest_of(res) == (want.ip, 8080)
        src, masq_port = src_of(res)
        if want.ip == cl:
            assert src == GW_IP and MASQ_LO <= masq_port <= MASQ_HI
        else:
            assert (src, masq_port) == (cl, sport)  # a pod's source is kept
        seen.add(want.ip)
    assert seen == {cl, other}


def test_icmp_error_of_a_pod_that_is_its_own_backend_reaches_it_translated(lab: LbLab) -> None:
    """The pod does not listen on the target port: its kernel's port
    unreachable, to the gateway, about what it received, must reach its own
    client socket as an error from the service about what it sent."""
    svc, cl = vip(), client()
    lab.lb.set_service(svc, 53, "udp", [Backend(cl, 5353)])
    sent = udp_frame(lab, cl, svc, 45400, 53)
    res = lab.from_pod(sent)
    _, sport = src_of(res)
    at_pod = quote_of(res.data)
    res = lab.from_pod(icmp_frame(lab, cl, GW_IP, icmp_error(3, 3, at_pod), True))
    assert res.retval == TC_ACT_REDIRECT
    want = icmp_frame(lab, svc, cl, icmp_error(
        3, 3, requote(at_pod, src=cl, sport=45400, dst=svc, dport=53)), True)
    assert_frame(res.data, want)
    inner = parse_ipv4(parse_eth(res.data).payload).payload[8:]
    assert inner[:24] == quote_of(sent, 4)


# -------------------------------------------------------------- hairpin ports
@contextmanager
def masq_ports(lab: LbLab, lo: int, hi: int) -> Iterator[None]:
    """The lbrp masquerades to ports lo-hi while the body runs."""
    cfg = lab.net.rt.table("lb_cfgs", "lbrp")
    key = ct.c_uint32(lab.lb.cube.id)
    saved = cfg[key]
    narrowed = maps.LbCfg.from_buffer_copy(saved)
    narrowed.masq_lo, narrowed.masq_hi = lo, hi
    cfg[key] = narrowed
    try:
        yield
    finally:
        cfg[key] = saved


@dataclass
class Hairpin:
    """One pod connecting to itself through `svc`:80 (backend port 8080)."""

    lab: LbLab
    svc: str
    cl: str

    def open(self, sport: int, flags: int = TCP_SYN) -> TestRunResult:
        return self.lab.from_pod(tcp_frame(self.lab, self.cl, self.svc, sport, 80, flags=flags))

    def answer(self, mport: int, flags: int) -> TestRunResult:
        """The pod's packet as the backend, to the gateway at `mport`."""
        return self.lab.from_pod(tcp_frame(self.lab, self.cl, GW_IP, 8080, mport, flags=flags))

    def connect(self, sport: int, ends: list[tuple[bool, int]]) -> int:
        """A connection answered, established, then the packets `ends`
        (True: the client's); returns its masquerading port."""
        src, mport = src_of(self.open(sport))
        assert src == GW_IP
        for client, flags in [(False, TCP_SYN | TCP_ACK), (True, TCP_ACK), *ends]:
            res = self.open(sport, flags) if client else self.answer(mport, flags)
            assert res.retval == TC_ACT_REDIRECT, (client, flags)
        return mport

    def keys(self, sport: int, mport: int) -> list[maps.Flow]:
        """The connection's two entries."""
        return [flow(self.cl, self.svc, sport, 80, IPPROTO_TCP),
                flow(self.cl, GW_IP, 8080, mport, IPPROTO_TCP)]

    def hold(self, mports: list[int]) -> None:
        """The masquerading ports `mports` held by open (established)
        hairpin connections of the pod from client ports 48000, 48001...,
        written straight into lb_sessions (their reply halves)."""
        table = self.lab.net.rt.table("lb_sessions", "lbrp")
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        for n, mport in enumerate(mports):
            table[flow(self.cl, GW_IP, 8080, mport, IPPROTO_TCP)] = maps.Xlate(
                ip=maps.ip_be(self.svc), port=be16(80), is_src=1, kind=7,
                state=State.ESTABLISHED, ip2=maps.ip_be(self.cl), port2=be16(48000 + n),
                seen_ns=now)

    def assert_owns(self, sport: int, res: TestRunResult) -> int:
        """`res`, the first packet of the connection from `sport`, left
        masqueraded, and the pod's answer on that port reaches it."""
        assert res.retval == TC_ACT_REDIRECT
        src, mport = src_of(res)
        assert src == GW_IP
        back = self.answer(mport, TCP_SYN | TCP_ACK)
        assert back.retval == TC_ACT_REDIRECT
        assert_frame(back.data, tcp_frame(self.lab, self.svc, self.cl, 80, sport,
                                          flags=TCP_SYN | TCP_ACK))
        return mport


HAIRPIN_LO, HAIRPIN_HI = 61200, 61215  # 16 ports: the first 16 tries go through all of them
HAIRPIN_ENDS = {"both-fin": [(True, TCP_FIN | TCP_ACK), (False, TCP_FIN | TCP_ACK), (True, TCP_ACK)],
                "reset": [(False, TCP_RST | TCP_ACK)]}


def fill_hairpin_ports(lab: LbLab, ends: list[tuple[bool, int]]) -> tuple[Hairpin, dict[int, int]]:
    """Every port of HAIRPIN_LO-HI held by a hairpin connection that went
    through `ends`: {its client port: its masquerading port}."""
    pin = Hairpin(lab, vip(), client())
    lab.lb.set_service(pin.svc, 80, "tcp", [Backend(pin.cl, 8080)])
    held = {sport: pin.connect(sport, ends) for sport in range(47000, 47016)}
    assert sorted(held.values()) == list(range(HAIRPIN_LO, HAIRPIN_HI + 1))
    return pin, held


def test_a_hairpin_port_of_a_connection_that_is_over_is_reused(lab: LbLab) -> None:
    """The 16 masquerading ports held by established hairpin connections: a
    17th gets none. Once their lifetime (24 h) has passed, the next takes
    one over before any collector removed it, as the k8sdispatcher's
    masquerading does and conntrack frees the tuple of an expired
    connection; the old connection goes, both ways."""
    with masq_ports(lab, HAIRPIN_LO, HAIRPIN_HI):
        pin, held = fill_hairpin_ports(lab, [])
        drops = lab.drops()
        assert pin.open(47100).retval == TC_ACT_SHOT
        assert lab.drops().get("nat_exhausted", 0) == drops.get("nat_exhausted", 0) + 1
        table = lab.net.rt.table("lb_sessions", "lbrp")
        for sport, mport in held.items():
            age_sessions(table, pin.keys(sport, mport), 86400 + 1)
        mport = pin.assert_owns(47101, pin.open(47101))
        old = next(sport for sport, p in held.items() if p == mport)
        assert lab.raw_session(pin.cl, pin.svc, old, 80, IPPROTO_TCP) is None


@pytest.mark.parametrize("closing", sorted(HAIRPIN_ENDS))
def test_a_new_hairpin_connection_takes_the_port_of_a_closed_one_when_none_is_left(
        lab: LbLab, closing: str) -> None:
    """All 16 ports held by hairpin connections that both sides closed
    (TIME_WAIT, 120 s) or that were reset: a new TCP connection gets one at
    once, as Linux's NAT evicts closed connections in its last attempts; a
    packet that opens no connection does not."""
    with masq_ports(lab, HAIRPIN_LO, HAIRPIN_HI):
        pin, held = fill_hairpin_ports(lab, HAIRPIN_ENDS[closing])
        drops = lab.drops()
        assert pin.open(47200, TCP_ACK).retval == TC_ACT_SHOT  # picked up mid-way
        assert lab.drops().get("nat_exhausted", 0) == drops.get("nat_exhausted", 0) + 1
        mport = pin.assert_owns(47201, pin.open(47201))
        old = next(sport for sport, p in held.items() if p == mport)
        assert lab.raw_session(pin.cl, pin.svc, old, 80, IPPROTO_TCP) is None  # both ways
        rev = lab.raw_session(pin.cl, GW_IP, 8080, mport, IPPROTO_TCP)
        assert rev is not None and rev.port2 == be16(47201)


def test_the_harder_hairpin_tries_are_ports_not_tried_yet(lab: LbLab) -> None:
    """A connection's first 16 ports of a wider range held by connections
    still open: its harder tries go on to ports it has not tried (a
    connection that is open is never evicted, so trying its port again would
    fail the same way), and it gets the first of them."""
    pin = Hairpin(lab, vip(), client())
    lab.lb.set_service(pin.svc, 80, "tcp", [Backend(pin.cl, 8080)])
    lo, hi = 61300, 61363
    tries = port_tries(flow_hash(pin.cl, pin.svc, 47300, 80, IPPROTO_TCP), lo, hi)
    assert len(set(tries)) == PORT_TRIES + PORT_HARDER
    pin.hold(tries[:PORT_TRIES])
    with masq_ports(lab, lo, hi):
        assert pin.assert_owns(47300, pin.open(47300)) == tries[PORT_TRIES]


def test_a_flow_whose_hash_is_near_the_top_still_goes_through_a_small_range(lab: LbLab) -> None:
    """A range of 17 ports (fewer than the 20 tries, not a power of two):
    the tries of any flow go through all of them, also for a flow whose hash
    plus n steps passes 2**32 (a 32-bit sum would wrap there and shift the
    later tries onto ports already tried, missing others). Every port but
    one that a wrapping sum misses is held by an open connection: the flow
    gets that one."""
    lo, hi = 61400, 61416
    pin, found = None, None
    for _ in range(20):  # a service address with a client port whose hash wraps early
        pin = Hairpin(lab, vip(), client())
        found = port_missed_by_a_wrapping_sum(pin.cl, pin.svc, 80, lo, hi)
        if found:
            break
    assert pin is not None and found is not None
    sport, missed = found
    h = flow_hash(pin.cl, pin.svc, sport, 80, IPPROTO_TCP)
    assert set(port_tries(h, lo, hi)) == set(range(lo, hi + 1))  # exact arithmetic: every port
    lab.lb.set_service(pin.svc, 80, "tcp", [Backend(pin.cl, 8080)])
    pin.hold([p for p in range(lo, hi + 1) if p != missed])
    with masq_ports(lab, lo, hi):
        assert pin.assert_owns(sport, pin.open(sport)) == missed


# ---------------------------------------------------------------------------- the node itself
_nodeport = itertools.count(30000)


def lo_frame(src: str, dst: str, sport: int, dport: int, flags: int = TCP_SYN,
             dst_mac: str = ZERO_MAC, src_mac: str = ZERO_MAC, seq: int = 1000,
             ack: int = 0) -> bytes:
    """A TCP segment of the node's own stack as lo carries it (zero MACs)."""
    return eth(dst_mac, src_mac, ETH_P_IP,
               ipv4(src, dst, IPPROTO_TCP, tcp(src, dst, sport, dport, flags, seq, ack)))


@pytest.mark.parametrize("where", ["other-node", "this-node"])
def test_the_node_reaches_its_own_nodeport_through_loopback(lab: LbLab, where: str) -> None:
    """curl <node IP>:<nodePort> on the node: the packet leaves the stack
    through lo and would come straight back in untranslated. lo's egress
    program hands it to the host port, where the lbrp translates it and
    masquerades it as kube-proxy does ("masquerade local traffic"): to the
    node's address for a backend on this node, to its pod-network address
    (routed back to it over the overlay) for one on another node. The answer
    comes from the node's own address, which the kernel takes only from lo:
    in through lo it goes."""
    np_ = next(_nodeport)
    be = backend_ip() if where == "other-node" else client()
    masq = HOST_POD_IP if where == "other-node" else NODE_IP
    lab.lb.set_service(NODE_IP, np_, "tcp", [Backend(be, 8080)])
    host_mac = lab.ports["host"].mac
    before = lab.counters()
    res = lab.from_loopback(lo_frame(NODE_IP, NODE_IP, 45500, np_))
    after = lab.counters()
    assert res.retval == TC_ACT_REDIRECT
    assert after["host"].rx_packets - before["host"].rx_packets == 1  # in through the host port
    assert gw_tx(before, after) == 1
    src, sport = src_of(res)
    assert src == masq and MASQ_LO <= sport <= MASQ_HI
    assert_frame(res.data, eth(host_mac, ZERO_MAC, ETH_P_IP, ipv4(
        masq, be, IPPROTO_TCP, tcp(masq, be, sport, 8080, TCP_SYN))))

    # the backend's answer, on its way to the node's stack
    router_mac, host_if_mac = random_mac(), random_mac()
    answer = eth(host_if_mac, router_mac, ETH_P_IP, ipv4(
        be, masq, IPPROTO_TCP, tcp(be, masq, 8080, sport, TCP_SYN | TCP_ACK, 5000, 1001)))
    res = lab.to_pod(answer, port="host")
    assert res.retval == TC_ACT_REDIRECT  # into lo, not out of the host link
    assert_frame(res.data, eth(ZERO_MAC, router_mac, ETH_P_IP, ipv4(
        NODE_IP, NODE_IP, IPPROTO_TCP,
        tcp(NODE_IP, NODE_IP, np_, 45500, TCP_SYN | TCP_ACK, 5000, 1001))))
    # the node's next segment goes the same way
    res = lab.from_loopback(lo_frame(NODE_IP, NODE_IP, 45500, np_, TCP_ACK, seq=1001, ack=5001))
    assert_frame(res.data, eth(host_mac, ZERO_MAC, ETH_P_IP, ipv4(
        masq, be, IPPROTO_TCP, tcp(masq, be, sport, 8080, TCP_ACK, 1001, 5001))))


def test_the_node_reaches_its_own_nodeport_whose_endpoint_is_itself(lab: LbLab) -> None:
    """A hostNetwork server of this node behind the NodePort (upstream's
    "service endpoints using hostNetwork"): the connection comes from the
    pods' gateway, so that the node's answer goes back up the host link
    through this lbrp (a hairpin); translated back, that answer comes from
    the node's own address, which the kernel takes only from lo: in through
    lo it goes, and so do the node's errors about it."""
    np_ = next(_nodeport)
    lab.lb.set_service(NODE_IP, np_, "tcp", [Backend(NODE_IP, 8080)])
    host_mac = lab.ports["host"].mac
    res = lab.from_loopback(lo_frame(NODE_IP, NODE_IP, 45520, np_))
    assert res.retval == TC_ACT_REDIRECT
    src, sport = src_of(res)
    assert src == GW_IP and MASQ_LO <= sport <= MASQ_HI
    assert_frame(res.data, eth(host_mac, ZERO_MAC, ETH_P_IP, ipv4(
        GW_IP, NODE_IP, IPPROTO_TCP, tcp(GW_IP, NODE_IP, sport, 8080, TCP_SYN))))

    host_if_mac = random_mac()  # the node's answer, sent up the host link
    answer = eth(host_mac, host_if_mac, ETH_P_IP, ipv4(
        NODE_IP, GW_IP, IPPROTO_TCP, tcp(NODE_IP, GW_IP, 8080, sport, TCP_SYN | TCP_ACK, 5000,
                                         1001)))
    res = lab.from_pod(answer, port="host")
    assert res.retval == TC_ACT_REDIRECT  # into lo, not on to the router
    assert_frame(res.data, eth(ZERO_MAC, host_if_mac, ETH_P_IP, ipv4(
        NODE_IP, NODE_IP, IPPROTO_TCP,
        tcp(NODE_IP, NODE_IP, np_, 45520, TCP_SYN | TCP_ACK, 5000, 1001))))

    quote = ipv4(GW_IP, NODE_IP, IPPROTO_TCP, tcp(GW_IP, NODE_IP, sport, 8080, TCP_ACK))[:28]
    error = eth(host_mac, host_if_mac, ETH_P_IP,
                ipv4(NODE_IP, GW_IP, IPPROTO_ICMP, icmp_error(3, 3, quote)))
    res = lab.from_pod(error, port="host")
    assert res.retval == TC_ACT_REDIRECT
    assert_frame(res.data, eth(ZERO_MAC, host_if_mac, ETH_P_IP, ipv4(
        NODE_IP, NODE_IP, IPPROTO_ICMP,
        icmp_error(3, 3, requote(quote, src=NODE_IP, sport=45520, dst=NODE_IP, dport=np_)))))


def test_the_nodes_own_traffic_that_is_no_service_stays_on_loopback(lab: LbLab) -> None:
    np_ = next(_nodeport)
    lab.lb.set_service(NODE_IP, np_, "tcp", [Backend(backend_ip(), 8080)])
    before = lab.counters()
    for frame in (lo_frame(NODE_IP, NODE_IP, 45510, 22),  # a port of the node's own
                  lo_frame("127.0.0.1", "127.0.0.1", 45510, np_)):
        res = lab.from_loopback(frame)
        assert (res.retval, res.data) == (TC_ACT_OK, frame)
    assert lab.counters() == before


def test_the_nodes_connection_to_a_nodeport_without_backends_is_refused_through_loopback(
        lab: LbLab) -> None:
    np_ = next(_nodeport)
    lab.lb.set_service(NODE_IP, np_, "tcp", [])
    drops = lab.drops()
    res = lab.from_loopback(lo_frame(NODE_IP, NODE_IP, 45600, np_))
    assert res.retval == TC_ACT_REDIRECT
    assert lab.drops().get("rejected", 0) == drops.get("rejected", 0) + 1
    assert_frame(res.data, eth(ZERO_MAC, lab.ports["host"].mac, ETH_P_IP, ipv4(
        NODE_IP, NODE_IP, IPPROTO_TCP,
        tcp(NODE_IP, NODE_IP, np_, 45600, TCP_RST | TCP_ACK, 0, 1001))))


_hostport = itertools.count(54300)


@pytest.mark.parametrize("src", ["127.0.0.1", NODE_IP], ids=["from-127", "from-node-ip"])
def test_the_node_reaches_a_hostport_on_127_0_0_1_through_loopback(lab: LbLab, src: str) -> None:
    """A pod's hostPort on hostIP 127.0.0.1 (upstream's HostPort conformance
    test: `curl --interface <node IP> http://127.0.0.1:54323` from the node):
    lo's egress program hands it to the host port, the lbrp sends it to the
    pod from the node's address, and the answer, which comes from 127.0.0.1
    again, goes in through lo (the kernel drops a loopback source anywhere
    else as martian)."""
    port = next(_hostport)
    pod = client()
    lab.lb.set_service("127.0.0.1", port, "tcp", [Backend(pod, 8080)])
    host_mac = lab.ports["host"].mac
    res = lab.from_loopback(lo_frame(src, "127.0.0.1", 45700, port))
    assert res.retval == TC_ACT_REDIRECT
    masq, sport = src_of(res)
    assert masq == NODE_IP and MASQ_LO <= sport <= MASQ_HI
    assert_frame(res.data, eth(host_mac, ZERO_MAC, ETH_P_IP, ipv4(
        NODE_IP, pod, IPPROTO_TCP, tcp(NODE_IP, pod, sport, 8080, TCP_SYN))))
    router_mac, host_if_mac = random_mac(), random_mac()
    answer = eth(host_if_mac, router_mac, ETH_P_IP, ipv4(
        pod, NODE_IP, IPPROTO_TCP, tcp(pod, NODE_IP, 8080, sport, TCP_SYN | TCP_ACK, 5000, 1001)))
    res = lab.to_pod(answer, port="host")
    assert res.retval == TC_ACT_REDIRECT  # into lo, not out of the host link
    assert_frame(res.data, eth(ZERO_MAC, router_mac, ETH_P_IP, ipv4(
        "127.0.0.1", src, IPPROTO_TCP,
        tcp("127.0.0.1", src, port, 45700, TCP_SYN | TCP_ACK, 5000, 1001))))
    assert lab.lb.delete_service("127.0.0.1", port, "tcp")


# ---------------------------------------------------------------------------- session lifetimes
def flow(src: str, dst: str, sport: int, dport: int, proto: int) -> maps.Flow:
    return maps.Flow(maps.ip_be(src), maps.ip_be(dst), be16(sport), be16(dport), proto)


def states(lab: LbLab, cl: str, svc: str, be: Backend, sport: int, dport: int,
           proto: int = IPPROTO_TCP) -> tuple[int | None, int | None]:
    """The state in the connection's two entries (None: no entry)."""
    fwd = lab.raw_session(cl, svc, sport, dport, proto)
    rev = lab.raw_session(be.ip, cl, be.port, sport, proto)
    return (fwd.state if fwd else None, rev.state if rev else None)


def age(lab: LbLab, cl: str, svc: str, be: Backend, sport: int, dport: int, seconds: float,
        proto: int = IPPROTO_TCP, born_only: bool = False) -> None:
    age_sessions(lab.net.rt.table("lb_sessions", "lbrp"),
                 [flow(cl, svc, sport, dport, proto), flow(be.ip, cl, be.port, sport, proto)],
                 seconds, born_only)


CLOSINGS = {  # who ends the connection, and the states it goes through
    "client-first": [(True, TCP_FIN | TCP_ACK, State.FIN_WAIT),
                     (False, TCP_FIN | TCP_ACK, State.LAST_ACK),
                     (False, TCP_FIN | TCP_ACK, State.LAST_ACK),  # retransmitted
                     (True, TCP_ACK, State.TIME_WAIT)],
    "backend-first": [(False, TCP_FIN | TCP_ACK, State.CLOSE_WAIT),
                      (False, TCP_ACK, State.CLOSE_WAIT),  # half-closed: data goes on
                      (True, TCP_ACK, State.CLOSE_WAIT),
                      (True, TCP_FIN | TCP_ACK, State.LAST_ACK),
                      (False, TCP_ACK, State.TIME_WAIT)],
    "reset": [(False, TCP_RST | TCP_ACK, State.CLOSE)],
}


@pytest.mark.parametrize("closing", sorted(CLOSINGS))
def test_tcp_session_follows_the_connection_state(lab: LbLab, closing: str) -> None:
    """Both entries carry the state conntrack gives the connection, advanced
    by the packets of either direction: it decides how long the connection
    lives without traffic."""
    svc, cl, be = vip(), client(), Backend(backend_ip(), 8080)
    lab.lb.set_service(svc, 80, "tcp", [be])
    steps = [(True, TCP_SYN, State.SYN_SENT), (True, TCP_SYN, State.SYN_SENT),  # retransmitted
             (False, TCP_SYN | TCP_ACK, State.SYN_RECV), (True, TCP_ACK, State.ESTABLISHED),
             (False, TCP_ACK, State.ESTABLISHED), *CLOSINGS[closing]]
    for outbound, flags, want in steps:
        if outbound:
            res = lab.from_pod(tcp_frame(lab, cl, svc, 60000, 80, flags=flags))
            assert dest_of(res) == (be.ip, 8080)
        else:
            res = lab.to_pod(tcp_frame(lab, be.ip, cl, 8080, 60000, flags=flags, outbound=False))
            assert parse_ipv4(parse_eth(res.data).payload).src == svc  # still translated
        assert states(lab, cl, svc, be, 60000, 80) == (want, want), (outbound, flags)


def test_expired_tcp_session_is_forgotten(lab: LbLab) -> None:
    """An established connection silent for longer than its lifetime (24 h)
    is over, as conntrack forgets it: its late reply is no longer
    translated, and the client's next packet is a new connection that picks
    a backend afresh. A second less and it is still there."""
    svc, cl = vip(), client()
    a, b = Backend(backend_ip(), 8080), Backend(backend_ip(), 8080)
    lab.lb.set_service(svc, 80, "tcp", [a])
    lab.from_pod(tcp_frame(lab, cl, svc, 60100, 80))
    lab.to_pod(tcp_frame(lab, a.ip, cl, 8080, 60100, flags=TCP_SYN | TCP_ACK, outbound=False))
    lab.from_pod(tcp_frame(lab, cl, svc, 60100, 80, flags=TCP_ACK))
    lab.lb.set_service(svc, 80, "tcp", [b])  # established connections keep their backend

    age(lab, cl, svc, a, 60100, 80, 86400 - 1)
    ack = tcp_frame(lab, cl, svc, 60100, 80, flags=TCP_ACK, seq=1001, ack=1)
    assert dest_of(lab.from_pod(ack)) == (a.ip, 8080)
    age(lab, cl, svc, a, 60100, 80, 86400 + 1)
    late = tcp_frame(lab, a.ip, cl, 8080, 60100, flags=TCP_ACK, outbound=False)
    res = lab.to_pod(late)
    assert (res.retval, res.data) == (TC_ACT_OK, late)
    assert dest_of(lab.from_pod(ack)) == (b.ip, 8080)
    # picked up mid-way: a new connection, not yet answered
    assert states(lab, cl, svc, b, 60100, 80) == (State.SYN_SENT, State.SYN_SENT)


def test_expired_session_translates_no_icmp_error(lab: LbLab) -> None:
    svc, cl, be = vip(), client(), Backend(backend_ip(), 5353)
    lab.lb.set_service(svc, 53, "udp", [be])
    res = lab.from_pod(udp_frame(lab, cl, svc, 60150, 53))
    error = icmp_frame(lab, be.ip, cl, icmp_error(3, 3, quote_of(res.data)), False)
    assert lab.to_pod(error).data != error  # translated while the session lives
    age(lab, cl, svc, be, 60150, 53, 30 + 1, IPPROTO_UDP)
    res = lab.to_pod(error)
    assert (res.retval, res.data) == (TC_ACT_OK, error)


def test_syn_after_the_connection_closed_opens_a_new_one(lab: LbLab) -> None:
    """A client that reuses its port once both sides closed (TIME_WAIT) or
    after a reset opens a new connection: a fresh backend choice, as
    conntrack reopens TIME_WAIT and CLOSE entries on a SYN. A SYN in any
    other state is a retransmission and keeps the backend."""
    svc, cl = vip(), client()
    a, b = Backend(backend_ip(), 8080), Backend(backend_ip(), 8080)
    lab.lb.set_service(svc, 80, "tcp", [a])
    lab.from_pod(tcp_frame(lab, cl, svc, 60200, 80))
    lab.to_pod(tcp_frame(lab, a.ip, cl, 8080, 60200, flags=TCP_SYN | TCP_ACK, outbound=False))
    lab.from_pod(tcp_frame(lab, cl, svc, 60200, 80, flags=TCP_ACK))
    lab.lb.set_service(svc, 80, "tcp", [b])
    lab.from_pod(tcp_frame(lab, cl, svc, 60200, 80, flags=TCP_FIN | TCP_ACK))
    assert dest_of(lab.from_pod(tcp_frame(lab, cl, svc, 60200, 80))) == (a.ip, 8080)  # FIN_WAIT
    lab.to_pod(tcp_frame(lab, a.ip, cl, 8080, 60200, flags=TCP_FIN | TCP_ACK, outbound=False))
    assert states(lab, cl, svc, a, 60200, 80) == (State.LAST_ACK, State.LAST_ACK)
    assert dest_of(lab.from_pod(tcp_frame(lab, cl, svc, 60200, 80))) == (a.ip, 8080)  # LAST_ACK
    lab.from_pod(tcp_frame(lab, cl, svc, 60200, 80, flags=TCP_ACK))
    assert states(lab, cl, svc, a, 60200, 80) == (State.TIME_WAIT, State.TIME_WAIT)

    assert dest_of(lab.from_pod(tcp_frame(lab, cl, svc, 60200, 80))) == (b.ip, 8080)
    assert lab.raw_session(a.ip, cl, 8080, 60200, IPPROTO_TCP) is None  # the old reply side
    assert states(lab, cl, svc, b, 60200, 80) == (State.SYN_SENT, State.SYN_SENT)


def test_udp_session_lives_short_unless_it_is_a_stream(lab: LbLab) -> None:
    """conntrack's UDP rule: 30 s without a reply or for a short exchange
    (DNS), 120 s once the flow goes on both ways for 2 s or more."""
    svc, cl = vip(), client()
    a, b = Backend(backend_ip(), 5353), Backend(backend_ip(), 5353)
    lab.lb.set_service(svc, 53, "udp", [a])
    query = udp_frame(lab, cl, svc, 60300, 53)
    lab.from_pod(query)
    assert states(lab, cl, svc, a, 60300, 53, IPPROTO_UDP) == (State.SYN_SENT,) * 2  # unreplied
    lab.to_pod(udp_frame(lab, a.ip, cl, 5353, 60300, b"answer", outbound=False))
    assert states(lab, cl, svc, a, 60300, 53, IPPROTO_UDP) == (State.SYN_RECV,) * 2  # replied
    age(lab, cl, svc, a, 60300, 53, 31, IPPROTO_UDP)  # over: the next query is a new flow
    lab.from_pod(query)
    assert states(lab, cl, svc, a, 60300, 53, IPPROTO_UDP) == (State.SYN_SENT,) * 2

    stream = udp_frame(lab, cl, svc, 60301, 53)
    lab.from_pod(stream)
    lab.to_pod(udp_frame(lab, a.ip, cl, 5353, 60301, b"answer", outbound=False))
    age(lab, cl, svc, a, 60301, 53, 2, IPPROTO_UDP, born_only=True)  # began 2 s ago
    lab.from_pod(stream)
    assert states(lab, cl, svc, a, 60301, 53, IPPROTO_UDP) == (State.ESTABLISHED,) * 2
    lab.lb.set_service(svc, 53, "udp", [a, b])  # a stays: its sessions stay
    age(lab, cl, svc, a, 60301, 53, 119, IPPROTO_UDP)
    assert dest_of(lab.from_pod(stream)) == (a.ip, 5353)
    assert states(lab, cl, svc, a, 60301, 53, IPPROTO_UDP) == (State.ESTABLISHED,) * 2


# ------------------------------------------------ masquerading ports: more take-overs
def test_the_nodes_own_connections_take_over_the_ports_of_expired_ones(lab: LbLab) -> None:
    """The node's own connections to a service with a backend on another
    node (masqueraded to its pod-network address): 16 unanswered SYNs hold
    the 16 ports of the range; a 17th gets none; once past their lifetime
    (SYN_SENT, 120 s) the next takes one over, and the old connection goes
    both ways."""
    np_ = next(_nodeport)
    be = backend_ip()
    lab.lb.set_service(NODE_IP, np_, "tcp", [Backend(be, 8080)])
    table = lab.net.rt.table("lb_sessions", "lbrp")
    with masq_ports(lab, HAIRPIN_LO, HAIRPIN_HI):
        held = {}
        for sport in range(46000, 46016):
            res = lab.from_loopback(lo_frame(NODE_IP, NODE_IP, sport, np_))
            assert res.retval == TC_ACT_REDIRECT
            src, mport = src_of(res)
            assert src == HOST_POD_IP
            held[sport] = mport
        assert sorted(held.values()) == list(range(HAIRPIN_LO, HAIRPIN_HI + 1))
        assert lab.from_loopback(lo_frame(NODE_IP, NODE_IP, 46100, np_)).retval == TC_ACT_SHOT
        for sport, mport in held.items():
            age_sessions(table, [flow(NODE_IP, NODE_IP, sport, np_, IPPROTO_TCP),
                                 flow(be, HOST_POD_IP, 8080, mport, IPPROTO_TCP)], 121)
        res = lab.from_loopback(lo_frame(NODE_IP, NODE_IP, 46101, np_))
        assert res.retval == TC_ACT_REDIRECT
        src, mport = src_of(res)
        assert src == HOST_POD_IP and mport in held.values()
        old = next(s for s, p in held.items() if p == mport)
        assert lab.raw_session(NODE_IP, NODE_IP, old, np_, IPPROTO_TCP) is None
        rev = lab.raw_session(be, HOST_POD_IP, 8080, mport, IPPROTO_TCP)
        assert rev is not None and rev.port2 == be16(46101)


def test_a_udp_hairpin_port_is_taken_over_when_over_and_never_before(lab: LbLab) -> None:
    """16 hairpin UDP flows, unanswered, hold the 16 ports: a new flow gets
    none while they live (UDP is never evicted early, the harder tries are
    for a TCP SYN); 31 s later (the unreplied lifetime, 30 s) it takes one."""
    svc, cl = vip(), client()
    lab.lb.set_service(svc, 53, "udp", [Backend(cl, 5353)])
    table = lab.net.rt.table("lb_sessions", "lbrp")
    with masq_ports(lab, HAIRPIN_LO, HAIRPIN_HI):
        held = {}
        for sport in range(47400, 47416):
            res = lab.from_pod(udp_frame(lab, cl, svc, sport, 53))
            assert res.retval == TC_ACT_REDIRECT
            src, mport = src_of(res)
            assert src == GW_IP
            held[sport] = mport
        assert sorted(held.values()) == list(range(HAIRPIN_LO, HAIRPIN_HI + 1))
        drops = lab.drops()
        assert lab.from_pod(udp_frame(lab, cl, svc, 47500, 53)).retval == TC_ACT_SHOT
        assert lab.drops().get("nat_exhausted", 0) == drops.get("nat_exhausted", 0) + 1
        for sport, mport in held.items():
            age_sessions(table, [flow(cl, svc, sport, 53, IPPROTO_UDP),
                                 flow(cl, GW_IP, 5353, mport, IPPROTO_UDP)], 29)
        assert lab.from_pod(udp_frame(lab, cl, svc, 47501, 53)).retval == TC_ACT_SHOT
        for sport, mport in held.items():
            age_sessions(table, [flow(cl, svc, sport, 53, IPPROTO_UDP),
                                 flow(cl, GW_IP, 5353, mport, IPPROTO_UDP)], 2)
        res = lab.from_pod(udp_frame(lab, cl, svc, 47502, 53))
        assert res.retval == TC_ACT_REDIRECT
        src, mport = src_of(res)
        old = next(s for s, p in held.items() if p == mport)
        assert lab.raw_session(cl, svc, old, 53, IPPROTO_UDP) is None
        back = lab.from_pod(udp_frame(lab, cl, GW_IP, 5353, mport, b"answer"))
        assert back.retval == TC_ACT_REDIRECT
        assert src_of(back) == (svc, 53)
        assert l4_ports(parse_ipv4(parse_eth(back.data).payload)).dport == 47502
