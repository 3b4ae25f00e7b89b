"""pcn-lab: the whole of pcn on one machine, emulated or on a real cluster.

    pcn-lab up [--nodes N] [--pods-per-node M] [-f DIR]
    pcn-lab up --kubernetes [--nodes N] [-f DIR]
    pcn-lab apply -f FILE|DIR
    pcn-lab exec POD -- CMD...
    pcn-lab check
    pcn-lab status
    pcn-lab down

`up` starts, in the background, an emulated Kubernetes API server on
loopback, one network namespace per node with a real `pcn-agent` in it, and
a small stand-in for the rest of Kubernetes: it schedules Pods to nodes,
wires them with the real `pcn-cni` exactly as a kubelet would (each pod runs
a probe server on TCP 8080 and UDP 8081), allocates Service addresses and
keeps EndpointSlices current. It writes a kubeconfig for `kubectl` and
`kubectl pcn`. `down` removes everything, also after a crash.

`up --kubernetes` starts a real cluster instead (pcn_lab.cluster: etcd,
kube-apiserver, kube-controller-manager, kube-scheduler, containerd and a
kubelet per node, built by `make k8s`; N workers plus a control-plane
node), installs pcn with `kubectl apply -k manifests/` and CoreDNS, and
applies -f. `status`, `exec` (kubectl exec), `check` and `down` work on it.

Network safety: nothing is added to the root namespace; the API listens on
127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec

import yaml
from pyroute2 import netns as pr_netns

from pcn_lab import checks
from pcn_lab.apiserver import ApiServerError, EmulatedApiServer, apply
from pcn_lab.cluster.state import ClusterState
from pcn_lab.kubelet import kill_netns_processes
from pcn_lab.manifests import manifest_targets, workload_namespace
from pcn_lab.supervisor import (
    LAB_ROOT,
    LabState,
    Supervisor,
    alive,
    cleanup,
    lab_netns_inodes,
    load_documents,
    say,
    write_kubeconfig,
)
from pcn_lab.topology import EXTERNAL_IP

log = logging.getLogger("pcn_lab.cli")
_Params = ParamSpec("_Params")


def cmd_up(args: argparse.Namespace) -> int:
    if args.kubernetes:
        return cmd_up_cluster(args)
    if ClusterState.load(args.dir) is not None:
        say(f"a real cluster is running from {args.dir}; `pcn-lab down` first")
        return 1
    old = LabState.load(args.dir)
    if old is not None and alive(old.supervisor_pid):
        say(f"a lab is already running (kubeconfig {old.kubeconfig}); `pcn-lab down` first")
        return 0 if old.ready else 1
    if old is not None:
        cleanup(old)  # leftovers of a crashed lab
    run_id = secrets.token_hex(3)
    state = LabState(args.dir, run_id=run_id, nodes=args.nodes, prefix=f"pcnt-{run_id}")
    state.save()
    log_path = args.dir / "supervisor.log"
    say(f"starting a lab with {args.nodes} node(s) and {args.pods_per_node} pod(s) per node "
         f"(run {run_id}); compiling the cubes takes a few seconds per node")
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pcn_lab.cli", "--dir", str(args.dir), "_supervise",
             "--nodes", str(args.nodes), "--pods-per-node", str(args.pods_per_node)],
            stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, start_new_session=True)
    state.supervisor_pid = proc.pid
    state.save()
    deadline = time.monotonic() + args.timeout
    last = ""
    try:
        while time.monotonic() < deadline:
            cur = LabState.load(args.dir)
            if cur is None or cur.error or proc.poll() is not None:
                err = cur.error if cur else "state vanished"
                say(f"the lab failed to start: {err or 'supervisor exited'}; "
                     f"log: {log_path}")
                _stop_supervisor(proc.pid)
                return 1
            if cur.ready:
                break
            msg = "waiting for the agents" if not cur.api_url else "starting pods"
            if msg != last:
                say(msg)
                last = msg
            time.sleep(0.5)
        else:
            say(f"the lab did not become ready in {args.timeout:.0f} s; log: {log_path}")
            return 1
    except KeyboardInterrupt:
        say("interrupted: tearing the half-built lab down")
        _stop_supervisor(proc.pid)
        cleanup(state)
        return 130
    namespace = "default"
    if args.filename:
        rc = cmd_apply(argparse.Namespace(dir=args.dir, filename=args.filename))
        if rc:
            return rc
        # what `kubectl config set-context --current --namespace=...` would do
        # for someone who just deployed a workload into one namespace
        namespace = workload_namespace(load_documents(Path(args.filename))) or "default"
    cur = LabState.load(args.dir)
    assert cur is not None
    if namespace != "default":
        write_kubeconfig(cur.kubeconfig, cur.api_url, namespace)
    print(f"""pcn lab up: {cur.nodes} node(s), API server {cur.api_url}, namespace {namespace}

  export KUBECONFIG={cur.kubeconfig}
  kubectl get nodes,pods -o wide
  kubectl get cubechains,networkfunctions -A
  kubectl pcn status
  pcn-lab check
  pcn-lab down""")
    return 0


def cmd_up_cluster(args: argparse.Namespace) -> int:
    from pcn_lab.cluster import bringup

    old = ClusterState.load(args.dir)
    if old is not None:
        say(f"a cluster is already there ({old.layout.prefix}, step {old.step}"
            f"{', ready' if old.ready else ''}); `pcn-lab down` first")
        return 0 if old.ready else 1
    lab = LabState.load(args.dir)
    if lab is not None and alive(lab.supervisor_pid):
        say("an emulated lab is running; `pcn-lab down` first")
        return 1
    say(f"starting a real cluster: a control-plane node and {args.nodes} worker(s)")
    try:
        state = bringup.up(args.dir, args.nodes, args.until,
                           Path(args.filename) if args.filename else None,
                           agent_source=args.agent_source)
    except KeyboardInterrupt:
        say("interrupted: the half-built cluster stays for inspection; `pcn-lab down` "
            "removes it")
        return 130
    except Exception as exc:
        say(f"the cluster failed to come up: {exc}")
        failed = ClusterState.load(args.dir)
        if failed is not None:
            say(f"logs: {failed.layout.logs}; `pcn-lab status` shows what runs, `pcn-lab "
                "down` removes it")
        return 1
    print(f"""pcn cluster up: {len(state.layout.nodes)} node(s), API server https://127.0.0.1:{state.relay_port}, namespace {state.namespace}

  export KUBECONFIG={state.kubeconfig}
  kubectl get nodes,pods -A -o wide
  kubectl get cubechains,networkfunctions -A
  pcn-lab check
  pcn-lab down""")
    return 0


def _stop_supervisor(pid: int, timeout: float = 60) -> None:
    if not alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


def _need_lab(d: Path) -> LabState:
    state = LabState.load(d)
    if state is None or not state.ready or not alive(state.supervisor_pid):
        raise SystemExit("pcn-lab: no lab is running; start one with `pcn-lab up`")
    return state


def cmd_apply(args: argparse.Namespace) -> int:
    cluster = ClusterState.load(args.dir)
    if cluster is not None:
        from pcn_lab.cluster import kubectl

        try:  # what the emulated lab applies of the same path (pcn_lab.manifests)
            targets = manifest_targets(Path(args.filename))
        except FileNotFoundError as exc:
            print(f"pcn-lab: {exc}", file=sys.stderr)
            return 1
        for flag, target in targets:
            rc = subprocess.call(kubectl.argv(cluster.kubeconfig, "apply", flag, str(target)))
            if rc != 0:
                return rc
        return 0
    state = _need_lab(args.dir)
    api = _client(state)
    try:
        docs = load_documents(Path(args.filename))
    except (OSError, yaml.YAMLError) as exc:
        print(f"pcn-lab: cannot read {args.filename}: {exc}", file=sys.stderr)
        return 1
    from pcn_lab.apiserver import PLURALS

    for doc in docs:
        if doc.get("kind") not in PLURALS:
            print(f"{str(doc.get('kind')).lower()}/{(doc.get('metadata') or {}).get('name')} "
                  f"skipped (the lab serves no {doc.get('kind')} objects)")
            continue
        try:
            print(f"{doc['kind'].lower()}/{doc['metadata']['name']} {apply(api, doc)}")
        except (ApiServerError, ValueError, KeyError) as exc:
            print(f"pcn-lab: {doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}: {exc}",
                  file=sys.stderr)
            return 1
    return 0


def _client(state: LabState) -> EmulatedApiServer:
    api = EmulatedApiServer()
    api.url = state.api_url
    return api


def _pods(state: LabState) -> dict[str, dict[str, Any]]:
    items = _client(state).request("GET", "/api/v1/pods").get("items", [])
    return {p["metadata"]["name"]: p for p in items}


def cmd_exec(args: argparse.Namespace) -> int:
    cluster = ClusterState.load(args.dir)
    if cluster is not None:
        from pcn_lab.cluster import commands

        return commands.exec_(cluster, args.pod, args.command, args.namespace)
    state = _need_lab(args.dir)
    pod = _pods(state).get(args.pod)
    netns = ((pod or {}).get("metadata", {}).get("annotations") or {}).get("pcn.dev/lab-netns")
    if not netns:
        print(f"pcn-lab: no running pod {args.pod!r}; see `kubectl get pods -A`", file=sys.stderr)
        return 1
    if not args.command:
        print("pcn-lab: give a command after --, e.g. pcn-lab exec pod-1-1 -- ping -c1 10.244.2.11",
              file=sys.stderr)
        return 2
    return subprocess.call(["ip", "netns", "exec", netns, *args.command])


class _LabView:
    """What checks.* need from a lab: pods with namespaces and IPs, exec."""

    @dataclass
    class P:
        netns: str
        ip: str
        node: str

    def __init__(self, state: LabState) -> None:
        self.state = state
        self.pods = {}
        for name, p in _pods(state).items():
            netns = (p["metadata"].get("annotations") or {}).get("pcn.dev/lab-netns")
            ip = (p.get("status") or {}).get("podIP")
            if netns and ip:
                self.pods[name] = self.P(netns, ip, p["spec"].get("nodeName", ""))
        self.ext_ns = f"{state.prefix}-ext"

    def node_netns(self, name: str) -> str:
        """A lab node's own namespace is named after the node."""
        if not name.startswith(f"{self.state.prefix}-n"):
            raise KeyError(f"no pod, node or 'ext' named {name!r} in the lab")
        return name

    def exec(self, netns: str, argv: list[str], timeout: float = 30,
             check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True,
                              text=True, timeout=timeout, check=check)

    def popen(self, netns: str, argv: list[str], **kw: Any) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", netns, *argv], **kw)


