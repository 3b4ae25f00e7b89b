"""End to end: two nodes (namespaces joined by a veth), two pods each, real
traffic through the bridge, the router and the VXLAN overlay."""

from __future__ import annotations

import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from pcn_agent.dataplane import maps, tc
from pcn_agent.node import wiring as node_mod
from pcn_lab import checks
from pcn_lab.topology import Lab

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def served(lab: Lab):
    with checks.servers(lab):
        yield lab


def _assert_ok(result: checks.CheckResult) -> None:
    assert result.passed, f"{result.protocol} {result.source} -> {result.target}: {result.detail}"


def test_first_packet_to_unresolved_neighbour_is_delivered(served: Lab) -> None:
    # Before any other traffic: both routers must resolve next hops (remote VTEP,
    # then the pod) through the slow path; a single echo must still come back.
    injected_before = served.node(1).slow.injected + served.node(2).slow.injected
    _assert_ok(checks.ping(served, "n2p2", served.pods["n1p2"].ip, count=1, timeout=2))
    assert served.node(1).slow.injected + served.node(2).slow.injected > injected_before


def test_same_node_icmp_and_tcp(served: Lab) -> None:
    dst = served.pods["n1p2"].ip
    _assert_ok(checks.ping(served, "n1p1", dst))
    result = checks.tcp(served, "n1p1", dst)
    _assert_ok(result)
    assert served.pods["n1p1"].ip in result.detail  # no NAT between pods


def test_cross_node_icmp_tcp_udp(served: Lab) -> None:
    dst = served.pods["n2p1"].ip
    _assert_ok(checks.ping(served, "n1p1", dst))
    _assert_ok(checks.tcp(served, "n1p1", dst))
    _assert_ok(checks.udp(served, "n1p1", dst))
    _assert_ok(checks.udp(served, "n2p2", served.pods["n1p2"].ip))


def test_pod_pings_its_gateway(served: Lab) -> None:
    _assert_ok(checks.ping(served, "n2p1", served.node(2).cfg.gateway))


@pytest.mark.parametrize("src,dst", [("n1p1", "n1p2"), ("n2p2", "n1p1")])
def test_one_megabyte_arrives_byte_identical(served: Lab, src: str, dst: str) -> None:
    result = checks.tcp(served, src, served.pods[dst].ip, nbytes=1_000_000, timeout=20)
    _assert_ok(result)  # the server's SHA-256 of what arrived matches what was sent


def test_no_route_gets_no_reply_and_is_counted(served: Lab) -> None:
    rt = served.node(1).rt
    before = rt.cube_drops("r0").get("no_route", 0)
    # outside the Service range (10.96.0.0/12): an unallocated address there
    # is the lbrp's to drop, not the router's
    result = checks.ping(served, "n1p1", "10.200.0.1", count=3, interval=0.2,
                         expect_blocked=True)
    assert not result.ok, "a destination with no route answered"
    assert rt.cube_drops("r0").get("no_route", 0) - before == 3


def _tx_packets(netns: str, ifname: str) -> int:
    with IPRoute(netns=netns) as ipr:
        link = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0]
        return link.get_attr("IFLA_STATS64")["tx_packets"]


NODE_TCP = 18081  # a service of the node's own (hostNetwork), not in any pod


def test_node_reaches_its_own_pods(served: Lab) -> None:
    """What a kubelet's probes need: the node's stack reaches its pods, from
    the node's address."""
    node = served.node_name(1)
    for pod in ("n1p1", "n1p2"):
        r = checks.tcp(served, node, served.pods[pod].ip)
        _assert_ok(r)
        assert r.extra["peer_seen"] == served.node_ip(1), r.extra
    _assert_ok(checks.ping(served, node, served.pods["n1p2"].ip))


def test_node_reaches_other_nodes_pods_over_the_overlay(served: Lab) -> None:
    """What an API server calling a webhook needs: the node's stack reaches a
    pod on another node, from the node's own address in its pod CIDR."""
    node = served.node_name(1)
    for pod in ("n2p1", "n2p2"):
        r = checks.tcp(served, node, served.pods[pod].ip)
        _assert_ok(r)
        assert r.extra["peer_seen"] == served.node(1).cfg.host_pod_ip, r.extra
    _assert_ok(checks.ping(served, node, served.pods["n2p1"].ip))


def test_pods_reach_what_their_node_serves_on_its_address(served: Lab) -> None:
    node = served.node_name(1)
    with checks.servers(served, [node], tcp_ports=(NODE_TCP,), udp_ports=()):
        r = checks.tcp(served, "n1p1", served.node_ip(1), port=NODE_TCP)
        _assert_ok(r)
        assert r.extra["peer_seen"] == served.pods["n1p1"].ip, r.extra  # not masqueraded
        r = checks.tcp(served, "n2p1", served.node_ip(1), port=NODE_TCP)  # another node's pod
        _assert_ok(r)
        assert r.extra["peer_seen"] == served.node_ip(2), r.extra  # masqueraded by node 2
    _assert_ok(checks.ping(served, "n1p1", served.node_ip(1)))  # answered by the host


