"""The policy compiler, with no kernel and no API server: NetworkPolicy and
ClusterNetworkPolicy objects in, compiled rules (and the reference
evaluation of them) out.

Most cases are upstream's e2e NetworkPolicy model
(test/e2e/network/netpol): namespaces x, y, z labelled ns=<name>, pods a,
b, c labelled pod=<name>, each serving ports 80 and 81 over TCP, UDP and
SCTP under the names serve-<port>-<protocol>; a case says which (source,
destination) pairs a policy denies, as upstream's Reachability does
(loopback left out, as upstream leaves it out)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from pcn_policy.compiler import (
    Cluster,
    compile_node,
    compile_pods,
    evaluate,
    explain,
    interval_prefixes,
    merge_intervals,
    parse_selector,
    subtract_intervals,
)
from pcn_policy.rules import (
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    PORTS_PER_RULE,
    Action,
    Direction,
    PortMatch,
    RuleRef,
    SetEntry,
)

NSS = ("x", "y", "z")
NAMES = ("a", "b", "c")
PODS = [f"{n}/{p}" for n in NSS for p in NAMES]
NODE_IP = {"n1": "192.168.1.1", "n2": "192.168.1.2"}


def ip_of(key: str) -> str:
    ns, name = key.split("/")
    return f"10.244.{NSS.index(ns) + 1}.{NAMES.index(name) + 1}"


def namespace(name: str, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"ns": name, **labels}}}


def pod(key: str, labels: dict[str, str] | None = None, *, ip: str | None = "auto",
        node: str = "n1", ports: list[tuple[str, int, str]] | None = None,
        host_network: bool = False, phase: str = "Running") -> dict[str, Any]:
    """A pod of the model: named ports serve-{80,81}-{tcp,udp,sctp} unless
    `ports` gives (name, number, protocol) triples."""
    ns, name = key.split("/")
    if ports is None:
        ports = [(f"serve-{p}-{proto.lower()}", p, proto)
                 for p in (80, 81) for proto in ("TCP", "UDP", "SCTP")]
    status: dict[str, Any] = {"phase": phase}
    if ip == "auto":
        ip = NODE_IP[node] if host_network else ip_of(key)
    if ip:
        status["podIP"], status["podIPs"] = ip, [{"ip": ip}]
    return {"metadata": {"namespace": ns, "name": name, "labels": labels or {"pod": name}},
            "spec": {"nodeName": node, "hostNetwork": host_network,
                     "containers": [{"name": "c", "ports": [
                         {"name": n, "containerPort": p, "protocol": proto}
                         for n, p, proto in ports]}]},
            "status": status}


def node(name: str, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels},
            "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP[name]},
                                     {"type": "Hostname", "address": name}]}}


def netpol(ns: str, name: str, selector: dict[str, Any] | None = None, *,
           ingress: list[dict[str, Any]] | None = None,
           egress: list[dict[str, Any]] | None = None,
           types: list[str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"podSelector": selector or {}}
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    if types is not None:
        spec["policyTypes"] = types
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": ns, "name": name}, "spec": spec}


def cnp(name: str, tier: str, priority: int, subject: dict[str, Any], *,
        ingress: list[dict[str, Any]] | None = None,
        egress: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"tier": tier, "priority": priority, "subject": subject}
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    return {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": name}, "spec": spec}


def labels(**kv: str) -> dict[str, Any]:
    return {"matchLabels": kv}


def model(*policies: dict[str, Any], pods: list[dict[str, Any]] | None = None,
          namespaces: list[dict[str, Any]] | None = None) -> Cluster:
    nps = [p for p in policies if p["kind"] == "NetworkPolicy"]
    cnps = [p for p in policies if p["kind"] == "ClusterNetworkPolicy"]
    return Cluster(nps, cnps, pods if pods is not None else [pod(k) for k in PODS],
                   namespaces if namespaces is not None else [namespace(n) for n in NSS],
                   [node("n1"), node("n2", role="infra")])


def denied(cluster: Cluster, port: int = 80, proto: str = "TCP",
           among: list[str] = PODS) -> set[tuple[str, str]]:
    """The (source, destination) pairs of model pods that may not connect."""
    return {(s, d) for s in among for d in among
            if s != d and not explain(cluster, s, d, proto, port).allowed}


def pairs(src: str | list[str], dst: str | list[str]) -> set[tuple[str, str]]:
    """Every pair between the pods named: "x/a", a namespace "x", "*"."""
    def expand(what: str | list[str]) -> list[str]:
        if isinstance(what, list):
            return what
        if what == "*":
            return PODS
        return [what] if "/" in what else [p for p in PODS if p.startswith(what + "/")]
    return {(s, d) for s in expand(src) for d in expand(dst) if s != d}


# ----------------------------------------------------------------------------- selectors, addresses
@pytest.mark.parametrize("selector, labels_, expected", [
    ({}, {"a": "1"}, True),
    (None, {}, True),
    ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
    ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]}, {"a": "2"}, True),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1"]}]}, {}, False),
    ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {}, True),
    ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {"a": "1"}, False),
    ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"a": ""}, True),
    ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"b": "1"}, False),
    ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"b": "1"}, True),
    ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"a": "1"}, False),
    ({"matchLabels": {"a": "1"},
      "matchExpressions": [{"key": "b", "operator": "In", "values": ["2"]}]}, {"a": "1"}, False),
    # what the API server refuses selects nothing
    ({"matchExpressions": [{"key": "a", "operator": "Gt", "values": ["1"]}]}, {"a": "2"}, False),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": []}]}, {"a": ""}, False),
])
def test_label_selector(selector: Any, labels_: dict[str, str], expected: bool) -> None:
    assert parse_selector(selector).matches(labels_) is expected


def test_selectors_are_canonical() -> None:
    one = parse_selector({"matchLabels": {"b": "2", "a": "1"}, "matchExpressions": [
        {"key": "k", "operator": "In", "values": ["y", "x"]},
        {"key": "j", "operator": "Exists"}]})
    two = parse_selector({"matchLabels": {"a": "1", "b": "2"}, "matchExpressions": [
        {"key": "j", "operator": "Exists"},
        {"key": "k", "operator": "In", "values": ["x", "y", "x"]}]})
    assert one == two and hash(one) == hash(two)


def test_interval_arithmetic() -> None:
    assert merge_intervals([(5, 9), (1, 3), (4, 4), (20, 30), (25, 26)]) == [(1, 9), (20, 30)]
    assert subtract_intervals((0, 99), [(10, 19), (15, 29), (90, 120)]) == [(0, 9), (30, 89)]
    assert subtract_intervals((10, 19), [(0, 100)]) == []
    assert interval_prefixes(0, 0xFFFFFFFF) == ["0.0.0.0/0"]
    assert interval_prefixes(1, 6) == ["0.0.0.1/32", "0.0.0.2/31", "0.0.0.4/31", "0.0.0.6/32"]


# ----------------------------------------------------------------------------- upstream e2e cases
def test_no_policy_allows_everything() -> None:
    assert denied(model()) == set()


def test_default_deny_ingress() -> None:
    """'should support a default-deny-ingress policy': ingress missing or
    empty, all the same."""
    for ingress in (None, []):
        c = model(netpol("x", "deny-ingress", ingress=ingress))
        assert denied(c) == pairs("*", "x")
        # egress untouched: policyTypes defaulted to Ingress only
        assert not compile_pods(c, ["x/a"]).pods["x/a"].egress.enforced


def test_default_deny_all() -> None:
    c = model(netpol("x", "deny-all", types=["Ingress", "Egress"]))
    assert denied(c) == pairs("*", "x") | pairs("x", "*")


def test_allow_from_pods_of_the_server_namespace_by_pod_selector() -> None:
    c = model(netpol("x", "allow-x-via-pod-and-ns-selector", labels(pod="a"),
                     ingress=[{"from": [{"podSelector": labels(pod="b")}]}]))
    assert denied(c) == pairs("*", "x/a") - {("x/b", "x/a")}


def test_allow_from_all_namespaces() -> None:
    c = model(netpol("x", "allow-all-ns", labels(pod="a"),
                     ingress=[{"from": [{"namespaceSelector": {}}]}]))
    assert denied(c) == set()
    # ...but not from outside the cluster
    assert not explain(c, "172.16.0.9", "x/a", "TCP", 80).allowed


def test_allow_from_a_namespace_by_label() -> None:
    c = model(netpol("x", "allow-ns-y", ingress=[
        {"from": [{"namespaceSelector": labels(ns="y")}]}]))
    assert denied(c) == pairs("x", "x") | pairs("z", "x")


def test_namespace_selector_with_the_default_name_label() -> None:
    """The kubernetes.io/metadata.name label holds even where a Namespace
    object omits it (and for a pod's namespace nobody listed)."""
    sel = {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                                 "values": ["y"]}]}
    c = model(netpol("x", "not-from-y", ingress=[{"from": [{"namespaceSelector": sel}]}]),
              namespaces=[namespace("x"), namespace("y")])  # z not listed
    assert denied(c) == pairs("y", "x")


