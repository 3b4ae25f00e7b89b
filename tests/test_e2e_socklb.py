"""End to end: socket-level load balancing on a two-node lab whose pods run
in their node's cgroup (Lab(socket_lb=True)). A pod's connection to a
ClusterIP is translated at connect()/sendmsg() (the node's lbrp then records
no session for it: it never sees the Service address), reaches a backend on
the same or the other node, and the application sees the ClusterIP as its
peer; turned off, the lbrp translates the same connections per packet.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pcn_agent.dataplane.socklb import HOOKS, attached_programs
from pcn_lab import checks
from pcn_lab.topology import Lab

pytestmark = pytest.mark.netns

TCP, UDP = checks.TCP_PORT, checks.UDP_PORT
VIP_LOCAL = "10.96.1.10"  # its one backend: n1p2, on the clients' node
VIP_REMOTE = "10.96.1.11"  # its one backend: n2p1, on the other node
VIP_BOTH = "10.96.1.12"  # n1p2, n2p1, n2p2
VIP_AFFINITY = "10.96.1.13"
VIP_EMPTY = "10.96.1.14"
VIP_SELF = "10.96.1.15"  # n1p1's own service


@pytest.fixture(scope="module")
def sock_lab() -> Iterator[Lab]:
    with Lab(nodes_count=2, pods_per_node=2, socket_lb=True) as lab:
        assert all(n.socket_lb is not None for n in lab.nodes.values())
        lab.set_service(VIP_LOCAL, 80, "tcp", [lab.backend("n1p2", TCP)])
        lab.set_service(VIP_LOCAL, 53, "udp", [lab.backend("n1p2", UDP)])
        lab.set_service(VIP_REMOTE, 80, "tcp", [lab.backend("n2p1", TCP)])
        lab.set_service(VIP_REMOTE, 53, "udp", [lab.backend("n2p1", UDP)])
        both = [lab.backend(p, TCP) for p in ("n1p2", "n2p1", "n2p2")]
        lab.set_service(VIP_BOTH, 80, "tcp", both)
        lab.set_service(VIP_AFFINITY, 80, "tcp", both, affinity_timeout_s=60)
        lab.set_service(VIP_EMPTY, 80, "tcp", [])
        lab.set_service(VIP_SELF, 80, "tcp", [lab.backend("n1p1", TCP)])
        with checks.servers(lab):
            yield lab
    assert lab.leftovers() == [], f"teardown left {lab.leftovers()}"


def _probe(lab: Lab, src: str, *args: str) -> dict:
    return checks.probe(lab, src, list(args), 60)


def _lbrp_sessions_to(lab: Lab, vip: str, client: str = "n1p1") -> list[dict[str, str | int]]:
    """The lbrp's sessions on node 1 from pod `client` to `vip`."""
    lb = lab.node(1).lb
    assert lb is not None
    ip = lab.pods[client].ip
    return [s for s in lb.services.sessions()
            if str(s["service"]).startswith(f"{vip}:") and str(s["client"]).startswith(f"{ip}:")]


@pytest.mark.parametrize(("vip", "backend"), [(VIP_LOCAL, "n1p2"), (VIP_REMOTE, "n2p1")])
def test_tcp_to_clusterip_reaches_backend_translated_at_the_socket(
        sock_lab: Lab, vip: str, backend: str) -> None:
    r = _probe(sock_lab, "n1p1", "tcp", vip, "80", "--peer", "--bytes", "200000")
    assert r["ok"], r
    assert r["host"] == backend
    assert r["peer"] == f"{vip}:80"  # getpeername(): the ClusterIP, not the pod
    assert r["peer_seen"] == sock_lab.pods["n1p1"].ip  # no masquerade on the way
    assert _lbrp_sessions_to(sock_lab, vip) == []  # the lbrp never saw the ClusterIP


@pytest.mark.parametrize(("vip", "backend"), [(VIP_LOCAL, "n1p2"), (VIP_REMOTE, "n2p1")])
def test_udp_request_reply_comes_from_the_clusterip(sock_lab: Lab, vip: str,
                                                    backend: str) -> None:
    unconnected = _probe(sock_lab, "n1p1", "udp", vip, "53", "--unconnected")
    connected = _probe(sock_lab, "n1p1", "udp", vip, "53")
    for r in (unconnected, connected):
        assert r["ok"], r
        assert (r["host"], r["peer"]) == (backend, f"{vip}:53")


