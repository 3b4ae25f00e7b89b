"""`pcn-lab check` on a real cluster: the connectivity matrix through pcn,
with the pods' real containers as servers (the example app's agnhost
netexec answers HTTP on 8080, `/clientip` returning the address it saw).

A source pod's traffic is sent from inside its network namespace (the
machine's ping, curl and pcn's probe run there with ``nsenter -t <pid>
-n``, the pid being one of the pod's processes, found through its cgroup
``<cgroup root>/kubepods/.../pod<uid>/``); names are resolved through
CoreDNS with `kubectl exec` in the client pod, as a pod's own resolver
(kubelet's resolv.conf) does.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pcn_lab import checks
from pcn_lab.cluster import kubectl
from pcn_lab.cluster.layout import CLUSTER_DOMAIN
from pcn_lab.cluster.state import ClusterState
from pcn_lab.topology import EXTERNAL_IP

CGROUP_PIDS = Path("/sys/fs/cgroup/pids")


def pod_pid(cgroup_root: str, uid: str, hierarchy: Path = CGROUP_PIDS) -> int | None:
    """A process of the pod `uid` (kubelet's cgroupfs layout: <root>/kubepods/
    [burstable|besteffort/]pod<uid>/<container>/)."""
    base = hierarchy / cgroup_root.lstrip("/") / "kubepods"
    for procs in sorted(base.glob(f"**/pod{uid}/*/cgroup.procs")):
        try:
            pids = procs.read_text().split()
        except OSError:
            continue
        if pids:
            return int(pids[0])
    return None


@dataclass
class PodRef:
    netns: str  # "pid:<n>": enter with nsenter -t n -n
    ip: str
    node: str


class ClusterView:
    """What pcn_lab.checks needs of a lab (checks.LabLike), for a real cluster."""

    def __init__(self, state: ClusterState, pods: list[dict[str, Any]]) -> None:
        self.state = state
        self.layout = state.layout
        self.pods: dict[str, PodRef] = {}
        self.ext_ns = f"{self.layout.prefix}-ext"
        for p in pods:
            meta, spec, st = p["metadata"], p.get("spec") or {}, p.get("status") or {}
            if spec.get("hostNetwork") or st.get("phase") != "Running" or not st.get("podIP"):
                continue
            node = spec.get("nodeName", "")
            pid = pod_pid(self.layout.cgroup_root(node), meta["uid"])
            if pid is not None:
                self.pods[meta["name"]] = PodRef(f"pid:{pid}", st["podIP"], node)

    def node_netns(self, name: str) -> str:
        if name not in self.layout.nodes:
            raise KeyError(f"no pod, node or 'ext' named {name!r} in the cluster")
        return name

    def _argv(self, netns: str, argv: list[str]) -> list[str]:
        if netns.startswith("pid:"):
            return ["nsenter", "-t", netns[4:], "-n", "--", *argv]
        return ["ip", "netns", "exec", netns, *argv]

    def exec(self, netns: str, argv: list[str], timeout: float = 30,
             check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self._argv(netns, argv), capture_output=True, text=True,
                              timeout=timeout, check=check)

    def popen(self, netns: str, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(self._argv(netns, argv), **kw)


def http(view: ClusterView, src_netns: str, source: str, ip: str, port: int,
         target: str) -> checks.CheckResult:
    """GET http://ip:port/clientip from `src_netns` (agnhost netexec answers
    with the client address it saw)."""
    t = time.monotonic()
    r = view.exec(src_netns, ["curl", "-sS", "--max-time", "5",
                              f"http://{ip}:{port}/clientip"], timeout=15)
    ms = (time.monotonic() - t) * 1000
    ok = r.returncode == 0 and bool(r.stdout.strip())
    saw = r.stdout.strip().rsplit(":", 1)[0]
    return checks.CheckResult(source, target, "http", ok, ms if ok else None,
                              f"server saw {saw}" if ok else (r.stderr.strip() or "no answer"))


def dns(state: ClusterState, namespace: str, pod: str, name: str,
        want: str) -> checks.CheckResult:
    t = time.monotonic()
    r = kubectl.run(state.kubeconfig, "exec", "-n", namespace, pod, "--", "nslookup", name,
                    check=False, timeout=30)
    ms = (time.monotonic() - t) * 1000
    ok = r.returncode == 0 and want in r.stdout
    return checks.CheckResult(pod, f"{name} (CoreDNS)", "dns", ok, ms if ok else None,
                              f"-> {want}" if ok else (r.stderr.strip() or r.stdout.strip())[-200:])


def matrix(state: ClusterState) -> tuple[list[checks.CheckResult], list[str]]:
    """The checks and notes on what was left out."""
    kc = state.kubeconfig
    pods = kubectl.get(kc, "pods", "-A")["items"]
    view = ClusterView(state, pods)
    notes: list[str] = []
    results: list[checks.CheckResult] = []
    by_name = {p["metadata"]["name"]: p for p in pods}
    client = "client" if "client" in view.pods else next(iter(sorted(view.pods)), None)
    if client is None:
        return results, ["no running pod to check from: apply examples/ (pcn-lab up -f)"]
    src = view.pods[client]
    ns = by_name[client]["metadata"]["namespace"]
    others = [n for n in sorted(view.pods) if n != client
              and by_name[n]["metadata"]["namespace"] == ns
              and any(int(port.get("containerPort", 0)) == checks.TCP_PORT
                      for c in by_name[n]["spec"].get("containers", [])
                      for port in c.get("ports") or [])]
    for n in others:
        where = "same node" if view.pods[n].node == src.node else "other node"
        results.append(checks.ping(view, client, view.pods[n].ip, f"{n} ({where})"))
        results.append(http(view, src.netns, client, view.pods[n].ip, checks.TCP_PORT,
                            f"{n} ({where})"))
    if others:
        n = others[0]
        node = view.pods[n].node
        results.append(http(view, node, f"node {node.rsplit('-', 1)[-1]}", view.pods[n].ip,
                            checks.TCP_PORT, f"{n} (from its node)"))
    services = kubectl.get(kc, "services", "-n", ns)["items"]
    for svc in services:
        spec = svc["spec"]
        name = svc["metadata"]["name"]
        if spec.get("clusterIP") in (None, "None"):
            continue
        for port in spec.get("ports") or []:
            if (port.get("protocol") or "TCP") != "TCP":
                continue
            results.append(http(view, src.netns, client, spec["clusterIP"], port["port"],
                                f"{ns}/{name} ClusterIP {spec['clusterIP']}:{port['port']}"))
            if port.get("nodePort"):
                node = (view.pods[others[0]].node if others and spec.get(
                    "externalTrafficPolicy") == "Local" else state.layout.nodes[1]
                    if len(state.layout.nodes) > 1 else state.layout.nodes[0])
                ip = state.layout.node_ip(node)
                results.append(http(view, view.ext_ns, "external host", ip, port["nodePort"],
                                    f"{ns}/{name} NodePort {node.rsplit('-', 1)[-1]}:"
                                    f"{port['nodePort']} ({spec.get('externalTrafficPolicy')})"))
        fqdn = f"{name}.{ns}.svc.{CLUSTER_DOMAIN}"
        results.append(dns(state, ns, client, fqdn, spec["clusterIP"]))
    results.append(dns(state, ns, client, f"kubernetes.default.svc.{CLUSTER_DOMAIN}",
                       state.layout.service_cidr_first()))
    with checks.servers(view, ["ext"]):
        results.append(checks.tcp(view, client, EXTERNAL_IP, "external host (egress SNAT)"))
    for r in results:
        if r.source == "ext":
            r.source = "external host"
    return results, notes


def check(state: ClusterState) -> int:
    if not state.ready:
        print(f"pcn-lab: cluster {state.layout.prefix} is not ready (step {state.step}"
              f"{', error: ' + state.error if state.error else ''})", file=sys.stderr)
        return 1
    results, notes = matrix(state)
    return checks.report(results, notes)
