"""The incremental service reconcile (reconcile.ServiceIndex, what the agent
passes as Inputs.service_index) against service_tables() from nothing, over
long random sequences of the changes an agent sees: Services added, changed
(type, ports, ClusterIP, externalIPs that collide with other Services'
addresses, traffic policies, affinity, healthCheckNodePort, the labels that
give a Service to another proxy) and deleted; EndpointSlices added, changed
(endpoints, conditions, nodes, ports, address type), moved to another
Service and deleted, an endpoint sometimes listed in two slices. After each
change both must give the same ClusterIP/externalIP entries, NodePorts,
derived NodePortRules and health checks, and the same desired_state();
the lists are shuffled every step (the index must not depend on their
order). Pure: no kernel, no API server."""

from __future__ import annotations

import random
from typing import Any

import pytest

from pcn_agent.control.reconcile import (
    Desired,
    Inputs,
    ServiceIndex,
    desired_state,
    plan,
    service_tables,
)
from pcn_agent.control.settings import ClusterSettings

Obj = dict[str, Any]
NODE = "n1"
NAMESPACES = ("a", "b")
NAMES = tuple(f"s{i}" for i in range(12))
NODES = (NODE, "n2", None)
PORTS = (("http", 80, "TCP"), ("dns", 53, "UDP"), ("", 8080, "TCP"), ("sctp", 9, "SCTP"))


