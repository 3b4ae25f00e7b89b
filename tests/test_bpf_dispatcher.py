"""The k8sdispatcher cube's program on crafted frames (BPF_PROG_TEST_RUN).

Topology, stacked as NodeDataplane (pcn_agent.node.wiring) does it: router `r` with port `uplink`
(192.168.50.10/24, the node's NIC address, host-shared, veth u1, default route
via 192.168.50.1), port `vxlan` (VTEP 10.250.0.1/24, veth u2 standing in for
the VXLAN device, route to the other node's pods 10.244.2.0/24 via its VTEP
10.250.0.2) and port `pods` (10.244.1.1/24, veth u3 standing in for the
bridge). The dispatcher `k8s` sits on the uplink's ingress and egress hooks
and on the vxlan port's ingress hook.

Frames from outside enter through the entry program of u1 (or u2); frames
leaving through the uplink run the egress entry program of u1, as the kernel
does after the router redirected them there. The masquerading range is only
16 ports wide, so that port collisions are certain, not a matter of luck.

Every test uses its own pods, clients and outside servers and compares
counters before and after, so the tests share one compiled runtime.
"""

from __future__ import annotations

import ctypes as ct
import itertools
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import pytest
from bpfunit import (
    BROADCAST,
    ETH_P_ARP,
    ETH_P_IP,
    IPPROTO_ICMP,
    IPPROTO_SCTP,
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
    arp,
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
    udp_csum,
    unit_net,
)

from pcn_agent.dataplane import maps
from pcn_agent.dataplane.cubes.dispatcher import (
    Dispatcher,
    DispatcherConfig,
    HostPort,
    HostPortConflict,
    HostPortError,
)
from pcn_agent.dataplane.cubes.lbrp import Backend, ServiceTable, be16
from pcn_agent.dataplane.cubes.router import Router
from pcn_agent.dataplane.runtime import PortCounters, PortState
from pcn_agent.dataplane.sessions import SessionCollector, SessionTimeouts, State, write_config
from pcn_testsupport.testrun import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TestRunResult

