"""A synthetic cluster for the network policy benchmarks (bench.policy): Nodes,
Namespaces, Pods and NetworkPolicies as the API server returns them (plain
JSON dicts, every one with a uid and a resourceVersion), held the way the
agent holds what it watches (by kind, by namespace/name), and the writes the
benchmark times, each of which stores a new object with a new
resourceVersion, as a write to the API server does (the policy compiler
parses an object once per (uid, resourceVersion): a change must look like
one).

Pure: no kernel, no clock, no API server; deterministic for a seed.

Shape (defaults, issue 11's scale item): 100 nodes of 50 pods each (5 000
pods) over 50 namespaces, 1 000 NetworkPolicies (20 per namespace).

* Node k (1-based) is `node_names[k - 1]`, InternalIP 192.168.250.k and
  podCIDR 10.244.k.0/24; its pod in slot s (1-based) has the address
  10.244.k.(10 + s): pcn_lab.topology's addresses of node k and pod
  `n<k>p<s>`, so that node 1 of this cluster can be a real lab node whose
  lab pods are the cluster's pods of node 1.
* A namespace `ns-NN` is labelled `kubernetes.io/metadata.name` (as the API
  server labels every namespace), `team` (team-0..4) and `env` (prod,
  staging, dev).
* A pod is labelled `app` (app-0..9) and `role` (frontend, backend, db),
  drawn at random, in a namespace drawn at random; its container serves the
  named ports `http` (TCP 8080 + app number % 3: the same name is a
  different number on different pods, so named-port rules resolve per pod)
  and `metrics` (TCP 9090), plus `postgres` (TCP 5432) for role db and
  `dns` (UDP 53) for role frontend.
* The policies of a namespace follow TEMPLATES, a mix of what upstream's
  NetworkPolicy e2e tests write (k8s.io/kubernetes test/e2e/network/netpol/
  network_policy.go: default-deny-ingress, allow-all, podSelector,
  namespaceSelector, both, matchExpressions on pods and on the default
  namespace label, ipBlock with except (ingress and egress), numbered,
  named, endPort, UDP and SCTP ports, egress-only and Ingress+Egress
  policies, several peers in one rule). Each selects pods by `app` or
  `role`, so that a pod is subject to a handful of policies (well under
  the policy cube's 64 rules a direction).
"""

from __future__ import annotations

import copy
import ipaddress
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pcn_policy.compiler import parse_selector

Obj = dict[str, Any]
NS_NAME_LABEL = "kubernetes.io/metadata.name"
ROLES = ("frontend", "backend", "db")
ENVS = ("prod", "staging", "dev")
TEAMS = 5
POD_SUPERNET = ipaddress.IPv4Network("10.244.0.0/16")
NODE_NET = ipaddress.IPv4Network("192.168.250.0/24")
FIRST_POD_HOST = 10  # slot s of a node: host number FIRST_POD_HOST + s (pcn_lab's)
EXTRA_POD_HOSTS = range(100, 250)  # pods added by changes (above any slot's address)


@dataclass(frozen=True)
class Shape:
    """How big the synthetic cluster is."""

    nodes: int = 100
    pods_per_node: int = 50
    namespaces: int = 50
    policies: int = 1000
    apps: int = 10

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= 250:
            raise ValueError("1 to 250 nodes (one /24 of 10.244.0.0/16 and one address of "
                             "192.168.250.0/24 each)")
        if not 1 <= self.pods_per_node <= EXTRA_POD_HOSTS.start - FIRST_POD_HOST - 1:
            raise ValueError(f"1 to {EXTRA_POD_HOSTS.start - FIRST_POD_HOST - 1} pods a node")
        if self.namespaces < 1 or self.apps < 1 or self.policies < 0:
            raise ValueError("at least one namespace and one app; policies not negative")

    @property
    def pods(self) -> int:
        return self.nodes * self.pods_per_node


