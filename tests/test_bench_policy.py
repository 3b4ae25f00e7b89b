"""The pure parts of the network policy benchmarks (bench.policyobjects,
bench.policy's rules and statistics, bench.results' acceptance lines): the
synthetic cluster's counts and shapes, the changes the benchmark times, the
rules of policy-throughput. No kernel, no timing."""

from __future__ import annotations

import ipaddress
import json
import random
from collections import Counter

import pytest

from bench import policyobjects as po
from bench.policy import MISS_PORT_BASE, pair_policy, stats_ms
from bench.results import Result, acceptance
from pcn_agent.dataplane.cubes.policy import MAX_RULES
from pcn_lab.topology import Lab
from pcn_policy.compiler import Cluster, compile_node, evaluate, rule_matches
from pcn_policy.rules import IPPROTO_TCP, Action, Direction

SMALL = po.Shape(nodes=10, pods_per_node=20, namespaces=8, policies=80, apps=4)


@pytest.fixture(scope="module")
def cluster() -> po.SyntheticCluster:
    return po.build()


def _compiled(c: po.SyntheticCluster):
    return compile_node(Cluster(network_policies=list(c.policies.values()),
                                pods=list(c.pods.values()),
                                namespaces=list(c.namespaces.values()),
                                nodes=list(c.nodes.values())), c.local_node)


def _flat(o: object) -> str:
    return json.dumps(o, sort_keys=True)


# ----------------------------------------------------------------------------- the cluster
def test_default_shape_counts(cluster: po.SyntheticCluster) -> None:
    assert (len(cluster.nodes), len(cluster.pods), len(cluster.namespaces),
            len(cluster.policies)) == (100, 5000, 50, 1000)
    per_node = Counter(p["spec"]["nodeName"] for p in cluster.pods.values())
    assert set(per_node.values()) == {50}
    per_ns = Counter(p["metadata"]["namespace"] for p in cluster.policies.values())
    assert set(per_ns.values()) == {20}
    kinds = Counter(p["metadata"]["name"].split("-", 2)[2] for p in cluster.policies.values())
    assert kinds == {t.slug: 100 for t in po.TEMPLATES}


