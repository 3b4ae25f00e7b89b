"""The reconciler: Kubernetes objects in, the node's desired data plane out.

Pure: no kernel, no API server, no clock. `desired_state()` turns what the
agent has seen (Nodes, this node's Pods and attachments, Services,
EndpointSlices, NetworkFunctions, CubeChains, NodePortRules, and for network
policies every Pod, Namespace, NetworkPolicy and ClusterNetworkPolicy) into a `Desired`
state plus a status verdict per custom resource; `plan()` lists the
data-plane operations that move one Desired state to another, in an order
that never leaves a chain pointing at a missing cube.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import ValidationError

from pcn_agent.control.settings import ClusterSettings
from pcn_agent.dataplane import maps
from pcn_agent.dataplane.cubes.custom import CustomSettings, runtime_type
from pcn_agent.dataplane.cubes.functions import FUNCTION_CUBES
from pcn_agent.dataplane.cubes.lbrp import Backend
from pcn_agent.dataplane.cubes.policer import TYPE as POLICER
from pcn_agent.dataplane.cubes.policer import PolicerSettings
from pcn_agent.node.wiring import PeerNode
from pcn_crds import CubeChain, NetworkFunction, NodePortRule
from pcn_crds.common import Resource
from pcn_crds.cubetype import Param, config_errors, config_values
from pcn_crds.quantity import EGRESS_ANNOTATION, INGRESS_ANNOTATION, QuantityError, bandwidth_bits
from pcn_policy import compiler as netpol
from pcn_policy.rules import AddressSet, PodPolicy, used_sets

Obj = Mapping[str, Any]
ServiceKey = tuple[str, int, str]  # (virtual IP, port, protocol)
NodePortKey = tuple[int, str]  # (port, protocol)
ObjectKey = tuple[str, str, str]  # (kind, namespace or "", name)
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MAX_STACKED = maps.CHAIN_MAX - 2  # the lbrp and the policy cube take one place on each side
R = TypeVar("R", bound=Resource)


@dataclass(frozen=True)
class ServiceSpec:
    """A ClusterIP service port as this node serves it: the backends of its
    new connections, ClientIP affinity (0: none), and what a connection
    with no backend gets: rejected, or dropped (`drop_if_empty`) when the
    Service has endpoints only on other nodes and its internalTrafficPolicy
    is Local (kube-proxy's "drop" verdict for "no local endpoints")."""

    backends: tuple[Backend, ...]
    affinity_timeout_s: int = 0
    drop_if_empty: bool = False


@dataclass(frozen=True)
class NodePortSpec:
    """A NodePort: its externalTrafficPolicy, the Service's Cluster endpoints
    (what pods and the node get, and outside clients under Cluster), and
    under Local this node's endpoints (`local`; None: the backends in this
    node's pod CIDR, for NodePortRules that list addresses)."""

    policy: str
    backends: tuple[Backend, ...]
    local: tuple[Backend, ...] | None = None
    affinity_timeout_s: int = 0  # the Service's ClientIP session affinity (0: none)


@dataclass(frozen=True)
class FunctionSpec:
    """A function cube as this node runs it: its type (a key of
    FUNCTION_CUBES) and its settings, the frozen form of its validated config
    (FunctionCube.settings_of: FirewallSettings, PolicerSettings...)."""

    type: str
    settings: Hashable


@dataclass(frozen=True)
class CubeTypeInfo:
    """A CubeType as this node's agent holds it (control.cubetypes): whether
    a version of it is compiled and in its program slot (`ready`), that
    version's parameters and counters, and whether the object is gone
    (`deleted`: its cubes stay as they were until their functions go)."""

    ready: bool
    params: tuple[Param, ...] = ()
    counters: tuple[str, ...] = ()
    deleted: bool = False
    message: str = ""


@dataclass(frozen=True)
class ServicesDelta:
    """A Desired's `services` equals `base` (an earlier Desired's services
    mapping: that very object) but at `keys` (ServiceIndex knows which keys
    a pass touched): plan() then compares only those when the applied
    state is known to equal `base` (see plan's `applied`)."""

    base: Mapping[ServiceKey, ServiceSpec]
    keys: frozenset[ServiceKey]


@dataclass(frozen=True)
class Desired:
    peers: frozenset[PeerNode] = frozenset()
    services: Mapping[ServiceKey, ServiceSpec] = field(default_factory=dict)
    nodeports: Mapping[NodePortKey, NodePortSpec] = field(default_factory=dict)
    functions: Mapping[str, FunctionSpec] = field(default_factory=dict)  # by cube name
    chains: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = field(default_factory=dict)
    # network policies: by attachment key, the pods some policy applies to
    # (the policy cube is stacked on their ports), and the address sets
    # their rules refer to, by name
    policies: Mapping[str, PodPolicy] = field(default_factory=dict)
    address_sets: Mapping[str, AddressSet] = field(default_factory=dict)
    services_delta: ServicesDelta | None = field(default=None, compare=False)


@dataclass
class Verdict:
    """This node's view of one custom resource."""

    ready: bool = True
    reason: str = "Realized"
    message: str = ""
    pods: int = 0

    def fail(self, reason: str, message: str) -> None:
        if self.ready:  # the first problem is the one worth reporting
            self.ready, self.reason, self.message = False, reason, message


@dataclass(frozen=True)
class HealthCheck:
    """A Service's healthCheckNodePort on this node: its namespace and name
    and how many of its endpoints on this node are ready."""

    namespace: str
    name: str
    local_endpoints: int


@dataclass
class Result:
    desired: Desired
    verdicts: dict[ObjectKey, Verdict]
    derived_rules: dict[str, dict[str, Any]]  # NodePortRule name -> object to create
    # The last version of each NetworkFunction and CubeChain that was valid:
    # the agent hands it back as Inputs.last_good on the next pass.
    last_good: dict[ObjectKey, Obj] = field(default_factory=dict)
    # healthCheckNodePort -> what this node's kube-proxy-like health server
    # answers there (see health_checks_of)
    health_checks: dict[int, HealthCheck] = field(default_factory=dict)
    # Pods of this node whose bandwidth annotation is invalid, (namespace,
    # name) -> why; they run without that limit (bandwidth_of)
    bandwidth_errors: dict[tuple[str, str], str] = field(default_factory=dict)


@dataclass
class Inputs:
    node: str
    settings: ClusterSettings
    nodes: list[Obj] = field(default_factory=list)
    pods: list[Obj] = field(default_factory=list)  # Pods scheduled on this node
    attachments: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # key -> (ns, name)
    services: list[Obj] = field(default_factory=list)
    endpointslices: list[Obj] = field(default_factory=list)
    functions: list[Obj] = field(default_factory=list)
    chains: list[Obj] = field(default_factory=list)
    nodeportrules: list[Obj] = field(default_factory=list)
    # network policies: peers are pods of every node in every namespace
    all_pods: list[Obj] = field(default_factory=list)
    namespaces: list[Obj] = field(default_factory=list)
    networkpolicies: list[Obj] = field(default_factory=list)
    clusternetworkpolicies: list[Obj] = field(default_factory=list)
    # The node's policy cube tracks its pods' connections now (the agent's
    # last applied state has pod policies): tracking then goes on even when
    # the last policy goes (see policies_of)
    tracking: bool = False
    # CubeTypes by name, as compiled on this node (control.cubetypes)
    cubetypes: Mapping[str, CubeTypeInfo] = field(default_factory=dict)
    # Fail closed: an object whose new version is invalid keeps the last valid
    # one in force (Result.last_good of the previous pass), reported not Ready.
    last_good: Mapping[ObjectKey, Obj] = field(default_factory=dict)
    # The agent's ServiceIndex: the Services' entries moved on from its last
    # pass instead of computed from nothing (the same result, see
    # service_tables); None: from nothing.
    service_index: ServiceIndex | None = None


def cube_name(namespace: str, name: str) -> str:
    return f"nf.{namespace}.{name}"


def _meta(o: Obj) -> Mapping[str, Any]:
    return o.get("metadata") or {}


def _ns_name(o: Obj) -> tuple[str, str]:
    m = _meta(o)
    return m.get("namespace") or "", m.get("name") or ""


# ----------------------------------------------------------------------------- nodes
def node_addresses(node: Obj) -> tuple[str | None, str | None]:
    """(InternalIP, podCIDR) of a Node, either possibly missing."""
    ip = None
    for a in (node.get("status") or {}).get("addresses") or []:
        if a.get("type") == "InternalIP":
            try:
                ip = str(ipaddress.IPv4Address(a.get("address")))
                break
            except ValueError:
                continue
    cidr = (node.get("spec") or {}).get("podCIDR")
    return ip, cidr


def vtep_for(settings: ClusterSettings, pod_cidr: str, annotations: Mapping[str, str]) -> str:
    """A node's overlay address: the annotation pcn.dev/vtep, else derived from
    the index of its pod CIDR inside the cluster pod CIDR (stable, no
    coordination needed): index i is the range's address i, except index 0,
    whose address would be the range's network address: it gets the range's
    last host address. kube-controller-manager's range allocator hands out
    index 0 (10.244.0.0/24) first, to the first node that registers (a real
    cluster's control plane, usually). Raises ValueError for a pod CIDR
    outside the cluster's or an index the range has no address for."""
    if annotations.get("pcn.dev/vtep"):
        return str(ipaddress.IPv4Address(annotations["pcn.dev/vtep"]))
    cluster = ipaddress.IPv4Network(settings.podCIDR)
    net = ipaddress.IPv4Network(pod_cidr)
    if not net.subnet_of(cluster):
        raise ValueError(f"pod CIDR {pod_cidr} is not inside the cluster's {cluster} "
                         "(ConfigMap podCIDR, kube-controller-manager's --cluster-cidr)")
    index = (int(net.network_address) - int(cluster.network_address)) >> (32 - net.prefixlen)
    vteps = ipaddress.IPv4Network(settings.vtepsRange)
    if not 0 <= index < vteps.num_addresses - 2:
        raise ValueError(f"pod CIDR {pod_cidr} gives VTEP index {index}, outside {vteps}")
    if index == 0:
        return str(vteps.broadcast_address - 1)
    return str(vteps.network_address + index)


def peers_of(inputs: Inputs) -> frozenset[PeerNode]:
    """Every node with an InternalIP and a spec.podCIDR (this one too: the
    wiring skips it), with its VTEP address over VXLAN (a node whose VTEP
    cannot be derived is left out, see vtep_for) and none ("") with direct
    routing, where the node IP is the next hop (wiring.peer_routes)."""
    out = set()
    vxlan = inputs.settings.overlay == "vxlan"
    for n in inputs.nodes:
        ip, cidr = node_addresses(n)
        if not ip or not cidr:
            continue  # not ready for the overlay yet
        vtep = ""
        if vxlan:
            try:
                vtep = vtep_for(inputs.settings, cidr, _meta(n).get("annotations") or {})
            except ValueError:
                continue
        out.add(PeerNode(_meta(n).get("name", ""), ip, cidr, vtep))
    return frozenset(out)


# ----------------------------------------------------------------------------- services
def _conditions(endpoint: Obj) -> tuple[bool, bool]:
    """(ready, serving-and-terminating) of an EndpointSlice endpoint. The API
    reads a nil ready or serving as true and a nil terminating as false
    (discovery.k8s.io/v1 EndpointConditions)."""
    c = endpoint.get("conditions") or {}
    ready = c.get("ready") is not False
    serving = c.get("serving") is not False
    return ready, serving and c.get("terminating") is True


# Labels that take a Service (and its EndpointSlices) away from the default
# service proxy: kube-proxy watches both with the selector
# "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless".
IGNORE_LABELS = ("service.kubernetes.io/service-proxy-name", "service.kubernetes.io/headless")


def proxied(svc: Obj) -> bool:
    """Whether pcn, as the cluster's default service proxy, programs `svc`:
    not when another proxy claims it, not headless, not ExternalName
    (kube-proxy's ShouldSkipService and informer selector)."""
    labels = _meta(svc).get("labels") or {}
    if any(k in labels for k in IGNORE_LABELS):
        return False
    return (svc.get("spec") or {}).get("type") != "ExternalName"


def cluster_ipv4(svc: Obj) -> str | None:
    """The Service's IPv4 cluster IP: from spec.clusterIPs (dual-stack lists
    the primary family first, which may be IPv6), else spec.clusterIP; None
    for headless ("None") or IPv6-only Services."""
    spec = svc.get("spec") or {}
    candidates = list(spec.get("clusterIPs") or []) or [spec.get("clusterIP")]
    return next(iter(_ipv4s(candidates)), None)


def _ipv4s(values: Iterable[Any]) -> list[str]:
    """The IPv4 addresses among `values`, in order (IPv6, "None" and
    malformed ones left out)."""
    out = []
    for ip in values:
        try:
            if isinstance(ip, str) and ipaddress.ip_address(ip).version == 4:
                out.append(ip)
        except ValueError:
            continue
    return out


@dataclass(frozen=True)
class Endpoint:
    """One IPv4 endpoint of a Service port, from an EndpointSlice."""

    backend: Backend
    ready: bool
    serving_terminating: bool
    node: str | None  # its nodeName, if the slice says


@dataclass(frozen=True)
class Categorized:
    """A Service port's endpoints by traffic policy (see categorize)."""

    cluster: tuple[Backend, ...]
    local: tuple[Backend, ...]
    has_any: bool


def categorize(endpoints: Iterable[Endpoint], node: str) -> Categorized:
    """kube-proxy's CategorizeEndpoints (pkg/proxy/topology.go) without
    topology-aware hints, for node `node`:

    * cluster: the ready endpoints or, while none is ready, the serving and
      terminating ones (KEP-1669);
    * local: the ready endpoints whose nodeName is `node` or, while none of
      those is ready, its serving and terminating ones (the fall-back is
      decided for the node's own endpoints alone);
    * has_any: whether any endpoint anywhere is ready or serving and
      terminating: with none, a connection is rejected; with some, but none
      that a Local policy may use here, dropped (KEP-2086, and
      pkg/proxy/nftables/proxier.go's "drop" for "no local endpoints").

    Backends come sorted by (ip, port), one per address and port."""
    eps = list(endpoints)

    def pick(usable: list[Endpoint]) -> tuple[Backend, ...]:
        ready = [e for e in usable if e.ready]
        chosen = ready or [e for e in usable if e.serving_terminating]
        out = {(e.backend.ip, e.backend.port): e.backend for e in chosen}
        return tuple(sorted(out.values(), key=lambda b: (b.ip, b.port)))

    return Categorized(cluster=pick(eps), local=pick([e for e in eps if e.node == node]),
                       has_any=any(e.ready or e.serving_terminating for e in eps))


def service_backends(svc: Obj, port: Obj, slices: Iterable[Obj]) -> tuple[Backend, ...]:
    """The IPv4 endpoints of one Service port that take new connections (its
    Cluster endpoints), from its EndpointSlices: the ready ones, or, when
    none is ready, the serving and terminating ones (KEP-1669)."""
    return categorize(service_endpoints(svc, port, slices), "").cluster


def service_endpoints(svc: Obj, port: Obj, slices: Iterable[Obj]) -> list[Endpoint]:
    """Every IPv4 endpoint of one Service port in its EndpointSlices, with its
    conditions and node; an address and port listed twice counts once (ready
    if either says so; else the last, reading the slices in name order:
    kube-proxy reads them in no defined order, pkg/proxy/endpointslicecache.go,
    and an endpoint moving between slices shows in both for a while)."""
    ns, name = _ns_name(svc)
    pname = port.get("name") or ""
    proto = (port.get("protocol") or "TCP").upper()
    found: dict[tuple[str, int], Endpoint] = {}
    slices = list(slices)
    if len(slices) > 1:
        slices.sort(key=lambda s: _meta(s).get("name") or "")
    for s in slices:
        sns, _ = _ns_name(s)
        labels = _meta(s).get("labels") or {}
        if sns != ns or labels.get(SERVICE_NAME_LABEL) != name:
            continue
        if any(k in labels for k in IGNORE_LABELS):
            continue  # not the default proxy's (see slices_by_service)
        if s.get("addressType", "IPv4") != "IPv4":
            continue
        target = None
        for sp in s.get("ports") or []:
            if (sp.get("name") or "") == pname and (sp.get("protocol") or "TCP").upper() == proto:
                target = sp.get("port")
        if not target:
            continue
        for ep in s.get("endpoints") or []:
            is_ready, serving_terminating = _conditions(ep)
            node = ep.get("nodeName")
            for addr in ep.get("addresses") or []:
                try:
                    ipaddress.IPv4Address(addr)
                except ValueError:
                    continue
                key = (addr, int(target))
                if key in found and found[key].ready:
                    continue
                found[key] = Endpoint(Backend(addr, int(target)), is_ready,
                                      serving_terminating, node)
    return list(found.values())


def _affinity(svc: Obj) -> int:
    spec = svc.get("spec") or {}
    if spec.get("sessionAffinity") != "ClientIP":
        return 0
    cfg = ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {})
    return int(cfg.get("timeoutSeconds") or 10800)


