"""Generated frames through a node's cubes (BPF_PROG_TEST_RUN), against the
invariants every cube must keep whatever arrives:

- the entry programs answer only TC_ACT_OK, TC_ACT_SHOT or TC_ACT_REDIRECT;
- a rewritten packet keeps every checksum that was right when it came in
  (IPv4 header, TCP/UDP over the pseudo header, ICMP);
- nothing leaves the node through its NIC with a pod source address towards
  a destination outside the cluster (pod traffic to the outside is
  masqueraded, or dropped when it cannot be);
- a frame that came in through the NIC never goes back out of it, but as
  the ICMP "fragmentation needed" a router owes a DF packet too big for its
  next hop (then from the NIC's address, with every checksum right).

Topology, as a node stacks it (see test_bpf_dispatcher.py): router `r` with
ports `uplink` (the NIC, u1, host-shared, dispatcher on ingress and egress),
`vxlan` (u2, dispatcher on ingress) and `pods` (u3, standing in for the bridge
with the pods behind it: lbrp, a firewall and the policy cube stacked on both
hooks, as on a pod's port). A ClusterIP, a NodePort (Cluster and Local), a
firewall with port rules and a network policy (tiers, ports, a named port,
isolation one way) are configured. Frames are built from fields (addresses the node
knows and does not, every protocol pcn handles and some it does not, TCP
flags, ICMP errors quoting anything, IP options, fragments) and then mutated
(truncated, lengths and header lengths lied about, a VLAN tag inserted).

Bounded: a fixed number of examples per path from a fixed seed (the same
frames every run, so CI cannot flake on a new draw); raise FUZZ_EXAMPLES
to explore more.
"""

from __future__ import annotations