def test_pod_and_namespace_selector_together_are_and() -> None:
    """'should enforce policy based on PodSelector and NamespaceSelector'
    against '... PodSelector or NamespaceSelector'."""
    both = model(netpol("x", "and", labels(pod="a"), ingress=[{"from": [
        {"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn",
                                                     "values": ["x"]}]},
         "podSelector": labels(pod="b")}]}]))
    assert denied(both) == pairs("*", "x/a") - {("y/b", "x/a"), ("z/b", "x/a")}
    either = model(netpol("x", "or", labels(pod="a"), ingress=[{"from": [
        {"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn",
                                                     "values": ["x"]}]}},
        {"podSelector": labels(pod="b")}]}]))
    assert denied(either) == {("x/c", "x/a")}


def test_pod_selector_with_match_expressions() -> None:
    c = model(netpol("x", "expr", labels(pod="a"), ingress=[{"from": [{"podSelector": {
        "matchExpressions": [{"key": "pod", "operator": "In", "values": ["b"]}]}}]}]))
    assert denied(c) == pairs("*", "x/a") - {("x/b", "x/a")}


def test_ports_numeric_and_protocol() -> None:
    """'should enforce policy based on Ports', 'should not allow access by
    TCP when a policy specifies only UDP', SCTP is not TCP."""
    c = model(netpol("x", "allow-81", labels(pod="a"),
                     ingress=[{"ports": [{"port": 81, "protocol": "TCP"}]}]))
    assert denied(c, 80) == pairs("*", "x/a")
    assert denied(c, 81) == set()
    udp = model(netpol("x", "udp-81", labels(pod="a"),
                       ingress=[{"ports": [{"port": 81, "protocol": "UDP"}]}]))
    assert denied(udp, 81, "TCP") == pairs("*", "x/a")
    assert denied(udp, 81, "UDP") == set()
    sctp = model(netpol("x", "sctp-80", labels(pod="a"),
                        ingress=[{"ports": [{"port": 80, "protocol": "SCTP"}]}]))
    assert denied(sctp, 80, "TCP") == pairs("*", "x/a")
    assert denied(sctp, 80, "SCTP") == set()


def test_port_defaults_to_tcp_and_a_protocol_alone_is_every_port() -> None:
    """'should enforce ingress policy allowing any port traffic to a server
    on a specific protocol'."""
    c = model(netpol("x", "tcp-any", labels(pod="a"), ingress=[{"ports": [{"protocol": "TCP"}]}]))
    assert denied(c, 80) == denied(c, 81) == set()
    assert denied(c, 80, "UDP") == pairs("*", "x/a")
    rules = compile_pods(c, ["x/a"]).pods["x/a"].ingress.namespaced
    assert rules[0].ports == (PortMatch(IPPROTO_TCP, 0, 65535),)
    default = model(netpol("x", "80", labels(pod="a"), ingress=[{"ports": [{"port": 80}]}]))
    rules = compile_pods(default, ["x/a"]).pods["x/a"].ingress.namespaced
    assert rules[0].ports == (PortMatch(IPPROTO_TCP, 80, 80),)


def test_end_port_range() -> None:
    c = model(netpol("x", "range", labels(pod="a"), ingress=[
        {"ports": [{"port": 80, "endPort": 81, "protocol": "TCP"}]}]))
    assert denied(c, 80) == denied(c, 81) == set()
    assert not explain(c, "y/a", "x/a", "TCP", 82).allowed
    assert not explain(c, "y/a", "x/a", "TCP", 79).allowed