def derived_rule_name(svc: Obj, port: Obj) -> str:
    ns, name = _ns_name(svc)
    proto = (port.get("protocol") or "TCP").lower()
    return f"svc-{ns}-{name}-{port.get('nodePort')}-{proto}"


def slices_by_service(slices: Iterable[Obj]) -> dict[tuple[str, str], list[Obj]]:
    """EndpointSlices grouped by (namespace, kubernetes.io/service-name), in
    their order: what service_backends() would pick for each Service, found
    once per pass instead of once per Service port (O(services x slices)).
    Slices labelled for another proxy or headless are left out, as
    kube-proxy's EndpointSlice informer leaves them out (the same selector
    as for Services: a slice labelled headless later takes its endpoints
    away from a Service that has no selector)."""
    out: dict[tuple[str, str], list[Obj]] = {}
    for s in slices:
        labels = _meta(s).get("labels") or {}
        name = labels.get(SERVICE_NAME_LABEL)
        if name is not None and not any(k in labels for k in IGNORE_LABELS):
            out.setdefault((_ns_name(s)[0], name), []).append(s)
    return out


def cluster_ip_spec(svc: Obj, cat: Categorized) -> ServiceSpec:
    """A Service port's ClusterIP on this node. internalTrafficPolicy Local
    (KEP-2086): the endpoints on this node only, and with none here while
    other nodes have some, dropped rather than rejected (kube-proxy)."""
    if ((svc.get("spec") or {}).get("internalTrafficPolicy") or "Cluster") == "Local":
        return ServiceSpec(cat.local, _affinity(svc), drop_if_empty=cat.has_any and not cat.local)
    return ServiceSpec(cat.cluster, _affinity(svc))


