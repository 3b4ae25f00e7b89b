"""Services: pcn's lbrp against kube-proxy-style iptables rules.

Both variants are built in the same run, side by side, with the same MTU:

* pcn: a one-node pcn lab; the client pod reaches a ClusterIP that the lbrp
  on its port translates to a backend pod on the same node
  (`NodeDataplane.set_service`, as the agent does).
* pcn-socklb (pod-to-service only): the same in a lab of its own with socket
  load balancing (socketLB: true): the client pod runs in its node's cgroup,
  where sock_lb.c translates the ClusterIP at connect(); the lbrp sees the
  backend's address and translates nothing.
* iptables: the `linux-bridge` reference (the reference CNI `bridge` plugin
  with host-local IPAM in a node namespace, pods on its Linux bridge) plus,
  in that node namespace, the nat/filter tables kube-proxy's iptables mode
  writes for the same services (bench.kubeproxy, loaded with one
  iptables-restore), with br_netfilter's bridge-nf-call-iptables on, as
  kube-proxy requires.

Scenarios:
* `pod-to-service`: iperf3 TCP throughput through the ClusterIP (rounds
  interleaved as in pod-to-pod) and request latency: new TCP connection,
  32-byte request, ~80-byte answer, connection closed (pcn_lab.probe rr),
  pooled over interleaved rounds; median and p99.
* `service-scale`: with N services installed (each with one or two
  backends; the last one installed has two real ones), the request latency to
  the last one installed, and the time to install the N services (pcn: all
  set_service calls inside one node.batch(); iptables: one iptables-restore).
  Each level starts from empty tables, and its real backends listen on a
  target port of the level's own (8080, 8081, ...): the rr server closes
  first, so the backends keep TIME_WAIT for (client:port, backend:port) for
  60 s, and the next level's VIP (a new destination for the client, which
  may reuse its ports) must not land on those 4-tuples. kube-proxy's
  conntrack would remap the source port on such a clash, pcn's lbrp does
  not: with one shared target port the pcn variant showed ~6% of
  connections at 10-15 ms (and some timeouts), whatever the number of
  services.
"""

from __future__ import annotations

import ipaddress
import math
import time
from contextlib import ExitStack
from pathlib import Path

from pcn_agent.dataplane.cubes.lbrp import Backend
from pcn_agent.node import podnet

from . import iperf, kubeproxy, rr
from .netns import exec_in, in_cgroup, stop
from .references import BRIDGE_NET, Endpoint, LinuxBridgeCNI
from .results import Result, now_iso
from .scenarios import MTU, Context, Variant

POD_TO_SERVICE = "pod-to-service"
SERVICE_SCALE = "service-scale"
PCN, IPTABLES = "pcn", "iptables"
PCN_SOCKLB = "pcn-socklb"  # pcn with socket load balancing (pcn_agent.dataplane.socklb)
RR_RATE = "rr-rate"
VIP = "10.96.0.10"
RR_SERVICE_PORT = 80  # -> rr.PORT on the backends
IPERF_SERVICE_PORT = 5201  # -> iperf.PORT
BRIDGE_CLUSTER_CIDR = "10.245.0.0/16"  # kube-proxy's --cluster-cidr for the bridge pods
SCALE_VIPS = ipaddress.IPv4Address("10.96.16.0")  # service i of service-scale: this + i
FAKE_BACKENDS = range(200, 250)  # host numbers of unused pod addresses (never reached)
WARMUP_REQUESTS = 50
PLOT = Path(__file__).resolve().parent / "results" / "service-scale.png"


def _bridge_node(ctx: Context, st: ExitStack, tag: str, pods: int) -> tuple[str, list[Endpoint]]:
    """The linux-bridge reference: a node namespace and `pods` pods on its
    bridge, plus what kube-proxy needs there (forwarding, bridged packets seen
    by iptables)."""
    node = ctx.nss.create(f"{tag}node")
    st.callback(ctx.nss.remove, node)
    names = [f"{tag}p{i}" for i in range(1, pods + 1)]
    for name in names:
        st.callback(ctx.nss.remove, f"{ctx.nss.prefix}-{name}")
    cni = LinuxBridgeCNI(ctx.nss, node, ctx.tmp / f"host-local-{tag}", MTU)
    st.callback(cni.delete_all)  # CNI DEL before the namespaces go
    eps = [cni.add_pod(name) for name in names]
    podnet.write_sysctl(node, "net.ipv4.ip_forward", "1")
    podnet.write_sysctl(node, "net.bridge.bridge-nf-call-iptables", "1")
    ctx.progress(f"linux-bridge: CNI bridge plugin attached {', '.join(e.ip for e in eps)} "
                 f"in {node}")
    return node, eps