@dataclass
class ServiceTarget:
    """One Service address to try: from a pod ("pod") or the external host ("ext")."""

    label: str
    ip: str
    port: int
    protocol: str  # "tcp" or "udp"
    source: str


def service_targets(services: list[dict[str, Any]], slices: list[dict[str, Any]],
                    nodes: list[dict[str, Any]]) -> tuple[list[ServiceTarget], list[str]]:
    """The Service addresses pcn programs, as `pcn-lab check` tries them,
    and a note for each Service or port it leaves out, and why: a Service
    no service proxy programs (headless, ExternalName, another proxy's), one
    with no IPv4 cluster IP (the lab's data plane is IPv4), a port with no
    ready endpoint or of a protocol other than TCP and UDP. The ClusterIP is
    the IPv4 one of spec.clusterIPs; a NodePort is tried on the first node
    (by name) for externalTrafficPolicy Cluster, and on the first node with
    a ready local endpoint for Local, the only nodes that answer it."""
    from pcn_agent.control import reconcile

    node_ips = {}
    for n in nodes:
        for a in (n.get("status") or {}).get("addresses") or []:
            if a.get("type") == "InternalIP":
                node_ips[n["metadata"]["name"]] = a.get("address")
    by_service = reconcile.slices_by_service(slices)
    targets: list[ServiceTarget] = []
    notes: list[str] = []
    for svc in services:
        spec = svc.get("spec") or {}
        ns, name = svc["metadata"].get("namespace", "default"), svc["metadata"]["name"]
        title = f"{ns}/{name}"
        if not reconcile.proxied(svc) or spec.get("clusterIP") == "None":
            why = "ExternalName: a DNS name, nothing to proxy" \
                if spec.get("type") == "ExternalName" else \
                "headless: no cluster IP" if spec.get("clusterIP") == "None" else \
                "labelled for another service proxy"
            notes.append(f"{title}: not checked ({why})")
            continue
        vip = reconcile.cluster_ipv4(svc)
        if vip is None:
            notes.append(f"{title}: not checked (no IPv4 cluster IP; the lab is IPv4 only)")
            continue
        svc_slices = by_service.get((ns, name), [])
        for port in spec.get("ports") or []:
            proto = (port.get("protocol") or "TCP").lower()
            if proto not in ("tcp", "udp"):
                notes.append(f"{title} port {port.get('port')}/{proto.upper()}: not checked")
                continue
            backends = reconcile.service_backends(svc, port, svc_slices)
            if not backends:
                notes.append(f"{title} port {port.get('port')}/{proto.upper()}: not checked "
                             "(no ready endpoint)")
                continue
            targets.append(ServiceTarget(f"{title} ClusterIP {vip}:{port['port']}", vip,
                                         int(port["port"]), proto, "pod"))
            if spec.get("type") not in ("NodePort", "LoadBalancer") or not port.get("nodePort"):
                continue
            if spec.get("externalTrafficPolicy") == "Local":
                ips = {b.ip for b in backends}
                candidates = sorted({e.get("nodeName") for s in svc_slices
                                     for e in s.get("endpoints") or []
                                     if set(e.get("addresses") or []) & ips
                                     and e.get("nodeName") in node_ips})
            else:
                candidates = sorted(node_ips)
            if not candidates:
                notes.append(f"{title} NodePort {port['nodePort']}: not checked (no node "
                             "has a ready endpoint)")
                continue
            node = candidates[0]
            short = "node" + node.rsplit("-n", 1)[-1] if "-n" in node else node
            targets.append(ServiceTarget(f"{title} NodePort {short}:{port['nodePort']}",
                                         node_ips[node], int(port["nodePort"]), proto, "ext"))
    return targets, notes


