"""End to end: path MTU through a node's router. The outside network's MTU is
1500, the pods' and the overlay's 1450: what is too big for them must get
"fragmentation needed" back (DF set) or be fragmented (DF clear) instead of
vanishing at the pod's veth."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import pytest

from pcn_agent.node import podnet
from pcn_lab import checks
from pcn_lab.topology import EXTERNAL_IP, Lab

pytestmark = pytest.mark.netns

UDP = checks.UDP_PORT
PODS_MTU = 1450
BIG = 4000  # bytes of a UDP answer: three fragments at the outside network's MTU
IP_FORWARD = "net.ipv4.ip_forward"

# A connected UDP socket with DF always set (IP_PMTUDISC_DO) sends one
# datagram and waits: the kernel reports "fragmentation needed" about it as
# EMSGSIZE on the socket and keeps the MTU it learned for the destination.
DF_SENDER = r"""
import errno, json, socket, sys
IP_MTU_DISCOVER, IP_PMTUDISC_DO, IP_MTU = 10, 2, 14  # <linux/in.h>; Python 3.11 lacks them
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
s.connect((host, port))
s.settimeout(3)
s.send(b"pcn-probe" + bytes(size - 9))
try:
    s.recv(65535)
    result = "answered"
except socket.timeout:
    result = "timeout"
except OSError as exc:
    result = errno.errorcode.get(exc.errno, str(exc.errno))
print(json.dumps({"result": result, "mtu": s.getsockopt(socket.IPPROTO_IP, IP_MTU)}))
"""


@pytest.fixture(scope="module")
def served(lab: Lab) -> Iterator[Lab]:
    with checks.servers(lab, [*lab.pods, "ext"]):
        yield lab


@pytest.fixture(autouse=True)
def forget_path_mtus(served: Lab) -> None:
    """Each test starts with an outside host that has learned no path MTU
    (flushing the route cache makes the kernel drop its learned MTUs)."""
    served.exec(served.ext_ns, ["ip", "-4", "route", "flush", "cache"], check=True)


@pytest.fixture
def forwarding(served: Lab) -> Iterator[Lab]:
    """The nodes' stacks forward, as a Kubernetes node's does (kubeadm checks
    net.ipv4.ip_forward=1): the router hands them what only they can
    fragment."""
    nss = [served.node(i).cfg.netns for i in (1, 2)]
    was = [podnet.read_sysctl(ns, IP_FORWARD) for ns in nss]
    try:
        for ns in nss:
            podnet.write_sysctl(ns, IP_FORWARD, "1")
        yield served
    finally:
        for ns, value in zip(nss, was, strict=True):
            podnet.write_sysctl(ns, IP_FORWARD, value)


def _df_send(lab: Lab, src: str, host: str, port: int, size: int) -> dict:
    r = lab.exec(checks.netns_of(lab, src), [sys.executable, "-c", DF_SENDER, host, str(port),
                                              str(size)], timeout=20)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _cached_mtu(lab: Lab, netns: str, dst: str) -> str:
    """`ip route get` in `netns`: the route to `dst` with the path MTU cached
    for it, if any ("... cache expires 599sec mtu 1450")."""
    return lab.exec(netns, ["ip", "-4", "route", "get", dst], check=True).stdout


def _too_big(lab: Lab, node: int) -> int:
    return lab.node(node).rt.cube_drops("r0").get("too_big", 0)


@pytest.fixture
def routed_to_node1(served: Lab) -> Iterator[Lab]:
    """The outside host routes node 1's pod CIDR to node 1 (direct routing)."""
    cidr = served.pod_cidr(1)
    served.exec(served.ext_ns, ["ip", "route", "add", cidr, "via", served.node_ip(1)],
                check=True)
    try:
        yield served
    finally:
        served.exec(served.ext_ns, ["ip", "route", "del", cidr], check=True)


def test_an_outside_host_learns_the_path_mtu_to_a_pod(routed_to_node1: Lab) -> None:
    """`ping -M do -s 1472` (1500 bytes, DF) from the outside host to a pod:
    node 1's router answers "fragmentation needed" with the pods' MTU from
    the node's address, and the host caches that MTU for the pod's address.
    (Only the request matters here: a pod's answers to the outside leave
    masqueraded, so outside clients reach pods through NodePorts, below.)"""
    lab = routed_to_node1
    pod = lab.pods["n1p1"].ip
    before = _too_big(lab, 1)
    r = lab.exec(lab.ext_ns, ["ping", "-n", "-M", "do", "-s", "1472", "-c", "1", "-W", "2", pod],
                 timeout=20)
    assert f"From {lab.node_ip(1)} icmp_seq=1 Frag needed and DF set (mtu = {PODS_MTU})" \
        in r.stdout, r.stdout + r.stderr
    assert f"mtu {PODS_MTU}" in _cached_mtu(lab, lab.ext_ns, pod)
    assert _too_big(lab, 1) == before + 1


