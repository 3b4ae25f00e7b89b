"""The incremental policy compile (pcn_policy.compiler.NodeCompiler, what
compile_node() and so the agent use) against a compile from nothing, over
long random sequences of every kind of change an agent sees: pod labels,
addresses, phases, named ports, pods added and deleted, namespace labels,
namespaces added and deleted, node labels and addresses, NetworkPolicies
and ClusterNetworkPolicies added, changed and deleted. After each change
both must give the same PodPolicies and the same address sets, member for
member: a selection or set the incremental compile failed to recompute
shows here as a difference. Pure: no kernel, no API server."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from typing import Any

import pytest

from bench import policyobjects as po
from pcn_policy.compiler import Cluster, NodeCompiler, compile_node, compile_node_afresh

Obj = dict[str, Any]
SHAPE = po.Shape(nodes=6, pods_per_node=12, namespaces=6, policies=48, apps=4)


def _cnp(name: str, tier: str, priority: int, rng: random.Random) -> Obj:
    """A ClusterNetworkPolicy with what only they have: namespace and pod
    subjects, nodes and networks peers, named ports, Pass and Deny."""
    team = f"team-{rng.randrange(po.TEAMS)}"
    return {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": name, "uid": f"uid-cnp-{name}"},
            "spec": {"tier": tier, "priority": priority,
                     "subject": rng.choice([
                         {"namespaces": {"matchLabels": {"team": team}}},
                         {"pods": {"namespaceSelector": {"matchLabels": {"env": "prod"}},
                                   "podSelector": {"matchLabels": {"role": "db"}}}}]),
                     "ingress": [{"action": rng.choice(["Accept", "Deny", "Pass"]),
                                  "from": [{"pods": {"namespaceSelector": {},
                                                     "podSelector": {"matchLabels": {
                                                         "app": f"app-{rng.randrange(4)}"}}}}],
                                  "protocols": [{"destinationNamedPort": "http"}]}],
                     "egress": [{"action": "Accept",
                                 "to": [{"nodes": {"matchLabels": {"zone": "a"}}},
                                        {"networks": ["10.244.2.0/24"]}]},
                                {"action": "Deny",
                                 "to": [{"namespaces": {"matchLabels": {"env": "dev"}}}]}]}}


class World:
    """The synthetic cluster of bench.policyobjects plus ClusterNetworkPolicies,
    and the changes, each writing a new version of what it touches."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.c = po.build(SHAPE, seed=seed)
        self.cnps: dict[str, Obj] = {}
        self.serial = 0
        for k, tier in enumerate(["Admin", "Admin", "Baseline"]):
            self._put_cnp(_cnp(f"cnp-{k}", tier, k, self.rng))
        for ns in sorted(self.c.namespaces)[::2]:
            # egress to named ports in a CIDR and anywhere: sets whose
            # members are the pods serving a port, wherever they are
            self.c.put("NetworkPolicy", {
                "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"namespace": ns, "name": "named-out", "uid": f"uid-{ns}-named-out"},
                "spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": [
                    {"to": [{"ipBlock": {"cidr": "10.244.0.0/17", "except": ["10.244.3.0/24"]}}],
                     "ports": [{"port": "http"}]},
                    {"ports": [{"port": "metrics", "protocol": "TCP"}]}]}})
        for k, name in enumerate(self.c.nodes):
            if k % 2 == 0:
                self._relabel("Node", name, {"zone": "a"})

    def cluster(self) -> Cluster:
        c = self.c
        return Cluster(list(c.policies.values()), list(self.cnps.values()),
                       list(c.pods.values()), list(c.namespaces.values()),
                       list(c.nodes.values()))

    def _put_cnp(self, o: Obj) -> None:
        self.serial += 1
        o["metadata"]["resourceVersion"] = f"c{self.serial}"
        self.cnps[o["metadata"]["name"]] = o

    def _relabel(self, kind: str, key: str, labels: dict[str, str | None]) -> None:
        table = {"Node": self.c.nodes, "Namespace": self.c.namespaces, "Pod": self.c.pods}[kind]
        o = copy.deepcopy(table[key])
        merged = {**o["metadata"].get("labels", {}), **labels}
        o["metadata"]["labels"] = {k: v for k, v in merged.items() if v is not None}
        self.c.put(kind, o)

    def _pod(self) -> str:
        return self.rng.choice(sorted(self.c.pods))

    def _edit_pod(self, edit: Callable[[Obj], None]) -> str:
        key = self._pod()
        o = copy.deepcopy(self.c.pods[key])
        edit(o)
        self.c.put("Pod", o)
        return key

    # --- the changes
    def pod_label(self) -> str:
        key = self._pod()
        self._relabel("Pod", key, {"app": f"app-{self.rng.randrange(SHAPE.apps)}",
                                   "role": self.rng.choice(po.ROLES + (None,))})  # type: ignore[operator]
        return f"pod-label {key}"

    def pod_address(self) -> str:
        ip = f"10.244.{self.rng.randrange(1, SHAPE.nodes + 1)}.{self.rng.randrange(100, 250)}"

        def edit(o: Obj) -> None:
            o["status"]["podIP"], o["status"]["podIPs"] = ip, [{"ip": ip}]
        return f"pod-address {self._edit_pod(edit)} {ip}"

    def pod_no_address(self) -> str:
        def edit(o: Obj) -> None:
            o["status"].pop("podIP", None)
            o["status"].pop("podIPs", None)
        return f"pod-no-address {self._edit_pod(edit)}"

    def pod_finished(self) -> str:
        def edit(o: Obj) -> None:
            o["status"]["phase"] = self.rng.choice(["Succeeded", "Failed", "Running"])
        return f"pod-phase {self._edit_pod(edit)}"

    def pod_ports(self) -> str:
        port = self.rng.choice([8080, 8081, 8443])

        def edit(o: Obj) -> None:
            ports = o["spec"]["containers"][0]["ports"]
            if self.rng.random() < 0.3:
                o["spec"]["containers"][0]["ports"] = [p for p in ports if p["name"] != "http"]
            else:
                o["spec"]["containers"][0]["ports"] = [
                    {**p, "containerPort": port} if p["name"] == "http" else p for p in ports]
        return f"pod-ports {self._edit_pod(edit)} http={port}"

    def pod_add(self) -> str:
        self.serial += 1
        k = self.rng.randrange(1, SHAPE.nodes + 1)
        o = po.make_pod(f"new-{self.serial}", f"ns-{self.rng.randrange(SHAPE.namespaces):02d}",
                        self.c.node_names[k - 1], f"10.244.{k}.{100 + self.serial % 150}",
                        self.rng.randrange(SHAPE.apps), self.rng.choice(po.ROLES))
        self.c.put("Pod", o)
        return f"pod-add {po.key_of(o)}"

    def pod_delete(self) -> str:
        key = self._pod()
        self.c.delete("Pod", key)
        return f"pod-delete {key}"

    def namespace_label(self) -> str:
        name = self.rng.choice(sorted(self.c.namespaces))
        self._relabel("Namespace", name, {"env": self.rng.choice(po.ENVS),
                                          "team": f"team-{self.rng.randrange(po.TEAMS)}"})
        return f"namespace-label {name}"

    def namespace_churn(self) -> str:
        """A namespace without a Namespace object (its pods' namespace
        still exists, unlabelled), or one listed again."""
        name = self.rng.choice(sorted(self.c.namespaces))
        if self.rng.random() < 0.5 and len(self.c.namespaces) > 2:
            self.c.delete("Namespace", name)
            return f"namespace-delete {name}"
        self.c.put("Namespace", po.make_namespace(self.rng.randrange(SHAPE.namespaces + 2)))
        return "namespace-add"

    def node_change(self) -> str:
        name = self.rng.choice(sorted(self.c.nodes))
        if self.rng.random() < 0.5:
            self._relabel("Node", name, {"zone": self.rng.choice(["a", "b", None])})
            return f"node-label {name}"
        o = copy.deepcopy(self.c.nodes[name])
        o["status"]["addresses"][0]["address"] = f"192.168.250.{self.rng.randrange(100, 200)}"
        self.c.put("Node", o)
        return f"node-address {name}"

    def policy_change(self) -> str:
        kind = po.CHANGES[self.rng.choice([2, 3])]  # policy-add, policy-remove
        return po.change(self.c, kind, self.serial, self.rng)

    def cnp_change(self) -> str:
        name = self.rng.choice(sorted(self.cnps) + ["cnp-new"])
        if name in self.cnps and self.rng.random() < 0.3:
            del self.cnps[name]
            return f"cnp-delete {name}"
        self._put_cnp(_cnp(name, self.rng.choice(["Admin", "Baseline"]),
                           self.rng.randrange(5), self.rng))
        return f"cnp-put {name}"

    def bench_change(self) -> str:
        # (namespace-label is namespace_label's: a deleted Namespace has none)
        kind = self.rng.choice([k for k in po.CHANGES if k != "namespace-label"])
        return po.change(self.c, kind, self.serial, self.rng)

    def step(self) -> str:
        changes = [self.pod_label, self.pod_address, self.pod_no_address, self.pod_finished,
                   self.pod_ports, self.pod_add, self.pod_delete, self.namespace_label,
                   self.namespace_churn, self.node_change, self.policy_change,
                   self.cnp_change, self.bench_change]
        return " + ".join(self.rng.choice(changes)() for _ in range(self.rng.choice([1, 1, 2])))


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_incremental_compile_equals_a_fresh_one_after_every_change(seed: int) -> None:
    w = World(seed)
    node = w.c.local_node
    nc = NodeCompiler(node)
    first = nc.compile(w.cluster())
    assert first.pods and first.sets  # the model puts node 1's pods under policy
    done = []
    for _ in range(120):
        done.append(w.step())
        cluster = w.cluster()
        got, want = nc.compile(cluster), compile_node_afresh(cluster, node)
        assert got.pods == want.pods, f"PodPolicies differ after {done[-3:]}"
        assert got.sets == want.sets, (
            f"sets differ after {done[-3:]}: "
            f"{sorted(n for n in got.sets.keys() | want.sets.keys() if got.sets.get(n) != want.sets.get(n))}")
        assert got.warnings == want.warnings