def external_ipv4s(svc: Obj) -> list[str]:
    """The Service's IPv4 spec.externalIPs (others and malformed ones left out)."""
    return _ipv4s((svc.get("spec") or {}).get("externalIPs") or [])


def external_ip_spec(svc: Obj, cat: Categorized) -> ServiceSpec:
    """A Service port at one of its externalIPs, for the pods and the node
    that reach it: every Cluster endpoint whatever the traffic policies
    (kube-proxy short-circuits cluster-internal traffic to an external
    destination past externalTrafficPolicy, and internalTrafficPolicy is the
    ClusterIP's only), with the Service's ClientIP affinity."""
    return ServiceSpec(cat.cluster, _affinity(svc))


def nodeport_spec(policy: str, cat: Categorized, affinity_timeout_s: int = 0) -> NodePortSpec:
    """A NodePort: all the Cluster endpoints (for pods and the node, which
    kube-proxy short-circuits past externalTrafficPolicy, and for outside
    clients under Cluster) and, under Local, this node's; with the Service's
    ClientIP session affinity, which kube-proxy applies to NodePorts too."""
    return NodePortSpec(policy, cat.cluster, cat.local if policy == "Local" else None,
                        affinity_timeout_s)


@dataclass(frozen=True)
class ServiceEntries:
    """What one Service object puts in the node's tables, as services_of()
    writes them, in order:

    * services: (key, spec, overwrite) per ClusterIP and externalIP entry;
      a ClusterIP entry (overwrite True) replaces what an earlier Service
      put at its key, an externalIP one only fills a key still free (a
      ClusterIP is the API server's to allocate: no Service may take it);
    * nodeports, derived (NodePortRule name -> object), health
      (healthCheckNodePort -> HealthCheck): replacing what was there.

    Equal entries mean an equal contribution: ServiceIndex recomputes only
    the keys of a Service whose entries changed."""

    services: tuple[tuple[ServiceKey, ServiceSpec, bool], ...] = ()
    nodeports: tuple[tuple[NodePortKey, NodePortSpec], ...] = ()
    derived: tuple[tuple[str, dict[str, Any]], ...] = ()
    health: tuple[tuple[int, HealthCheck], ...] = ()