def connectivity(state: LabState, notes: list[str] | None = None) -> list[checks.CheckResult]:
    """The connectivity matrix of a running lab; what it leaves out of the
    Services, and why, is added to `notes`."""
    view = _LabView(state)
    api = _client(state)
    by_node: dict[str, list[str]] = {}
    for name, p in sorted(view.pods.items()):
        by_node.setdefault(p.node, []).append(name)
    nodes = sorted(by_node)
    results: list[checks.CheckResult] = []
    if not nodes:
        return results
    first = by_node[nodes[0]]
    src = first[0]
    if len(first) > 1:
        results.append(checks.ping(view, src, view.pods[first[1]].ip, f"{first[1]} (same node)"))
        results.append(checks.tcp(view, src, view.pods[first[1]].ip, f"{first[1]} (same node)"))
    # what a kubelet's probes need: the node's own stack reaches its pods
    results.append(checks.tcp(view, nodes[0], view.pods[src].ip, f"{src} (from its node)"))
    if len(nodes) > 1:
        other = by_node[nodes[1]][0]
        results.append(checks.ping(view, src, view.pods[other].ip, f"{other} (other node)"))
        results.append(checks.tcp(view, src, view.pods[other].ip, f"{other} (other node)"))
        results.append(checks.udp(view, src, view.pods[other].ip, f"{other} (other node)"))
    targets, skipped = service_targets(
        api.request("GET", "/api/v1/services").get("items", []),
        api.request("GET", "/apis/discovery.k8s.io/v1/endpointslices").get("items", []),
        api.request("GET", "/api/v1/nodes").get("items", []))
    if notes is not None:
        notes.extend(skipped)
    for t in targets:
        check = checks.udp if t.protocol == "udp" else checks.tcp
        results.append(check(view, src if t.source == "pod" else t.source, t.ip, t.label,
                             port=t.port))
    with checks.servers(view, ["ext"]):
        results.append(checks.tcp(view, src, EXTERNAL_IP, "external host (egress SNAT)"))
    for r in results:
        if r.source == "ext":
            r.source = "external host"
        elif r.source in by_node:
            r.source = f"node {r.source.rsplit('-', 1)[-1]}"
    return results


