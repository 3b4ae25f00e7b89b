"""End to end: hostPorts (the CNI portMappings capability) as upstream's
conformance test `[sig-network] HostPort validates that there is no conflict
between pods with same hostPort but different hostIP and protocol`
(k8s.io/kubernetes test/e2e/network/hostport.go) exercises them, on two lab
nodes with an external host.

Its three pods on node 1 share hostPort 54323: pod1 TCP on hostIP 127.0.0.1,
pod2 TCP on the node IP, pod3 UDP on the node IP; each answers with its name
(as agnhost netexec's /hostname and its UDP "hostname" command do) and the
address it saw. The test's three checks run from node 1's own stack (where
its hostNetwork pod runs): `curl --interface <node IP>
http://127.0.0.1:54323/hostname`, `curl http://<node IP>:54323/hostname` and
UDP "hostname" to <node IP>:54323. The same hostPorts are reached from the
other node, from the external host (the client's address kept), from pods on
both nodes and from pod2 itself (hairpin), across an agent restart.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from pcn_agent.dataplane.cubes.dispatcher import HostPort
from pcn_lab.topology import EXTERNAL_IP, Lab

pytestmark = pytest.mark.netns

HOST_PORT, CONTAINER_PORT = 54323, 8080

# A pod's server: HTTP on TCP (any path answers "<name> <client address>")
# and the UDP "hostname" command, like agnhost netexec.
SERVER = r"""
import socket, sys, threading
name, tcp, udp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def serve_udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", udp))
    while True:
        data, peer = s.recvfrom(2048)
        if data.strip() == b"hostname":
            s.sendto(f"{name} {peer[0]}".encode(), peer)
if udp:
    threading.Thread(target=serve_udp, daemon=True).start()
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", tcp))
srv.listen(64)
print("listening", flush=True)
while True:
    c, peer = srv.accept()
    with c:
        c.settimeout(5)
        try:
            c.recv(4096)
        except OSError:
            continue
        body = f"{name} {peer[0]}".encode()
        c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
"""

UDP_CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(float(sys.argv[3]))
s.sendto(b"hostname\n", (sys.argv[1], int(sys.argv[2])))
print(s.recvfrom(2048)[0].decode())
"""