NO_ENTRIES = ServiceEntries()


def service_entries(svc: Obj, slices: Iterable[Obj], node: str) -> ServiceEntries:
    """One Service's ClusterIP, externalIP and NodePort entries as node
    `node` serves them, the NodePortRules describing its NodePorts, and its
    healthCheckNodePort (see services_of and health_checks_of); `slices`
    are its EndpointSlices (slices_by_service). Nothing for a Service pcn
    does not proxy (proxied)."""
    if not proxied(svc):
        return NO_ENTRIES
    spec = svc.get("spec") or {}
    vip = cluster_ipv4(svc)
    policy = spec.get("externalTrafficPolicy") or "Cluster"
    slices = list(slices)
    services: list[tuple[ServiceKey, ServiceSpec, bool]] = []
    nodeports: list[tuple[NodePortKey, NodePortSpec]] = []
    derived: list[tuple[str, dict[str, Any]]] = []
    health_port = spec.get("healthCheckNodePort") if policy == "Local" else None
    local: set[str] = set()
    for port in spec.get("ports") or []:
        eps = service_endpoints(svc, port, slices)
        if health_port:
            local.update(e.backend.ip for e in eps if e.ready and e.node == node)
        proto = (port.get("protocol") or "TCP").lower()
        if proto not in ("tcp", "udp"):
            continue
        cat = categorize(eps, node)
        if vip is not None and "port" in port:
            services.append(((vip, int(port["port"]), proto), cluster_ip_spec(svc, cat), True))
        if "port" in port:
            for ext in external_ipv4s(svc):
                services.append(((ext, int(port["port"]), proto), external_ip_spec(svc, cat),
                                 False))
        if spec.get("type") in ("NodePort", "LoadBalancer") and port.get("nodePort"):
            nodeports.append(((int(port["nodePort"]), proto),
                              nodeport_spec(policy, cat, _affinity(svc))))
            derived.append((derived_rule_name(svc, port), _derived_rule(svc, port, policy)))
    health: tuple[tuple[int, HealthCheck], ...] = ()
    if health_port:
        ns, name = _ns_name(svc)
        health = ((int(health_port), HealthCheck(ns, name, len(local))),)
    return ServiceEntries(tuple(services), tuple(nodeports), tuple(derived), health)


@dataclass
class ServiceTables:
    """Every proxied Service's entries merged (services_of, health_checks_of)."""

    services: dict[ServiceKey, ServiceSpec] = field(default_factory=dict)
    nodeports: dict[NodePortKey, NodePortSpec] = field(default_factory=dict)
    derived: dict[str, dict[str, Any]] = field(default_factory=dict)
    health: dict[int, HealthCheck] = field(default_factory=dict)
    # ServiceIndex: how `services` differs from what its previous call gave
    delta: ServicesDelta | None = field(default=None, compare=False)

    def add(self, e: ServiceEntries) -> None:
        """Write one Service's entries over what the Services before it wrote."""
        for key, spec, overwrite in e.services:
            if overwrite or key not in self.services:
                self.services[key] = spec
        self.nodeports.update(e.nodeports)
        self.derived.update(e.derived)
        self.health.update(e.health)


def service_tables(inputs: Inputs,
                   by_service: Mapping[tuple[str, str], list[Obj]] | None = None
                   ) -> ServiceTables:
    """Every Service's entries (service_entries) merged, from nothing: the
    Services taken in (namespace, name) order, so that where two claim one
    key (a Service's externalIP that is another's ClusterIP, say) the
    outcome does not depend on the order the agent saw them in. With
    `inputs.service_index`, the same result moved on from the last call
    (ServiceIndex)."""
    if inputs.service_index is not None and by_service is None:
        return inputs.service_index.tables(inputs.services, inputs.endpointslices, inputs.node)
    if by_service is None:
        by_service = slices_by_service(inputs.endpointslices)
    out = ServiceTables()
    for svc in sorted(inputs.services, key=_ns_name):
        out.add(service_entries(svc, by_service.get(_ns_name(svc), ()), inputs.node))
    return out


def services_of(inputs: Inputs, by_service: Mapping[tuple[str, str], list[Obj]] | None = None
                ) -> tuple[dict[ServiceKey, ServiceSpec], dict[NodePortKey, NodePortSpec],
                           dict[str, dict[str, Any]]]:
    """ClusterIP, externalIP and NodePort entries of every Service pcn
    proxies, as this node (inputs.node) serves them, and the NodePortRules that describe its
    NodePorts. ClusterIP, NodePort and LoadBalancer Services all get their
    ClusterIP; NodePort and LoadBalancer ones (no load-balancer controller
    needed) their node ports too, unless allocateLoadBalancerNodePorts left a
    port without one."""
    t = service_tables(inputs, by_service)
    return t.services, t.nodeports, t.derived


def health_checks_of(inputs: Inputs,
                     by_service: Mapping[tuple[str, str], list[Obj]] | None = None
                     ) -> dict[int, HealthCheck]:
    """The healthCheckNodePorts this node serves, as kube-proxy's service
    health server does (pkg/proxy/healthcheck): for every Service it proxies
    with externalTrafficPolicy Local and a spec.healthCheckNodePort (the API
    server allocates one for LoadBalancer Services), the number of its
    endpoints on this node that are ready (serving but terminating ones do
    not count: a load balancer must stop sending new connections here,
    KEP-1669)."""
    return service_tables(inputs, by_service).health


