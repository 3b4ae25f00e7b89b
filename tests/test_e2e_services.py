"""End to end: ClusterIP, NodePort, egress masquerading, the firewall, live
chain edits and agent restarts, on two nodes with an external host."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
import time

import pytest

from pcn_agent.dataplane.cubes.dispatcher import POLICY_ENDPOINT
from pcn_agent.dataplane.cubes.firewall import Firewall
from pcn_agent.dataplane.cubes.lbrp import Backend, be16
from pcn_crds.rules import parse_rule
from pcn_lab import checks
from pcn_lab.topology import EXTERNAL_IP, Lab

pytestmark = pytest.mark.netns

TCP, UDP = checks.TCP_PORT, checks.UDP_PORT
VIP = "10.96.0.10"
VIP_WEIGHTED = "10.96.0.11"
VIP_UDP = "10.96.0.12"
VIP_EMPTY = "10.96.0.13"
VIP_AFFINITY = "10.96.0.14"
VIP_LONG = "10.96.0.15"
VIP_DEAF = {"n1p2": "10.96.0.16", "n2p1": "10.96.0.17"}  # a backend with no listener
VIP_SELF = "10.96.0.18"  # n1p1's own service: its only backend is n1p1
VIP_SELF_AND_OTHER = "10.96.0.19"
VIP_BIG = {"n1p2": "10.96.0.20", "n2p1": "10.96.0.21"}  # one backend: same node, other node
BIG = 4000  # bytes of a UDP datagram: three fragments at the pods' MTU (1450)
UNALLOCATED = "10.96.200.200"  # in the Service range, no Service has it
CLOSED = 9  # a port no probe server listens on


@pytest.fixture(scope="module")
def svc_lab(lab: Lab):
    backends = [lab.backend(p, TCP) for p in ("n1p2", "n2p1", "n2p2")]
    lab.set_service(VIP, 80, "tcp", backends)
    lab.set_service(VIP_WEIGHTED, 80, "tcp", [lab.backend("n1p2", TCP, 1),
                                              lab.backend("n2p1", TCP, 2),
                                              lab.backend("n2p2", TCP, 1)])
    lab.set_service(VIP_UDP, 53, "udp", [lab.backend(p, UDP) for p in ("n1p2", "n2p1")])
    lab.set_service(VIP_EMPTY, 80, "tcp", [])
    lab.set_service(VIP_EMPTY, 53, "udp", [])
    lab.set_service(VIP_AFFINITY, 80, "tcp", backends, affinity_timeout_s=60)
    for pod, vip in VIP_DEAF.items():
        lab.set_service(vip, 53, "udp", [lab.backend(pod, CLOSED)])
    for pod, vip in VIP_BIG.items():
        lab.set_service(vip, 53, "udp", [lab.backend(pod, UDP)])
    lab.set_service(VIP_SELF, 80, "tcp", [lab.backend("n1p1", TCP)])
    lab.set_service(VIP_SELF, 53, "udp", [lab.backend("n1p1", UDP)])
    lab.set_service(VIP_SELF_AND_OTHER, 80, "tcp", [lab.backend("n1p1", TCP),
                                                    lab.backend("n2p1", TCP)])
    with checks.servers(lab, [*lab.pods, "ext"]):
        yield lab


def _tcp(lab: Lab, src: str, host: str, port: int, **kw) -> dict:
    args = ["tcp", host, str(port), "--timeout", str(kw.pop("timeout", 5))]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return checks.probe(lab, src, args, 60)


# --------------------------------------------------------------------- ClusterIP
def test_clusterip_reaches_backends_on_both_nodes(svc_lab: Lab) -> None:
    r = _tcp(svc_lab, "n1p1", VIP, 80, count=30)
    assert r["ok"], r
    assert {"n1p2", "n2p1", "n2p2"} == set(r["hosts"]), r


def test_clusterip_weights_spread_new_connections(svc_lab: Lab) -> None:
    r = _tcp(svc_lab, "n1p1", VIP_WEIGHTED, 80, count=200)
    assert r["ok"], r
    # Weights 1:2:1 put 16, 32 and 16 of 64 slots behind the backends; each new
    # connection's source port picks a slot through a hash, so counts follow a
    # binomial law: sd = sqrt(200 p (1-p)) = 6.1 for p = 1/4 and 7.1 for p = 1/2.
    # +-4 sd (25) keeps a false failure below 1e-4 while a wrong weighting (for
    # example equal thirds: 67 each) still fails.
    h = r["hosts"]
    assert abs(h.get("n1p2", 0) - 50) <= 25, h
    assert abs(h.get("n2p1", 0) - 100) <= 25, h
    assert abs(h.get("n2p2", 0) - 50) <= 25, h


def test_one_connection_stays_on_one_backend(svc_lab: Lab) -> None:
    # 2 MB in one connection: if any segment went to another backend the stream
    # would break and the digest the backend computed could not match.
    r = _tcp(svc_lab, "n1p1", VIP, 80, bytes=2_000_000)
    assert r["ok"], r
    # this service's sessions only: an earlier test's connection to another
    # service may have used the same source port (its session lingers)
    mine = [s for s in svc_lab.node(1).lb.services.sessions()
            if s["client"].endswith(f":{r['peer_port_seen']}") and s["service"] == f"{VIP}:80"]
    assert len(mine) == 1, mine


def test_client_sees_only_the_service_address(svc_lab: Lab) -> None:
    r = checks.probe(svc_lab, "n1p1", ["udp", VIP_UDP, "53", "--timeout", "3"], 20)
    assert r["ok"], r  # connected UDP socket: a reply from the backend's own address is refused
    assert r["host"] in ("n1p2", "n2p1")
    assert r["peer_seen"] == svc_lab.pods["n1p1"].ip  # no source NAT inside the cluster


def test_session_affinity_client_ip(svc_lab: Lab) -> None:
    r = _tcp(svc_lab, "n1p1", VIP_AFFINITY, 80, count=20)
    assert r["ok"], r
    assert len(r["hosts"]) == 1, r


def test_service_without_backends_rejects(svc_lab: Lab) -> None:
    node = svc_lab.node(1)
    before = node.rt.cube_drops("lb").get("rejected", 0)
    r = _tcp(svc_lab, "n1p1", VIP_EMPTY, 80, timeout=5)
    assert not r["ok"] and "ConnectionRefused" in r.get("error", ""), r
    u = checks.probe(svc_lab, "n1p1", ["udp", VIP_EMPTY, "53", "--timeout", "3"], 20)
    assert not u["ok"] and "ConnectionRefused" in u.get("error", ""), u
    assert node.rt.cube_drops("lb").get("rejected", 0) - before >= 2


def _udp_refused(lab: Lab, src: str, host: str, port: int) -> None:
    """A connected UDP socket hears ECONNREFUSED only if the ICMP port
    unreachable quotes exactly what it sent: translated back by the cube that
    translated the datagram. Untranslated, the error matches no socket and
    the client waits for its timeout."""
    r = checks.probe(lab, src, ["udp", host, str(port), "--timeout", "4"], 20)
    assert not r["ok"] and "ConnectionRefused" in r.get("error", ""), r


@pytest.mark.parametrize("backend", sorted(VIP_DEAF))
def test_udp_service_whose_backend_does_not_listen_is_refused(svc_lab: Lab,
                                                              backend: str) -> None:
    _udp_refused(svc_lab, "n1p1", VIP_DEAF[backend], 53)


def test_masqueraded_udp_to_a_closed_outside_port_is_refused(svc_lab: Lab) -> None:
    _udp_refused(svc_lab, "n1p1", EXTERNAL_IP, CLOSED)


def _big_udp(lab: Lab, src: str, host: str, port: int, reply_size: int = BIG) -> dict:
    return checks.probe(lab, src, ["udp", host, str(port), "--size", str(BIG), "--reply-size",
                                   str(reply_size), "--timeout", "4"], 20)


@pytest.mark.parametrize("backend", sorted(VIP_BIG))
def test_a_big_udp_datagram_crosses_a_clusterip_whole_both_ways(svc_lab: Lab,
                                                                backend: str) -> None:
    """4000 bytes to a ClusterIP leave the pod in three fragments: all of them
    must reach the backend (on this node or over the overlay), and all of the
    answer's, as big, must come back from the service address."""
    r = _big_udp(svc_lab, "n1p1", VIP_BIG[backend], 53)
    assert r["ok"] and r["host"] == backend, r  # the server got every byte, we got its answer
    assert (r["sent"], r["received"]) == (BIG, BIG), r
    assert r["peer_seen"] == svc_lab.pods["n1p1"].ip