import ipaddress
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from bpfunit import (
    ETH_P_IP,
    IPPROTO_ICMP,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    UnitNet,
    eth,
    inet_csum,
    pseudo_header,
    random_mac,
    unit_net,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pcn_agent.dataplane import maps
from pcn_agent.dataplane.cubes.dispatcher import Dispatcher, DispatcherConfig
from pcn_agent.dataplane.cubes.firewall import Firewall
from pcn_agent.dataplane.cubes.lbrp import Backend, LoadBalancer
from pcn_agent.dataplane.cubes.policy import PolicyCube
from pcn_agent.dataplane.cubes.router import Router
from pcn_agent.dataplane.runtime import PortCounters, PortState
from pcn_crds.rules import parse_rule
from pcn_policy.rules import (
    Action,
    AddressSet,
    DirectionPolicy,
    PodPolicy,
    PortMatch,
    Rule,
    SetEntry,
)
from pcn_testsupport.testrun import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TestRunResult

pytestmark = [pytest.mark.bpf,
              pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning")]

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
NODE_IP, GATEWAY = "192.168.60.10", "192.168.60.1"
VTEP, PEER_VTEP = "10.251.0.1", "10.251.0.2"
POD, POD2, REMOTE_POD = "10.244.1.10", "10.244.1.11", "10.244.2.10"
CLUSTER_PODS = ipaddress.IPv4Network("10.244.0.0/16")
# Destinations pod traffic reaches unmasqueraded (DispatcherConfig.no_snat)
NO_SNAT = [ipaddress.IPv4Network(n) for n in ("10.244.0.0/16", "10.96.0.0/12", "10.251.0.0/24")]
VIP, NODEPORT, NODEPORT_LOCAL = "10.96.0.10", 30080, 30081
OUTSIDE = "203.0.113.7"
CFG = DispatcherConfig(
    node_ip=NODE_IP, vtep_ip=VTEP, local_pods="10.244.1.0/24",
    pod_networks=("10.244.0.0/16",),
    no_snat=("10.244.0.0/16", "10.96.0.0/12", "10.251.0.0/24"),
    nodeport_range=(30000, 32767), snat_range=(61000, 61015))
ALLOWED_RETVALS = {TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT}
TINY_MTU = 68  # the least IPv4 MTU (RFC 791): most generated frames are too big for it


@dataclass
class Node:
    net: UnitNet
    ports: dict[str, PortState]
    gw_mac: str
    pod_mac: str
    router: Router

    def run(self, prog: str, ifname: str, frame: bytes) -> TestRunResult:
        return self.net.run(self.net.rt._entry_fds[prog], frame, ifindex=self.net.ifindex[ifname])

    def tx(self) -> dict[str, int]:
        c: dict[str, PortCounters] = {n: self.net.rt.port_counters(p)
                                      for n, p in self.ports.items()}
        return {n: v.tx_packets for n, v in c.items()}


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    with unit_net(veths=3) as net:
        rt = net.rt
        r = Router(rt, "r")
        up = r.add_port("uplink", f"{NODE_IP}/24", flags=maps.PORT_HOST_SHARED)
        vx = r.add_port("vxlan", f"{VTEP}/24")
        pods = r.add_port("pods", "10.244.1.1/24")
        r.add_route("0.0.0.0/0", "uplink", nexthop=GATEWAY)
        r.add_route("10.244.2.0/24", "vxlan", nexthop=PEER_VTEP)
        r.add_unreachable("10.244.0.0/16")  # the node's guard (NodeDataplane)
        lb = LoadBalancer(rt, "lb")
        disp = Dispatcher(rt, "k8s", lb.services, CFG)
        disp.configure(up.id, vx.id)
        Firewall(rt, "fw", [parse_rule(t) for t in (
            "drop tcp dport 22", "allow udp dport 53", "drop from 10.244.9.0/24",
            "allow tcp sport 1000-2000 dport 80")], "allow")
        stack = [rt.stacked("k8s")]
        rt.set_hook(up, maps.HOOK_INGRESS, stack)
        rt.set_hook(up, maps.HOOK_EGRESS, stack)
        rt.set_hook(vx, maps.HOOK_INGRESS, stack)
        pol = PolicyCube(rt, "pol")
        pol.configure([NODE_IP])
        pol.set_address_sets([
            AddressSet("pods", frozenset({SetEntry("10.244.0.0/16")})),
            AddressSet("web", frozenset({SetEntry(f"{POD2}/32", IPPROTO_TCP, 8080)})),
            AddressSet("outside", frozenset({SetEntry("0.0.0.0/1"), SetEntry("128.0.0.0/2")}))])
        pol.set_pod(pods.id, PodPolicy(
            DirectionPolicy((Rule("outside", (PortMatch(IPPROTO_TCP, 22, 22),),
                                  action=Action.DENY),),
                            (Rule("pods", (PortMatch(IPPROTO_TCP, 8000, 8080),
                                           PortMatch(IPPROTO_UDP, 53, 53))),), True),
            DirectionPolicy((Rule("pods", action=Action.PASS),),
                            (Rule("web", named_port=True),), False, (),
                            (Rule("outside", (PortMatch(IPPROTO_UDP),), action=Action.DENY),))))
        rt.set_hook(pods, maps.HOOK_INGRESS,
                    [rt.stacked("lb"), rt.stacked("fw"), rt.stacked("pol")])
        rt.set_hook(pods, maps.HOOK_EGRESS,
                    [rt.stacked("pol"), rt.stacked("fw"), rt.stacked("lb")])
        for port, dev in ((up, "u1"), (vx, "u2"), (pods, "u3")):
            rt.connect_netdev(port, dev)
        gw_mac, peer_mac, pod_mac, pod2_mac = (random_mac() for _ in range(4))
        neigh = rt.table("router_neigh", "router")
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        for ip, mac, port in ((GATEWAY, gw_mac, up), (PEER_VTEP, peer_mac, vx),
                              (POD, pod_mac, pods), (POD2, pod2_mac, pods)):
            neigh[maps.RouterNeighKey(r.cube.id, maps.ip_be(ip))] = maps.RouterNeigh(
                mac=maps.mac_bytes(mac), port=port.id, updated_ns=now)
        lb.set_service(VIP, 80, "tcp", [Backend(POD2, 8080), Backend(REMOTE_POD, 8080)])
        lb.set_service(VIP, 53, "udp", [Backend(POD2, 5353)])
        disp.set_nodeport(NODEPORT, "tcp", "Cluster", [Backend(POD, 8080),
                                                       Backend(REMOTE_POD, 8080)])
        disp.set_nodeport(NODEPORT, "udp", "Cluster", [Backend(REMOTE_POD, 5353)])
        disp.set_nodeport(NODEPORT_LOCAL, "tcp", "Local", [Backend(POD, 8080)])
        yield Node(net, {"uplink": up, "vxlan": vx, "pods": pods}, gw_mac, pod_mac, r)


# ---------------------------------------------------------------------------- frames
ADDRESSES = [POD, POD2, REMOTE_POD, OUTSIDE, VIP, NODE_IP, VTEP, PEER_VTEP, GATEWAY,
             "10.96.0.99", "10.244.9.9", "255.255.255.255", "0.0.0.0", "127.0.0.1", "224.0.0.1"]
PORTS = [22, 53, 80, 1500, 5353, 8080, NODEPORT, NODEPORT_LOCAL, 61000, 61015, 0, 65535]
addresses = st.sampled_from(ADDRESSES)
ports = st.one_of(st.sampled_from(PORTS), st.integers(0, 65535))


def _csum_at(data: bytes, at: int, prefix: bytes = b"") -> bytes:
    body = data[:at] + b"\0\0" + data[at + 2:]
    return body[:at] + struct.pack("!H", inet_csum(prefix + body)) + body[at + 2:]


@st.composite
def l4(draw: st.DrawFn, proto: int, src: str, dst: str, depth: int = 0, pad: int = 0) -> bytes:
    data = draw(st.binary(max_size=24)) + bytes(pad)
    if proto == IPPROTO_TCP:
        seg = struct.pack("!HHIIBBHHH", draw(ports), draw(ports), draw(st.integers(0, 2**32 - 1)),
                          draw(st.integers(0, 2**32 - 1)), draw(st.sampled_from([5, 6, 15, 4])) << 4,
                          draw(st.integers(0, 255)), 1024, 0, 0) + data
        return _csum_at(seg, 16, pseudo_header(src, dst, IPPROTO_TCP, len(seg)))
    if proto == IPPROTO_UDP:
        dgram = struct.pack("!HHHH", draw(ports), draw(ports), 8 + len(data), 0) + data
        if draw(st.booleans()):
            return dgram  # no checksum
        return _csum_at(dgram, 6, pseudo_header(src, dst, IPPROTO_UDP, len(dgram)))
    if proto == IPPROTO_ICMP:
        kind = draw(st.sampled_from([0, 8, 13, 14, 3, 11, 5, 12, 42]))
        code = draw(st.sampled_from([0, 1, 3, 4]))
        if kind in (3, 11, 12) and depth == 0:
            inner = draw(packet(depth=1))
            rest = inner[:draw(st.integers(0, len(inner)))]
            msg = struct.pack("!BBHI", kind, code, 0, draw(st.sampled_from([0, 1400]))) + rest
        else:
            msg = struct.pack("!BBHHH", kind, code, 0, draw(ports), 1) + data
        return _csum_at(msg, 2)
    return data  # GRE, SCTP, ESP, anything: bytes


@st.composite
def packet(draw: st.DrawFn, depth: int = 0, big: bool = False) -> bytes:
    """An IPv4 packet whose fields come from the node's world, options and
    fragments included, with consistent checksums (mutations come later).
    `big`: up to 200 more bytes of payload, DF as often as not and more
    often no options."""
    src, dst = draw(addresses), draw(addresses)
    proto = draw(st.sampled_from([IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, IPPROTO_SCTP, 47,
                                  50, 0]))
    pad = draw(st.integers(0, 200)) if big else 0
    payload = draw(l4(proto, src, dst, depth, pad))
    options = draw(st.sampled_from([b"", b"\x01\x01\x01\x00", b"\x07\x07\x04" + b"\0" * 5]))
    if big and draw(st.booleans()):
        options = b""  # an answer quotes only packets without options: more of those
    ihl = 5 + len(options) // 4
    frag = draw(st.sampled_from([0, 0, 0, 0x4000, 0x2000, 0x2000 | 1, 1, 3, 0x2000 | 185]))
    if big and draw(st.booleans()):
        frag |= 0x4000
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 4 * ihl + len(payload),
                      draw(st.integers(0, 65535)), frag, draw(st.sampled_from([64, 1, 0])),
                      proto, 0, bytes(map(int, src.split("."))),
                      bytes(map(int, dst.split(".")))) + options
    return _csum_at(hdr, 10) + payload


@st.composite
def frames(draw: st.DrawFn, dst_mac: str, src_mac: str, big: bool = False) -> bytes:
    ip = bytearray(draw(packet(big=big)))
    mutation = draw(st.sampled_from(["none", "none", "truncate", "total_len", "ihl", "vlan",
                                     "flip"]))
    vlan = False
    if mutation == "truncate":
        ip = ip[:draw(st.integers(0, len(ip)))]
    elif mutation == "total_len" and len(ip) >= 4:
        ip[2:4] = struct.pack("!H", draw(st.integers(0, 65535)))
    elif mutation == "ihl" and ip:
        ip[0] = 0x40 | draw(st.integers(0, 15))
    elif mutation == "flip" and ip:
        at = draw(st.integers(0, len(ip) - 1))
        ip[at] ^= 1 << draw(st.integers(0, 7))
    elif mutation == "vlan":
        vlan = True
    if vlan:
        head = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", ""))
        return (head + struct.pack("!HHH", 0x8100, 7, ETH_P_IP) + bytes(ip)).ljust(60, b"\0")
    return eth(dst_mac, src_mac, ETH_P_IP, bytes(ip))


# ---------------------------------------------------------------------------- checks
@dataclass(frozen=True)
class Checks:
    """What a frame's checksums say, where they can be judged."""

    ip_ok: bool | None  # None: not a whole IPv4 header
    l4_ok: bool | None  # None: a fragment, no L4 checksum, or not TCP/UDP/ICMP
    src: str | None
    dst: str | None = None

    @property
    def unmasqueraded(self) -> bool:
        """A pod source towards a destination pod traffic reaches only
        masqueraded: what must never leave the node."""
        if self.src is None or self.dst is None:
            return False
        dst = ipaddress.IPv4Address(self.dst)
        return ipaddress.IPv4Address(self.src) in CLUSTER_PODS and \
            not any(dst in n for n in NO_SNAT)


def checks_of(frame: bytes) -> Checks:
    if len(frame) < 34 or frame[12:14] != struct.pack("!H", ETH_P_IP):
        return Checks(None, None, None)
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    if ip[0] >> 4 != 4 or ihl < 20 or len(ip) < ihl:
        return Checks(None, None, None)
    total = struct.unpack("!H", ip[2:4])[0]
    src = ".".join(str(b) for b in ip[12:16])
    dst = ".".join(str(b) for b in ip[16:20])
    ip_ok = inet_csum(ip[:ihl]) == 0
    frag = struct.unpack("!H", ip[6:8])[0] & 0x3FFF
    proto = ip[9]
    if frag or total < ihl or total > len(ip) or proto not in (IPPROTO_TCP, IPPROTO_UDP,
                                                                 IPPROTO_ICMP):
        return Checks(ip_ok, None, src, dst)
    body = ip[ihl:total]
    if proto == IPPROTO_ICMP:
        return Checks(ip_ok, inet_csum(body) == 0 if len(body) >= 4 else None, src, dst)
    need = 20 if proto == IPPROTO_TCP else 8
    if len(body) < need or (proto == IPPROTO_UDP and body[6:8] == b"\0\0"):
        return Checks(ip_ok, None, src, dst)
    l4_ok = inet_csum(pseudo_header(src, dst, proto, len(body)) + body) == 0
    return Checks(ip_ok, l4_ok, src, dst)


def assert_kept(before: bytes, res: TestRunResult, where: str) -> None:
    assert res.retval in ALLOWED_RETVALS, f"{where}: retval {res.retval} for {before.hex()}"
    if res.retval == TC_ACT_SHOT or res.data == before:
        return
    was, now = checks_of(before), checks_of(res.data)
    if was.ip_ok and now.ip_ok is not None:
        assert now.ip_ok, f"{where}: bad IPv4 checksum after a rewrite of {before.hex()}"
    if was.l4_ok and now.l4_ok is not None:
        assert now.l4_ok, f"{where}: bad L4 checksum after a rewrite of {before.hex()}"


FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------- the paths
@FUZZ
@given(data=st.data())
def test_frames_from_a_pod(node: Node, data: st.DataObject) -> None:
    """From a pod: lbrp and firewall, the router; what the router sends out of
    the NIC then crosses the dispatcher's egress hook, as the kernel runs it."""
    frame = data.draw(frames(node.ports["pods"].mac, node.pod_mac))
    before = node.tx()
    res = node.run("pcn_ingress", "u3", frame)
    assert_kept(frame, res, "pod -> node")
    if res.retval != TC_ACT_REDIRECT or node.tx()["uplink"] == before["uplink"]:
        return
    out = node.run("pcn_egress", "u1", res.data)
    assert_kept(res.data, out, "node -> NIC")
    if out.retval != TC_ACT_SHOT:
        c = checks_of(out.data)
        assert not c.unmasqueraded, f"left the node as {c.src} -> {c.dst}: {frame.hex()}"


@FUZZ
@given(data=st.data())
def test_frames_from_the_nic(node: Node, data: st.DataObject) -> None:
    frame = data.draw(frames(node.ports["uplink"].mac, node.gw_mac))
    before = node.tx()
    res = node.run("pcn_ingress", "u1", frame)
    assert_kept(frame, res, "NIC -> node")
    if res.retval == TC_ACT_REDIRECT and node.tx()["uplink"] != before["uplink"]:
        assert_frag_needed(res.data, node.ports["uplink"], "NIC -> NIC", frame, mtu=None)


@FUZZ
@given(data=st.data())
def test_frames_from_the_overlay(node: Node, data: st.DataObject) -> None:
    frame = data.draw(frames(node.ports["vxlan"].mac, random_mac()))
    res = node.run("pcn_ingress", "u2", frame)
    assert_kept(frame, res, "overlay -> node")


@FUZZ
@given(data=st.data())
def test_frames_to_a_pod(node: Node, data: st.DataObject) -> None:
    """On its way into a pod: the egress hook (firewall, lbrp's reverse path)."""
    frame = data.draw(frames(node.pod_mac, node.ports["pods"].mac))
    res = node.run("pcn_egress", "u3", frame)
    assert_kept(frame, res, "node -> pod")


@FUZZ
@given(data=st.data())
def test_frames_leaving_through_the_nic(node: Node, data: st.DataObject) -> None:
    """Whatever the node's stack or router sends out of the NIC: the
    dispatcher's egress hook never lets a pod source address out."""
    frame = data.draw(frames(node.gw_mac, node.ports["uplink"].mac))
    res = node.run("pcn_egress", "u1", frame)
    assert_kept(frame, res, "NIC egress")
    if res.retval != TC_ACT_SHOT:
        c = checks_of(res.data)
        assert not c.unmasqueraded, f"left the node as {c.src} -> {c.dst}: {frame.hex()}"



def assert_frag_needed(answer: bytes, to_port: PortState, where: str, frame: bytes,
                       mtu: int | None = TINY_MTU) -> None:
    """The router's answer to a DF packet too big for its next hop: ICMP type
    3 code 4 with the next-hop MTU (`mtu`, or any when None), from the
    address of the port the packet came in by, with right checksums."""
    c = checks_of(answer)
    assert c.ip_ok and c.l4_ok and c.src == to_port.ip, \
        f"{where}: not a well-formed answer {answer.hex()} to {frame.hex()}"
    icmp = answer[14 + (answer[14] & 0x0F) * 4:]
    next_hop_mtu = struct.unpack("!H", icmp[6:8])[0]
    assert (icmp[0], icmp[1]) == (3, 4) and mtu in (None, next_hop_mtu), \
        f"{where}: {answer.hex()} is no fragmentation needed about {frame.hex()}"


@FUZZ
@given(data=st.data())
def test_frames_too_big_for_the_next_hop(node: Node, data: st.DataObject) -> None:
    """Every port's MTU at 68: from the NIC or a pod, a frame either passes
    as before or, too big, is answered with "fragmentation needed" (DF) back
    out of the port it came in by, handed to the host (no DF, from the NIC)
    or dropped; lying lengths, options, fragments and truncations included.
    An answer leaving by the NIC crosses the dispatcher's egress and must not
    carry a pod's address."""
    r = node.router
    where = data.draw(st.sampled_from(["uplink", "pods"]))
    dev = {"uplink": "u1", "pods": "u3"}[where]
    src_mac = node.gw_mac if where == "uplink" else node.pod_mac
    frame = data.draw(frames(node.ports[where].mac, src_mac, big=True))
    for port in node.ports:
        r.set_mtu(port, TINY_MTU)
    try:
        before = node.tx()
        res = node.run("pcn_ingress", dev, frame)
        after = node.tx()
    finally:
        for port in node.ports:
            r.set_mtu(port, None)
    assert_kept(frame, res, f"{where} -> node")
    if res.retval != TC_ACT_REDIRECT or after[where] == before[where]:
        return
    # Back out of the port it came in by: from the NIC only an answer may go
    # (see test_frames_from_the_nic); a pod's frame may also be routed back
    # to the pods, but never from their gateway's address, which no generated
    # frame has, and which every answer to a pod has.
    if where == "pods" and checks_of(res.data).src != node.ports["pods"].ip:
        return
    assert_frag_needed(res.data, node.ports[where], where, frame)
    if where == "uplink":
        out = node.run("pcn_egress", "u1", res.data)
        assert_kept(res.data, out, "answer -> NIC")
        if out.retval != TC_ACT_SHOT:
            c = checks_of(out.data)
            assert not c.unmasqueraded, f"left the node as {c.src} -> {c.dst}: {frame.hex()}"


def test_the_policy_cube_judged_the_frames(node: Node) -> None:
    """The frames above went through the policy cube too (last in the file:
    it runs after them): it judged some, accepted some and dropped some."""
    pol = PolicyCube(node.net.rt, "pol")  # adopts the cube the fixture made
    counted = {(c["rule"], c["direction"]): c["packets"]
               for c in pol.counters(node.ports["pods"].id)}
    assert sum(counted.values()) > 0, counted
    assert node.net.rt.cube_drops("pol").get("policy", 0) > 0