def test_objects_look_like_the_api_servers(cluster: po.SyntheticCluster) -> None:
    objs = [*cluster.nodes.values(), *cluster.namespaces.values(), *cluster.pods.values(),
            *cluster.policies.values()]
    rvs = [o["metadata"]["resourceVersion"] for o in objs]
    assert len(set(rvs)) == len(objs)
    assert len({o["metadata"]["uid"] for o in objs}) == len(objs)
    for ns in cluster.namespaces.values():
        labels = ns["metadata"]["labels"]
        assert labels[po.NS_NAME_LABEL] == ns["metadata"]["name"]
        assert labels["env"] in po.ENVS and labels["team"].startswith("team-")
    for pod in cluster.pods.values():
        assert pod["status"]["phase"] == "Running"
        assert pod["metadata"]["namespace"] in cluster.namespaces
        assert set(pod["metadata"]["labels"]) == {"app", "role"}
        names = {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
        assert {"http", "metrics"} <= names


def test_addresses_are_the_labs(cluster: po.SyntheticCluster) -> None:
    """Node k's pods are in 10.244.k.0/24 at pcn_lab's pod addresses, so
    node 1 of the cluster can be a lab node with its lab pods n1p<s>."""
    ips = [p["status"]["podIP"] for p in cluster.pods.values()]
    assert len(set(ips)) == len(ips)
    lab = Lab(nodes_count=3)
    for k, name in enumerate(cluster.node_names, 1):
        node = cluster.nodes[name]
        assert node["spec"]["podCIDR"] == po.pod_cidr(k)
        assert node["status"]["addresses"][0]["address"] == po.node_ip(k)
        net = ipaddress.IPv4Network(po.pod_cidr(k))
        assert all(ipaddress.IPv4Address(p["status"]["podIP"]) in net
                   for p in cluster.pods_on(name))
    assert po.pod_cidr(1) == lab.pod_cidr(1) and po.node_ip(1) == lab.node_ip(1)
    local = sorted(p["status"]["podIP"] for p in cluster.pods_on(cluster.local_node))
    # pcn_lab.topology.Lab.add_pod: pod s of node 1 at the pod CIDR's address 10 + s
    lab_net = ipaddress.IPv4Network(lab.pod_cidr(1))
    assert local == sorted(str(lab_net.network_address + 10 + s) for s in range(1, 51))


def test_policies_mix_what_upstream_e2e_writes(cluster: po.SyntheticCluster) -> None:
    text = _flat(list(cluster.policies.values()))
    for needle in ('"except"', '"ipBlock"', '"namespaceSelector"', '"endPort"', '"SCTP"',
                   '"UDP"', '"port": "http"', '"port": "postgres"', '"NotIn"', '"In"',
                   po.NS_NAME_LABEL):
        assert needle in text, needle
    both = [p for p in cluster.policies.values()
            if any("namespaceSelector" in peer and "podSelector" in peer
                   for r in p["spec"].get("ingress") or [] for peer in r.get("from") or [])]
    assert both
    types = Counter(tuple(p["spec"]["policyTypes"]) for p in cluster.policies.values())
    assert set(types) == {("Ingress",), ("Egress",), ("Ingress", "Egress")}
    deny_all = [p for p in cluster.policies.values()
                if p["spec"]["podSelector"] == {} and "ingress" not in p["spec"]]
    assert len(deny_all) == 50  # one default-deny-ingress a namespace


def test_node_one_compiles_within_the_cube(cluster: po.SyntheticCluster) -> None:
    """Every pod of node 1 gets a policy the policy cube can hold, most are
    isolated, and nothing is left out with a warning."""
    compiled = _compiled(cluster)
    assert len(compiled.pods) == 50 and compiled.warnings == ()
    assert all(len(p.ingress.rules) <= MAX_RULES and len(p.egress.rules) <= MAX_RULES
               for p in compiled.pods.values())
    assert sum(p.ingress.isolated for p in compiled.pods.values()) == 50
    assert any(p.egress.isolated for p in compiled.pods.values())
    # an egress rule to a named port resolves per destination pod
    assert any(r.named_port for p in compiled.pods.values() for r in p.egress.rules)
    assert len(compiled.sets) > 20


def test_build_is_deterministic_and_validated() -> None:
    a, b = po.build(SMALL, seed=3), po.build(SMALL, seed=3)
    assert _flat(a.pods) == _flat(b.pods) and _flat(a.policies) == _flat(b.policies)
    assert _flat(po.build(SMALL, seed=4).pods) != _flat(a.pods)
    with pytest.raises(ValueError):
        po.build(SMALL, node_names=["a", "b"])
    with pytest.raises(ValueError):
        po.build(SMALL, node_names=["same"] * SMALL.nodes)
    with pytest.raises(ValueError):
        po.Shape(nodes=0)
    with pytest.raises(ValueError):
        po.Shape(pods_per_node=90)


def test_local_pods_can_come_later() -> None:
    names = ["the-lab-node", *(f"n{k}" for k in range(2, SMALL.nodes + 1))]
    full = po.build(SMALL, seed=5, node_names=names)
    empty = po.build(SMALL, seed=5, node_names=names, skip_local_pods=True)
    assert empty.pods_on("the-lab-node") == [] and full.local_node == "the-lab-node"
    assert len(empty.pods) == len(full.pods) - SMALL.pods_per_node
    assert [(k, p["spec"]) for k, p in empty.policies.items()] == \
        [(k, p["spec"]) for k, p in full.policies.items()]
    for s in range(1, SMALL.pods_per_node + 1):
        pod = po.local_pod(empty, s, seed=5)
        want = full.pods[po.key_of(pod)]
        strip = {k: v for k, v in want["metadata"].items() if k != "resourceVersion"}
        assert pod["metadata"] == strip and pod["spec"] == want["spec"]
    with pytest.raises(ValueError):
        po.local_pod(empty, SMALL.pods_per_node + 1)


# ----------------------------------------------------------------------------- changes
def test_each_change_is_a_new_version_of_what_it_says() -> None:
    c = po.build(SMALL, seed=1)
    rng = random.Random(2)
    n_policies, n_pods = len(c.policies), len(c.pods)
    for n in range(4):
        for kind in po.CHANGES:
            rv = c.resource_version
            what = po.change(c, kind, n, rng)
            if kind != "policy-remove":
                assert c.resource_version == rv + 1, kind
            key = what.split()[1]
            if kind == "pod-label":
                pod = c.pods[key]
                assert pod["metadata"]["resourceVersion"] == str(c.resource_version)
                assert pod["metadata"]["labels"]["app"] == what.rsplit(" ", 1)[1]
                assert (pod["spec"]["nodeName"] == c.local_node) == (n % 2 == 0)
            elif kind == "namespace-label":
                assert c.namespaces[key]["metadata"]["labels"]["env"] == what.rsplit(" ", 1)[1]
            elif kind == "policy-add":
                assert key in c.policies
            elif kind == "policy-remove":
                assert key not in c.policies
            else:
                assert c.pods[key]["spec"]["nodeName"] != c.local_node
        assert len(c.policies) == n_policies
    assert len(c.pods) == n_pods + 4
    ips = [p["status"]["podIP"] for p in c.pods.values()]
    assert len(set(ips)) == len(ips)
    with pytest.raises(ValueError):
        po.change(c, "node-reboot", 0, rng)


def test_changes_reach_node_one(cluster: po.SyntheticCluster) -> None:
    """Over a few rounds, every kind of change alters what node 1's agent
    compiles (its pods' policies or their address sets): the benchmark
    times work, not no-ops."""
    c = po.build(seed=11)
    rng = random.Random(7)
    before = _compiled(c)
    touched: Counter[str] = Counter()
    for n in range(3):
        for kind in po.CHANGES:
            po.change(c, kind, n, rng)
            after = _compiled(c)
            if after.pods != before.pods or after.sets != before.sets:
                touched[kind] += 1
            before = after
    assert set(touched) == set(po.CHANGES), touched


# ----------------------------------------------------------------------------- throughput rules
def test_pair_policy_accepts_by_the_last_rule_only() -> None:
    client, server, other = "10.244.1.13", "10.244.1.14", "10.244.1.11"
    sets, policy = pair_policy(client, server)
    by_name = {s.name: s for s in sets}
    assert len(sets) == 50 and len(by_name) == 50
    for d in (Direction.INGRESS, Direction.EGRESS):
        side = policy.direction(d)
        assert len(side.rules) == 50 and side.isolated
        assert len(side.admin) == 25 and all(r.action == Action.DENY for r in side.admin)
        assert len(side.namespaced) == 25 and side.baseline == ()
    assert len(policy.ingress.rules) + len(policy.egress.rules) == 100
    for d, peer in ((Direction.INGRESS, client), (Direction.EGRESS, server)):
        for dport in (5201, 8080):
            action, ref = evaluate(policy, by_name, d, peer, IPPROTO_TCP, dport)
            assert action == Action.ACCEPT and ref is not None and ref.index == 49
        rules = policy.direction(d).rules
        peer_int = int(ipaddress.IPv4Address(peer))
        assert not any(rule_matches(r, by_name, peer_int, IPPROTO_TCP, 5201) for r in rules[:-1])
        # every earlier rule holds the peer: it is evaluated to its ports
        assert all(rule_matches(r, by_name, peer_int, IPPROTO_TCP, MISS_PORT_BASE + i)
                   for i, r in enumerate(rules[:-1]))
    action, ref = evaluate(policy, by_name, Direction.INGRESS, other, IPPROTO_TCP, 5201)
    assert action == Action.DENY and ref is not None and ref.index == -1


def test_pair_policy_sizes() -> None:
    sets, policy = pair_policy("10.0.0.1", "10.0.0.2", per_direction=1, admin=0, tag="one")
    assert [s.name for s in sets] == ["one-pair"]
    assert [len(policy.ingress.rules), len(policy.egress.rules)] == [1, 1]
    for per, admin in ((0, 0), (5, 5), (201, 0), (5, -1)):
        with pytest.raises(ValueError):
            pair_policy("10.0.0.1", "10.0.0.2", per, admin)


# ----------------------------------------------------------------------------- reporting
def test_stats_ms() -> None:
    samples = [float(x) for x in range(1, 101)]
    assert stats_ms(samples) == {"p50_ms": 50.5, "p95_ms": 95.0, "max_ms": 100.0}
    assert stats_ms([3.0]) == {"p50_ms": 3.0, "p95_ms": 3.0, "max_ms": 3.0}


def test_acceptance_lines_for_policy() -> None:
    per = {"pod-label": {"p50_ms": 40.0, "p95_ms": 60.0, "max_ms": 70.0}}
    shape = {"networkpolicies": 1000, "pods": 5000}
    results = [
        Result("policy-reconcile", "pcn", "latency", 40.0, "ms",
               {"per_change": per, "changes": 100, "cluster": shape}),
        Result("policy-reconcile", "pcn", "latency-p95", 99.0, "ms"),
        Result("policy-reconcile", "pcn", "latency-max", 180.0, "ms"),
        Result("policy-pod-add", "pcn", "latency", 20.0, "ms"),
        Result("policy-pod-add", "pcn", "latency-p95", 55.0, "ms"),
        Result("policy-throughput", "pcn", "throughput", 10.0, "Gbit/s"),
        Result("policy-throughput", "pcn-policy", "throughput", 9.6, "Gbit/s"),
        Result("policy-throughput", "pcn-policy-1", "throughput", 9.0, "Gbit/s"),
    ]
    lines = [x for x in acceptance(results) if "polic" in x or "rules" in x]
    assert len(lines) == 3
    reconcile, add, tput = lines
    assert "p95 99.0 ms" in reconcile and "1000 NetworkPolicies" in reconcile
    assert reconcile.endswith("pod-label 40/60/70") and ": PASS" in reconcile
    assert "p95 55.0 ms" in add and add.endswith("FAIL")
    assert "96% of without policy" in tput and ": PASS" in tput and "1 rule a direction 90%" in tput
    results[6] = Result("policy-throughput", "pcn-policy", "throughput", 9.4, "Gbit/s")
    assert any("94% of without policy" in x and ": FAIL" in x for x in acceptance(results))