class ServiceIndex:
    """service_tables() over successive states of one cluster, as an agent
    computes them after each change: only the Services whose object or
    EndpointSlices changed since the last call are computed again
    (service_entries), and only the keys their entries touch are merged
    again; what comes out equals service_tables() from nothing
    (tests/test_service_incremental.py compares them over random changes).

    A change is a new object: the agent's store holds a new dict for every
    watch event, and the index tells objects apart by identity, holding a
    reference to each object it has seen (so no identity is reused while
    it matters). Inputs.services must hold one object per (namespace,
    name), as the agent's store does. A Service's entries are computed from
    its slices in name order (service_endpoints), so the order of the lists
    does not matter.

    Two ways to learn what changed: by default tables() compares the lists
    it is given with the last ones (set differences of identities: C speed,
    but O(objects) a call, ~30 % of the agent's CPU per change at 10 000
    Services in a py-spy profile); in journal mode (after the first
    observe()) the caller tells it every change as it stores it and
    tables() takes only those, whatever the lists hold. Either way the
    cost is then the changed Services' own work.

    Not thread-safe: one caller (the agent's reconcile loop)."""

    def __init__(self) -> None:
        self.journal = False  # observe() was called: the lists are not looked at
        # journal mode: the objects now by (namespace, name), and what changed
        # since the last tables(): identities gone, objects new
        self._at: dict[str, dict[tuple[str, str], Obj]] = {"Service": {}, "EndpointSlice": {}}
        self._gone: dict[str, set[int]] = {"Service": set(), "EndpointSlice": set()}
        self._new: dict[str, dict[int, Obj]] = {"Service": {}, "EndpointSlice": {}}
        self._reset(None)
        self.recomputed = 0  # Services computed again by the last call (for tests, metrics)

    def observe(self, kind: str, key: tuple[str, str], obj: Obj | None) -> None:
        """Journal mode: object `key` of `kind` ("Service" or "EndpointSlice")
        is now `obj` (None: deleted). From the first call on, every change
        must be told, as the agent's store sees it; tables() then ignores
        its lists. Raises ValueError for another kind."""
        if kind not in self._at:
            raise ValueError(f"ServiceIndex keeps Services and EndpointSlices, not {kind}")
        self.journal = True
        at, new = self._at[kind], self._new[kind]
        old = at.pop(key, None)
        if old is not None and new.pop(id(old), None) is None:
            self._gone[kind].add(id(old))  # applied by an earlier tables(): it goes
        if obj is not None:
            at[key] = obj
            new[id(obj)] = obj

    def _reset(self, node: str | None) -> None:
        self.node = node
        self._svcs: dict[int, Obj] = {}  # id -> Service object
        self._svc_key: dict[int, tuple[str, str]] = {}
        self._by_name: dict[tuple[str, str], set[int]] = {}
        self._slices: dict[int, Obj] = {}  # id -> EndpointSlice object
        self._owner: dict[int, tuple[str, str] | None] = {}  # slice id -> (namespace, service)
        self._slices_of: dict[tuple[str, str], dict[int, Obj]] = {}
        self._entries: dict[int, ServiceEntries] = {}
        self._out = ServiceTables()
        self._given: dict[ServiceKey, ServiceSpec] | None = None  # the last call's services
        # key -> ids of the Services whose entries name it
        self._who: tuple[dict[Any, set[int]], ...] = ({}, {}, {}, {})

    def tables(self, services: Iterable[Obj], slices: Iterable[Obj], node: str) -> ServiceTables:
        """The merged entries of `services` with `slices`, for node `node`
        (a new node starts from nothing). The dicts returned are the
        caller's: later calls do not change them."""
        if node != self.node:
            self._reset(node)
            for kind, at in self._at.items():  # journal mode: all there is, anew
                self._gone[kind] = set()
                self._new[kind] = {id(o): o for o in at.values()}
        gone_s: Iterable[int]
        gone_l: Iterable[int]
        if self.journal:
            gone_s, new_s = self._gone["Service"], self._new["Service"]
            gone_l, new_l = self._gone["EndpointSlice"], self._new["EndpointSlice"]
            self._gone = {"Service": set(), "EndpointSlice": set()}
            self._new = {"Service": {}, "EndpointSlice": {}}
        else:
            cur_s = {id(o): o for o in services}
            cur_l = {id(o): o for o in slices}
            gone_s, gone_l = self._svcs.keys() - cur_s.keys(), self._slices.keys() - cur_l.keys()
            new_s = {i: cur_s[i] for i in cur_s.keys() - self._svcs.keys()}
            new_l = {i: cur_l[i] for i in cur_l.keys() - self._slices.keys()}
        dirty: set[int] = set()  # Services to compute again
        touched: tuple[set[Any], ...] = (set(), set(), set(), set())  # keys to merge again
        for i in gone_s:
            self._retract(i, touched)
            del self._entries[i]
            key = self._svc_key.pop(i)
            del self._svcs[i]
            ids = self._by_name[key]
            ids.discard(i)
            if not ids:
                del self._by_name[key]
        for i in gone_l:
            owner = self._owner.pop(i)
            del self._slices[i]
            if owner is not None:
                of = self._slices_of[owner]
                del of[i]
                if not of:
                    del self._slices_of[owner]
                dirty.update(self._by_name.get(owner, ()))
        for i, s in new_l.items():
            self._slices[i] = s
            labels = _meta(s).get("labels") or {}
            name = labels.get(SERVICE_NAME_LABEL)
            owner = (_ns_name(s)[0], name) \
                if name is not None and not any(k in labels for k in IGNORE_LABELS) else None
            self._owner[i] = owner
            if owner is not None:
                self._slices_of.setdefault(owner, {})[i] = s
                dirty.update(self._by_name.get(owner, ()))
        for i, svc in new_s.items():
            key = _ns_name(svc)
            self._svcs[i] = svc
            self._svc_key[i] = key
            self._by_name.setdefault(key, set()).add(i)
            self._entries[i] = NO_ENTRIES
            dirty.add(i)
        self.recomputed = len(dirty)
        for i in dirty:
            new = service_entries(self._svcs[i], self._slices_of.get(self._svc_key[i], {}).values(),
                                  node)
            if new == self._entries[i]:
                continue
            self._retract(i, touched)
            self._entries[i] = new
            for t, (who, keys) in enumerate(zip(self._who, _entry_keys(new), strict=True)):
                for k in keys:
                    who.setdefault(k, set()).add(i)
                    touched[t].add(k)
        out = self._out
        tables: tuple[dict[Any, Any], ...] = (out.services, out.nodeports, out.derived,
                                              out.health)
        for t, table in enumerate(tables):
            for k in touched[t]:
                self._merge(t, table, k)
        given = dict(out.services)
        delta = ServicesDelta(self._given, frozenset(touched[0])) \
            if self._given is not None else None
        self._given = given
        return ServiceTables(given, dict(out.nodeports), dict(out.derived),
                             dict(out.health), delta)

    def _retract(self, i: int, touched: tuple[set[Any], ...]) -> None:
        """Take Service `i`'s entries out of the key -> Services record."""
        for t, (who, keys) in enumerate(zip(self._who, _entry_keys(self._entries[i]),
                                            strict=True)):
            for k in keys:
                ids = who.get(k)
                if ids is not None:
                    ids.discard(i)
                    if not ids:
                        del who[k]
                touched[t].add(k)

    def _merge(self, t: int, table: dict[Any, Any], k: Any) -> None:
        """Key `k` of table `t` again from the Services that name it, in
        (namespace, name) order, as ServiceTables.add writes them."""
        ids = self._who[t].get(k)
        if not ids:
            table.pop(k, None)
            return
        found = False
        value: Any = None
        for i in sorted(ids, key=self._svc_key.__getitem__) if len(ids) > 1 else ids:
            e = self._entries[i]
            if t == 0:
                for skey, spec, overwrite in e.services:
                    if skey == k and (overwrite or not found):
                        value, found = spec, True
            else:
                pairs: tuple[tuple[Any, Any], ...] = (e.nodeports, e.derived, e.health)[t - 1]
                for key, v in pairs:
                    if key == k:
                        value, found = v, True
        table[k] = value