def test_named_port_ingress_is_the_selected_pods_own() -> None:
    """'should allow ingress access on one named port'; x/b serves
    serve-80-tcp on 8080, so the same policy opens 8080 there."""
    pods = [pod(k) for k in PODS if k != "x/b"]
    pods.append(pod("x/b", ports=[("serve-80-tcp", 8080, "TCP")]))
    c = model(netpol("x", "named", ingress=[{"ports": [{"port": "serve-80-tcp"}]}]), pods=pods)
    assert denied(c, 80) == pairs("*", "x/b")
    assert denied(c, 81) == pairs("*", "x")
    assert explain(c, "y/a", "x/b", "TCP", 8080).allowed
    assert not explain(c, "y/a", "x/a", "TCP", 8080).allowed
    rules = compile_pods(c, ["x/b"]).pods["x/b"].ingress.namespaced
    assert [r.ports for r in rules] == [(PortMatch(IPPROTO_TCP, 8080, 8080),)]


def test_named_port_with_a_protocol_of_another_name_matches_nothing() -> None:
    c = model(netpol("x", "udp-name", labels(pod="a"), ingress=[
        {"ports": [{"port": "serve-80-tcp", "protocol": "UDP"}]}]))
    assert denied(c, 80, "TCP") == denied(c, 80, "UDP") == pairs("*", "x/a")


def test_a_port_that_cannot_be_resolved_does_not_open_all_ports() -> None:
    """'should not allow all ports if it cannot limit to the requested port'."""
    c = model(netpol("x", "no-such", labels(pod="a"), ingress=[
        {"ports": [{"port": "no-such-port", "protocol": "TCP"}]}]))
    assert denied(c, 80) == pairs("*", "x/a")
    pp = compile_pods(c, ["x/a"]).pods["x/a"]
    assert pp.ingress.isolated and pp.ingress.namespaced == ()


def test_named_port_ingress_from_a_namespace() -> None:
    """'should allow ingress access from namespace on one named port'."""
    c = model(netpol("x", "ns-named", ingress=[{
        "from": [{"namespaceSelector": {"matchExpressions": [
            {"key": "ns", "operator": "In", "values": ["y"]}]}}],
        "ports": [{"port": "serve-81-udp", "protocol": "UDP"}]}]))
    assert denied(c, 81, "UDP") == pairs("x", "x") | pairs("z", "x")
    assert denied(c, 80, "UDP") == pairs("*", "x")


def test_named_port_egress_resolves_per_destination_pod() -> None:
    """'should allow egress access on one named port': x's pods reach port
    80 of every pod that names it serve-80-tcp, and no port 81. z/c serves
    it on 9090: egress there is 9090, not 80; y/c has no such port."""
    pods = [pod(k) for k in PODS if k not in ("z/c", "y/c")]
    pods += [pod("z/c", ports=[("serve-80-tcp", 9090, "TCP")]),
             pod("y/c", ports=[("other", 80, "TCP")])]
    c = model(netpol("x", "allow-egress", egress=[{"ports": [{"port": "serve-80-tcp"}]}],
                     types=["Egress"]), pods=pods)
    assert denied(c, 80) == {("x/a", "y/c"), ("x/b", "y/c"), ("x/c", "y/c"),
                             ("x/a", "z/c"), ("x/b", "z/c"), ("x/c", "z/c")}
    assert denied(c, 81) == pairs("x", "*")
    assert explain(c, "x/a", "z/c", "TCP", 9090).allowed
    comp = compile_pods(c, ["x/a"])
    (rule,) = comp.pods["x/a"].egress.namespaced
    assert rule.named_port and rule.ports == ()
    entries = comp.sets[rule.peers].entries
    assert SetEntry("10.244.3.3/32", IPPROTO_TCP, 9090) in entries
    assert SetEntry("10.244.2.1/32", IPPROTO_TCP, 80) in entries
    assert not any(e.prefix == "10.244.2.3/32" for e in entries)  # y/c: no such name
    assert len(entries) == 8


def test_egress_named_port_of_another_protocol_matches_no_pod() -> None:
    c = model(netpol("x", "udp-name", labels(pod="a"), types=["Egress"], egress=[
        {"ports": [{"port": "serve-80-tcp", "protocol": "UDP"}]}]))
    assert denied(c, 80, "TCP") == denied(c, 80, "UDP") == pairs("x/a", "*")
    comp = compile_pods(c, ["x/a"])
    (rule,) = comp.pods["x/a"].egress.namespaced
    assert rule.named_port and comp.sets[rule.peers].entries == frozenset()


def test_egress_named_port_to_an_ip_block_takes_the_pods_inside_it() -> None:
    c = model(netpol("x", "named-cidr", labels(pod="a"), egress=[{
        "to": [{"ipBlock": {"cidr": "10.244.2.0/24", "except": ["10.244.2.2/32"]}}],
        "ports": [{"port": "serve-81-tcp"}]}]))
    comp = compile_pods(c, ["x/a"])
    (rule,) = comp.pods["x/a"].egress.namespaced
    assert comp.sets[rule.peers].entries == frozenset(
        {SetEntry("10.244.2.1/32", IPPROTO_TCP, 81), SetEntry("10.244.2.3/32", IPPROTO_TCP, 81)})


def test_stacked_policies_add_up() -> None:
    """'should enforce multiple, stacked policies with overlapping
    podSelectors': union of two policies' rules, each isolating."""
    c = model(netpol("x", "allow-80-from-y", labels(pod="a"), ingress=[
                  {"from": [{"namespaceSelector": labels(ns="y")}], "ports": [{"port": 80}]}]),
              netpol("x", "allow-81-from-z", labels(pod="a"), ingress=[
                  {"from": [{"namespaceSelector": labels(ns="z")}], "ports": [{"port": 81}]}]))
    assert denied(c, 80) == pairs("x", "x/a") | pairs("z", "x/a")
    assert denied(c, 81) == pairs("x", "x/a") | pairs("y", "x/a")
    pp = compile_pods(c, ["x/a"]).pods["x/a"]
    assert pp.ingress.isolated_by == (
        RuleRef("NetworkPolicy", "x", "allow-80-from-y", Direction.INGRESS, -1),
        RuleRef("NetworkPolicy", "x", "allow-81-from-z", Direction.INGRESS, -1))