def cmd_check(args: argparse.Namespace) -> int:
    cluster = ClusterState.load(args.dir)
    if cluster is not None:
        from pcn_lab.cluster import connectivity as cluster_checks

        return cluster_checks.check(cluster)
    state = _need_lab(args.dir)
    say("running the connectivity matrix")
    notes: list[str] = []
    results = connectivity(state, notes)
    return checks.report(results, notes)


def cmd_status(args: argparse.Namespace) -> int:
    cluster = ClusterState.load(args.dir)
    if cluster is not None:
        from pcn_lab.cluster import commands

        return commands.status(cluster)
    state = LabState.load(args.dir)
    if state is None:
        print("no lab (start one with `pcn-lab up`)")
        return 1
    running = alive(state.supervisor_pid)
    print(f"lab {state.run_id}: {'running' if running and state.ready else 'NOT running'}"
          f"{' (error: ' + state.error + ')' if state.error else ''}")
    print(f"  API server  {state.api_url}   kubeconfig {state.kubeconfig}")
    for node, pid in sorted(state.agents.items()):
        restarts = state.restarts.get(node, 0)
        print(f"  agent {node}: {'running' if alive(pid) else 'stopped'} (pid {pid}"
              f"{f', {restarts} restart(s)' if restarts else ''})")
    if running and state.ready:
        try:
            for name, p in sorted(_pods(state).items()):
                print(f"  pod {name}: {p['spec'].get('nodeName')} "
                      f"{(p.get('status') or {}).get('podIP', '-')}")
        except Exception as exc:
            print(f"  API not reachable: {exc}")
    return 0 if running and state.ready else 1


