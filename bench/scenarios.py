"""The measured scenarios. Each builds all its variants side by side, measures
them interleaved, returns its results and removes what it built, also when
interrupted (everything it creates is registered on an ExitStack at once)."""

from __future__ import annotations

import ipaddress
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from pcn_lab.topology import Lab

from . import bpfload, iperf, rr, tcprr
from .netns import Namespaces, exec_in, stop
from .references import (
    Endpoint,
    LinuxBridgeCNI,
    routed_pods,
    switched_pair,
    veth_pair,
    vxlan_pair,
)
from .results import TCP_RR, THROUGHPUT, Result, now_iso

log = logging.getLogger(__name__)

TCP_RR_SECONDS = 3.0  # per TCP_RR run (sockperf ping-pong)
MTU = 1450  # pcn pods' MTU (VXLAN overlay on a 1500 underlay); references use it too
SAME_NODE = "pod-to-pod-same-node"
CROSS_NODE = "pod-to-pod-cross-node"
DIRECT_VARIANT = "pcn-direct"  # pod-to-pod-cross-node with overlay none (issue 13)
DIRECT_REFERENCE = "veth-1500"  # its limit: the physical network at its pods' MTU
VXLAN_REFERENCE = "vxlan-kernel"  # the kernel's VXLAN alone, no pcn
# pcn's topology (a pod's veth on each node) forwarded by the kernel, no pcn:
# what the pods' veths themselves cost, over VXLAN and routed directly
VXLAN_PODS_REFERENCE = "vxlan-kernel-pods"
DIRECT_PODS_REFERENCE = "direct-kernel-pods"
UNDERLAY_MTU = 1500
POD_ADD = "pod-add"
WARMUP_REQUESTS = 50  # rr requests before each variant's latency is measured