def test_new_connections_spread_over_both_nodes(sock_lab: Lab) -> None:
    r = _probe(sock_lab, "n1p1", "tcp", VIP_BOTH, "80", "--count", "40")
    assert r["ok"], r
    assert set(r["hosts"]) == {"n1p2", "n2p1", "n2p2"}, r


def test_affinity_keeps_a_pod_on_one_backend(sock_lab: Lab) -> None:
    r = _probe(sock_lab, "n1p1", "tcp", VIP_AFFINITY, "80", "--count", "20")
    assert r["ok"], r
    assert len(r["hosts"]) == 1, r


def test_service_without_endpoints_is_refused(sock_lab: Lab) -> None:
    r = _probe(sock_lab, "n1p1", "tcp", VIP_EMPTY, "80", "--peer", "--timeout", "3")
    assert (r["ok"], r.get("errno")) == (False, "ECONNREFUSED"), r


def test_pod_reaches_itself_through_its_service(sock_lab: Lab) -> None:
    r = _probe(sock_lab, "n1p1", "tcp", VIP_SELF, "80", "--peer")
    assert r["ok"] and r["host"] == "n1p1" and r["peer"] == f"{VIP_SELF}:80", r


def test_node_processes_outside_the_pods_cgroup_use_the_lbrp(sock_lab: Lab) -> None:
    """The node's own stack is not in its pods' cgroup: the lbrp on the
    router's host port translates its connection, per packet."""
    r = _probe(sock_lab, sock_lab.node_name(1), "tcp", VIP_REMOTE, "80", "--peer")
    assert r["ok"] and r["host"] == "n2p1", r


def test_socket_lb_off_falls_back_to_the_lbrp(sock_lab: Lab) -> None:
    sock_lab.set_socket_lb(False)
    try:
        assert all(n.socket_lb is None for n in sock_lab.nodes.values())
        r = _probe(sock_lab, "n1p1", "tcp", VIP_REMOTE, "80", "--peer")
        assert r["ok"] and r["host"] == "n2p1" and r["peer"] == f"{VIP_REMOTE}:80", r
        assert _lbrp_sessions_to(sock_lab, VIP_REMOTE) != []  # translated per packet
        refused = _probe(sock_lab, "n1p1", "tcp", VIP_EMPTY, "80", "--peer", "--timeout", "3")
        assert refused.get("errno") == "ECONNREFUSED", refused  # the lbrp's TCP RST
    finally:
        sock_lab.set_socket_lb(True)
    assert all(n.socket_lb is not None for n in sock_lab.nodes.values())
    r = _probe(sock_lab, "n1p2", "udp", VIP_REMOTE, "53", "--unconnected")
    assert r["ok"] and r["peer"] == f"{VIP_REMOTE}:53", r


def test_a_restarted_agent_takes_over_the_socket_programs(sock_lab: Lab) -> None:
    """A crash leaves the programs attached (pods keep translating); the new
    agent attaches its own and detaches the dead one's: one per hook."""
    cgroup = sock_lab.node(1).cfg.socket_lb_cgroup
    assert cgroup is not None
    new = sock_lab.restart_node(1)
    assert new.socket_lb is not None
    assert all(len(attached_programs(Path(cgroup), t)) == 1 for t in HOOKS.values())
    before = _lbrp_sessions_to(sock_lab, VIP_REMOTE)  # the fallback test's, if not collected
    r = _probe(sock_lab, "n1p1", "tcp", VIP_REMOTE, "80", "--peer")
    assert r["ok"] and r["host"] == "n2p1" and r["peer"] == f"{VIP_REMOTE}:80", r
    assert [s for s in _lbrp_sessions_to(sock_lab, VIP_REMOTE) if s not in before] == []


def test_each_node_translates_for_its_own_pods_only(sock_lab: Lab) -> None:
    """A service known to node 2 alone: node 2's pods reach it at the
    socket; node 1's pods are in node 1's cgroup, whose programs (and lbrp)
    do not know it."""
    vip = "10.96.1.20"
    sock_lab.node(2).set_service(vip, 80, "tcp", [sock_lab.backend("n1p2", TCP)])
    try:
        there = _probe(sock_lab, "n2p1", "tcp", vip, "80", "--peer")
        assert there["ok"] and there["host"] == "n1p2" and there["peer"] == f"{vip}:80", there
        here = _probe(sock_lab, "n1p1", "tcp", vip, "80", "--peer", "--timeout", "2")
        assert not here["ok"], here
    finally:
        sock_lab.node(2).delete_service(vip, 80, "tcp")