def _entry_keys(e: ServiceEntries) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
    return ([k for k, _, _ in e.services], [k for k, _ in e.nodeports],
            [k for k, _ in e.derived], [k for k, _ in e.health])


def _derived_rule(svc: Obj, port: Obj, policy: str) -> dict[str, Any]:
    ns, name = _ns_name(svc)
    meta: dict[str, Any] = {"name": derived_rule_name(svc, port),
                            "labels": {"app.kubernetes.io/managed-by": "pcn-agent",
                                       "pcn.dev/service": f"{ns}.{name}"}}
    uid = _meta(svc).get("uid")
    if uid:
        meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Service", "name": name,
                                    "uid": uid, "blockOwnerDeletion": False}]
    return {"apiVersion": "pcn.dev/v1alpha1", "kind": "NodePortRule", "metadata": meta,
            "spec": {"port": int(port["nodePort"]),
                     "protocol": (port.get("protocol") or "TCP").upper(),
                     "externalTrafficPolicy": policy,
                     "service": {"namespace": ns, "name": name, "port": int(port["port"])}}}


def static_nodeports(inputs: Inputs, nodeports: dict[NodePortKey, NodePortSpec],
                     verdicts: dict[ObjectKey, Verdict]) -> None:
    """NodePortRules people wrote (derived ones repeat a Service and add nothing)."""
    svcs: dict[tuple[str, str], Obj] | None = None  # built when a rule names a Service
    by_service: dict[tuple[str, str], list[Obj]] | None = None
    for obj in inputs.nodeportrules:
        name = _meta(obj).get("name", "")
        v = verdicts.setdefault(("NodePortRule", "", name), Verdict())
        rule = _validated(NodePortRule, obj, v)
        if rule is None:
            continue
        s = rule.spec
        key = (s.port, s.protocol.lower())
        lo, hi = inputs.settings.nodeport_range
        if not lo <= s.port <= hi:
            v.fail("OutOfRange", f"port {s.port} is outside the NodePort range {lo}-{hi}")
            continue
        if s.service is not None:
            if svcs is None:
                svcs = {_ns_name(o): o for o in inputs.services}
            svc = svcs.get((s.service.namespace, s.service.name))
            if svc is None:
                v.fail("ServiceNotFound", f"Service {s.service.namespace}/{s.service.name} "
                                          "does not exist")
                continue
            ports = [p for p in (svc.get("spec") or {}).get("ports") or []
                     if p.get("port") == s.service.port]
            if not ports:
                v.fail("ServicePortNotFound", f"Service {s.service.namespace}/"
                                              f"{s.service.name} has no port {s.service.port}")
                continue
            if by_service is None:
                by_service = slices_by_service(inputs.endpointslices)
            cat = categorize(service_endpoints(
                svc, ports[0], by_service.get((s.service.namespace, s.service.name), ())),
                inputs.node)
            want = nodeport_spec(s.externalTrafficPolicy, cat, _affinity(svc))
        else:
            want = NodePortSpec(s.externalTrafficPolicy,
                                tuple(Backend(b.ip, b.port, b.weight) for b in s.backends))
        backends = want.backends
        if key in nodeports and nodeports[key] != want and \
                (_meta(obj).get("labels") or {}).get("app.kubernetes.io/managed-by") != "pcn-agent":
            v.fail("Conflict", f"port {s.port}/{s.protocol} is already used by another rule or "
                               "Service")
            continue
        nodeports[key] = want
        if not backends:
            v.message = "no ready backends yet"