@dataclass
class Context:
    nss: Namespaces
    tmp: Path
    duration: float
    runs: int
    pod_adds: int
    pinning: iperf.Pinning
    requests: int = 2000  # rr requests per variant (latency scenarios)
    scale: tuple[int, ...] = (10, 1000, 10000, 100000)  # services installed in service-scale
    endpoint_changes: int = 100  # EndpointSlice writes timed in endpoints-to-dataplane
    endpoint_services: int = 10000  # Services in the API in endpoints-to-dataplane
    endpoints_per_service: int = 5  # endpoints of each of those Services (and cold start's)
    cold_services: int = 10000  # Services in the API before agent-cold-start's agent starts
    cni_adds: int = 50  # pods added in cni-add
    cni_parallel: int = 30  # pods added at once in cni-add-parallel
    policy_rounds: int = 20  # rounds of the five changes timed in policy-reconcile
    policy_pod_adds: int = 50  # pods added in policy-pod-add (at most a node's 50)
    tcp_rr: bool = True  # compare() also measures each variant's TCP_RR rate
    labs: list[Lab] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def progress(self, msg: str) -> None:
        print(f"[bench +{time.monotonic() - self.started:6.1f}s] {msg}", file=sys.stderr,
              flush=True)

    def lab(self, stack: ExitStack, nodes: int, pods: int, overlay: str = "vxlan",
            socket_lb: bool = False) -> Lab:
        """A built pcn lab, closed by `stack`; pods at MTU over VXLAN, at the
        mode's (1500) with direct routing; with `socket_lb`, each node's pods
        in a cgroup of their own with socket load balancing on it."""
        lab = Lab(nodes_count=nodes, pods_per_node=pods, overlay=overlay,
                  mtu=MTU if overlay == "vxlan" else None, socket_lb=socket_lb)
        self.labs.append(lab)  # its prefix is checked for leftovers at the end
        # compiling the node's programs takes seconds: say so before, not only after
        self.progress(f"pcn lab {lab.prefix}: building {nodes} node(s) of {pods} pod(s) "
                      "(compiling the node's programs)")
        t = time.monotonic()
        lab.build()  # closes itself if the build fails
        stack.callback(lab.close)
        self.progress(f"pcn lab {lab.prefix}: {nodes} node(s), {pods} pod(s) per node, "
                      f"overlay {overlay}{', socket load balancing' if socket_lb else ''}, "
                      f"built in {time.monotonic() - t:.1f} s")
        return lab

    def pair_lab(self, stack: ExitStack, names: list[str]
                 ) -> tuple[Lab, dict[str, tuple[str, str]], dict[str, Endpoint]]:
        """A one-node lab with a (client, server) pod pair per variant name:
        (the lab, name -> (client pod, server pod), pod -> Endpoint)."""
        lab = self.lab(stack, nodes=1, pods=2 * len(names))
        keys = sorted(lab.pods, key=lambda k: int(k.split("p")[-1]))
        pairs = {name: (keys[2 * i], keys[2 * i + 1]) for i, name in enumerate(names)}
        return lab, pairs, {k: Endpoint(lab.pods[k].netns, lab.pods[k].ip) for k in lab.pods}

    def request_latency(self, label: str, clients: dict[str, tuple[Endpoint, str]],
                        count: int, port: int = rr.PORT) -> dict[str, rr.Latency]:
        """Request latency of each variant (name -> (client, server address)):
        `runs` interleaved rounds of count/runs requests each (pcn_lab.probe
        rr: new TCP connection, 32-byte request, answer, close), samples
        pooled, after a warm-up of WARMUP_REQUESTS that also fails (raises
        from rr.run_client) when a variant does not answer."""
        names = list(clients)
        for client, dest in clients.values():
            rr.run_client(client.netns, dest, port, WARMUP_REQUESTS)
        per_round = max(1, math.ceil(count / self.runs))
        out = {name: rr.Latency() for name in names}
        for i in range(self.runs):
            for k in range(len(names)):
                name = names[(i + k) % len(names)]
                client, dest = clients[name]
                rep = rr.run_client(client.netns, dest, port, per_round)
                out[name].add(rep)
                self.progress(f"{label}/{name}: rr round {i + 1}/{self.runs}: "
                              f"p50 {rep['p50_ms'] * 1000:.0f} us, "
                              f"p99 {rep['p99_ms'] * 1000:.0f} us")
        return out

    def compare(self, scenario: str, variants: list[Variant],
                tcp_rr: bool = True) -> list[Result]:
        """Throughput of every variant, interleaved: round i runs each variant once
        (starting with a different one each round), so that drifts of the machine's
        speed (a VM's neighbours) hit all variants alike, not the one run last.
        Then (`tcp_rr` and the context's `tcp_rr`) each variant's TCP_RR rate
        (bench.tcprr, port `Variant.rr_port` behind a service address), rounds
        interleaved the same way."""
        tcp_rr = tcp_rr and self.tcp_rr
        with ExitStack() as st:
            for v in variants:
                ping = exec_in(v.client.netns, ["ping", "-c", "3", "-i", "0.2", "-W", "2",
                                                v.server.ip], check=False)
                if ping.returncode != 0:
                    raise RuntimeError(f"{scenario}/{v.name}: {v.client.netns} cannot reach "
                                       f"{v.server.ip}:\n{ping.stdout}")
                st.callback(stop, iperf.start_server(v.server.netns, self.pinning))
                if tcp_rr:
                    st.callback(stop, tcprr.start_server(v.server.netns))
                via = f" via {v.dest}:{v.dest_port}" if v.dest else ""
                self.progress(f"{scenario}/{v.name}: iperf3 {v.client.netns} -> {v.server.ip} "
                              f"({v.server.netns}){via}")
            self.progress(f"{scenario}: {self.runs} rounds of {len(variants)} x "
                          f"{self.duration:g} s (+{iperf.OMIT_S} s warm-up)")
            runs: dict[str, iperf.Throughput] = {v.name: iperf.Throughput() for v in variants}
            for i in range(self.runs):
                for k in range(len(variants)):
                    v = variants[(i + k) % len(variants)]
                    if v.before is not None:
                        v.before()
                    gbps, retr = iperf.run_client(v.client.netns, v.dest or v.server.ip,
                                                  self.duration, self.pinning,
                                                  v.dest_port if v.dest else iperf.PORT)
                    runs[v.name].runs_gbps.append(gbps)
                    runs[v.name].retransmits.append(retr)
                    self.progress(f"{scenario}/{v.name}: run {i + 1}/{self.runs}: "
                                  f"{gbps:.2f} Gbit/s ({retr} retransmits)")
            rates = self._tcp_rr(scenario, variants) if tcp_rr else {}
        out = []
        for v in variants:
            tp = runs[v.name]
            self.progress(f"{scenario}/{v.name}: median {tp.median:.2f} Gbit/s")
            out.append(Result(scenario, v.name, THROUGHPUT, tp.median, "Gbit/s", {
                "stat": "median", "runs": [round(x, 3) for x in tp.runs_gbps],
                "retransmits": tp.retransmits, "duration_s": self.duration, "mtu": MTU,
                "date": now_iso(), **v.extra}))
            if v.name in rates:
                rr_runs = rates[v.name]
                out.append(Result(scenario, v.name, TCP_RR, statistics.median(
                    r.rate for r in rr_runs), "trans/s", {
                    "stat": "median", "runs": [round(r.rate) for r in rr_runs],
                    "half_rtt_us": [round(r.half_rtt_us, 2) for r in rr_runs],
                    "duration_s": TCP_RR_SECONDS, "message_bytes": tcprr.MESSAGE_BYTES,
                    "tool": "sockperf ping-pong --tcp", "date": now_iso(), **v.extra}))
        return out

    def _tcp_rr(self, scenario: str, variants: list[Variant]) -> dict[str, list[tcprr.RrRun]]:
        """TCP_RR-style rate of every variant (servers already started), rounds
        interleaved as the throughput's."""
        out: dict[str, list[tcprr.RrRun]] = {v.name: [] for v in variants}
        for i in range(self.runs):
            for k in range(len(variants)):
                v = variants[(i + k) % len(variants)]
                if v.before is not None:
                    v.before()
                run = tcprr.run_client(v.client.netns, v.dest or v.server.ip,
                                       v.rr_port if v.dest else tcprr.PORT, TCP_RR_SECONDS)
                out[v.name].append(run)
                self.progress(f"{scenario}/{v.name}: TCP_RR round {i + 1}/{self.runs}: "
                              f"{run.rate:.0f} trans/s")
        return out


