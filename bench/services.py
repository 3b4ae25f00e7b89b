"""Services: pcn's lbrp against the upstream kube-proxy, iptables and nftables modes.

Both variants are built in the same run, side by side, with the same MTU:

* pcn: a one-node pcn lab; the client pod reaches a ClusterIP that the lbrp
  on its port translates to a backend pod on the same node
  (`NodeDataplane.set_service`, as the agent does).
* pcn-socklb (pod-to-service only): the same in a lab of its own with socket
  load balancing (socketLB: true): the client pod runs in its node's cgroup,
  where sock_lb.c translates the ClusterIP at connect(); the lbrp sees the
  backend's address and translates nothing.
* kube-proxy-iptables, kube-proxy-nftables: two copies of the `linux-bridge`
  reference (the reference CNI `bridge` plugin with host-local IPAM in a node
  namespace, pods on its Linux bridge; both get the same pod addresses), each
  with the upstream kube-proxy from `make k8s`'s cache in its node namespace,
  one per mode, both watching one bench-owned kube-apiserver (bench.kubeproxy)
  where the same Services and EndpointSlices are created through the API;
  br_netfilter's bridge-nf-call-iptables on, as kube-proxy requires. Measured
  once kube-proxy's rules for them are in the node's tables.

Scenarios:
* `pod-to-service`: iperf3 TCP throughput through the ClusterIP (rounds
  interleaved as in pod-to-pod) and request latency: new TCP connection,
  32-byte request, ~80-byte answer, connection closed (pcn_lab.probe rr),
  pooled over interleaved rounds; median and p99.
* `service-scale`: with N services installed (10, 1 000, 10 000, 100 000
  by default: Context.scale; each with BACKENDS_PER_SERVICE = 5 backends,
  unused pod addresses, but the last one installed, which has two real
  ones: 500 000 backends at 100 000, in the lbrp's default table sizes), the
  request latency to the last one installed, and the time to install the N
  services (pcn: all set_service calls inside one node.batch(), with the
  kernel memory of its service tables, map_memlock_bytes; kube-proxy: its
  cold start, from a fresh process with empty tables (`kube-proxy
  --cleanup`) and the N Services already in the API, to its rules for all N
  in the tables: list, full sync, iptables-restore or one nft transaction).
  kube-proxy's modes run up to KP_MAX_SERVICES (iptables 10 000: 46 s of
  cold start there; nftables 100 000) and within KP_COLD_START_TIMEOUT_S
  (300 s); a mode not run at a level gets a `skipped@N` result with the
  reason. The API objects grow level to level (the previous level's last
  service gets unused backends), created through API_WORKERS connections in
  parallel and timed apart from every figure (api_objects_created_s); a
  level whose objects would take more than API_CREATE_BUDGET_S (600 s) to
  create, at the rate of the previous level or at the rate so far while
  they are created (progress every 10 s), is run without kube-proxy, and so
  is every level above it (both modes skipped@N, the reason saying so: on
  2 busy vCPUs the API server went from 100 to ~32 objects/s, an hour for
  100 000 Services; on a quiet one from ~550 objects/s at 10 000 Services
  to ~13 past 50 000). pcn's table starts from empty at each level.
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
import re
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from pcn_agent.dataplane.cubes.lbrp import Backend
from pcn_agent.node import podnet
from pcn_agent.node.wiring import NodeDataplane

from . import iperf, kubeproxy, rr, tcprr
from .kubeproxy import ControlPlane, KubeProxy, ServicePort
from .netns import in_cgroup, stop
from .references import BRIDGE_NET, Endpoint, LinuxBridgeCNI
from .results import Result, now_iso
from .scenarios import MTU, Context, Variant

POD_TO_SERVICE = "pod-to-service"
SERVICE_SCALE = "service-scale"
PCN = "pcn"
KP = {mode: f"kube-proxy-{mode}" for mode in kubeproxy.MODES}  # variant names
PCN_SOCKLB = "pcn-socklb"  # pcn with socket load balancing (pcn_agent.dataplane.socklb)
VIP = "10.96.0.10"
RR_SERVICE_PORT = 80  # -> rr.PORT on the backends
IPERF_SERVICE_PORT = 5201  # -> iperf.PORT
BRIDGE_CLUSTER_CIDR = "10.245.0.0/16"  # kube-proxy's --cluster-cidr for the bridge pods
SCALE_VIPS = ipaddress.IPv4Address("10.96.16.0")  # service i of service-scale: this + i
FAKE_BACKENDS = range(200, 250)  # host numbers of unused pod addresses (never reached)
BACKENDS_PER_SERVICE = 5  # of every service-scale service but the measured one (2 real)
# The most services each kube-proxy mode is run with in service-scale, and
# how long its cold start may take before the level is recorded as skipped
# for it: iptables needed 46 s for 10 000 Services (one iptables-restore of
# ~100 000 rules, rewritten whole at every sync), ten times that would tie
# up the machine for the best part of an hour; nftables 6.7 s.
KP_MAX_SERVICES = {"iptables": 10_000, "nftables": 100_000}
KP_COLD_START_TIMEOUT_S = 300.0
API_WORKERS = 8  # connections creating service-scale's API objects in parallel
# How long creating a level's API objects may be expected to take, at the
# rate measured at the previous level, before kube-proxy is skipped there:
# on 2 busy vCPUs the bench's API server took 93-176 s for 9 000 Services +
# EndpointSlices (193-100 objects/s) and slowed to ~32 objects/s past
# 19 000, about an hour for 100 000.
API_CREATE_BUDGET_S = 600.0
LB_TABLES = ("lb_services", "lb_vips", "lb_slots")  # whose kernel memory is reported
WARMUP_REQUESTS = 50


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


@dataclass
class KubeProxyNodes:
    """The kube-proxy references of one scenario: the bench's API server and,
    per mode, a linux-bridge node with its pods and its kube-proxy."""

    api: kubeproxy.ApiClient
    control: ControlPlane
    nodes: dict[str, str]  # mode -> node namespace
    pods: list[Endpoint]  # pods of the iptables node; the nftables node's have the same IPs
    pods_by_mode: dict[str, list[Endpoint]]
    proxies: dict[str, KubeProxy]

    def start_and_wait(self, ports: list[ServicePort], with_endpoints: list[ServicePort],
                       timeout: float = 600) -> dict[str, float]:
        """Start each mode's kube-proxy in turn (one at a time: two syncing at
        once would share the CPUs) and wait until its rules hold `ports` and
        the endpoints of `with_endpoints`; seconds from its start to the end
        of the sync that wrote them, per mode (KubeProxy.wait_programmed)."""
        out = {}
        for mode, proxy in self.proxies.items():
            proxy.start()
            out[mode] = proxy.wait_programmed(ports, with_endpoints, timeout=timeout)
        return out

    def extra(self, mode: str) -> dict[str, object]:
        return {"kube_proxy": self.version, "mode": mode,
                "rules": kubeproxy.rule_count(self.nodes[mode], mode)}

    @property
    def version(self) -> str:
        return kubeproxy.version(kubeproxy.bin_dir())


def _kube_proxy_nodes(ctx: Context, st: ExitStack, tag: str, pods: int) -> KubeProxyNodes:
    """A bench API server and one linux-bridge node per kube-proxy mode with
    `pods` pods each (same addresses), their Node objects created and a relay
    to the API server in each node; kube-proxy not started yet. Raises
    RuntimeError without `make k8s`'s binaries or the nft tool."""
    bins = kubeproxy.bin_dir()
    if kubeproxy.binaries_missing(bins):
        raise RuntimeError(f"{bins} lacks {kubeproxy.binaries_missing(bins)}: run `make k8s` "
                           "(the services scenarios compare with the upstream kube-proxy)")
    api_ns = ctx.nss.create(f"{tag}api")
    st.callback(ctx.nss.remove, api_ns)
    control = ControlPlane(api_ns, ctx.tmp / f"kube-{tag}", bins)
    st.callback(control.close)
    t = time.monotonic()
    api = control.start()
    api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench"}})
    ctx.progress(f"kube-apiserver (etcd, {bins}) up in {api_ns} in {time.monotonic() - t:.1f} s")
    nodes: dict[str, str] = {}
    by_mode: dict[str, list[Endpoint]] = {}
    proxies: dict[str, KubeProxy] = {}
    for mode in kubeproxy.MODES:
        node, eps = _bridge_node(ctx, st, f"{tag}{mode[0]}", pods)
        nodes[mode], by_mode[mode] = node, eps
        gateway = str(ipaddress.IPv4Interface(f"{eps[0].ip}/{BRIDGE_NET.prefixlen}")
                      .network.network_address + 1)
        api.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node},
                    "status": {"addresses": [{"type": "InternalIP", "address": gateway},
                                             {"type": "Hostname", "address": node}]}})
        port = control.relay_into(node, mode)
        proxy = KubeProxy(node, mode, node, BRIDGE_CLUSTER_CIDR, port,
                          ctx.tmp / f"kube-{tag}" / f"kube-proxy-{mode}", bins)
        st.callback(proxy.cleanup)
        proxies[mode] = proxy
    ips = {mode: [e.ip for e in eps] for mode, eps in by_mode.items()}
    if len({tuple(v) for v in ips.values()}) != 1:
        raise RuntimeError(f"the kube-proxy nodes' pods got different addresses: {ips}")
    return KubeProxyNodes(api, control, nodes, by_mode[kubeproxy.MODES[0]], by_mode, proxies)


