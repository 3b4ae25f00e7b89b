"""End to end: direct routing (overlay "none"): two lab nodes whose uplinks
share the lab's switch (L2-adjacent, as direct routing needs) route each
other's pod CIDRs to their node IPs, unencapsulated, at the pods' MTU of
1500; Services and NodePorts across nodes; an agent restarted with the other
overlay converts the data plane it adopts."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute

from pcn_lab import checks
from pcn_lab.topology import EXTERNAL_IP, Lab

pytestmark = pytest.mark.netns

TCP, UDP = checks.TCP_PORT, checks.UDP_PORT
VIP = "10.96.0.40"


@pytest.fixture(scope="module")
def direct() -> Iterator[Lab]:
    with Lab(nodes_count=2, pods_per_node=2, overlay="none") as built:
        built.set_service(VIP, 80, "tcp", [built.backend("n2p1", TCP)])
        built.set_service(VIP, 53, "udp", [built.backend("n2p2", UDP)])
        with checks.servers(built, [*built.pods, "ext"]):
            yield built
    assert built.leftovers() == [], f"teardown left {built.leftovers()}"


def _ok(result: checks.CheckResult) -> None:
    assert result.passed, f"{result.protocol} {result.source} -> {result.target}: {result.detail}"


def _links(netns: str) -> dict[str, int]:
    """Interface name -> MTU in `netns`."""
    with IPRoute(netns=netns) as ipr:
        return {link.get_attr("IFLA_IFNAME"): link.get_attr("IFLA_MTU")
                for link in ipr.get_links()}


def _uplink_rx(netns: str) -> tuple[int, int]:
    """(packets, bytes) received by a node's uplink."""
    with IPRoute(netns=netns) as ipr:
        s = ipr.get_links(ipr.link_lookup(ifname="uplink")[0])[0].get_attr("IFLA_STATS64")
        return s["rx_packets"], s["rx_bytes"]


def test_no_vxlan_device_and_routes_via_node_ips(direct: Lab) -> None:
    for i, other in ((1, 2), (2, 1)):
        node = direct.node(i)
        assert "pcn-vxlan" not in _links(node.cfg.netns or "")
        assert "vxlan" not in node.router.cube.ports
        route = node.router.routes[ipaddress.IPv4Network(direct.pod_cidr(other))]
        assert (route.port, str(route.nexthop)) == ("uplink", direct.node_ip(other))
        assert _links(direct.pods[f"n{i}p1"].netns)["eth0"] == 1500


def test_cross_node_icmp_tcp_udp_unnatted(direct: Lab) -> None:
    for src, dst in (("n1p1", "n2p1"), ("n2p2", "n1p2")):
        ip = direct.pods[dst].ip
        _ok(checks.ping(direct, src, ip))
        r = checks.tcp(direct, src, ip)
        _ok(r)
        assert r.extra["peer_seen"] == direct.pods[src].ip, r.extra
        u = checks.udp(direct, src, ip)
        _ok(u)
        assert u.extra["peer_seen"] == direct.pods[src].ip, u.extra


def test_full_size_packets_cross_unfragmented(direct: Lab) -> None:
    """1500-byte IP packets with DF (ping -M do, a 1472-byte UDP datagram)
    cross between pods: nothing is encapsulated, nothing too big. The
    receiving node's uplink sees frames of 1514 bytes, not 1564 (VXLAN)."""
    node2 = direct.node(2)
    too_big = node2.rt.cube_drops("r0").get("too_big", 0) + \
        direct.node(1).rt.cube_drops("r0").get("too_big", 0)
    ns1 = direct.pods["n1p1"].netns
    before = _uplink_rx(node2.cfg.netns or "")
    r = direct.exec(ns1, ["ping", "-n", "-q", "-M", "do", "-s", "1472", "-c", "20", "-i", "0.05",
                          "-W", "2", direct.pods["n2p1"].ip], timeout=30)
    assert r.returncode == 0 and " 0% packet loss" in r.stdout, r.stdout + r.stderr
    after = _uplink_rx(node2.cfg.netns or "")
    packets, nbytes = after[0] - before[0], after[1] - before[1]
    assert packets >= 20
    # 20 requests of 1514 bytes each and nothing bigger (other traffic is small)
    assert nbytes <= 20 * 1514 + (packets - 20) * 200, (packets, nbytes)
    u = checks.probe(direct, "n1p1", ["udp", direct.pods["n2p2"].ip, str(UDP), "--size", "1472",
                                      "--timeout", "3"], 15)
    assert u["ok"], u
    big = checks.tcp(direct, "n2p1", direct.pods["n1p2"].ip, nbytes=2_000_000, timeout=20)
    _ok(big)
    after_drops = node2.rt.cube_drops("r0").get("too_big", 0) + \
        direct.node(1).rt.cube_drops("r0").get("too_big", 0)
    assert after_drops == too_big