@dataclass
class Variant:
    name: str
    client: Endpoint
    server: Endpoint
    before: Callable[[], None] | None = None  # run before each of its iperf3 runs
    extra: dict[str, object] = field(default_factory=dict)  # into its JSON entry
    dest: str | None = None  # the client connects here (a service address), not server.ip
    dest_port: int = iperf.PORT
    rr_port: int = tcprr.PORT  # the TCP_RR server's port behind `dest`


def _lab_endpoint(lab: Lab, pod: str) -> Endpoint:
    p = lab.pods[pod]
    return Endpoint(p.netns, p.ip)


def _set_mtu(netns: str, ifname: str, mtu: int) -> None:
    with IPRoute(netns=netns) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], mtu=mtu)


def same_node(ctx: Context) -> list[Result]:
    with ExitStack() as st:
        lab = ctx.lab(st, nodes=1, pods=2)
        pcn = Variant("pcn", _lab_endpoint(lab, "n1p1"), _lab_endpoint(lab, "n1p2"))

        a, b = veth_pair(ctx.nss, MTU)
        for ep in (a, b):
            st.callback(ctx.nss.remove, ep.netns)
        veth = Variant("veth", a, b)

        node = ctx.nss.create("brnode")
        st.callback(ctx.nss.remove, node)
        names = ("brp1", "brp2")
        for name in names:
            st.callback(ctx.nss.remove, f"{ctx.nss.prefix}-{name}")
        cni = LinuxBridgeCNI(ctx.nss, node, ctx.tmp / "host-local", MTU)
        st.callback(cni.delete_all)  # CNI DEL before the namespaces go, as on a real node
        p1, p2 = (cni.add_pod(name) for name in names)
        nf = exec_in(node, ["cat", "/proc/sys/net/bridge/bridge-nf-call-iptables"], check=False)
        bridge = Variant("linux-bridge", p1, p2,
                         extra={"bridge_nf_call_iptables": nf.stdout.strip() or None})
        ctx.progress(f"linux-bridge: CNI bridge plugin attached {p1.ip} and {p2.ip} in {node}")

        return ctx.compare(SAME_NODE, [pcn, veth, bridge])