def _servers(st: ExitStack, backends: list[tuple[str, str]],
             ports: tuple[int, ...] = (rr.PORT,)) -> None:
    """rr servers in (netns, name) pairs on `ports`, stopped at the end."""
    for netns, name in backends:
        st.callback(stop, rr.start_server(netns, name, ports))


def _latency(ctx: Context, label: str, clients: dict[str, Endpoint], vip: str, port: int,
             count: int) -> dict[str, rr.Latency]:
    """Request latency of every variant (client -> vip:port), `ctx.runs`
    interleaved rounds of count/runs requests each, samples pooled, after a
    warm-up that also checks that every variant answers."""
    names = list(clients)
    for name in names:  # warm-up: ARP, caches, and a check that the path works
        rr.run_client(clients[name].netns, vip, port, WARMUP_REQUESTS)
    per_round = max(1, math.ceil(count / ctx.runs))
    out = {name: rr.Latency() for name in names}
    for i in range(ctx.runs):
        for k in range(len(names)):
            name = names[(i + k) % len(names)]
            rep = rr.run_client(clients[name].netns, vip, port, per_round)
            out[name].add(rep)
            slow = [round(x / 1000, 1) for x in rep["samples_us"] if x > 1000]
            ctx.progress(f"{label}/{name}: round {i + 1}/{ctx.runs}: {per_round} requests, "
                         f"p50 {rep['p50_ms'] * 1000:.0f} us, p99 {rep['p99_ms'] * 1000:.0f} us, "
                         f"{len(slow)} over 1 ms" + (f" (ms: {slow[:12]})" if slow else ""))
    for name in names:
        lat = out[name]
        ctx.progress(f"{label}/{name}: p50 {lat.p50:.0f} us, p99 {lat.p99:.0f} us over "
                     f"{len(lat.samples_us)} requests (backends {lat.hosts})")
    return out


def _latency_results(scenario: str, lat: dict[str, rr.Latency], suffix: str = "",
                     extra: dict[str, dict[str, object]] | None = None) -> list[Result]:
    out = []
    for name, v in lat.items():
        common = {"requests": len(v.samples_us), "backends_hit": v.hosts, "date": now_iso(),
                  "mtu": MTU, "what": "new TCP connection + 32 B request + answer, "
                                      "connect() to answer", **(extra or {}).get(name, {})}
        out.append(Result(scenario, name, f"latency{suffix}", v.p50, "us",
                          {"stat": "median", **common}))
        out.append(Result(scenario, name, f"latency-p99{suffix}", v.p99, "us",
                          {"stat": "p99", **common}))
    return out