def pod_to_service(ctx: Context) -> list[Result]:
    with ExitStack() as st:
        lab = ctx.lab(st, nodes=1, pods=2)
        client, backend = lab.pods["n1p1"], lab.pods["n1p2"]
        lab.set_service(VIP, RR_SERVICE_PORT, "tcp", [lab.backend("n1p2", rr.PORT)])
        lab.set_service(VIP, IPERF_SERVICE_PORT, "tcp", [lab.backend("n1p2", iperf.PORT)])
        lab.set_service(VIP, tcprr.PORT, "tcp", [lab.backend("n1p2", tcprr.PORT)])
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
        slab.set_service(VIP, tcprr.PORT, "tcp", [slab.backend("n1p2", tcprr.PORT)])
        assert slab.cgroups is not None
        in_cgroup(s_client.netns, slab.cgroups.node(slab.node_name(1)))
        st.callback(in_cgroup, s_client.netns, None)

        kp = _kube_proxy_nodes(ctx, st, "sv", 2)
        b_backend_ip = kp.pods[1].ip
        ports = [ServicePort("bench", "svc", name, VIP, port, "tcp", ((b_backend_ip, target),))
                 for name, port, target in (("rr", RR_SERVICE_PORT, rr.PORT),
                                            ("iperf", IPERF_SERVICE_PORT, iperf.PORT),
                                            ("tcp-rr", tcprr.PORT, tcprr.PORT))]
        kp.api.create_all(kubeproxy.service_objects(ports))
        ready = kp.start_and_wait(ports, ports)
        kp_extra = {KP[m]: {**kp.extra(m), "ready_s": round(ready[m], 3)} for m in kp.nodes}
        ctx.progress(f"{POD_TO_SERVICE}: service {VIP} -> {backend.ip} (pcn lbrp) and -> "
                     f"{b_backend_ip} (kube-proxy in {', '.join(kp.nodes.values())}, rules in "
                     + ", ".join(f"{m} {s:.2f} s" for m, s in ready.items()) + ")")

        _servers(st, [(backend.netns, "pcn-backend"), (s_backend.netns, "pcn-socklb-backend"),
                      *((eps[1].netns, f"{KP[m]}-backend") for m, eps in kp.pods_by_mode.items())])
        clients = {PCN: Endpoint(client.netns, client.ip),
                   PCN_SOCKLB: Endpoint(s_client.netns, s_client.ip),
                   **{KP[m]: eps[0] for m, eps in kp.pods_by_mode.items()}}
        lat = _latency(ctx, POD_TO_SERVICE, clients, VIP, RR_SERVICE_PORT, ctx.requests)

        variants = [
            Variant(PCN, clients[PCN], Endpoint(backend.netns, backend.ip), dest=VIP,
                    dest_port=IPERF_SERVICE_PORT, extra={"path": "client pod -> ClusterIP "
                                                         "(lbrp) -> backend pod, one node"}),
            *(Variant(KP[m], eps[0], eps[1], dest=VIP, dest_port=IPERF_SERVICE_PORT,
                      extra={"path": f"client pod -> ClusterIP (kube-proxy {m} DNAT, Linux "
                                     "bridge) -> backend pod, one node", **kp_extra[KP[m]]})
              for m, eps in kp.pods_by_mode.items()),
            Variant(PCN_SOCKLB, clients[PCN_SOCKLB], Endpoint(s_backend.netns, s_backend.ip),
                    dest=VIP, dest_port=IPERF_SERVICE_PORT,
                    extra={"path": "client pod -> ClusterIP translated at connect() (cgroup "
                                   "sock_lb) -> backend pod, lbrp untouched, one node"}),
        ]
        results = ctx.compare(POD_TO_SERVICE, variants)
    return results + _latency_results(POD_TO_SERVICE, lat, extra=kp_extra)