def cmd_down(args: argparse.Namespace) -> int:
    cluster = ClusterState.load(args.dir)
    if cluster is not None:
        from pcn_lab.cluster import commands

        return commands.down(cluster)
    state = LabState.load(args.dir)
    if state is None:
        from pcn_lab.cluster import commands
        from pcn_lab.cluster.state import orphans

        # this lab folder's cluster, or one whose lab folder lost its state;
        # never a cluster another lab folder still describes
        lost = [o for o in orphans() if o.dir == args.dir or not o.file.is_file()]
        for orphan in lost:  # a cluster whose lab folder is gone
            say(f"no lab state in {args.dir}, but cluster {orphan.layout.prefix} is left "
                f"(its data folder {orphan.layout.data})")
            commands.down(orphan)
        if lost:
            return 0
        leftover = [ns for ns in pr_netns.listnetns() if ns.startswith("pcnt-")]
        print("no lab to remove" + (f" (other pcn test namespaces exist: {leftover})"
                                    if leftover else ""))
        return 0
    say(f"stopping lab {state.run_id}")
    namespaces = lab_netns_inodes(state)
    _stop_supervisor(state.supervisor_pid)
    for pid in state.agents.values():
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    # what people started in pods and nodes (`pcn-lab exec ... iperf3 -D`):
    # the supervisor removed their namespaces' names, not the processes
    killed = kill_netns_processes(namespaces)
    removed = cleanup(state) + [f"process {pid}" for pid in killed]
    print(f"lab {state.run_id} removed" + (f" ({len(removed)} leftovers cleaned)"
                                           if removed else ""))
    return 0


