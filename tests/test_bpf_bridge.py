"""The bridge cube's program on crafted frames (BPF_PROG_TEST_RUN).

Topology: bridge `b` with ports p1..p3 peered with veths u1..u3 of a private
namespace, and port `up` peered with port `down` of a second bridge `b2`
(the cube-peered port that gets the original frame when `b` floods).
Every test uses fresh MAC addresses and compares counters before and after,
so the tests share one compiled runtime without depending on each other.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from bpfunit import (
    BROADCAST,
    ETH_P_IP,
    UnitNet,
    eth,
    ipv4,
    random_mac,
    udp,
    unit_net,
)

from pcn_agent.dataplane.cubes.bridge import Bridge
from pcn_agent.dataplane.runtime import PortCounters, PortState
from pcn_testsupport.testrun import TC_ACT_REDIRECT, TC_ACT_SHOT, TestRunResult

pytestmark = [pytest.mark.bpf,
              pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning")]

NETDEV_PORTS = ("p1", "p2", "p3")


@dataclass
class BridgeLab:
    net: UnitNet
    b: Bridge
    b2: Bridge
    ports: dict[str, PortState]  # p1..p3, up
    down: PortState  # b2's end of the link

    def send(self, in_port: str, frame: bytes) -> TestRunResult:
        """`frame` enters bridge b through `in_port`, as the chain would hand it over."""
        port = self.ports[in_port]
        return self.net.run(self.net.rt.types["bridge"].fd, frame, cb=[port.id],
                            ifindex=self.net.ifindex.get(port.netdev or "", 0))

    def counters(self) -> dict[str, PortCounters]:
        out = {name: self.net.rt.port_counters(p) for name, p in self.ports.items()}
        out["down"] = self.net.rt.port_counters(self.down)
        return out

    def fdb(self, bridge: Bridge | None = None) -> dict[str, str]:
        return {e.mac: e.port for e in (bridge or self.b).fdb()}


@pytest.fixture(scope="module")
def lab() -> Iterator[BridgeLab]:
    with unit_net(veths=len(NETDEV_PORTS)) as net:
        rt = net.rt
        b = Bridge(rt, "b")
        b2 = Bridge(rt, "b2")
        ports = {}
        for i, name in enumerate(NETDEV_PORTS, start=1):
            ports[name] = b.add_port(name)
            rt.connect_netdev(ports[name], f"u{i}")
        ports["up"] = b.add_port("up")
        down = b2.add_port("down")
        rt.connect_ports(ports["up"], down)
        yield BridgeLab(net, b, b2, ports, down)


def frame(dst: str, src: str) -> bytes:
    return eth(dst, src, ETH_P_IP, ipv4("10.0.0.1", "10.0.0.2", 17, udp(1000, 2000, b"pcn")))


def tx_delta(before: dict[str, PortCounters], after: dict[str, PortCounters]) -> dict[str, int]:
    return {name: after[name].tx_packets - before[name].tx_packets for name in before}


def learn(lab: BridgeLab, mac: str, port: str) -> None:
    lab.send(port, frame(BROADCAST, mac))
    assert lab.fdb().get(mac) == port


def test_learns_source_mac_on_input_port(lab: BridgeLab) -> None:
    mac = random_mac()
    assert mac not in lab.fdb()
    lab.send("p2", frame(BROADCAST, mac))
    assert lab.fdb()[mac] == "p2"


def test_relearns_a_mac_that_moved(lab: BridgeLab) -> None:
    mac = random_mac()
    lab.send("p1", frame(BROADCAST, mac))
    assert lab.fdb()[mac] == "p1"
    lab.send("p3", frame(BROADCAST, mac))
    assert lab.fdb()[mac] == "p3"


def test_does_not_learn_multicast_source(lab: BridgeLab) -> None:
    group = "01:00:5e:01:02:03"
    lab.send("p1", frame(BROADCAST, group))
    assert group not in lab.fdb()


@pytest.mark.parametrize("dst", ["broadcast", "unknown-unicast", "multicast"])
def test_floods_to_every_other_port(lab: BridgeLab, dst: str) -> None:
    dst_mac = {"broadcast": BROADCAST, "unknown-unicast": random_mac(),
               "multicast": "01:00:5e:00:00:fb"}[dst]
    src = random_mac()
    pkt = frame(dst_mac, src)
    drops_before = lab.net.rt.cube_drops("b")
    before = lab.counters()
    res = lab.send("p1", pkt)
    after = lab.counters()

    # copies to the other netdev-peered ports, none back out of p1; the
    # original to the cube-peered port, which hands it to b2
    assert tx_delta(before, after) == {"p1": 0, "p2": 1, "p3": 1, "up": 1, "down": 0}
    for name in ("p2", "p3", "up"):
        assert after[name].tx_bytes - before[name].tx_bytes == len(pkt)
    assert after["down"].rx_packets - before["down"].rx_packets == 1
    assert lab.fdb(lab.b2).get(src) == "down"  # b2 saw the original
    # b2 has nowhere else to send it (its only port is where it came from)
    assert res.retval == TC_ACT_SHOT
    assert res.data == pkt  # flooding does not touch the frame
    assert lab.net.rt.cube_drops("b") == drops_before


def test_forwards_to_learned_mac_only(lab: BridgeLab) -> None:
    a, b = random_mac(), random_mac()
    learn(lab, b, "p3")
    pkt = frame(b, a)
    before = lab.counters()
    res = lab.send("p1", pkt)
    after = lab.counters()
    assert res.retval == TC_ACT_REDIRECT  # bpf_redirect to u3
    assert tx_delta(before, after) == {"p1": 0, "p2": 0, "p3": 1, "up": 0, "down": 0}
    assert res.data == pkt
    assert lab.fdb()[a] == "p1"


def test_forwards_to_mac_learned_behind_the_cube_port(lab: BridgeLab) -> None:
    """A MAC learned on the cube-peered port: the frame goes there by tail call."""
    a, b = random_mac(), random_mac()
    learn(lab, b, "up")
    before = lab.counters()
    res = lab.send("p2", frame(b, a))
    after = lab.counters()
    assert tx_delta(before, after) == {"p1": 0, "p2": 0, "p3": 0, "up": 1, "down": 0}
    assert after["down"].rx_packets - before["down"].rx_packets == 1
    assert lab.fdb(lab.b2).get(a) == "down"
    assert res.retval == TC_ACT_SHOT  # b2 floods to nowhere


def test_hairpin_is_dropped(lab: BridgeLab) -> None:
    a, b = random_mac(), random_mac()
    learn(lab, b, "p2")
    drops_before = lab.net.rt.cube_drops("b").get("hairpin", 0)
    before = lab.counters()
    res = lab.send("p2", frame(b, a))
    after = lab.counters()
    assert res.retval == TC_ACT_SHOT
    assert tx_delta(before, after) == {"p1": 0, "p2": 0, "p3": 0, "up": 0, "down": 0}
    assert after["p2"].drops - before["p2"].drops == 1
    assert lab.net.rt.cube_drops("b").get("hairpin", 0) == drops_before + 1


def entry_fd(lab: BridgeLab) -> int:
    return lab.net.rt._entry_fds["pcn_ingress"]  # the program the runtime attached to u1..u3


def test_entry_program_hands_netdev_frames_to_the_bridge(lab: BridgeLab) -> None:
    """The tc ingress entry program finds the port from skb->ifindex, counts
    rx on it and tail-calls the bridge, which forwards as if called directly."""
    a, b = random_mac(), random_mac()
    learn(lab, b, "p2")
    pkt = frame(b, a)
    before = lab.counters()
    res = lab.net.run(entry_fd(lab), pkt, ifindex=lab.net.ifindex["u1"])
    after = lab.counters()
    assert after["p1"].rx_packets - before["p1"].rx_packets == 1
    assert after["p1"].rx_bytes - before["p1"].rx_bytes == len(pkt)
    assert lab.fdb()[a] == "p1"
    assert res.retval == TC_ACT_REDIRECT
    assert tx_delta(before, after) == {"p1": 0, "p2": 1, "p3": 0, "up": 0, "down": 0}
    assert res.cb[0] == lab.ports["p1"].id  # metadata the entry program set for the cube


def test_entry_program_leaves_other_netdevs_to_the_kernel(lab: BridgeLab) -> None:
    before = lab.counters()
    far_end = lab.net.ifindex["u1p"]  # not peered with a port
    res = lab.net.run(entry_fd(lab), frame(BROADCAST, random_mac()), ifindex=far_end)
    assert res.retval == 0  # TC_ACT_OK
    assert lab.counters() == before