def _scale_backends(i: int, n: int, subnet: ipaddress.IPv4Network,
                    real: list[str], real_port: int) -> tuple[tuple[str, int], ...]:
    """Backends of service i of n: the last one gets the real servers (on
    `real_port`), the others BACKENDS_PER_SERVICE unused addresses of the
    pod subnet (never reached)."""
    if i == n - 1:
        return tuple((ip, real_port) for ip in real)
    hosts = [FAKE_BACKENDS[(i + k) % len(FAKE_BACKENDS)] for k in range(BACKENDS_PER_SERVICE)]
    return tuple((str(subnet.network_address + h), rr.PORT) for h in hosts)


def _scale_port(i: int, vip: str, backends: tuple[tuple[str, int], ...]) -> ServicePort:
    return ServicePort("bench", f"svc-{i:05d}", "http", vip, RR_SERVICE_PORT, "tcp", backends)


def _lb_memlock(node: NodeDataplane) -> dict[str, int]:
    """Kernel memory of the node's service tables, bytes per map, as the
    kernel accounts it (the `memlock:` line of the map's fdinfo, which
    bpftool shows as memlock: for a preallocated hash its whole size, for
    lb_slots, not preallocated, its elements in use, Linux 6.4+)."""
    out = {}
    for name in LB_TABLES:
        fd = node.rt.table(name, "lbrp").get_fd()  # type: ignore[attr-defined]
        info = Path(f"/proc/self/fdinfo/{fd}").read_text()
        m = re.search(r"^memlock:\s*(\d+)", info, re.M)
        out[name] = int(m.group(1)) if m else -1
    return out