def cmd_supervise(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = LabState.load(args.dir)
    if state is None:
        return 1
    state.supervisor_pid = os.getpid()
    state.save()
    asyncio.run(Supervisor(state, args.nodes, args.pods_per_node).run())
    return 0


SIGPIPE_EXIT = 128 + signal.SIGPIPE  # a shell's status for a command that SIGPIPE ended


def quiet_on_broken_pipe(fn: Callable[_Params, int]) -> Callable[_Params, int]:
    """Make a command end as a Unix tool does when the reader of its output
    has gone (`pcn-lab status | head -1`): quietly, status 141, instead of
    with a BrokenPipeError traceback (Python ignores SIGPIPE). Its output is
    flushed before it returns, so a late write fails here too, and stdout
    then points at /dev/null, so the interpreter's last flush has nowhere
    to fail."""
    @functools.wraps(fn)
    def wrapper(*args: _Params.args, **kwargs: _Params.kwargs) -> int:
        try:
            rc = fn(*args, **kwargs)
            sys.stdout.flush()
            return rc
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return SIGPIPE_EXIT

    return wrapper


@quiet_on_broken_pipe
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pcn-lab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=LAB_ROOT, help="lab state directory (%(default)s)")
    sub = ap.add_subparsers(dest="cmd", required=True,
                            metavar="{up,apply,exec,check,status,down}")  # not _supervise
    up = sub.add_parser("up", help="start a lab in the background")
    up.add_argument("--nodes", type=int, default=2, help="nodes (default 2)")
    up.add_argument("--pods-per-node", type=int, default=2, help="pods per node (default 2)")
    up.add_argument("-f", "--filename", help="apply this file or directory once up")
    up.add_argument("--timeout", type=float, default=300, help="seconds to wait (default 300)")
    up.add_argument("--kubernetes", action="store_true",
                    help="a real cluster (make k8s's binaries): --nodes workers plus a "
                         "control-plane node")
    up.add_argument("--until", choices=("controlplane", "nodes", "pcn", "all"), default="all",
                    help="with --kubernetes: stop after this step, leaving it running")
    up.add_argument("--agent-source", type=Path, metavar="CHECKOUT",
                    help="with --kubernetes, for development: run the agent's Python "
                         "packages from this pcn checkout instead of the image's")
    ap_apply = sub.add_parser("apply", help="create or update objects from YAML, as kubectl apply")
    ap_apply.add_argument("-f", "--filename", required=True)
    ex = sub.add_parser("exec", help="run a command in a pod's network namespace "
                                     "(kubectl exec on a real cluster)")
    ex.add_argument("-n", "--namespace", help="the pod's namespace (real cluster)")
    ex.add_argument("pod")
    ex.add_argument("command", nargs=argparse.REMAINDER)
    sub.add_parser("check", help="the connectivity matrix, one row per check")
    sub.add_parser("status", help="what the lab runs")
    sub.add_parser("down", help="remove the lab, also after a crash")
    sv = sub.add_parser("_supervise", help=argparse.SUPPRESS)
    sv.add_argument("--nodes", type=int, required=True)
    sv.add_argument("--pods-per-node", type=int, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "exec" and args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if os.geteuid() != 0 and args.cmd != "status":
        print("pcn-lab builds network namespaces and loads eBPF programs: run it as root "
              "(sudo)", file=sys.stderr)
        return 2
    if args.cmd == "up" and not 1 <= args.nodes <= 50:
        print("pcn-lab: --nodes must be 1-50", file=sys.stderr)
        return 2
    handlers = {"up": cmd_up, "apply": cmd_apply, "exec": cmd_exec, "check": cmd_check,
                "status": cmd_status, "down": cmd_down, "_supervise": cmd_supervise}
    return handlers[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