def pod_ip(node_index: int, slot: int) -> str:
    """Address of the pod in `slot` (1-based) of node `node_index` (1-based)."""
    return str(POD_SUPERNET.network_address + (node_index << 8) + FIRST_POD_HOST + slot)


def node_ip(node_index: int) -> str:
    return str(NODE_NET.network_address + node_index)


def pod_cidr(node_index: int) -> str:
    return f"{POD_SUPERNET.network_address + (node_index << 8)}/24"


def _meta(o: Mapping[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = o["metadata"]
    return meta


def key_of(o: Mapping[str, Any]) -> str:
    """"namespace/name" (just "name" for cluster-scoped objects)."""
    m = _meta(o)
    return f"{m['namespace']}/{m['name']}" if m.get("namespace") else str(m["name"])


# ----------------------------------------------------------------------------- objects
def make_node(name: str, index: int) -> Obj:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "uid": f"uid-node-{index}"},
            "spec": {"podCIDR": pod_cidr(index), "podCIDRs": [pod_cidr(index)]},
            "status": {"addresses": [{"type": "InternalIP", "address": node_ip(index)},
                                     {"type": "Hostname", "address": name}]}}


def make_namespace(index: int) -> Obj:
    name = f"ns-{index:02d}"
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "uid": f"uid-ns-{index}",
                         "labels": {NS_NAME_LABEL: name, "team": f"team-{index % TEAMS}",
                                    "env": ENVS[index % len(ENVS)]}},
            "status": {"phase": "Active"}}