def _kube_proxy_cold_start(ctx: Context, kp: KubeProxyNodes, n: int, ports: list[ServicePort],
                           no_api: str = "") -> tuple[dict[str, float], dict[str, str]]:
    """Start each mode's kube-proxy that service-scale runs with `n`
    services (KP_MAX_SERVICES), one at a time, and wait for its rules for
    `ports` (the endpoints of the last one): seconds per mode, and the modes
    skipped with the reason (too many services for the mode, `no_api`: why
    the level's objects are not in the API, or a cold start past
    KP_COLD_START_TIMEOUT_S, after which it is stopped)."""
    ready: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for mode, proxy in kp.proxies.items():
        if no_api:
            skipped[mode] = no_api
            continue
        if n > KP_MAX_SERVICES[mode]:
            skipped[mode] = (f"not run with more than {KP_MAX_SERVICES[mode]} services "
                             f"(bench.services.KP_MAX_SERVICES)")
            continue
        proxy.start()
        try:
            ready[mode] = proxy.wait_programmed(ports, [ports[-1]],
                                                timeout=KP_COLD_START_TIMEOUT_S)
        except RuntimeError as exc:
            proxy.cleanup()
            skipped[mode] = (f"cold start not done within {KP_COLD_START_TIMEOUT_S:.0f} s "
                             f"(KP_COLD_START_TIMEOUT_S): {str(exc)[:300]}")
    for mode, why in skipped.items():
        ctx.progress(f"{SERVICE_SCALE}@{n}: {KP[mode]} skipped: {why}")
    return ready, skipped