def test_objects_without_versions_are_compared_by_value() -> None:
    """Objects built by hand (no uid or resourceVersion) are parsed every
    time; a change to one must still reach the sets."""
    w = World(9)
    for table in (w.c.pods, w.c.namespaces):
        for o in table.values():
            o["metadata"].pop("resourceVersion", None)
    node = w.c.local_node
    nc = NodeCompiler(node)
    nc.compile(w.cluster())
    for _ in range(30):
        key = w._pod()
        o = w.c.pods[key]  # edited in place, as a hand-built list would be
        o["metadata"]["labels"]["app"] = f"app-{w.rng.randrange(SHAPE.apps)}"
        o["metadata"].pop("resourceVersion", None)
        cluster = w.cluster()
        assert nc.compile(cluster) == compile_node_afresh(cluster, node)


def test_many_changes_at_once_compile_afresh_with_the_same_result() -> None:
    w = World(5)
    node = w.c.local_node
    nc = NodeCompiler(node)
    nc.compile(w.cluster())
    for _ in range(40):  # over an eighth of the pods, past the 64 floor
        w.pod_add()
    for _ in range(40):
        w.pod_label()
    cluster = w.cluster()
    assert nc.compile(cluster) == compile_node_afresh(cluster, node)


def test_compile_node_keeps_a_compiler_per_node() -> None:
    w = World(6)
    cluster = w.cluster()
    for name in w.c.node_names:
        assert compile_node(cluster, name) == compile_node_afresh(cluster, name)
    w.pod_label()
    w.namespace_label()
    cluster = w.cluster()
    for name in w.c.node_names:
        assert compile_node(cluster, name) == compile_node_afresh(cluster, name)