def test_allow_all_policy_takes_precedence() -> None:
    """'should enforce multiple ingress policies with ingress allow-all
    policy taking precedence' (and the egress twin)."""
    narrow = netpol("x", "allow-81", labels(pod="a"), ingress=[{"ports": [{"port": 81}]}])
    assert denied(model(narrow), 80) == pairs("*", "x/a")
    assert denied(model(narrow, netpol("x", "allow-all", ingress=[{}]))) == set()
    e_narrow = netpol("x", "e-81", labels(pod="a"), egress=[{"ports": [{"port": 81}]}],
                      types=["Egress"])
    assert denied(model(e_narrow), 80) == pairs("x/a", "*")
    assert denied(model(e_narrow, netpol("x", "e-all", egress=[{}], types=["Egress"]))) == set()


def test_egress_deny_by_pod_selector_and_for_a_namespace() -> None:
    """'should deny egress from pods based on PodSelector' / '... from all
    pods in a namespace'."""
    c = model(netpol("x", "deny-egress-a", labels(pod="a"), types=["Egress"]))
    assert denied(c) == pairs("x/a", "*")
    c = model(netpol("x", "deny-egress-x", types=["Egress"]))
    assert denied(c) == pairs("x", "*")


def test_ingress_and_egress_together() -> None:
    """'should work with Ingress, Egress specified together': policyTypes
    defaults to both when egress rules are present."""
    c = model(netpol("x", "both", labels(pod="a"),
                     ingress=[{"from": [{"podSelector": labels(pod="b")}]}],
                     egress=[{"to": [{"podSelector": labels(pod="b")}]}]))
    pp = compile_pods(c, ["x/a"]).pods["x/a"]
    assert pp.ingress.isolated and pp.egress.isolated
    assert denied(c) == (pairs("*", "x/a") | pairs("x/a", "*")) - {("x/a", "x/b"),
                                                                   ("x/b", "x/a")}


def test_policy_types_defaulting() -> None:
    """No policyTypes: Ingress always, Egress only with egress rules
    (SetDefaults_NetworkPolicy); explicit policyTypes rule out the other
    direction's rules."""
    only_egress_rules = model(netpol("x", "p", labels(pod="a"), egress=[
        {"to": [{"podSelector": labels(pod="b")}]}]))
    pp = compile_pods(only_egress_rules, ["x/a"]).pods["x/a"]
    assert pp.ingress.isolated and pp.egress.isolated  # ingress isolated with no rules
    empty_egress = model(netpol("x", "p", labels(pod="a"), egress=[]))
    pp = compile_pods(empty_egress, ["x/a"]).pods["x/a"]
    assert pp.ingress.isolated and not pp.egress.isolated
    egress_only = model(netpol("x", "p", labels(pod="a"), types=["Egress"],
                               ingress=[{"from": [{"podSelector": labels(pod="b")}]}]))
    pp = compile_pods(egress_only, ["x/a"]).pods["x/a"]
    assert not pp.ingress.isolated and pp.ingress.rules == () and pp.egress.isolated


def test_empty_from_is_everyone_and_empty_rule_list_is_no_one() -> None:
    c = model(netpol("x", "all", labels(pod="a"), ingress=[{"from": [], "ports": []}]))
    comp = compile_pods(c, ["x/a"])
    (rule,) = comp.pods["x/a"].ingress.namespaced
    assert rule.ports == () and comp.sets[rule.peers].entries == frozenset({SetEntry("0.0.0.0/0")})
    assert explain(c, "8.8.8.8", "x/a", "UDP", 53).allowed
    assert explain(c, "8.8.8.8", "x/a", "ICMP", 0).allowed
    none = model(netpol("x", "none", labels(pod="a"), ingress=[]))
    assert not explain(none, "8.8.8.8", "x/a", "UDP", 53).allowed


def test_egress_to_a_cidr_block() -> None:
    """'should allow egress access to server in CIDR block'."""
    c = model(netpol("x", "cidr", labels(pod="a"), egress=[
        {"to": [{"ipBlock": {"cidr": ip_of("y/b") + "/32"}}]}], types=["Egress"]))
    assert denied(c) == pairs("x/a", "*") - {("x/a", "y/b")}


def test_ip_block_except_flattens_to_disjoint_prefixes() -> None:
    """'should enforce except clause while egress access to server in CIDR
    block' and 'should ensure an IP overlapping both IPBlock.CIDR and
    IPBlock.Except is allowed' (by another policy)."""
    block = {"ipBlock": {"cidr": "10.244.0.0/16", "except": [ip_of("x/b") + "/32"]}}
    c = model(netpol("x", "except", labels(pod="a"), egress=[{"to": [block]}], types=["Egress"]))
    assert denied(c) == {("x/a", "x/b")}
    comp = compile_pods(c, ["x/a"])
    (rule,) = comp.pods["x/a"].egress.namespaced
    prefixes = {e.prefix for e in comp.sets[rule.peers].entries}
    assert len(prefixes) == 16  # /16 less one /32: one prefix per bit
    assert "10.244.1.3/32" in prefixes and "10.244.128.0/17" in prefixes
    assert not any(e.prefix.startswith("10.244.1.2/") for e in comp.sets[rule.peers].entries)
    also = netpol("x", "allow-b", labels(pod="a"), egress=[
        {"to": [{"ipBlock": {"cidr": ip_of("x/b") + "/32"}}]}], types=["Egress"])
    assert denied(model(netpol("x", "except", labels(pod="a"), egress=[{"to": [block]}],
                               types=["Egress"]), also)) == set()


def test_peers_of_one_rule_are_unioned_into_one_set() -> None:
    c = model(netpol("x", "mixed", labels(pod="a"), ingress=[{"from": [
        {"ipBlock": {"cidr": "10.244.2.0/24", "except": ["10.244.2.0/30"]}},
        {"namespaceSelector": labels(ns="y"), "podSelector": labels(pod="b")},
        {"podSelector": labels(pod="c")}]}]))
    comp = compile_pods(c, ["x/a"])
    (rule,) = comp.pods["x/a"].ingress.namespaced
    prefixes = {e.prefix for e in comp.sets[rule.peers].entries}
    # y/b (10.244.2.2) fills part of the hole; x/c by its /32
    assert prefixes == {"10.244.2.2/32", "10.244.2.4/30", "10.244.2.8/29", "10.244.2.16/28",
                        "10.244.2.32/27", "10.244.2.64/26", "10.244.2.128/25", "10.244.1.3/32"}
    assert denied(c) == pairs("*", "x/a") - {("y/b", "x/a"), ("x/c", "x/a")}