@pytest.mark.parametrize("policy,backend,port", [("Local", "n1p2", 30090),
                                                 ("Cluster", "n2p1", 30091)])
def test_a_nodeport_client_learns_the_path_mtu(served: Lab, policy: str, backend: str,
                                               port: int) -> None:
    """A 1472-byte UDP datagram with DF to node 1's NodePort, whose backend
    is behind the pods' MTU (Local: node 1's pod) or the overlay's (Cluster:
    node 2's pod): the error quotes the datagram translated back to the
    node's address and NodePort, so the client's socket gets EMSGSIZE and its
    kernel caches the pods' MTU for the node's address; a datagram that fits
    then gets its answer."""
    lab = served
    lab.set_nodeport(port, "udp", policy, [lab.backend(backend, UDP)])
    node = lab.node_ip(1)
    first = _df_send(lab, "ext", node, port, 1472)
    assert first == {"result": "EMSGSIZE", "mtu": PODS_MTU}, first
    assert f"mtu {PODS_MTU}" in _cached_mtu(lab, lab.ext_ns, node)
    r = checks.probe(lab, "ext", ["udp", node, str(port), "--size", str(PODS_MTU - 28),
                                  "--timeout", "3"], 20)
    assert r["ok"] and r["host"] == backend, r


def test_the_nodes_own_datagram_to_its_nodeport_learns_the_path_mtu(served: Lab) -> None:
    """The node's own 1472-byte DF datagram to its NodePort never leaves its
    stack: lo hands it to the router's host port (entry.c), whose lbrp
    translates it to the backend, too big for the pods. The error comes back
    to the node through the host link (lo gave the frame no sender MAC: it
    goes to the host link's far end, which the router learned when the node
    first reached a pod, as kubelet probes do), its quote translated back by
    the lbrp: the node's socket gets EMSGSIZE and its kernel caches the MTU
    for its own address."""
    lab = served
    ns = lab.node(1).cfg.netns
    assert ns is not None
    lab.set_nodeport(30094, "udp", "Local", [lab.backend("n1p2", UDP)])
    node = lab.node_ip(1)
    assert checks.ping(lab, lab.node_name(1), lab.pods["n1p1"].ip, count=1).passed
    try:
        first = _df_send(lab, lab.node_name(1), node, 30094, 1472)
        assert first["result"] == "EMSGSIZE", first
        assert f"mtu {PODS_MTU}" in _cached_mtu(lab, ns, node)
    finally:
        lab.exec(ns, ["ip", "-4", "route", "flush", "cache"], check=True)


def test_a_big_udp_answer_from_outside_reaches_a_masqueraded_pod(forwarding: Lab) -> None:
    """A pod asks the outside host for 4000 bytes: they come back in 1500-byte
    fragments without DF, too big for the pod. The router hands each to node
    1's stack, which forwards them in smaller fragments through the host
    link; the pod reassembles the whole answer. Nothing is dropped."""
    lab = forwarding
    before = _too_big(lab, 1)
    r = checks.probe(lab, "n1p1", ["udp", EXTERNAL_IP, str(UDP), "--size", "100",
                                   "--reply-size", str(BIG), "--timeout", "4"], 20)
    assert r["ok"] and (r["sent"], r["received"]) == (100, BIG), r
    assert r["peer_seen"] == lab.node_ip(1)  # masqueraded on the way out
    assert _too_big(lab, 1) == before


@pytest.mark.parametrize("policy,backend,port", [("Local", "n2p2", 30092),
                                                 ("Cluster", "n1p2", 30093)])
def test_a_big_udp_datagram_without_df_crosses_a_nodeport(forwarding: Lab, policy: str,
                                                          backend: str, port: int) -> None:
    """4000 bytes from the outside host to node 2's NodePort, in 1500-byte
    fragments without DF (the host has learned no smaller MTU for node 2):
    too big for the pod (Local) or the overlay (Cluster), they go to node
    2's stack, which forwards them in fragments that fit; the backend gets
    the whole datagram and answers."""
    lab = forwarding
    lab.set_nodeport(port, "udp", policy, [lab.backend(backend, UDP)])
    node = lab.node_ip(2)
    assert " mtu " not in _cached_mtu(lab, lab.ext_ns, node)
    before = _too_big(lab, 2)
    r = checks.probe(lab, "ext", ["udp", node, str(port), "--size", str(BIG), "--timeout", "4"],
                     20)
    assert r["ok"] and r["host"] == backend and r["sent"] == BIG, r
    assert _too_big(lab, 2) == before


def test_an_agent_adopting_a_node_gives_the_pods_port_its_mtu(served: Lab) -> None:
    """A data plane built before path MTU has no MTU on the router's pods'
    port (and so none checked): the agent that adopts it sets it."""
    lab = served
    lab.node(1).router.set_mtu("pods", None)
    assert lab.node(1).router.mtu("pods") is None
    adopted = lab.restart_node(1)
    assert adopted.router is not None and adopted.router.mtu("pods") == PODS_MTU