@pytest.fixture(scope="module")
def hp_lab(lab: Lab) -> Iterator[Lab]:
    """pod1 = n1p3, pod2 = n1p4, pod3 = n1p5 (node 1), with the conformance
    test's hostPorts; n1p1 and n2p1 are clients."""
    node = lab.node(1)
    node_ip = node.cfg.node_ip
    pods = {"pod1": (3, "127.0.0.1", "tcp", 0), "pod2": (4, node_ip, "tcp", 0),
            "pod3": (5, node_ip, "udp", CONTAINER_PORT)}
    procs: list[subprocess.Popen[str]] = []
    try:
        for name, (index, host_ip, proto, udp) in pods.items():
            lp = lab.add_pod(1, index)
            node.set_hostports(lp.name, [HostPort(host_ip, HOST_PORT, proto, lp.ip,
                                                  CONTAINER_PORT, lp.name, f"e2e/{name}")])
            tcp = 8008 if udp else CONTAINER_PORT  # pod3: HTTP elsewhere, as upstream's
            p = lab.popen(lp.netns, [sys.executable, "-c", SERVER, name, str(tcp), str(udp)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            procs.append(p)
            assert p.stdout is not None and "listening" in p.stdout.readline()
        yield lab
    finally:
        for p in procs:
            p.terminate()
            p.wait(5)


def _ns(lab: Lab, src: str) -> str:
    if src == "ext":
        return lab.ext_ns
    if src in lab.pods:
        return lab.pods[src].netns
    return lab.node_name(int(src[1:]))  # "n1": node 1's own stack


def curl(lab: Lab, src: str, url: str, *extra: str) -> str:
    r = lab.exec(_ns(lab, src), ["curl", "-sS", "-g", "--connect-timeout", "5", "-m", "10",
                                 *extra, url], timeout=20)
    assert r.returncode == 0, f"curl {url} from {src}: {r.stderr.strip()}"
    return r.stdout.strip()


def udp(lab: Lab, src: str, host: str, port: int = HOST_PORT) -> str:
    r = lab.exec(_ns(lab, src), [sys.executable, "-c", UDP_CLIENT, host, str(port), "5"],
                 timeout=20)
    assert r.returncode == 0, f"UDP hostname to {host}:{port} from {src}: {r.stderr.strip()}"
    return r.stdout.strip()


KUBELET_GUARD = ["-m", "comment", "--comment", "block incoming localnet connections", "-m",
                 "conntrack", "!", "--ctstate", "RELATED,ESTABLISHED,DNAT", "-j", "DROP"]


def test_loopback_host_ports_pass_kubelets_localnet_guard(hp_lab: Lab) -> None:
    """On a real node kubelet drops, in OUTPUT, what goes to 127.0.0.0/8 from
    another address and is not DNATed by conntrack (KUBE-FIREWALL, #90259):
    the first real-cluster conformance run failed the HostPort test on it.
    With kubelet's rule in node 1's filter table, the agent exempts its
    loopback hostPorts (and only those), and removes its chain at down()."""
    lab = hp_lab
    node = lab.node(1)
    netns, node_ip = node.cfg.netns, node.cfg.node_ip
    ipt = ["iptables-nft", "-w"]
    guard = ["!", "-s", "127.0.0.0/8", "-d", "127.0.0.0/8", *KUBELET_GUARD]
    for argv in (["-N", "KUBE-FIREWALL"], ["-A", "KUBE-FIREWALL", *guard],
                 ["-I", "OUTPUT", "1", "-j", "KUBE-FIREWALL"]):
        lab.exec(netns, [*ipt, *argv], check=True)
    try:
        assert lab.exec(netns, ["curl", "-s", "--connect-timeout", "3", "--interface", node_ip,
                                f"http://127.0.0.1:{HOST_PORT}/"]).returncode != 0  # dropped
        owner = "n1p3"
        mine = [h for h in node.dispatcher.hostports if h.owner == owner]  # type: ignore[union-attr]
        node.set_hostports(owner, [])  # a change of the loopback hostPorts syncs the
        node.set_hostports(owner, mine)  # exemption (a guard found then is exempted)
        chain = lab.exec(netns, [*ipt, "-S", "PCN-LOCALNET-HOSTPORTS"], check=True).stdout
        assert f"--dport {HOST_PORT}" in chain and "-p tcp" in chain, chain
        assert "-p udp" not in chain  # pod3's UDP hostPort is on the node IP only
        one = curl(lab, "n1", f"http://127.0.0.1:{HOST_PORT}/hostname", "--interface", node_ip)
        assert one.split()[0] == "pod1"
        # the guard still drops other ports to 127.0.0.1 from the node's address
        assert lab.exec(netns, ["curl", "-s", "--connect-timeout", "3", "--interface", node_ip,
                                "http://127.0.0.1:9/"]).returncode != 0
    finally:
        lab.exec(netns, [*ipt, "-D", "OUTPUT", "-j", "KUBE-FIREWALL"])
        lab.exec(netns, [*ipt, "-F", "KUBE-FIREWALL"])
        lab.exec(netns, [*ipt, "-X", "KUBE-FIREWALL"])
        from pcn_agent.node import localnet
        localnet.remove(netns)
    assert "PCN-LOCALNET" not in lab.exec(netns, [*ipt, "-S"]).stdout


def test_a_pod_without_host_ports_runs_no_iptables(hp_lab: Lab,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Every CNI ADD sets its pod's hostPorts, most of them none: the localnet
    exemption (iptables processes) is synced only when the loopback
    hostPorts change."""
    from pcn_agent.node import localnet

    calls: list[object] = []
    monkeypatch.setattr(localnet, "sync", lambda netns, ports: calls.append(ports) or False)
    node = hp_lab.node(1)
    node.set_hostports("n1p1", [])
    node.set_hostports("n1p1", [])
    assert calls == []
    pod2 = [h for h in node.dispatcher.hostports if h.owner == "n1p4"]  # type: ignore[union-attr]
    node.set_hostports("n1p4", pod2)  # on the node IP only: not a loopback hostPort
    assert calls == []


def test_the_conformance_checks_from_the_nodes_own_stack(hp_lab: Lab) -> None:
    lab = hp_lab
    node_ip = lab.node(1).cfg.node_ip
    one = curl(lab, "n1", f"http://127.0.0.1:{HOST_PORT}/hostname", "--interface", node_ip)
    two = curl(lab, "n1", f"http://{node_ip}:{HOST_PORT}/hostname")
    three = udp(lab, "n1", node_ip)
    assert one.split()[0] == "pod1" and two.split()[0] == "pod2" and three.split()[0] == "pod3"
    # 127.0.0.1 without a source address too (the portmap plugin's localhost)
    assert curl(lab, "n1", f"http://127.0.0.1:{HOST_PORT}/").split()[0] == "pod1"


def test_hostports_from_another_node_and_the_outside_keep_the_client(hp_lab: Lab) -> None:
    lab = hp_lab
    node_ip = lab.node(1).cfg.node_ip
    assert curl(lab, "ext", f"http://{node_ip}:{HOST_PORT}/") == f"pod2 {EXTERNAL_IP}"
    assert udp(lab, "ext", node_ip) == f"pod3 {EXTERNAL_IP}"
    other = lab.node(2).cfg.node_ip
    assert curl(lab, "n2", f"http://{node_ip}:{HOST_PORT}/") == f"pod2 {other}"
    assert udp(lab, "n2", node_ip) == f"pod3 {other}"
    # 127.0.0.1 is node 1's own: from outside that hostIP is not served
    r = lab.exec(lab.ext_ns, ["curl", "-sS", "--connect-timeout", "2",
                              f"http://{node_ip}:{HOST_PORT}/"], timeout=10)
    assert "pod1" not in r.stdout


def test_hostports_from_pods_on_both_nodes_and_hairpin(hp_lab: Lab) -> None:
    lab = hp_lab
    node_ip = lab.node(1).cfg.node_ip
    for src in ("n1p1", "n2p1"):
        assert curl(lab, src, f"http://{node_ip}:{HOST_PORT}/").split()[0] == "pod2"
        assert udp(lab, src, node_ip).split()[0] == "pod3"
    # same node: the pod's own address is kept
    assert curl(lab, "n1p1", f"http://{node_ip}:{HOST_PORT}/") == f"pod2 {lab.pods['n1p1'].ip}"
    assert curl(lab, "n1p4", f"http://{node_ip}:{HOST_PORT}/").split()[0] == "pod2"  # itself


def test_hostports_survive_an_agent_restart_and_go_with_their_pod(hp_lab: Lab) -> None:
    lab = hp_lab
    node_ip = lab.node(1).cfg.node_ip
    node = lab.restart_node(1)
    assert node.dispatcher is not None and len(node.dispatcher.hostports) == 3
    assert curl(lab, "ext", f"http://{node_ip}:{HOST_PORT}/").split()[0] == "pod2"
    assert curl(lab, "n1", f"http://127.0.0.1:{HOST_PORT}/", "--interface", node_ip
                ).split()[0] == "pod1"
    assert udp(lab, "n1", node_ip).split()[0] == "pod3"
    node.set_hostports("n1p4", [])  # pod2's hostPort goes (its DEL)
    r = lab.exec(lab.ext_ns, ["curl", "-sS", "--connect-timeout", "2", "-m", "4",
                              f"http://{node_ip}:{HOST_PORT}/"], timeout=10)
    assert r.returncode != 0 and "pod2" not in r.stdout  # the node's own port: closed
    assert curl(lab, "n1", f"http://127.0.0.1:{HOST_PORT}/").split()[0] == "pod1"


def test_hostports_of_a_pod_deleted_while_the_agent_was_down_go_on_restart(hp_lab: Lab) -> None:
    """Its DEL came while no agent ran (the plugin deleted the veth): the
    restarted agent forgets the pod and its hostPorts, so the port is free
    for the next pod instead of held by a pod that is gone."""
    lab = hp_lab
    node = lab.node(1)
    lp = lab.add_pod(1, 6)
    assert lp.pod is not None
    node.set_hostports(lp.name, [HostPort("", 54400, "tcp", lp.ip, 80, lp.name, "e2e/gone")])
    netns, host_if = node.cfg.netns, lp.pod.iface.host_ifname
    del lab.pods[lp.name]
    new = lab.restart_node(1, while_down=lambda: subprocess.run(
        ["ip", "-n", netns, "link", "del", host_if], check=True))
    assert new.dispatcher is not None
    assert lp.name not in {h.owner for h in new.dispatcher.hostports}
    assert ("127.0.0.1", 54400, "tcp") not in new.dispatcher.hostport_service_keys()
    new.set_hostports("n1p5", [HostPort("", 54400, "tcp", lab.pods["n1p5"].ip, 8008, "n1p5",
                                        "e2e/pod3")])  # free again: pod3's HTTP port
    assert curl(lab, "ext", f"http://{new.cfg.node_ip}:54400/").split()[0] == "pod3"
    new.set_hostports("n1p5", [HostPort(new.cfg.node_ip, HOST_PORT, "udp", lab.pods["n1p5"].ip,
                                         CONTAINER_PORT, "n1p5", "e2e/pod3")])