@pytest.mark.parametrize("who, why", [
    (pod("y/b", host_network=True, node="n2"), "hostNetwork"),
    (pod("y/b", ip=None), "no address yet"),
    (pod("y/b", phase="Succeeded"), "finished"),
    (pod("y/b", phase="Failed"), "finished"),
])
def test_pods_that_are_never_peers_by_selector(who: dict[str, Any], why: str) -> None:
    pods = [pod(k) for k in PODS if k != "y/b"] + [who]
    c = model(netpol("x", "from-y", ingress=[{"from": [{"namespaceSelector": labels(ns="y")}]}]),
              pods=pods)
    comp = compile_pods(c, ["x/a"])
    (rule,) = comp.pods["x/a"].ingress.namespaced
    assert {e.prefix for e in comp.sets[rule.peers].entries} == {"10.244.2.1/32",
                                                                  "10.244.2.3/32"}, why


def test_host_network_and_finished_pods_are_never_subjects() -> None:
    pods = [pod("x/a"), pod("x/h", host_network=True), pod("x/done", ip="10.244.1.9",
                                                            phase="Succeeded"),
            pod("x/new", ip=None), pod("y/a", node="n2")]
    c = model(netpol("x", "deny"), pods=pods)
    comp = compile_node(c, "n1")
    assert sorted(comp.pods) == ["x/a", "x/new"]
    assert comp.pods["x/new"].ingress.isolated
    assert explain(c, "y/a", "x/h", "TCP", 80).allowed
    assert "hostNetwork" in explain(c, "y/a", "x/h", "TCP", 80).ingress.reason


def test_the_node_reaches_its_pods() -> None:
    c = model(netpol("x", "deny"))
    assert explain(c, NODE_IP["n1"], "x/a", "TCP", 80).allowed  # x/a runs on n1
    assert not explain(c, NODE_IP["n2"], "x/a", "TCP", 80).allowed


def test_egress_and_ingress_are_both_needed() -> None:
    """'should support denying of egress traffic on the client side (even
    if the server explicitly allows this traffic)'."""
    c = model(netpol("x", "deny-egress", labels(pod="a"), types=["Egress"]),
              netpol("y", "allow-from-x", ingress=[{"from": [{"namespaceSelector": labels(ns="x")}]}]))
    e = explain(c, "x/a", "y/b", "TCP", 80)
    assert not e.allowed and e.ingress.action == Action.ACCEPT
    assert e.egress.ref == RuleRef("NetworkPolicy", "x", "deny-egress", Direction.EGRESS, -1)
    assert "isolated by NetworkPolicy x/deny-egress" in str(e)


# ----------------------------------------------------------------------------- rules, refs, sets
def test_rules_with_many_ports_are_split_and_carry_their_ref() -> None:
    ports = [{"port": p, "protocol": "UDP"} for p in range(1000, 1040, 2)]  # 20 ports
    ports += [{"port": 5000, "endPort": 5010}, {"port": 5005, "endPort": 5020}]  # merge
    c = model(netpol("x", "many", labels(pod="a"), ingress=[{}, {"ports": ports}]))
    rules = compile_pods(c, ["x/a"]).pods["x/a"].ingress.namespaced
    assert [len(r.ports) for r in rules] == [0, PORTS_PER_RULE, PORTS_PER_RULE, 5]
    assert {r.ref for r in rules[1:]} == {RuleRef("NetworkPolicy", "x", "many",
                                                  Direction.INGRESS, 1)}
    assert rules[0].ref == RuleRef("NetworkPolicy", "x", "many", Direction.INGRESS, 0)
    assert PortMatch(IPPROTO_TCP, 5000, 5020) in rules[1].ports
    assert {p.port_lo for r in rules[1:] for p in r.ports if p.proto == IPPROTO_UDP} == \
        set(range(1000, 1040, 2))
    assert str(rules[1].ref) == "NetworkPolicy x/many ingress[1]"


def test_output_is_deterministic_and_set_names_follow_meaning() -> None:
    pols = [netpol("x", f"p{i}", labels(pod=NAMES[i % 3]), ingress=[
        {"from": [{"namespaceSelector": labels(ns=NSS[i % 3])}], "ports": [{"port": 80 + i}]}],
        egress=[{"to": [{"podSelector": labels(pod="b")}], "ports": [{"port": "serve-81-tcp"}]}])
        for i in range(6)]
    pods = [pod(k) for k in PODS]
    one = compile_node(Cluster(pols, [], pods, [namespace(n) for n in NSS], []), "n1")
    shuffled_pols, shuffled_pods = pols[:], pods[:]
    random.Random(7).shuffle(shuffled_pols)
    random.Random(8).shuffle(shuffled_pods)
    two = compile_node(Cluster(shuffled_pols, [], shuffled_pods,
                               [namespace(n) for n in reversed(NSS)], []), "n1")
    assert one == two
    # a new pod joining y changes the content of its sets, not their names
    more = compile_node(Cluster(pols, [], pods + [pod("y/d", ip="10.244.2.9", node="n2")],
                                [namespace(n) for n in NSS], []), "n1")
    assert set(more.sets) == set(one.sets) and more.pods == one.pods
    changed = [n for n in one.sets if one.sets[n] != more.sets[n]]
    assert changed and all(any(e.prefix == "10.244.2.9/32" for e in more.sets[n].entries)
                           for n in changed)


def test_rules_of_many_pods_share_sets() -> None:
    c = model(netpol("x", "p", ingress=[{"from": [{"podSelector": labels(pod="b")}]}]),
              netpol("x", "q", ingress=[{"from": [{"podSelector": labels(pod="b")}],
                                         "ports": [{"port": 81}]}]))
    comp = compile_node(c, "n1")
    names = {r.peers for pp in comp.pods.values() for r in pp.ingress.rules}
    assert len(names) == 1 and set(comp.sets) == names