def pod_to_service(ctx: Context) -> list[Result]:
    with ExitStack() as st:
        lab = ctx.lab(st, nodes=1, pods=2)
        client, backend = lab.pods["n1p1"], lab.pods["n1p2"]
        lab.set_service(VIP, RR_SERVICE_PORT, "tcp", [lab.backend("n1p2", rr.PORT)])
        lab.set_service(VIP, IPERF_SERVICE_PORT, "tcp", [lab.backend("n1p2", iperf.PORT)])
        # The same, with socket load balancing: the client pod runs in its
        # node's cgroup, its connect() to the ClusterIP is translated once and
        # its packets cross the lbrp untranslated.
        slab = ctx.lab(st, nodes=1, pods=2, socket_lb=True)
        s_client, s_backend = slab.pods["n1p1"], slab.pods["n1p2"]
        if slab.node(1).socket_lb is None:
            raise RuntimeError(f"{POD_TO_SERVICE}: socket load balancing did not attach "
                               "(see the log): no cgroup v2 or no cgroup sock_addr hooks?")
        slab.set_service(VIP, RR_SERVICE_PORT, "tcp", [slab.backend("n1p2", rr.PORT)])
        slab.set_service(VIP, IPERF_SERVICE_PORT, "tcp", [slab.backend("n1p2", iperf.PORT)])
        assert slab.cgroups is not None
        in_cgroup(s_client.netns, slab.cgroups.node(slab.node_name(1)))
        st.callback(in_cgroup, s_client.netns, None)

        node, (b_client, b_backend) = _bridge_node(ctx, st, "sv", 2)
        ports = [kubeproxy.ServicePort("bench", "svc", name, VIP, port, "tcp",
                                       ((b_backend.ip, target),))
                 for name, port, target in (("rr", RR_SERVICE_PORT, rr.PORT),
                                            ("iperf", IPERF_SERVICE_PORT, iperf.PORT))]
        took = kubeproxy.load(node, kubeproxy.ruleset(ports, BRIDGE_CLUSTER_CIDR))
        ipt_extra = {"rules": "kube-proxy iptables mode (nat + filter), iptables-restore",
                     "iptables": kubeproxy.version(), "install_s": round(took, 3)}
        ctx.progress(f"{POD_TO_SERVICE}: service {VIP} -> {backend.ip} (pcn lbrp) and -> "
                     f"{b_backend.ip} (kube-proxy rules in {node})")

        _servers(st, [(backend.netns, "pcn-backend"), (b_backend.netns, "iptables-backend"),
                      (s_backend.netns, "pcn-socklb-backend")])
        clients = {PCN: Endpoint(client.netns, client.ip), IPTABLES: b_client,
                   PCN_SOCKLB: Endpoint(s_client.netns, s_client.ip)}
        lat = _latency(ctx, POD_TO_SERVICE, clients, VIP, RR_SERVICE_PORT, ctx.requests)

        variants = [
            Variant(PCN, clients[PCN], Endpoint(backend.netns, backend.ip), dest=VIP,
                    dest_port=IPERF_SERVICE_PORT, extra={"path": "client pod -> ClusterIP "
                                                         "(lbrp) -> backend pod, one node"}),
            Variant(IPTABLES, b_client, b_backend, dest=VIP, dest_port=IPERF_SERVICE_PORT,
                    extra={"path": "client pod -> ClusterIP (kube-proxy DNAT, Linux bridge) "
                                   "-> backend pod, one node", **ipt_extra}),
            Variant(PCN_SOCKLB, clients[PCN_SOCKLB], Endpoint(s_backend.netns, s_backend.ip),
                    dest=VIP, dest_port=IPERF_SERVICE_PORT,
                    extra={"path": "client pod -> ClusterIP translated at connect() (cgroup "
                                   "sock_lb) -> backend pod, lbrp untouched, one node"}),
        ]
        results = ctx.compare(POD_TO_SERVICE, variants)
    return (results + _latency_results(POD_TO_SERVICE, lat, extra={IPTABLES: ipt_extra})
            + _rate_results(POD_TO_SERVICE, lat))


def _rate_results(scenario: str, lat: dict[str, rr.Latency]) -> list[Result]:
    """Request/response rate of each variant from its latency samples: one
    client, one exchange at a time, so the rate is 1 / the exchange time,
    taken at the median (1e6 / p50 us): the mean, also recorded
    ("mean_rate"), is swayed on a shared machine by a few stalls of tens of
    milliseconds that have nothing to do with the path. Each exchange opens
    a new connection (netperf's TCP_CRR rather than TCP_RR): the connect()
    is where the socket path saves the most."""
    out = []
    for name, v in lat.items():
        if not v.samples_us:
            continue
        mean_rate = len(v.samples_us) / (sum(v.samples_us) / 1e6)
        out.append(Result(scenario, name, RR_RATE, 1e6 / v.p50, "req/s", {
            "stat": "1 / median exchange", "mean_rate": round(mean_rate, 1),
            "requests": len(v.samples_us), "date": now_iso(),
            "what": "sequential new TCP connection + 32 B request + answer, one client"}))
    return out


def _scale_backends(i: int, n: int, subnet: ipaddress.IPv4Network,
                    real: list[str], real_port: int) -> tuple[tuple[str, int], ...]:
    """Backends of service i of n: the last one gets the real servers (on
    `real_port`), the others one or two unused addresses of the pod subnet."""
    if i == n - 1:
        return tuple((ip, real_port) for ip in real)
    hosts = [FAKE_BACKENDS[(i + k) % len(FAKE_BACKENDS)] for k in range(1 + i % 2)]
    return tuple((str(subnet.network_address + h), rr.PORT) for h in hosts)


