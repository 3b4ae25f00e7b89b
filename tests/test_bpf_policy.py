"""The policy cube's programs (bpf/policy.c) on crafted frames
(BPF_PROG_TEST_RUN), and its control class.

Topology: bridge `b` with port `a` (veth u1, the pod POD) and port `b` (veth
u2), behind which the destination MAC of every frame is learned. The one
policy cube of the module is stacked on both hooks of `a`, as the node
stacks it on a pod's port: what the pod sends enters u1's ingress entry
program (the port's ingress hook: the pod's egress policy, then the bridge
forwards it to u2: TC_ACT_REDIRECT); what it receives runs u1's egress
entry program (the egress hook: its ingress policy; TC_ACT_OK).
"""

from __future__ import annotations

import ctypes as ct
import itertools
import json
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from bpfunit import (
    ETH_P_IP,
    IPPROTO_ICMP,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_ACK,
    TCP_FIN,
    TCP_SYN,
    UnitNet,
    cube_lab,
    eth,
    fragments,
    icmp_echo,
    icmp_error,
    ipv4,
    random_mac,
    tcp,
    udp_csum,
)

from pcn_agent.dataplane import maps
from pcn_agent.dataplane.cubes.bridge import Bridge
from pcn_agent.dataplane.cubes.firewall import Firewall
from pcn_agent.dataplane.cubes.policy import (
    CTR_DROPS,
    CTR_REPLY,
    MAX_RULES,
    PolicyCube,
    PolicyError,
    policy_json,
    policy_of,
)
from pcn_agent.dataplane.runtime import PortState, Runtime
from pcn_policy.rules import (
    PORTS_PER_RULE,
    Action,
    AddressSet,
    Direction,
    DirectionPolicy,
    PodPolicy,
    PortMatch,
    Rule,
    RuleRef,
    SetEntry,
)
from pcn_testsupport.testrun import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT

pytestmark = [pytest.mark.bpf,
              pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning")]

POD = "10.244.1.10"
PEER = "10.244.2.20"
OTHER = "10.244.3.30"
NODE = "192.168.50.1"
IN, OUT = Direction.INGRESS, Direction.EGRESS
_ports = itertools.count(41000)


@dataclass
class PolLab:
    net: UnitNet
    pol: PolicyCube
    port: PortState
    dst_mac: str

    @property
    def pid(self) -> int:
        return self.port.id

    def from_pod(self, l3: bytes) -> str:
        """The pod sends `l3` (an IPv4 packet): "pass" or "drop"."""
        res = self.net.run(self.net.rt._entry_fds["pcn_ingress"],
                           eth(self.dst_mac, random_mac(), ETH_P_IP, l3),
                           ifindex=self.net.ifindex["u1"])
        assert res.retval in (TC_ACT_REDIRECT, TC_ACT_SHOT), res.retval
        return "pass" if res.retval == TC_ACT_REDIRECT else "drop"

    def to_pod(self, l3: bytes) -> str:
        """The pod receives `l3`."""
        res = self.net.run(self.net.rt._entry_fds["pcn_egress"],
                           eth(random_mac(), self.dst_mac, ETH_P_IP, l3),
                           ifindex=self.net.ifindex["u1"])
        assert res.retval in (TC_ACT_OK, TC_ACT_SHOT), res.retval
        return "pass" if res.retval == TC_ACT_OK else "drop"

    def send(self, d: Direction, l3: bytes) -> str:
        return self.to_pod(l3) if d == IN else self.from_pod(l3)


@pytest.fixture(scope="module")
def mod() -> Iterator[PolLab]:
    with cube_lab() as cl:
        rt, a_port = cl.rt, cl.ports["a"]
        pol = PolicyCube(rt, "pol")
        rt.set_hook(a_port, maps.HOOK_INGRESS, [rt.stacked("pol")])
        rt.set_hook(a_port, maps.HOOK_EGRESS, [rt.stacked("pol")])
        yield PolLab(cl.net, pol, a_port, cl.dst_mac)


@pytest.fixture
def lab(mod: PolLab) -> Iterator[PolLab]:
    try:
        yield mod
    finally:
        mod.pol.remove_pod(mod.pid)
        mod.pol.gc_sets()
        mod.pol.configure([])


# ---------------------------------------------------------------------------- builders
def ref(name: str, d: Direction = IN, index: int = 0, kind: str = "NetworkPolicy") -> RuleRef:
    return RuleRef(kind, "" if kind == "ClusterNetworkPolicy" else "ns", name, d, index)


def aset(name: str, *prefixes: str | SetEntry) -> AddressSet:
    return AddressSet(name, frozenset(p if isinstance(p, SetEntry) else SetEntry(p)
                                      for p in prefixes))


def tcp_pkt(src: str, dst: str, sport: int, dport: int, flags: int = TCP_SYN) -> bytes:
    return ipv4(src, dst, IPPROTO_TCP, tcp(src, dst, sport, dport, flags))


def udp_pkt(src: str, dst: str, sport: int, dport: int) -> bytes:
    return ipv4(src, dst, IPPROTO_UDP, udp_csum(src, dst, sport, dport, b"data"))


def sctp_pkt(src: str, dst: str, sport: int, dport: int) -> bytes:
    return ipv4(src, dst, IPPROTO_SCTP, struct.pack("!HHII", sport, dport, 1, 0))


def ping(src: str, dst: str, ident: int = 7, reply: bool = False) -> bytes:
    return ipv4(src, dst, IPPROTO_ICMP, icmp_echo(ident, 1, b"ping", 0 if reply else 8))


def new_pkt(d: Direction, peer: str, proto: int, dport: int) -> bytes:
    """The first packet of a connection between POD and `peer` in direction `d`."""
    src, dst = (peer, POD) if d == IN else (POD, peer)
    sport = next(_ports)
    if proto == IPPROTO_TCP:
        return tcp_pkt(src, dst, sport, dport)
    if proto == IPPROTO_UDP:
        return udp_pkt(src, dst, sport, dport)
    if proto == IPPROTO_SCTP:
        return sctp_pkt(src, dst, sport, dport)
    return ping(src, dst, sport)


def one_way(d: Direction, *rules: Rule, isolated: bool = True, admin: tuple[Rule, ...] = (),
            baseline: tuple[Rule, ...] = ()) -> PodPolicy:
    dp = DirectionPolicy(admin, tuple(rules), isolated,
                         (ref("iso", d, -1),) if isolated else (), baseline)
    return PodPolicy(ingress=dp) if d == IN else PodPolicy(egress=dp)


def isolated_both() -> PodPolicy:
    return PodPolicy(DirectionPolicy(isolated=True, isolated_by=(ref("deny-all", IN, -1),)),
                     DirectionPolicy(isolated=True, isolated_by=(ref("deny-all", OUT, -1),)))


# ---------------------------------------------------------------------------- isolation
def test_no_policy_touches_nothing(lab: PolLab) -> None:
    assert lab.to_pod(new_pkt(IN, PEER, IPPROTO_TCP, 80)) == "pass"
    assert lab.from_pod(new_pkt(OUT, PEER, IPPROTO_UDP, 53)) == "pass"
    assert lab.pol.connections(lab.pid) == []


def test_isolation_denies_both_directions(lab: PolLab) -> None:
    lab.pol.set_pod(lab.pid, isolated_both())
    drops = lab.net.rt.cube_drops("pol").get("policy", 0)
    for proto in (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, IPPROTO_SCTP):
        assert lab.to_pod(new_pkt(IN, PEER, proto, 80)) == "drop"
        assert lab.from_pod(new_pkt(OUT, PEER, proto, 80)) == "drop"
    assert lab.net.rt.cube_drops("pol")["policy"] == drops + 8
    assert {c["direction"]: c["packets"] for c in lab.pol.counters(lab.pid)
            if c["rule"] == "isolation"} == {"ingress": 4, "egress": 4}
    assert {k: v["packets"] for k, v in lab.pol.drops(lab.pid).items()} == \
        {"ingress": 4, "egress": 4}
    assert lab.pol.explain(lab.pid, IN, PEER, IPPROTO_TCP, 80) == \
        (Action.DENY, ref("deny-all", IN, -1))


def test_isolated_one_way_leaves_the_other_open(lab: PolLab) -> None:
    lab.pol.set_pod(lab.pid, one_way(IN))
    assert lab.to_pod(new_pkt(IN, PEER, IPPROTO_TCP, 80)) == "drop"
    assert lab.from_pod(new_pkt(OUT, PEER, IPPROTO_TCP, 80)) == "pass"


# ---------------------------------------------------------------------------- peers
@pytest.mark.parametrize("entries,peer,want", [
    (("10.244.2.20/32",), "10.244.2.20", "pass"),
    (("10.244.2.20/32",), "10.244.2.21", "drop"),
    (("10.244.0.0/16",), "10.244.9.9", "pass"),
    (("10.245.0.0/16",), "10.244.9.9", "drop"),
    # 10.0.0.0/8 except 10.244.2.0/24, as the compiler splits it: a hole
    (("10.0.0.0/9", "10.128.0.0/10", "10.192.0.0/11", "10.224.0.0/12", "10.240.0.0/14",
      "10.244.0.0/23", "10.244.3.0/24", "10.244.4.0/22", "10.244.8.0/21", "10.244.16.0/20",
      "10.244.32.0/19", "10.244.64.0/18", "10.244.128.0/17", "10.245.0.0/16",
      "10.246.0.0/15", "10.248.0.0/13"), "10.244.2.20", "drop"),
    (("10.0.0.0/9", "10.244.0.0/23", "10.244.3.0/24"), "10.244.3.1", "pass"),
    (("0.0.0.0/0",), "8.8.8.8", "pass"),
])
@pytest.mark.parametrize("d", [IN, OUT], ids=["ingress", "egress"])
def test_peer_sets(lab: PolLab, entries: tuple[str, ...], peer: str, want: str,
                   d: Direction) -> None:
    lab.pol.set_address_set(aset("peers", *entries))
    lab.pol.set_pod(lab.pid, one_way(d, Rule("peers", ref=ref("allow", d))))
    assert lab.send(d, new_pkt(d, peer, IPPROTO_TCP, 80)) == want
    assert lab.pol.explain(lab.pid, d, peer, IPPROTO_TCP, 80)[0] == \
        (Action.ACCEPT if want == "pass" else Action.DENY)


# ---------------------------------------------------------------------------- ports
@pytest.mark.parametrize("ports,proto,dport,want", [
    ((PortMatch(IPPROTO_TCP, 80, 80),), IPPROTO_TCP, 80, "pass"),
    ((PortMatch(IPPROTO_TCP, 80, 80),), IPPROTO_TCP, 81, "drop"),
    ((PortMatch(IPPROTO_TCP, 80, 80),), IPPROTO_UDP, 80, "drop"),
    ((PortMatch(IPPROTO_TCP, 8000, 8080),), IPPROTO_TCP, 7999, "drop"),
    ((PortMatch(IPPROTO_TCP, 8000, 8080),), IPPROTO_TCP, 8000, "pass"),
    ((PortMatch(IPPROTO_TCP, 8000, 8080),), IPPROTO_TCP, 8080, "pass"),
    ((PortMatch(IPPROTO_TCP, 8000, 8080),), IPPROTO_TCP, 8081, "drop"),
    ((PortMatch(IPPROTO_UDP, 53, 53),), IPPROTO_UDP, 53, "pass"),
    ((PortMatch(IPPROTO_UDP, 53, 53),), IPPROTO_TCP, 53, "drop"),
    ((PortMatch(IPPROTO_SCTP, 9, 9),), IPPROTO_SCTP, 9, "pass"),
    ((PortMatch(IPPROTO_SCTP, 9, 9),), IPPROTO_UDP, 9, "drop"),
    ((PortMatch(IPPROTO_TCP),), IPPROTO_TCP, 1, "pass"),  # a protocol, every port
    ((PortMatch(IPPROTO_TCP),), IPPROTO_ICMP, 0, "drop"),  # ports: ICMP matches none
    ((), IPPROTO_ICMP, 0, "pass"),  # no ports: any packet
    ((), IPPROTO_UDP, 5353, "pass"),
    ((PortMatch(0),), IPPROTO_ICMP, 0, "pass"),  # proto 0: any packet
    (tuple(PortMatch(IPPROTO_UDP, p, p) for p in range(1, 9)), IPPROTO_UDP, 8, "pass"),
    (tuple(PortMatch(IPPROTO_UDP, p, p) for p in range(1, 9)), IPPROTO_UDP, 9, "drop"),
])
@pytest.mark.parametrize("d", [IN, OUT], ids=["ingress", "egress"])
def test_ports(lab: PolLab, ports: tuple[PortMatch, ...], proto: int, dport: int, want: str,
               d: Direction) -> None:
    lab.pol.set_address_set(aset("peer", f"{PEER}/32"))
    lab.pol.set_pod(lab.pid, one_way(d, Rule("peer", ports, ref=ref("p", d))))
    assert lab.send(d, new_pkt(d, PEER, proto, dport)) == want


def test_named_port_from_the_set_entry(lab: PolLab) -> None:
    """An egress rule to a named port: each destination pod's entry names
    its own port for it."""
    lab.pol.set_address_set(aset("web", SetEntry(f"{PEER}/32", IPPROTO_TCP, 8080),
                                 SetEntry(f"{OTHER}/32", IPPROTO_TCP, 9090)))
    lab.pol.set_pod(lab.pid, one_way(OUT, Rule("web", named_port=True, ref=ref("np", OUT))))
    assert lab.from_pod(new_pkt(OUT, PEER, IPPROTO_TCP, 8080)) == "pass"
    assert lab.from_pod(new_pkt(OUT, PEER, IPPROTO_TCP, 9090)) == "drop"
    assert lab.from_pod(new_pkt(OUT, OTHER, IPPROTO_TCP, 9090)) == "pass"
    assert lab.from_pod(new_pkt(OUT, OTHER, IPPROTO_UDP, 9090)) == "drop"
    assert lab.from_pod(new_pkt(OUT, OTHER, IPPROTO_ICMP, 0)) == "drop"


def test_a_named_port_entry_moving_to_another_port_is_rewritten(lab: PolLab) -> None:
    """A destination pod's named port changing number is one entry rewritten
    in place (same prefix): the new port matches, the old one no longer,
    and the prefix is not deleted after the write."""
    lab.pol.set_address_set(aset("web", SetEntry(f"{PEER}/32", IPPROTO_TCP, 8080)))
    lab.pol.set_pod(lab.pid, one_way(OUT, Rule("web", named_port=True, ref=ref("np", OUT))))
    assert lab.from_pod(new_pkt(OUT, PEER, IPPROTO_TCP, 8080)) == "pass"
    before = lab.pol.writes
    lab.pol.set_address_set(aset("web", SetEntry(f"{PEER}/32", IPPROTO_TCP, 8081)))
    assert lab.pol.writes - before == 2  # the entry, the epoch
    assert lab.from_pod(new_pkt(OUT, PEER, IPPROTO_TCP, 8081)) == "pass"
    assert lab.from_pod(new_pkt(OUT, PEER, IPPROTO_TCP, 8080)) == "drop"
    lab.pol.set_address_set(aset("web", SetEntry("10.9.0.0/255.255.0.0", IPPROTO_TCP, 8081)))
    assert lab.pol.sets["web"].entries == {SetEntry("10.9.0.0/16", IPPROTO_TCP, 8081)}
    assert lab.from_pod(new_pkt(OUT, PEER, IPPROTO_TCP, 8081)) == "drop"


def test_several_rules_are_a_union(lab: PolLab) -> None:
    lab.pol.set_address_sets([aset("a", f"{PEER}/32"), aset("b", f"{OTHER}/32")])
    lab.pol.set_pod(lab.pid, one_way(IN, Rule("a", (PortMatch(IPPROTO_TCP, 80, 80),),
                                              ref=ref("r", IN, 0)),
                                     Rule("b", (PortMatch(IPPROTO_UDP, 53, 53),),
                                          ref=ref("r", IN, 1))))
    assert lab.to_pod(new_pkt(IN, PEER, IPPROTO_TCP, 80)) == "pass"
    assert lab.to_pod(new_pkt(IN, OTHER, IPPROTO_UDP, 53)) == "pass"
    assert lab.to_pod(new_pkt(IN, PEER, IPPROTO_UDP, 53)) == "drop"
    assert lab.to_pod(new_pkt(IN, OTHER, IPPROTO_TCP, 80)) == "drop"


# ---------------------------------------------------------------------------- tiers
CNP = "ClusterNetworkPolicy"


def test_admin_accept_overrides_isolation(lab: PolLab) -> None:
    lab.pol.set_address_set(aset("peer", f"{PEER}/32"))
    a = Rule("peer", action=Action.ACCEPT, ref=ref("adm", IN, 0, CNP))
    lab.pol.set_pod(lab.pid, one_way(IN, admin=(a,)))
    assert lab.to_pod(new_pkt(IN, PEER, IPPROTO_TCP, 80)) == "pass"
    assert lab.to_pod(new_pkt(IN, OTHER, IPPROTO_TCP, 80)) == "drop"
    assert lab.pol.explain(lab.pid, IN, PEER, IPPROTO_TCP, 80) == (Action.ACCEPT, a.ref)


def test_admin_deny_overrides_a_namespaced_accept(lab: PolLab) -> None:
    lab.pol.set_address_sets([aset("peer", f"{PEER}/32"), aset("all", "0.0.0.0/0")])
    deny = Rule("peer", (PortMatch(IPPROTO_TCP, 22, 22),), action=Action.DENY,
                ref=ref("no-ssh", IN, 0, CNP))
    lab.pol.set_pod(lab.pid, one_way(IN, Rule("all", ref=ref("all")), admin=(deny,)))
    assert lab.to_pod(new_pkt(IN, PEER, IPPROTO_TCP, 22)) == "drop"
    assert lab.to_pod(new_pkt(IN, PEER, IPPROTO_TCP, 80)) == "pass"
    assert lab.to_pod(new_pkt(IN, OTHER, IPPROTO_TCP, 22)) == "pass"
    assert lab.pol.explain(lab.pid, IN, PEER, IPPROTO_TCP, 22) == (Action.DENY, deny.ref)


def test_admin_pass_hands_over_to_the_namespaced_tier(lab: PolLab) -> None:
    lab.pol.set_address_sets([aset("peer", f"{PEER}/32"), aset("all", "0.0.0.0/0")])
    pass_ = Rule("peer", action=Action.PASS, ref=ref("pass", IN, 0, CNP))
    deny = Rule("all", action=Action.DENY, ref=ref("deny", IN, 0, CNP))
    accept = Rule("peer", (PortMatch(IPPROTO_TCP, 80, 80),), ref=ref("web"))
    lab.pol.set_pod(lab.pid, one_way(IN, accept, admin=(pass_, deny)))
    assert lab.to_pod(new_pkt(IN, PEER, IPPROTO_TCP, 80)) == "pass"  # passed, then accepted
    assert lab.to_pod(new_pkt(IN, PEER, IPPROTO_TCP, 81)) == "drop"  # passed, then isolated
    assert lab.to_pod(new_pkt(IN, OTHER, IPPROTO_TCP, 80)) == "drop"  # the admin deny
    assert lab.pol.explain(lab.pid, IN, PEER, IPPROTO_TCP, 80) == (Action.ACCEPT, accept.ref)
    assert lab.pol.explain(lab.pid, IN, OTHER, IPPROTO_TCP, 80) == (Action.DENY, deny.ref)


def test_baseline_deny_when_not_isolated_and_ignored_when_isolated(lab: PolLab) -> None:
    lab.pol.set_address_sets([aset("peer", f"{PEER}/32"), aset("all", "0.0.0.0/0")])
    base = Rule("all", (PortMatch(IPPROTO_TCP, 22, 22),), action=Action.DENY,
                ref=ref("base", IN, 0, CNP))
    lab.pol.set_pod(lab.pid, one_way(IN, isolated=False, baseline=(base,)))
    assert lab.to_pod(new_pkt(IN, PEER, IPPROTO_TCP, 22)) == "drop"
    assert lab.to_pod(new_pkt(IN, PEER, IPPROTO_TCP, 80)) == "pass"
    # isolated: the namespaced tier decides everything; a baseline accept cannot help
    base_ok = Rule("all", action=Action.ACCEPT, ref=ref("base-ok", IN, 0, CNP))
    lab.pol.set_pod(lab.pid, one_way(IN, Rule("peer", (PortMatch(IPPROTO_TCP, 22, 22),),
                                              ref=ref("ssh")), baseline=(base, base_ok)))
    assert lab.to_pod(new_pkt(IN, PEER, IPPROTO_TCP, 22)) == "pass"  # namespaced accept
    assert lab.to_pod(new_pkt(IN, OTHER, IPPROTO_TCP, 80)) == "drop"  # isolation
    assert lab.pol.explain(lab.pid, IN, OTHER, IPPROTO_TCP, 80) == (Action.DENY,
                                                                    ref("iso", IN, -1))


def test_host_addresses_always_reach_the_pod(lab: PolLab) -> None:
    lab.pol.set_pod(lab.pid, isolated_both())
    assert lab.to_pod(new_pkt(IN, NODE, IPPROTO_TCP, 8080)) == "drop"
    lab.pol.configure([NODE])
    sport = next(_ports)
    assert lab.to_pod(tcp_pkt(NODE, POD, sport, 8080)) == "pass"
    assert lab.from_pod(tcp_pkt(POD, NODE, 8080, sport, TCP_SYN | TCP_ACK)) == "pass"  # reply
    assert lab.from_pod(new_pkt(OUT, NODE, IPPROTO_TCP, 80)) == "drop"  # not the other way
    assert [c["rule"] for c in lab.pol.counters(lab.pid) if c["rule"] == "host"] == ["host"]
    host = next(c for c in lab.pol.counters(lab.pid) if c["rule"] == "host")
    assert (host["packets"], host["replyPackets"]) == (1, 1)


# ---------------------------------------------------------------------------- tracking
def test_replies_pass_both_ways(lab: PolLab) -> None:
    lab.pol.set_address_set(aset("peer", f"{PEER}/32"))
    lab.pol.set_pod(lab.pid, PodPolicy(
        DirectionPolicy((), (Rule("peer", (PortMatch(IPPROTO_TCP, 80, 80),), ref=ref("in")),),
                        True, (ref("iso", IN, -1),)),
        DirectionPolicy((), (Rule("peer", (PortMatch(IPPROTO_UDP, 53, 53),),
                                  ref=ref("out", OUT)),), True, (ref("iso", OUT, -1),))))
    # in: a TCP connection to the pod, its replies out
    assert lab.to_pod(tcp_pkt(PEER, POD, 40001, 80)) == "pass"
    assert lab.from_pod(tcp_pkt(POD, PEER, 80, 40001, TCP_SYN | TCP_ACK)) == "pass"
    assert lab.to_pod(tcp_pkt(PEER, POD, 40001, 80, TCP_ACK)) == "pass"
    # out: a UDP query from the pod, its answer in
    assert lab.from_pod(udp_pkt(POD, PEER, 40002, 53)) == "pass"
    assert lab.to_pod(udp_pkt(PEER, POD, 53, 40002)) == "pass"
    # nothing else: another source port is another connection
    assert lab.to_pod(udp_pkt(PEER, POD, 53, 40003)) == "drop"
    assert lab.from_pod(tcp_pkt(POD, PEER, 80, 40009, TCP_SYN)) == "drop"
    conns = {(c["src"], c["sport"], c["dst"], c["dport"], c["direction"])
             for c in lab.pol.connections(lab.pid)}
    assert conns == {(PEER, 40001, POD, 80, "ingress"), (POD, 40002, PEER, 53, "egress")}


def test_echo_is_tracked_by_identifier(lab: PolLab) -> None:
    lab.pol.set_address_set(aset("peer", f"{PEER}/32"))
    lab.pol.set_pod(lab.pid, PodPolicy(
        DirectionPolicy(isolated=True),
        DirectionPolicy((), (Rule("peer", ref=ref("out", OUT)),), True)))
    assert lab.from_pod(ping(POD, PEER, 99)) == "pass"
    assert lab.to_pod(ping(PEER, POD, 99, reply=True)) == "pass"
    assert lab.to_pod(ping(PEER, POD, 98, reply=True)) == "drop"


def test_icmp_errors_about_a_connection_pass(lab: PolLab) -> None:
    lab.pol.set_address_set(aset("peer", f"{PEER}/32"))
    lab.pol.set_pod(lab.pid, PodPolicy(
        DirectionPolicy(isolated=True),
        DirectionPolicy((), (Rule("peer", (PortMatch(IPPROTO_UDP, 53, 53),),
                                  ref=ref("dns", OUT)),), True)))
    query = udp_pkt(POD, PEER, 40100, 53)
    assert lab.from_pod(query) == "pass"
    router = "10.1.1.1"
    unreachable = ipv4(router, POD, IPPROTO_ICMP, icmp_error(3, 3, query[:28]))
    assert lab.to_pod(unreachable) == "pass"
    other = udp_pkt(POD, PEER, 40101, 53)  # never sent: nothing to relate to
    assert lab.to_pod(ipv4(router, POD, IPPROTO_ICMP, icmp_error(3, 3, other[:28]))) == "drop"


def test_epoch_rejudges_tracked_connections(lab: PolLab) -> None:
    lab.pol.set_address_sets([aset("a", f"{PEER}/32"), aset("b", f"{OTHER}/32")])
    keep = Rule("a", (PortMatch(IPPROTO_TCP, 80, 80),), ref=ref("keep"))
    gone = Rule("b", (PortMatch(IPPROTO_TCP, 80, 80),), ref=ref("gone"))
    closed = DirectionPolicy(isolated=True)  # else a packet of it passes as the pod's own
    lab.pol.set_pod(lab.pid, PodPolicy(one_way(IN, keep, gone).ingress, closed))
    assert lab.to_pod(tcp_pkt(PEER, POD, 40200, 80)) == "pass"
    assert lab.to_pod(tcp_pkt(OTHER, POD, 40201, 80)) == "pass"
    epoch = lab.pol.epoch
    lab.pol.set_pod(lab.pid, PodPolicy(one_way(IN, keep).ingress, closed))  # OTHER: revoked
    assert lab.pol.epoch == epoch + 1
    assert lab.from_pod(tcp_pkt(POD, PEER, 80, 40200, TCP_SYN | TCP_ACK)) == "pass"
    assert lab.from_pod(tcp_pkt(POD, OTHER, 80, 40201, TCP_SYN | TCP_ACK)) == "drop"
    assert lab.to_pod(tcp_pkt(OTHER, POD, 40201, 80, TCP_ACK)) == "drop"  # revoked
    conns = lab.pol.connections(lab.pid)
    assert {c["src"]: (c["epoch"], "revoked" in c["flags"]) for c in conns} == {
        OTHER: (epoch + 1, True), PEER: (epoch + 1, False)}


@pytest.mark.parametrize("d", [IN, OUT], ids=["ingress", "egress"])
def test_a_revoked_connection_stays_stopped_and_resumes_when_allowed_again(
        lab: PolLab, d: Direction) -> None:
    """A connection a change disallows stops, also when the other direction
    has no policy: its next packets are not picked up as replies of a
    connection opened the other way (which that direction would allow). A
    later change that allows it again lets it go on."""
    lab.pol.set_address_sets([aset("a", f"{PEER}/32"), aset("b", f"{OTHER}/32")])
    keep = Rule("a", (PortMatch(IPPROTO_TCP, 80, 80),), ref=ref("keep", d))
    gone = Rule("b", (PortMatch(IPPROTO_TCP, 80, 80),), ref=ref("gone", d))
    lab.pol.set_pod(lab.pid, one_way(d, keep, gone))  # the other direction: no policy
    sport = next(_ports)

    def opener(flags: int) -> str:  # a packet from the end that opened it
        return lab.send(d, tcp_pkt(OTHER, POD, sport, 80, flags) if d == IN
                        else tcp_pkt(POD, OTHER, sport, 80, flags))

    def answer(flags: int) -> str:  # from the other end
        if d == IN:
            return lab.from_pod(tcp_pkt(POD, OTHER, 80, sport, flags))
        return lab.to_pod(tcp_pkt(OTHER, POD, 80, sport, flags))

    assert opener(TCP_SYN) == "pass"
    assert answer(TCP_SYN | TCP_ACK) == "pass"
    lab.pol.set_pod(lab.pid, one_way(d, keep))  # OTHER's rule gone
    for _ in range(3):  # retransmissions, both ways
        assert opener(TCP_ACK) == "drop"
        assert answer(TCP_ACK) == "drop"
    [c] = [c for c in lab.pol.connections(lab.pid) if OTHER in (c["src"], c["dst"])]
    assert "revoked" in c["flags"] and c["rule"] == "isolation"
    lab.pol.set_pod(lab.pid, one_way(d, keep, gone))  # allowed again
    assert opener(TCP_ACK) == "pass"
    assert answer(TCP_ACK) == "pass"
    [c] = [c for c in lab.pol.connections(lab.pid) if OTHER in (c["src"], c["dst"])]
    assert "revoked" not in c["flags"] and c["rule"] == str(ref("gone", d))


def test_an_empty_policy_tracks_and_a_later_deny_revokes(lab: PolLab) -> None:
    """A pod no policy selects any more keeps an empty policy: everything
    passes, but its connections stay tracked with their opener, so a deny
    that comes later stops them (unstacked and stacked again, the
    connection's next packet would be picked up as the pod's own reply)."""
    lab.pol.set_address_set(aset("peer", f"{PEER}/32"))
    lab.pol.set_pod(lab.pid, one_way(IN, Rule("peer", ref=ref("in"))))
    sport = next(_ports)
    assert lab.to_pod(tcp_pkt(PEER, POD, sport, 80)) == "pass"
    assert lab.from_pod(tcp_pkt(POD, PEER, 80, sport, TCP_SYN | TCP_ACK)) == "pass"
    lab.pol.set_pod(lab.pid, PodPolicy())  # the last policy selecting it went
    assert lab.to_pod(tcp_pkt(PEER, POD, sport, 80, TCP_ACK)) == "pass"
    [c] = [c for c in lab.pol.connections(lab.pid) if c["sport"] == sport]
    assert (c["src"], c["direction"], c["rule"]) == (PEER, "ingress", "default")
    lab.pol.set_pod(lab.pid, one_way(IN))  # a deny-all comes
    assert lab.to_pod(tcp_pkt(PEER, POD, sport, 80, TCP_ACK)) == "drop"
    assert lab.from_pod(tcp_pkt(POD, PEER, 80, sport, TCP_ACK)) == "drop"
    [c] = [c for c in lab.pol.connections(lab.pid) if c["sport"] == sport]
    assert "revoked" in c["flags"]


@pytest.mark.parametrize("d", [IN, OUT], ids=["ingress", "egress"])
@pytest.mark.parametrize("first", [0, TCP_ACK, TCP_FIN, TCP_ACK | TCP_FIN],
                         ids=["no-flags", "ack", "fin", "fin-ack"])
def test_a_segment_that_starts_nothing_does_not_open_the_way_for_a_denied_syn(
        lab: PolLab, d: Direction, first: int) -> None:
    """A peer (ingress) or the pod (egress) that policy denies sends a TCP
    segment that starts nothing first: picked up as the reply of a connection
    the other end opened (the other direction has no policy), it makes an
    entry naming the other end the opener; the SYN that follows on the same
    ports must still be judged, and denied."""
    lab.pol.set_address_set(aset("peer", f"{PEER}/32"))
    lab.pol.set_pod(lab.pid, one_way(d, Rule("peer", ref=ref("peer", d))))
    sport = next(_ports)
    src, dst = (OTHER, POD) if d == IN else (POD, OTHER)
    lab.send(d, tcp_pkt(src, dst, sport, 80, first))
    assert lab.send(d, tcp_pkt(src, dst, sport, 80, TCP_SYN)) == "drop"
    assert lab.send(d, tcp_pkt(src, dst, sport, 80, TCP_SYN)) == "drop"  # retransmitted
    allowed = (PEER, POD) if d == IN else (POD, PEER)
    assert lab.send(d, tcp_pkt(*allowed, next(_ports), 80, TCP_SYN)) == "pass"


def test_mid_stream_tcp_is_picked_up_by_the_reverse_evaluation(lab: PolLab) -> None:
    """A connection open before the pod was selected: its next packet, either
    way, is accepted as the allowed direction would have opened it."""
    lab.pol.set_address_set(aset("peer", f"{PEER}/32"))
    lab.pol.set_pod(lab.pid, PodPolicy(
        DirectionPolicy((), (Rule("peer", (PortMatch(IPPROTO_TCP, 80, 80),), ref=ref("in")),),
                        True),
        DirectionPolicy(isolated=True)))
    # the pod's reply (egress is isolated): accepted as a reply to an allowed ingress
    assert lab.from_pod(tcp_pkt(POD, PEER, 80, 40300, TCP_ACK)) == "pass"
    assert lab.to_pod(tcp_pkt(PEER, POD, 40300, 80, TCP_ACK)) == "pass"
    [c] = lab.pol.connections(lab.pid)
    assert (c["src"], c["sport"], c["direction"], c["rule"]) == (PEER, 40300, "ingress",
                                                                 str(ref("in")))
    # a SYN from the pod is a start: never a reply
    assert lab.from_pod(tcp_pkt(POD, PEER, 80, 40301, TCP_SYN)) == "drop"
    # and a mid-stream packet of a disallowed connection stays dropped
    assert lab.from_pod(tcp_pkt(POD, PEER, 81, 40302, TCP_ACK)) == "drop"


def test_a_closed_connection_is_judged_again_on_a_new_syn(lab: PolLab) -> None:
    lab.pol.set_address_set(aset("peer", f"{PEER}/32"))
    lab.pol.set_pod(lab.pid, one_way(IN, Rule("peer", ref=ref("in"))))
    assert lab.to_pod(tcp_pkt(PEER, POD, 40400, 80)) == "pass"
    assert lab.to_pod(tcp_pkt(PEER, POD, 40400, 80, TCP_FIN | TCP_ACK)) == "pass"
    [c] = lab.pol.connections(lab.pid)
    assert c["flags"] == ["fin_orig"]
    assert lab.to_pod(tcp_pkt(PEER, POD, 40400, 80)) == "pass"
    [c] = lab.pol.connections(lab.pid)
    assert c["flags"] == []


def test_expired_entries_count_as_absent(lab: PolLab) -> None:
    lab.pol.set_address_set(aset("peer", f"{PEER}/32"))
    lab.pol.set_pod(lab.pid, PodPolicy(
        DirectionPolicy(isolated=True),
        DirectionPolicy((), (Rule("peer", ref=ref("out", OUT)),), True)))
    assert lab.from_pod(udp_pkt(POD, PEER, 40500, 53)) == "pass"
    t = lab.net.rt.table("pol_ct", "policy")
    [(k, v)] = [(k, v) for k, v in t.items() if k.scope == lab.pid]
    v.seen_ns -= 61 * 10**9
    t[k] = v
    assert lab.to_pod(udp_pkt(PEER, POD, 53, 40500)) == "drop"


def test_set_update_takes_effect_without_a_rule_rewrite(lab: PolLab) -> None:
    lab.pol.set_address_set(aset("app=web", f"{OTHER}/32"))
    lab.pol.set_pod(lab.pid, PodPolicy(one_way(IN, Rule("app=web", ref=ref("web"))).ingress,
                                       DirectionPolicy(isolated=True)))
    assert lab.to_pod(new_pkt(IN, PEER, IPPROTO_TCP, 80)) == "drop"
    rules = len(list(lab.net.rt.table("pol_rules", "policy").items()))
    gen = lab.net.rt.table("pol_cfgs", "policy")[ct.c_uint32(lab.pid)].gen
    before = lab.pol.writes
    lab.pol.set_address_set(aset("app=web", f"{OTHER}/32", f"{PEER}/32"))  # PEER labelled
    assert lab.pol.writes - before == 2  # one set entry, the epoch
    assert lab.net.rt.table("pol_cfgs", "policy")[ct.c_uint32(lab.pid)].gen == gen
    assert len(list(lab.net.rt.table("pol_rules", "policy").items())) == rules
    sport = next(_ports)
    assert lab.to_pod(tcp_pkt(PEER, POD, sport, 80)) == "pass"
    lab.pol.set_address_set(aset("app=web", f"{OTHER}/32"))  # label removed: revoked
    assert lab.to_pod(tcp_pkt(PEER, POD, sport, 80, TCP_ACK)) == "drop"


# ---------------------------------------------------------------------------- counters
def test_counters_count_the_accepting_rule(lab: PolLab) -> None:
    lab.pol.set_address_sets([aset("a", f"{PEER}/32"), aset("b", f"{OTHER}/32")])
    ra, rb = ref("a", IN, 0), ref("b", IN, 1)
    lab.pol.set_pod(lab.pid, one_way(IN, Rule("a", ref=ra), Rule("b", ref=rb)))
    syn = tcp_pkt(PEER, POD, 40600, 80)
    synack = tcp_pkt(POD, PEER, 80, 40600, TCP_SYN | TCP_ACK)
    assert lab.to_pod(syn) == "pass"
    assert lab.from_pod(synack) == "pass"  # the reply counts for the same rule, apart
    assert lab.to_pod(new_pkt(IN, "10.9.9.9", IPPROTO_UDP, 1)) == "drop"
    by_rule = {c["rule"]: c for c in lab.pol.counters(lab.pid)}
    frame_len = len(eth(lab.dst_mac, lab.dst_mac, ETH_P_IP, syn))
    assert (by_rule[str(ra)]["packets"], by_rule[str(ra)]["replyPackets"]) == (1, 1)
    assert by_rule[str(ra)]["bytes"] == by_rule[str(ra)]["replyBytes"] == frame_len
    assert by_rule[str(ra)]["action"] == "ACCEPT" and by_rule[str(ra)]["direction"] == "ingress"
    assert by_rule[str(rb)]["packets"] == 0
    assert [c["packets"] for c in lab.pol.counters(lab.pid)
            if c["rule"] == "isolation"] == [1]
    # the counter stays with its rule across an unrelated change
    lab.pol.set_pod(lab.pid, one_way(IN, Rule("b", ref=rb), Rule("a", ref=ra)))
    assert {c["rule"]: (c["packets"], c["replyPackets"])
            for c in lab.pol.counters(lab.pid)}[str(ra)] == (1, 1)
    assert lab.pol.drops(lab.pid)["ingress"]["packets"] == 1
    t = lab.net.rt.table("pol_ctrs", "policy")
    assert int(sum(c.packets for c in t[maps.PolCtrKey(lab.pid, CTR_DROPS)])) == 1


# ---------------------------------------------------------------------------- fragments
def test_replies_are_counted_apart_on_the_row_of_what_opened_them(lab: PolLab) -> None:
    """Every packet of a connection counts for what accepted it (a rule, or
    the default of the direction it was opened in): the ones going its way
    as packets, the others as replies; the pod's answers never add up with
    what it received on an ingress rule's row, nor its peers' answers on an
    egress row. Also for an ICMP error about a connection, one picked up
    mid-stream by the reverse evaluation, the fragments of a reply, and a
    reply dropped after a revocation."""
    lab.pol.set_address_sets([aset("peer", f"{PEER}/32"), aset("other", f"{OTHER}/32")])
    rin, rout = ref("in"), ref("out", OUT)
    lab.pol.set_pod(lab.pid, PodPolicy(
        DirectionPolicy((), (Rule("peer", (PortMatch(IPPROTO_TCP, 80, 80),
                                           PortMatch(IPPROTO_UDP, 53, 53)), ref=rin),),
                        True, (ref("iso", IN, -1),)),
        DirectionPolicy((), (Rule("other", (PortMatch(IPPROTO_UDP, 5353, 5353),), ref=rout),),
                        True, (ref("iso", OUT, -1),))))

    def rows() -> dict[tuple[str, str], tuple[int, int]]:
        return {(c["rule"], c["direction"]): (c["packets"], c["replyPackets"])
                for c in lab.pol.counters(lab.pid)}

    # in: 3 packets to the pod, 2 answers out
    assert lab.to_pod(tcp_pkt(PEER, POD, 40800, 80)) == "pass"
    assert lab.from_pod(tcp_pkt(POD, PEER, 80, 40800, TCP_SYN | TCP_ACK)) == "pass"
    assert lab.to_pod(tcp_pkt(PEER, POD, 40800, 80, TCP_ACK)) == "pass"
    assert lab.to_pod(tcp_pkt(PEER, POD, 40800, 80, TCP_ACK)) == "pass"
    assert lab.from_pod(tcp_pkt(POD, PEER, 80, 40800, TCP_ACK)) == "pass"
    # out: 1 query, 1 answer
    assert lab.from_pod(udp_pkt(POD, OTHER, 40801, 5353)) == "pass"
    assert lab.to_pod(udp_pkt(OTHER, POD, 5353, 40801)) == "pass"
    got = rows()
    assert got[(str(rin), "ingress")] == (3, 2) and got[(str(rout), "egress")] == (1, 1)
    # an ICMP error about the pod's query comes back: a reply of the egress rule
    query = udp_pkt(POD, OTHER, 40802, 5353)
    assert lab.from_pod(query) == "pass"
    assert lab.to_pod(ipv4("10.1.1.1", POD, IPPROTO_ICMP, icmp_error(3, 3, query[:28]))) == \
        "pass"
    assert rows()[(str(rout), "egress")] == (2, 2)
    # a connection open before the pod was selected: the pod's mid-stream
    # segment is accepted as the reply of one opened in, and counted so
    assert lab.from_pod(tcp_pkt(POD, PEER, 80, 40803, TCP_ACK)) == "pass"
    assert lab.to_pod(tcp_pkt(PEER, POD, 40803, 80, TCP_ACK)) == "pass"
    assert rows()[(str(rin), "ingress")] == (4, 3)
    # a fragmented answer: its first fragment and the ones after it are replies
    assert lab.to_pod(udp_pkt(PEER, POD, 40804, 53)) == "pass"
    data = bytes(range(256)) * 12
    frags = fragments(POD, PEER, IPPROTO_UDP, udp_csum(POD, PEER, 53, 40804, data), 0x5201)
    assert [lab.from_pod(p) for p in frags] == ["pass"] * 3
    assert rows()[(str(rin), "ingress")] == (5, 6)
    # revoked: the pod's next answer is judged again as the connection was
    # opened (ingress), dropped by ingress isolation, counted there as a reply
    lab.pol.set_address_set(aset("peer", f"{OTHER}/32"))
    assert lab.from_pod(tcp_pkt(POD, PEER, 80, 40800, TCP_ACK)) == "drop"
    got = rows()
    assert got[(str(rin), "ingress")] == (5, 6) and got[("isolation", "ingress")] == (0, 1)
    assert lab.pol.drops(lab.pid)["egress"]["packets"] == 1
    # egress open: what the pod opens counts for egress's default, answers as replies
    lab.pol.set_pod(lab.pid, one_way(IN, Rule("peer", ref=rin)))
    assert lab.from_pod(udp_pkt(POD, PEER, 40805, 5353)) == "pass"
    assert lab.to_pod(udp_pkt(PEER, POD, 5353, 40805)) == "pass"
    got = rows()
    assert got[("default", "egress")] == (1, 1) and got[("default", "ingress")] == (0, 0)


def test_fragments_follow_their_first(lab: PolLab) -> None:
    lab.pol.set_address_set(aset("peer", f"{PEER}/32"))
    lab.pol.set_pod(lab.pid, one_way(IN, Rule("peer", (PortMatch(IPPROTO_UDP, 53, 53),),
                                              ref=ref("dns"))))
    data = bytes(range(256)) * 12
    ok = fragments(PEER, POD, IPPROTO_UDP, udp_csum(PEER, POD, 40700, 53, data), 0x5101)
    no = fragments(PEER, POD, IPPROTO_UDP, udp_csum(PEER, POD, 40701, 54, data), 0x5102)
    assert len(ok) == 3
    assert [lab.to_pod(p) for p in ok] == ["pass"] * 3
    assert [lab.to_pod(p) for p in no] == ["drop"] * 3
    late = fragments(PEER, POD, IPPROTO_UDP, udp_csum(PEER, POD, 40702, 53, data), 0x5103)
    assert lab.to_pod(late[1]) == "drop"  # before its first: cannot be judged
    assert lab.net.rt.cube_drops("pol").get("fragment", 0) >= 1


# ---------------------------------------------------------------------------- explain
def test_explain_agrees_with_the_data_path(lab: PolLab) -> None:
    """Random policies and packets: the BPF verdict (and the rule counted)
    must be what explain() says, which evaluates the maps in Python."""
    rng = random.Random(11)
    peers = [f"10.{rng.choice((1, 2))}.{rng.randrange(4)}.{rng.randrange(1, 4)}"
             for _ in range(12)]
    sets = [aset("s1", "10.1.0.0/16"), aset("s2", "10.2.0.0/22"),
            aset("s3", "10.1.2.0/24", "10.2.1.0/24"),
            aset("s4", SetEntry("10.1.1.1/32", IPPROTO_TCP, 80),
                 SetEntry("10.2.2.2/32", IPPROTO_UDP, 53)),
            aset("s5", "0.0.0.0/0")]
    lab.pol.set_address_sets(sets)
    protos = (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP, IPPROTO_ICMP)

    def rule(d: Direction, i: int, tier: str, actions: tuple[Action, ...]) -> Rule:
        s = rng.choice(sets).name
        if s == "s4" and rng.random() < 0.7:
            return Rule(s, named_port=True, action=rng.choice(actions),
                        ref=ref(f"{tier}{i}", d, i, CNP if tier != "ns" else "NetworkPolicy"))
        ports = tuple(PortMatch(rng.choice(protos[:3]), lo, lo + rng.choice((0, 0, 20)))
                      for lo in rng.sample((53, 80, 443, 8080), rng.randrange(3)))
        return Rule(s, ports, action=rng.choice(actions),
                    ref=ref(f"{tier}{i}", d, i, CNP if tier != "ns" else "NetworkPolicy"))

    cases = 0
    for _ in range(6):
        def direction(d: Direction) -> DirectionPolicy:
            iso = rng.random() < 0.5
            return DirectionPolicy(
                tuple(rule(d, i, "adm", tuple(Action)) for i in range(rng.randrange(4))),
                tuple(rule(d, i, "ns", (Action.ACCEPT,)) for i in range(rng.randrange(4))),
                iso, (ref("iso", d, -1),) if iso else (),
                tuple(rule(d, i, "base", tuple(Action)) for i in range(rng.randrange(3))))
        lab.pol.set_pod(lab.pid, PodPolicy(direction(IN), direction(OUT)))
        for _ in range(20):
            d = rng.choice((IN, OUT))
            peer, proto = rng.choice(peers), rng.choice(protos)
            dport = rng.choice((53, 80, 81, 443, 460, 8080))
            want, who = lab.pol.explain(lab.pid, d, peer, proto, dport)
            before = {c["rule"]: c["packets"] for c in lab.pol.counters(lab.pid)
                      if c["direction"] == ("ingress" if d == IN else "egress")}
            got = lab.send(d, new_pkt(d, peer, proto, dport))
            assert got == ("pass" if want == Action.ACCEPT else "drop"), (d, peer, proto, dport)
            after = {c["rule"]: c["packets"] for c in lab.pol.counters(lab.pid)
                     if c["direction"] == ("ingress" if d == IN else "egress")}
            moved = {k for k in after if after[k] != before.get(k)}
            if who is None:
                assert moved <= {"default"}, moved
            elif who.index < 0:
                assert moved == {"isolation"}
            else:
                assert moved == {str(who)}
            cases += 1
    assert cases == 120


# ---------------------------------------------------------------------------- control
def test_identical_set_pod_writes_nothing(lab: PolLab) -> None:
    lab.pol.set_address_set(aset("peer", f"{PEER}/32"))
    policy = one_way(IN, Rule("peer", ref=ref("in")))
    lab.pol.set_pod(lab.pid, policy)
    before = lab.pol.writes
    lab.pol.set_pod(lab.pid, policy)
    lab.pol.set_address_set(aset("peer", f"{PEER}/32"))
    assert lab.pol.writes == before
    # a changed policy: a new generation, the old one deleted
    gen = lab.net.rt.table("pol_cfgs", "policy")[ct.c_uint32(lab.pid)].gen
    lab.pol.set_pod(lab.pid, one_way(IN, Rule("peer", ref=ref("in2"))))
    rules = lab.net.rt.table("pol_rules", "policy")
    assert {(k.gen, k.idx) for k, _ in rules.items() if k.port == lab.pid} == {(gen + 1, 0)}


def test_limits_and_unknown_sets(lab: PolLab) -> None:
    lab.pol.set_address_set(aset("peer", f"{PEER}/32"))
    with pytest.raises(PolicyError, match="unknown address set"):
        lab.pol.set_pod(lab.pid, one_way(IN, Rule("nope")))
    with pytest.raises(PolicyError, match="at most"):
        lab.pol.set_pod(lab.pid, one_way(IN, *[Rule("peer")] * (MAX_RULES + 1)))
    assert lab.pol.pods == {}


def test_the_last_of_max_rules_is_reached(lab: PolLab) -> None:
    """Every tier together holds MAX_RULES rules a direction: the program's
    loop bound reaches the last one."""
    lab.pol.set_address_sets([aset("peer", f"{PEER}/32"), aset("none")])
    admin = tuple(Rule("none", action=Action.DENY, ref=ref("a", IN, i, CNP)) for i in range(20))
    ns = tuple(Rule("none", ref=ref("n", IN, i)) for i in range(MAX_RULES - 21))
    last = Rule("peer", (PortMatch(IPPROTO_TCP, 80, 80),), ref=ref("last", IN, 0))
    lab.pol.set_pod(lab.pid, one_way(IN, *ns, last, admin=admin))
    assert len(lab.pol.pods[lab.pid].policy.ingress.rules) == MAX_RULES
    assert lab.to_pod(new_pkt(IN, PEER, IPPROTO_TCP, 80)) == "pass"
    assert lab.to_pod(new_pkt(IN, PEER, IPPROTO_TCP, 81)) == "drop"
    assert lab.pol.explain(lab.pid, IN, PEER, IPPROTO_TCP, 80) == (Action.ACCEPT, last.ref)


def test_gc_and_removal(lab: PolLab) -> None:
    lab.pol.set_address_sets([aset("used", f"{PEER}/32"), aset("unused", f"{OTHER}/32")])
    lab.pol.set_pod(lab.pid, one_way(IN, Rule("used", ref=ref("in"))))
    assert lab.pol.gc_sets() == ["unused"]
    assert lab.to_pod(new_pkt(IN, PEER, IPPROTO_TCP, 80)) == "pass"
    lab.pol.remove_pod(lab.pid)
    assert lab.pol.connections(lab.pid) == []
    assert lab.to_pod(new_pkt(IN, OTHER, IPPROTO_TCP, 80)) == "pass"  # nothing enforced
    assert lab.pol.gc_sets() == ["used"]
    assert list(lab.net.rt.table("pol_sets", "policy").items()) == []


def test_policy_json_round_trips() -> None:
    p = PodPolicy(
        DirectionPolicy((Rule("a", (PortMatch(IPPROTO_TCP, 1, 2),), action=Action.PASS,
                              ref=ref("x", IN, 0, CNP)),),
                        (Rule("b", named_port=True, ref=ref("y")),), True,
                        (ref("y", IN, -1),), (Rule("c", action=Action.DENY),)),
        DirectionPolicy())
    assert policy_of(policy_json(p)) == p
    assert maps.POL_PORTS == PORTS_PER_RULE  # a rule's ports fit the C struct


def test_adoption_keeps_state(mod: PolLab) -> None:
    """A second PolicyCube on the same runtime (an agent restart reads the
    cube's saved config) knows the pods, sets and counters and writes
    nothing for an unchanged policy."""
    lab = mod
    try:
        lab.pol.set_address_set(aset("peer", f"{PEER}/32"))
        policy = one_way(IN, Rule("peer", ref=ref("in")))
        lab.pol.set_pod(lab.pid, policy)
        assert lab.to_pod(new_pkt(IN, PEER, IPPROTO_TCP, 80)) == "pass"
        wide = AddressSet("wide", frozenset({SetEntry("10.9.0.0/16"),
                                             SetEntry(f"{OTHER}/32", IPPROTO_TCP, 8080)}))
        lab.pol.set_address_set(wide)
        again = PolicyCube(lab.net.rt, "pol")
        assert again.pods[lab.pid].policy == policy
        # the sets' entries are read back from the pinned trie, not the state
        assert "entries" not in json.dumps(lab.pol.cube.config["sets"])
        assert again.sets == lab.pol.sets and again.sets["wide"] == wide
        again.set_pod(lab.pid, policy)
        again.set_address_set(aset("peer", f"{PEER}/32"))
        again.set_address_set(wide)
        assert again.writes == 0
        assert {c["rule"]: c["packets"] for c in again.counters(lab.pid)}[str(ref("in"))] == 1
        with pytest.raises(Exception, match="one policy cube"):
            PolicyCube(lab.net.rt, "pol2")
        # an agent from before the reply counters left none: adoption makes them
        ctrs = lab.net.rt.table("pol_ctrs", "policy")
        cid = again.pods[lab.pid].counters[ref("in")]
        del ctrs[maps.PolCtrKey(lab.pid, cid | CTR_REPLY)]
        upgraded = PolicyCube(lab.net.rt, "pol")
        assert upgraded.writes == 1
        [conn] = upgraded.connections(lab.pid)  # the SYN above: its answer is a reply
        assert lab.from_pod(tcp_pkt(POD, PEER, 80, conn["sport"], TCP_SYN | TCP_ACK)) == "pass"
        assert {c["rule"]: c["replyPackets"]
                for c in upgraded.counters(lab.pid)}[str(ref("in"))] == 1
    finally:
        lab.pol.remove_pod(lab.pid)
        lab.pol.gc_sets()


def test_policy_among_other_stacked_cubes(lab: PolLab) -> None:
    """As the node stacks it with an lbrp: another transparent cube before it
    on the ingress hook and after it on the egress hook. Its passes (from
    either of its programs) go on to the next cube of the hook."""
    rt = lab.net.rt
    fw = Firewall(rt, "fw-policy-test", [], "allow")
    try:
        rt.set_hook(lab.port, maps.HOOK_INGRESS, [rt.stacked("fw-policy-test"), rt.stacked("pol")])
        rt.set_hook(lab.port, maps.HOOK_EGRESS, [rt.stacked("pol"), rt.stacked("fw-policy-test")])
        lab.pol.set_address_set(aset("peer", f"{PEER}/32"))
        lab.pol.set_pod(lab.pid, PodPolicy(
            DirectionPolicy((), (Rule("peer", (PortMatch(IPPROTO_TCP, 80, 80),),
                                      ref=ref("in")),), True),
            DirectionPolicy(isolated=True)))
        assert lab.to_pod(tcp_pkt(PEER, POD, 40800, 80)) == "pass"
        assert lab.from_pod(tcp_pkt(POD, PEER, 80, 40800, TCP_SYN | TCP_ACK)) == "pass"
        assert lab.from_pod(tcp_pkt(POD, PEER, 81, 40801, TCP_ACK)) == "drop"  # judged twice
        assert lab.to_pod(tcp_pkt(OTHER, POD, 40802, 80)) == "drop"
        # ingress: the firewall runs first (3 packets); egress: only what the policy passed
        assert fw.hits() == {"default: allow": 3}
    finally:
        rt.set_hook(lab.port, maps.HOOK_INGRESS, [rt.stacked("pol")])
        rt.set_hook(lab.port, maps.HOOK_EGRESS, [rt.stacked("pol")])
        fw.delete()


def test_an_agent_restart_keeps_policies_and_connections() -> None:
    """The pinned maps outlive the agent: a new runtime adopting them and a
    new PolicyCube find the pod's policy, its counters and its tracked
    connections, and change nothing."""
    with cube_lab() as cl:
        net, rt, port, dst_mac = cl.net, cl.rt, cl.ports["a"], cl.dst_mac
        pol = PolicyCube(rt, "pol")
        rt.set_hook(port, maps.HOOK_INGRESS, [rt.stacked("pol")])
        rt.set_hook(port, maps.HOOK_EGRESS, [rt.stacked("pol")])
        pol.set_address_set(aset("peer", f"{PEER}/32"))
        policy = PodPolicy(DirectionPolicy((), (Rule("peer", ref=ref("in")),), True),
                           DirectionPolicy(isolated=True))
        pol.set_pod(port.id, policy)
        first = PolLab(net, pol, port, dst_mac)
        assert first.to_pod(tcp_pkt(PEER, POD, 40900, 80)) == "pass"
        rt.save()
        rt.abandon()
        rt2 = Runtime(net.name, netns=net.name, pin_root=net.pin_root)
        try:
            rt2.open()
            assert rt2.adopted
            net.rt = rt2
            Bridge(rt2, "b")
            again = PolicyCube(rt2, "pol")
            after = PolLab(net, again, rt2.ports[port.id], first.dst_mac)
            epoch = again.epoch
            again.set_pod(port.id, policy)
            assert again.writes == 0 and again.epoch == epoch
            # the connection goes on (the pod's egress is isolated: only as a reply)
            assert after.from_pod(tcp_pkt(POD, PEER, 80, 40900, TCP_ACK)) == "pass"
            assert after.from_pod(tcp_pkt(POD, PEER, 80, 40901, TCP_SYN)) == "drop"
            assert {c["rule"]: (c["packets"], c["replyPackets"])
                    for c in again.counters(port.id)}[str(ref("in"))] == (1, 1)
        finally:
            rt2.close()