def test_an_invalid_selector_selects_nothing_and_says_so() -> None:
    """A ClusterNetworkPolicy's CRD lets an invalid selector in (the API
    server refuses it in a NetworkPolicy): it selects nothing, as
    LabelSelectorAsSelector's error leaves a caller with nothing, and a
    warning names the policy, the field and the fault (a new user's Admin
    Deny with `In` and no values looked applied and did nothing)."""
    bad = {"matchExpressions": [{"key": "ns", "operator": "In"}]}
    c = model(cnp("deny-x", "Admin", 1, {"namespaces": bad},
                  ingress=[{"action": "Deny", "from": [{"namespaces": {}}]}]),
              cnp("odd-peer", "Admin", 2, {"namespaces": {}}, egress=[
                  {"action": "Accept", "to": [{"pods": {
                      "namespaceSelector": {}, "podSelector": {"matchExpressions": [
                          {"key": "pod", "operator": "Has"}]}}}]}]))
    comp = compile_pods(c, ["x/a"])
    assert comp.pods["x/a"].ingress.admin == ()  # deny-x selects no pod
    assert ("ClusterNetworkPolicy deny-x: subject.namespaces: matchExpressions 'ns' In needs "
            "values; it selects nothing") in comp.warnings
    assert any(w.startswith("ClusterNetworkPolicy odd-peer egress[0]: pods.podSelector: "
                            "matchExpressions 'pod': unknown operator 'Has'")
               for w in comp.warnings), comp.warnings
    assert not denied(c)  # nothing isolated, nothing denied


def test_unknown_protocol_and_bad_peers_are_warned_and_left_out() -> None:
    c = model(netpol("x", "odd", labels(pod="a"), ingress=[
        {"ports": [{"port": 80, "protocol": "ICMP"}]},
        {"from": [{"ipBlock": {"cidr": "fd00::/8"}}]}]))
    comp = compile_pods(c, ["x/a"])
    assert comp.pods["x/a"].ingress.isolated and comp.pods["x/a"].ingress.namespaced == ()
    assert any("ICMP" in w for w in comp.warnings)


# ----------------------------------------------------------------------------- ClusterNetworkPolicy
ALL_NS: dict[str, Any] = {"namespaces": {}}


def test_admin_deny_overrides_network_policy_allow() -> None:
    c = model(cnp("deny-y-to-x", "Admin", 10, {"namespaces": labels(ns="x")},
                  ingress=[{"action": "Deny", "from": [{"namespaces": labels(ns="y")}]}]),
              netpol("x", "allow-all", ingress=[{}]))
    assert denied(c) == pairs("y", "x")
    e = explain(c, "y/a", "x/a", "TCP", 80)
    assert e.ingress.ref == RuleRef("ClusterNetworkPolicy", "", "deny-y-to-x",
                                    Direction.INGRESS, 0)


def test_a_named_admin_rule_is_reported_by_its_name() -> None:
    """A ClusterNetworkPolicy rule's optional `name` goes with its index into
    what kubectl pcn policy and the counters show, and survives the cube's
    saved form; an unnamed rule's saved form is the five items of old."""
    from pcn_agent.dataplane.cubes.policy import _ref_json, _ref_of
    c = model(cnp("deny-y-to-x", "Admin", 10, {"namespaces": labels(ns="x")},
                  ingress=[{"name": "no-y", "action": "Deny",
                            "from": [{"namespaces": labels(ns="y")}]}]))
    ref = explain(c, "y/a", "x/a", "TCP", 80).ingress.ref
    assert ref == RuleRef("ClusterNetworkPolicy", "", "deny-y-to-x", Direction.INGRESS, 0, "no-y")
    assert str(ref) == "ClusterNetworkPolicy deny-y-to-x ingress[0] (no-y)"
    assert _ref_of(_ref_json(ref)) == ref
    unnamed = RuleRef("NetworkPolicy", "x", "np", Direction.EGRESS, 2)
    assert _ref_json(unnamed) == ["NetworkPolicy", "x", "np", int(Direction.EGRESS), 2]
    assert _ref_of(_ref_json(unnamed)) == unnamed
    assert str(unnamed) == "NetworkPolicy x/np egress[2]"


def test_admin_accept_overrides_network_policy_isolation() -> None:
    c = model(cnp("dns", "Admin", 5, ALL_NS, egress=[
                  {"action": "Accept", "to": [{"pods": {"namespaceSelector": labels(ns="z"),
                                                        "podSelector": labels(pod="c")}}],
                   "protocols": [{"udp": {"destinationPort": {"number": 53}}}]}]),
              netpol("x", "deny-all-egress", types=["Egress"]))
    assert explain(c, "x/a", "z/c", "UDP", 53).allowed
    assert not explain(c, "x/a", "z/c", "TCP", 53).allowed
    assert not explain(c, "x/a", "z/b", "UDP", 53).allowed


def test_priority_orders_admin_policies_and_ties_go_by_name() -> None:
    deny = {"action": "Deny", "from": [{"namespaces": {}}]}
    accept = {"action": "Accept", "from": [{"namespaces": {}}]}
    subject = {"namespaces": labels(ns="x")}
    assert denied(model(cnp("b-deny", "Admin", 10, subject, ingress=[deny]),
                        cnp("a-accept", "Admin", 20, subject, ingress=[accept]))) == pairs("*", "x")
    assert denied(model(cnp("b-deny", "Admin", 30, subject, ingress=[deny]),
                        cnp("a-accept", "Admin", 20, subject, ingress=[accept]))) == set()
    # equal priorities: by name
    assert denied(model(cnp("b-deny", "Admin", 20, subject, ingress=[deny]),
                        cnp("a-accept", "Admin", 20, subject, ingress=[accept]))) == set()
    assert denied(model(cnp("a-deny", "Admin", 20, subject, ingress=[deny]),
                        cnp("b-accept", "Admin", 20, subject, ingress=[accept]))) == pairs("*", "x")


def test_rule_order_within_a_policy() -> None:
    c = model(cnp("ordered", "Admin", 1, {"namespaces": labels(ns="x")}, ingress=[
        {"action": "Accept", "from": [{"pods": {"namespaceSelector": {},
                                                "podSelector": labels(pod="a")}}]},
        {"action": "Deny", "from": [{"namespaces": {}}]}]))
    assert denied(c) == pairs("*", "x") - pairs(["x/a", "y/a", "z/a"], "x")