def service_scale(ctx: Context) -> list[Result]:
    results: list[Result] = []
    with ExitStack() as st:
        lab = ctx.lab(st, nodes=1, pods=3)
        node = lab.node(1)
        pcn_net = ipaddress.IPv4Network(lab.pod_cidr(1))
        pcn_real = [lab.pods["n1p2"].ip, lab.pods["n1p3"].ip]
        b_node, (b_client, b1, b2) = _bridge_node(ctx, st, "ss", 3)
        level_ports = tuple(rr.PORT + k for k in range(len(ctx.scale)))
        _servers(st, [(lab.pods["n1p2"].netns, "pcn-1"), (lab.pods["n1p3"].netns, "pcn-2"),
                      (b1.netns, "iptables-1"), (b2.netns, "iptables-2")], level_ports)
        clients = {PCN: Endpoint(lab.pods["n1p1"].netns, lab.pods["n1p1"].ip),
                   IPTABLES: b_client}
        installed: list[str] = []
        for n, real_port in zip(ctx.scale, level_ports, strict=True):
            vips = [str(SCALE_VIPS + i) for i in range(n)]
            # pcn: from an empty table, every service through set_service in one batch
            with node.batch():
                for vip in installed:
                    node.delete_service(vip, RR_SERVICE_PORT, "tcp")
            installed = []
            t = time.perf_counter()
            with node.batch():
                for i, vip in enumerate(vips):
                    node.set_service(vip, RR_SERVICE_PORT, "tcp",
                                     [Backend(ip, port) for ip, port in
                                      _scale_backends(i, n, pcn_net, pcn_real, real_port)])
                    installed.append(vip)
            pcn_install = time.perf_counter() - t
            assert node.lb is not None and len(node.lb.services.services) == n
            # iptables: from empty tables, one iptables-restore of all of them
            ports = [kubeproxy.ServicePort("bench", f"svc-{i:05d}", "http", vip,
                                           RR_SERVICE_PORT, "tcp",
                                           _scale_backends(i, n, BRIDGE_NET, [b1.ip, b2.ip],
                                                           real_port))
                     for i, vip in enumerate(vips)]
            kubeproxy.load(b_node, kubeproxy.ruleset([], BRIDGE_CLUSTER_CIDR))
            ipt_install = kubeproxy.load(b_node, kubeproxy.ruleset(ports, BRIDGE_CLUSTER_CIDR))
            nat_rules = _count_nat_rules(b_node)
            ctx.progress(f"{SERVICE_SCALE}@{n}: installed in {pcn_install:.2f} s (pcn, one "
                         f"batch) and {ipt_install:.2f} s (iptables-restore, {nat_rules} nat "
                         f"rules); measuring {vips[-1]}")
            lat = _latency(ctx, f"{SERVICE_SCALE}@{n}", clients, vips[-1], RR_SERVICE_PORT,
                           ctx.requests)
            extra = {PCN: {"services": n, "vip": vips[-1], "target_port": real_port},
                     IPTABLES: {"services": n, "vip": vips[-1], "target_port": real_port,
                                "nat_rules": nat_rules,
                                "iptables": kubeproxy.version()}}
            results += _latency_results(SERVICE_SCALE, lat, f"@{n}", extra)
            for name, secs, how in ((PCN, pcn_install, "NodeDataplane.set_service x N in one "
                                                         "node.batch()"),
                                    (IPTABLES, ipt_install, "one iptables-restore")):
                results.append(Result(SERVICE_SCALE, name, f"install@{n}", secs * 1000, "ms",
                                      {"services": n, "how": how, "date": now_iso()}))
    try:
        from .plot import service_scale_png

        service_scale_png(results, PLOT)
        ctx.progress(f"{SERVICE_SCALE}: plot written to {PLOT}")
    except ImportError as exc:
        ctx.progress(f"{SERVICE_SCALE}: no plot ({exc}; pip install matplotlib)")
    return results


def _count_nat_rules(netns: str) -> int:
    out = exec_in(netns, ["iptables-save", "-t", "nat"], check=False).stdout
    return sum(1 for line in out.splitlines() if line.startswith("-A "))


SCENARIOS = {POD_TO_SERVICE: pod_to_service, SERVICE_SCALE: service_scale}
