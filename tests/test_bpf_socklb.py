"""sock_lb.c through real sockets (BPF_PROG_TEST_RUN does not run cgroup
sock_addr programs): a network namespace with two backend addresses on its
lo, a probe server per backend (each on its own port, so the answer names
the backend), the node's service table written by the lbrp's LoadBalancer,
and the four programs attached to a test cgroup. Clients run in that cgroup
and namespace; the Service addresses are routed nowhere in the namespace,
so a connection that reaches a server was translated at the socket.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from bpfunit import UnitNet, unit_net
from pyroute2 import IPRoute

from pcn_agent.dataplane.cubes.lbrp import Backend, LoadBalancer
from pcn_agent.dataplane.socklb import HOOKS, SocketLB, attached_programs
from pcn_lab.cgroups import LabCgroups

BACKEND_A, BACKEND_B = "10.77.0.2", "10.77.0.3"
# probe servers: "a" answers TCP 8080 / UDP 8081, "b" TCP 8082 / UDP 8083
PORTS = {"a": (8080, 8081), "b": (8082, 8083)}


@dataclass
class SockNet:
    net: UnitNet
    lb: LoadBalancer
    cgroups: LabCgroups
    socklb: SocketLB

    def probe(self, *args: str, in_cgroup: bool = True) -> dict:
        argv = ["ip", "netns", "exec", self.net.name, sys.executable, "-m", "pcn_lab.probe",
                *args]
        if in_cgroup:
            argv = self.cgroups.wrap("node", argv)
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        try:
            return json.loads(r.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            return {"ok": False, "error": r.stderr[-300:]}

    def service(self, vip: str, port: int, proto: str, names: list[str],
                affinity_timeout_s: int = 0) -> None:
        ip = {"a": BACKEND_A, "b": BACKEND_B}
        index = 0 if proto == "TCP" else 1
        self.lb.set_service(vip, port, proto, [Backend(ip[n], PORTS[n][index]) for n in names],
                            affinity_timeout_s)


@pytest.fixture(scope="module")
def sock() -> Iterator[SockNet]:
    with unit_net(0) as net:
        with IPRoute(netns=net.name) as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            for ip in (BACKEND_A, BACKEND_B):
                ipr.addr("add", index=lo, address=ip, prefixlen=32)
        lb = LoadBalancer(net.rt, "lb")
        cgroups = LabCgroups(f"{net.prefix}-cg")
        servers = []
        socklb = SocketLB(net.name, net.rt.pin_dir or Path("/"), cgroups.node("node"))
        try:
            for name, (tcp, udp) in PORTS.items():
                p = subprocess.Popen(
                    ["ip", "netns", "exec", net.name, sys.executable, "-m", "pcn_lab.probe",
                     "serve", "--tcp", str(tcp), "--udp", str(udp)],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                    env={"PCN_PROBE_NAME": name, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
                servers.append(p)
                assert p.stdout is not None and "listening" in p.stdout.readline()
            socklb.attach()
            # as NodeDataplane.set_socket_lb does: backends that leave are
            # forgotten in the socket path's affinity table too
            lb.services.affinity_tables.append(socklb.table("sock_affinity"))
            yield SockNet(net, lb, cgroups, socklb)
        finally:
            socklb.detach()
            for p in servers:
                p.terminate()
                p.wait(timeout=10)
            cgroups.close()
    assert cgroups.leftovers() == []


def _vip() -> str:
    """A Service address of its own per test (10.96.0.0/12, nowhere routed)."""
    return f"10.{96 + secrets.randbelow(16)}.{secrets.randbelow(256)}.{1 + secrets.randbelow(254)}"


def test_tcp_connect_reaches_a_backend_and_getpeername_names_the_service(sock: SockNet) -> None:
    vip = _vip()
    sock.service(vip, 80, "TCP", ["a"])
    r = sock.probe("tcp", vip, "80", "--peer", "--bytes", "100000")
    assert r["ok"], r
    assert r["host"] == "a"
    assert r["peer"] == f"{vip}:80"  # not 10.77.0.2:8080


def test_new_sockets_spread_over_the_backends(sock: SockNet) -> None:
    vip = _vip()
    sock.service(vip, 80, "TCP", ["a", "b"])
    r = sock.probe("tcp", vip, "80", "--count", "40")
    assert r["ok"], r
    assert set(r["hosts"]) == {"a", "b"}, r


def test_client_ip_affinity_keeps_one_backend(sock: SockNet) -> None:
    vip = _vip()
    sock.service(vip, 80, "TCP", ["a", "b"], affinity_timeout_s=600)
    r = sock.probe("tcp", vip, "80", "--count", "30")
    assert r["ok"], r
    assert len(r["hosts"]) == 1 and sum(r["hosts"].values()) == 30, r


def test_affinity_forgets_a_backend_that_left(sock: SockNet) -> None:
    vip = _vip()
    sock.service(vip, 80, "TCP", ["a", "b"], affinity_timeout_s=600)
    first = sock.probe("tcp", vip, "80", "--peer")["host"]
    assert first in ("a", "b")
    other = "b" if first == "a" else "a"
    # the first backend leaves (its server still answers: only the table decides)
    sock.service(vip, 80, "TCP", [other], affinity_timeout_s=600)
    r = sock.probe("tcp", vip, "80", "--count", "5")
    assert r["hosts"] == {other: 5}, r


def test_udp_sendto_reply_comes_from_the_service(sock: SockNet) -> None:
    vip = _vip()
    sock.service(vip, 53, "UDP", ["b"])
    r = sock.probe("udp", vip, "53", "--unconnected")
    assert r["ok"], r
    assert r["host"] == "b"
    assert r["peer"] == f"{vip}:53"  # recvfrom()'s source, not 10.77.0.3:8083


def test_connected_udp_getpeername_names_the_service(sock: SockNet) -> None:
    vip = _vip()
    sock.service(vip, 53, "UDP", ["a"])
    r = sock.probe("udp", vip, "53")
    assert r["ok"], r
    assert (r["host"], r["peer"]) == ("a", f"{vip}:53")


def test_service_without_endpoints_is_refused(sock: SockNet) -> None:
    vip = _vip()
    sock.service(vip, 80, "TCP", [])
    sock.service(vip, 53, "UDP", [])
    t = sock.probe("tcp", vip, "80", "--peer")
    u = sock.probe("udp", vip, "53", "--unconnected")
    assert (t["ok"], t.get("errno")) == (False, "ECONNREFUSED"), t
    assert (u["ok"], u.get("errno")) == (False, "ECONNREFUSED"), u


def test_other_addresses_and_ports_are_left_alone(sock: SockNet) -> None:
    vip = _vip()
    sock.service(vip, 80, "TCP", ["a"])
    direct = sock.probe("tcp", BACKEND_B, "8082", "--peer")
    assert direct["ok"] and direct["peer"] == f"{BACKEND_B}:8082", direct
    other_port = sock.probe("tcp", vip, "81", "--timeout", "2")
    assert other_port.get("errno") == "ENETUNREACH", other_port  # untranslated: no route


def test_processes_outside_the_cgroup_are_not_translated(sock: SockNet) -> None:
    vip = _vip()
    sock.service(vip, 80, "TCP", ["a"])
    r = sock.probe("tcp", vip, "80", "--peer", "--timeout", "2", in_cgroup=False)
    assert r.get("errno") == "ENETUNREACH", r


def test_a_new_agent_replaces_the_programs_a_dead_one_left(sock: SockNet) -> None:
    """Crash (programs stay attached and pinned), then a new attach: one
    program per hook, the new one's, and translation still works; a detach
    leaves none and the pins go."""
    cg = sock.cgroups.node("node")
    before = {t: attached_programs(cg, t) for t in HOOKS.values()}
    assert all(len(ids) == 1 for ids in before.values()), before
    tables = sock.lb.services.affinity_tables
    old = sock.socklb.table("sock_affinity")
    tables[:] = [t for t in tables if t is not old]  # BCC tables compare by content
    sock.socklb.abandon()
    sock.socklb = SocketLB(sock.net.name, sock.socklb.pin_dir, cg).attach()
    tables.append(sock.socklb.table("sock_affinity"))
    after = {t: attached_programs(cg, t) for t in HOOKS.values()}
    assert all(len(ids) == 1 for ids in after.values()), after
    assert after != before
    vip = _vip()
    sock.service(vip, 80, "TCP", ["b"])
    assert sock.probe("tcp", vip, "80", "--peer")["host"] == "b"
    sock.socklb.detach()
    assert all(attached_programs(cg, t) == [] for t in HOOKS.values())
    assert not sock.socklb.prog_dir.exists()
    r = sock.probe("tcp", vip, "80", "--peer", "--timeout", "2")
    assert r.get("errno") == "ENETUNREACH", r
    sock.socklb.attach()