def test_admin_pass_delegates_to_network_policy_then_baseline() -> None:
    """Pass skips the rest of the admin tier: a NetworkPolicy decides for
    the pods it isolates, the baseline for the others."""
    admin = cnp("pass-intra", "Admin", 1, ALL_NS, ingress=[
        {"action": "Pass", "from": [{"namespaces": labels(ns="x")}]},
        {"action": "Deny", "from": [{"namespaces": {}}]}])
    baseline = cnp("baseline-deny", "Baseline", 1, ALL_NS, ingress=[
        {"action": "Deny", "from": [{"namespaces": {}}]}])
    np_allow = netpol("y", "allow-from-x", labels(pod="a"), ingress=[
        {"from": [{"namespaceSelector": labels(ns="x")}]}])
    c = model(admin, baseline, np_allow)
    # all but from x denied by admin; from x: y/a allowed by its NetworkPolicy,
    # everything else denied by the baseline
    assert denied(c) == pairs("*", "*") - pairs("x", "y/a")
    without_baseline = model(admin, np_allow)
    assert denied(without_baseline) == pairs("*", "*") - pairs("x", "*")


def test_baseline_is_overridden_by_network_policy() -> None:
    baseline = cnp("default-deny", "Baseline", 50, ALL_NS, ingress=[
        {"action": "Deny", "from": [{"namespaces": {}}]}])
    np_allow = netpol("x", "allow-y", ingress=[{"from": [{"namespaceSelector": labels(ns="y")}]}])
    assert denied(model(baseline)) == pairs("*", "*")
    assert denied(model(baseline, np_allow)) == pairs("*", "*") - pairs("y", "x")
    pp = compile_pods(model(baseline), ["x/a"]).pods["x/a"]
    assert pp.ingress.enforced and not pp.ingress.isolated


def test_baseline_pass_ends_the_baseline_tier() -> None:
    c = model(cnp("a", "Baseline", 1, ALL_NS, ingress=[
                  {"action": "Pass", "from": [{"namespaces": labels(ns="y")}]}]),
              cnp("b", "Baseline", 2, ALL_NS, ingress=[
                  {"action": "Deny", "from": [{"namespaces": {}}]}]))
    assert denied(c) == pairs("*", "*") - pairs("y", "*")
    e = explain(c, "y/a", "x/a", "TCP", 80)
    assert e.ingress.ref == RuleRef("ClusterNetworkPolicy", "", "a", Direction.INGRESS, 0)
    assert "passes" in e.ingress.reason


def test_cnp_subject_pods_and_protocols() -> None:
    c = model(cnp("web", "Admin", 1, {"pods": {"namespaceSelector": labels(ns="x"),
                                               "podSelector": labels(pod="a")}}, ingress=[
        {"action": "Deny", "from": [{"namespaces": {}}], "protocols": [
            {"tcp": {"destinationPort": {"range": {"start": 80, "end": 81}}}},
            {"sctp": {}},
            {"udp": {"destinationPort": {"number": 81}}}]}]))
    assert denied(c, 80, "TCP") == denied(c, 81, "TCP") == pairs("*", "x/a")
    assert denied(c, 82, "TCP") == set()
    assert denied(c, 80, "SCTP") == pairs("*", "x/a")
    assert denied(c, 80, "UDP") == set() and denied(c, 81, "UDP") == pairs("*", "x/a")
    (rule,) = compile_pods(c, ["x/a"]).pods["x/a"].ingress.admin
    assert rule.action == Action.DENY and set(rule.ports) == {
        PortMatch(IPPROTO_TCP, 80, 81), PortMatch(IPPROTO_UDP, 81, 81),
        PortMatch(IPPROTO_SCTP, 0, 65535)}


def test_cnp_named_ports() -> None:
    pods = [pod(k) for k in PODS if k != "y/b"] + [pod("y/b", ports=[("serve-80-tcp", 8080, "TCP")])]
    c = model(cnp("named", "Admin", 1, {"namespaces": labels(ns="x")}, egress=[
                  {"action": "Deny", "to": [{"namespaces": labels(ns="y")}],
                   "protocols": [{"destinationNamedPort": "serve-80-tcp"}]}],
                  ingress=[{"action": "Deny", "from": [{"namespaces": labels(ns="z")}],
                            "protocols": [{"destinationNamedPort": "serve-81-udp"}]}]),
              pods=pods)
    assert denied(c, 80) == pairs("x", "y") - pairs("x", "y/b")
    assert not explain(c, "x/a", "y/b", "TCP", 8080).allowed
    assert denied(c, 81, "UDP") == pairs("z", "x")
    assert denied(c, 81, "TCP") == set()


def test_cnp_egress_to_nodes_and_networks() -> None:
    c = model(cnp("infra", "Admin", 1, ALL_NS, egress=[
        {"action": "Deny", "to": [{"nodes": labels(role="infra")}]},
        {"action": "Accept", "to": [{"networks": ["172.16.0.0/12"]}]},
        {"action": "Deny", "to": [{"networks": ["0.0.0.0/0"]}]}]))
    assert not explain(c, "x/a", NODE_IP["n2"], "TCP", 10250).allowed
    assert explain(c, "x/a", "172.17.0.1", "TCP", 443).allowed
    assert not explain(c, "x/a", "8.8.8.8", "UDP", 53).allowed
    assert denied(c) == pairs("*", "*")  # 0.0.0.0/0 holds the pods too
    assert explain(c, "x/a", NODE_IP["n1"], "TCP", 10250).egress.ref.index == 2  # type: ignore[union-attr]


def test_cnp_unsupported_and_unknown_peers_fail_closed() -> None:
    c = model(cnp("fqdn", "Admin", 1, ALL_NS, egress=[
                  {"action": "Accept", "to": [{"domainNames": ["kubernetes.io"]}]},
                  {"action": "Accept", "to": [{"future": {}}]}]),
              cnp("deny-unknown", "Admin", 2, {"namespaces": labels(ns="x")}, egress=[
                  {"action": "Deny", "to": [{"future": {}}]}]))
    comp = compile_pods(c, ["x/a", "y/a"])
    assert comp.pods["y/a"].egress.admin == ()  # accepts that match nothing
    assert denied(c) == pairs("x", "*")  # the unknown peer of a Deny rule denies all
    assert any("domainNames" in w for w in comp.warnings)


