"""The policy compiler: NetworkPolicy and ClusterNetworkPolicy objects in,
the compiled rules of one node's pods out (pcn_policy.rules
is the output's contract and describes how the policy cube evaluates it).

Pure: no kernel, no API server, no clock. Objects are plain dicts as the API
returns them (JSON). `compile_node()` gives, for every pod of a node that
policy can apply to, its `PodPolicy`, and the `AddressSet`s its rules refer
to; `evaluate()` is the reference evaluation of one packet (what the BPF
cube must agree with); `explain()` answers "would A -> B on P be allowed,
and by which rule" over both A's egress and B's ingress.

Semantics, from the API documentation and upstream behaviour:

* NetworkPolicy (networking.k8s.io/v1, k8s.io/api networking/v1/types.go):
  policyTypes defaults to Ingress, plus Egress when spec.egress is not empty
  (pkg/apis/networking/v1/defaults.go, SetDefaults_NetworkPolicy); a pod
  selected by a policy of a direction is isolated in it; the rules of all
  policies that select a pod add up (union). A peer's podSelector alone
  selects in the policy's namespace, namespaceSelector alone selects every
  pod of the matching namespaces, both select the matching pods of the
  matching namespaces; ipBlock is a CIDR less its `except` prefixes; an
  empty `from`/`to` is every address. An empty `ports` is every packet; a
  port without protocol is TCP, without number every port of its protocol;
  `endPort` makes a range. A named port is the destination pod's container
  port of that name and protocol: for ingress the selected pod's own (a pod
  without it gets nothing from that port), for egress each destination
  pod's (pods without it are left out of the rule's set).
* ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2,
  sigs.k8s.io/network-policy-api v0.3.0): tier Admin before NetworkPolicy
  before Baseline; within a tier lower `priority` first, equal priorities
  by name (the API leaves ties to the implementation; the name makes ours
  deterministic); within a policy, rule order. Accept and Deny decide,
  Pass skips the rest of its tier (Pass in Baseline: the default, allow).
  Peers: namespaces, pods, nodes (the IPv4 addresses of their
  status.addresses), networks; domainNames is not supported (a warning;
  the peer matches nothing). A peer with no field this code knows "fails
  closed" as the API asks: nothing for Accept rules, everything for Deny
  and Pass rules; a protocol entry it does not know does the same.
* Pods that are hostNetwork, have no IPv4 address yet, or are Succeeded or
  Failed are never peers by selector; hostNetwork pods are never subjects
  (both APIs exclude them) and finished pods need nothing.
* IPv4 only (the data plane's): IPv6 CIDRs and addresses are left out.

Cost: each distinct selector is evaluated once per compile, on label
postings (set intersections), pods with the same selecting policies share
one PodPolicy, and pods and policies are parsed once per (uid,
resourceVersion) for later compiles. compile_node() is incremental
(NodeCompiler): after a change it recomputes only the selections and
address sets that the changed pods, namespaces and nodes could alter. With
1 000 NetworkPolicies over 5 000 pods a change compiles for a node of 50
pods in 5 to 20 ms (bench policy-reconcile; a compile from nothing, about
60 ms once parsed, 300 ms cold).

Address sets are named by a digest of their meaning (the peer selectors,
CIDRs and named port, not their current members), so rules of many pods
share one set and a pod's label change is an update of the sets it joins
or leaves, not new rules.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import threading
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any, Generic, TypeVar

from pcn_policy.rules import (
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    PORTS_PER_RULE,
    PROTOCOLS,
    Action,
    AddressSet,
    Direction,
    DirectionPolicy,
    PodPolicy,
    PortMatch,
    Rule,
    RuleRef,
    SetEntry,
    used_sets,
)

log = logging.getLogger(__name__)

Obj = Mapping[str, Any]
NS_NAME_LABEL = "kubernetes.io/metadata.name"  # set by the API server on every Namespace
NP_KIND = "NetworkPolicy"
CNP_KIND = "ClusterNetworkPolicy"
IPPROTO_ICMP = 1
_LAST = 0xFFFFFFFF
_FINISHED = ("Succeeded", "Failed")
_TIERS = {"Admin": 0, "Baseline": 1}
_ACTIONS = {"Accept": Action.ACCEPT, "Deny": Action.DENY, "Pass": Action.PASS}
_CNP_PROTOCOLS = {"tcp": IPPROTO_TCP, "udp": IPPROTO_UDP, "sctp": IPPROTO_SCTP}
Interval = tuple[int, int]  # first and last IPv4 address, as integers, inclusive
T = TypeVar("T")


# ----------------------------------------------------------------------------- inputs and outputs
@dataclass(frozen=True)
class Cluster:
    """What the compiler reads, as the API returns it: every NetworkPolicy,
    ClusterNetworkPolicy, Pod (of all nodes: peers are cluster-wide),
    Namespace and Node."""

    network_policies: Sequence[Obj] = ()
    cluster_network_policies: Sequence[Obj] = ()
    pods: Sequence[Obj] = ()
    namespaces: Sequence[Obj] = ()
    nodes: Sequence[Obj] = ()


@dataclass(frozen=True)
class Compiled:
    """The compiled policy of some pods: `pods` by "namespace/name" (every
    pod of the node that is neither hostNetwork nor finished, those that no
    policy selects with an empty PodPolicy), `sets` every AddressSet their
    rules refer to, by name, and `warnings` about what was left out
    (unsupported fields), sorted and without repeats."""

    pods: dict[str, PodPolicy]
    sets: dict[str, AddressSet]
    warnings: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- label selectors
@dataclass(frozen=True)
class Selector:
    """A metav1.LabelSelector in canonical form: matchLabels as sorted
    pairs, matchExpressions as sorted (key, operator, sorted values). The
    empty selector selects everything; an invalid one (an unknown operator,
    In/NotIn without values, Exists/DoesNotExist with values: what the API
    server refuses) selects nothing, as LabelSelectorAsSelector's error
    leaves a caller with nothing."""

    labels: tuple[tuple[str, str], ...] = ()
    exprs: tuple[tuple[str, str, tuple[str, ...]], ...] = ()
    valid: bool = True

    def matches(self, labels: Mapping[str, str]) -> bool:
        if not self.valid:
            return False
        for k, v in self.labels:
            if labels.get(k) != v:
                return False
        for k, op, values in self.exprs:
            present = k in labels
            if op == "In" and not (present and labels[k] in values):
                return False
            if op == "NotIn" and present and labels[k] in values:
                return False
            if op == "Exists" and not present:
                return False
            if op == "DoesNotExist" and present:
                return False
        return True

    def meaning(self) -> list[Any]:
        """A JSON form for digests."""
        return [[list(p) for p in self.labels],
                [[k, op, list(vs)] for k, op, vs in self.exprs], self.valid]


ALL_SELECTOR = Selector()


def parse_selector(raw: Any) -> Selector:
    """The canonical form of a LabelSelector dict (None or {}: everything)."""
    if not raw:
        return ALL_SELECTOR
    if not isinstance(raw, Mapping):
        return Selector(valid=False)
    labels = tuple(sorted((str(k), str(v)) for k, v in (raw.get("matchLabels") or {}).items()))
    exprs = []
    valid = True
    for e in raw.get("matchExpressions") or []:
        op = str(e.get("operator", ""))
        values = tuple(sorted({str(v) for v in e.get("values") or []}))
        if op in ("In", "NotIn"):
            valid = valid and bool(values)
        elif op in ("Exists", "DoesNotExist"):
            valid = valid and not values
        else:
            valid = False
        exprs.append((str(e.get("key", "")), op, values))
    return Selector(labels, tuple(sorted(set(exprs))), valid)


def selector_problem(raw: Any) -> str | None:
    """Why a LabelSelector dict selects nothing although it was meant to
    select something (what the API server refuses in a NetworkPolicy; a CRD
    without that validation lets it in), or None when it is valid."""
    if not raw:
        return None
    if not isinstance(raw, Mapping):
        return f"{raw!r} is not a label selector"
    for e in raw.get("matchExpressions") or []:
        key, op = e.get("key", ""), str(e.get("operator", ""))
        values = e.get("values") or []
        if op in ("In", "NotIn") and not values:
            return f"matchExpressions {key!r} {op} needs values"
        if op in ("Exists", "DoesNotExist") and values:
            return f"matchExpressions {key!r} {op} takes no values"
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            return (f"matchExpressions {key!r}: unknown operator {op!r} (In, NotIn, Exists "
                    "or DoesNotExist)")
    return None


def _selector(raw: Any, where: str, what: str, warnings: list[str]) -> Selector:
    """parse_selector, with a warning naming the field when it is invalid."""
    problem = selector_problem(raw)
    if problem:
        warnings.append(f"{where}: {what}: {problem}; it selects nothing")
    return parse_selector(raw)


# ----------------------------------------------------------------------------- addresses
@lru_cache(maxsize=65536)
def _ip_int(ip: str) -> int | None:
    """An IPv4 address as an integer; None for IPv6 or garbage."""
    try:
        return int(ipaddress.IPv4Address(ip))
    except ValueError:
        return None


@lru_cache(maxsize=65536)
def _cidr_interval(cidr: str) -> Interval | None:
    """An IPv4 CIDR as an interval (host bits ignored, as the API allowed
    them before 1.33's stricter validation); None for IPv6 or garbage."""
    try:
        net = ipaddress.IPv4Network(cidr, strict=False)
    except ValueError:
        return None
    return int(net.network_address), int(net.broadcast_address)


def _dotted(ip: int) -> str:
    return f"{ip >> 24}.{(ip >> 16) & 255}.{(ip >> 8) & 255}.{ip & 255}"


def merge_intervals(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted, disjoint, non-adjacent intervals covering the same addresses."""
    out: list[Interval] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1] + 1:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def subtract_intervals(base: Interval, holes: Iterable[Interval]) -> list[Interval]:
    """`base` less every hole (an ipBlock's cidr less its except list)."""
    out: list[Interval] = []
    lo, hi = base
    for hlo, hhi in merge_intervals(holes):
        if hhi < lo or hlo > hi:
            continue
        if hlo > lo:
            out.append((lo, hlo - 1))
        lo = hhi + 1
        if lo > hi:
            return out
    out.append((lo, hi))
    return out


def interval_prefixes(lo: int, hi: int) -> list[str]:
    """The fewest CIDR prefixes covering lo..hi exactly (what
    ipaddress.summarize_address_range gives, on integers)."""
    return list(_interval_prefixes(lo, hi))


@lru_cache(maxsize=262144)
def _interval_prefixes(lo: int, hi: int) -> tuple[str, ...]:
    """interval_prefixes, kept: a pod's /32 and a CIDR's pieces come back in
    every compile while the cluster does not change."""
    out = []
    while lo <= hi:
        size = lo & -lo if lo else 1 << 32
        while size > hi - lo + 1:
            size >>= 1
        out.append(f"{_dotted(lo)}/{33 - size.bit_length()}")
        lo += size
    return tuple(out)


@lru_cache(maxsize=65536)
def _prefix_interval(prefix: str) -> Interval:
    net = ipaddress.IPv4Network(prefix)
    return int(net.network_address), int(net.broadcast_address)


# ----------------------------------------------------------------------------- the cluster, indexed
@dataclass(frozen=True)
class _Pod:
    key: str  # "namespace/name"
    namespace: str
    labels: Mapping[str, str]
    ips: tuple[int, ...]  # IPv4, status.podIPs (status.podIP when absent)
    node: str
    host_network: bool
    finished: bool
    named_ports: Mapping[str, tuple[int, int]]  # container port name -> (protocol, port)

    @property
    def peer(self) -> bool:
        """Whether selectors can pick it as a peer."""
        return not self.host_network and not self.finished and bool(self.ips)

    @property
    def subject(self) -> bool:
        return not self.host_network and not self.finished


def _version(o: Obj) -> tuple[str, str] | None:
    """(uid, resourceVersion): what identifies one version of an object
    (the API server changes resourceVersion on every write); None when the
    object lacks either (built by hand), which is then parsed every time."""
    meta = o.get("metadata") or {}
    uid, rv = meta.get("uid"), meta.get("resourceVersion")
    return (str(uid), str(rv)) if uid and rv else None


class _Memo(Generic[T]):
    """What was parsed from each object version, kept for the next compile
    (first in, first out beyond `size` entries). The values are immutable,
    so sharing them between compiles keeps the compiler pure."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data: dict[tuple[str, str], T] = {}

    def get(self, o: Obj, make: Callable[[Obj], T]) -> T:
        version = _version(o)
        if version is None:
            return make(o)
        hit = self.data.get(version)
        if hit is None:
            if len(self.data) >= self.size:
                del self.data[next(iter(self.data))]
            hit = self.data[version] = make(o)
        return hit


def _pod_of(o: Obj) -> _Pod:
    """A Pod, parsed once per version (a compile per change must not parse
    every pod of the cluster again)."""
    return _PODS.get(o, _parse_pod)


def _parse_pod(o: Obj) -> _Pod:
    meta = o.get("metadata") or {}
    spec = o.get("spec") or {}
    status = o.get("status") or {}
    raw_ips = [p.get("ip") for p in status.get("podIPs") or []] or [status.get("podIP")]
    ips = tuple(dict.fromkeys(i for i in (_ip_int(str(r)) for r in raw_ips if r) if i is not None))
    ports: dict[str, tuple[int, int]] = {}
    # Sidecars (restartable init containers) serve ports as containers do.
    for c in list(spec.get("containers") or []) + list(spec.get("initContainers") or []):
        for p in c.get("ports") or []:
            name, number = p.get("name"), p.get("containerPort")
            proto = PROTOCOLS.get(str(p.get("protocol") or "TCP").upper())
            if name and isinstance(number, int) and proto and name not in ports:
                ports[str(name)] = (proto, number)
    ns, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
    return _Pod(f"{ns}/{name}", ns, dict(meta.get("labels") or {}), ips,
                str(spec.get("nodeName") or ""), bool(spec.get("hostNetwork")),
                status.get("phase") in _FINISHED, ports)


_PODS: _Memo[_Pod] = _Memo(65536)


def node_ipv4s(node: Obj, types: tuple[str, ...] = ("InternalIP", "ExternalIP")
               ) -> tuple[int, ...]:
    """The IPv4 addresses of a Node's status.addresses of the given types,
    as integers, in order. By default InternalIP and ExternalIP (Hostname
    entries are names): what a ClusterNetworkPolicy `nodes` peer selects
    ("the IPs present in the node.Status.Addresses field")."""
    out = []
    for a in (node.get("status") or {}).get("addresses") or []:
        if a.get("type") in types:
            ip = _ip_int(str(a.get("address") or ""))
            if ip is not None and ip not in out:
                out.append(ip)
    return tuple(out)


@dataclass(frozen=True)
class _Peer:
    """One peer of a rule, canonical: `kind` "pods" (the pods `pod_sel`
    selects in `namespace`, or in the namespaces `ns_sel` selects), "cidr"
    (`cidr` less `excepts`), "nodes" (the addresses of the nodes `ns_sel`,
    here a node selector, selects) or "all" (every address)."""

    kind: str
    namespace: str = ""
    ns_sel: Selector | None = None
    pod_sel: Selector = ALL_SELECTOR
    cidr: str = ""
    excepts: tuple[str, ...] = ()

    def meaning(self) -> list[Any]:
        return [self.kind, self.namespace, None if self.ns_sel is None else self.ns_sel.meaning(),
                self.pod_sel.meaning(), self.cidr, list(self.excepts)]


ALL_PEERS = (_Peer("all"),)


@dataclass(frozen=True)
class _Meaning:
    """What an address set stands for: the union of `peers`; with `named`
    (port name, protocol, 0: the container port's own), the peer pods that
    have that port, each with it."""

    peers: tuple[_Peer, ...]
    named: tuple[str, int] | None = None

    def digest(self) -> str:
        text = json.dumps([sorted(json.dumps(p.meaning()) for p in self.peers),
                           list(self.named) if self.named else None], separators=(",", ":"))
        return "ps-" + hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class _Delta:
    """What one refresh of an _Index changed: each pod that changed as
    (before, after) (None: absent), the namespaces whose labels changed
    (added and removed ones included), the namespace selectors whose
    selection changed with them, and whether any Node changed."""

    pods: list[tuple[_Pod | None, _Pod | None]]
    namespaces: set[str]
    ns_selectors: set[Selector]
    nodes: bool
    touched: list[_Pod] = field(init=False)

    def __post_init__(self) -> None:
        # the changed pods that can be policy peers, before and after: what
        # both the index's caches and the compiler's sets are dropped by
        self.touched = [p for pair in self.pods for p in pair if p is not None and p.peer]


def _namespace_labels(cluster: Cluster, pods: Iterable[_Pod]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for o in cluster.namespaces:
        meta = o.get("metadata") or {}
        name = str(meta.get("name") or "")
        # The API server sets the name label on every Namespace; objects
        # built by other means (tests, older servers) may lack it.
        out[name] = {**(meta.get("labels") or {}), NS_NAME_LABEL: name}
    for p in pods:  # a pod's namespace exists even if it was not listed
        out.setdefault(p.namespace, {NS_NAME_LABEL: p.namespace})
    return out


def _nodes_of(cluster: Cluster) -> list[tuple[str, dict[str, str], tuple[int, ...]]]:
    return sorted(((str((n.get("metadata") or {}).get("name") or ""),
                    dict((n.get("metadata") or {}).get("labels") or {}), node_ipv4s(n))
                   for n in cluster.nodes), key=lambda n: n[0])


class _Index:
    """Pods by namespace and label, namespaces and nodes by name, with
    selector matches cached: one compile evaluates each distinct selector
    once, with set intersections on the label postings instead of a scan.

    A pod keeps its number while its key ("namespace/name") stays in the
    cluster, so `refresh()` can move the index to a later state of the
    cluster by the pods that changed, dropping only the cached selections
    they (or the namespaces that changed) could alter. Orders that matter
    (which pod holds a reused address, which pod's named port wins) follow
    the pods' keys, never their numbers."""

    def __init__(self, cluster: Cluster) -> None:
        self.pods: dict[int, _Pod] = {}
        self.by_key: dict[str, int] = {}
        self.peers_in_ns: dict[str, set[int]] = {}
        self.postings: dict[tuple[str, str], set[int]] = {}
        self.with_key: dict[str, set[int]] = {}
        self.all_peers: set[int] = set()
        self.by_ip: dict[int, set[int]] = {}
        self._serving: dict[str, set[int]] = {}
        self._next = 0
        for o in cluster.pods:
            self._put(_pod_of(o))
        self.ns_labels = _namespace_labels(cluster, self.pods.values())
        self.nodes = _nodes_of(cluster)
        self.internal_ips = {str((n.get("metadata") or {}).get("name") or ""):
                             node_ipv4s(n, ("InternalIP",)) for n in cluster.nodes}
        self._sel_cache: dict[Selector, frozenset[int]] = {}
        self._ns_cache: dict[Selector, tuple[str, ...]] = {}
        self._peer_cache: dict[_Peer, frozenset[int]] = {}

    # --- pods in and out
    def _put(self, pod: _Pod) -> None:
        i = self.by_key.get(pod.key)
        if i is not None:
            self._drop(i)
        else:
            i = self._next
            self._next += 1
        self.by_key[pod.key] = i
        self.pods[i] = pod
        if not pod.peer:
            return
        self.all_peers.add(i)
        self.peers_in_ns.setdefault(pod.namespace, set()).add(i)
        for k, v in pod.labels.items():
            self.postings.setdefault((k, v), set()).add(i)
            self.with_key.setdefault(k, set()).add(i)
        for ip in pod.ips:
            self.by_ip.setdefault(ip, set()).add(i)
        for name in pod.named_ports:
            self._serving.setdefault(name, set()).add(i)

    def _drop(self, i: int) -> None:
        """Take pod `i` out of every posting (it keeps its number)."""
        pod = self.pods.pop(i)
        if not pod.peer:
            return
        self.all_peers.discard(i)
        self.peers_in_ns[pod.namespace].discard(i)
        for k, v in pod.labels.items():
            self.postings[(k, v)].discard(i)
            self.with_key[k].discard(i)
        for ip in pod.ips:
            self.by_ip[ip].discard(i)
        for name in pod.named_ports:
            self._serving[name].discard(i)

    def refresh(self, cluster: Cluster, limit: int) -> _Delta | None:
        """Bring the index to `cluster`, a later state of the one it holds;
        None (and the index unusable) when more than `limit` pods changed:
        then building a new one is cheaper."""
        now: dict[str, _Pod] = {}
        for o in cluster.pods:
            p = _pod_of(o)
            now[p.key] = p
        changed: list[tuple[_Pod | None, _Pod | None]] = []
        for key, p in now.items():
            i = self.by_key.get(key)
            old = self.pods[i] if i is not None else None
            if old is not p and old != p:
                changed.append((old, p))
        changed.extend((self.pods[i], None) for key, i in self.by_key.items() if key not in now)
        if len(changed) > limit:
            return None
        for old, new in changed:
            if new is not None:
                self._put(new)
            elif old is not None:
                self._drop(self.by_key.pop(old.key))
        labels = _namespace_labels(cluster, now.values())
        namespaces = {n for n in labels.keys() | self.ns_labels.keys()
                      if labels.get(n) != self.ns_labels.get(n)}
        self.ns_labels = labels
        ns_selectors: set[Selector] = set()
        for sel, names in list(self._ns_cache.items()):
            now_in = tuple(sorted({*names, *namespaces}))
            picked = tuple(n for n in now_in if n in labels and sel.matches(labels[n]))
            if picked != names:
                ns_selectors.add(sel)
                self._ns_cache[sel] = picked
        nodes = _nodes_of(cluster)
        internal = {str((n.get("metadata") or {}).get("name") or ""):
                    node_ipv4s(n, ("InternalIP",)) for n in cluster.nodes}
        nodes_changed = nodes != self.nodes or internal != self.internal_ips
        self.nodes, self.internal_ips = nodes, internal
        delta = _Delta(changed, namespaces, ns_selectors, nodes_changed)
        self._forget(delta)
        return delta

    def _forget(self, delta: _Delta) -> None:
        """Drop the cached selections `delta` could have changed."""
        touched = delta.touched
        if touched:
            self._sel_cache = {sel: hit for sel, hit in self._sel_cache.items()
                               if not any(sel.matches(p.labels) for p in touched)}
        self._peer_cache = {peer: hit for peer, hit in self._peer_cache.items()
                            if not self.may_hold(peer, touched, delta)}

    def may_hold(self, peer: _Peer, pods: Sequence[_Pod], delta: _Delta) -> bool:
        """Whether the selection of "pods" peer `peer` may differ after
        `delta`: its namespace selection changed, or one of `pods` (the
        pods before and after the change) is or was in it."""
        if peer.kind != "pods":
            return False
        if peer.ns_sel is not None and peer.ns_sel in delta.ns_selectors:
            return True
        for p in pods:
            if peer.ns_sel is None:
                if p.namespace != peer.namespace:
                    continue
            elif p.namespace not in self.namespaces(peer.ns_sel):
                continue  # (a pod's namespace is part of its key: never changes)
            if peer.pod_sel.matches(p.labels):
                return True
        return False

    # --- queries
    def namespaces(self, sel: Selector) -> tuple[str, ...]:
        """The names of the namespaces `sel` selects, sorted."""
        hit = self._ns_cache.get(sel)
        if hit is None:
            hit = tuple(sorted(n for n, labels in self.ns_labels.items() if sel.matches(labels)))
            self._ns_cache[sel] = hit
        return hit

    def select(self, sel: Selector) -> frozenset[int]:
        """The peer pods (any namespace) whose labels `sel` selects."""
        hit = self._sel_cache.get(sel)
        if hit is not None:
            return hit
        if not sel.valid:
            found: set[int] = set()
        else:
            positive: list[set[int]] = [self.postings.get(kv, set()) for kv in sel.labels]
            for k, op, values in sel.exprs:
                if op == "In":
                    positive.append(set().union(*(self.postings.get((k, v), set())
                                                  for v in values)))
                elif op == "Exists":
                    positive.append(self.with_key.get(k, set()))
            if positive:
                positive.sort(key=len)
                found = positive[0].intersection(*positive[1:])
            else:
                found = self.all_peers
            if any(op in ("NotIn", "DoesNotExist") for _, op, _ in sel.exprs):
                found = {i for i in found if sel.matches(self.pods[i].labels)}
        hit = frozenset(found)
        self._sel_cache[sel] = hit
        return hit

    def peer_pods(self, peer: _Peer) -> frozenset[int]:
        """The pods of a "pods" peer."""
        hit = self._peer_cache.get(peer)
        if hit is not None:
            return hit
        names = (peer.namespace,) if peer.ns_sel is None else self.namespaces(peer.ns_sel)
        in_ns: set[int] = set().union(*(self.peers_in_ns.get(n, set()) for n in names))
        hit = frozenset(in_ns if peer.pod_sel == ALL_SELECTOR else in_ns & self.select(peer.pod_sel))
        self._peer_cache[peer] = hit
        return hit

    def serving(self, port_name: str) -> list[int]:
        """The peer pods with a container port named `port_name`, by key."""
        return sorted(self._serving.get(port_name, ()), key=lambda i: self.pods[i].key)

    def holder(self, ip: int) -> _Pod | None:
        """The peer pod with address `ip` (of several, the first by key:
        a finished pod's address given to a new one is the new one's)."""
        held = self.by_ip.get(ip)
        return min((self.pods[i] for i in held), key=lambda p: p.key) if held else None

    def node_ips(self, sel: Selector) -> list[int]:
        return [ip for _, labels, ips in self.nodes if sel.matches(labels) for ip in ips]

    def subject_matches(self, pod: _Pod, ns_sel: Selector | None, namespace: str,
                        pod_sel: Selector) -> bool:
        """Whether a policy's subject (its namespace, or the namespaces
        `ns_sel` selects, and `pod_sel`) includes `pod`."""
        if ns_sel is None:
            if pod.namespace != namespace:
                return False
        elif pod.namespace not in self.namespaces(ns_sel):
            return False
        return pod_sel.matches(pod.labels)


# ----------------------------------------------------------------------------- policies, parsed
@dataclass(frozen=True)
class _Port:
    """A port of a rule: `proto` (0: any; for a named port, the container
    port's own), `lo`..`hi`, or the container port `name`."""

    proto: int
    lo: int = 0
    hi: int = 65535
    name: str | None = None


@dataclass(frozen=True)
class _Rule:
    ref: RuleRef
    peers: tuple[_Peer, ...]  # () matches nothing
    ports: tuple[_Port, ...] | None  # None: any packet; (): none (every port unusable)
    action: Action = Action.ACCEPT

    @cached_property
    def per_subject(self) -> bool:
        """Whether it compiles differently per subject pod: an ingress rule
        with named ports (the subject's own container ports)."""
        return self.ref.direction == Direction.INGRESS and any(
            p.name is not None for p in self.ports or ())


@dataclass(frozen=True)
class _Policy:
    kind: str
    namespace: str  # a NetworkPolicy's; "" for a ClusterNetworkPolicy
    name: str
    ns_sel: Selector | None  # subject namespaces (None: `namespace`)
    pod_sel: Selector
    ingress: tuple[_Rule, ...] | None  # None: this policy has no say in that direction
    egress: tuple[_Rule, ...] | None
    tier: int = -1  # ClusterNetworkPolicy: 0 Admin, 1 Baseline
    priority: int = 0

    def rules(self, d: Direction) -> tuple[_Rule, ...] | None:
        return self.ingress if d == Direction.INGRESS else self.egress

    @cached_property
    def per_subject(self) -> bool:
        """Whether a rule of it compiles differently per subject pod."""
        return any(r.per_subject for r in self.ingress or ())


def _np_port(raw: Obj, where: str, warnings: list[str]) -> _Port | None:
    proto_name = str(raw.get("protocol") or "TCP").upper()
    proto = PROTOCOLS.get(proto_name)
    if proto is None:
        warnings.append(f"{where}: protocol {proto_name} has no ports; the port is left out")
        return None
    port = raw.get("port")
    if port is None:
        return _Port(proto)
    if isinstance(port, str) and not port.isdigit():
        return _Port(proto, name=port)
    lo = int(port)
    end = raw.get("endPort")
    hi = int(end) if end is not None else lo
    if not 0 < lo <= hi <= 65535:
        warnings.append(f"{where}: port range {lo}-{hi} is not within 1-65535; left out")
        return None
    return _Port(proto, lo, hi)


def _np_peer(raw: Obj, namespace: str, where: str, warnings: list[str]) -> _Peer | None:
    block = raw.get("ipBlock")
    if block:
        cidr = str(block.get("cidr") or "")
        if _cidr_interval(cidr) is None:
            if ":" not in cidr:
                warnings.append(f"{where}: ipBlock {cidr!r} is not a CIDR; left out")
            return None  # IPv6 blocks have nothing to do in an IPv4 data plane
        excepts = tuple(sorted(str(e) for e in block.get("except") or []
                               if _cidr_interval(str(e)) is not None))
        return _Peer("cidr", cidr=cidr, excepts=excepts)
    pod_raw, ns_raw = raw.get("podSelector"), raw.get("namespaceSelector")
    if pod_raw is None and ns_raw is None:
        warnings.append(f"{where}: a peer with no podSelector, namespaceSelector or ipBlock; "
                        "left out")
        return None
    if ns_raw is None:
        return _Peer("pods", namespace=namespace,
                     pod_sel=_selector(pod_raw, where, "podSelector", warnings))
    return _Peer("pods", ns_sel=_selector(ns_raw, where, "namespaceSelector", warnings),
                 pod_sel=_selector(pod_raw, where, "podSelector", warnings))


def _parse_network_policy(o: Obj, warnings: list[str]) -> _Policy:
    meta = o.get("metadata") or {}
    ns, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
    spec = o.get("spec") or {}
    types = [str(t) for t in spec.get("policyTypes") or []]
    if not types:  # SetDefaults_NetworkPolicy
        types = ["Ingress"] + (["Egress"] if spec.get("egress") else [])
    sides: dict[Direction, tuple[_Rule, ...] | None] = {}
    for d, key, peers_key in ((Direction.INGRESS, "ingress", "from"),
                              (Direction.EGRESS, "egress", "to")):
        if key.capitalize() not in types:
            sides[d] = None
            continue
        rules = []
        for i, r in enumerate(spec.get(key) or []):
            ref = RuleRef(NP_KIND, ns, name, d, i)
            raw_peers = r.get(peers_key) or []
            peers: list[_Peer] = []
            for p in raw_peers:
                peer = _np_peer(p, ns, str(ref), warnings)
                if peer is not None:
                    peers.append(peer)
            if not raw_peers:
                peers = list(ALL_PEERS)
            raw_ports = r.get("ports") or []
            ports = [q for q in (_np_port(p, str(ref), warnings) for p in raw_ports) if q]
            rules.append(_Rule(ref, tuple(peers), tuple(ports) if raw_ports else None))
        sides[d] = tuple(rules)
    return _Policy(NP_KIND, ns, name, None,
                   _selector(spec.get("podSelector"), f"{NP_KIND} {ns}/{name}", "spec.podSelector",
                             warnings),
                   sides[Direction.INGRESS], sides[Direction.EGRESS])


def _parse_np(o: Obj) -> tuple[_Policy, tuple[str, ...]]:
    warnings: list[str] = []
    return _parse_network_policy(o, warnings), tuple(warnings)


def _parse_cnp(o: Obj) -> tuple[_Policy | None, tuple[str, ...]]:
    warnings: list[str] = []
    return _parse_cluster_network_policy(o, warnings), tuple(warnings)


_LOGGED: set[str] = set()
_NPS: _Memo[tuple[_Policy, tuple[str, ...]]] = _Memo(16384)
_CNPS: _Memo[tuple[_Policy | None, tuple[str, ...]]] = _Memo(4096)


def _cnp_ports(raw: Sequence[Obj], action: Action, where: str,
               warnings: list[str]) -> tuple[_Port, ...] | None:
    if not raw:
        return None
    out = []
    for entry in raw:
        known = False
        for key, proto in _CNP_PROTOCOLS.items():
            if key not in entry:
                continue
            known = True
            dest = (entry.get(key) or {}).get("destinationPort")
            if not dest:
                out.append(_Port(proto))
            elif dest.get("range"):
                lo, hi = int(dest["range"].get("start", 0)), int(dest["range"].get("end", 0))
                out.append(_Port(proto, lo, hi))
            else:
                out.append(_Port(proto, int(dest.get("number", 0)), int(dest.get("number", 0))))
        if entry.get("destinationNamedPort"):
            known = True
            out.append(_Port(0, name=str(entry["destinationNamedPort"])))
        if not known:
            warnings.append(f"{where}: a protocol entry with no field this version knows; "
                            + ("it matches nothing" if action == Action.ACCEPT
                               else "it matches every packet (fail closed)"))
            if action != Action.ACCEPT:
                return None
    valid = []
    for p in out:
        if p.name is None and (p.lo, p.hi) != (0, 65535) and not 0 < p.lo <= p.hi <= 65535:
            warnings.append(f"{where}: port range {p.lo}-{p.hi} is not within 1-65535; left out")
            continue
        valid.append(p)
    return tuple(valid)


def _cnp_peer(raw: Obj, egress: bool, action: Action, where: str,
              warnings: list[str]) -> list[_Peer]:
    out: list[_Peer] = []
    known = False
    if raw.get("namespaces") is not None:
        known = True
        out.append(_Peer("pods", ns_sel=_selector(raw["namespaces"], where, "namespaces",
                                                  warnings)))
    if raw.get("pods") is not None:
        known = True
        pods = raw["pods"]
        out.append(_Peer("pods", ns_sel=_selector(pods.get("namespaceSelector"), where,
                                                  "pods.namespaceSelector", warnings),
                         pod_sel=_selector(pods.get("podSelector"), where, "pods.podSelector",
                                           warnings)))
    if egress and raw.get("nodes") is not None:
        known = True
        out.append(_Peer("nodes", ns_sel=_selector(raw["nodes"], where, "nodes", warnings)))
    if egress and raw.get("networks") is not None:
        known = True
        for cidr in raw["networks"] or []:
            if _cidr_interval(str(cidr)) is not None:
                out.append(_Peer("cidr", cidr=str(cidr)))
            elif ":" not in str(cidr):
                warnings.append(f"{where}: network {cidr!r} is not a CIDR; left out")
    if egress and raw.get("domainNames") is not None:
        known = True
        warnings.append(f"{where}: domainNames peers are not supported; they match nothing")
    if not known:
        warnings.append(f"{where}: a peer with no field this version knows; "
                        + ("it matches nothing" if action == Action.ACCEPT
                           else "it matches every address (fail closed)"))
        if action != Action.ACCEPT:
            out.append(ALL_PEERS[0])
    return out


def _parse_cluster_network_policy(o: Obj, warnings: list[str]) -> _Policy | None:
    """None (and a warning) for a tier this version does not know."""
    meta = o.get("metadata") or {}
    name = str(meta.get("name") or "")
    spec = o.get("spec") or {}
    tier = _TIERS.get(str(spec.get("tier")))
    if tier is None:
        warnings.append(f"{CNP_KIND} {name}: unknown tier {spec.get('tier')!r}; ignored")
        return None
    subject = spec.get("subject") or {}
    if subject.get("namespaces") is not None:
        ns_sel = _selector(subject["namespaces"], f"{CNP_KIND} {name}", "subject.namespaces",
                           warnings)
        pod_sel = ALL_SELECTOR
    elif subject.get("pods") is not None:
        ns_sel = _selector(subject["pods"].get("namespaceSelector"), f"{CNP_KIND} {name}",
                           "subject.pods.namespaceSelector", warnings)
        pod_sel = _selector(subject["pods"].get("podSelector"), f"{CNP_KIND} {name}",
                            "subject.pods.podSelector", warnings)
    else:
        warnings.append(f"{CNP_KIND} {name}: a subject with no field this version knows; "
                        "it selects nothing")
        ns_sel = pod_sel = Selector(valid=False)
    sides: dict[Direction, tuple[_Rule, ...]] = {}
    for d, key, peers_key in ((Direction.INGRESS, "ingress", "from"),
                              (Direction.EGRESS, "egress", "to")):
        rules = []
        for i, r in enumerate(spec.get(key) or []):
            ref = RuleRef(CNP_KIND, "", name, d, i, str(r.get("name") or ""))
            action = _ACTIONS.get(str(r.get("action")))
            if action is None:
                warnings.append(f"{ref}: unknown action {r.get('action')!r}; taken as Deny "
                                "(fail closed)")
                action = Action.DENY
            peers = [p for raw in r.get(peers_key) or []
                     for p in _cnp_peer(raw, d == Direction.EGRESS, action, str(ref), warnings)]
            ports = _cnp_ports(r.get("protocols") or [], action, str(ref), warnings)
            rules.append(_Rule(ref, tuple(peers), ports, action))
        sides[d] = tuple(rules)
    return _Policy(CNP_KIND, "", name, ns_sel, pod_sel, sides[Direction.INGRESS],
                   sides[Direction.EGRESS], tier, int(spec.get("priority") or 0))


# ----------------------------------------------------------------------------- the compiler
def _merge_ports(ports: Iterable[PortMatch]) -> list[PortMatch]:
    """Overlapping or adjacent ranges of one protocol as one."""
    out: list[PortMatch] = []
    for p in sorted(set(ports)):
        last = out[-1] if out else None
        if last and last.proto == p.proto and p.port_lo <= last.port_hi + 1:
            out[-1] = PortMatch(p.proto, last.port_lo, max(last.port_hi, p.port_hi))
        else:
            out.append(p)
    return out


@lru_cache(maxsize=4096)
def _entries_of(merged: tuple[Interval, ...]) -> tuple[SetEntry, ...]:
    """The entries of a set of plain addresses (`merged`: disjoint,
    sorted), kept from one compile to the next: a change leaves most sets
    as they were, and turning thousands of addresses into prefixes was most
    of a compile."""
    return tuple(_Compiler._entry(p) for lo, hi in merged for p in _interval_prefixes(lo, hi))


class _Compiler:
    """One compile's state; kept by a NodeCompiler and moved to the next
    state of the cluster with `refresh()`, it keeps what the change did
    not touch: address sets, PodPolicies, selections."""

    def __init__(self, cluster: Cluster) -> None:
        self.idx = _Index(cluster)
        self.sets: dict[_Meaning, AddressSet] = {}
        self.names: dict[_Meaning, str] = {}
        self.meanings: dict[str, _Meaning] = {}
        # PodPolicy by what it depends on: the policies selecting the pod
        # (by id; the entry holds them, so no id is reused while it lives)
        # and, when one of them has ingress named ports, the pod's ports
        self._pod_policies: dict[tuple[Any, ...],
                                 tuple[PodPolicy, tuple[_Policy, ...]]] = {}
        self._policies(cluster)

    def _policies(self, cluster: Cluster) -> None:
        self.warnings: list[str] = []
        self.nps_by_ns: dict[str, list[_Policy]] = {}
        nps = []
        for o in cluster.network_policies:
            np, warned = _NPS.get(o, _parse_np)
            nps.append(np)
            self.warnings.extend(warned)
        for np in sorted(nps, key=lambda p: (p.namespace, p.name)):
            self.nps_by_ns.setdefault(np.namespace, []).append(np)
        cnps = []
        for o in cluster.cluster_network_policies:
            cnp, warned = _CNPS.get(o, _parse_cnp)
            if cnp is not None:
                cnps.append(cnp)
            self.warnings.extend(warned)
        self.cnps = sorted(cnps, key=lambda p: (p.tier, p.priority, p.name))
        # by id(_Rule) (alive as long as self.nps_by_ns and self.cnps) and
        # the subject's resolved named ports
        self._rules: dict[tuple[int, tuple[tuple[int, int] | None, ...]], tuple[Rule, ...]] = {}

    def refresh(self, cluster: Cluster, limit: int) -> bool:
        """Move to `cluster`, a later state of the one compiled, keeping the
        sets nothing changed; False (and this compiler unusable) when more
        than `limit` pods changed."""
        delta = self.idx.refresh(cluster, limit)
        if delta is None:
            return False
        self.sets = {m: s for m, s in self.sets.items()
                     if not self._stale(m, delta.touched, delta)}
        self._policies(cluster)
        return True

    def _stale(self, meaning: _Meaning, pods: Sequence[_Pod], delta: _Delta) -> bool:
        """Whether the members of `meaning`'s set may differ after `delta`
        (`pods`: the changed peer pods, before and after)."""
        for peer in meaning.peers:
            if peer.kind == "nodes" and delta.nodes:
                return True
            if self.idx.may_hold(peer, pods, delta):
                return True
        if meaning.named is None:
            return False
        # a set of named ports also holds the pods with that port inside
        # its CIDR peers (any except: a pod in one is only looked at again)
        serving = [p for p in pods if meaning.named[0] in p.named_ports]
        for peer in meaning.peers:
            if peer.kind == "all" and serving:
                return True
            if peer.kind == "cidr":
                lo, hi = _cidr_interval(peer.cidr) or (1, 0)
                if any(lo <= ip <= hi for p in serving for ip in p.ips):
                    return True
        return False

    def keep_only(self, names: set[str]) -> None:
        """Forget the sets and PodPolicies of the last compile that are not
        among `names` / not used: what a long-lived compiler holds stays
        the size of one node's policy."""
        self.meanings = {n: m for n, m in self.meanings.items() if n in names}
        self.names = {m: n for n, m in self.meanings.items()}
        self.sets = {m: s for m, s in self.sets.items() if m in self.names}

    # --- address sets
    @staticmethod
    @lru_cache(maxsize=262144)
    def _entry(prefix: str, proto: int = 0, port: int = 0) -> SetEntry:
        """Entries are immutable and validate their prefix when built: one
        per distinct value, shared by the sets and compiles that hold it."""
        return SetEntry(prefix, proto, port)

    def set_name(self, meaning: _Meaning) -> str:
        """The name of the set for `meaning` (its members are computed when
        a compile needs them: address_set)."""
        name = self.names.get(meaning)
        if name is None:
            name = self.names[meaning] = meaning.digest()
            self.meanings[name] = meaning
        return name

    def address_set(self, meaning: _Meaning) -> AddressSet:
        """The set for `meaning`, computed on first use."""
        s = self.sets.get(meaning)
        if s is not None:
            return s
        ranges: list[Interval] = []
        node_ranges: list[Interval] = []
        pods: set[int] = set()
        for peer in meaning.peers:
            if peer.kind == "all":
                ranges.append((0, _LAST))
            elif peer.kind == "cidr":
                base = _cidr_interval(peer.cidr)
                holes = [h for h in map(_cidr_interval, peer.excepts) if h is not None]
                if base is not None:
                    ranges.extend(subtract_intervals(base, holes))
            elif peer.kind == "nodes":
                node_ranges.extend((ip, ip) for ip in self.idx.node_ips(peer.ns_sel or ALL_SELECTOR))
            else:
                pods |= self.idx.peer_pods(peer)
        entries: list[SetEntry] = []
        if meaning.named is None:
            ranges += node_ranges
            ranges += [(ip, ip) for i in pods for ip in self.idx.pods[i].ips]
            entries.extend(_entries_of(tuple(merge_intervals(ranges))))
        else:
            # A named port is a pod's: CIDR peers give the pods inside them
            # that have it; node addresses have no named ports.
            name, proto = meaning.named
            merged = merge_intervals(ranges)
            starts = [lo for lo, _ in merged]

            def inside(ip: int) -> bool:
                k = bisect_right(starts, ip) - 1
                return k >= 0 and ip <= merged[k][1]

            everything = merged == [(0, _LAST)]
            seen: set[int] = set()
            for i in self.idx.serving(name):
                pod = self.idx.pods[i]
                found = pod.named_ports[name]
                if proto and found[0] != proto:
                    continue
                if not (everything or i in pods
                        or (merged and any(inside(ip) for ip in pod.ips))):
                    continue
                for ip in pod.ips:
                    if ip not in seen:  # one port per address (a stale pod's IP reused)
                        seen.add(ip)
                        entries.append(self._entry(f"{_dotted(ip)}/32", *found))
        s = AddressSet(self.set_name(meaning), frozenset(entries))
        self.sets[meaning] = s
        return s

    # --- rules
    def rules_for(self, rule: _Rule, subject: _Pod) -> tuple[Rule, ...]:
        """The compiled rules of one policy rule for one subject pod: the
        numeric ports in rules of at most PORTS_PER_RULE ports, and a
        named-port rule per (name, protocol) of an egress rule (of an
        ingress rule, named ports are the subject's own, numeric)."""
        if not rule.peers or rule.ports == ():
            return ()
        ingress_named = rule.per_subject
        resolved = tuple(subject.named_ports.get(p.name) for p in rule.ports or ()
                         if p.name is not None) if ingress_named else ()
        key = (id(rule), resolved)
        hit = self._rules.get(key)
        if hit is not None:
            return hit
        peers = self.set_name(_Meaning(rule.peers))
        if rule.ports is None:
            out: tuple[Rule, ...] = (Rule(peers, (), action=rule.action, ref=rule.ref),)
        else:
            numeric: list[PortMatch] = []
            named: set[tuple[str, int]] = set()
            for p in rule.ports:
                if p.name is None:
                    numeric.append(PortMatch(p.proto, p.lo, p.hi))
                elif ingress_named:
                    found = subject.named_ports.get(p.name)
                    if found and (not p.proto or found[0] == p.proto):
                        numeric.append(PortMatch(found[0], found[1], found[1]))
                else:
                    named.add((p.name, p.proto))
            merged = _merge_ports(numeric)
            rules = [Rule(peers, tuple(merged[i:i + PORTS_PER_RULE]), action=rule.action,
                          ref=rule.ref) for i in range(0, len(merged), PORTS_PER_RULE)]
            for name, proto in sorted(named):
                rules.append(Rule(self.set_name(_Meaning(rule.peers, (name, proto))),
                                  named_port=True, action=rule.action, ref=rule.ref))
            out = tuple(rules)
        self._rules[key] = out
        return out

    def compile(self, subjects: Iterable[int], keep: bool = False) -> Compiled:
        """The PodPolicies of pods `subjects` and the sets they use. With
        `keep` (a NodeCompiler's), what this compile did not use is
        forgotten."""
        pods: dict[str, PodPolicy] = {}
        used: set[str] = set()
        keys: set[tuple[Any, ...]] = set()
        for pod in sorted((self.idx.pods[i] for i in subjects), key=lambda p: p.key):
            key, policy = self._pod_policy_of(pod)
            keys.add(key)
            pods[pod.key] = policy
            used.update(r.peers for d in (policy.ingress, policy.egress) for r in d.rules)
        sets = {name: self.address_set(self.meanings[name]) for name in sorted(used)}
        if keep:
            self.keep_only(used)
            self._pod_policies = {k: v for k, v in self._pod_policies.items() if k in keys}
        warnings = tuple(sorted(set(self.warnings)))
        for w in warnings:
            if w not in _LOGGED:  # once per process, not once per compile
                _LOGGED.add(w)
                log.warning("%s", w)
        return Compiled(pods, sets, warnings)

    def pod_policy(self, pod: _Pod) -> PodPolicy:
        """The policy of subject `pod` (its sets: address_set of the
        meanings of the names it uses)."""
        return self._pod_policy_of(pod)[1]

    def _pod_policy_of(self, pod: _Pod) -> tuple[tuple[Any, ...], PodPolicy]:
        nps = [p for p in self.nps_by_ns.get(pod.namespace, ())
               if p.pod_sel.matches(pod.labels)]
        cnps = [p for p in self.cnps
                if self.idx.subject_matches(pod, p.ns_sel, p.namespace, p.pod_sel)]
        named = any(p.per_subject for p in nps + cnps)
        key = (tuple(map(id, nps)), tuple(map(id, cnps)),
               tuple(sorted(pod.named_ports.items())) if named else ())
        hit = self._pod_policies.get(key)
        if hit is None:
            hit = self._pod_policies[key] = (self._pod_policy(pod, nps, cnps), (*nps, *cnps))
        return key, hit[0]

    def _pod_policy(self, pod: _Pod, nps: list[_Policy], cnps: list[_Policy]) -> PodPolicy:
        sides = []
        for d in (Direction.INGRESS, Direction.EGRESS):
            tiers: tuple[list[Rule], list[Rule]] = ([], [])
            for c in cnps:
                for r in c.rules(d) or ():
                    tiers[c.tier].extend(self.rules_for(r, pod))
            namespaced: list[Rule] = []
            isolated_by = []
            for p in nps:
                rules = p.rules(d)
                if rules is None:
                    continue
                isolated_by.append(RuleRef(NP_KIND, p.namespace, p.name, d, -1))
                for r in rules:
                    namespaced.extend(self.rules_for(r, pod))
            sides.append(DirectionPolicy(tuple(tiers[0]), tuple(namespaced), bool(isolated_by),
                                         tuple(isolated_by), tuple(tiers[1])))
        return PodPolicy(sides[0], sides[1])


class NodeCompiler:
    """compile_node() over successive states of one cluster, as an agent
    compiles after each change: the pods, namespaces and nodes that changed
    since the last compile are found by their parsed versions, and only the
    address sets and selections they could alter are computed again (a
    NetworkPolicy's PodPolicies are kept by the policies' versions). The
    result is the same as a fresh compile's (tests/test_netpol_compile.py
    compares them over random changes); when many pods changed at once
    (over an eighth of them, at least 64), it is a fresh compile.

    Thread-safe: one compile at a time."""

    def __init__(self, node: str) -> None:
        self.node = node
        self._compiler: _Compiler | None = None
        self._lock = threading.Lock()

    def compile(self, cluster: Cluster) -> Compiled:
        with self._lock:
            c = self._compiler
            self._compiler = None  # an exception leaves nothing half-moved behind
            if c is None or not c.refresh(cluster, max(64, len(c.idx.pods) // 8)):
                c = _Compiler(cluster)
            out = c.compile((i for i, p in c.idx.pods.items()
                             if p.node == self.node and p.subject), keep=True)
            self._compiler = c
            return out


_NODE_COMPILERS: dict[str, NodeCompiler] = {}


def compile_node(cluster: Cluster, node: str) -> Compiled:
    """The compiled policy of the pods of node `node` (spec.nodeName) that
    are neither hostNetwork nor finished, with or without an address yet.
    Incremental: the node's NodeCompiler (kept for the last few nodes
    asked) moves from the cluster state of the last call to this one."""
    nc = _NODE_COMPILERS.pop(node, None) or NodeCompiler(node)
    _NODE_COMPILERS[node] = nc  # the most recent last
    while len(_NODE_COMPILERS) > 4:
        del _NODE_COMPILERS[next(iter(_NODE_COMPILERS))]
    return nc.compile(cluster)


def compile_node_afresh(cluster: Cluster, node: str) -> Compiled:
    """compile_node() from nothing kept (the reference the incremental
    compile must equal)."""
    c = _Compiler(cluster)
    return c.compile(i for i, p in c.idx.pods.items() if p.node == node and p.subject)


def compile_pods(cluster: Cluster, keys: Iterable[str]) -> Compiled:
    """The compiled policy of the pods "namespace/name" in `keys` (unknown,
    hostNetwork and finished ones left out)."""
    c = _Compiler(cluster)
    return c.compile(i for k in keys if (i := c.idx.by_key.get(k)) is not None
                     and c.idx.pods[i].subject)


# ----------------------------------------------------------------------------- evaluation
def _lookup(s: AddressSet, ip: int) -> SetEntry | None:
    """The entry of `s` whose prefix holds `ip` (the longest, as an LPM
    trie answers; the compiler's entries are disjoint anyway)."""
    best: SetEntry | None = None
    best_size = 1 << 33
    for e in s.entries:
        lo, hi = _prefix_interval(e.prefix)
        if lo <= ip <= hi and hi - lo < best_size:
            best, best_size = e, hi - lo
    return best


def rule_matches(rule: Rule, sets: Mapping[str, AddressSet], peer_ip: int, proto: int,
                 dport: int) -> bool:
    """Whether `rule` matches a packet from or to `peer_ip` (an integer) of
    protocol `proto` (IPPROTO_*) to destination port `dport` (0 for ICMP).
    Raises KeyError for a set missing from `sets`."""
    entry = _lookup(sets[rule.peers], peer_ip)
    if entry is None:
        return False
    if rule.named_port:
        return entry.proto == proto and entry.port == dport
    if not rule.ports:
        return True
    return any((p.proto == 0 or p.proto == proto) and p.port_lo <= dport <= p.port_hi
               for p in rule.ports)


def evaluate(policy: PodPolicy, sets: Mapping[str, AddressSet], direction: Direction,
             peer_ip: str, proto: int, dport: int) -> tuple[Action, RuleRef | None]:
    """The verdict on the first packet of a connection, for one pod and one
    direction (the peer is the source for ingress, the destination for
    egress), in policyrules' order: the admin tier's first match decides
    unless it passes; then any namespaced match accepts; then an isolated
    direction denies (the ref of its first isolating policy, index -1);
    then the baseline tier's first match decides (Pass: allowed by
    default); nothing decided: allowed (ref None). The ref is the rule that
    decided. `proto` is an IPPROTO_* number, `dport` the destination port
    (0 for ICMP). Raises ValueError for a peer that is not IPv4, KeyError
    for a set missing from `sets`."""
    ip = _ip_int(peer_ip)
    if ip is None:
        raise ValueError(f"{peer_ip!r} is not an IPv4 address")
    d = policy.direction(direction)
    for r in d.admin:
        if rule_matches(r, sets, ip, proto, dport):
            if r.action == Action.PASS:
                break
            return r.action, r.ref
    for r in d.namespaced:
        if rule_matches(r, sets, ip, proto, dport):
            return Action.ACCEPT, r.ref
    if d.isolated:
        return Action.DENY, d.isolated_by[0] if d.isolated_by else None
    for r in d.baseline:
        if rule_matches(r, sets, ip, proto, dport):
            return (Action.ACCEPT if r.action == Action.PASS else r.action), r.ref
    return Action.ACCEPT, None


# ----------------------------------------------------------------------------- explain
@dataclass(frozen=True)
class Endpoint:
    """One end of a connection: its address and, when it is a pod, its key
    and node; `host_network` for a hostNetwork pod (never a subject)."""

    ip: str
    pod: str | None = None
    node: str | None = None
    host_network: bool = False

    def __str__(self) -> str:
        return f"{self.pod} ({self.ip})" if self.pod else self.ip


@dataclass(frozen=True)
class Step:
    """The verdict of one side: `pod` whose policy was consulted (None: the
    side is no pod policy applies to), its `action`, the deciding `ref`
    and a sentence saying why."""

    direction: Direction
    pod: str | None
    action: Action
    ref: RuleRef | None
    reason: str


@dataclass(frozen=True)
class Explanation:
    src: Endpoint
    dst: Endpoint
    proto: int
    port: int
    egress: Step  # the source's egress
    ingress: Step  # the destination's ingress
    warnings: tuple[str, ...] = field(default=())

    @property
    def allowed(self) -> bool:
        return self.egress.action == Action.ACCEPT and self.ingress.action == Action.ACCEPT

    def __str__(self) -> str:
        names = {v: k for k, v in {**PROTOCOLS, "ICMP": IPPROTO_ICMP}.items()}
        proto = names.get(self.proto, str(self.proto))
        what = proto if self.proto == IPPROTO_ICMP else f"{proto}/{self.port}"
        head = (f"{self.src} -> {self.dst} {what}: "
                f"{'allowed' if self.allowed else 'denied'}")
        lines = [f"  {s.direction.name.lower():7} {s.action.name.lower()}: {s.reason}"
                 for s in (self.egress, self.ingress)]
        return "\n".join([head, *lines])


def _endpoint(idx: _Index, what: str) -> Endpoint:
    if "/" in what and _ip_int(what) is None:
        i = idx.by_key.get(what)
        if i is None:
            raise ValueError(f"no pod {what}")
        p = idx.pods[i]
        if not p.ips:
            raise ValueError(f"pod {what} has no IPv4 address yet")
        return Endpoint(_dotted(p.ips[0]), p.key, p.node, p.host_network)
    ip = _ip_int(what)
    if ip is None:
        raise ValueError(f"{what!r} is neither a pod (namespace/name) nor an IPv4 address")
    holder = idx.holder(ip)
    if holder is None:
        return Endpoint(_dotted(ip))
    return Endpoint(_dotted(ip), holder.key, holder.node)


def _verdict_reason(action: Action, ref: RuleRef | None, policy: DirectionPolicy) -> str:
    if ref is None:
        return "no policy decides: allowed by default"
    if ref.index < 0:
        names = ", ".join(f"{r.namespace}/{r.name}" for r in policy.isolated_by)
        return f"isolated by NetworkPolicy {names} and no rule of theirs matches"
    if action == Action.ACCEPT and any(r.ref == ref and r.action == Action.PASS
                                       for r in policy.baseline):
        return f"{ref} passes: allowed by default"
    return f"{ref}"


def parse_protocol(proto: int | str) -> int:
    """An IPPROTO_* number from a number or a name (TCP, UDP, SCTP, ICMP)."""
    if isinstance(proto, int):
        return proto
    names = {**PROTOCOLS, "ICMP": IPPROTO_ICMP}
    if proto.upper() in names:
        return names[proto.upper()]
    raise ValueError(f"unknown protocol {proto!r} (TCP, UDP, SCTP or ICMP)")


def explain(cluster: Cluster, src: str, dst: str, proto: int | str, port: int) -> Explanation:
    """Would a new connection from `src` to `dst` ("namespace/name" of a
    pod, or an IPv4 address; an address of a pod is that pod) with protocol
    `proto` to port `port` be allowed, and by which rules: the source pod's
    egress and the destination pod's ingress, each evaluated as the cube
    does. A destination is a pod's address, after Service translation. The
    node's own InternalIPs reach its pods whatever the policy (the cube's
    host_addresses: kubelet probes). Raises ValueError for an unknown pod,
    a pod without an address, or an unknown protocol."""
    c = _Compiler(cluster)
    a, b = _endpoint(c.idx, src), _endpoint(c.idx, dst)
    number = parse_protocol(proto)

    def side(d: Direction, subject: Endpoint, peer: Endpoint) -> Step:
        if subject.pod is None:
            return Step(d, None, Action.ACCEPT, None, f"{subject.ip} is no pod: no policy")
        if subject.host_network:
            return Step(d, None, Action.ACCEPT, None,
                        f"{subject.pod} is hostNetwork: no policy applies to it")
        if d == Direction.INGRESS and subject.node:
            if _ip_int(peer.ip) in c.idx.internal_ips.get(subject.node, ()):
                return Step(d, subject.pod, Action.ACCEPT, None,
                            f"{peer.ip} is the node of {subject.pod}: always allowed")
        i = c.idx.by_key[subject.pod]
        policy = c.pod_policy(c.idx.pods[i])
        sets = {n: c.address_set(c.meanings[n]) for n in used_sets([policy])}
        action, ref = evaluate(policy, sets, d, peer.ip, number, port)
        return Step(d, subject.pod, action, ref,
                    _verdict_reason(action, ref, policy.direction(d)))

    egress = side(Direction.EGRESS, a, b)
    ingress = side(Direction.INGRESS, b, a)
    return Explanation(a, b, number, port, egress, ingress, tuple(sorted(set(c.warnings))))