pytestmark = [pytest.mark.bpf,
              pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning")]

NODE_IP, GATEWAY = "192.168.50.10", "192.168.50.1"
VTEP, PEER_VTEP = "10.250.0.1", "10.250.0.2"
SNAT_LO, SNAT_HI = 61000, 61015
CFG = DispatcherConfig(
    node_ip=NODE_IP, vtep_ip=VTEP, local_pods="10.244.1.0/24",
    pod_networks=("10.244.0.0/16",),
    no_snat=("10.244.0.0/16", "10.96.0.0/12", "10.250.0.0/24"),
    nodeport_range=(30000, 32767), snat_range=(SNAT_LO, SNAT_HI))

_pod = itertools.count(10)
_remote_pod = itertools.count(10)
_server = itertools.count(1)
_client = itertools.count(1)
_nodeport = itertools.count(30100)
_asker = itertools.count(100)
_neighbour = itertools.count(20)


def counted(it: Iterator[int], fmt: str, limit: int = 250) -> str:
    n = next(it)
    assert n < limit, f"ran out of addresses for {fmt}"
    return fmt.format(n)


@dataclass
class DispLab:
    net: UnitNet
    r: Router
    disp: Dispatcher
    services: ServiceTable
    ports: dict[str, PortState]
    gw_mac: str
    peer_vtep_mac: str

    def _run(self, prog: str, ifname: str, frame: bytes) -> TestRunResult:
        return self.net.run(self.net.rt._entry_fds[prog], frame, ifindex=self.net.ifindex[ifname])

    def from_uplink(self, frame: bytes) -> TestRunResult:
        """Arrives on the NIC: tc ingress of u1."""
        return self._run("pcn_ingress", "u1", frame)

    def to_uplink(self, frame: bytes) -> TestRunResult:
        """Leaves through the NIC (the router sent it there): tc egress of u1."""
        return self._run("pcn_egress", "u1", frame)

    def from_overlay(self, frame: bytes) -> TestRunResult:
        return self._run("pcn_ingress", "u2", frame)

    def mac(self, port: str) -> str:
        return self.ports[port].mac

    def counters(self) -> dict[str, PortCounters]:
        return {name: self.net.rt.port_counters(p) for name, p in self.ports.items()}

    def drops(self) -> dict[str, int]:
        return self.net.rt.cube_drops("k8s")

    def pod(self) -> tuple[str, str]:
        """A fresh local pod the router knows how to reach."""
        ip, mac = counted(_pod, "10.244.1.{}"), random_mac()
        key = maps.RouterNeighKey(self.r.cube.id, maps.ip_be(ip))
        self.net.rt.table("router_neigh", "router")[key] = maps.RouterNeigh(
            mac=maps.mac_bytes(mac), port=self.ports["pods"].id,
            updated_ns=time.clock_gettime_ns(time.CLOCK_MONOTONIC))
        return ip, mac


    def neighbour(self) -> tuple[str, str]:
        """A fresh host next to the node on the uplink's network (another
        node), whose MAC the router knows."""
        ip, mac = counted(_neighbour, "192.168.50.{}"), random_mac()
        key = maps.RouterNeighKey(self.r.cube.id, maps.ip_be(ip))
        self.net.rt.table("router_neigh", "router")[key] = maps.RouterNeigh(
            mac=maps.mac_bytes(mac), port=self.ports["uplink"].id,
            updated_ns=time.clock_gettime_ns(time.CLOCK_MONOTONIC))
        return ip, mac


@pytest.fixture(scope="module")
def lab() -> Iterator[DispLab]:
    with unit_net(veths=3) as net:
        rt = net.rt
        r = Router(rt, "r")
        up = r.add_port("uplink", f"{NODE_IP}/24", flags=maps.PORT_HOST_SHARED)
        vx = r.add_port("vxlan", f"{VTEP}/24")
        pods = r.add_port("pods", "10.244.1.1/24")
        r.add_route("0.0.0.0/0", "uplink", nexthop=GATEWAY)
        r.add_route("10.244.2.0/24", "vxlan", nexthop=PEER_VTEP)
        services = ServiceTable(rt, "k8sdispatcher")
        disp = Dispatcher(rt, "k8s", services, CFG)
        disp.configure(up.id, vx.id)
        stack = [rt.stacked("k8s")]
        rt.set_hook(up, maps.HOOK_INGRESS, stack)
        rt.set_hook(up, maps.HOOK_EGRESS, stack)
        rt.set_hook(vx, maps.HOOK_INGRESS, stack)
        rt.connect_netdev(up, "u1")
        rt.connect_netdev(vx, "u2")
        rt.connect_netdev(pods, "u3")
        gw_mac, peer_vtep_mac = random_mac(), random_mac()
        neigh = rt.table("router_neigh", "router")
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        for ip, mac, port in ((GATEWAY, gw_mac, up), (PEER_VTEP, peer_vtep_mac, vx)):
            neigh[maps.RouterNeighKey(r.cube.id, maps.ip_be(ip))] = maps.RouterNeigh(
                mac=maps.mac_bytes(mac), port=port.id, updated_ns=now)
        yield DispLab(net, r, disp, services, {"uplink": up, "vxlan": vx, "pods": pods},
                      gw_mac, peer_vtep_mac)


# ---------------------------------------------------------------------------- frames
def ip_frame(dst_mac: str, src_mac: str, src: str, dst: str, proto: int, sport: int, dport: int,
             flags: int = TCP_SYN, ttl: int = 64, data: bytes = b"hello") -> bytes:
    """TCP (`flags`), UDP or ICMP echo (its identifier in both ports; a
    request, or a reply when `flags` has ACK)."""
    if proto == IPPROTO_TCP:
        l4 = tcp(src, dst, sport, dport, flags, seq=2000 if flags & TCP_ACK else 1000,
                 ack=1001 if flags & TCP_ACK else 0)
    elif proto == IPPROTO_UDP:
        l4 = udp_csum(src, dst, sport, dport, data)
    else:  # ICMP echo: the identifier is both "ports"
        assert sport == dport
        l4 = icmp_echo(sport, 1, data, kind=0 if flags & TCP_ACK else 8)
    return eth(dst_mac, src_mac, ETH_P_IP, ipv4(src, dst, proto, l4, ttl=ttl))


def out_uplink(lab: DispLab, src: str, dst: str, proto: int, sport: int, dport: int,
               flags: int = TCP_SYN) -> bytes:
    """As the router hands it to the NIC: to the gateway, TTL already decremented."""
    return ip_frame(lab.gw_mac, lab.mac("uplink"), src, dst, proto, sport, dport, flags, ttl=63)


def in_uplink(lab: DispLab, src: str, dst: str, proto: int, sport: int, dport: int,
              flags: int = TCP_SYN, dst_mac: str | None = None) -> bytes:
    """As the gateway sends it to the node's NIC."""
    return ip_frame(dst_mac or lab.mac("uplink"), lab.gw_mac, src, dst, proto, sport, dport,
                    flags)


def to_pod(lab: DispLab, pod_mac: str, src: str, dst: str, proto: int, sport: int, dport: int,
           flags: int = TCP_SYN) -> bytes:
    """As the router delivers it to a local pod."""
    return ip_frame(pod_mac, lab.mac("pods"), src, dst, proto, sport, dport, flags, ttl=63)


def src_of(res: TestRunResult) -> tuple[str, int]:
    ip = parse_ipv4(parse_eth(res.data).payload)
    return ip.src, l4_ports(ip).sport


def tx(before: dict[str, PortCounters], after: dict[str, PortCounters]) -> dict[str, int]:
    return {name: after[name].tx_packets - before[name].tx_packets for name in before}


def session(kind: str, src: str, dst: str, rewrite: str, proto: int = IPPROTO_TCP) -> dict:
    """An entry of Dispatcher.sessions()."""
    return {"kind": kind, "proto": proto, "from": src, "to": dst, "rewrite": rewrite}


# ---------------------------------------------------------------------------- masquerading
def masquerade(lab: DispLab, pod: str, server: str, proto: int = IPPROTO_TCP,
               sport: int = 40001, dport: int = 443) -> int:
    """A pod's first packet to `server` leaves the node; returns its node port."""
    pkt = out_uplink(lab, pod, server, proto, sport, dport)
    res = lab.to_uplink(pkt)
    assert res.retval == TC_ACT_OK  # end of the egress hook: the kernel transmits it
    ip, port = src_of(res)
    assert ip == NODE_IP
    assert SNAT_LO <= port <= SNAT_HI
    assert_frame(res.data, out_uplink(lab, NODE_IP, server, proto, port,
                                      port if proto == IPPROTO_ICMP else dport))
    return port


@pytest.mark.parametrize("proto", [IPPROTO_TCP, IPPROTO_UDP])
def test_pod_connection_to_outside_is_masqueraded(lab: DispLab, proto: int) -> None:
    pod, _ = lab.pod()
    server = counted(_server, "203.0.113.{}")
    drops = lab.drops()
    port = masquerade(lab, pod, server, proto)
    sessions = lab.disp.sessions()
    assert session("snat", f"{pod}:40001", f"{server}:443", f"{NODE_IP}:{port}",
                   proto) in sessions
    assert session("snat-reverse", f"{server}:443", f"{NODE_IP}:{port}", f"{pod}:40001",
                   proto) in sessions
    for _ in range(3):  # the connection keeps its port
        assert masquerade(lab, pod, server, proto) == port
    assert lab.drops() == drops


@pytest.mark.parametrize("proto", [IPPROTO_TCP, IPPROTO_UDP])
def test_reply_to_masqueraded_connection_reaches_the_pod(lab: DispLab, proto: int) -> None:
    pod, pod_mac = lab.pod()
    server = counted(_server, "203.0.113.{}")
    port = masquerade(lab, pod, server, proto)
    before = lab.counters()
    res = lab.from_uplink(in_uplink(lab, server, NODE_IP, proto, 443, port, TCP_SYN | TCP_ACK))
    assert res.retval == TC_ACT_REDIRECT  # the router sent it on to the pod
    assert tx(before, lab.counters()) == {"uplink": 0, "vxlan": 0, "pods": 1}
    assert_frame(res.data, to_pod(lab, pod_mac, server, pod, proto, 443, 40001,
                                  TCP_SYN | TCP_ACK))


def test_icmp_echo_is_masqueraded_by_identifier(lab: DispLab) -> None:
    pod, pod_mac = lab.pod()
    server = counted(_server, "203.0.113.{}")
    ident = masquerade(lab, pod, server, IPPROTO_ICMP, sport=0x4242, dport=0x4242)
    res = lab.from_uplink(in_uplink(lab, server, NODE_IP, IPPROTO_ICMP, ident, ident, TCP_ACK))
    assert res.retval == TC_ACT_REDIRECT
    assert_frame(res.data, to_pod(lab, pod_mac, server, pod, IPPROTO_ICMP, 0x4242, 0x4242,
                                  TCP_ACK))


# ---------------------------------------------------------------------------- ICMP errors
def quote_of(frame: bytes, nbytes: int = 8) -> bytes:
    """What an ICMP error quotes of `frame`: its IP header and `nbytes` more."""
    ip = parse_eth(frame).payload
    return ip[:(ip[0] & 0x0F) * 4 + nbytes]


def error_frame(dst_mac: str, src_mac: str, src: str, dst: str, message: bytes,
                ttl: int = 64) -> bytes:
    return eth(dst_mac, src_mac, ETH_P_IP, ipv4(src, dst, IPPROTO_ICMP, message, ttl=ttl))


@pytest.mark.parametrize("proto", [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP])
@pytest.mark.parametrize("reporter", ["server", "router"])
def test_icmp_error_about_a_masqueraded_flow_reaches_the_pod(lab: DispLab, proto: int,
                                                             reporter: str) -> None:
    """Path MTU discovery and unreachable ports work for masqueraded pods: the
    error quotes the node's address and port, the pod gets it quoting its own."""
    pod, pod_mac = lab.pod()
    server = counted(_server, "203.0.113.{}")
    sport, dport = (0x4343, 0x4343) if proto == IPPROTO_ICMP else (40001, 443)
    port = masquerade(lab, pod, server, proto, sport=sport, dport=dport)
    seen = out_uplink(lab, NODE_IP, server, proto, port, port if proto == IPPROTO_ICMP else dport)
    source = server if reporter == "server" else "192.0.2.77"
    kind, code, mtu = (3, 3, 0) if reporter == "server" else (3, 4, 1400)
    quote = quote_of(seen, 20 if proto == IPPROTO_TCP else 8)
    before = lab.counters()
    res = lab.from_uplink(error_frame(lab.mac("uplink"), lab.gw_mac, source, NODE_IP,
                                      icmp_error(kind, code, quote, mtu)))
    assert res.retval == TC_ACT_REDIRECT
    assert tx(before, lab.counters()) == {"uplink": 0, "vxlan": 0, "pods": 1}
    want = requote(quote, src=pod, sport=sport)
    assert_frame(res.data, error_frame(pod_mac, lab.mac("pods"), source, pod,
                                       icmp_error(kind, code, want, mtu), ttl=63))


def test_pod_icmp_error_about_a_masqueraded_flow_leaves_as_the_node(lab: DispLab) -> None:
    """A pod's port unreachable about a late reply must not leak the pod's
    address or port to the outside."""
    pod, pod_mac = lab.pod()
    server = counted(_server, "203.0.113.{}")
    port = masquerade(lab, pod, server, IPPROTO_UDP)
    got = to_pod(lab, pod_mac, server, pod, IPPROTO_UDP, 443, 40001)  # as the pod got it
    quote = quote_of(got)
    res = lab.to_uplink(error_frame(lab.gw_mac, lab.mac("uplink"), pod, server,
                                    icmp_error(3, 3, quote), ttl=63))
    assert res.retval == TC_ACT_OK
    assert_frame(res.data, error_frame(lab.gw_mac, lab.mac("uplink"), NODE_IP, server,
                                       icmp_error(3, 3, requote(quote, dst=NODE_IP, dport=port)),
                                       ttl=63))


@pytest.mark.parametrize("policy", ["Local", "Cluster"])
def test_client_icmp_error_about_a_nodeport_reply_reaches_the_backend(lab: DispLab,
                                                                      policy: str) -> None:
    np_ = next(_nodeport)
    cl = counted(_client, "198.51.100.{}")
    if policy == "Local":
        backend, backend_mac = lab.pod()
    else:
        backend = counted(_remote_pod, "10.244.2.{}")
    lab.disp.set_nodeport(np_, "udp", policy, [Backend(backend, 8080)])
    first = lab.from_uplink(in_uplink(lab, cl, NODE_IP, IPPROTO_UDP, 5300, np_))
    assert first.retval == TC_ACT_REDIRECT
    via, vport = src_of(first)  # the client (Local) or our VTEP address and a port (Cluster)
    # what the client got back: the node's address and NodePort
    reply = quote_of(out_uplink(lab, NODE_IP, cl, IPPROTO_UDP, np_, 5300))
    res = lab.from_uplink(error_frame(lab.mac("uplink"), lab.gw_mac, cl, NODE_IP,
                                      icmp_error(3, 3, reply)))
    assert res.retval == TC_ACT_REDIRECT
    # the backend gets it quoting what it sent, from whom it thinks the client is
    want = requote(reply, src=backend, sport=8080, dst=via, dport=vport)
    if policy == "Local":
        assert via == cl
        expect = error_frame(backend_mac, lab.mac("pods"), cl, backend,
                             icmp_error(3, 3, want), ttl=63)
    else:
        assert via == VTEP
        expect = error_frame(lab.peer_vtep_mac, lab.mac("vxlan"), VTEP, backend,
                             icmp_error(3, 3, want), ttl=63)
    assert_frame(res.data, expect)


PODS_MTU = 1450  # set on the router's pods and vxlan ports by the path MTU tests


@pytest.mark.parametrize("policy,proto", [("Local", IPPROTO_UDP), ("Local", IPPROTO_TCP),
                                          ("Cluster", IPPROTO_UDP), ("Cluster", IPPROTO_TCP)])
def test_fragmentation_needed_about_a_nodeport_packet_reaches_its_client(
        lab: DispLab, policy: str, proto: int) -> None:
    """Path MTU discovery through a NodePort: a 1500-byte DF packet from the
    client is too big for the pods' port (Local) or the overlay (Cluster,
    where it is also masqueraded to our VTEP address). The router answers it
    from the node's address quoting it as translated on its way in, back out
    of the NIC, whose egress translates the quote back (and, for Cluster, the
    error's destination, our VTEP address, to the client): the client's
    kernel finds the socket that sent to the node's address and NodePort
    and learns the MTU for the node's address."""
    np_, cl = next(_nodeport), counted(_client, "198.51.100.{}")
    if policy == "Local":
        backend, _ = lab.pod()
    else:
        backend = counted(_remote_pod, "10.244.2.{}")
    lab.disp.set_nodeport(np_, "udp" if proto == IPPROTO_UDP else "tcp", policy,
                          [Backend(backend, 8080)])
    if proto == IPPROTO_TCP:  # the connection starts small; a full segment follows
        assert lab.from_uplink(in_uplink(lab, cl, NODE_IP, proto, 5300, np_)).retval == \
            TC_ACT_REDIRECT
        l4 = tcp(cl, NODE_IP, 5300, np_, TCP_ACK, seq=1001, ack=1, data=bytes(1460))
    else:
        l4 = udp_csum(cl, NODE_IP, 5300, np_, bytes(1472))
    sent = eth(lab.mac("uplink"), lab.gw_mac, ETH_P_IP, ipv4(cl, NODE_IP, proto, l4))
    assert len(sent) == 1514
    out_port = "pods" if policy == "Local" else "vxlan"
    lab.r.set_mtu(out_port, PODS_MTU)
    try:
        drops, before = lab.net.rt.cube_drops("r"), lab.counters()
        res = lab.from_uplink(sent)
        assert res.retval == TC_ACT_REDIRECT  # back out of the NIC
        assert tx(before, lab.counters()) == {"uplink": 1, "vxlan": 0, "pods": 0}
        assert lab.net.rt.cube_drops("r").get("too_big", 0) == drops.get("too_big", 0) + 1
        # as the router made it: to the packet's source as it saw it
        made = parse_ipv4(parse_eth(res.data).payload)
        assert (made.src, made.dst) == (NODE_IP, cl if policy == "Local" else VTEP)
        out = lab.to_uplink(res.data)  # the NIC's egress hook
    finally:
        lab.r.set_mtu(out_port, None)
    assert out.retval == TC_ACT_OK
    quote = made.payload[8:]
    assert len(quote) == 20 + 32
    want = requote(quote, src=cl, sport=5300, dst=NODE_IP, dport=np_)
    assert want[:20] == ipv4(cl, NODE_IP, proto, l4)[:20]  # the header the client sent
    assert_frame(out.data, eth(lab.gw_mac, lab.mac("uplink"), ETH_P_IP, ipv4_fragment(
        NODE_IP, cl, IPPROTO_ICMP, icmp_error(3, 4, want, PODS_MTU), 0, False, ident=0)))


def test_icmp_error_about_no_flow_of_ours_goes_to_the_host(lab: DispLab) -> None:
    server = counted(_server, "203.0.113.{}")
    quote = quote_of(out_uplink(lab, NODE_IP, server, IPPROTO_UDP, 33333, 443))
    frame = error_frame(lab.mac("uplink"), lab.gw_mac, server, NODE_IP, icmp_error(3, 3, quote))
    res = lab.from_uplink(frame)
    assert (res.retval, res.data) == (TC_ACT_OK, frame)


def test_pods_sharing_a_source_port_get_different_node_ports(lab: DispLab) -> None:
    """16 pods, one source port, one destination: the 16 node ports are all
    taken, each once (first choices collide for sure), the replies find their
    own pod, and a 17th connection has no port left."""
    server = counted(_server, "203.0.113.{}")
    pods = [lab.pod() for _ in range(SNAT_HI - SNAT_LO + 1)]
    ports = [masquerade(lab, ip, server, sport=33333, dport=80) for ip, _ in pods]
    assert sorted(ports) == list(range(SNAT_LO, SNAT_HI + 1))
    for (ip, mac), port in zip(pods, ports, strict=True):
        res = lab.from_uplink(in_uplink(lab, server, NODE_IP, IPPROTO_TCP, 80, port,
                                        TCP_SYN | TCP_ACK))
        assert res.retval == TC_ACT_REDIRECT
        assert_frame(res.data, to_pod(lab, mac, server, ip, IPPROTO_TCP, 80, 33333,
                                      TCP_SYN | TCP_ACK))

    late, _ = lab.pod()
    drops, sessions = lab.drops(), lab.disp.sessions()
    pkt = out_uplink(lab, late, server, IPPROTO_TCP, 33333, 80)
    res = lab.to_uplink(pkt)
    assert res.retval == TC_ACT_SHOT
    assert lab.drops().get("nat_exhausted", 0) == drops.get("nat_exhausted", 0) + 1
    assert lab.disp.sessions() == sessions
    # the same pod to another destination still gets a port
    masquerade(lab, late, counted(_server, "203.0.113.{}"), sport=33333, dport=80)


@pytest.mark.parametrize("dst", ["10.96.0.10", "10.244.2.9", PEER_VTEP],
                         ids=["service", "remote-pod", "vtep"])
def test_no_snat_destinations_are_not_translated(lab: DispLab, dst: str) -> None:
    pod, _ = lab.pod()
    pkt = out_uplink(lab, pod, dst, IPPROTO_TCP, 40001, 80)
    sessions, drops = lab.disp.sessions(), lab.drops()
    res = lab.to_uplink(pkt)
    assert res.retval == TC_ACT_OK
    assert res.data == pkt
    assert lab.disp.sessions() == sessions
    assert lab.drops() == drops


@pytest.mark.parametrize("src", [NODE_IP, "172.16.0.5"], ids=["node", "not-a-pod"])
def test_traffic_not_from_pods_is_not_translated(lab: DispLab, src: str) -> None:
    pkt = out_uplink(lab, src, counted(_server, "203.0.113.{}"), IPPROTO_TCP, 40001, 80)
    sessions = lab.disp.sessions()
    res = lab.to_uplink(pkt)
    assert res.retval == TC_ACT_OK
    assert res.data == pkt
    assert lab.disp.sessions() == sessions


# ---------------------------------------------------------------------------- NodePort
def test_nodeport_local_goes_to_a_local_backend_keeping_the_client(lab: DispLab) -> None:
    np_ = next(_nodeport)
    (local, local_mac), remote = lab.pod(), counted(_remote_pod, "10.244.2.{}")
    lab.disp.set_nodeport(np_, "tcp", "Local", [Backend(local, 8080), Backend(remote, 8080)])
    cl = counted(_client, "198.51.100.{}")
    drops = lab.drops()
    for cport in range(5000, 5010):  # never the remote backend
        before = lab.counters()
        res = lab.from_uplink(in_uplink(lab, cl, NODE_IP, IPPROTO_TCP, cport, np_))
        assert res.retval == TC_ACT_REDIRECT
        assert tx(before, lab.counters()) == {"uplink": 0, "vxlan": 0, "pods": 1}
        assert_frame(res.data, to_pod(lab, local_mac, cl, local, IPPROTO_TCP, cport, 8080))
    assert lab.drops() == drops
    res = lab.from_uplink(in_uplink(lab, cl, NODE_IP, IPPROTO_TCP, 5000, np_, TCP_ACK))
    assert_frame(res.data, to_pod(lab, local_mac, cl, local, IPPROTO_TCP, 5000, 8080, TCP_ACK))

    # The backend's reply leaves through the uplink with the node's address.
    res = lab.to_uplink(out_uplink(lab, local, cl, IPPROTO_TCP, 8080, 5000, TCP_SYN | TCP_ACK))
    assert res.retval == TC_ACT_OK
    assert_frame(res.data, out_uplink(lab, NODE_IP, cl, IPPROTO_TCP, np_, 5000,
                                      TCP_SYN | TCP_ACK))
    sessions = lab.disp.sessions()
    assert session("nodeport", f"{cl}:5000", f"{NODE_IP}:{np_}", f"{local}:8080") \
        in sessions
    assert session("nodeport-reverse", f"{local}:8080", f"{cl}:5000",
                   f"{NODE_IP}:{np_}") in sessions


@pytest.mark.parametrize("proto", [IPPROTO_TCP, IPPROTO_UDP])
def test_nodeport_cluster_to_remote_backend_goes_over_the_overlay(lab: DispLab,
                                                                  proto: int) -> None:
    np_ = next(_nodeport)
    remote = counted(_remote_pod, "10.244.2.{}")
    lab.disp.set_nodeport(np_, {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp"}[proto], "Cluster",
                          [Backend(remote, 8080)])
    cl = counted(_client, "198.51.100.{}")
    before = lab.counters()
    res = lab.from_uplink(in_uplink(lab, cl, NODE_IP, proto, 5555, np_))
    assert res.retval == TC_ACT_REDIRECT
    assert tx(before, lab.counters()) == {"uplink": 0, "vxlan": 1, "pods": 0}
    # DNAT to the backend, SNAT to our VTEP so the reply comes back through us
    vtep_ip, vport = src_of(res)
    assert vtep_ip == VTEP and SNAT_LO <= vport <= SNAT_HI
    assert_frame(res.data, ip_frame(lab.peer_vtep_mac, lab.mac("vxlan"), VTEP, remote, proto,
                                    vport, 8080, ttl=63))
    # the connection's next packet: both rewrites again, from the session
    res = lab.from_uplink(in_uplink(lab, cl, NODE_IP, proto, 5555, np_, TCP_ACK))
    assert res.retval == TC_ACT_REDIRECT
    assert_frame(res.data, ip_frame(lab.peer_vtep_mac, lab.mac("vxlan"), VTEP, remote, proto,
                                    vport, 8080, TCP_ACK, ttl=63))

    reply = ip_frame(lab.mac("vxlan"), lab.peer_vtep_mac, remote, VTEP, proto, 8080, vport,
                     TCP_SYN | TCP_ACK)
    before = lab.counters()
    res = lab.from_overlay(reply)
    assert res.retval == TC_ACT_REDIRECT  # to the client, through the uplink
    assert tx(before, lab.counters()) == {"uplink": 1, "vxlan": 0, "pods": 0}
    back = out_uplink(lab, NODE_IP, cl, proto, np_, 5555, TCP_SYN | TCP_ACK)
    assert_frame(res.data, back)
    # on its way out of the NIC it is the node's own traffic: left alone
    out = lab.to_uplink(res.data)
    assert (out.retval, out.data) == (TC_ACT_OK, res.data)


def test_udp_nodeport_sessions_leave_with_their_backend(lab: DispLab) -> None:
    """As for ClusterIPs (test_bpf_lbrp): the UDP NodePort sessions of a
    backend that left are removed both ways, so the client's next datagram
    goes to a live backend."""
    np_ = next(_nodeport)
    gone, stays = (counted(_remote_pod, "10.244.2.{}") for _ in range(2))
    lab.disp.set_nodeport(np_, "udp", "Cluster", [Backend(gone, 8080)])
    cl = counted(_client, "198.51.100.{}")
    res = lab.from_uplink(in_uplink(lab, cl, NODE_IP, IPPROTO_UDP, 5600, np_))
    assert parse_ipv4(parse_eth(res.data).payload).dst == gone

    def kinds_for(backend: str) -> set[str]:
        return {e["kind"] for e in lab.disp.sessions() if e["proto"] == IPPROTO_UDP
                and backend in (e["from"].split(":")[0], e["rewrite"].split(":")[0])}

    assert kinds_for(gone) == {"nodeport", "nodeport-reverse"}
    lab.disp.set_nodeport(np_, "udp", "Cluster", [Backend(stays, 8080)])
    assert kinds_for(gone) == set()
    res = lab.from_uplink(in_uplink(lab, cl, NODE_IP, IPPROTO_UDP, 5600, np_))
    assert parse_ipv4(parse_eth(res.data).payload).dst == stays


@pytest.mark.parametrize("policy", ["Cluster", "Local"])
def test_nodeport_with_client_ip_affinity_sends_a_client_to_one_backend(lab: DispLab,
                                                                        policy: str) -> None:
    """sessionAffinity ClientIP on a NodePort: every new connection of a
    client goes to the backend its first one got, as kube-proxy does."""
    np_ = next(_nodeport)
    backends = [lab.pod()[0] for _ in range(4)]
    lab.disp.set_nodeport(np_, "tcp", policy, [Backend(ip, 8080) for ip in backends],
                          affinity_timeout_s=600)
    cl = counted(_client, "198.51.100.{}")
    chosen = {parse_ipv4(parse_eth(lab.from_uplink(
        in_uplink(lab, cl, NODE_IP, IPPROTO_TCP, sport, np_)).data).payload).dst
        for sport in range(6100, 6140)}
    assert len(chosen) == 1 and chosen <= set(backends)
    lab.disp.set_nodeport(np_, "tcp", policy, [Backend(ip, 8080) for ip in backends])
    spread = {parse_ipv4(parse_eth(lab.from_uplink(
        in_uplink(lab, counted(_client, "198.51.100.{}"), NODE_IP, IPPROTO_TCP, 6200, np_)
    ).data).payload).dst for _ in range(12)}
    assert len(spread) > 1  # without affinity new clients spread over the backends


def test_nodeport_cluster_with_local_backend_keeps_the_client(lab: DispLab) -> None:
    np_ = next(_nodeport)
    local, local_mac = lab.pod()
    lab.disp.set_nodeport(np_, "tcp", "Cluster", [Backend(local, 8080)])
    cl = counted(_client, "198.51.100.{}")
    res = lab.from_uplink(in_uplink(lab, cl, NODE_IP, IPPROTO_TCP, 6000, np_))
    assert res.retval == TC_ACT_REDIRECT
    assert_frame(res.data, to_pod(lab, local_mac, cl, local, IPPROTO_TCP, 6000, 8080))


# Endpoints that are no pods: upstream's "should function for service
# endpoints using hostNetwork" (test/e2e/network/networking.go), whose
# endpoints are the nodes' own addresses.
PROTO_NAME = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp"}


@pytest.mark.parametrize("policy", ["Cluster", "Local"])
@pytest.mark.parametrize("proto", [IPPROTO_TCP, IPPROTO_UDP])
def test_nodeport_to_a_hostnetwork_server_of_this_node_goes_to_the_host_stack(
        lab: DispLab, proto: int, policy: str) -> None:
    """The endpoint is the node's own address: only the port changes and the
    packet goes to the host stack (not to the router, which would route it
    nowhere), the client kept; the host's answer leaves from the NodePort."""
    np_ = next(_nodeport)
    lab.disp.set_nodeport(np_, PROTO_NAME[proto], policy, [Backend(NODE_IP, 8080)])
    cl = counted(_client, "198.51.100.{}")
    drops = lab.drops()
    for flags in (TCP_SYN, TCP_ACK):  # the first packet, then one of its session
        before = lab.counters()
        res = lab.from_uplink(in_uplink(lab, cl, NODE_IP, proto, 5000, np_, flags))
        assert res.retval == TC_ACT_OK, flags
        assert tx(before, lab.counters()) == {"uplink": 0, "vxlan": 0, "pods": 0}
        assert_frame(res.data, in_uplink(lab, cl, NODE_IP, proto, 5000, 8080, flags))
    answer = ip_frame(lab.gw_mac, lab.mac("uplink"), NODE_IP, cl, proto, 8080, 5000,
                      TCP_SYN | TCP_ACK)  # as the host sends it
    res = lab.to_uplink(answer)
    assert res.retval == TC_ACT_OK
    assert_frame(res.data, ip_frame(lab.gw_mac, lab.mac("uplink"), NODE_IP, cl, proto, np_,
                                    5000, TCP_SYN | TCP_ACK))
    assert lab.drops() == drops
    sessions = lab.disp.sessions()
    assert session("nodeport", f"{cl}:5000", f"{NODE_IP}:{np_}", f"{NODE_IP}:8080",
                   proto) in sessions
    assert session("nodeport-reverse", f"{NODE_IP}:8080", f"{cl}:5000", f"{NODE_IP}:{np_}",
                   proto) in sessions
    # the host's own connections from that port to others are left alone
    own = ip_frame(lab.gw_mac, lab.mac("uplink"), NODE_IP, cl, proto, 8080, 5001)
    res = lab.to_uplink(own)
    assert (res.retval, res.data) == (TC_ACT_OK, own)


def test_the_hosts_port_unreachable_about_a_nodeport_datagram_quotes_the_nodeport(
        lab: DispLab) -> None:
    """No server on the host's port: the host's error quotes the datagram it
    got; the client must see the one it sent, to the NodePort."""
    np_ = next(_nodeport)
    lab.disp.set_nodeport(np_, "udp", "Cluster", [Backend(NODE_IP, 8081)])
    cl = counted(_client, "198.51.100.{}")
    got = lab.from_uplink(in_uplink(lab, cl, NODE_IP, IPPROTO_UDP, 5002, np_))
    assert got.retval == TC_ACT_OK
    quote = quote_of(got.data)
    res = lab.to_uplink(error_frame(lab.gw_mac, lab.mac("uplink"), NODE_IP, cl,
                                    icmp_error(3, 3, quote)))
    assert res.retval == TC_ACT_OK
    assert_frame(res.data, error_frame(lab.gw_mac, lab.mac("uplink"), NODE_IP, cl,
                                       icmp_error(3, 3, requote(quote, dport=np_))))


@pytest.mark.parametrize("where", ["another node", "outside the cluster"])
@pytest.mark.parametrize("proto", [IPPROTO_TCP, IPPROTO_UDP])
def test_nodeport_to_a_host_elsewhere_is_masqueraded_to_the_node(lab: DispLab, proto: int,
                                                                 where: str) -> None:
    """Another node's hostNetwork server, or an endpoint outside the pod
    network: sent back out of the uplink from the node's address (kube-proxy
    masquerades it), not from the VTEP address over the overlay; its answer
    comes back to that address and returns to the client from the NodePort,
    and so do its ICMP errors."""
    np_ = next(_nodeport)
    if where == "another node":
        host, host_mac = lab.neighbour()
    else:
        host, host_mac = counted(_server, "203.0.113.{}"), lab.gw_mac
    lab.disp.set_nodeport(np_, PROTO_NAME[proto], "Cluster", [Backend(host, 8080)])
    cl = counted(_client, "198.51.100.{}")
    drops, before = lab.drops(), lab.counters()
    res = lab.from_uplink(in_uplink(lab, cl, NODE_IP, proto, 5555, np_))
    assert res.retval == TC_ACT_REDIRECT
    assert tx(before, lab.counters()) == {"uplink": 1, "vxlan": 0, "pods": 0}
    ip, port = src_of(res)
    assert ip == NODE_IP and SNAT_LO <= port <= SNAT_HI
    sent = ip_frame(host_mac, lab.mac("uplink"), NODE_IP, host, proto, port, 8080, ttl=63)
    assert_frame(res.data, sent)
    out = lab.to_uplink(res.data)  # on its way out of the NIC: already translated
    assert (out.retval, out.data) == (TC_ACT_OK, res.data)

    answer = ip_frame(lab.mac("uplink"), host_mac, host, NODE_IP, proto, 8080, port,
                      TCP_SYN | TCP_ACK)
    before = lab.counters()
    res = lab.from_uplink(answer)
    assert res.retval == TC_ACT_REDIRECT
    assert tx(before, lab.counters()) == {"uplink": 1, "vxlan": 0, "pods": 0}
    assert_frame(res.data, out_uplink(lab, NODE_IP, cl, proto, np_, 5555, TCP_SYN | TCP_ACK))
    assert lab.drops() == drops

    quote = quote_of(sent)
    res = lab.from_uplink(error_frame(lab.mac("uplink"), host_mac, host, NODE_IP,
                                      icmp_error(3, 3, quote)))
    assert res.retval == TC_ACT_REDIRECT
    assert_frame(res.data, error_frame(
        lab.gw_mac, lab.mac("uplink"), NODE_IP, cl,
        icmp_error(3, 3, requote(quote, src=cl, sport=5555, dst=NODE_IP, dport=np_)), ttl=63))


def test_a_local_nodeport_counts_the_nodes_own_address_as_a_local_endpoint(
        lab: DispLab) -> None:
    """Local with endpoints that are hostNetwork servers: this node's own is
    the local one (by default, as the agent passes it from the EndpointSlice),
    another node's is not."""
    np_ = next(_nodeport)
    other, _ = lab.neighbour()
    lab.disp.set_nodeport(np_, "tcp", "Local", [Backend(other, 8080), Backend(NODE_IP, 8080)])
    ext = maps.SvcKey(maps.ip_be(NODE_IP), be16(np_), IPPROTO_TCP, maps.SVC_EXTERNAL)
    assert lab.net.rt.table("lb_services", "k8sdispatcher")[ext].n_slots == 1
    for sport in range(5100, 5110):
        cl = counted(_client, "198.51.100.{}")
        res = lab.from_uplink(in_uplink(lab, cl, NODE_IP, IPPROTO_TCP, sport, np_))
        assert res.retval == TC_ACT_OK
        assert_frame(res.data, in_uplink(lab, cl, NODE_IP, IPPROTO_TCP, sport, 8080))


@pytest.mark.parametrize("proto", [IPPROTO_TCP, IPPROTO_UDP])
def test_local_nodeport_with_backends_only_elsewhere_is_dropped(lab: DispLab,
                                                               proto: int) -> None:
    """kube-proxy: a Local NodePort with endpoints on other nodes only drops
    traffic from outside (they may come back), it does not reject it."""
    np_ = next(_nodeport)
    lab.disp.set_nodeport(np_, "tcp" if proto == IPPROTO_TCP else "udp", "Local",
                          [Backend(counted(_remote_pod, "10.244.2.{}"), 8080)])
    cl = counted(_client, "198.51.100.{}")
    drops, before = lab.drops(), lab.counters()
    res = lab.from_uplink(in_uplink(lab, cl, NODE_IP, proto, 7000, np_))
    after = lab.counters()
    assert res.retval == TC_ACT_SHOT
    assert lab.drops().get("no_backend", 0) == drops.get("no_backend", 0) + 1
    assert lab.drops().get("rejected", 0) == drops.get("rejected", 0)
    assert after["uplink"].drops - before["uplink"].drops == 1
    assert tx(before, after) == {"uplink": 0, "vxlan": 0, "pods": 0}


@pytest.mark.parametrize("policy", ["Cluster", "Local"])
def test_nodeport_without_any_backend_rejects_a_tcp_connection(lab: DispLab,
                                                              policy: str) -> None:
    """kube-proxy rejects NodePort traffic of a Service with no endpoint at all
    (its no-endpoint-nodeports map): the client hears RST at once."""
    np_ = next(_nodeport)
    lab.disp.set_nodeport(np_, "tcp", policy, [])
    cl = counted(_client, "198.51.100.{}")
    drops, before = lab.drops(), lab.counters()
    res = lab.from_uplink(in_uplink(lab, cl, NODE_IP, IPPROTO_TCP, 7010, np_))
    after = lab.counters()
    assert res.retval == TC_ACT_REDIRECT  # back out of the NIC
    want = eth(lab.gw_mac, lab.mac("uplink"), ETH_P_IP,
               ipv4(NODE_IP, cl, IPPROTO_TCP, tcp(NODE_IP, cl, np_, 7010, TCP_RST | TCP_ACK,
                                                  seq=0, ack=1001)))
    assert_frame(res.data, want)
    assert lab.drops().get("rejected", 0) == drops.get("rejected", 0) + 1
    assert tx(before, after) == {"uplink": 0, "vxlan": 0, "pods": 0}
    # what the reject sends out of the NIC passes the egress hook untouched
    out = lab.to_uplink(res.data)
    assert (out.retval, out.data) == (TC_ACT_OK, res.data)


def test_nodeport_without_any_backend_answers_udp_with_port_unreachable(lab: DispLab) -> None:
    np_ = next(_nodeport)
    lab.disp.set_nodeport(np_, "udp", "Cluster", [])
    cl = counted(_client, "198.51.100.{}")
    sent = in_uplink(lab, cl, NODE_IP, IPPROTO_UDP, 7020, np_)
    drops = lab.drops()
    res = lab.from_uplink(sent)
    assert res.retval == TC_ACT_REDIRECT
    assert lab.drops().get("rejected", 0) == drops.get("rejected", 0) + 1
    e = parse_eth(res.data)
    assert (e.dst, e.src) == (lab.gw_mac, lab.mac("uplink"))
    ip = parse_ipv4(e.payload)
    assert (ip.src, ip.dst, ip.proto) == (NODE_IP, cl, IPPROTO_ICMP)
    assert inet_csum(ip.header) == 0 and inet_csum(ip.payload) == 0
    assert ip.payload[:2] == bytes([3, 3])  # destination / port unreachable
    assert ip.payload[8:] == parse_eth(sent).payload[:28]  # what the client sent


def test_local_nodeport_serves_the_cluster_all_backends_and_outside_only_local_ones(
        lab: DispLab) -> None:
    """Two entries for a Local NodePort: the external one (this node's
    backends, what the dispatcher uses for traffic from the NIC) and the
    internal one (all backends: pods and the node reaching the NodePort,
    which kube-proxy short-circuits to the Cluster endpoints)."""
    np_ = next(_nodeport)
    local, local_mac = lab.pod()
    remote = counted(_remote_pod, "10.244.2.{}")
    lab.disp.set_nodeport(np_, "tcp", "Local", [Backend(local, 8080), Backend(remote, 8080)])
    svcs = lab.net.rt.table("lb_services", "k8sdispatcher")
    key = maps.SvcKey(maps.ip_be(NODE_IP), be16(np_), IPPROTO_TCP, maps.SVC_INTERNAL)
    ext = maps.SvcKey(maps.ip_be(NODE_IP), be16(np_), IPPROTO_TCP, maps.SVC_EXTERNAL)
    assert svcs[key].n_slots == 2 and svcs[ext].n_slots == 1
    assert svcs[ext].flags & maps.LB_DROP_EMPTY == 0  # there is one here
    for sport in range(7030, 7050):  # from outside: always the local one
        cl = counted(_client, "198.51.100.{}")
        res = lab.from_uplink(in_uplink(lab, cl, NODE_IP, IPPROTO_TCP, sport, np_))
        assert_frame(res.data, to_pod(lab, local_mac, cl, local, IPPROTO_TCP, sport, 8080))
    lab.disp.set_nodeport(np_, "tcp", "Cluster", [Backend(local, 8080), Backend(remote, 8080)])
    with pytest.raises(KeyError):
        svcs[ext]  # Cluster: the internal entry serves every client
    lab.disp.set_nodeport(np_, "tcp", "Local", [Backend(remote, 8080)])
    assert svcs[ext].n_slots == 0 and svcs[ext].flags & maps.LB_DROP_EMPTY
    assert lab.disp.delete_nodeport(np_, "tcp")
    for k in (key, ext):
        with pytest.raises(KeyError):
            svcs[k]


def test_deleted_nodeport_goes_back_to_the_host(lab: DispLab) -> None:
    np_ = next(_nodeport)
    local, _ = lab.pod()
    lab.disp.set_nodeport(np_, "tcp", "Local", [Backend(local, 8080)])
    cl = counted(_client, "198.51.100.{}")
    assert lab.from_uplink(in_uplink(lab, cl, NODE_IP, IPPROTO_TCP, 7100, np_)).retval == \
        TC_ACT_REDIRECT
    assert lab.disp.delete_nodeport(np_, "tcp")
    pkt = in_uplink(lab, cl, NODE_IP, IPPROTO_TCP, 7101, np_)  # a new connection
    res = lab.from_uplink(pkt)
    assert (res.retval, res.data) == (TC_ACT_OK, pkt)


# ---------------------------------------------------------------------------- hostPort
_hostport = itertools.count(54300)  # outside the NodePort range, as hostPorts are


def test_hostport_goes_to_its_pod_keeping_the_client_both_ways(lab: DispLab) -> None:
    """Upstream's HostPort conformance test in the dispatcher: the same
    hostPort, TCP on the node IP for one pod and UDP for another, reached
    from outside: each protocol reaches its own pod on its containerPort, the
    client's address kept (a Local NodePort with one endpoint), and the
    answers leave from node_ip:hostPort. The port is outside the NodePort
    range: a NodePort rule there would go to the host."""
    port = next(_hostport)
    (tcp_pod, tcp_mac), (udp_pod, udp_mac) = lab.pod(), lab.pod()
    lab.disp.set_hostports("c-tcp", [HostPort(NODE_IP, port, "tcp", tcp_pod, 8080, "c-tcp")])
    lab.disp.set_hostports("c-udp", [HostPort(NODE_IP, port, "udp", udp_pod, 8080, "c-udp")])
    cl = counted(_client, "198.51.100.{}")
    drops = lab.drops()
    for proto, pod, mac in ((IPPROTO_TCP, tcp_pod, tcp_mac), (IPPROTO_UDP, udp_pod, udp_mac)):
        before = lab.counters()
        res = lab.from_uplink(in_uplink(lab, cl, NODE_IP, proto, 5100, port))
        assert res.retval == TC_ACT_REDIRECT
        assert tx(before, lab.counters()) == {"uplink": 0, "vxlan": 0, "pods": 1}
        assert_frame(res.data, to_pod(lab, mac, cl, pod, proto, 5100, 8080))
        flags = TCP_SYN | TCP_ACK if proto == IPPROTO_TCP else 0
        res = lab.to_uplink(out_uplink(lab, pod, cl, proto, 8080, 5100, flags))
        assert res.retval == TC_ACT_OK
        assert_frame(res.data, out_uplink(lab, NODE_IP, cl, proto, port, 5100, flags))
    assert lab.drops() == drops
    lab.disp.set_hostports("c-tcp", [])
    lab.disp.set_hostports("c-udp", [])
    pkt = in_uplink(lab, cl, NODE_IP, IPPROTO_TCP, 5101, port)  # a new connection
    res = lab.from_uplink(pkt)
    assert (res.retval, res.data) == (TC_ACT_OK, pkt)  # the host's again


def test_hostport_leaves_the_hosts_own_connections_on_that_port_alone(lab: DispLab) -> None:
    """A hostPort in the ephemeral range: the answer to a connection the node
    made from that port (a SYN-ACK, then data) is no new connection and goes
    to the host, as conntrack keeps it from the portmap plugin's DNAT; a
    client's SYN still goes to the pod, and the rest of its connection
    follows its session."""
    port = next(_hostport)
    pod, mac = lab.pod()
    lab.disp.set_hostports("c-eph", [HostPort(NODE_IP, port, "tcp", pod, 8080, "c-eph")])
    server = counted(_server, "203.0.113.{}")
    for flags in (TCP_SYN | TCP_ACK, TCP_ACK, TCP_FIN | TCP_ACK, TCP_RST):
        pkt = in_uplink(lab, server, NODE_IP, IPPROTO_TCP, 443, port, flags)
        res = lab.from_uplink(pkt)
        assert (res.retval, res.data) == (TC_ACT_OK, pkt)
    cl = counted(_client, "198.51.100.{}")
    for flags in (TCP_SYN, TCP_ACK):
        res = lab.from_uplink(in_uplink(lab, cl, NODE_IP, IPPROTO_TCP, 5400, port, flags))
        assert res.retval == TC_ACT_REDIRECT
        assert_frame(res.data, to_pod(lab, mac, cl, pod, IPPROTO_TCP, 5400, 8080, flags))
    lab.disp.set_hostports("c-eph", [])


@pytest.mark.parametrize("host_ip", ["", "0.0.0.0"])
def test_hostport_without_host_ip_serves_the_node_ip_and_loopback(lab: DispLab,
                                                                  host_ip: str) -> None:
    port = next(_hostport)
    pod, mac = lab.pod()
    lab.disp.set_hostports("c-any", [HostPort(host_ip, port, "tcp", pod, 80, "c-any")])
    svcs = lab.net.rt.table("lb_services", "k8sdispatcher")
    for vip in (NODE_IP, "127.0.0.1"):  # the node's own stack and pods use these
        assert svcs[maps.SvcKey(maps.ip_be(vip), be16(port), IPPROTO_TCP,
                                maps.SVC_INTERNAL)].n_slots == 1
    cl = counted(_client, "198.51.100.{}")
    res = lab.from_uplink(in_uplink(lab, cl, NODE_IP, IPPROTO_TCP, 5200, port))
    assert_frame(res.data, to_pod(lab, mac, cl, pod, IPPROTO_TCP, 5200, 80))
    lab.disp.set_hostports("c-any", [])
    assert lab.disp.hostport_service_keys() == set()
    with pytest.raises(KeyError):
        svcs[maps.SvcKey(maps.ip_be("127.0.0.1"), be16(port), IPPROTO_TCP, maps.SVC_INTERNAL)]


def test_hostport_on_loopback_only_is_not_served_from_outside(lab: DispLab) -> None:
    port = next(_hostport)
    pod, _ = lab.pod()
    lab.disp.set_hostports("c-lo", [HostPort("127.0.0.1", port, "tcp", pod, 8080, "c-lo")])
    cl = counted(_client, "198.51.100.{}")
    pkt = in_uplink(lab, cl, NODE_IP, IPPROTO_TCP, 5300, port)
    drops = lab.drops()
    res = lab.from_uplink(pkt)
    assert (res.retval, res.data) == (TC_ACT_OK, pkt)
    assert lab.drops() == drops
    lab.disp.set_hostports("c-lo", [])


def test_hostport_conflicts_name_the_other_pod_and_change_nothing(lab: DispLab) -> None:
    """Same port and protocol on an overlapping address (no hostIP overlaps
    every one) is taken; another protocol or hostIP is not (the conformance
    test's three pods)."""
    port = next(_hostport)
    pod1, pod2, pod3 = lab.pod()[0], lab.pod()[0], lab.pod()[0]
    lab.disp.set_hostports("c1", [HostPort("127.0.0.1", port, "tcp", pod1, 8080, "c1",
                                           "ns/pod1")])
    lab.disp.set_hostports("c2", [HostPort(NODE_IP, port, "tcp", pod2, 8080, "c2", "ns/pod2")])
    lab.disp.set_hostports("c3", [HostPort(NODE_IP, port, "udp", pod3, 8080, "c3", "ns/pod3")])
    keys = lab.disp.hostport_service_keys()
    for host_ip, taken_by in (("", "ns/pod[12]"), (NODE_IP, "ns/pod2"),
                              ("127.0.0.1", "ns/pod1")):
        with pytest.raises(HostPortConflict, match=f"already taken by pod {taken_by}"):
            lab.disp.set_hostports("c4", [HostPort(host_ip, port, "tcp", pod3, 80, "c4")])
    assert lab.disp.hostport_service_keys() == keys
    lab.disp.set_hostports("c1", [])
    lab.disp.set_hostports("c2", [])
    with pytest.raises(HostPortConflict, match="already taken by pod ns/pod3"):
        lab.disp.set_hostports("c4", [HostPort("", port, "udp", pod1, 80, "c4")])
    lab.disp.set_hostports("c3", [])
    # no hostIP claims every address, loopback ones too (kubelet's scheduler)
    lab.disp.set_hostports("c7", [HostPort("127.0.0.5", port, "tcp", pod1, 80, "c7", "ns/pod7")])
    with pytest.raises(HostPortConflict, match="already taken by pod ns/pod7"):
        lab.disp.set_hostports("c8", [HostPort("0.0.0.0", port, "tcp", pod2, 80, "c8")])
    lab.disp.set_hostports("c7", [])
    np_ = next(_nodeport)
    lab.disp.set_nodeport(np_, "tcp", "Local", [Backend(pod1, 80)])
    with pytest.raises(HostPortConflict, match="is a NodePort"):
        lab.disp.set_hostports("c5", [HostPort("", np_, "tcp", pod1, 80, "c5")])
    assert lab.disp.delete_nodeport(np_, "tcp")
    with pytest.raises(HostPortError, match="not an address pcn serves"):
        lab.disp.set_hostports("c6", [HostPort("192.0.2.1", port, "tcp", pod1, 80, "c6")])
    assert lab.disp.hostport_service_keys() == set()


# ---------------------------------------------------------------------------- host traffic
@pytest.mark.parametrize("what", ["ssh", "vxlan", "unused-nodeport", "ping"])
def test_other_traffic_to_the_node_goes_to_the_host(lab: DispLab, what: str) -> None:
    cl = counted(_client, "198.51.100.{}")
    pkt = {
        "ssh": lambda: in_uplink(lab, cl, NODE_IP, IPPROTO_TCP, 50000, 22),
        "vxlan": lambda: in_uplink(lab, "192.168.50.20", NODE_IP, IPPROTO_UDP, 50001, 4789),
        "unused-nodeport": lambda: in_uplink(lab, cl, NODE_IP, IPPROTO_TCP, 50002, 32767),
        "ping": lambda: in_uplink(lab, cl, NODE_IP, IPPROTO_ICMP, 7, 7),
    }[what]()
    drops, sessions, before = lab.drops(), lab.disp.sessions(), lab.counters()
    res = lab.from_uplink(pkt)
    after = lab.counters()
    assert res.retval == TC_ACT_OK
    assert res.data == pkt
    assert tx(before, after) == {"uplink": 0, "vxlan": 0, "pods": 0}
    assert after["uplink"].drops == before["uplink"].drops
    assert lab.drops() == drops
    assert lab.disp.sessions() == sessions


def test_other_outside_traffic_goes_to_the_host(lab: DispLab) -> None:
    """Neither for the node nor for a pod (e.g. multicast or a stray frame)."""
    pkt = in_uplink(lab, "192.168.50.20", "192.168.50.30", IPPROTO_UDP, 1000, 2000)
    res = lab.from_uplink(pkt)
    assert (res.retval, res.data) == (TC_ACT_OK, pkt)


def test_outside_traffic_to_a_pod_is_routed(lab: DispLab) -> None:
    """Direct routing to a pod address: on to the router, untranslated."""
    pod, pod_mac = lab.pod()
    res = lab.from_uplink(in_uplink(lab, "192.168.50.20", pod, IPPROTO_TCP, 1000, 80))
    assert res.retval == TC_ACT_REDIRECT
    assert_frame(res.data, to_pod(lab, pod_mac, "192.168.50.20", pod, IPPROTO_TCP, 1000, 80))


def test_overlay_traffic_not_for_the_vtep_passes_untranslated(lab: DispLab) -> None:
    pod, pod_mac = lab.pod()
    remote = counted(_remote_pod, "10.244.2.{}")
    pkt = ip_frame(lab.mac("vxlan"), lab.peer_vtep_mac, remote, pod, IPPROTO_UDP, 1000, 2000)
    res = lab.from_overlay(pkt)
    assert res.retval == TC_ACT_REDIRECT
    assert_frame(res.data, ip_frame(pod_mac, lab.mac("pods"), remote, pod, IPPROTO_UDP, 1000,
                                    2000, ttl=63))


def test_arp_passes_on_to_the_router(lab: DispLab) -> None:
    asker_ip, asker_mac = counted(_asker, "192.168.50.{}"), random_mac()
    assert lab.r.neighbor(asker_ip) is None
    req = eth(BROADCAST, asker_mac, ETH_P_ARP, arp(1, asker_mac, asker_ip, "00:00:00:00:00:00",
                                                   NODE_IP))
    drops = lab.drops()
    res = lab.from_uplink(req)
    # The router learned the asker (so the dispatcher let it through) and left
    # the answer to the host, which owns the address.
    assert lab.r.neighbor(asker_ip) == asker_mac
    assert res.retval == TC_ACT_OK
    assert res.data == req
    assert lab.drops() == drops


# ---------------------------------------------------------------------------- fragments
_ident = itertools.count(0x6000)
BIG = bytes(range(256)) * 15 + b"end"  # a 3843-byte payload: three fragments at 1480 bytes


def frag_frames(dst_mac: str, src_mac: str, src: str, dst: str, proto: int, sport: int,
                dport: int, ident: int, ttl: int = 64, reply: bool = False) -> list[bytes]:
    """A big datagram fragmented as its sender would, as frames: a TCP data
    segment, a UDP datagram or an ICMP echo request (a reply when `reply`)
    whose identifier is both ports."""
    if proto == IPPROTO_TCP:
        l4 = tcp(src, dst, sport, dport, TCP_ACK | 0x08, seq=1001, ack=1, data=BIG)
    elif proto == IPPROTO_UDP:
        l4 = udp_csum(src, dst, sport, dport, BIG)
    else:
        assert sport == dport
        l4 = icmp_echo(sport, 1, BIG, kind=0 if reply else 8)
    return [eth(dst_mac, src_mac, ETH_P_IP, p) for p in fragments(src, dst, proto, l4, ident,
                                                                  ttl=ttl)]


def drops_moved(lab: DispLab, before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in lab.drops().items() if v != before.get(k, 0)}


@pytest.mark.parametrize("proto", [IPPROTO_UDP, IPPROTO_TCP, IPPROTO_ICMP],
                         ids=["udp", "tcp", "icmp-echo"])
def test_a_fragmented_datagram_is_masqueraded_whole_both_ways(lab: DispLab, proto: int) -> None:
    """Every fragment of a pod's big datagram leaves with the node's address
    (only the first has the port to translate), and every fragment of the
    answer reaches the pod."""
    pod, pod_mac = lab.pod()
    server = counted(_server, "203.0.113.{}")
    sport, dport = (0x5151, 0x5151) if proto == IPPROTO_ICMP else (40001, 443)
    ident = next(_ident)
    drops = lab.drops()
    results = [lab.to_uplink(f) for f in frag_frames(lab.gw_mac, lab.mac("uplink"), pod, server,
                                                     proto, sport, dport, ident, ttl=63)]
    assert [r.retval for r in results] == [TC_ACT_OK] * 3
    ip, port = src_of(results[0])
    assert ip == NODE_IP and SNAT_LO <= port <= SNAT_HI
    node_dport = port if proto == IPPROTO_ICMP else dport
    assert_fragments([r.data for r in results],
                     frag_frames(lab.gw_mac, lab.mac("uplink"), NODE_IP, server, proto, port,
                                 node_dport, ident, ttl=63))

    ident = next(_ident)
    before = lab.counters()
    results = [lab.from_uplink(f) for f in frag_frames(lab.mac("uplink"), lab.gw_mac, server,
                                                       NODE_IP, proto, node_dport, port, ident,
                                                       reply=True)]
    assert [r.retval for r in results] == [TC_ACT_REDIRECT] * 3
    assert tx(before, lab.counters()) == {"uplink": 0, "vxlan": 0, "pods": 3}
    assert_fragments([r.data for r in results],
                     frag_frames(pod_mac, lab.mac("pods"), server, pod, proto, dport, sport,
                                 ident, ttl=63, reply=True))
    assert lab.drops() == drops


def test_a_fragmented_datagram_to_a_local_nodeport_goes_whole_both_ways(lab: DispLab) -> None:
    np_ = next(_nodeport)
    backend, backend_mac = lab.pod()
    lab.disp.set_nodeport(np_, "udp", "Local", [Backend(backend, 8080)])
    cl = counted(_client, "198.51.100.{}")
    ident = next(_ident)
    results = [lab.from_uplink(f) for f in frag_frames(lab.mac("uplink"), lab.gw_mac, cl,
                                                       NODE_IP, IPPROTO_UDP, 5700, np_, ident)]
    assert [r.retval for r in results] == [TC_ACT_REDIRECT] * 3
    assert_fragments([r.data for r in results],
                     frag_frames(backend_mac, lab.mac("pods"), cl, backend, IPPROTO_UDP, 5700,
                                 8080, ident, ttl=63))
    ident = next(_ident)
    results = [lab.to_uplink(f) for f in frag_frames(lab.gw_mac, lab.mac("uplink"), backend, cl,
                                                     IPPROTO_UDP, 8080, 5700, ident, ttl=63)]
    assert [r.retval for r in results] == [TC_ACT_OK] * 3
    assert_fragments([r.data for r in results],
                     frag_frames(lab.gw_mac, lab.mac("uplink"), NODE_IP, cl, IPPROTO_UDP, np_,
                                 5700, ident, ttl=63))


def test_a_fragmented_datagram_to_a_cluster_nodeport_crosses_the_overlay_whole(
        lab: DispLab) -> None:
    """Two rewrites per fragment (to the remote backend, from our VTEP), and
    two back for the answer arriving over the overlay."""
    np_ = next(_nodeport)
    remote = counted(_remote_pod, "10.244.2.{}")
    lab.disp.set_nodeport(np_, "udp", "Cluster", [Backend(remote, 8080)])
    cl = counted(_client, "198.51.100.{}")
    ident = next(_ident)
    results = [lab.from_uplink(f) for f in frag_frames(lab.mac("uplink"), lab.gw_mac, cl,
                                                       NODE_IP, IPPROTO_UDP, 5800, np_, ident)]
    assert [r.retval for r in results] == [TC_ACT_REDIRECT] * 3
    vtep_ip, vport = src_of(results[0])
    assert vtep_ip == VTEP
    assert_fragments([r.data for r in results],
                     frag_frames(lab.peer_vtep_mac, lab.mac("vxlan"), VTEP, remote, IPPROTO_UDP,
                                 vport, 8080, ident, ttl=63))
    ident = next(_ident)
    results = [lab.from_overlay(f) for f in frag_frames(lab.mac("vxlan"), lab.peer_vtep_mac,
                                                        remote, VTEP, IPPROTO_UDP, 8080, vport,
                                                        ident)]
    assert [r.retval for r in results] == [TC_ACT_REDIRECT] * 3
    assert_fragments([r.data for r in results],
                     frag_frames(lab.gw_mac, lab.mac("uplink"), NODE_IP, cl, IPPROTO_UDP, np_,
                                 5800, ident, ttl=63))


def test_pod_fragments_that_cannot_be_masqueraded_never_leave(lab: DispLab) -> None:
    """A later fragment before its first (or of a datagram whose first one
    was never masqueraded) and a tiny first fragment are dropped: none leaves
    with the pod's address."""
    pod, _ = lab.pod()
    server = counted(_server, "203.0.113.{}")
    first, middle, last = frag_frames(lab.gw_mac, lab.mac("uplink"), pod, server, IPPROTO_UDP,
                                      40002, 53, next(_ident), ttl=63)
    drops = lab.drops()
    assert lab.to_uplink(middle).retval == TC_ACT_SHOT
    assert drops_moved(lab, drops) == {"fragment": 1}
    assert [lab.to_uplink(f).retval for f in (first, last, middle)] == [TC_ACT_OK] * 3
    syn = tcp(pod, server, 40003, 443)
    tiny = [eth(lab.gw_mac, lab.mac("uplink"), ETH_P_IP, p, pad=False)
            for p in fragments(pod, server, IPPROTO_TCP, syn, next(_ident), 8, ttl=63)]
    assert [lab.to_uplink(f).retval for f in tiny[:2]] == [TC_ACT_SHOT] * 2
    assert drops_moved(lab, drops) == {"fragment": 3}
    # a later fragment overlapping the TCP header of a masqueraded first one
    seg = tcp(pod, server, 40008, 443, TCP_ACK, data=b"q" * 40)
    ident = next(_ident)

    def piece(chunk: bytes, offset: int, more: bool) -> bytes:
        return eth(lab.gw_mac, lab.mac("uplink"), ETH_P_IP,
                   ipv4_fragment(pod, server, IPPROTO_TCP, chunk, offset, more, ident, ttl=63))

    assert lab.to_uplink(piece(seg[:24], 0, True)).retval == TC_ACT_OK
    assert lab.to_uplink(piece(seg[16:24], 16, True)).retval == TC_ACT_SHOT
    assert drops_moved(lab, drops) == {"fragment": 4}
    res = lab.to_uplink(piece(seg[24:], 24, False))
    assert res.retval == TC_ACT_OK and parse_eth(res.data).payload[12:16] == \
        bytes(map(int, NODE_IP.split(".")))


def ip_proto_frame(lab: DispLab, src: str, dst: str, proto: int, payload: bytes) -> bytes:
    return eth(lab.gw_mac, lab.mac("uplink"), ETH_P_IP, ipv4(src, dst, proto, payload, ttl=63))


GRE = 47
GRE_PAYLOAD = bytes.fromhex("00000800") + b"\x45" + bytes(27)  # a GRE header and a bit of IPv4


@pytest.mark.parametrize("what", ["gre", "sctp", "icmp-error-about-no-flow",
                                  "icmp-address-mask", "truncated-tcp"])
def test_pod_traffic_that_cannot_be_masqueraded_never_leaves(lab: DispLab, what: str) -> None:
    """No ports to give the node's (GRE), a checksum tc cannot redo over new
    ports (SCTP's CRC32c), an error about no connection we translated, a
    query without identifier, a header cut short: dropped and counted,
    instead of leaving with the pod's own address."""
    pod, _ = lab.pod()
    server = counted(_server, "203.0.113.{}")
    pkt = {
        "gre": lambda: ip_proto_frame(lab, pod, server, GRE, GRE_PAYLOAD),
        "sctp": lambda: ip_proto_frame(lab, pod, server, IPPROTO_SCTP,
                                       struct.pack("!HHII", 40004, 80, 1, 0)),
        "icmp-error-about-no-flow": lambda: ip_proto_frame(
            lab, pod, server, IPPROTO_ICMP,
            icmp_error(3, 3, quote_of(in_uplink(lab, server, pod, IPPROTO_UDP, 53, 40005)))),
        "icmp-address-mask": lambda: ip_proto_frame(lab, pod, server, IPPROTO_ICMP,
                                                    icmp_echo(7, 1, bytes(4), kind=17)),
        "truncated-tcp": lambda: ip_proto_frame(lab, pod, server, IPPROTO_TCP,
                                                tcp(pod, server, 40006, 443)[:12]),
    }[what]()
    drops, sessions = lab.drops(), lab.disp.sessions()
    res = lab.to_uplink(pkt)
    assert res.retval == TC_ACT_SHOT
    assert drops_moved(lab, drops) == {"parse" if what == "truncated-tcp" else "no_masquerade": 1}
    assert lab.disp.sessions() == sessions


@pytest.mark.parametrize("src,dst", [(NODE_IP, "203.0.113.250"), ("pod", "10.244.2.77")],
                         ids=["from-the-node", "pod-to-remote-pod"])
def test_traffic_that_needs_no_masquerade_leaves_as_it_is(lab: DispLab, src: str,
                                                          dst: str) -> None:
    """The guarantee is about pods masqueraded to the outside: the node's own
    GRE and fragments, or a pod's to another pod, are not touched."""
    if src == "pod":
        src, _ = lab.pod()
    drops = lab.drops()
    frames = [ip_proto_frame(lab, src, dst, GRE, GRE_PAYLOAD)]
    frames += frag_frames(lab.gw_mac, lab.mac("uplink"), src, dst, IPPROTO_UDP, 40007, 53,
                          next(_ident), ttl=63)[1:]  # later fragments alone
    results = [lab.to_uplink(f) for f in frames]
    assert [(r.retval, r.data) for r in results] == [(TC_ACT_OK, f) for f in frames]
    assert lab.drops() == drops


def test_icmp_timestamp_is_masqueraded_by_identifier(lab: DispLab) -> None:
    """Like echo, a timestamp query carries an identifier where the echo
    header does: the query leaves as the node, its reply finds the pod."""
    pod, pod_mac = lab.pod()
    server = counted(_server, "203.0.113.{}")
    stamps = struct.pack("!III", 1, 0, 0)
    res = lab.to_uplink(ip_proto_frame(lab, pod, server, IPPROTO_ICMP,
                                       icmp_echo(0x6161, 1, stamps, kind=13)))
    assert res.retval == TC_ACT_OK
    ip, ident = src_of(res)
    assert ip == NODE_IP and SNAT_LO <= ident <= SNAT_HI
    assert_frame(res.data, ip_proto_frame(lab, NODE_IP, server, IPPROTO_ICMP,
                                          icmp_echo(ident, 1, stamps, kind=13)))
    answer = struct.pack("!III", 1, 2, 3)
    res = lab.from_uplink(eth(lab.mac("uplink"), lab.gw_mac, ETH_P_IP,
                              ipv4(server, NODE_IP, IPPROTO_ICMP,
                                   icmp_echo(ident, 1, answer, kind=14))))
    assert res.retval == TC_ACT_REDIRECT
    assert_frame(res.data, eth(pod_mac, lab.mac("pods"), ETH_P_IP,
                               ipv4(server, pod, IPPROTO_ICMP,
                                    icmp_echo(0x6161, 1, answer, kind=14), ttl=63)))
    # an error about the query quotes it as it left; the pod gets it as it sent it
    quote = quote_of(ip_proto_frame(lab, NODE_IP, server, IPPROTO_ICMP,
                                    icmp_echo(ident, 1, stamps, kind=13)))
    res = lab.from_uplink(error_frame(lab.mac("uplink"), lab.gw_mac, "192.0.2.78", NODE_IP,
                                      icmp_error(3, 1, quote)))
    assert res.retval == TC_ACT_REDIRECT
    assert_frame(res.data, error_frame(pod_mac, lab.mac("pods"), "192.0.2.78", pod,
                                       icmp_error(3, 1, requote(quote, src=pod, sport=0x6161)),
                                       ttl=63))


def test_fragments_for_the_host_go_to_the_host(lab: DispLab) -> None:
    """Later fragments of no datagram we translated are the host's: untouched.
    A tiny first fragment to the node is dropped (RFC 1858: no sender makes
    one, and its port cannot be judged)."""
    cl = counted(_client, "198.51.100.{}")
    frames = frag_frames(lab.mac("uplink"), lab.gw_mac, cl, NODE_IP, IPPROTO_UDP, 5900, 9999,
                         next(_ident))
    drops, sessions = lab.drops(), lab.disp.sessions()
    results = [lab.from_uplink(f) for f in frames[1:] + frames[:1]]
    assert [(r.retval, r.data) for r in results] == [(TC_ACT_OK, f)
                                                     for f in frames[1:] + frames[:1]]
    assert (lab.drops(), lab.disp.sessions()) == (drops, sessions)
    tiny = eth(lab.mac("uplink"), lab.gw_mac, ETH_P_IP,
               fragments(cl, NODE_IP, IPPROTO_TCP, tcp(cl, NODE_IP, 5901, 22), next(_ident),
                         8)[0], pad=False)
    assert lab.from_uplink(tiny).retval == TC_ACT_SHOT
    assert drops_moved(lab, drops) == {"fragment": 1}


# ---------------------------------------------------------------------------- session lifetimes
def nat_table(lab: DispLab) -> maps.BpfTable:
    return lab.net.rt.table("nat_sessions", "k8sdispatcher")


def nat_keys(lab: DispLab, *addrs: str) -> list[maps.Flow]:
    """The nat_sessions keys with one of `addrs` as source or destination."""
    want = {maps.ip_be(a) for a in addrs}
    return [k for k, _ in nat_table(lab).items() if k.saddr in want or k.daddr in want]


@dataclass
class FullPorts:
    """All 16 ports towards one peer held by connections that ended one way."""

    peer: str
    flows: list[tuple[str, int]]  # who (pod or client), its port
    connect: Callable[[int], TestRunResult]  # a new connection's first packet (TCP flags)
    reply: Callable[[int], TestRunResult]  # the peer's SYN-ACK on a port
    late: str  # who connects
    late_mac: str


def fill_ports(lab: DispLab, path: str, closing: str) -> FullPorts:
    """16 connections, answered then ended as `closing` says: "client-fin"
    (only the side that opened closed: FIN_WAIT), "both-fin" (and the last
    FIN acknowledged: TIME_WAIT), "both-fin-unacked" (LAST_ACK) or "reset"
    (CLOSE). `path`: masquerading a pod, or a NodePort (Cluster
    policy) whose remote backend is reached from our VTEP address."""
    ends = {"client-fin": [(True, TCP_FIN | TCP_ACK)],
            "both-fin": [(True, TCP_FIN | TCP_ACK), (False, TCP_FIN | TCP_ACK), (True, TCP_ACK)],
            "both-fin-unacked": [(True, TCP_FIN | TCP_ACK), (False, TCP_FIN | TCP_ACK)],
            "reset": [(False, TCP_RST | TCP_ACK)]}[closing]
    steps = [(False, TCP_SYN | TCP_ACK), *ends]
    flows = []
    if path == "masquerade":
        peer = counted(_server, "203.0.113.{}")
        for _ in range(SNAT_HI - SNAT_LO + 1):
            pod, _mac = lab.pod()
            port = masquerade(lab, pod, peer, sport=33333, dport=80)
            for opener, flags in steps:
                res = (lab.to_uplink(out_uplink(lab, pod, peer, IPPROTO_TCP, 33333, 80, flags))
                       if opener else
                       lab.from_uplink(in_uplink(lab, peer, NODE_IP, IPPROTO_TCP, 80, port, flags)))
                assert res.retval in (TC_ACT_OK, TC_ACT_REDIRECT)
            flows.append((pod, port))
        late, late_mac = lab.pod()
        return FullPorts(
            peer, flows,
            lambda flags: lab.to_uplink(out_uplink(lab, late, peer, IPPROTO_TCP, 33333, 80, flags)),
            lambda port: lab.from_uplink(in_uplink(lab, peer, NODE_IP, IPPROTO_TCP, 80, port,
                                                   TCP_SYN | TCP_ACK)),
            late, late_mac)
    np_, peer = next(_nodeport), counted(_remote_pod, "10.244.2.{}")
    lab.disp.set_nodeport(np_, "tcp", "Cluster", [Backend(peer, 8080)])
    for _ in range(SNAT_HI - SNAT_LO + 1):
        cl = counted(_client, "198.51.100.{}")
        res = lab.from_uplink(in_uplink(lab, cl, NODE_IP, IPPROTO_TCP, 5000, np_))
        vtep, vport = src_of(res)
        assert (res.retval, vtep, parse_ipv4(parse_eth(res.data).payload).dst) == \
            (TC_ACT_REDIRECT, VTEP, peer)
        for opener, flags in steps:
            res = (lab.from_uplink(in_uplink(lab, cl, NODE_IP, IPPROTO_TCP, 5000, np_, flags))
                   if opener else
                   lab.from_overlay(ip_frame(lab.mac("vxlan"), lab.peer_vtep_mac, peer, VTEP,
                                             IPPROTO_TCP, 8080, vport, flags)))
            assert res.retval == TC_ACT_REDIRECT
        flows.append((cl, vport))
    late = counted(_client, "198.51.100.{}")
    return FullPorts(
        peer, flows,
        lambda flags: lab.from_uplink(in_uplink(lab, late, NODE_IP, IPPROTO_TCP, 5000, np_,
                                                flags)),
        lambda port: lab.from_overlay(ip_frame(lab.mac("vxlan"), lab.peer_vtep_mac, peer, VTEP,
                                               IPPROTO_TCP, 8080, port, TCP_SYN | TCP_ACK)),
        late, "")


def assert_new_connection_owns(lab: DispLab, full: FullPorts, path: str,
                               res: TestRunResult) -> int:
    """`res` (the new connection's first packet) left with one of the full
    ports, and the peer's answer on it reaches the new connection."""
    assert res.retval in (TC_ACT_OK, TC_ACT_REDIRECT)
    port = src_of(res)[1]
    assert port in {p for _, p in full.flows}
    reply = full.reply(port)
    assert reply.retval == TC_ACT_REDIRECT
    if path == "masquerade":
        assert_frame(reply.data, to_pod(lab, full.late_mac, full.peer, full.late, IPPROTO_TCP,
                                        80, 33333, TCP_SYN | TCP_ACK))
    else:
        np_ = l4_ports(parse_ipv4(parse_eth(reply.data).payload)).sport
        assert_frame(reply.data, out_uplink(lab, NODE_IP, full.late, IPPROTO_TCP, np_, 5000,
                                            TCP_SYN | TCP_ACK))
    return port


PATHS = ["masquerade", "nodeport-cluster"]


@pytest.mark.parametrize("closing", ["client-fin", "both-fin-unacked"])
@pytest.mark.parametrize("path", PATHS)
def test_port_of_a_connection_that_is_over_is_reused(lab: DispLab, path: str,
                                                     closing: str) -> None:
    """The 16 ports towards one peer are held by connections that the client
    closed (FIN_WAIT: 120 s), or both sides but the last FIN is still to be
    acknowledged (LAST_ACK, as long as TIME_WAIT): a 17th connection gets
    none. Once that lifetime has passed the ports are free again, as
    conntrack frees the tuples of expired connections: the next connection
    takes one over, and the peer's answers on that port reach it."""
    full = fill_ports(lab, path, closing)
    assert sorted(p for _, p in full.flows) == list(range(SNAT_LO, SNAT_HI + 1))
    ours = nat_keys(lab, full.peer, *(who for who, _ in full.flows))
    assert len(ours) == 2 * len(full.flows)
    want = State.FIN_WAIT if closing == "client-fin" else State.LAST_ACK
    assert {nat_table(lab)[k].state for k in ours} == {want}

    drops = lab.drops()
    assert full.connect(TCP_SYN).retval == TC_ACT_SHOT  # within the lifetime
    assert lab.drops().get("nat_exhausted", 0) == drops.get("nat_exhausted", 0) + 1

    age_sessions(nat_table(lab), ours, 120 + 1)
    port = assert_new_connection_owns(lab, full, path, full.connect(TCP_SYN))
    old = next(who for who, p in full.flows if p == port)
    if path == "masquerade":  # the old pod's late packet is a new connection, on another port
        again = lab.to_uplink(out_uplink(lab, old, full.peer, IPPROTO_TCP, 33333, 80, TCP_ACK))
        assert again.retval == TC_ACT_OK and src_of(again)[1] != port


@pytest.mark.parametrize("closing", ["both-fin", "reset"])
@pytest.mark.parametrize("path", PATHS)
def test_a_new_connection_takes_the_port_of_a_closed_one_when_none_is_left(
        lab: DispLab, path: str, closing: str) -> None:
    """All 16 ports held by connections that both sides closed (TIME_WAIT) or
    that were reset (CLOSE): a new TCP connection gets one at once, as
    Linux's NAT evicts closed connections in its last attempts; anything but
    a SYN does not, and neither would the port of a connection still open."""
    full = fill_ports(lab, path, closing)
    ours = nat_keys(lab, full.peer, *(who for who, _ in full.flows))
    want = State.TIME_WAIT if closing == "both-fin" else State.CLOSE
    assert {nat_table(lab)[k].state for k in ours} == {want}
    drops = lab.drops()
    assert full.connect(TCP_ACK).retval == TC_ACT_SHOT  # picked up mid-way: not a new connection
    assert lab.drops().get("nat_exhausted", 0) == drops.get("nat_exhausted", 0) + 1
    port = assert_new_connection_owns(lab, full, path, full.connect(TCP_SYN))
    old = next(who for who, p in full.flows if p == port)
    assert nat_keys(lab, old) == []  # the old connection went, both ways
    everyone = [full.late, *(who for who, _ in full.flows)]
    assert len(nat_keys(lab, full.peer, *everyone)) == 2 * len(full.flows)


@pytest.mark.parametrize("past", [1, 6], ids=["within-grace", "past-grace"])
def test_ports_past_the_grace_belong_to_the_collector(lab: DispLab, past: int) -> None:
    """With a collector running (a 5 s grace), the data path takes over a
    port at most 5 s past its connection's lifetime; later, the entry is
    the collector's alone (so that it never deletes what the data path has
    just given to a new connection): the port is free once collected."""
    cfg = lab.net.rt.table("session_cfg", "k8sdispatcher")
    write_config(cfg, SessionTimeouts(), grace_s=5)
    try:
        server = counted(_server, "203.0.113.{}")
        for _ in range(SNAT_HI - SNAT_LO + 1):  # unreplied UDP: 30 s
            masquerade(lab, lab.pod()[0], server, IPPROTO_UDP, sport=5353, dport=53)
        late, _ = lab.pod()
        ours = nat_keys(lab, server)
        assert len(ours) == 2 * (SNAT_HI - SNAT_LO + 1)
        age_sessions(nat_table(lab), ours, 30 + past)
        pkt = out_uplink(lab, late, server, IPPROTO_UDP, 5353, 53)
        if past == 1:
            assert lab.to_uplink(pkt).retval == TC_ACT_OK
            return
        assert lab.to_uplink(pkt).retval == TC_ACT_SHOT
        collected = SessionCollector({"nat_sessions": nat_table(lab)}, SessionTimeouts(),
                                     grace_s=5).collect()
        assert collected.deleted["nat_sessions"] >= len(ours)
        assert nat_keys(lab, server) == []  # both directions of every connection
        assert lab.to_uplink(pkt).retval == TC_ACT_OK
    finally:
        cfg[ct.c_uint32(0)] = maps.SessionCfg()  # the defaults, no grace


@contextmanager
def snat_ports(lab: DispLab, lo: int, hi: int) -> Iterator[None]:
    """The dispatcher masquerades to ports lo-hi while the body runs."""
    lab.disp.cfg = replace(CFG, snat_range=(lo, hi))
    lab.disp.configure(lab.ports["uplink"].id, lab.ports["vxlan"].id)
    try:
        yield
    finally:
        lab.disp.cfg = CFG
        lab.disp.configure(lab.ports["uplink"].id, lab.ports["vxlan"].id)


def hold_ports(lab: DispLab, server: str, ports: list[int], seen_ns: int) -> None:
    """The masquerading `ports` towards `server`:80 held by established
    connections of other pods, their last packet at `seen_ns`."""
    table = nat_table(lab)
    for port in ports:
        table[maps.Flow(maps.ip_be(server), maps.ip_be(NODE_IP), be16(80), be16(port),
                        IPPROTO_TCP)] = maps.Xlate(
            ip=maps.ip_be(lab.pod()[0]), port=be16(33333), is_src=0, kind=4,
            state=State.ESTABLISHED, seen_ns=seen_ns)


@pytest.mark.parametrize("held_by", ["open", "uncollected"])
def test_the_harder_tries_are_ports_not_tried_yet(lab: DispLab, held_by: str) -> None:
    """A connection's first 16 ports of a wider range held by connections
    still open, or by connections past their lifetime and the grace that
    the collector has yet to remove (it lags behind on a busy node): neither
    may be taken, so trying those ports again harder would fail the same
    way. The harder tries go on to ports not tried yet; the first is free."""
    lo, hi = 61100, 61163
    pod, _ = lab.pod()
    server = counted(_server, "203.0.113.{}")
    tries = port_tries(flow_hash(pod, server, 33333, 80, IPPROTO_TCP), lo, hi)
    assert len(set(tries)) == PORT_TRIES + PORT_HARDER
    cfg = lab.net.rt.table("session_cfg", "k8sdispatcher")
    write_config(cfg, SessionTimeouts(), grace_s=5)
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    past = {"open": 0, "uncollected": (86400 + 5 + 1) * 1_000_000_000}[held_by]
    try:
        hold_ports(lab, server, tries[:PORT_TRIES], now - past)
        with snat_ports(lab, lo, hi):
            res = lab.to_uplink(out_uplink(lab, pod, server, IPPROTO_TCP, 33333, 80))
        assert res.retval == TC_ACT_OK
        assert src_of(res) == (NODE_IP, tries[PORT_TRIES])
    finally:
        cfg[ct.c_uint32(0)] = maps.SessionCfg()  # the defaults, no grace


def test_a_range_that_is_a_multiple_of_the_step_is_gone_through(lab: DispLab) -> None:
    """7 919 ports (the tries' step): each try is still another port (a
    step of 7 919 would try the first one 20 times)."""
    lo, hi = 50000, 50000 + 7919 - 1
    pod, _ = lab.pod()
    server = counted(_server, "203.0.113.{}")
    tries = port_tries(flow_hash(pod, server, 33333, 80, IPPROTO_TCP), lo, hi)
    hold_ports(lab, server, tries[:1], time.clock_gettime_ns(time.CLOCK_MONOTONIC))
    with snat_ports(lab, lo, hi):
        res = lab.to_uplink(out_uplink(lab, pod, server, IPPROTO_TCP, 33333, 80))
    assert res.retval == TC_ACT_OK
    assert src_of(res) == (NODE_IP, tries[1])


def test_a_flow_whose_hash_is_near_the_top_goes_through_a_small_range(lab: DispLab) -> None:
    """17 ports (fewer than the tries, not a power of two) and a flow whose
    hash plus a few steps passes 2**32: its tries still go through every
    port (a 32-bit sum would wrap, repeat ports and miss others). All but
    one that a wrapping sum misses are held: the flow gets that one."""
    lo, hi = 61200, 61216
    pod, _ = lab.pod()
    found = None
    for _ in range(20):  # a server with a source port whose hash wraps early
        server = counted(_server, "203.0.113.{}")
        found = port_missed_by_a_wrapping_sum(pod, server, 80, lo, hi)
        if found:
            break
    assert found is not None
    sport, missed = found
    assert set(port_tries(flow_hash(pod, server, sport, 80, IPPROTO_TCP), lo, hi)) == \
        set(range(lo, hi + 1))
    hold_ports(lab, server, [p for p in range(lo, hi + 1) if p != missed],
               time.clock_gettime_ns(time.CLOCK_MONOTONIC))
    with snat_ports(lab, lo, hi):
        res = lab.to_uplink(out_uplink(lab, pod, server, IPPROTO_TCP, sport, 80))
    assert res.retval == TC_ACT_OK
    assert src_of(res) == (NODE_IP, missed)


def test_expired_nodeport_session_is_forgotten(lab: DispLab) -> None:
    """A client's NodePort connection that never got past its SYN (120 s) is
    over: its next packet is a new connection with a fresh backend."""
    np_ = next(_nodeport)
    (a, a_mac), (b, b_mac) = lab.pod(), lab.pod()
    lab.disp.set_nodeport(np_, "tcp", "Local", [Backend(a, 8080)])
    cl = counted(_client, "198.51.100.{}")
    assert lab.from_uplink(in_uplink(lab, cl, NODE_IP, IPPROTO_TCP, 5400, np_)).retval == \
        TC_ACT_REDIRECT
    lab.disp.set_nodeport(np_, "tcp", "Local", [Backend(b, 8080)])
    ack = in_uplink(lab, cl, NODE_IP, IPPROTO_TCP, 5400, np_, TCP_ACK)
    assert_frame(lab.from_uplink(ack).data, to_pod(lab, a_mac, cl, a, IPPROTO_TCP, 5400, 8080,
                                                  TCP_ACK))
    age_sessions(nat_table(lab), nat_keys(lab, cl), 120 + 1)
    assert_frame(lab.from_uplink(ack).data, to_pod(lab, b_mac, cl, b, IPPROTO_TCP, 5400, 8080,
                                                  TCP_ACK))


def test_icmp_error_about_an_expired_masqueraded_flow_goes_to_the_host(lab: DispLab) -> None:
    pod, _ = lab.pod()
    server = counted(_server, "203.0.113.{}")
    port = masquerade(lab, pod, server, IPPROTO_UDP)
    quote = quote_of(out_uplink(lab, NODE_IP, server, IPPROTO_UDP, port, 443))
    frame = error_frame(lab.mac("uplink"), lab.gw_mac, server, NODE_IP, icmp_error(3, 3, quote))
    age_sessions(nat_table(lab), nat_keys(lab, server), 30 + 1)
    res = lab.from_uplink(frame)
    assert (res.retval, res.data) == (TC_ACT_OK, frame)