class World:
    """Services and EndpointSlices of a small cluster, each change writing a
    new object (as a watch event gives the agent a new dict)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.services: dict[tuple[str, str], Obj] = {}
        self.slices: dict[tuple[str, str], Obj] = {}
        self.serial = 0
        # what the agent's store saw, for an index in journal mode: (kind, key, object or None)
        self.events: list[tuple[str, tuple[str, str], Obj | None]] = []
        for _ in range(10):
            self.put_service()
        for _ in range(14):
            self.put_slice()

    def vip(self) -> str:
        # few addresses: ClusterIPs and externalIPs collide now and then
        return f"10.96.0.{self.rng.randrange(1, 9)}"

    def put_service(self, key: tuple[str, str] | None = None) -> None:
        r = self.rng
        ns, name = key or (r.choice(NAMESPACES), r.choice(NAMES))
        ports = []
        for pname, port, proto in r.sample(PORTS, r.randint(0, 3)):
            p: Obj = {"name": pname, "port": port, "protocol": proto,
                      "targetPort": port + 1000}
            if r.random() < 0.5:
                p["nodePort"] = 30000 + r.randrange(6)  # collisions too
            ports.append(p)
        spec: Obj = {"type": r.choice(["ClusterIP", "ClusterIP", "NodePort", "LoadBalancer",
                                       "ExternalName"]),
                     "ports": ports}
        if r.random() < 0.9:
            spec["clusterIP"] = r.choice([self.vip(), "None"])
        if r.random() < 0.2:
            spec["clusterIPs"] = ["fd00::1", self.vip()]
        if r.random() < 0.3:
            spec["externalIPs"] = [self.vip(), "203.0.113.7", "2001:db8::1"][:r.randint(1, 3)]
        if r.random() < 0.4:
            spec["externalTrafficPolicy"] = r.choice(["Local", "Cluster"])
            if r.random() < 0.7:
                spec["healthCheckNodePort"] = 32000 + r.randrange(4)
        if r.random() < 0.3:
            spec["internalTrafficPolicy"] = "Local"
        if r.random() < 0.3:
            spec["sessionAffinity"] = "ClientIP"
            if r.random() < 0.5:
                spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": r.randint(1, 99)}}
        labels = {}
        if r.random() < 0.1:
            labels[r.choice(["service.kubernetes.io/service-proxy-name",
                             "service.kubernetes.io/headless"])] = "x"
        self.serial += 1
        obj = self.services[(ns, name)] = {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": ns, "name": name, "uid": f"u-{ns}-{name}",
                         "labels": labels, "resourceVersion": str(self.serial)},
            "spec": spec}
        self.events.append(("Service", (ns, name), obj))

    def put_slice(self, key: tuple[str, str] | None = None) -> None:
        r = self.rng
        ns, name = key or (r.choice(NAMESPACES), f"sl{r.randrange(20)}")
        owner = r.choice(NAMES)
        labels: Obj = {"kubernetes.io/service-name": owner} if r.random() < 0.95 else {}
        if r.random() < 0.05:
            labels["service.kubernetes.io/headless"] = ""
        endpoints = []
        for _ in range(r.randint(0, 4)):
            ep: Obj = {"addresses": [r.choice([f"10.244.{r.randrange(2)}.{r.randrange(1, 7)}",
                                               "fd00::5", "bogus"])]}
            cond = {k: r.choice([True, False]) for k in ("ready", "serving", "terminating")
                    if r.random() < 0.6}
            if cond:
                ep["conditions"] = cond
            node = r.choice(NODES)
            if node:
                ep["nodeName"] = node
            endpoints.append(ep)
        ports = [{"name": pname, "port": port + 1000 + r.choice([0, 0, 1]), "protocol": proto}
                 for pname, port, proto in r.sample(PORTS, r.randint(0, 3))]
        self.serial += 1
        obj = self.slices[(ns, name)] = {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": ns, "name": name, "labels": labels,
                         "resourceVersion": str(self.serial)},
            "addressType": r.choice(["IPv4"] * 9 + ["IPv6"]),
            "endpoints": endpoints, "ports": ports}
        self.events.append(("EndpointSlice", (ns, name), obj))

    def change(self) -> str:
        r = self.rng
        what = r.choice(["svc+", "svc~", "svc-", "sl+", "sl~", "sl~", "sl~", "sl-", "none"])
        if what == "svc+" or (what == "svc~" and self.services):
            key = r.choice(sorted(self.services)) if what == "svc~" else None
            self.put_service(key)
        elif what == "svc-" and self.services:
            key = r.choice(sorted(self.services))
            del self.services[key]
            self.events.append(("Service", key, None))
        elif what == "sl+" or (what == "sl~" and self.slices):
            self.put_slice(r.choice(sorted(self.slices)) if what == "sl~" else None)
        elif what == "sl-" and self.slices:
            key = r.choice(sorted(self.slices))
            del self.slices[key]
            self.events.append(("EndpointSlice", key, None))
        return what

    def inputs(self, index: ServiceIndex | None) -> Inputs:
        svcs, sls = list(self.services.values()), list(self.slices.values())
        self.rng.shuffle(svcs)
        self.rng.shuffle(sls)
        return Inputs(NODE, ClusterSettings(), services=svcs, endpointslices=sls,
                      service_index=index)


def feed(w: World, index: ServiceIndex) -> None:
    """Tell a journal-mode index what the store saw since the last call."""
    for kind, key, obj in w.events:
        index.observe(kind, key, obj)
    w.events.clear()


@pytest.mark.parametrize("journal", [False, True], ids=["scan", "journal"])
@pytest.mark.parametrize("seed", range(6))
def test_incremental_equals_full_after_random_changes(seed: int, journal: bool) -> None:
    """After every change (several at once now and then: a pass sees what
    came since the last one)."""
    w = World(seed)
    index = ServiceIndex()
    if not journal:
        w.events.clear()
    for step in range(400):
        what = w.change()
        if w.rng.random() < 0.2:
            what += "," + w.change()
        if journal:
            feed(w, index)
        else:
            w.events.clear()
        inc_inputs = w.inputs(index)
        full_inputs = w.inputs(None)
        inc, full = service_tables(inc_inputs), service_tables(full_inputs)
        assert inc == full, f"seed {seed} step {step} after {what}"
        if step % 20 == 0:
            if journal:
                feed(w, index)
            a, b = desired_state(w.inputs(index)), desired_state(w.inputs(None))
            assert a.desired == b.desired and a.derived_rules == b.derived_rules \
                and a.health_checks == b.health_checks, f"seed {seed} step {step}"


@pytest.mark.parametrize("journal", [False, True], ids=["scan", "journal"])
def test_one_slice_change_recomputes_one_service(journal: bool) -> None:
    """The point of the index: a change to one EndpointSlice computes that
    Service again, not the hundreds of others; an unchanged pass none."""
    w = World(1)
    for i in range(300):
        w.put_service(("big", f"svc{i}"))
        w.services[("big", f"svc{i}")]["spec"].update(
            type="ClusterIP", clusterIP=f"10.97.{i // 250}.{i % 250 + 1}",
            ports=[{"name": "http", "port": 80, "protocol": "TCP"}])
        w.slices[("big", f"svc{i}-x")] = {
            "metadata": {"namespace": "big", "name": f"svc{i}-x",
                         "labels": {"kubernetes.io/service-name": f"svc{i}"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [f"10.244.9.{k + 1}"]} for k in range(5)]}
    index = ServiceIndex()
    if journal:
        for key, obj in w.services.items():
            index.observe("Service", key, obj)
        for key, obj in w.slices.items():
            index.observe("EndpointSlice", key, obj)
    service_tables(w.inputs(index))
    assert index.recomputed == len(w.services)
    service_tables(w.inputs(index))
    assert index.recomputed == 0
    old = w.slices[("big", "svc7-x")]
    new = w.slices[("big", "svc7-x")] = {**old, "endpoints": [{"addresses": ["10.244.9.99"]}]}
    if journal:
        index.observe("EndpointSlice", ("big", "svc7-x"), new)
    got = service_tables(w.inputs(index))
    assert index.recomputed == 1
    assert [(b.ip, b.port) for b in got.services[("10.97.0.8", 80, "tcp")].backends] == \
        [("10.244.9.99", 8080)]
    assert got == service_tables(w.inputs(None))


def test_index_returns_the_callers_own_tables() -> None:
    """A later pass must not change what an earlier pass returned (the
    agent and the manager keep earlier Desired states)."""
    w = World(2)
    index = ServiceIndex()
    first = service_tables(w.inputs(index))
    tables = ("services", "nodeports", "derived", "health")
    snapshot = {k: dict(getattr(first, k)) for k in tables}
    for _ in range(50):
        w.change()
        service_tables(w.inputs(index))
    assert {k: dict(getattr(first, k)) for k in tables} == snapshot


def test_index_starts_over_for_another_node() -> None:
    w = World(3)
    index = ServiceIndex()
    service_tables(w.inputs(index))
    other = w.inputs(index)
    other.node = "n2"
    full = w.inputs(None)
    full.node = "n2"
    assert service_tables(other) == service_tables(full)


def test_an_endpoint_in_two_slices_does_not_depend_on_their_order() -> None:
    """An endpoint moving between slices shows in both for a while, with
    other conditions or node: the outcome is the same whatever order the
    agent's store lists the slices in (name order decides)."""
    import itertools

    svc = {"metadata": {"namespace": "a", "name": "web"},
           "spec": {"clusterIP": "10.96.0.10", "internalTrafficPolicy": "Local",
                    "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}

    def sl(name: str, ready: bool, node: str) -> Obj:
        return {"metadata": {"namespace": "a", "name": name,
                             "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 8080,
                                                   "protocol": "TCP"}],
                "endpoints": [{"addresses": ["10.244.0.5"], "nodeName": node,
                               "conditions": {"ready": ready, "serving": True,
                                              "terminating": not ready}}]}

    slices = [sl("web-a", False, "n2"), sl("web-b", False, NODE), sl("web-c", False, "n3")]
    seen = set()
    index = ServiceIndex()
    for order in itertools.permutations(slices):
        full = service_tables(Inputs(NODE, ClusterSettings(), services=[svc],
                                     endpointslices=[dict(s) for s in order]))
        inc = service_tables(Inputs(NODE, ClusterSettings(), services=[svc],
                                    endpointslices=[dict(s) for s in order],
                                    service_index=index))
        assert inc == full
        seen.add(repr(full.services))
    assert len(seen) == 1, seen
    # the last in name order (web-c, on n3) counts: no endpoint on this node
    assert full.services[("10.96.0.10", 80, "tcp")].backends == ()


def test_journal_mode_takes_what_it_is_told() -> None:
    """In journal mode the lists are not looked at (that scan is what the
    mode saves): a change told is taken, one only in the lists is not; an
    object told twice before a pass counts once; another kind is refused."""
    svc = {"metadata": {"namespace": "a", "name": "web"},
           "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "protocol": "TCP"}]}}
    index = ServiceIndex()
    index.observe("Service", ("a", "web"), svc)
    got = service_tables(Inputs(NODE, ClusterSettings(), service_index=index))
    assert list(got.services) == [("10.96.0.10", 80, "tcp")]
    other = {**svc, "spec": {**svc["spec"], "clusterIP": "10.96.0.11"}}
    got = service_tables(Inputs(NODE, ClusterSettings(), services=[other],
                                service_index=index))
    assert list(got.services) == [("10.96.0.10", 80, "tcp")]
    index.observe("Service", ("a", "web"), other)
    index.observe("Service", ("a", "web"), svc)
    index.observe("Service", ("a", "web"), other)
    got = service_tables(Inputs(NODE, ClusterSettings(), service_index=index))
    assert list(got.services) == [("10.96.0.11", 80, "tcp")] and index.recomputed == 1
    index.observe("Service", ("a", "web"), None)
    assert service_tables(Inputs(NODE, ClusterSettings(), service_index=index)).services == {}
    with pytest.raises(ValueError):
        index.observe("Pod", ("a", "p"), {})


@pytest.mark.parametrize("seed", range(3))
def test_plan_from_the_delta_equals_the_full_plan(seed: int) -> None:
    """plan() given the applied services compares only the keys the index
    touched; its operations are the full comparison's, pass after pass,
    and with another `applied` (a failed apply) it compares everything."""
    w = World(seed)
    index = ServiceIndex()
    feed(w, index)
    current = Desired()
    applied = None
    for step in range(150):
        w.change()
        feed(w, index)
        desired = desired_state(w.inputs(index)).desired
        full = plan(current, desired)
        fast = plan(current, desired, applied=applied)
        assert sorted(map(repr, fast)) == sorted(map(repr, full)), f"seed {seed} step {step}"
        if step % 10 == 9:  # an apply that failed: the next plan may not trust the delta
            applied = None
            assert plan(current, desired, applied={}) == full
            continue
        current = Desired(services=dict(desired.services))
        applied = desired.services
