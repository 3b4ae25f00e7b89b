"""The flowmonitor cube's program on crafted frames (BPF_PROG_TEST_RUN).

Topology (as test_bpf_firewall): bridge `b` with port `a` (veth u1) and
port `b` (veth u2). Each test stacks a flow monitor of its own on port a's
ingress hook (what a pod behind u1 sends) and egress hook (what it
receives) and reads its flow table.
"""

from __future__ import annotations

import ctypes as ct
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from bpfunit import (
    ETH_P_ARP,
    ETH_P_IP,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_ACK,
    TCP_FIN,
    TCP_PSH,
    TCP_SYN,
    UnitNet,
    arp,
    cube_lab,
    eth,
    icmp_echo,
    ipv4,
    random_mac,
    tcp,
    udp_csum,
)

from pcn_agent.dataplane import maps
from pcn_agent.dataplane.cubes.flowmonitor import MIRRORS, Flow, FlowMonitor, tcp_flags_text
from pcn_agent.dataplane.runtime import PortState
from pcn_testsupport.testrun import TC_ACT_OK, TC_ACT_REDIRECT

pytestmark = [pytest.mark.bpf,
              pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning")]

_names = itertools.count(1)


@dataclass
class FmLab:
    net: UnitNet
    ports: dict[str, PortState]
    dst_mac: str


@pytest.fixture(scope="module")
def lab() -> Iterator[FmLab]:
    with cube_lab() as cl:
        yield FmLab(cl.net, cl.ports, cl.dst_mac)


MonFactory = Callable[..., FlowMonitor]


@pytest.fixture
def monitor(lab: FmLab) -> Iterator[MonFactory]:
    made: list[FlowMonitor] = []
    rt, port = lab.net.rt, lab.ports["a"]

    def make(max_flows: int = 1024) -> FlowMonitor:
        fm = FlowMonitor(rt, f"fm{next(_names)}", max_flows)
        made.append(fm)
        for hook in (maps.HOOK_INGRESS, maps.HOOK_EGRESS):
            rt.set_hook(port, hook, [rt.stacked(fm.name)])
        return fm

    try:
        yield make
    finally:
        rt.set_hook(port, maps.HOOK_INGRESS, [])
        rt.set_hook(port, maps.HOOK_EGRESS, [])
        for fm in made:
            pin = rt.pin_dir / f"fm_flows_{fm.cube.id}_{fm.max_flows}"  # type: ignore[operator]
            fm.delete()
            assert fm.name not in rt.cubes
            assert not pin.exists()


def send(lab: FmLab, frame: bytes, hook: int = maps.HOOK_INGRESS) -> None:
    prog = "pcn_ingress" if hook == maps.HOOK_INGRESS else "pcn_egress"
    res = lab.net.run(lab.net.rt._entry_fds[prog], frame, ifindex=lab.net.ifindex["u1"])
    want = TC_ACT_REDIRECT if hook == maps.HOOK_INGRESS else TC_ACT_OK
    assert (res.retval, res.data) == (want, frame)  # a monitor never touches a frame


def seg(lab: FmLab, flags: int, data: bytes = b"", src: str = "10.0.1.1", dst: str = "10.0.2.1",
        sport: int = 40000, dport: int = 80) -> bytes:
    return eth(lab.dst_mac, random_mac(), ETH_P_IP,
               ipv4(src, dst, IPPROTO_TCP, tcp(src, dst, sport, dport, flags, data=data)))


def by_key(flows: list[Flow]) -> dict[tuple[str, str, int, int, int, str], Flow]:
    return {(f.src, f.dst, f.sport, f.dport, f.proto, f.direction): f for f in flows}


# ---------------------------------------------------------------------------- accounting
def test_packets_and_l3_bytes_are_exact(lab: FmLab, monitor: MonFactory) -> None:
    """Bytes are the IP datagrams' lengths (header included; Ethernet header
    and the padding of short frames not): conntrack's accounting."""
    fm = monitor()
    sizes = [0, 1, 5, 100, 1000, 1400]
    start = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    for n in sizes:
        send(lab, seg(lab, TCP_ACK | TCP_PSH, bytes(n)))
    end = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    (f,) = fm.flows()
    assert (f.src, f.dst, f.sport, f.dport, f.proto, f.direction) == \
        ("10.0.1.1", "10.0.2.1", 40000, 80, IPPROTO_TCP, "from-pod")
    assert f.packets == len(sizes)
    assert f.bytes == sum(20 + 20 + n for n in sizes)  # the 0-byte segment's frame is padded
    assert start <= f.first_ns <= f.last_ns <= end
    assert fm.totals()["from-pod"] == {"packets": 6, "bytes": f.bytes, "flows": 1}


def test_tcp_flags_are_ored(lab: FmLab, monitor: MonFactory) -> None:
    fm = monitor()
    for flags in (TCP_SYN, TCP_ACK, TCP_ACK | TCP_PSH, TCP_FIN | TCP_ACK):
        send(lab, seg(lab, flags))
    (f,) = fm.flows()
    assert f.tcp_flags == TCP_SYN | TCP_ACK | TCP_PSH | TCP_FIN
    assert tcp_flags_text(f.tcp_flags) == "FIN|SYN|PSH|ACK"


def test_directions_and_protocols_are_flows_of_their_own(lab: FmLab, monitor: MonFactory) -> None:
    fm = monitor()
    send(lab, seg(lab, TCP_SYN))
    send(lab, seg(lab, TCP_SYN | TCP_ACK, src="10.0.2.1", dst="10.0.1.1", sport=80,
                  dport=40000), maps.HOOK_EGRESS)
    send(lab, seg(lab, TCP_ACK), maps.HOOK_EGRESS)  # the same 5-tuple, seen to the pod
    udp_f = eth(lab.dst_mac, random_mac(), ETH_P_IP,
                ipv4("10.0.1.1", "10.0.2.1", IPPROTO_UDP,
                     udp_csum("10.0.1.1", "10.0.2.1", 5353, 53, b"q" * 30)))
    send(lab, udp_f)
    ping = eth(lab.dst_mac, random_mac(), ETH_P_IP,
               ipv4("10.0.1.1", "10.0.2.1", IPPROTO_ICMP, icmp_echo(77, 1, b"p" * 56)))
    send(lab, ping)
    lab.net.run(lab.net.rt._entry_fds["pcn_ingress"],  # flooded by the bridge: no verdict
                eth("ff:ff:ff:ff:ff:ff", random_mac(), ETH_P_ARP,
                    arp(1, random_mac(), "10.0.1.1", "00:00:00:00:00:00", "10.0.2.1")),
                ifindex=lab.net.ifindex["u1"])
    flows = by_key(fm.flows())
    assert set(flows) == {
        ("10.0.1.1", "10.0.2.1", 40000, 80, IPPROTO_TCP, "from-pod"),
        ("10.0.2.1", "10.0.1.1", 80, 40000, IPPROTO_TCP, "to-pod"),
        ("10.0.1.1", "10.0.2.1", 40000, 80, IPPROTO_TCP, "to-pod"),
        ("10.0.1.1", "10.0.2.1", 5353, 53, IPPROTO_UDP, "from-pod"),
        ("10.0.1.1", "10.0.2.1", 77, 77, IPPROTO_ICMP, "from-pod"),  # the echo identifier
    }  # ARP: not accounted
    assert flows[("10.0.1.1", "10.0.2.1", 5353, 53, IPPROTO_UDP, "from-pod")].bytes == 20 + 8 + 30
    assert flows[("10.0.1.1", "10.0.2.1", 77, 77, IPPROTO_ICMP, "from-pod")].bytes == 20 + 8 + 56
    totals = fm.totals()
    assert totals["to-pod"] == {"packets": 2, "bytes": 80, "flows": 2}
    assert totals["from-pod"]["packets"] == 3 and totals["from-pod"]["flows"] == 3


def test_monitors_do_not_share_flows(lab: FmLab, monitor: MonFactory) -> None:
    a = monitor()
    send(lab, seg(lab, TCP_SYN))
    b = monitor()  # replaces a on the hooks
    send(lab, seg(lab, TCP_SYN, sport=40001))
    assert [f.sport for f in a.flows()] == [40000]
    assert [f.sport for f in b.flows()] == [40001]


# ---------------------------------------------------------------------------- the bound
def test_the_table_holds_at_most_max_flows(lab: FmLab, monitor: MonFactory) -> None:
    """An LRU table: new flows evict the least recently used ones, never
    grow it past its bound; the flow just seen is always there."""
    fm = monitor(max_flows=8)
    for i in range(40):
        send(lab, seg(lab, TCP_SYN, sport=20000 + i))
        flows = fm.flows()
        assert len(flows) <= 8
        assert 20000 + i in {f.sport for f in flows}
    assert fm.totals()["from-pod"]["packets"] == 40


def test_a_new_bound_is_a_new_table(lab: FmLab, monitor: MonFactory) -> None:
    fm = monitor(max_flows=4)
    send(lab, seg(lab, TCP_SYN))
    old_pin = lab.net.rt.pin_dir / f"fm_flows_{fm.cube.id}_4"  # type: ignore[operator]
    assert old_pin.exists()
    slot = fm.cube.slot
    fm.set_max_flows(16)
    assert fm.cube.slot == slot and not old_pin.exists() and fm.flows() == []
    for i in range(12):
        send(lab, seg(lab, TCP_SYN, sport=30000 + i))
    assert len(fm.flows()) == 12
    with pytest.raises(ValueError, match="maxFlows"):
        fm.set_max_flows(0)


def test_adoption_keeps_the_counts(lab: FmLab, monitor: MonFactory) -> None:
    """A restarted agent's FlowMonitor on the same cube finds the pinned table."""
    fm = monitor(max_flows=32)
    send(lab, seg(lab, TCP_SYN, data=b"x" * 10))
    again = FlowMonitor(lab.net.rt, fm.name)  # what _adopt does: the cube exists
    assert again.max_flows == 32
    assert [(f.packets, f.bytes) for f in again.flows()] == [(1, 50)]
    old = fm._module  # noqa: SLF001
    fm.__dict__.update(again.__dict__)  # the adopting one owns the cube now
    assert old is not None
    old.cleanup()


def test_mirrors_match_the_c_side(lab: FmLab, monitor: MonFactory) -> None:
    fm = monitor()
    module = fm._module  # noqa: SLF001
    assert module is not None
    for name, (key, value) in MIRRORS.items():
        t = module[name.encode()]
        leaf = getattr(t.Leaf, "_type_", t.Leaf)  # a per-CPU value: one per CPU
        assert (ct.sizeof(t.Key), ct.sizeof(leaf)) == (ct.sizeof(key), ct.sizeof(value)), name