def test_removing_a_backend_keeps_connections_to_the_others(svc_lab: Lab) -> None:
    lab = svc_lab
    keep, drop = lab.backend("n2p1", TCP), lab.backend("n2p2", TCP)
    lab.set_service(VIP_LONG, 80, "tcp", [keep])
    client = lab.popen(lab.pods["n1p1"].netns, checks.probe_argv(
        "tcp", VIP_LONG, "80", "--bytes", "3000000", "--rate", "1000000", "--timeout", "20"),
        stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        lab.set_service(VIP_LONG, 80, "tcp", [keep, drop])  # add one
        time.sleep(0.5)
        lab.set_service(VIP_LONG, 80, "tcp", [drop])  # remove the one in use
        out, _ = client.communicate(timeout=30)
    finally:
        client.kill()
    r = json.loads(out.strip().splitlines()[-1])
    assert r["ok"] and r["host"] == "n2p1", r
    r2 = _tcp(lab, "n1p1", VIP_LONG, 80)  # new connections go to the remaining backend
    assert r2["ok"] and r2["host"] == "n2p2", r2


# --------------------------------------------------------------------- NodePort
def test_nodeport_local_preserves_client_address(svc_lab: Lab) -> None:
    lab = svc_lab
    lab.set_nodeport(30080, "tcp", "Local", [lab.backend("n1p2", TCP)])
    r = _tcp(lab, "ext", lab.node_ip(1), 30080)
    assert r["ok"] and r["host"] == "n1p2", r
    assert r["peer_seen"] == EXTERNAL_IP


def test_nodeport_local_without_local_backend_drops(svc_lab: Lab) -> None:
    lab = svc_lab
    lab.set_nodeport(30082, "tcp", "Local", [lab.backend("n1p2", TCP)])
    before = lab.node(2).rt.cube_drops("k8s").get("no_backend", 0)
    r = _tcp(lab, "ext", lab.node_ip(2), 30082, timeout=2)
    assert not r["ok"], r
    assert lab.node(2).rt.cube_drops("k8s").get("no_backend", 0) > before


def test_nodeport_cluster_answers_through_the_entry_node(svc_lab: Lab) -> None:
    lab = svc_lab
    lab.set_nodeport(30081, "tcp", "Cluster", [lab.backend("n2p1", TCP)])
    r = _tcp(lab, "ext", lab.node_ip(1), 30081)
    assert r["ok"] and r["host"] == "n2p1", r
    # The source was rewritten to node 1's overlay address, so the backend on
    # node 2 answered through node 1 (the client only ever talked to node 1).
    assert r["peer_seen"] == lab.vtep_ip(1)
    u_args = ["udp", lab.node_ip(1), "30083", "--timeout", "3"]
    lab.set_nodeport(30083, "udp", "Cluster", [lab.backend("n2p2", UDP)])
    u = checks.probe(lab, "ext", u_args, 20)
    assert u["ok"] and u["host"] == "n2p2", u


def test_pods_reach_a_nodeport_through_any_node_address(svc_lab: Lab) -> None:
    """Through their own node's address the pod's lbrp translates it (the
    NodePort is in the node's service table); through another node's, the
    pod is masqueraded and that node's dispatcher translates it."""
    lab = svc_lab
    lab.set_nodeport(30084, "tcp", "Cluster", [lab.backend("n2p2", TCP)])
    for node in (1, 2):
        r = _tcp(lab, "n1p1", lab.node_ip(node), 30084)
        assert r["ok"] and r["host"] == "n2p2", (node, r)


def test_a_local_nodeport_serves_pods_with_endpoints_on_other_nodes(svc_lab: Lab) -> None:
    """externalTrafficPolicy Local with the only backend on node 2: a pod on
    node 1 reaching node 1's address gets it all the same (kube-proxy sends
    cluster-internal traffic to any endpoint); from outside, node 1 drops
    and node 2 serves with the client's address kept."""
    lab = svc_lab
    lab.set_nodeport(30086, "tcp", "Local", [lab.backend("n2p1", TCP)])
    r = _tcp(lab, "n1p1", lab.node_ip(1), 30086)
    assert r["ok"] and r["host"] == "n2p1", r
    outside = _tcp(lab, "ext", lab.node_ip(1), 30086, timeout=2)
    assert not outside["ok"] and "timed out" in outside.get("error", ""), outside
    r = _tcp(lab, "ext", lab.node_ip(2), 30086)
    assert r["ok"] and r["host"] == "n2p1" and r["peer_seen"] == EXTERNAL_IP, r


# --------------------------------------------------------------------- hairpin
def test_a_pod_reaches_itself_through_its_clusterip(svc_lab: Lab) -> None:
    """Hairpin: the pod is its Service's only backend. Without masquerading
    every connection failed (the SYN came back from the pod's own address and
    was dropped); as with kube-proxy it comes from another address, here the
    pods' gateway."""
    lab = svc_lab
    r = _tcp(lab, "n1p1", VIP_SELF, 80)
    assert r["ok"] and r["host"] == "n1p1", r
    assert r["peer_seen"] == lab.node(1).cfg.gateway, r
    many = _tcp(lab, "n1p1", VIP_SELF, 80, count=20)
    assert many["ok"] and many["hosts"] == {"n1p1": 20}, many
    u = checks.probe(lab, "n1p1", ["udp", VIP_SELF, "53", "--timeout", "3"], 20)
    assert u["ok"] and u["host"] == "n1p1" and u["peer_seen"] == lab.node(1).cfg.gateway, u


def test_a_pod_reaches_its_service_when_it_is_one_of_two_backends(svc_lab: Lab) -> None:
    r = _tcp(svc_lab, "n1p1", VIP_SELF_AND_OTHER, 80, count=30)
    assert r["ok"], r  # about half of them failed: those that picked the pod itself
    assert set(r["hosts"]) == {"n1p1", "n2p1"}, r


def test_a_pod_reaches_itself_through_a_nodeport_on_any_node_address(svc_lab: Lab) -> None:
    """Its own node's address (the lbrp translates it, hairpin masquerade) and
    the other node's (masqueraded to node 1, translated by node 2's
    dispatcher, sent back over the overlay from node 2's VTEP)."""
    lab = svc_lab
    lab.set_nodeport(30085, "tcp", "Cluster", [lab.backend("n1p1", TCP)])
    for node, seen in ((1, lab.node(1).cfg.gateway), (2, lab.vtep_ip(2))):
        r = _tcp(lab, "n1p1", lab.node_ip(node), 30085)
        assert r["ok"] and r["host"] == "n1p1", (node, r)
        assert r["peer_seen"] == seen, (node, r)


# --------------------------------------------------------------------- the node itself
@pytest.mark.parametrize("policy", ["Cluster", "Local"])
def test_the_node_reaches_its_own_nodeports(svc_lab: Lab, policy: str) -> None:
    """curl <node IP>:<nodePort> on the node itself, backends on this node and
    on the other one, TCP and UDP: kube-proxy serves the node too (whatever
    the policy: its local traffic is short-circuited to every endpoint) and
    masquerades it."""
    lab = svc_lab
    node = lab.node_name(1)
    port = 30087 if policy == "Cluster" else 30088
    for backend in ("n1p2", "n2p2"):
        lab.set_nodeport(port, "tcp", policy, [lab.backend(backend, TCP)])
        lab.set_nodeport(port, "udp", policy, [lab.backend(backend, UDP)])
        r = _tcp(lab, node, lab.node_ip(1), port)
        assert r["ok"] and r["host"] == backend, (backend, r)
        mine = backend.startswith("n1")
        assert r["peer_seen"] == (lab.node_ip(1) if mine else lab.node(1).cfg.host_pod_ip), r
        big = _tcp(lab, node, lab.node_ip(1), port, bytes=1_000_000, timeout=20)
        assert big["ok"], (backend, big)  # loopback's large segments reach the pod whole
        u = checks.probe(lab, node, ["udp", lab.node_ip(1), str(port), "--timeout", "3"], 20)
        assert u["ok"] and u["host"] == backend, (backend, u)


def test_the_node_reaches_clusterips(svc_lab: Lab) -> None:
    """A hostNetwork client (the node's own stack) of a ClusterIP, TCP and
    UDP, backends on this node and on the other one: kube-proxy serves the
    node too (its OUTPUT chain); hostNetwork pods with ClusterFirstWithHostNet
    DNS and agents that use the kubernetes Service depend on it."""
    lab = svc_lab
    node = lab.node_name(1)
    seen = set()
    for _ in range(12):
        r = _tcp(lab, node, VIP, 80)
        assert r["ok"], r
        seen.add(r["host"])
    assert seen & {"n2p1", "n2p2"} and "n1p2" in seen, seen  # both nodes' backends
    for pod, vip in VIP_BIG.items():  # one backend each: same node, other node
        u = checks.probe(lab, node, ["udp", vip, "53", "--timeout", "3"], 20)
        assert u["ok"] and u["host"] == pod, (pod, u)
    r = _tcp(lab, node, VIP_EMPTY, 80, timeout=5)
    assert not r["ok"] and "refused" in str(r).lower(), r  # no endpoint: rejected


def test_the_node_reaches_a_clusterip_whose_backend_is_itself(svc_lab: Lab) -> None:
    """The kubernetes Service on a control-plane node: its endpoint is the
    node's own address (a hostNetwork server). The node's connection to the
    ClusterIP comes back through the lbrp (masqueraded to the pods' gateway),
    not delivered locally past it; other nodes and pods reach it too."""
    lab = svc_lab
    node1 = lab.node_name(1)
    vip = "10.96.0.30"
    lab.set_service(vip, 443, "tcp", [Backend(lab.node_ip(1), TCP)])
    try:
        with checks.servers(lab, [node1]):
            for client in (node1, lab.node_name(2), "n1p1", "n2p1"):
                r = _tcp(lab, client, vip, 443)
                assert r["ok"] and r["host"] == node1, (client, r)
    finally:
        lab.delete_service(vip, 443, "tcp")


@pytest.mark.parametrize("policy", ["Cluster", "Local"])
def test_a_nodeport_whose_endpoints_are_hostnetwork_servers(svc_lab: Lab, policy: str) -> None:
    """Upstream's "Networking Granular Checks: Services should function for
    service endpoints using hostNetwork": a NodePort's endpoints are the nodes'
    own addresses. Every client reaches it through every node's address: pods,
    the nodes themselves (the other node crossing the underlay, the endpoint
    node itself among them) and the outside. With the Local policy what
    reaches a node from elsewhere gets its own server only."""
    lab = svc_lab
    node1, node2 = lab.node_name(1), lab.node_name(2)
    port = 30091 if policy == "Cluster" else 30092
    backends = {"tcp": [Backend(lab.node_ip(i), TCP) for i in (1, 2)],
                "udp": [Backend(lab.node_ip(i), UDP) for i in (1, 2)]}
    try:
        with checks.servers(lab, [node1, node2]):
            for proto, bs in backends.items():
                for node in lab.nodes.values():  # each node's own endpoint is its local one
                    mine = [b for b in bs if b.ip == node.cfg.node_ip]
                    node.set_nodeport(port, proto, policy, bs, local=mine)
            for client in (node1, node2, "n1p1", "n2p1", "ext"):
                for entry in (1, 2):
                    # Local: the entry node's own endpoint for whatever reaches it
                    # from elsewhere (another node's traffic arrives from that
                    # node's address: from outside, as for kube-proxy)
                    here = client in (lab.node_name(entry), f"n{entry}p1")
                    want = {lab.node_name(entry)} if policy == "Local" and not here \
                        else {node1, node2}
                    r = _tcp(lab, client, lab.node_ip(entry), port, count=16)
                    # These once failed one time in a few hundred: a node had
                    # masqueraded two flows to one port, one to a NodePort and
                    # one to its endpoint (see the test below)
                    assert r["ok"], (client, entry, r)
                    hosts = set(r["hosts"])
                    for _ in range(8):
                        u = checks.probe(lab, client, ["udp", lab.node_ip(entry), str(port),
                                                       "--timeout", "3"], 20)
                        assert u["ok"], (client, entry, u)
                        hosts.add(u["host"])
                    assert hosts == want, (client, entry, r, hosts)
    finally:
        lab.delete_nodeport(port, "tcp")
        lab.delete_nodeport(port, "udp")


_CLIENT_ON_ONE_PORT = r"""
import json, socket, sys
from pcn_lab.probe import recv_line
proto, node, sport, ports = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
out = []
if proto == "udp":  # one socket, one datagram to each port in turn
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", sport))
    s.settimeout(3)
    for port in map(int, ports):
        s.sendto(b"pcn-probe", (node, port))
        try:
            data, src = s.recvfrom(65535)
            out.append([src[1], json.loads(data)["host"]])
        except OSError as e:
            out.append([None, repr(e)])
else:  # a connection to each port in turn, all open, then each asked in turn
    socks = []
    for port in map(int, ports):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", sport))
        s.settimeout(3)
        try:
            s.connect((node, port))
            socks.append((s, s.getpeername()[1]))
        except OSError as e:
            socks.append((s, "connect " + repr(e)))
    for s, peer in socks:
        try:
            s.sendall(b"pcn")
            s.shutdown(socket.SHUT_WR)
            buf = recv_line(s)
            out.append([peer, json.loads(buf)["host"] if buf else "no answer"])
        except OSError as e:
            out.append([None, repr(e)])
print(json.dumps(out))
"""


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_flows_that_share_a_client_port_get_their_own_answers(svc_lab: Lab, proto: str) -> None:
    """One client port reaching a hostNetwork server through two NodePorts and
    directly (the replies of all three have one wire tuple once translated;
    a node masquerading two pods' flows, or a pod's and the outside's, to the
    same port does it too): each flow gets its own answers, as conntrack's
    clash handling gives them with kube-proxy, the newer flow's source port
    remapped. TCP in both orders: the direct connection first (the host's
    socket shows it) and the NodePort one first (its session does)."""
    lab = svc_lab
    node1 = lab.node_name(1)
    server = UDP if proto == "udp" else TCP
    np1, np2 = 30093, 30094
    b = [Backend(lab.node_ip(1), server)]
    orders = [[np1, server, np2, np1, server, np2]] if proto == "udp" else \
        [[np1, server, np2], [server, np1, np2]]
    try:
        with checks.servers(lab, [node1]):
            for node in lab.nodes.values():
                for np_ in (np1, np2):
                    node.set_nodeport(np_, proto, "Cluster", b,
                                      local=[x for x in b if x.ip == node.cfg.node_ip])
            for i, order in enumerate(orders):
                sport = 40000 + (int(lab.run_id, 16) + i) % 20000
                r = lab.exec(lab.ext_ns, [sys.executable, "-c", _CLIENT_ON_ONE_PORT, proto,
                                          lab.node_ip(1), str(sport), *map(str, order)],
                             timeout=60)
                got = json.loads(r.stdout.strip().splitlines()[-1])
                assert [g[0] for g in got] == order, (order, got)
                assert {g[1] for g in got} == {node1}, got
        # the endpoint's port is marked while a NodePort has it, on its node only
        d = lab.node(1).dispatcher
        marked = [k for k, v in d._nodeports.items() if v.policy == POLICY_ENDPOINT]
        assert [k.port for k in marked] == [be16(server)], marked
        assert not [k for k, v in lab.node(2).dispatcher._nodeports.items()
                    if v.policy == POLICY_ENDPOINT]
        lab.delete_nodeport(np1, proto)
        assert len([v for v in d._nodeports.values() if v.policy == POLICY_ENDPOINT]) == 1
        lab.delete_nodeport(np2, proto)
        assert not [v for v in d._nodeports.values() if v.policy == POLICY_ENDPOINT]
    finally:
        for np_ in (np1, np2):
            lab.delete_nodeport(np_, proto)


def test_an_external_ip_outside_the_service_range_serves_pods(svc_lab: Lab) -> None:
    """A Service's externalIP that no node has (upstream's "should be possible
    to connect to a service via ExternalIP when the external IP is not
    assigned to a node"): pods on both nodes reach its backends there."""
    lab = svc_lab
    ext = "203.0.113.250"
    lab.set_service(ext, 80, "tcp", [lab.backend("n2p1", TCP)])
    try:
        for client in ("n1p1", "n2p2"):
            r = _tcp(lab, client, ext, 80)
            assert r["ok"] and r["host"] == "n2p1", (client, r)
    finally:
        lab.delete_service(ext, 80, "tcp")


def test_an_adopting_agent_gives_the_node_its_service_route(svc_lab: Lab) -> None:
    """A node built by an agent that had no Service route gets it when a new
    agent adopts it (the route is deleted while no agent runs)."""
    lab = svc_lab
    netns = lab.node(1).cfg.netns
    cidr = lab.node(1).cfg.service_cidr
    lab.restart_node(1, while_down=lambda: subprocess.run(
        ["ip", "-n", netns, "route", "del", cidr], check=True))
    routes = subprocess.run(["ip", "-n", netns, "route", "show", cidr], capture_output=True,
                            text=True, check=True).stdout
    assert cidr in routes, routes
    assert _tcp(lab, lab.node_name(1), VIP, 80)["ok"]


def test_the_nodes_connection_to_a_nodeport_without_endpoints_is_refused(svc_lab: Lab) -> None:
    """Refused by the service (its reject, counted), not by the node's stack
    finding nothing listening on the port."""
    lab = svc_lab
    lab.set_nodeport(30089, "tcp", "Cluster", [])
    node = lab.node(1)
    before = node.rt.cube_drops("lb").get("rejected", 0)
    r = _tcp(lab, lab.node_name(1), lab.node_ip(1), 30089, timeout=5)
    assert not r["ok"] and "ConnectionRefused" in r.get("error", ""), r
    assert node.rt.cube_drops("lb").get("rejected", 0) == before + 1
    # and from outside the cluster (the dispatcher's reject)
    before = node.rt.cube_drops("k8s").get("rejected", 0)
    r = _tcp(lab, "ext", lab.node_ip(1), 30089, timeout=5)
    assert not r["ok"] and "ConnectionRefused" in r.get("error", ""), r
    assert node.rt.cube_drops("k8s").get("rejected", 0) == before + 1


# --------------------------------------------------------------------- the Service range
def test_an_unused_port_of_a_clusterip_is_refused(svc_lab: Lab) -> None:
    """kube-proxy's nftables mode rejects traffic to a port a ClusterIP does
    not serve, TCP and UDP."""
    node = svc_lab.node(1)
    before = node.rt.cube_drops("lb").get("rejected", 0)
    r = _tcp(svc_lab, "n1p1", VIP, 81, timeout=5)
    assert not r["ok"] and "ConnectionRefused" in r.get("error", ""), r
    _udp_refused(svc_lab, "n1p1", VIP, 80)  # VIP serves TCP 80 only
    assert node.rt.cube_drops("lb").get("rejected", 0) - before >= 2


def test_an_unallocated_address_of_the_service_range_is_dropped(svc_lab: Lab) -> None:
    node = svc_lab.node(1)
    before = node.rt.cube_drops("lb").get("no_backend", 0)
    r = _tcp(svc_lab, "n1p1", UNALLOCATED, 80, timeout=2)
    assert not r["ok"] and "timed out" in r.get("error", ""), r
    assert node.rt.cube_drops("lb").get("no_backend", 0) > before


# --------------------------------------------------------------------- egress
def test_egress_is_masqueraded_to_the_node_address(svc_lab: Lab) -> None:
    r = _tcp(svc_lab, "n1p1", EXTERNAL_IP, TCP)
    assert r["ok"], r
    assert r["peer_seen"] == svc_lab.node_ip(1)
    assert checks.ping(svc_lab, "n2p1", EXTERNAL_IP).passed


def test_a_big_udp_datagram_is_masqueraded_whole(svc_lab: Lab) -> None:
    """Every fragment leaves with the node's address (none with the pod's):
    the outside host reassembles the datagram and answers. (Its answer is
    small: the outside network's MTU, 1500, is above the pods' 1450.)"""
    node = svc_lab.node(1)
    before = node.rt.cube_drops("k8s")
    r = _big_udp(svc_lab, "n1p1", EXTERNAL_IP, UDP, reply_size=0)
    assert r["ok"] and r["sent"] == BIG, r
    assert r["peer_seen"] == svc_lab.node_ip(1)
    assert node.rt.cube_drops("k8s") == before


def test_two_pods_same_source_port_both_get_replies(svc_lab: Lab) -> None:
    a = _tcp(svc_lab, "n1p1", EXTERNAL_IP, TCP, src_port=40000)
    b = _tcp(svc_lab, "n1p2", EXTERNAL_IP, TCP, src_port=40000)
    assert a["ok"] and b["ok"], (a, b)
    assert a["peer_seen"] == b["peer_seen"] == svc_lab.node_ip(1)
    assert a["peer_port_seen"] != b["peer_port_seen"]


# --------------------------------------------------------------------- firewall
@pytest.fixture
def ssh_and_web(svc_lab: Lab):
    with checks.servers(svc_lab, ["n1p2"], tcp_ports=(22, 80), udp_ports=()):
        yield svc_lab


def test_firewall_drops_ssh_but_not_web_or_icmp(ssh_and_web: Lab) -> None:
    lab = ssh_and_web
    node = lab.node(1)
    fw = Firewall(node.rt, "fw-ssh", [parse_rule("drop tcp dport 22")])
    try:
        node.set_pod_chain("n1p2", from_pod=[], to_pod=["fw-ssh"])
        assert _tcp(lab, "n1p1", lab.pods["n1p2"].ip, 80)["ok"]
        assert checks.ping(lab, "n1p1", lab.pods["n1p2"].ip).passed
        blocked = _tcp(lab, "n1p1", lab.pods["n1p2"].ip, 22, timeout=2)
        assert not blocked["ok"] and "timed out" in blocked.get("error", ""), blocked
        hits = fw.rule_hits()
        assert hits[0] >= 1
        assert fw.hits()["default: allow"] >= 2  # the web connection and the echo
        assert node.rt.cube_drops("fw-ssh").get("filtered", 0) >= 1
    finally:
        node.set_pod_chain("n1p2", from_pod=[], to_pod=[])
        fw.delete()
    assert _tcp(lab, "n1p1", lab.pods["n1p2"].ip, 22)["ok"]


def test_a_firewall_passes_every_fragment_of_a_datagram_it_allows(svc_lab: Lab) -> None:
    """Default drop, UDP to the probe port allowed: the later fragments of an
    allowed datagram, which carry no port, pass with their first one."""
    lab = svc_lab
    node = lab.node(1)
    fw = Firewall(node.rt, "fw-frag", [parse_rule(f"allow udp dport {UDP}")], default="drop")
    try:
        node.set_pod_chain("n1p2", from_pod=[], to_pod=["fw-frag"])
        r = _big_udp(lab, "n1p1", lab.pods["n1p2"].ip, UDP)
        assert r["ok"] and r["received"] == BIG, r
        assert fw.rule_hits() == [3]  # three fragments, one verdict
        assert node.rt.cube_drops("fw-frag") == {}
    finally:
        node.set_pod_chain("n1p2", from_pod=[], to_pod=[])
        fw.delete()


def test_a_firewall_on_both_sides_lets_replies_through_with_allow_replies(
        ssh_and_web: Lab) -> None:
    """One firewall on both sides of n1p2 (what it receives and what it
    sends), default drop, allowing TCP to port 80 only. With allowReplies the
    server's answers pass and the connection works; n1p2 opens nothing itself
    (its echo requests are no replies). Without it, the answers meet the
    default action and the connection fails."""
    lab = ssh_and_web
    node = lab.node(1)
    web = lab.pods["n1p2"].ip
    fw = Firewall(node.rt, "fw-replies", [parse_rule("allow tcp dport 80")], default="drop",
                  allow_replies=True)
    try:
        node.set_pod_chain("n1p2", from_pod=["fw-replies"], to_pod=["fw-replies"])
        r = _tcp(lab, "n1p1", web, 80, count=3)
        assert r["ok"], r
        assert fw.rule_hits()[0] >= 3 and fw.reply_hits() >= 3
        blocked = _tcp(lab, "n1p1", web, 22, timeout=2)
        assert not blocked["ok"], blocked
        assert checks.ping(lab, "n1p2", lab.pods["n1p1"].ip, count=1).passed is False
        fw.set_rules([parse_rule("allow tcp dport 80")], default="drop", allow_replies=False)
        cut = _tcp(lab, "n1p1", web, 80, timeout=2)
        assert not cut["ok"], cut
        assert fw.rule_hits()[0] >= 1 and fw.default_hits() >= 1  # the SYN-ACK
    finally:
        node.set_pod_chain("n1p2", from_pod=[], to_pod=[])
        fw.delete()
    assert _tcp(lab, "n1p1", web, 80)["ok"]


def test_live_chain_edits_lose_no_packet(svc_lab: Lab) -> None:
    lab = svc_lab
    node = lab.node(1)
    a = Firewall(node.rt, "fw-a", [parse_rule("drop tcp dport 22")])
    b = Firewall(node.rt, "fw-b", [parse_rule("allow icmp"), parse_rule("drop udp")])
    ping = lab.popen(lab.pods["n1p1"].netns, ["ping", "-n", "-q", "-c", "500", "-i", "0.01",
                                              "-W", "1", lab.pods["n1p2"].ip],
                     stdout=subprocess.PIPE, text=True)
    edits = 0
    try:
        chains = [(["fw-a"], []), (["fw-a", "fw-b"], ["fw-b"]), (["fw-b", "fw-a"], ["fw-a"]),
                  ([], ["fw-a", "fw-b"]), ([], [])]
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            for ingress, egress in chains:
                node.set_pod_chain("n1p2", from_pod=ingress, to_pod=egress)
                node.set_pod_chain("n1p1", from_pod=egress, to_pod=ingress)
                edits += 2
                time.sleep(0.05)
        out, _ = ping.communicate(timeout=30)
    finally:
        ping.kill()
        node.set_pod_chain("n1p2", from_pod=[], to_pod=[])
        node.set_pod_chain("n1p1", from_pod=[], to_pod=[])
        a.delete()
        b.delete()
    assert edits >= 20
    assert " 0% packet loss" in out, out


def test_firewall_rule_change_swaps_a_specialised_program(svc_lab: Lab) -> None:
    node = svc_lab.node(1)
    fw = Firewall(node.rt, "fw-spec", [parse_rule("drop from 10.244.9.0/24")])
    try:
        assert fw.spec == {"FW_MAX_RULES": 1, "FW_NEED_L4": 0}
        fw.set_rules([parse_rule("drop tcp dport 22"), parse_rule("allow udp dport 53")])
        assert fw.spec == {"FW_MAX_RULES": 2, "FW_NEED_L4": 1}
        keys = {k for k in node.rt.variants if k[0] == "firewall"}
        assert len(keys) >= 2  # two programs, each compiled for its rule set's shape
    finally:
        fw.delete()


# --------------------------------------------------------------------- restart
def test_connections_survive_an_agent_restart(svc_lab: Lab) -> None:
    lab = svc_lab
    lab.set_service(VIP_LONG, 80, "tcp", [lab.backend("n2p1", TCP)])
    argv_svc = checks.probe_argv("tcp", VIP_LONG, "80", "--bytes", "8000000", "--rate",
                                 "1000000", "--timeout", "30")
    argv_nat = checks.probe_argv("tcp", EXTERNAL_IP, str(TCP), "--bytes", "8000000", "--rate",
                                 "1000000", "--timeout", "30")
    via_svc = lab.popen(lab.pods["n1p1"].netns, argv_svc, stdout=subprocess.PIPE, text=True)
    via_nat = lab.popen(lab.pods["n1p2"].netns, argv_nat, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        old = lab.node(1)
        lab.restart_node(1)
        assert lab.node(1) is not old and lab.node(1).rt.adopted
        outs = [p.communicate(timeout=60)[0] for p in (via_svc, via_nat)]
    finally:
        via_svc.kill()
        via_nat.kill()
    for out in outs:
        r = json.loads(out.strip().splitlines()[-1])
        assert r["ok"], r  # every byte arrived, in one connection, no reset
    assert _tcp(lab, "n1p1", VIP_LONG, 80)["ok"]  # and the adopted node keeps working
    assert checks.ping(lab, "n1p1", lab.pods["n2p2"].ip).passed


def test_a_restarted_agent_takes_over_its_programs_and_its_slow_path(svc_lab: Lab) -> None:
    """The restarted agent loads none of the bundle again (the previous
    programs are its own, dataplane.programs) and still hears them: a pod
    added after the restart is first reached across nodes through the
    router's slow path (ARP miss), which those old programs submit to."""
    lab = svc_lab
    new = lab.restart_node(1)
    bundle = {"pcn_ingress", "pcn_egress", *(f"{t}_rx" for t in new.rt.bundle),
              "policy_judge"}  # the policy cube's tail-called judge too
    assert set(new.rt.taken_over) == bundle
    assert new.slow is not None
    injected = new.slow.injected
    lp = lab.add_pod(1, 8)
    assert checks.ping(lab, "n2p1", lp.ip, count=1, timeout=2).passed
    assert new.slow.injected > injected  # the ARP miss reached this agent


def test_a_pod_deleted_while_the_agent_was_down_is_forgotten_on_restart(svc_lab: Lab) -> None:
    """ADD a pod, stop the agent, DEL the pod (the plugin deletes its veth),
    start the agent: it adopts the rest and forgets the pod instead of failing
    to re-attach the vanished interface ("No such device") forever."""
    lab = svc_lab
    lp = lab.add_pod(1, 9)
    assert lp.pod is not None
    host_if, port_name = lp.pod.iface.host_ifname, lp.pod.port.name
    netns = lab.node(1).cfg.netns
    del lab.pods[lp.name]
    new = lab.restart_node(1, while_down=lambda: subprocess.run(
        ["ip", "-n", netns, "link", "del", host_if], check=True))
    assert new.rt.adopted and lp.name not in new.pods
    assert new.bridge is not None and port_name not in new.bridge.cube.ports
    assert lp.name not in json.loads(new.rt.state_path.read_text())["meta"]["pods"]
    assert _tcp(lab, "n1p1", lab.pods["n1p2"].ip, TCP)["ok"]  # the node serves on
    assert _tcp(lab, "n2p1", lab.pods["n1p1"].ip, TCP)["ok"]



def test_a_batch_that_changes_nothing_writes_no_state(svc_lab: Lab) -> None:
    """Every reconcile pass applies its plan in a batch: one that changes
    nothing must not rewrite the node's state (hundreds of KB of JSON with
    a thousand policies: tens of milliseconds a pass); one that changes
    something saves once, at its end."""
    node = svc_lab.node(1)
    path = node.rt.state_path
    before = path.stat().st_mtime_ns
    with node.batch():
        pass
    assert path.stat().st_mtime_ns == before
    with node.batch():
        node.set_service("10.96.0.99", 80, "tcp", [svc_lab.backend("n1p2", TCP)])
        assert path.stat().st_mtime_ns == before  # not before the batch ends
    assert path.stat().st_mtime_ns != before
    # the service is a row of the node's service store (dataplane.servicestore),
    # committed at the end of the batch: another connection sees it
    assert node.lb is not None
    with contextlib.closing(sqlite3.connect(node.lb.store.path)) as db:
        assert db.execute("SELECT count(*) FROM services WHERE vip = ? AND port = ?",
                          ("10.96.0.99", 80)).fetchone() == (1,)
    node.delete_service("10.96.0.99", 80, "tcp")
