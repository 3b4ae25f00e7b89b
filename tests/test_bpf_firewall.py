"""The firewall cube's programs on crafted frames (BPF_PROG_TEST_RUN).

Topology: bridge `b` with port `a` (veth u1) and port `b` (veth u2), behind
which the destination MAC of every test frame is learned. Each test stacks a
firewall of its own on the ingress hook of `a` and removes it afterwards. A
frame enters through the entry program of u1: the ingress hook runs the
program in the firewall's own slot, then the bridge forwards what it let
through to u2 (TC_ACT_REDIRECT, `b` tx +1).

The runtime is shared by the module, so each specialisation of the firewall
(rt.variants) is compiled once.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import itertools
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from bpfunit import (
    BROADCAST,
    ETH_P_ARP,
    ETH_P_IP,
    IPPROTO_ICMP,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    UnitNet,
    arp,
    cube_lab,
    eth,
    fragments,
    icmp_echo,
    ipv4,
    ipv4_fragment,
    random_mac,
    tcp,
    udp_csum,
)

from pcn_agent.dataplane import maps
from pcn_agent.dataplane.cubes.bridge import Bridge
from pcn_agent.dataplane.cubes.firewall import GENERIC, Firewall, specialisation
from pcn_agent.dataplane.runtime import PortCounters, PortState
from pcn_crds.rules import Rule, parse_rule
from pcn_testsupport.testrun import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT

pytestmark = [pytest.mark.bpf,
              pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning")]

_fw_names = itertools.count(1)


@dataclass
class FwLab:
    net: UnitNet
    b: Bridge
    ports: dict[str, PortState]
    dst_mac: str

    def counters(self) -> dict[str, PortCounters]:
        return {name: self.net.rt.port_counters(p) for name, p in self.ports.items()}


@pytest.fixture(scope="module")
def lab() -> Iterator[FwLab]:
    with cube_lab() as cl:
        yield FwLab(cl.net, cl.bridge, cl.ports, cl.dst_mac)


FwFactory = Callable[..., Firewall]


@pytest.fixture
def stack(lab: FwLab) -> Iterator[FwFactory]:
    """stack(rules, default, hook, allow_replies, fast): a new firewall on a
    hook of port a (ingress unless told), taken off and deleted after the
    test; its entries in the shared maps are checked gone."""
    made: list[Firewall] = []
    rt = lab.net.rt
    port = lab.ports["a"]

    def make(rules: list[str] | list[Rule], default: str = "allow",
             hook: int = maps.HOOK_INGRESS, allow_replies: bool = False,
             fast: bool = False) -> Firewall:
        assert not made, "one firewall per test"
        fw = Firewall(rt, f"fw{next(_fw_names)}",
                      [r if isinstance(r, Rule) else parse_rule(r) for r in rules], default,
                      fast=fast, allow_replies=allow_replies)
        made.append(fw)
        rt.set_hook(port, hook, [rt.stacked(fw.name)])
        return fw

    try:
        yield make
    finally:
        rt.set_hook(port, maps.HOOK_INGRESS, [])
        rt.set_hook(port, maps.HOOK_EGRESS, [])
        for fw in made:
            slot, inst = fw.cube.slot, fw.cube.id
            fw.delete()
            assert fw.name not in rt.cubes
            assert map_entries(lab, inst) == (0, 0, 0)
            with pytest.raises(KeyError):
                rt.table("pcn_progs")[ct.c_int(slot)]  # the slot is empty again


def map_entries(lab: FwLab, inst: int) -> tuple[int, int, int]:
    """A firewall instance's entries in the shared maps: (LPM entries,
    vectors, hit counters), whatever their generation."""
    # any compiled variant's tables: they share the pinned maps (loading the
    # firewall type itself would take a program slot)
    module = next(v.module for k, v in lab.net.rt.variants.items() if k[0] == "firewall")
    return tuple(sum(1 for k in module[name].keys() if k.inst == inst)  # type: ignore[return-value]
                 for name in (b"fw_lpm", b"fw_vecs", b"fw_rule_hits"))


# ---------------------------------------------------------------------------- frames
def frame(lab: FwLab, proto: int = IPPROTO_TCP, src: str = "10.0.1.1", dst: str = "10.0.2.1",
          sport: int = 40000, dport: int = 80) -> bytes:
    if proto == IPPROTO_TCP:
        l4 = tcp(src, dst, sport, dport)
    elif proto == IPPROTO_UDP:
        l4 = udp_csum(src, dst, sport, dport, b"data")
    elif proto == IPPROTO_ICMP:
        l4 = icmp_echo(sport, 1, b"ping")
    else:  # SCTP: common header (ports, verification tag, CRC32c left 0)
        l4 = struct.pack("!HHII", sport, dport, 1, 0)
    return eth(lab.dst_mac, random_mac(), ETH_P_IP, ipv4(src, dst, proto, l4))


def verdict(lab: FwLab, fw: Firewall, pkt: bytes) -> str:
    """Send `pkt` from port a's netdev: "pass" or "drop", after checking that
    the retval, the frame and every counter tell the same story."""
    drops, before = lab.net.rt.cube_drops(fw.name), lab.counters()
    res = lab.net.run(lab.net.rt._entry_fds["pcn_ingress"], pkt, ifindex=lab.net.ifindex["u1"])
    after = lab.counters()
    assert after["a"].rx_packets - before["a"].rx_packets == 1
    filtered = lab.net.rt.cube_drops(fw.name).get("filtered", 0) - drops.get("filtered", 0)
    if res.retval == TC_ACT_REDIRECT:
        assert res.data == pkt  # a firewall never touches the frame
        assert after["b"].tx_packets - before["b"].tx_packets == 1
        assert (after["a"].drops, filtered) == (before["a"].drops, 0)
        return "pass"
    assert res.retval == TC_ACT_SHOT, f"unexpected retval {res.retval}"
    assert after["b"].tx_packets == before["b"].tx_packets
    assert after["a"].drops - before["a"].drops == 1  # counted on the port it is stacked on
    assert filtered == 1  # and on the firewall instance
    return "drop"


def default_hits(fw: Firewall) -> int:
    return fw.hits()[f"default: {fw.default}"]


def slot_prog_id(lab: FwLab, fw: Firewall) -> int:
    """The program in the firewall's slot, by id (what the kernel reports for a
    program array element)."""
    assert fw.cube.slot is not None
    return lab.net.rt.table("pcn_progs")[ct.c_int(fw.cube.slot)].value


def prog_id(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("prog_id:"):
                return int(line.split()[1])
    raise AssertionError(f"fd {fd} is not a BPF program")


def variant_id(lab: FwLab, max_rules: int, need_l4: int) -> int:
    key = ("firewall", (("FW_MAX_RULES", max_rules), ("FW_NEED_L4", need_l4)))
    return prog_id(lab.net.rt.variants[key].fd)


# ---------------------------------------------------------------------------- matching
def test_first_matching_rule_wins(lab: FwLab, stack: FwFactory) -> None:
    fw = stack(["allow tcp dport 80", "drop tcp", "allow udp"], default="drop")
    assert verdict(lab, fw, frame(lab, IPPROTO_TCP, dport=80)) == "pass"
    assert fw.rule_hits() == [1, 0, 0]
    assert verdict(lab, fw, frame(lab, IPPROTO_TCP, dport=81)) == "drop"
    assert fw.rule_hits() == [1, 1, 0]
    assert verdict(lab, fw, frame(lab, IPPROTO_UDP, dport=80)) == "pass"
    assert fw.rule_hits() == [1, 1, 1]
    assert verdict(lab, fw, frame(lab, IPPROTO_ICMP)) == "drop"  # no rule: the default
    assert fw.rule_hits() == [1, 1, 1]
    assert default_hits(fw) == 1
    assert fw.hits() == {"0: allow tcp dport 80": 1, "1: drop tcp": 1, "2: allow udp": 1,
                         "default: drop": 1}

    # the same rules in another order decide otherwise
    fw.set_rules([parse_rule("drop tcp"), parse_rule("allow tcp dport 80")], "allow")
    assert verdict(lab, fw, frame(lab, IPPROTO_TCP, dport=80)) == "drop"
    assert fw.rule_hits() == [1, 0]


def test_match_after_many_rules(lab: FwLab, stack: FwFactory) -> None:
    """The loop bound is the rule count rounded up to a power of two (8 here):
    the fifth rule is reached, and rules past the count are never read."""
    rules = [f"allow from 10.9.{i}.0/24" for i in range(4)] + ["drop from 10.0.1.0/24"]
    fw = stack(rules)
    assert fw.spec == {"FW_MAX_RULES": 8, "FW_NEED_L4": 0}
    assert verdict(lab, fw, frame(lab, src="10.0.1.7")) == "drop"
    assert verdict(lab, fw, frame(lab, src="10.9.3.7")) == "pass"
    assert verdict(lab, fw, frame(lab, src="10.0.7.7")) == "pass"
    assert fw.rule_hits() == [0, 0, 0, 1, 1]
    assert default_hits(fw) == 1


@pytest.mark.parametrize("default", ["allow", "drop"])
def test_default_action_applies_when_no_rule_matches(lab: FwLab, stack: FwFactory,
                                                      default: str) -> None:
    fw = stack(["drop udp dport 9"], default=default)
    want = "pass" if default == "allow" else "drop"
    assert verdict(lab, fw, frame(lab, IPPROTO_TCP)) == want
    assert verdict(lab, fw, frame(lab, IPPROTO_ICMP)) == want
    assert fw.hits() == {"0: drop udp dport 9": 0, f"default: {default}": 2}


def test_empty_rule_set_is_just_the_default(lab: FwLab, stack: FwFactory) -> None:
    fw = stack([], default="drop")
    assert fw.spec == {"FW_MAX_RULES": 1, "FW_NEED_L4": 0}
    assert verdict(lab, fw, frame(lab)) == "drop"
    assert fw.hits() == {"default: drop": 1}


@pytest.mark.parametrize("src,dst,want", [
    ("10.0.1.0", "10.0.2.1", "drop"),
    ("10.0.1.255", "10.0.2.1", "drop"),
    ("10.0.0.255", "10.0.2.1", "pass"),   # just below the source network
    ("10.0.2.1", "10.0.3.128", "drop"),
    ("10.0.2.1", "10.0.3.255", "drop"),
    ("10.0.2.1", "10.0.3.127", "pass"),   # just below the destination network
    ("10.0.2.1", "10.0.4.128", "pass"),
])
def test_source_and_destination_networks(lab: FwLab, stack: FwFactory, src: str, dst: str,
                                         want: str) -> None:
    fw = stack(["drop from 10.0.1.0/24", "drop to 10.0.3.128/25"])
    assert verdict(lab, fw, frame(lab, src=src, dst=dst)) == want


def test_source_and_destination_together(lab: FwLab, stack: FwFactory) -> None:
    fw = stack(["drop from 10.0.1.0/24 to 10.0.2.5/32"])
    assert verdict(lab, fw, frame(lab, src="10.0.1.9", dst="10.0.2.5")) == "drop"
    assert verdict(lab, fw, frame(lab, src="10.0.1.9", dst="10.0.2.6")) == "pass"
    assert verdict(lab, fw, frame(lab, src="10.0.5.9", dst="10.0.2.5")) == "pass"


@pytest.mark.parametrize("proto,want", [(IPPROTO_ICMP, "drop"), (IPPROTO_UDP, "pass"),
                                        (IPPROTO_TCP, "pass")])
def test_protocol(lab: FwLab, stack: FwFactory, proto: int, want: str) -> None:
    fw = stack(["drop icmp"])
    assert verdict(lab, fw, frame(lab, proto)) == want


@pytest.mark.parametrize("rule,proto,sport,dport,want", [
    ("drop tcp dport 8000-8080", IPPROTO_TCP, 40000, 7999, "pass"),
    ("drop tcp dport 8000-8080", IPPROTO_TCP, 40000, 8000, "drop"),
    ("drop tcp dport 8000-8080", IPPROTO_TCP, 40000, 8080, "drop"),
    ("drop tcp dport 8000-8080", IPPROTO_TCP, 40000, 8081, "pass"),
    ("drop tcp dport 8000-8080", IPPROTO_UDP, 40000, 8000, "pass"),  # another protocol
    ("drop udp sport 53", IPPROTO_UDP, 53, 40000, "drop"),
    ("drop udp sport 53", IPPROTO_UDP, 52, 40000, "pass"),
    ("drop udp sport 53", IPPROTO_UDP, 54, 40000, "pass"),
    ("drop udp sport 53", IPPROTO_UDP, 40000, 53, "pass"),  # a destination port 53
    ("drop tcp sport 1000-2000 dport 22", IPPROTO_TCP, 1500, 22, "drop"),
    ("drop tcp sport 1000-2000 dport 22", IPPROTO_TCP, 999, 22, "pass"),
    ("drop tcp sport 1000-2000 dport 22", IPPROTO_TCP, 2001, 22, "pass"),
    ("drop tcp sport 1000-2000 dport 22", IPPROTO_TCP, 1500, 23, "pass"),
    ("drop tcp dport 65535", IPPROTO_TCP, 1, 65535, "drop"),
    ("drop sctp dport 80", IPPROTO_SCTP, 40000, 80, "drop"),
    ("drop sctp dport 80", IPPROTO_SCTP, 40000, 81, "pass"),
])
def test_port_ranges(lab: FwLab, stack: FwFactory, rule: str, proto: int, sport: int,
                     dport: int, want: str) -> None:
    fw = stack([rule])
    assert fw.spec["FW_NEED_L4"] == 1
    assert verdict(lab, fw, frame(lab, proto, sport=sport, dport=dport)) == want


def test_arp_is_never_filtered(lab: FwLab, stack: FwFactory) -> None:
    fw = stack(["drop from 0.0.0.0/0"], default="drop")
    mac = random_mac()
    req = eth(BROADCAST, mac, ETH_P_ARP, arp(1, mac, "10.0.1.1", "00:00:00:00:00:00", "10.0.2.1"))
    res = lab.net.run(lab.net.rt._entry_fds["pcn_ingress"], req, ifindex=lab.net.ifindex["u1"])
    assert res.retval == TC_ACT_SHOT  # flooded by the bridge, not dropped by the firewall
    assert lab.net.rt.cube_drops(fw.name) == {}
    assert fw.rule_hits() == [0] and default_hits(fw) == 0
    # the bridge saw it: it learned the sender on port a
    assert {e.mac: e.port for e in lab.b.fdb()}.get(mac) == "a"


def test_egress_hook_filters_what_goes_to_the_netdev(lab: FwLab, stack: FwFactory) -> None:
    """On the egress hook of a netdev-peered port the firewall runs in the tc
    egress entry program: what it allows leaves (TC_ACT_OK), the rest is dropped."""
    fw = stack(["drop tcp dport 22"], hook=maps.HOOK_EGRESS)
    run = lab.net.rt._entry_fds["pcn_egress"]
    ssh, web = frame(lab, dport=22), frame(lab, dport=80)
    before = lab.counters()
    assert lab.net.run(run, ssh, ifindex=lab.net.ifindex["u1"]).retval == TC_ACT_SHOT
    res = lab.net.run(run, web, ifindex=lab.net.ifindex["u1"])
    assert (res.retval, res.data) == (TC_ACT_OK, web)
    assert lab.counters()["a"].drops - before["a"].drops == 1
    assert lab.net.rt.cube_drops(fw.name) == {"filtered": 1}
    assert fw.rule_hits() == [1] and default_hits(fw) == 1
    # the ingress side has no firewall
    assert verdict(lab, fw, ssh) == "pass"


def test_variant_program_run_directly_with_chain_metadata(lab: FwLab, stack: FwFactory) -> None:
    """The specialised program itself, with skb->cb as pcn_hook_run sets it
    (port, hook | pos << 8 | ctx << 16, instance): a pass continues to the bridge."""
    fw = stack(["drop udp"])
    variant = lab.net.rt.variants[("firewall", (("FW_MAX_RULES", 1), ("FW_NEED_L4", 0)))]
    cb = [lab.ports["a"].id, maps.HOOK_INGRESS, fw.cube.id]
    before = lab.counters()
    res = lab.net.run(variant.fd, frame(lab, IPPROTO_TCP), cb=cb, ifindex=lab.net.ifindex["u1"])
    assert res.retval == TC_ACT_REDIRECT
    assert lab.counters()["b"].tx_packets - before["b"].tx_packets == 1
    res = lab.net.run(variant.fd, frame(lab, IPPROTO_UDP), cb=cb, ifindex=lab.net.ifindex["u1"])
    assert res.retval == TC_ACT_SHOT
    assert fw.rule_hits() == [1] and default_hits(fw) == 1


# ---------------------------------------------------------------------------- specialisation
@pytest.mark.parametrize("rules,want", [
    ([], {"FW_MAX_RULES": 1, "FW_NEED_L4": 0}),
    (["drop from 10.0.0.0/8"], {"FW_MAX_RULES": 1, "FW_NEED_L4": 0}),
    (["drop tcp", "allow udp to 10.0.0.1"], {"FW_MAX_RULES": 2, "FW_NEED_L4": 0}),
    (["drop tcp", "drop udp", "drop icmp"], {"FW_MAX_RULES": 4, "FW_NEED_L4": 0}),
    (["drop tcp", "drop udp sport 5"], {"FW_MAX_RULES": 2, "FW_NEED_L4": 1}),
    (["allow tcp dport 1-65535"] * 64, {"FW_MAX_RULES": 64, "FW_NEED_L4": 1}),
])
def test_specialisation(rules: list[str], want: dict[str, int]) -> None:
    assert specialisation([parse_rule(r) for r in rules]) == want


def test_program_in_the_slot_follows_the_shape_of_the_rules(lab: FwLab,
                                                             stack: FwFactory) -> None:
    fw = stack(["drop tcp"])
    no_l4 = variant_id(lab, 1, 0)
    assert slot_prog_id(lab, fw) == no_l4
    assert verdict(lab, fw, frame(lab, IPPROTO_TCP, dport=22)) == "drop"

    fw.set_rules([parse_rule("drop tcp dport 22")])
    with_l4 = variant_id(lab, 1, 1)
    assert with_l4 != no_l4
    assert slot_prog_id(lab, fw) == with_l4
    assert verdict(lab, fw, frame(lab, IPPROTO_TCP, dport=22)) == "drop"
    assert verdict(lab, fw, frame(lab, IPPROTO_TCP, dport=23)) == "pass"  # ports are read

    fw.set_rules([parse_rule(r) for r in ("drop tcp", "drop udp", "allow icmp")])
    four = variant_id(lab, 4, 0)
    assert slot_prog_id(lab, fw) == four
    assert verdict(lab, fw, frame(lab, IPPROTO_UDP)) == "drop"

    # the same shape again: the compiled variant is reused, not rebuilt
    compiled = dict(lab.net.rt.variants)
    fw.set_rules([parse_rule("drop icmp")])
    assert slot_prog_id(lab, fw) == no_l4
    assert lab.net.rt.variants == compiled
    assert verdict(lab, fw, frame(lab, IPPROTO_UDP)) == "pass"
    assert verdict(lab, fw, frame(lab, IPPROTO_ICMP)) == "drop"


class _CfgWatch:
    """Stands in for a firewall's fw_cfgs table: runs `probe` just before and
    just after the update that switches to the new rules, the moment a packet
    may see the new rules with the program that was in the slot, or the old
    rules with the new program."""

    def __init__(self, table: object, probe: Callable[[str], None]) -> None:
        self._table = table
        self._probe = probe

    def __setitem__(self, key: object, value: object) -> None:
        self._probe("old rules")
        self._table[key] = value  # type: ignore[index]
        self._probe("new rules")

    def __getitem__(self, key: object) -> object:
        return self._table[key]  # type: ignore[index]

    def __delitem__(self, key: object) -> None:
        del self._table[key]  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._table, name)


@pytest.mark.parametrize("old,new", [
    # fewer rules, but the new ones need ports: neither program alone fits both sets
    (["allow from 10.9.0.0/24", "allow from 10.9.1.0/24", "drop udp"], ["drop tcp dport 22"]),
    (["drop tcp dport 22"], ["allow from 10.9.0.0/24", "allow from 10.9.1.0/24", "drop udp"]),
], ids=["to-fewer-rules-with-ports", "to-more-rules-without-ports"])
def test_every_packet_sees_rules_its_program_can_evaluate(
        lab: FwLab, stack: FwFactory, monkeypatch: pytest.MonkeyPatch, old: list[str],
        new: list[str]) -> None:
    fw = stack(old)
    packets = {"udp": frame(lab, IPPROTO_UDP), "ssh": frame(lab, dport=22),
               "web": frame(lab, dport=80)}
    want = {"old rules": {"udp": "drop" if "drop udp" in old else "pass",
                          "ssh": "drop" if "drop tcp dport 22" in old else "pass",
                          "web": "pass"}}
    want["new rules"] = {"udp": want["old rules"]["ssh"], "ssh": want["old rules"]["udp"],
                         "web": "pass"}
    got: dict[str, dict[str, str]] = {}

    def probe(moment: str) -> None:
        got[moment] = {name: verdict(lab, fw, pkt) for name, pkt in packets.items()}

    bind = Firewall._bind_tables

    def watched_bind(self: Firewall, module: object) -> None:
        bind(self, module)
        self._cfg_t = _CfgWatch(self._cfg_t, probe)

    monkeypatch.setattr(Firewall, "_bind_tables", watched_bind)
    fw.set_rules([parse_rule(r) for r in new])
    assert got == want
    monkeypatch.undo()
    assert {name: verdict(lab, fw, pkt) for name, pkt in packets.items()} == want["new rules"]


def test_new_rules_apply_to_the_next_packet(lab: FwLab, stack: FwFactory) -> None:
    fw = stack(["drop udp"])
    pkt = frame(lab, IPPROTO_UDP, dport=5000)
    assert verdict(lab, fw, pkt) == "drop"
    assert fw.rule_hits() == [1]

    fw.set_rules([parse_rule("allow udp")], default="drop")
    assert fw.rule_hits() == [0]  # counters start again with the new rules
    assert verdict(lab, fw, pkt) == "pass"
    assert verdict(lab, fw, frame(lab, IPPROTO_TCP)) == "drop"
    assert fw.hits() == {"0: allow udp": 1, "default: drop": 1}

    fw.set_rules([], default="allow")
    assert verdict(lab, fw, frame(lab, IPPROTO_TCP)) == "pass"
    assert fw.rules == [] and fw.default == "allow"


def test_rule_text_round_trips() -> None:
    for text in ("drop tcp dport 22", "allow udp to 10.96.0.10/32 dport 53",
                 "drop from 10.244.2.0/24", "allow tcp sport 1000-2000 dport 8080"):
        assert str(parse_rule(text)) == text
    assert parse_rule("DROP TCP from 10.1.2.3/16") == Rule("drop", "tcp", "10.1.0.0/16")


# ---------------------------------------------------------------------------- fragments
_ident = itertools.count(0x4000)


def send(lab: FwLab, fw: Firewall, pkt: bytes) -> tuple[str, dict[str, int]]:
    """Like verdict(), for drops of any reason: ("pass" or "drop", the
    firewall's drop counters that moved and by how much)."""
    drops, before = lab.net.rt.cube_drops(fw.name), lab.counters()
    res = lab.net.run(lab.net.rt._entry_fds["pcn_ingress"], pkt, ifindex=lab.net.ifindex["u1"])
    after = lab.counters()
    moved = {k: v - drops.get(k, 0) for k, v in lab.net.rt.cube_drops(fw.name).items()
             if v != drops.get(k, 0)}
    assert after["a"].rx_packets - before["a"].rx_packets == 1
    if res.retval == TC_ACT_REDIRECT:
        assert res.data == pkt  # a firewall never touches the frame
        assert after["b"].tx_packets - before["b"].tx_packets == 1
        assert (after["a"].drops, moved) == (before["a"].drops, {})
        return "pass", moved
    assert res.retval == TC_ACT_SHOT, f"unexpected retval {res.retval}"
    assert after["b"].tx_packets == before["b"].tx_packets
    assert after["a"].drops - before["a"].drops == 1
    assert sum(moved.values()) == 1, moved
    return "drop", moved


def frag_frames(lab: FwLab, proto: int, l4: bytes, size: int, src: str = "10.0.1.1",
                dst: str = "10.0.2.1", pad: bool = True) -> list[bytes]:
    """The L4 datagram `l4` fragmented `size` bytes at a time, as frames."""
    mac = random_mac()
    return [eth(lab.dst_mac, mac, ETH_P_IP, p, pad)
            for p in fragments(src, dst, proto, l4, next(_ident), size)]


DROPPED_FRAGMENT = ("drop", {"fragment": 1})
FILTERED = ("drop", {"filtered": 1})
PASSED: tuple[str, dict[str, int]] = ("pass", {})


@pytest.mark.parametrize("pad", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("size", [8, 16])
def test_a_blocked_syn_cannot_hide_its_port_in_tiny_fragments(lab: FwLab, stack: FwFactory,
                                                              pad: bool, size: int) -> None:
    """RFC 1858 §3.2 and §4: a first fragment that cuts the TCP header short
    and a later one that starts inside it are dropped, so a SYN to a blocked
    port cannot reach it in pieces (the receiver would reassemble the SYN)."""
    fw = stack(["drop tcp dport 8080"])
    syn = tcp("10.0.1.1", "10.0.2.1", 40000, 8080)
    assert send(lab, fw, frame(lab, IPPROTO_TCP, dport=8080)) == FILTERED  # whole: blocked
    first, *rest = frag_frames(lab, IPPROTO_TCP, syn, size, pad=pad)
    assert send(lab, fw, first) == DROPPED_FRAGMENT
    assert send(lab, fw, rest[0]) == DROPPED_FRAGMENT  # overlaps the header
    # an allowed port in tiny fragments is no better: nobody can tell
    first, *rest = frag_frames(lab, IPPROTO_TCP, tcp("10.0.1.1", "10.0.2.1", 40000, 80), size,
                               pad=pad)
    assert send(lab, fw, first) == DROPPED_FRAGMENT
    assert fw.rule_hits() == [1] and default_hits(fw) == 0


@pytest.mark.parametrize("default,rule", [("drop", "allow udp dport 53"),
                                          ("allow", "drop udp dport 53")])
def test_later_fragments_get_their_first_fragments_verdict(lab: FwLab, stack: FwFactory,
                                                           default: str, rule: str) -> None:
    """A 4000-byte datagram (first, middle and last fragment): every fragment
    is judged as the first one, which holds the ports, was."""
    fw = stack([rule], default=default)
    data = bytes(range(256)) * 16
    to_53 = frag_frames(lab, IPPROTO_UDP, udp_csum("10.0.1.1", "10.0.2.1", 40000, 53, data), 1480)
    to_54 = frag_frames(lab, IPPROTO_UDP, udp_csum("10.0.1.1", "10.0.2.1", 40000, 54, data), 1480)
    assert len(to_53) == len(to_54) == 3
    rule_says, default_says = (PASSED, FILTERED) if default == "drop" else (FILTERED, PASSED)
    assert [send(lab, fw, f) for f in to_53] == [rule_says] * 3
    assert [send(lab, fw, f) for f in to_54] == [default_says] * 3
    assert fw.rule_hits() == [3] and default_hits(fw) == 3


def test_a_later_fragment_before_its_first_is_dropped(lab: FwLab, stack: FwFactory) -> None:
    fw = stack(["allow udp dport 53"], default="drop")
    first, middle, last = frag_frames(lab, IPPROTO_UDP,
                                      udp_csum("10.0.1.1", "10.0.2.1", 40000, 53, b"x" * 3000),
                                      1480)
    assert send(lab, fw, middle) == DROPPED_FRAGMENT  # nothing to judge it by yet
    assert send(lab, fw, first) == PASSED
    assert send(lab, fw, last) == PASSED
    assert send(lab, fw, middle) == PASSED  # sent again, now that the first was seen
    assert fw.rule_hits() == [3] and default_hits(fw) == 0


def test_a_later_fragment_overlapping_the_tcp_header_is_dropped(lab: FwLab,
                                                                 stack: FwFactory) -> None:
    """A first fragment with the whole header, judged allowed; a later one
    rewriting bytes 8-15 of it (flags included) is dropped, one after the
    header passes."""
    fw = stack(["allow tcp dport 80"], default="drop")
    seg = tcp("10.0.1.1", "10.0.2.1", 40000, 80, data=b"y" * 40)
    ident = next(_ident)
    mac = random_mac()

    def piece(chunk: bytes, offset: int, more: bool) -> bytes:
        return eth(lab.dst_mac, mac, ETH_P_IP,
                   ipv4_fragment("10.0.1.1", "10.0.2.1", IPPROTO_TCP, chunk, offset, more, ident))

    assert send(lab, fw, piece(seg[:24], 0, True)) == PASSED
    assert send(lab, fw, piece(seg[8:24], 8, True)) == DROPPED_FRAGMENT
    assert send(lab, fw, piece(seg[16:24], 16, True)) == DROPPED_FRAGMENT
    assert send(lab, fw, piece(seg[24:], 24, False)) == PASSED


def test_one_firewalls_verdict_is_not_anothers(lab: FwLab, stack: FwFactory) -> None:
    """Each firewall records the datagrams it judged: a later fragment reaching
    a firewall that never saw its first fragment is dropped there, whatever
    another firewall decided."""
    a = stack(["drop tcp dport 22"])
    b = Firewall(lab.net.rt, f"fw{next(_fw_names)}", [parse_rule("drop tcp dport 22")])
    try:
        first, last = frag_frames(lab, IPPROTO_UDP,
                                  udp_csum("10.0.1.1", "10.0.2.1", 40000, 53, b"z" * 1600), 1480)
        assert send(lab, a, first) == PASSED
        lab.net.rt.set_hook(lab.ports["a"], maps.HOOK_INGRESS, [lab.net.rt.stacked(b.name)])
        assert send(lab, b, last) == DROPPED_FRAGMENT
    finally:
        lab.net.rt.set_hook(lab.ports["a"], maps.HOOK_INGRESS, [])
        b.delete()


def test_rules_without_ports_judge_fragments_by_address(lab: FwLab, stack: FwFactory) -> None:
    """Nothing to remember: every fragment has the addresses and protocol."""
    fw = stack(["drop from 10.0.1.0/24"])
    assert fw.spec["FW_NEED_L4"] == 0
    l4 = udp_csum("10.0.5.5", "10.0.2.1", 40000, 53, b"w" * 3000)
    first, middle, last = frag_frames(lab, IPPROTO_UDP, l4, 1480, src="10.0.5.5")
    assert [send(lab, fw, f) for f in (last, middle, first)] == [PASSED] * 3  # any order
    tiny, *_ = frag_frames(lab, IPPROTO_TCP, tcp("10.0.5.5", "10.0.2.1", 1, 2), 8,
                           src="10.0.5.5", pad=False)
    assert send(lab, fw, tiny) == PASSED
    blocked = frag_frames(lab, IPPROTO_UDP, l4, 1480, src="10.0.1.9")
    assert [send(lab, fw, f) for f in reversed(blocked)] == [FILTERED] * 3


# ---------------------------------------------------------------------------- at scale
# Linear Bit Vector Search (bpf/firewall.c, fwvectors.py): rule i is bit i % 64
# of word i // 64; the first match is the lowest bit of the AND of the fields'
# vectors, whichever word it is in.
IPPROTO_GRE = 47


def fillers(n: int, start: int = 0) -> list[Rule]:
    """`n` rules no test frame meets (sources in 192.168.0.0/16, distinct
    prefixes, so that each has vectors of its own)."""
    return [Rule("drop", "tcp", f"192.168.{(start + i) // 256 % 256}.{(start + i) % 256}/32",
                 None, None, ((start + i) % 65535 + 1,) * 2) for i in range(n)]


def gre(lab: FwLab, src: str = "10.0.1.1", dst: str = "10.0.2.1") -> bytes:
    return eth(lab.dst_mac, random_mac(), ETH_P_IP, ipv4(src, dst, IPPROTO_GRE, b"\0" * 8))


def test_first_match_across_word_boundaries_among_ten_thousand(lab: FwLab,
                                                                stack: FwFactory) -> None:
    """Overlapping rules at 63 (the last bit of word 0), 64 and 65 (word 1)
    and 9 999 (word 156): each packet gets the lowest of the rules it meets."""
    rules = fillers(10_000)
    rules[63] = parse_rule("drop tcp from 10.0.1.0/24 dport 80")
    rules[64] = parse_rule("allow tcp from 10.0.0.0/16 dport 1-1000")
    rules[65] = parse_rule("drop tcp to 10.0.2.0/24")
    rules[9_999] = parse_rule("allow from 10.0.0.0/8")
    fw = stack(rules, default="drop")
    assert fw.spec == {"FW_MAX_RULES": 10_240, "FW_NEED_L4": 1}
    cases = [(frame(lab, src="10.0.1.1", dport=80), "drop", 63),     # meets 63 64 65 9999
             (frame(lab, src="10.0.3.1", dport=80), "pass", 64),     # 64 65 9999
             (frame(lab, src="10.0.3.1", dport=1001), "drop", 65),   # 65 9999
             (frame(lab, src="10.1.0.1", dst="10.0.9.9"), "pass", 9_999),
             (frame(lab, IPPROTO_UDP, src="10.0.1.1"), "pass", 9_999),  # 63-65 are tcp
             (frame(lab, src="11.0.0.1", dst="10.0.9.9"), "drop", None)]  # the default
    want = [0] * 10_000
    for pkt, verdict_, rule in cases:
        assert verdict(lab, fw, pkt) == verdict_, rule
        if rule is not None:
            want[rule] += 1
    assert fw.rule_hits() == want
    assert default_hits(fw) == 1


def test_ten_thousand_rules_the_match_is_the_last(lab: FwLab, stack: FwFactory) -> None:
    fw = stack([*fillers(9_999), parse_rule("allow tcp to 10.0.2.1/32 dport 80")],
               default="drop")
    assert len(fw.rules) == 10_000
    assert verdict(lab, fw, frame(lab, dport=80)) == "pass"
    assert verdict(lab, fw, frame(lab, dport=81)) == "drop"
    # a filler's port from a filler's source: the filler it is
    assert verdict(lab, fw, frame(lab, src="192.168.4.210", dport=1_235)) == "drop"  # 1 234
    hits = fw.rule_hits()
    assert (hits[9_999], hits[1_234], sum(hits), default_hits(fw)) == (1, 1, 2, 1)
    assert fw.hits()["default: drop"] == 1


@pytest.mark.parametrize("side", ["from", "to"])
def test_prefixes_of_every_length(lab: FwLab, stack: FwFactory, side: str) -> None:
    """Rule k holds 10.20.30.40/(32 - k), most specific first. An address
    whose first difference from 10.20.30.40 is bit m (from the left) lies in
    the prefixes of length <= m: the first of them is /m, rule 32 - m."""
    base = int(ipaddress.IPv4Address("10.20.30.40"))
    fw = stack([f"allow {side} 10.20.30.40/{32 - k}" for k in range(33)], default="drop")
    for m in range(33):
        addr = str(ipaddress.IPv4Address(base ^ (1 << (31 - m)) if m < 32 else base))
        pkt = frame(lab, src=addr) if side == "from" else frame(lab, dst=addr)
        assert verdict(lab, fw, pkt) == "pass", m
    assert fw.rule_hits() == [1] * 33
    assert default_hits(fw) == 0
    # least specific first: /0 is met by every packet and comes first
    fw.set_rules([parse_rule(f"drop {side} 10.20.30.40/{k}") for k in range(33)], "allow")
    assert verdict(lab, fw, frame(lab, src="10.20.30.40", dst="10.20.30.40")) == "drop"
    assert fw.rule_hits() == [1] + [0] * 32


def test_overlapping_port_ranges_at_a_word_boundary(lab: FwLab, stack: FwFactory) -> None:
    rules = [*fillers(63), parse_rule("drop tcp dport 1000-2000"),
             parse_rule("allow tcp sport 1024-65535 dport 1500-3000"),
             parse_rule("drop udp sport 53"), parse_rule("allow tcp dport 1-65535")]
    fw = stack(rules, default="drop")
    for sport, dport, want, rule in [(40000, 999, "pass", 66), (40000, 1000, "drop", 63),
                                     (40000, 2000, "drop", 63), (40000, 2001, "pass", 64),
                                     (1023, 2001, "pass", 66), (40000, 3000, "pass", 64),
                                     (40000, 3001, "pass", 66), (1024, 65535, "pass", 66)]:
        before = fw.rule_hits()[rule]
        assert verdict(lab, fw, frame(lab, sport=sport, dport=dport)) == want, (sport, dport)
        assert fw.rule_hits()[rule] == before + 1, (sport, dport)
    assert verdict(lab, fw, frame(lab, IPPROTO_UDP, sport=53, dport=7)) == "drop"
    assert verdict(lab, fw, frame(lab, IPPROTO_UDP, sport=54, dport=7)) == "drop"  # default
    assert fw.rule_hits()[63:] == [2, 2, 1, 4] and default_hits(fw) == 1


def test_protocol_any_against_specific(lab: FwLab, stack: FwFactory) -> None:
    """Named protocols have vectors of their own; any other protocol (GRE)
    meets only the rules without one."""
    fw = stack(["drop icmp", "allow tcp dport 80", "drop from 10.0.1.0/24", "allow udp"],
               default="allow")
    assert verdict(lab, fw, frame(lab, IPPROTO_ICMP, src="10.0.5.5")) == "drop"
    assert verdict(lab, fw, frame(lab, IPPROTO_TCP, src="10.0.1.1", dport=80)) == "pass"
    assert verdict(lab, fw, frame(lab, IPPROTO_UDP, src="10.0.1.1")) == "drop"
    assert verdict(lab, fw, frame(lab, IPPROTO_UDP, src="10.0.5.5")) == "pass"
    assert verdict(lab, fw, gre(lab, src="10.0.1.1")) == "drop"
    assert verdict(lab, fw, gre(lab, src="10.0.5.5")) == "pass"
    assert verdict(lab, fw, frame(lab, IPPROTO_SCTP, src="10.0.5.5")) == "pass"
    assert fw.rule_hits() == [1, 1, 2, 1] and default_hits(fw) == 2


def test_default_action_among_ten_thousand_rules(lab: FwLab, stack: FwFactory) -> None:
    fw = stack(fillers(10_000), default="drop")
    assert verdict(lab, fw, frame(lab)) == "drop"
    assert verdict(lab, fw, gre(lab)) == "drop"
    assert sum(fw.rule_hits()) == 0 and default_hits(fw) == 2


def test_replies_of_allowed_connections_pass(lab: FwLab, stack: FwFactory) -> None:
    """allowReplies: the rules judge the opener's packets; the other end's
    packets of a connection they allowed pass whatever the rules say."""
    fw = stack(["allow tcp dport 80", "allow udp dport 53", "allow icmp to 10.0.2.1/32"],
               default="drop", allow_replies=True)
    assert fw.spec == {"FW_MAX_RULES": 4, "FW_NEED_L4": 1, "FW_TRACK": 1}
    a, b = "10.0.1.1", "10.0.2.1"
    reply = eth(lab.dst_mac, random_mac(), ETH_P_IP,
                ipv4(b, a, IPPROTO_TCP, tcp(b, a, 80, 40000, flags=0x12)))
    assert verdict(lab, fw, reply) == "drop"  # no connection yet: judged, no rule
    assert verdict(lab, fw, frame(lab, src=a, dst=b, sport=40000, dport=80)) == "pass"
    assert verdict(lab, fw, reply) == "pass"  # the reply
    stray = eth(lab.dst_mac, random_mac(), ETH_P_IP,
                ipv4(b, a, IPPROTO_TCP, tcp(b, a, 80, 40001, flags=0x12)))
    assert verdict(lab, fw, stray) == "drop"  # another connection's
    udp_q = frame(lab, IPPROTO_UDP, src=a, dst=b, sport=5353, dport=53)
    udp_r = eth(lab.dst_mac, random_mac(), ETH_P_IP,
                ipv4(b, a, IPPROTO_UDP, udp_csum(b, a, 53, 5353, b"answer")))
    assert verdict(lab, fw, udp_q) == "pass"
    assert verdict(lab, fw, udp_r) == "pass"
    ping = eth(lab.dst_mac, random_mac(), ETH_P_IP, ipv4(a, b, IPPROTO_ICMP,
                                                         icmp_echo(7, 1, b"p")))
    pong = eth(lab.dst_mac, random_mac(), ETH_P_IP, ipv4(b, a, IPPROTO_ICMP,
                                                         icmp_echo(7, 1, b"p", kind=0)))
    assert verdict(lab, fw, ping) == "pass"
    assert verdict(lab, fw, pong) == "pass"
    assert fw.rule_hits() == [1, 1, 1]
    assert fw.hits()["replies: allow"] == 3 and fw.reply_hits() == 3
    assert default_hits(fw) == 2

    # new rules judge the opener's next packets; its replies still pass
    fw.set_rules([parse_rule("drop tcp dport 80")], default="allow", allow_replies=True)
    assert verdict(lab, fw, frame(lab, src=a, dst=b, sport=40000, dport=80)) == "drop"
    assert verdict(lab, fw, reply) == "pass"
    # without allowReplies the same reply is judged by the rules
    fw.set_rules([parse_rule("drop tcp sport 80")], default="allow")
    assert "replies: allow" not in fw.hits()
    assert verdict(lab, fw, reply) == "drop"


def test_replies_are_not_tracked_without_allow_replies(lab: FwLab, stack: FwFactory) -> None:
    fw = stack(["allow tcp dport 80"], default="drop")
    assert "FW_TRACK" not in fw.spec
    a, b = "10.0.1.1", "10.0.2.1"
    assert verdict(lab, fw, frame(lab, src=a, dst=b, sport=40000, dport=80)) == "pass"
    reply = eth(lab.dst_mac, random_mac(), ETH_P_IP,
                ipv4(b, a, IPPROTO_TCP, tcp(b, a, 80, 40000, flags=0x12)))
    assert verdict(lab, fw, reply) == "drop"


def test_ten_thousand_rule_swap_is_atomic(lab: FwLab, stack: FwFactory,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """From one 10 000-rule set to another: just before the switch every
    packet gets the old set's verdict, just after the new one's; then the old
    generation's entries are gone and the counters start again."""
    old = [*fillers(9_998), parse_rule("allow tcp dport 80"), parse_rule("drop tcp")]
    new = [*fillers(9_998, start=20_000), parse_rule("drop tcp dport 80"),
           parse_rule("allow tcp")]
    fw = stack(old, default="drop")
    entries_old = map_entries(lab, fw.cube.id)
    assert entries_old == (len(fw.tables.lpm), len(fw.tables.vectors), 10_002)
    packets = {"web": frame(lab, dport=80), "ssh": frame(lab, dport=22),
               "filler": frame(lab, src="192.168.0.5", dport=6)}
    assert {n: verdict(lab, fw, p) for n, p in packets.items()} == \
        {"web": "pass", "ssh": "drop", "filler": "drop"}
    got: dict[str, dict[str, str]] = {}

    def probe(moment: str) -> None:
        got[moment] = {name: verdict(lab, fw, pkt) for name, pkt in packets.items()}

    bind = Firewall._bind_tables

    def watched_bind(self: Firewall, module: object) -> None:
        bind(self, module)  # type: ignore[arg-type]
        self._cfg_t = _CfgWatch(self._cfg_t, probe)  # type: ignore[assignment]

    monkeypatch.setattr(Firewall, "_bind_tables", watched_bind)
    fw.set_rules(new, default="drop")
    monkeypatch.undo()
    assert got == {"old rules": {"web": "pass", "ssh": "drop", "filler": "drop"},
                   "new rules": {"web": "drop", "ssh": "pass", "filler": "pass"}}
    assert map_entries(lab, fw.cube.id) == (len(fw.tables.lpm), len(fw.tables.vectors), 10_002)
    assert sum(fw.rule_hits()) == 0 and default_hits(fw) == 0
    assert verdict(lab, fw, packets["web"]) == "drop"
    assert fw.rule_hits()[9_998] == 1
    assert set(fw.last_apply) == {"compile", "write", "switch", "cleanup"}

    # and down to three rules: the counters of the rules gone are deleted
    fw.set_rules([parse_rule("allow tcp")], default="drop")
    assert map_entries(lab, fw.cube.id)[2] == 3
    assert verdict(lab, fw, packets["ssh"]) == "pass"


def test_fast_rules_run_on_the_generic_program(lab: FwLab, stack: FwFactory) -> None:
    """The generic program (every bound, L4, tracking compiled in, the rules'
    flags deciding) evaluates any rule set until the specialised one is
    swapped in."""
    fw = stack([*fillers(300), parse_rule("drop tcp dport 22")], fast=True)
    assert not lab.net.rt.has_variant("firewall", fw.wanted_spec)  # no other test's shape
    assert fw.spec == GENERIC and not fw.specialised
    assert verdict(lab, fw, frame(lab, dport=22)) == "drop"
    assert verdict(lab, fw, frame(lab, dport=80)) == "pass"
    assert fw.specialise(threading.RLock())
    assert fw.spec == {"FW_MAX_RULES": 512, "FW_NEED_L4": 1}
    assert verdict(lab, fw, frame(lab, dport=22)) == "drop"
    assert fw.rule_hits()[300] == 2


def test_an_adopted_firewall_keeps_its_rules_in_force(lab: FwLab) -> None:
    """The next agent adopts the cube (same name, saved config): same rules,
    same generation, nothing rewritten. A config saved by an agent whose
    firewall kept its rules elsewhere (the linear one: no vector config in
    force) gets its rules written again, under a new generation."""
    rt, port = lab.net.rt, lab.ports["a"]
    first = Firewall(rt, f"fw{next(_fw_names)}",
                     [*fillers(70), parse_rule("drop tcp dport 22")], "allow",
                     allow_replies=True)
    fw = first
    try:
        rt.set_hook(port, maps.HOOK_INGRESS, [rt.stacked(fw.name)])
        assert verdict(lab, fw, frame(lab, dport=22)) == "drop"
        fw = Firewall(rt, first.name)
        assert (fw.rules, fw.default, fw.allow_replies, fw.gen) == \
            (first.rules, "allow", True, first.gen)
        assert fw.spec == first.spec
        assert verdict(lab, fw, frame(lab, dport=22)) == "drop"
        assert verdict(lab, fw, frame(lab, dport=23)) == "pass"
        assert fw.rule_hits()[70] == 2  # the counters were kept too

        del fw._cfg_t[ct.c_uint32(fw.cube.id)]  # as an upgraded agent finds it
        assert verdict(lab, fw, frame(lab, dport=22)) == "pass"  # no config: passes
        fw = Firewall(rt, first.name)
        assert fw.gen == first.gen + 1
        assert verdict(lab, fw, frame(lab, dport=22)) == "drop"
        assert map_entries(lab, fw.cube.id) == (len(fw.tables.lpm), len(fw.tables.vectors),
                                                71 + 2)
    finally:
        rt.set_hook(port, maps.HOOK_INGRESS, [])
        inst = fw.cube.id
        fw.delete()
        assert map_entries(lab, inst) == (0, 0, 0)


def test_a_failed_write_leaves_the_old_rules_in_force(lab: FwLab, stack: FwFactory,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A map that refuses the new generation's entries (full, say): set_rules
    raises, the old rules stay in force, the half-written generation is gone."""
    fw = stack(["drop tcp dport 22"])
    before = map_entries(lab, fw.cube.id)
    real = Firewall._set_hits

    def full(self: Firewall, indexes: list[int]) -> None:
        real(self, indexes[:50])  # some were created when the map filled up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Firewall, "_set_hits", full)
    with pytest.raises(OSError, match="No space"):
        fw.set_rules([*fillers(200), parse_rule("allow tcp")], "drop")
    monkeypatch.setattr(Firewall, "_set_hits", real)
    assert map_entries(lab, fw.cube.id) == before
    assert verdict(lab, fw, frame(lab, dport=22)) == "drop"
    assert verdict(lab, fw, frame(lab, dport=80)) == "pass"
    assert [str(r) for r in fw.rules] == ["drop tcp dport 22"]
    assert fw.specialised and fw.wanted_spec == {"FW_MAX_RULES": 1, "FW_NEED_L4": 1}


def test_the_generic_program_leaves_the_verifier_room(lab: FwLab) -> None:
    """The largest shape (160 vector words, ports, tracking) is what the
    verifier walks longest: each word the search can stop at is a way through
    the rest of the program. Half of the kernel's 1 000 000 instructions is
    the budget, so that the chain's code can grow."""
    variant = lab.net.rt.load_variant("firewall", GENERIC)
    with open(f"/proc/self/fdinfo/{variant.fd}") as f:
        info = dict(line.split(":", 1) for line in f if ":" in line)
    assert 0 < int(info["verified_insns"]) < 500_000, info["verified_insns"]