def test_tiers_in_the_compiled_form() -> None:
    c = model(cnp("base", "Baseline", 1, ALL_NS, ingress=[{"action": "Deny",
                                                          "from": [{"namespaces": {}}]}]),
              cnp("adm2", "Admin", 2, ALL_NS, ingress=[{"action": "Pass",
                                                       "from": [{"namespaces": {}}]}]),
              cnp("adm1", "Admin", 1, ALL_NS, ingress=[{"action": "Accept",
                                                       "from": [{"namespaces": labels(ns="z")}]}]),
              netpol("x", "np", ingress=[{}]))
    di = compile_pods(c, ["x/a"]).pods["x/a"].ingress
    assert [r.ref.name for r in di.admin if r.ref] == ["adm1", "adm2"]
    assert [r.action for r in di.admin] == [Action.ACCEPT, Action.PASS]
    assert [r.ref.name for r in di.baseline if r.ref] == ["base"]
    assert di.isolated and [r.ref.name for r in di.namespaced if r.ref] == ["np"]


# ----------------------------------------------------------------------------- evaluate
def test_evaluate_order() -> None:
    """The reference evaluation on a compiled policy, tier by tier."""
    c = model(cnp("adm", "Admin", 1, ALL_NS, ingress=[
                  {"action": "Pass", "from": [{"namespaces": labels(ns="y")}]},
                  {"action": "Deny", "from": [{"namespaces": labels(ns="z")}]}]),
              cnp("base", "Baseline", 1, ALL_NS, ingress=[
                  {"action": "Deny", "from": [{"namespaces": labels(ns="y")}]}]),
              netpol("x", "np", labels(pod="a"), ingress=[
                  {"from": [{"podSelector": labels(pod="b")}], "ports": [{"port": 80}]}]))
    comp = compile_pods(c, ["x/a", "x/b"])
    a, b = comp.pods["x/a"], comp.pods["x/b"]
    ing = Direction.INGRESS
    assert evaluate(a, comp.sets, ing, ip_of("z/a"), IPPROTO_TCP, 80)[0] == Action.DENY
    assert evaluate(a, comp.sets, ing, ip_of("x/b"), IPPROTO_TCP, 80) == (
        Action.ACCEPT, RuleRef("NetworkPolicy", "x", "np", ing, 0))
    assert evaluate(a, comp.sets, ing, ip_of("x/b"), IPPROTO_TCP, 81) == (
        Action.DENY, RuleRef("NetworkPolicy", "x", "np", ing, -1))
    # y passes the admin tier; x/a is isolated (deny), x/b is not (baseline deny)
    assert evaluate(a, comp.sets, ing, ip_of("y/a"), IPPROTO_TCP, 80)[1] == RuleRef(
        "NetworkPolicy", "x", "np", ing, -1)
    assert evaluate(b, comp.sets, ing, ip_of("y/a"), IPPROTO_TCP, 80) == (
        Action.DENY, RuleRef("ClusterNetworkPolicy", "", "base", ing, 0))
    assert evaluate(b, comp.sets, ing, "8.8.8.8", IPPROTO_UDP, 53) == (Action.ACCEPT, None)
    assert evaluate(b, comp.sets, Direction.EGRESS, ip_of("z/a"), 1, 0) == (Action.ACCEPT, None)
    with pytest.raises(ValueError):
        evaluate(b, comp.sets, ing, "fd00::1", IPPROTO_TCP, 80)


def test_explain_by_address_and_errors() -> None:
    c = model(netpol("x", "deny"))
    e = explain(c, ip_of("y/a"), ip_of("x/a"), IPPROTO_TCP, 80)
    assert e.src.pod == "y/a" and e.dst.pod == "x/a" and not e.allowed
    assert "y/a (10.244.2.1) -> x/a (10.244.1.1) TCP/80: denied" in str(e)
    assert explain(c, "x/a", "1.1.1.1", "TCP", 443).allowed
    with pytest.raises(ValueError):
        explain(c, "x/nope", "x/a", "TCP", 80)
    with pytest.raises(ValueError):
        explain(c, "x/a", "x/b", "GRE", 0)


def test_cnp_unknown_action_denies_and_unknown_tier_is_ignored() -> None:
    c = model(cnp("future-action", "Admin", 1, {"namespaces": labels(ns="x")}, ingress=[
                  {"action": "Log", "from": [{"namespaces": labels(ns="y")}]}]),
              cnp("future-tier", "Developer", 1, ALL_NS, ingress=[
                  {"action": "Deny", "from": [{"namespaces": {}}]}]))
    assert denied(c) == pairs("y", "x")
    warnings = compile_pods(c, ["x/a"]).warnings
    assert any("Log" in w for w in warnings) and any("Developer" in w for w in warnings)


def test_parsed_objects_are_kept_per_version() -> None:
    """A pod or policy is parsed again when its resourceVersion changes
    (what the API server does on every write), not otherwise."""
    def versioned(o: dict[str, Any], rv: str) -> dict[str, Any]:
        return {**o, "metadata": {**o["metadata"], "uid": "u-" + o["metadata"]["name"],
                                  "resourceVersion": rv}}
    pol = versioned(netpol("x", "p", labels(pod="a"), ingress=[
        {"from": [{"podSelector": labels(role="client")}]}]), "1")
    pods = [pod(k) for k in PODS if k != "x/b"]
    before = model(pol, pods=pods + [versioned(pod("x/b"), "1")])
    assert not explain(before, "x/b", "x/a", "TCP", 80).allowed
    relabelled = versioned(pod("x/b", {"pod": "b", "role": "client"}), "2")
    assert explain(model(pol, pods=pods + [relabelled]), "x/b", "x/a", "TCP", 80).allowed
    opened = versioned(netpol("x", "p", labels(pod="a"), ingress=[{}]), "2")
    assert explain(model(opened, pods=pods + [versioned(pod("x/b"), "1")]),
                   "x/b", "x/a", "TCP", 80).allowed