def container_ports(app: int, role: str) -> list[dict[str, Any]]:
    ports: list[dict[str, Any]] = [
        {"name": "http", "containerPort": 8080 + app % 3, "protocol": "TCP"},
        {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    if role == "db":
        ports.append({"name": "postgres", "containerPort": 5432, "protocol": "TCP"})
    if role == "frontend":
        ports.append({"name": "dns", "containerPort": 53, "protocol": "UDP"})
    return ports


def make_pod(name: str, namespace: str, node: str, ip: str, app: int, role: str) -> Obj:
    """A Running pod with one container serving container_ports(app, role)."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{namespace}-{name}",
                         "labels": {"app": f"app-{app}", "role": role}},
            "spec": {"nodeName": node,
                     "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10",
                                     "ports": container_ports(app, role)}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


def _np(namespace: str, name: str, pod_selector: dict[str, Any], types: list[str],
        ingress: list[dict[str, Any]] | None = None,
        egress: list[dict[str, Any]] | None = None) -> Obj:
    spec: dict[str, Any] = {"podSelector": pod_selector, "policyTypes": types}
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace,
                         "uid": f"uid-np-{namespace}-{name}"},
            "spec": spec}


def _app(a: int) -> dict[str, Any]:
    return {"matchLabels": {"app": f"app-{a}"}}


def _ns_names(*names: str) -> dict[str, Any]:
    return {"matchExpressions": [{"key": NS_NAME_LABEL, "operator": "In",
                                  "values": list(names)}]}


@dataclass(frozen=True)
class Template:
    """One kind of policy: `kind` says what it exercises, `slug` ends the
    names of its policies; `make(namespace index, variant, shape, rng)`
    gives (podSelector, policyTypes, ingress rules or None, egress rules or
    None)."""

    kind: str
    slug: str
    make: Callable[[int, int, Shape, random.Random],
                   tuple[dict[str, Any], list[str], list[dict[str, Any]] | None,
                         list[dict[str, Any]] | None]]


def _t_default_deny(n: int, v: int, s: Shape, rng: random.Random) -> Any:
    if v % 2 == 0:  # "should support a 'default-deny-ingress' policy"
        return {}, ["Ingress"], None, None
    # "should enforce multiple ingress policies with ingress allow-all policy taking precedence"
    return _app(rng.randrange(s.apps)), ["Ingress"], [{}], None


def _t_pod_selector(n: int, v: int, s: Shape, rng: random.Random) -> Any:
    # "...allow traffic from pods within server namespace based on PodSelector", ports
    return (_app(rng.randrange(s.apps)), ["Ingress"],
            [{"from": [{"podSelector": _app(rng.randrange(s.apps))}],
              "ports": [{"protocol": "TCP", "port": 8080}]}], None)


def _t_namespace_selector(n: int, v: int, s: Shape, rng: random.Random) -> Any:
    # "...allow traffic only from a different namespace, based on NamespaceSelector"
    return (_app(rng.randrange(s.apps)), ["Ingress"],
            [{"from": [{"namespaceSelector": {"matchLabels": {
                "team": f"team-{rng.randrange(TEAMS)}"}}}]}], None)


def _t_both_selectors(n: int, v: int, s: Shape, rng: random.Random) -> Any:
    # "should enforce policy based on PodSelector and NamespaceSelector"
    return (_app(rng.randrange(s.apps)), ["Ingress"],
            [{"from": [{"namespaceSelector": {"matchLabels": {"env": "prod"}},
                        "podSelector": {"matchLabels": {"role": "frontend"}}}],
              "ports": [{"port": 80}, {"port": 443}]}], None)


def _t_ip_block(n: int, v: int, s: Shape, rng: random.Random) -> Any:
    # "should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed"
    holes = sorted(rng.sample(range(1, s.nodes + 1), min(2, s.nodes)))
    return (_app(rng.randrange(s.apps)), ["Ingress"],
            [{"from": [{"ipBlock": {"cidr": str(POD_SUPERNET),
                                    "except": [pod_cidr(h) for h in holes]}},
                       {"ipBlock": {"cidr": "192.168.0.0/16",
                                    "except": ["192.168.250.0/24"]}}],
              "ports": [{"protocol": "TCP", "port": 8080}]}], None)


def _t_named_port(n: int, v: int, s: Shape, rng: random.Random) -> Any:
    # "should allow ingress access from namespace on one named port", default ns label
    others = [f"ns-{rng.randrange(s.namespaces):02d}" for _ in range(2)]
    return (_app(rng.randrange(s.apps)), ["Ingress"],
            [{"from": [{"namespaceSelector": _ns_names(*others)}],
              "ports": [{"port": "http"}]}], None)


def _t_expressions_ports(n: int, v: int, s: Shape, rng: random.Random) -> Any:
    # "should enforce policy based on PodSelector with MatchExpressions", endPort,
    # "should not allow access by TCP when a policy specifies only UDP", SCTP
    not_apps = sorted({f"app-{rng.randrange(s.apps)}" for _ in range(2)})
    return ({"matchExpressions": [{"key": "role", "operator": "In",
                                   "values": [ROLES[v % 2 + 1], ROLES[v % 2]]},
                                  {"key": "app", "operator": "In",
                                   "values": [f"app-{rng.randrange(s.apps)}"]}]},
            ["Ingress"],
            [{"from": [{"podSelector": {"matchExpressions": [
                {"key": "app", "operator": "NotIn", "values": not_apps}]}}],
              "ports": [{"protocol": "TCP", "port": 30000, "endPort": 30100},
                        {"protocol": "UDP", "port": 53}, {"protocol": "SCTP", "port": 9999}]}],
            None)


def _t_egress_named(n: int, v: int, s: Shape, rng: random.Random) -> Any:
    # "should allow egress access on one named port", "...egress ... based on PodSelector
    # and NamespaceSelector", DNS to everyone
    return (_app(rng.randrange(s.apps)), ["Egress"], None,
            [{"to": [{"namespaceSelector": {"matchLabels": {
                "team": f"team-{rng.randrange(TEAMS)}"}},
                      "podSelector": {"matchLabels": {"role": "db"}}}],
              "ports": [{"port": "postgres"}]},
             {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}])


def _t_ingress_egress(n: int, v: int, s: Shape, rng: random.Random) -> Any:
    # "should work with Ingress, Egress specified together",
    # "should enforce except clause while egress access to server in CIDR block"
    return (_app(rng.randrange(s.apps)), ["Ingress", "Egress"],
            [{"from": [{"podSelector": {}}]}],
            [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0",
                                  "except": ["10.0.0.0/8", "169.254.169.254/32"]}}],
              "ports": [{"protocol": "TCP", "port": 443}]},
             {"to": [{"podSelector": {}}]}])


def _t_several_peers(n: int, v: int, s: Shape, rng: random.Random) -> Any:
    # "should enforce policy based on Multiple PodSelectors and NamespaceSelectors"
    return (_app(rng.randrange(s.apps)), ["Ingress"],
            [{"from": [{"podSelector": _app(rng.randrange(s.apps))},
                       {"namespaceSelector": {"matchLabels": {"env": "staging"}},
                        "podSelector": _app(rng.randrange(s.apps))},
                       {"namespaceSelector": {},
                        "podSelector": {"matchLabels": {"role": "frontend"}}}],
              "ports": [{"protocol": "TCP", "port": 8080}, {"protocol": "TCP", "port": 8443}]}],
            None)


TEMPLATES = (
    Template("default-deny-or-allow-all", "deny", _t_default_deny),
    Template("podSelector", "pod-sel", _t_pod_selector),
    Template("namespaceSelector", "ns-sel", _t_namespace_selector),
    Template("namespaceSelector+podSelector", "ns-and-pod-sel", _t_both_selectors),
    Template("ipBlock-except", "ipblock", _t_ip_block),
    Template("named-port", "named-port", _t_named_port),
    Template("matchExpressions+endPort+UDP+SCTP", "expressions", _t_expressions_ports),
    Template("egress-named-port", "egress", _t_egress_named),
    Template("ingress+egress-ipBlock-except", "ingress-egress", _t_ingress_egress),
    Template("several-peers", "peers", _t_several_peers),
)


def make_policy(namespace_index: int, k: int, shape: Shape, rng: random.Random) -> Obj:
    """Policy k of namespace `namespace_index`: TEMPLATES[k % len(TEMPLATES)],
    variant k // len(TEMPLATES)."""
    t = TEMPLATES[k % len(TEMPLATES)]
    sel, types, ingress, egress = t.make(namespace_index, k // len(TEMPLATES), shape, rng)
    return _np(f"ns-{namespace_index:02d}", f"np-{k:03d}-{t.slug}", sel, types, ingress, egress)


# ----------------------------------------------------------------------------- the store
@dataclass
class SyntheticCluster:
    """What an agent watching the cluster holds: objects by kind, keyed by
    "namespace/name" (name for Nodes and Namespaces). Writes go through the
    methods below, which store a new object with the next resourceVersion."""

    shape: Shape
    node_names: tuple[str, ...]
    nodes: dict[str, Obj] = field(default_factory=dict)
    namespaces: dict[str, Obj] = field(default_factory=dict)
    pods: dict[str, Obj] = field(default_factory=dict)
    policies: dict[str, Obj] = field(default_factory=dict)
    resource_version: int = 0
    added_pods: int = 0  # pods added by add_pod_elsewhere()
    added_policies: int = 0

    def _store(self, table: dict[str, Obj], o: Obj) -> Obj:
        self.resource_version += 1
        _meta(o)["resourceVersion"] = str(self.resource_version)
        table[key_of(o)] = o
        return o

    @property
    def local_node(self) -> str:
        """Node 1: the node whose agent the benchmark plays."""
        return self.node_names[0]

    def pods_on(self, node: str) -> list[Obj]:
        return [p for p in self.pods.values() if p["spec"].get("nodeName") == node]

    # -------------------------------------------------------------- writes
    def put(self, kind: str, o: Obj) -> Obj:
        """Create or replace an object of `kind` (Node, Namespace, Pod,
        NetworkPolicy): a write of the API server (new resourceVersion)."""
        return self._store(self._table(kind), o)

    def delete(self, kind: str, key: str) -> Obj:
        return self._table(kind).pop(key)

    def _table(self, kind: str) -> dict[str, Obj]:
        return {"Node": self.nodes, "Namespace": self.namespaces, "Pod": self.pods,
                "NetworkPolicy": self.policies}[kind]

    def relabel_pod(self, key: str, labels: Mapping[str, str]) -> Obj:
        """The pod with `labels` merged into its labels (a new version)."""
        o = copy.deepcopy(self.pods[key])
        _meta(o)["labels"] = {**_meta(o).get("labels", {}), **labels}
        return self.put("Pod", o)

    def relabel_namespace(self, name: str, labels: Mapping[str, str]) -> Obj:
        o = copy.deepcopy(self.namespaces[name])
        _meta(o)["labels"] = {**_meta(o).get("labels", {}), **labels}
        return self.put("Namespace", o)


def build(shape: Shape = Shape(), seed: int = 11, node_names: Sequence[str] | None = None,
          skip_local_pods: bool = False) -> SyntheticCluster:
    """The cluster of `shape`; node k is named node_names[k - 1] (default
    node-001...). With `skip_local_pods` node 1 has no pod yet (they are
    made by local_pod(), as the benchmark of pod adds needs them)."""
    names = tuple(node_names) if node_names is not None else tuple(
        f"node-{k:03d}" for k in range(1, shape.nodes + 1))
    if len(names) != shape.nodes or len(set(names)) != len(names):
        raise ValueError(f"{shape.nodes} distinct node names needed, got {len(names)}")
    rng = random.Random(seed)
    c = SyntheticCluster(shape, names)
    for k, name in enumerate(names, 1):
        c.put("Node", make_node(name, k))
    for i in range(shape.namespaces):
        c.put("Namespace", make_namespace(i))
    for k in range(1, shape.nodes + 1):
        for s in range(1, shape.pods_per_node + 1):
            pod = _slot_pod(shape, names, k, s, rng)
            if k == 1 and skip_local_pods:
                continue
            c.put("Pod", pod)
    for k in range(shape.policies):
        ns = k % shape.namespaces
        c.put("NetworkPolicy", make_policy(ns, k // shape.namespaces, shape, rng))
    return c


def _slot_pod(shape: Shape, names: Sequence[str], k: int, s: int, rng: random.Random) -> Obj:
    ns = rng.randrange(shape.namespaces)
    app = rng.randrange(shape.apps)
    role = rng.choice(ROLES)
    return make_pod(f"pod-{k:03d}-{s:02d}", f"ns-{ns:02d}", names[k - 1], pod_ip(k, s), app,
                    role)


def local_pod(c: SyntheticCluster, slot: int, seed: int = 11) -> Obj:
    """Node 1's pod of `slot` as build(seed=seed) makes it (for a cluster
    built with skip_local_pods), not stored."""
    rng = random.Random(seed)
    for k in range(1, c.shape.nodes + 1):
        for s in range(1, c.shape.pods_per_node + 1):
            pod = _slot_pod(c.shape, c.node_names, k, s, rng)
            if (k, s) == (1, slot):
                return pod
    raise ValueError(f"no slot {slot} on a node of {c.shape.pods_per_node} pods")


# ----------------------------------------------------------------------------- changes
CHANGES = ("pod-label", "namespace-label", "policy-add", "policy-remove", "pod-add-elsewhere")


def change(c: SyntheticCluster, kind: str, n: int, rng: random.Random) -> str:
    """Make change `kind` (one of CHANGES), the `n`th of its kind (0-based),
    in the cluster; returns what it did, in words. Each touches what node 1's
    pods' policies use, as far as a random cluster allows:

    * pod-label: a pod's `app` label moves to the next app; on even `n` one
      of node 1's pods (its own policy changes), on odd `n` a pod elsewhere
      in the namespace of one of node 1's pods (peer sets change).
    * namespace-label: the `env` label of the namespace of one of node 1's
      pods moves to the next of prod, staging, dev (namespaceSelector
      env=prod and env=staging peers change).
    * policy-add: a new policy selecting a node 1 pod's app in its namespace,
      allowing ingress on its named port `http` and TCP 9090 from the pods of
      a team's namespaces and from 10.244.0.0/16 except one node's pods.
    * policy-remove: one of the policies that select one of node 1's pods
      (not by the empty selector: default-deny-ingress stays), else one of
      its namespace (the count of policies stays as it was after add and
      remove).
    * pod-add-elsewhere: a new pod on another node (not node 1), in the
      namespace of one of node 1's pods, random app and role.
    """
    local = c.pods_on(c.local_node)
    if not local:
        raise ValueError("node 1 has no pod: nothing a change could touch")
    subject = local[rng.randrange(len(local))]
    ns = _meta(subject)["namespace"]
    if kind == "pod-label":
        if n % 2 == 0:
            target = subject
        else:
            others = [p for p in c.pods.values() if _meta(p)["namespace"] == ns
                      and p["spec"]["nodeName"] != c.local_node]
            target = others[rng.randrange(len(others))] if others else subject
        app = int(_meta(target)["labels"]["app"].split("-")[1])
        new = f"app-{(app + 1) % c.shape.apps}"
        c.relabel_pod(key_of(target), {"app": new})
        return f"pod {key_of(target)} ({target['spec']['nodeName']}) app -> {new}"
    if kind == "namespace-label":
        env = _meta(c.namespaces[ns])["labels"]["env"]
        new = ENVS[(ENVS.index(env) + 1) % len(ENVS)]
        c.relabel_namespace(ns, {"env": new})
        return f"namespace {ns} env {env} -> {new}"
    if kind == "policy-add":
        app = _meta(subject)["labels"]["app"]
        name = f"added-{c.added_policies:04d}"
        c.added_policies += 1
        hole = pod_cidr(rng.randrange(1, c.shape.nodes + 1))
        c.put("NetworkPolicy", _np(
            ns, name, {"matchLabels": {"app": app}}, ["Ingress"],
            [{"from": [{"namespaceSelector": {"matchLabels": {
                "team": f"team-{rng.randrange(TEAMS)}"}}},
                       {"ipBlock": {"cidr": str(POD_SUPERNET), "except": [hole]}}],
              "ports": [{"port": "http"}, {"protocol": "TCP", "port": 9090}]}]))
        return f"policy {ns}/{name} added (app={app})"
    if kind == "policy-remove":
        labels = _meta(subject)["labels"]
        mine = sorted(k for k, p in c.policies.items() if k.startswith(f"{ns}/")
                      and p["spec"].get("podSelector")
                      and parse_selector(p["spec"]["podSelector"]).matches(labels))
        if not mine:
            mine = sorted(k for k in c.policies if k.startswith(f"{ns}/")) or sorted(c.policies)
        key = mine[rng.randrange(len(mine))]
        c.delete("NetworkPolicy", key)
        return f"policy {key} removed"
    if kind == "pod-add-elsewhere":
        if c.shape.nodes < 2:
            raise ValueError("pod-add-elsewhere needs a second node")
        k = 2 + n % (c.shape.nodes - 1)
        host = EXTRA_POD_HOSTS[(n // (c.shape.nodes - 1)) % len(EXTRA_POD_HOSTS)]
        ip = str(POD_SUPERNET.network_address + (k << 8) + host)
        c.added_pods += 1
        pod = make_pod(f"added-{c.added_pods:04d}", ns, c.node_names[k - 1], ip,
                       rng.randrange(c.shape.apps), rng.choice(ROLES))
        c.put("Pod", pod)
        return f"pod {key_of(pod)} added on {c.node_names[k - 1]} ({ip})"
    raise ValueError(f"unknown change {kind!r}; one of {', '.join(CHANGES)}")
