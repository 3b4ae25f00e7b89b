"""pcn demo: two nodes with two pods each, wired by pcn's eBPF data plane.

Builds the lab in network namespaces (nothing in the root namespace) with an
external host on the nodes' network, checks pod-to-pod connectivity on one
node and across nodes over VXLAN, a ClusterIP service, NodePorts with both
traffic policies, egress masquerading and a firewall rule, prints a table
with one row per check, removes everything and exits non-zero if any check
failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from . import checks
from .cubes.firewall import Firewall, parse_rule
from .topology import EXTERNAL_IP, Lab

NO_ROUTE_IP = "10.99.0.1"


def _progress(msg: str) -> None:
    print(f"==> {msg}", file=sys.stderr, flush=True)


SVC_VIP = "10.96.0.10"
NODEPORT_LOCAL = 30080
NODEPORT_CLUSTER = 30081


def setup_services(lab: Lab) -> None:
    """A ClusterIP service with a backend on each node, and two NodePorts."""
    tcp = checks.TCP_PORT
    lab.set_service(SVC_VIP, 80, "tcp", [lab.backend("n1p2", tcp), lab.backend("n2p1", tcp)])
    lab.set_nodeport(NODEPORT_LOCAL, "tcp", "Local", [lab.backend("n1p2", tcp)])
    lab.set_nodeport(NODEPORT_CLUSTER, "tcp", "Cluster", [lab.backend("n2p1", tcp)])


def _row(result: checks.CheckResult, protocol: str, expect_seen: str | None = None,
         expect_host: str | None = None, what: str = "") -> checks.CheckResult:
    result.protocol = protocol
    out = result.extra
    if expect_seen is not None:
        result.side_condition &= out.get("peer_seen") == expect_seen
    if expect_host is not None:
        result.side_condition &= out.get("host") == expect_host
    if result.ok:
        result.detail = f"answered by {out.get('host')}, which saw {out.get('peer_seen')}{what}"
    return result


def run_checks(lab: Lab) -> list[checks.CheckResult]:
    p = lab.pods
    n1 = lab.node(1)
    results = [
        checks.ping(lab, "n1p1", n1.cfg.gateway, "gateway (router)"),
        checks.ping(lab, "n1p1", p["n1p2"].ip, "n1p2"),
        checks.tcp(lab, "n1p1", p["n1p2"].ip, "n1p2"),
        checks.ping(lab, "n1p1", p["n2p1"].ip, "n2p1"),
        checks.tcp(lab, "n1p1", p["n2p1"].ip, "n2p1"),
        checks.udp(lab, "n1p1", p["n2p1"].ip, "n2p1"),
        checks.tcp(lab, "n2p2", p["n1p2"].ip, "n1p2", nbytes=1_000_000),
    ]
    before = n1.rt.cube_drops("r0").get("no_route", 0)
    blocked = checks.ping(lab, "n1p2", NO_ROUTE_IP, f"{NO_ROUTE_IP} (no route)", count=2,
                          expect_blocked=True)
    after = n1.rt.cube_drops("r0").get("no_route", 0)
    blocked.detail += f", router no_route drops {before} -> {after}"
    blocked.side_condition = after >= before + 2
    results.append(blocked)

    spread = checks.probe(lab, "n1p1", ["tcp", SVC_VIP, "80", "--count", "20"], 60)
    hosts = spread.get("hosts", {})
    results.append(checks.CheckResult(
        "n1p1", f"{SVC_VIP}:80 (ClusterIP)", "tcp x20", bool(spread.get("ok")), None,
        f"backends used: {hosts}", side_condition=set(hosts) == {"n1p2", "n2p1"}))
    results.append(_row(checks.tcp(lab, "ext", lab.node_ip(1), f"node1:{NODEPORT_LOCAL}",
                                   port=NODEPORT_LOCAL),
                        "tcp NodePort Local", expect_seen=EXTERNAL_IP, expect_host="n1p2",
                        what=" (client address kept)"))
    results.append(_row(checks.tcp(lab, "ext", lab.node_ip(1), f"node1:{NODEPORT_CLUSTER}",
                                   port=NODEPORT_CLUSTER),
                        "tcp NodePort Cluster", expect_seen=lab.vtep_ip(1), expect_host="n2p1",
                        what=" (node 1's overlay address: answered through node 1)"))
    results.append(_row(checks.tcp(lab, "n2p2", EXTERNAL_IP, "external host"),
                        "tcp egress SNAT", expect_seen=lab.node_ip(2),
                        what=" (node 2's address)"))
    results.extend(firewall_checks(lab))
    return results


def firewall_checks(lab: Lab) -> list[checks.CheckResult]:
    """A firewall dropping tcp/22 towards n1p2 while web traffic still passes."""
    node = lab.node(1)
    target = lab.pods["n1p2"].ip
    fw = Firewall(node.rt, "demo-fw", [parse_rule("drop tcp dport 22")])
    try:
        with checks.servers(lab, ["n1p2"], tcp_ports=(22, 80), udp_ports=()):
            node.set_pod_chain("n1p2", from_pod=[], to_pod=["demo-fw"])
            ssh = checks.tcp(lab, "n1p1", target, "n1p2:22 (firewall)", port=22, timeout=2,
                             expect_blocked=True)
            web = checks.tcp(lab, "n1p1", target, "n1p2:80 (firewall)", port=80)
            hits = fw.rule_hits()[0]
            ssh.protocol, web.protocol = "tcp/22 drop rule", "tcp/80 allowed"
            ssh.detail = f"rule 'drop tcp dport 22' hits: {hits}"
            ssh.side_condition = hits >= 1
            node.set_pod_chain("n1p2", from_pod=[], to_pod=[])
            after = checks.tcp(lab, "n1p1", target, "n1p2:22 (no firewall)", port=22)
            after.protocol = "tcp/22 after removal"
            return [ssh, web, after]
    finally:
        node.set_pod_chain("n1p2", from_pod=[], to_pod=[])
        fw.delete()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pcn-demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true", help="log what the data plane does")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    start = time.monotonic()
    lab = Lab(nodes_count=2, pods_per_node=2)
    _progress(f"building two nodes with two pods each (run {lab.run_id}); "
              "compiling the cubes takes a few seconds")
    try:
        lab.build()
        setup_services(lab)
        _progress(f"lab up in {time.monotonic() - start:.1f} s; running checks")
        with checks.servers(lab, [*lab.pods, "ext"]):
            results = run_checks(lab)
    finally:
        _progress("tearing down")
        lab.close()
    left = lab.leftovers()
    print(checks.render(results))
    failed = [r for r in results if not r.passed]
    if left:
        print(f"\nteardown left objects behind: {left}", file=sys.stderr)
        return 1
    print(f"\n{len(results) - len(failed)}/{len(results)} checks passed, nothing left behind "
          f"({time.monotonic() - start:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