def test_port_counters_agree_with_traffic_sent(served: Lab) -> None:
    node = served.node(1)
    a, b = served.pods["n1p1"], served.pods["n1p2"]
    _assert_ok(checks.ping(served, "n1p1", b.ip, count=1))  # warm ARP caches
    pa, pb = a.pod.port, b.pod.port
    before = (_tx_packets(a.netns, "eth0"), _tx_packets(b.netns, "eth0"),
              node.rt.port_counters(pa), node.rt.port_counters(pb))
    _assert_ok(checks.ping(served, "n1p1", b.ip, count=20, interval=0.01))
    sent_a = _tx_packets(a.netns, "eth0") - before[0]
    sent_b = _tx_packets(b.netns, "eth0") - before[1]
    ca, cb = node.rt.port_counters(pa), node.rt.port_counters(pb)
    # Everything a pod sent entered its bridge port, everything the other pod
    # sent left through this one (ARP included: both sides count frames).
    assert sent_a >= 20 and sent_b >= 20
    assert ca.rx_packets - before[2].rx_packets == sent_a
    assert cb.rx_packets - before[3].rx_packets == sent_b
    assert cb.tx_packets - before[3].tx_packets >= 20
    assert ca.tx_packets - before[2].tx_packets >= 20
    assert ca.rx_bytes - before[2].rx_bytes >= 20 * 98  # 64-byte echo + IP + Ethernet
    assert ca.drops == before[2].drops and cb.drops == before[3].drops


def _link_stats(netns: str, ifname: str) -> dict[str, int]:
    with IPRoute(netns=netns) as ipr:
        link = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0]
        return dict(link.get_attr("IFLA_STATS64"))


@pytest.mark.parametrize("src", ["n1p1", "n2p1"])
def test_packets_for_a_pod_enter_its_eth0_directly(served: Lab, src: str) -> None:
    """Delivery to a pod skips the host end of its veth (bpf_redirect_peer,
    pcn_chain.h pcn_port_deliver): the pod's eth0 receives every echo request,
    the host end transmits none of them (only flooded copies: an ARP
    request, if a cache expired). From a pod of the same node (the bridge)
    and of the other node (VXLAN, router, bridge)."""
    node = served.node(1)
    dst = served.pods["n1p2"]
    port = node.rt.ports[dst.pod.port.id]
    assert port.flags & maps.PORT_PEER_NS, "a pod's port must deliver into its veth's peer"
    _assert_ok(checks.ping(served, src, dst.ip, count=1))  # warm ARP caches
    host_if = dst.pod.iface.host_ifname
    before_host = _link_stats(node.cfg.netns or "", host_if)
    before_pod = _link_stats(dst.netns, "eth0")
    _assert_ok(checks.ping(served, src, dst.ip, count=20, interval=0.01))
    host_tx = _link_stats(node.cfg.netns or "", host_if)["tx_packets"] - before_host["tx_packets"]
    pod_rx = _link_stats(dst.netns, "eth0")["rx_packets"] - before_pod["rx_packets"]
    assert pod_rx >= 20
    assert host_tx <= 2, f"{host_tx} packets went out of the host end of the pod's veth"


def test_attached_programs_are_the_shared_entry_program(served: Lab) -> None:
    node = served.node(1)
    for lp in served.pods.values():
        if lp.node != node.cfg.name:
            continue
        with IPRoute(netns=node.cfg.netns) as ipr:
            idx = ipr.link_lookup(ifname=lp.pod.iface.host_ifname)[0]
            assert tc.filters(ipr, idx, tc.INGRESS) == ["pcn_ingress"]


def _root_links() -> set[str]:
    with IPRoute() as ipr:
        return {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}


def test_teardown_leaves_nothing() -> None:
    root_before = _root_links()
    lab = Lab(nodes_count=2, pods_per_node=1).build()
    names = list(lab.namespaces)
    pins = [lab.pin_root / n for n in lab.nodes]
    assert all(p.exists() for p in pins)
    assert checks.ping(lab, "n1p1", lab.pods["n2p1"].ip, count=1).passed
    lab.close()
    assert lab.leftovers() == []
    assert not set(names) & set(pr_netns.listnetns())
    assert not any(p.exists() for p in pins)
    assert _root_links() == root_before


def _links_and_routes(netns: str) -> tuple[set[str], set[str]]:
    with IPRoute(netns=netns) as ipr:
        links = {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        routes = {f"{r.get_attr('RTA_DST')}/{r['dst_len']}" for r in ipr.get_routes(family=2)
                  if r.get_attr("RTA_DST")}
    return links, routes


def test_node_down_removes_its_links_and_routes_from_the_node() -> None:
    """On a real node the agent shares the host's namespace: down() must take
    back every device and route it put there."""
    with Lab(nodes_count=1, pods_per_node=1) as lab:
        node = lab.node(1)
        ns = node.cfg.netns or ""
        links, routes = _links_and_routes(ns)
        assert {node_mod.HOST_DEV, node_mod.HOST_CUBE_DEV, node_mod.VXLAN_DEV} <= links
        ours = {node.cfg.pod_cidr, node.cfg.cluster_pod_cidr}
        assert ours <= routes
        node.down()
        links, routes = _links_and_routes(ns)
        assert not {node_mod.HOST_DEV, node_mod.HOST_CUBE_DEV, node_mod.VXLAN_DEV} & links
        assert not any(link.startswith("pcn") for link in links), links
        assert not ours & routes
        node.down()  # twice is fine
    assert lab.leftovers() == []


def test_failed_build_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    root_before = _root_links()
    lab = Lab(nodes_count=2, pods_per_node=2)
    real_add_pod = Lab.add_pod
    calls = []

    def failing_add_pod(self: Lab, node_index: int, pod_index: int):
        calls.append((node_index, pod_index))
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return real_add_pod(self, node_index, pod_index)

    monkeypatch.setattr(Lab, "add_pod", failing_add_pod)
    with pytest.raises(RuntimeError, match="injected failure"):
        lab.build()
    assert lab.leftovers() == []
    assert _root_links() == root_before