# ----------------------------------------------------------------------------- chains
def _pydantic_message(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors()[:3]:
        loc = ".".join(str(x) for x in e.get("loc", ()))
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return "; ".join(parts)


def _validated(model: type[R], obj: Obj, v: Verdict) -> R | None:
    """The object as its pydantic model, or None with the verdict saying why."""
    try:
        return model.from_body(obj)
    except ValidationError as exc:
        v.fail("Invalid", _pydantic_message(exc))
        return None


KEPT = "; the last valid version stays in force"


def _kept(model: type[R], key: ObjectKey, last_good: Mapping[ObjectKey, Obj], v: Verdict
          ) -> R | None:
    """The last valid version of an object whose current one `v` rejected,
    if there is one; the verdict then says it stays in force."""
    body = last_good.get(key)
    if body is None:
        return None
    try:
        kept = model.from_body(body)
    except ValidationError:  # valid when it was kept; a model change may refuse it now
        return None
    v.message += KEPT
    return kept


def functions_of(inputs: Inputs, verdicts: dict[ObjectKey, Verdict],
                 good: dict[ObjectKey, Obj] | None = None
                 ) -> dict[tuple[str, str], FunctionSpec]:
    """Valid NetworkFunctions as FunctionSpecs by (namespace, name). One whose
    current version is invalid keeps its last valid version (Inputs.last_good)
    in force, never falls back to no function: removing a firewall because of
    a typo would open what it blocks. `good` receives the versions in force."""
    valid: dict[tuple[str, str], FunctionSpec] = {}
    for obj in inputs.functions:
        ns, name = _ns_name(obj)
        key: ObjectKey = ("NetworkFunction", ns, name)
        v = verdicts.setdefault(key, Verdict())
        nf = _validated(NetworkFunction, obj, v)
        if nf is not None and good is not None:
            good[key] = dict(obj)
        if nf is None:
            nf = _kept(NetworkFunction, key, inputs.last_good, v)
            if nf is None:
                continue
            if good is not None:
                good[key] = dict(inputs.last_good[key])
        if nf.spec.is_builtin():
            cube = FUNCTION_CUBES[nf.spec.type]
            valid[(ns, name)] = FunctionSpec(cube.type, cube.settings_of(nf.spec.typed_config()))
            continue
        spec = _custom_function(nf, inputs, v)
        if spec is None and nf is not None and good is not None:
            good.pop(key, None)  # not realisable: not a version to fall back on
            kept = inputs.last_good.get(key)
            if kept is not None:
                try:
                    old = NetworkFunction.from_body(kept)
                except ValidationError:
                    old = None
                if old is not None and old.spec.type == nf.spec.type:
                    spec = _custom_function(old, inputs, Verdict())
                    if spec is not None:
                        v.message += KEPT
                        good[key] = dict(kept)
        if spec is not None:
            valid[(ns, name)] = spec
    return valid


def _custom_function(nf: NetworkFunction, inputs: Inputs, v: Verdict) -> FunctionSpec | None:
    """A NetworkFunction of a CubeType as a FunctionSpec, its spec.config
    checked against the type's parameters (errors name the field); None
    with the verdict saying why when it cannot be realised. A deleted
    CubeType's functions keep their cubes, reported not Ready."""
    type_name = nf.spec.type
    info = inputs.cubetypes.get(type_name)
    if info is None:
        v.fail("CubeTypeNotFound", f"no CubeType {type_name!r} (nor a built-in type: "
                                   f"{', '.join(sorted(FUNCTION_CUBES))})")
        return None
    if not info.ready:
        v.fail("CubeTypeNotReady", f"CubeType {type_name} has not compiled on this node"
                                   + (f": {info.message}" if info.message else ""))
        return None
    errors = config_errors(info.params, nf.spec.config)
    if errors:
        v.fail("Invalid", "; ".join(errors))
        return None
    if info.deleted:
        v.fail("CubeTypeDeleted", f"CubeType {type_name} was deleted: the cube stays as it "
                                  "was until this function is deleted")
    settings = CustomSettings(type_name, info.params, info.counters,
                              config_values(info.params, nf.spec.config))
    return FunctionSpec(runtime_type(type_name), settings)


def _missing_functions(chain: CubeChain, ns: str,
                       functions: Mapping[tuple[str, str], FunctionSpec]) -> list[str]:
    refs = [r.function for r in (*chain.spec.ingress, *chain.spec.egress)]
    return [r for r in refs if (ns, r) not in functions]


def chains_of(inputs: Inputs, functions: Mapping[tuple[str, str], FunctionSpec],
              verdicts: dict[ObjectKey, Verdict], good: dict[ObjectKey, Obj] | None = None,
              bandwidth_errors: dict[tuple[str, str], str] | None = None
              ) -> tuple[dict[str, tuple[tuple[str, ...], tuple[str, ...]]], dict[str, FunctionSpec]]:
    """Each attached pod's functions from the CubeChains selecting it, and
    the policers of its bandwidth annotations (bandwidth_of; invalid ones go
    to `bandwidth_errors`). A chain that is invalid or names a function that
    does not exist (or is invalid with no valid version) keeps its last valid
    version in force, as functions_of does; `good` receives the versions in
    force."""
    pods_by_name = {_ns_name(p): p for p in inputs.pods}
    parsed: list[tuple[int, str, str, CubeChain]] = []
    for obj in inputs.chains:
        ns, name = _ns_name(obj)
        key: ObjectKey = ("CubeChain", ns, name)
        v = verdicts.setdefault(key, Verdict())
        chain = _validated(CubeChain, obj, v)
        missing = _missing_functions(chain, ns, functions) if chain is not None else []
        if missing:
            bad = [r for r in missing if ("NetworkFunction", ns, r) in verdicts]
            if bad:
                v.fail("InvalidFunction", f"NetworkFunction {ns}/{bad[0]} is invalid: "
                                          f"{verdicts[('NetworkFunction', ns, bad[0])].message}")
            else:
                v.fail("FunctionNotFound", f"NetworkFunction {ns}/{missing[0]} does not exist")
        if chain is not None and not missing:
            if good is not None:
                good[key] = dict(obj)
        else:
            chain = _kept(CubeChain, key, inputs.last_good, v)
            if chain is None or _missing_functions(chain, ns, functions):
                continue  # nothing valid was ever in force, or its functions are gone
            if good is not None:
                good[key] = dict(inputs.last_good[key])
        parsed.append((chain.spec.priority, name, ns, chain))
    parsed.sort(key=lambda t: (t[0], t[1]))

    chains: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
    used: dict[str, FunctionSpec] = {}
    for pod_key, (pns, pname) in sorted(inputs.attachments.items()):
        pod = pods_by_name.get((pns, pname))
        from_pod, to_pod = _chain_of_pod(pod, pns, pname, parsed, functions, verdicts, used,
                                         bandwidth_errors)
        if from_pod or to_pod:
            chains[pod_key] = (tuple(from_pod), tuple(to_pod))
    return chains, used


def _chain_of_pod(pod: Obj | None, pns: str, pname: str,
                  parsed: list[tuple[int, str, str, CubeChain]],
                  functions: Mapping[tuple[str, str], FunctionSpec],
                  verdicts: dict[ObjectKey, Verdict], used: dict[str, FunctionSpec],
                  bandwidth_errors: dict[tuple[str, str], str] | None
                  ) -> tuple[list[str], list[str]]:
    """One attached pod's (from_pod, to_pod) cube names: the functions of the
    chains selecting it, in order, and its bandwidth annotations' policers,
    nearest the pod on each side (what the pod sends is limited before any
    other cube sees it, what it receives after), as the bandwidth plugin's
    qdiscs sit on the pod's own interface."""
    labels = (_meta(pod).get("labels") or {}) if pod else {}
    from_pod: list[str] = []
    to_pod: list[str] = []
    bandwidth, errors = bandwidth_of(pod) if pod is not None else ({}, {})
    if errors and bandwidth_errors is not None:
        bandwidth_errors[(pns, pname)] = "; ".join(errors.values())
    # the annotations' policers always fit: the chains' functions get the rest
    room_to = MAX_STACKED - ("ingress" in bandwidth)
    room_from = MAX_STACKED - ("egress" in bandwidth)
    # a function's verdict counts pods, not pod sides: one on both sides (a
    # flow monitor) or in two chains of the pod counts the pod once
    counted: set[str] = set()
    for _, cname, ns, chain in parsed:
        if ns != pns or pod is None or not chain.spec.podSelector.matches(dict(labels)):
            continue
        v = verdicts[("CubeChain", ns, cname)]
        added = False
        for side, side_refs, room in ((to_pod, chain.spec.ingress, room_to),
                                      (from_pod, chain.spec.egress, room_from)):
            for r in side_refs:
                cn = cube_name(ns, r.function)
                if cn in side:
                    continue
                if len(side) >= room:
                    v.fail("TooManyFunctions", f"pod {pns}/{pname} would carry more than "
                                               f"{MAX_STACKED} functions on one side")
                    continue
                side.append(cn)
                used[cn] = functions[(ns, r.function)]
                if cn not in counted:
                    counted.add(cn)
                    verdicts[("NetworkFunction", ns, r.function)].pods += 1
                added = True
        if added or chain.spec.ingress or chain.spec.egress:
            v.pods += 1
    for direction, spec in bandwidth.items():
        cn = bandwidth_cube_name(direction, pns, pname)
        used[cn] = spec
        if direction == "ingress":
            to_pod.append(cn)  # the last cube before the pod
        else:
            from_pod.insert(0, cn)  # the first after it
    return from_pod, to_pod


# ----------------------------------------------------------------------------- bandwidth
# containerd's CRI plugin (internal/cri/server/sandbox_run.go, toCNIBandWidth)
# gives the reference `bandwidth` CNI plugin a burst of math.MaxUint32 bits
# for either annotation; the plugin turns it into a tbf of that many bytes / 8.
ANNOTATION_BURST_BYTES = (2**32 - 1) // 8
BANDWIDTH_SIDES = (("ingress", INGRESS_ANNOTATION), ("egress", EGRESS_ANNOTATION))


def bandwidth_cube_name(side: str, namespace: str, pod: str) -> str:
    """The policer cube of a pod's bandwidth annotation: bw.SIDE.NS.POD (the
    pod name last: it may hold dots, a namespace cannot)."""
    return f"bw.{side}.{namespace}.{pod}"


def bandwidth_of(pod: Obj) -> tuple[dict[str, FunctionSpec], dict[str, str]]:
    """The policers a pod's `kubernetes.io/ingress-bandwidth` (traffic to the
    pod) and `kubernetes.io/egress-bandwidth` (from it) annotations ask for,
    by side, and the annotations that are invalid, by side, with why.

    The values are quantities of bits per second, at least 1k and at most 1P,
    as kubelet and containerd read them (pkg/util/bandwidth,
    ExtractPodBandwidthResources); the burst is the one containerd gives the
    bandwidth plugin (ANNOTATION_BURST_BYTES) and each pod has its own bucket.
    Where containerd refuses to start a pod with an invalid value, the agent
    cannot: that side runs unlimited and the error is reported."""
    annotations = _meta(pod).get("annotations") or {}
    specs: dict[str, FunctionSpec] = {}
    errors: dict[str, str] = {}
    for side, key in BANDWIDTH_SIDES:
        value = annotations.get(key)
        if value is None:
            continue
        try:
            bits = bandwidth_bits(str(value))
        except QuantityError as exc:
            errors[side] = f"{key}: {exc}"
            continue
        specs[side] = FunctionSpec(POLICER, PolicerSettings(bits, ANNOTATION_BURST_BYTES, "pod"))
    return specs, errors


# ----------------------------------------------------------------------------- entry
# ----------------------------------------------------------------------------- network policy
def policies_of(inputs: Inputs) -> tuple[dict[str, PodPolicy], dict[str, AddressSet]]:
    """The policy of each attached pod of this node (by attachment key; see
    pcn_policy.compiler for the semantics), and the address sets their
    rules use. Once the cluster has a policy, every pod gets one, empty for
    the pods no policy selects: the cube then tracks their connections too,
    so that when a policy comes to select a pod, or a change disallows one
    of its connections, the cube knows which end opened each connection
    (without an entry, a TCP packet that starts nothing is judged both as
    sent and as the reply of a connection opened the other way, and a
    connection revoked while its pod was unselected would come back that
    way). Tracking, once begun, goes on when the last policy goes
    (`Inputs.tracking`): a policy created later then still finds every
    connection's opener (with the cube unstacked and stacked again, a
    connection it disallows would be picked up as a reply). A node that never
    saw a policy carries no policy cube and pays nothing for it."""
    if not inputs.networkpolicies and not inputs.clusternetworkpolicies:
        if not inputs.tracking:
            return {}, {}
        return {key: PodPolicy() for key in inputs.attachments}, {}
    compiled = netpol.compile_node(netpol.Cluster(
        network_policies=inputs.networkpolicies,
        cluster_network_policies=inputs.clusternetworkpolicies,
        pods=inputs.all_pods or inputs.pods, namespaces=inputs.namespaces,
        nodes=inputs.nodes), inputs.node)
    key_of = {f"{ns}/{name}": key for key, (ns, name) in inputs.attachments.items()}
    policies: dict[str, PodPolicy] = {}
    for pod, policy in compiled.pods.items():
        key = key_of.get(pod)
        if key is not None:
            policies[key] = policy
    used = used_sets(policies.values())
    return policies, {name: s for name, s in compiled.sets.items() if name in used}


def desired_state(inputs: Inputs) -> Result:
    verdicts: dict[ObjectKey, Verdict] = {}
    good: dict[ObjectKey, Obj] = {}
    tables = service_tables(inputs)
    nodeports = tables.nodeports
    static_nodeports(inputs, nodeports, verdicts)
    functions = functions_of(inputs, verdicts, good)
    bandwidth_errors: dict[tuple[str, str], str] = {}
    chains, used = chains_of(inputs, functions, verdicts, good, bandwidth_errors)
    policies, address_sets = policies_of(inputs)
    desired = Desired(peers=peers_of(inputs), services=tables.services, nodeports=nodeports,
                      functions=used, chains=chains, policies=policies,
                      address_sets=address_sets, services_delta=tables.delta)
    return Result(desired, verdicts, tables.derived, good, tables.health, bandwidth_errors)


@dataclass(frozen=True)
class Op:
    """One data-plane operation; `apply` in the manager executes it."""

    kind: str  # set-function, set-peers, set-service, delete-service, set-nodeport, ...
    key: Any
    value: Any = None


def plan(current: Desired, desired: Desired, attached: Iterable[str] = (),
         applied: Mapping[ServiceKey, ServiceSpec] | None = None) -> list[Op]:
    """Operations from `current` to `desired`: functions come into being before
    chains use them and go after chains stop using them. `applied`: a
    services mapping that current.services is known to equal (the last
    desired state applied without a failure); when desired.services_delta
    is based on that very mapping, only the keys it names are compared
    (O(changes) instead of O(services))."""
    ops: list[Op] = []
    for name, function in desired.functions.items():
        if current.functions.get(name) != function:
            ops.append(Op("set-function", name, function))
    if current.peers != desired.peers:
        ops.append(Op("set-peers", None, desired.peers))
    # `is not` first: an unchanged Service keeps its spec objects from pass
    # to pass (ServiceIndex) and the applied state holds those very objects,
    # so ten thousand Services compare at the cost of a pointer each
    cur_services = current.services
    delta = desired.services_delta
    if delta is not None and applied is not None and delta.base is applied:
        for skey in sorted(delta.keys):
            service = desired.services.get(skey)
            have = cur_services.get(skey)
            if service is None:
                if have is not None:
                    ops.append(Op("delete-service", skey))
            elif have is not service and have != service:
                ops.append(Op("set-service", skey, service))
    else:
        for skey, service in desired.services.items():
            have = cur_services.get(skey)
            if have is not service and have != service:
                ops.append(Op("set-service", skey, service))
        for skey in cur_services.keys() - desired.services.keys():
            ops.append(Op("delete-service", skey))
    for npkey, nodeport in desired.nodeports.items():
        have_np = current.nodeports.get(npkey)
        if have_np is not nodeport and have_np != nodeport:
            ops.append(Op("set-nodeport", npkey, nodeport))
    for npkey in current.nodeports.keys() - desired.nodeports.keys():
        ops.append(Op("delete-nodeport", npkey))
    attached = set(attached)
    # address sets before the rules that use them, the unused ones after
    if any(current.address_sets.get(n) != s for n, s in desired.address_sets.items()):
        ops.append(Op("set-address-sets", None, desired.address_sets))
    for pod in sorted(attached & (current.policies.keys() | desired.policies.keys())):
        policy = desired.policies.get(pod)
        if current.policies.get(pod) != policy:
            ops.append(Op("set-policy", pod, policy))
    if current.address_sets.keys() - desired.address_sets.keys():
        ops.append(Op("prune-address-sets", None, desired.address_sets))
    empty: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
    for pod in sorted(attached | current.chains.keys() | desired.chains.keys()):
        want = desired.chains.get(pod, empty)
        if current.chains.get(pod, empty) != want and pod in attached:
            ops.append(Op("set-chain", pod, want))
    for name in current.functions.keys() - desired.functions.keys():
        ops.append(Op("delete-function", name))
    return ops