def cross_node(ctx: Context) -> list[Result]:
    """pcn over VXLAN (pods at 1450) and with direct routing (overlay none,
    pods at 1500), each against the lab's physical network without pcn at
    the same MTU (issue 13 targets: VXLAN >= 90 %, direct >= 95 % of it),
    against the kernel's VXLAN alone, against pcn's own topology forwarded
    by the kernel (a pod's veth on each node, routed over VXLAN or directly:
    what the veths cost, which no program can save), and node to node
    through pcn's programs on the uplinks. Then one more iperf3 run of each
    pcn variant with the kernel's BPF statistics on (bench.bpfload): what
    pcn's programs cost under that traffic, in ns per run and share of a
    CPU, in the throughput Result's extra."""
    with ExitStack() as st:
        lab = ctx.lab(st, nodes=2, pods=1)
        pcn = Variant("pcn", _lab_endpoint(lab, "n1p1"), _lab_endpoint(lab, "n2p1"),
                      extra={"overlay": "vxlan", "mtu": lab.pod_mtu})
        direct_lab = ctx.lab(st, nodes=2, pods=1, overlay="none")
        direct = Variant(DIRECT_VARIANT, _lab_endpoint(direct_lab, "n1p1"),
                         _lab_endpoint(direct_lab, "n2p1"),
                         extra={"overlay": "none", "mtu": direct_lab.pod_mtu,
                                "reference": DIRECT_REFERENCE})

        # The limit: the lab's physical network (veth, switch, veth) without pcn,
        # node address to node address, the uplinks at the pods' MTU: 1450 for
        # VXLAN's comparison, 1500 for direct routing's.
        for tag in ("", "d", "x"):
            for name in ("un2", "un1", "uphy"):
                st.callback(ctx.nss.remove, f"{ctx.nss.prefix}-{name}{tag}")
        a, b = switched_pair(ctx.nss, MTU)
        veth = Variant("veth", a, b, extra={"path": "uplink veth - Linux bridge switch - "
                                                    "uplink veth, no pcn"})
        for tag in ("d", "x"):
            for name in ("rp1", "rp2"):
                st.callback(ctx.nss.remove, f"{ctx.nss.prefix}-{name}{tag}")
        a, b = switched_pair(ctx.nss, direct_lab.pod_mtu, tag="d")
        veth_direct = Variant(DIRECT_REFERENCE, a, b, extra={
            "path": "uplink veth - Linux bridge switch - uplink veth, no pcn",
            "mtu": direct_lab.pod_mtu})
        a, b = routed_pods(ctx.nss, a, b, "uplink", direct_lab.pod_mtu, tag="d")
        direct_pods = Variant(DIRECT_PODS_REFERENCE, a, b, extra={
            "path": "pod veth - kernel IP forwarding - uplink veth - Linux bridge switch - "
                    "uplink veth - kernel IP forwarding - pod veth, no pcn",
            "mtu": direct_lab.pod_mtu})

        # The kernel's VXLAN alone on the same network: what encapsulation
        # costs without pcn (pcn's VXLAN path against it tells pcn's share).
        a, b = switched_pair(ctx.nss, UNDERLAY_MTU, tag="x")
        a, b = vxlan_pair(a, b, MTU)
        vxlan_kernel = Variant(VXLAN_REFERENCE, a, b, extra={
            "path": "kernel VXLAN devices over uplink veth - Linux bridge switch - uplink veth, "
                    "no pcn", "mtu": MTU})
        a, b = routed_pods(ctx.nss, a, b, "vx", MTU, tag="x")
        vxlan_pods = Variant(VXLAN_PODS_REFERENCE, a, b, extra={
            "path": "pod veth - kernel IP forwarding - kernel VXLAN over the underlay - kernel "
                    "IP forwarding - pod veth, no pcn", "mtu": MTU})

        # The lab's own underlay, node to node: the same path, but pcn's entry
        # programs sit on both uplinks (shared with the host stack). Its MTU goes
        # to the pods' MTU for these runs only (VXLAN needs 1500).
        nodes = [lab.node_name(1), lab.node_name(2)]

        def uplink_mtu(mtu: int) -> Callable[[], None]:
            def apply() -> None:
                for ns in nodes:
                    _set_mtu(ns, "uplink", mtu)
            return apply

        st.callback(uplink_mtu(lab.pod_mtu + 50))
        pcn.before = uplink_mtu(lab.pod_mtu + 50)
        host = Variant("node-to-node", Endpoint(nodes[0], lab.node_ip(1)),
                       Endpoint(nodes[1], lab.node_ip(2)), before=uplink_mtu(MTU),
                       extra={"path": "the pcn lab's underlay, through pcn's programs on the "
                                      "uplinks"})
        ctx.progress(f"{CROSS_NODE}: load before the runs: {_loadavg()}")
        out = ctx.compare(CROSS_NODE, [pcn, direct, veth, veth_direct, direct_pods,
                                       vxlan_kernel, vxlan_pods, host])
        load = _loadavg()
        ctx.progress(f"{CROSS_NODE}: load after the runs: {load}")
        for r in out:
            r.extra["loadavg_after"] = load
        for v, v_lab in ((pcn, lab), (direct, direct_lab)):
            extra = _bpf_load(ctx, v, v_lab)
            for r in out:
                if r.variant == v.name and r.metric == THROUGHPUT:
                    r.extra.update(extra)
        return out