def test_clusterip_backend_on_the_other_node(direct: Lab) -> None:
    r = checks.probe(direct, "n1p1", ["tcp", VIP, "80", "--timeout", "5"], 20)
    assert r["ok"] and r["host"] == "n2p1" and r["peer_seen"] == direct.pods["n1p1"].ip, r
    u = checks.probe(direct, "n1p2", ["udp", VIP, "53", "--timeout", "3"], 20)
    assert u["ok"] and u["host"] == "n2p2", u


def test_nodeport_from_outside(direct: Lab) -> None:
    """Cluster: the entry node forwards to the pod on the other node from
    its pod CIDR's network address (no VTEP without an overlay), so the
    answer comes back through it; Local: the client's address is kept."""
    direct.set_nodeport(30090, "tcp", "Cluster", [direct.backend("n2p1", TCP)])
    r = checks.probe(direct, "ext", ["tcp", direct.node_ip(1), "30090", "--timeout", "5"], 20)
    assert r["ok"] and r["host"] == "n2p1", r
    assert r["peer_seen"] == direct.node(1).cfg.host_pod_ip, r
    direct.set_nodeport(30091, "udp", "Cluster", [direct.backend("n2p2", UDP)])
    u = checks.probe(direct, "ext", ["udp", direct.node_ip(1), "30091", "--timeout", "3"], 20)
    assert u["ok"] and u["host"] == "n2p2", u
    direct.set_nodeport(30092, "tcp", "Local", [direct.backend("n2p1", TCP)])
    r = checks.probe(direct, "ext", ["tcp", direct.node_ip(2), "30092", "--timeout", "5"], 20)
    assert r["ok"] and r["host"] == "n2p1" and r["peer_seen"] == EXTERNAL_IP, r


def test_node_reaches_other_nodes_pods(direct: Lab) -> None:
    r = checks.tcp(direct, direct.node_name(1), direct.pods["n2p1"].ip)
    _ok(r)
    assert r.extra["peer_seen"] == direct.node(1).cfg.host_pod_ip, r.extra


def test_pods_reach_the_outside_masqueraded(direct: Lab) -> None:
    r = checks.tcp(direct, "n2p1", EXTERNAL_IP)
    _ok(r)
    assert r.extra["peer_seen"] == direct.node_ip(2), r.extra


def test_switching_the_overlay_takes_a_restart_that_converts(caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    """vxlan -> none -> vxlan on running labs: the restarted agents move the
    peers' routes, make or remove the VXLAN device, say so (log and
    overlay_switched, which the agent's status shows); pods keep working."""
    with Lab(nodes_count=2, pods_per_node=1) as lab, checks.servers(lab):
        _ok(checks.tcp(lab, "n1p1", lab.pods["n2p1"].ip))
        with caplog.at_level("WARNING", logger="pcn_agent.node.wiring"):
            lab.switch_overlay("none")
        assert any(re.search(r"overlay changed from vxlan to none", m) for m in caplog.messages)
        node = lab.node(1)
        assert node.overlay_switched == "vxlan -> none"
        assert "pcn-vxlan" not in _links(node.cfg.netns or "")
        assert "vxlan" not in node.router.cube.ports
        for src, dst in (("n1p1", "n2p1"), ("n2p1", "n1p1")):
            r = checks.tcp(lab, src, lab.pods[dst].ip, nbytes=200_000, timeout=10)
            _ok(r)
        lab.switch_overlay("vxlan")
        assert lab.node(2).overlay_switched == "none -> vxlan"
        assert "pcn-vxlan" in _links(lab.node(2).cfg.netns or "")
        _ok(checks.tcp(lab, "n2p1", lab.pods["n1p1"].ip, nbytes=200_000, timeout=10))
        _ok(checks.udp(lab, "n1p1", lab.pods["n2p1"].ip))
    assert lab.leftovers() == []