def service_scale(ctx: Context) -> list[Result]:
    results: list[Result] = []
    with ExitStack() as st:
        lab = ctx.lab(st, nodes=1, pods=3)
        node = lab.node(1)
        pcn_net = ipaddress.IPv4Network(lab.pod_cidr(1))
        pcn_real = [lab.pods["n1p2"].ip, lab.pods["n1p3"].ip]
        kp = _kube_proxy_nodes(ctx, st, "ss", 3)
        kp_real = [kp.pods[1].ip, kp.pods[2].ip]
        level_ports = tuple(rr.PORT + k for k in range(len(ctx.scale)))
        _servers(st, [(lab.pods["n1p2"].netns, "pcn-1"), (lab.pods["n1p3"].netns, "pcn-2"),
                      *((e.netns, f"{KP[m]}-{k}") for m, eps in kp.pods_by_mode.items()
                        for k, e in enumerate(eps[1:], start=1))], level_ports)
        installed: list[str] = []
        in_api = 0  # services 0 .. in_api-1 exist in the API
        api_rate = 0.0  # objects per second the API server took at the last level
        api_given_up = ""  # why a level's objects were not all created: none after it
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
            backends = sum(len(s.backends) for s in node.lb.services.services.values())
            memlock = _lb_memlock(node)
            ctx.progress(f"{SERVICE_SCALE}@{n}: pcn installed {n} services, {backends} backends "
                         f"in {pcn_install:.2f} s (one batch); service tables' kernel memory "
                         + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in memlock.items()))
            # kube-proxy: stopped, tables emptied, the API brought to these N services,
            # then a cold start timed until its rules hold all of them
            for proxy in kp.proxies.values():
                proxy.cleanup()
            ports = [_scale_port(i, vip, _scale_backends(i, n, BRIDGE_NET, kp_real, real_port))
                     for i, vip in enumerate(vips)]
            api_s: float | None = None
            new = len(ports) - in_api
            expected = 2 * new / api_rate if api_rate else 0.0
            no_api = api_given_up or ("" if expected <= API_CREATE_BUDGET_S else (
                f"creating {new} Services + EndpointSlices in the bench API server would take "
                f"~{expected / 60:.0f} min at the {api_rate:.0f} objects/s of the previous level "
                f"(API_CREATE_BUDGET_S {API_CREATE_BUDGET_S:.0f} s)"))
            if not no_api and any(n <= KP_MAX_SERVICES[m] for m in kp.proxies):
                if in_api:  # the previous level's last service: back to unused backends
                    prev = ports[in_api - 1]
                    kp.api.request("PATCH", f"/apis/discovery.k8s.io/v1/namespaces/bench/"
                                   f"endpointslices/{prev.name}-bench",
                                   kubeproxy.endpoint_slice("bench", prev.name,
                                                            [ip for ip, _ in prev.endpoints],
                                                            [("http", prev.endpoints[0][1],
                                                              "tcp")]),
                                   content_type="application/merge-patch+json")
                try:
                    api_s = kp.api.create_all(
                        kubeproxy.service_objects(ports[in_api:]), workers=API_WORKERS,
                        budget_s=API_CREATE_BUDGET_S,
                        progress=lambda done, total, secs, n=n: ctx.progress(
                            f"{SERVICE_SCALE}@{n}: {done}/{total} API objects created in "
                            f"{secs:.0f} s ({done / secs:.0f}/s)"))
                except kubeproxy.CreateBudgetExceeded as exc:
                    # the API holds part of this level: no kube-proxy here or above
                    no_api = api_given_up = (
                        f"creating the Services + EndpointSlices of {n} services in the bench "
                        f"API server was stopped: {exc} (API_CREATE_BUDGET_S "
                        f"{API_CREATE_BUDGET_S:.0f} s)")
                else:
                    api_rate = 2 * new / api_s if new >= 1000 else api_rate  # small: noise
                    in_api = n
                    ctx.progress(f"{SERVICE_SCALE}@{n}: {new} Services + EndpointSlices created "
                                 f"in the API in {api_s:.1f} s ({API_WORKERS} connections; not "
                                 "part of any figure)")
            ready, skipped = _kube_proxy_cold_start(ctx, kp, n, ports, no_api)
            counts = {m: kubeproxy.rule_count(kp.nodes[m], m) for m in ready}
            ctx.progress(f"{SERVICE_SCALE}@{n}: kube-proxy cold start to rules "
                         + (", ".join(f"{m} {ready[m]:.2f} s ({counts[m]} rules)" for m in ready)
                            or "none run") + f"; measuring {vips[-1]}")
            clients = {PCN: Endpoint(lab.pods["n1p1"].netns, lab.pods["n1p1"].ip),
                       **{KP[m]: kp.pods_by_mode[m][0] for m in ready}}
            lat = _latency(ctx, f"{SERVICE_SCALE}@{n}", clients, vips[-1], RR_SERVICE_PORT,
                           ctx.requests)
            level = {"services": n, "vip": vips[-1], "target_port": real_port}
            extra: dict[str, dict[str, object]] = {
                PCN: {**level, "backends": backends},
                **{KP[m]: {**level, "rules": counts[m], "kube_proxy": kp.version, "mode": m}
                   for m in ready}}
            results += _latency_results(SERVICE_SCALE, lat, f"@{n}", extra)
            api = {} if api_s is None else {"api_objects_created_s": round(api_s, 1)}
            results.append(Result(SERVICE_SCALE, PCN, f"install@{n}", pcn_install * 1000, "ms",
                                  {"services": n, "backends": backends, "date": now_iso(),
                                   "how": "NodeDataplane.set_service x N in one node.batch()",
                                   "map_memlock_bytes": memlock}))
            for m, secs in ready.items():
                results.append(Result(SERVICE_SCALE, KP[m], f"install@{n}", secs * 1000, "ms",
                                      {"services": n, "date": now_iso(), **api,
                                       "how": "kube-proxy cold start (N Services and "
                                              "EndpointSlices in the API) until its rules hold "
                                              "all N"}))
            for m, why in skipped.items():
                results.append(Result(SERVICE_SCALE, KP[m], f"skipped@{n}", 0, "",
                                      {"services": n, "reason": why, "date": now_iso()}))
    return results


SCENARIOS = {POD_TO_SERVICE: pod_to_service, SERVICE_SCALE: service_scale}