def _bpf_load(ctx: Context, v: Variant, lab: Lab) -> dict[str, Any]:
    """One iperf3 run of pcn variant `v` with the kernel's BPF statistics on
    (bench.bpfload): its programs' cost under that traffic, as Result extras
    ({} with a progress note when the kernel refuses the statistics)."""
    if v.before is not None:
        v.before()
    server = iperf.start_server(v.server.netns, ctx.pinning)
    try:
        load = bpfload.measure(lab, lambda: iperf.run_client(
            v.client.netns, v.server.ip, ctx.duration, ctx.pinning)[0])
    except OSError as exc:
        ctx.progress(f"{CROSS_NODE}/{v.name}: no BPF statistics ({exc})")
        return {}
    finally:
        stop(server)
    ctx.progress(f"{CROSS_NODE}/{v.name}: {load.summary()}")
    return load.as_extra()


def latency_results(scenario: str, lat: dict[str, rr.Latency],
                    extras: dict[str, dict[str, Any]] | None = None) -> list[Result]:
    """Each variant's request latency as two Results, `latency` (median)
    and `latency-p99`, in µs, with the variant's extras (all but its
    per-rule packet counts, which go on the throughput result)."""
    out = []
    for name, v in lat.items():
        common = {"requests": len(v.samples_us), "date": now_iso(), "mtu": MTU,
                  "what": "new TCP connection + 32 B request + answer, connect() to answer",
                  **{k: x for k, x in (extras or {}).get(name, {}).items()
                     if k != "packets_by_rule"}}
        out.append(Result(scenario, name, "latency", v.p50, "us", {"stat": "median", **common}))
        out.append(Result(scenario, name, "latency-p99", v.p99, "us", {"stat": "p99", **common}))
    return out


def _loadavg() -> str:
    """/proc/loadavg's 1, 5 and 15 minute figures: a cross-node ratio taken on
    a busy machine is no verdict (the runs share its cores)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def pod_add(ctx: Context) -> list[Result]:
    with ExitStack() as st:
        lab = ctx.lab(st, nodes=1, pods=0)
        node = lab.node(1)
        net = ipaddress.IPv4Network(lab.pod_cidr(1))
        samples_ms: list[float] = []
        ctx.progress(f"{POD_ADD}/pcn: timing {ctx.pod_adds} NodeDataplane.add_pod calls")
        for k in range(1, ctx.pod_adds + 1):
            ns = ctx.nss.create(f"add{k:02d}")  # outside the timing, as the runtime does
            st.callback(ctx.nss.remove, ns)
            addr = f"{net.network_address + 100 + k}/{net.prefixlen}"
            t = time.perf_counter()
            node.add_pod(f"bench-add-{k}", ns, addr)
            samples_ms.append((time.perf_counter() - t) * 1000)
        for k in (1, ctx.pod_adds):  # the timed pods work (not timed)
            ping = exec_in(f"{ctx.nss.prefix}-add{k:02d}",
                           ["ping", "-c", "1", "-W", "2", lab.node(1).cfg.gateway], check=False)
            if ping.returncode != 0:
                raise RuntimeError(f"pod {k} added in the timing loop cannot ping its gateway")
    med, p90 = statistics.median(samples_ms), _percentile(samples_ms, 90)
    ctx.progress(f"{POD_ADD}/pcn: median {med:.1f} ms, p90 {p90:.1f} ms "
                 f"(min {min(samples_ms):.1f}, max {max(samples_ms):.1f})")
    common = {"samples": len(samples_ms), "date": now_iso()}
    return [
        Result(POD_ADD, "pcn", "latency", med, "ms",
               {"stat": "median", "samples_ms": [round(x, 2) for x in samples_ms], **common}),
        Result(POD_ADD, "pcn", "latency-p90", p90, "ms", {"stat": "p90", **common}),
    ]


SCENARIOS: dict[str, Callable[[Context], list[Result]]] = {
    SAME_NODE: same_node,
    CROSS_NODE: cross_node,
    POD_ADD: pod_add,
}
