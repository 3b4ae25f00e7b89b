"""The reconciler, with no kernel and no API server: objects in, plan out."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from pcn_agent.control.reconcile import (
    Desired,
    FunctionSpec,
    Inputs,
    NodePortSpec,
    Op,
    ServiceSpec,
    cube_name,
    desired_state,
    plan,
    service_backends,
    vtep_for,
)
from pcn_agent.control.settings import ClusterSettings
from pcn_agent.dataplane.cubes.functions import FirewallSettings
from pcn_agent.dataplane.cubes.lbrp import Backend

S = ClusterSettings()


def node(name: str, ip: str, cidr: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"podCIDR": cidr},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


def pod(ns: str, name: str, labels: dict[str, str], node_name: str = "n1") -> dict[str, Any]:
    return {"metadata": {"namespace": ns, "name": name, "labels": labels},
            "spec": {"nodeName": node_name}}


def service(ns: str, name: str, ip: str, ports: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {"metadata": {"namespace": ns, "name": name, "uid": "u-" + name},
            "spec": {"clusterIP": ip, "ports": ports, **spec}}


def eps(ns: str, svc: str, endpoints: list[tuple[str, bool | None] | tuple[str, bool | None, str]],
        ports: list[dict[str, Any]]) -> dict[str, Any]:
    """An EndpointSlice: (address, ready[, nodeName]) per endpoint."""
    def endpoint(e: tuple) -> dict[str, Any]:
        ip, r, *node = e
        return {"addresses": [ip], **({"conditions": {"ready": r}} if r is not None else {}),
                **({"nodeName": node[0]} if node else {})}
    return {"metadata": {"namespace": ns, "name": f"{svc}-x",
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4", "ports": ports,
            "endpoints": [endpoint(e) for e in endpoints]}


def nf(ns: str, name: str, rules: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"apiVersion": "pcn.dev/v1alpha1", "kind": "NetworkFunction",
            "metadata": {"namespace": ns, "name": name},
            "spec": {"type": "firewall", "config": {"rules": rules, **extra}}}


def chain(ns: str, name: str, ingress: list[str], egress: list[str] = (),
          selector: dict[str, str] | None = None, priority: int = 100) -> dict[str, Any]:
    return {"apiVersion": "pcn.dev/v1alpha1", "kind": "CubeChain",
            "metadata": {"namespace": ns, "name": name},
            "spec": {"podSelector": {"matchLabels": selector or {}}, "priority": priority,
                     "ingress": [{"function": f} for f in ingress],
                     "egress": [{"function": f} for f in egress]}}


def test_peers_and_vteps_from_nodes() -> None:
    r = desired_state(Inputs("n1", S, nodes=[node("n1", "192.168.1.1", "10.244.1.0/24"),
                                              node("n2", "192.168.1.2", "10.244.2.0/24"),
                                              {"metadata": {"name": "n3"}}]))
    peers = {p.name: p for p in r.desired.peers}
    assert set(peers) == {"n1", "n2"}  # n3 has no address or CIDR yet
    assert peers["n2"].vtep_ip == "10.18.0.2" and peers["n2"].node_ip == "192.168.1.2"
    assert vtep_for(S, "10.244.7.0/24", {"pcn.dev/vtep": "10.18.9.9"}) == "10.18.9.9"


def test_vtep_of_the_first_pod_cidr() -> None:
    """kube-controller-manager gives the first node 10.244.0.0/24 (index 0),
    whose address in the VTEP range would be its network address: it gets
    the range's last host address, which no other index reaches."""
    assert vtep_for(S, "10.244.0.0/24", {}) == "10.18.255.254"
    assert vtep_for(S, "10.244.255.0/24", {}) == "10.18.0.255"
    r = desired_state(Inputs("n1", S, nodes=[node("n0", "192.168.1.9", "10.244.0.0/24")]))
    assert {p.vtep_ip for p in r.desired.peers} == {"10.18.255.254"}
    with pytest.raises(ValueError):
        vtep_for(S, "10.245.0.0/24", {})


def test_clusterip_backends_are_ready_endpoints_only() -> None:
    svc = service("web", "api", "10.96.0.10", [{"name": "http", "port": 80, "protocol": "TCP"}],
                  sessionAffinity="ClientIP")
    sl = eps("web", "api", [("10.244.1.5", True), ("10.244.2.6", None), ("10.244.2.7", False)],
             [{"name": "http", "port": 8080, "protocol": "TCP"}])
    r = desired_state(Inputs("n1", S, services=[svc], endpointslices=[sl]))
    spec = r.desired.services[("10.96.0.10", 80, "tcp")]
    assert spec.backends == (Backend("10.244.1.5", 8080), Backend("10.244.2.6", 8080))
    assert spec.affinity_timeout_s == 10800


def test_nodeport_service_gives_rule_and_derived_object() -> None:
    svc = service("web", "api", "10.96.0.10",
                  [{"name": "", "port": 80, "nodePort": 30080, "protocol": "TCP"}],
                  type="NodePort", externalTrafficPolicy="Local")
    sl = eps("web", "api", [("10.244.1.5", True, "n1")], [{"name": "", "port": 8080}])
    r = desired_state(Inputs("n1", S, services=[svc], endpointslices=[sl]))
    assert r.desired.nodeports[(30080, "tcp")] == NodePortSpec(
        "Local", (Backend("10.244.1.5", 8080),), local=(Backend("10.244.1.5", 8080),))
    rule = r.derived_rules["svc-web-api-30080-tcp"]
    assert rule["spec"]["externalTrafficPolicy"] == "Local"
    assert rule["metadata"]["ownerReferences"][0]["uid"] == "u-api"


def test_nodeports_keep_the_services_client_ip_affinity() -> None:
    """kube-proxy applies sessionAffinity: ClientIP to a Service's NodePorts
    as to its cluster IP (found missing by the acceptance run)."""
    svc = service("web", "api", "10.96.0.10",
                  [{"name": "", "port": 80, "nodePort": 30080, "protocol": "TCP"}],
                  type="NodePort", sessionAffinity="ClientIP",
                  sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}})
    sl = eps("web", "api", [("10.244.1.5", True, "n1")], [{"name": "", "port": 8080}])
    r = desired_state(Inputs("n1", S, services=[svc], endpointslices=[sl]))
    assert r.desired.nodeports[(30080, "tcp")].affinity_timeout_s == 600
    assert r.desired.services[("10.96.0.10", 80, "tcp")].affinity_timeout_s == 600


def test_static_nodeport_rule_validation_and_conflict() -> None:
    ok = {"metadata": {"name": "static"}, "kind": "NodePortRule",
          "apiVersion": "pcn.dev/v1alpha1",
          "spec": {"port": 30100, "protocol": "UDP",
                   "backends": [{"ip": "10.244.1.9", "port": 53}]}}
    bad = {"metadata": {"name": "bad"}, "kind": "NodePortRule", "apiVersion": "pcn.dev/v1alpha1",
           "spec": {"port": 80, "backends": [{"ip": "10.244.1.9", "port": 53}]}}
    invalid = {"metadata": {"name": "inv"}, "kind": "NodePortRule",
               "apiVersion": "pcn.dev/v1alpha1", "spec": {"port": 30101}}
    r = desired_state(Inputs("n1", S, nodeportrules=[ok, bad, invalid]))
    assert r.desired.nodeports[(30100, "udp")].backends == (Backend("10.244.1.9", 53),)
    assert r.verdicts[("NodePortRule", "", "bad")].reason == "OutOfRange"
    v = r.verdicts[("NodePortRule", "", "inv")]
    assert not v.ready and v.reason == "Invalid" and "spec.service or spec.backends" in v.message


def test_chain_selects_pods_in_order_with_user_semantics() -> None:
    fns = [nf("web", "fw-a", [{"action": "drop", "protocol": "tcp", "destinationPorts": "22"}]),
           nf("web", "fw-b", [{"action": "allow", "protocol": "icmp"}], defaultAction="drop")]
    chains = [chain("web", "late", ["fw-b"], priority=200),
              chain("web", "early", ["fw-a"], egress=["fw-b"], selector={"app": "api"})]
    pods = [pod("web", "api-1", {"app": "api"}), pod("web", "db-1", {"app": "db"}),
            pod("other", "x", {"app": "api"})]
    att = {"c1": ("web", "api-1"), "c2": ("web", "db-1"), "c3": ("other", "x")}
    r = desired_state(Inputs("n1", S, pods=pods, attachments=att, functions=fns, chains=chains))
    a, b = cube_name("web", "fw-a"), cube_name("web", "fw-b")
    # ingress = traffic to the pod = the port's egress side ("to_pod")
    assert r.desired.chains["c1"] == ((b,), (a, b))
    assert r.desired.chains["c2"] == ((), (b,))
    assert "c3" not in r.desired.chains
    assert r.desired.functions[a] == FunctionSpec(
        "firewall", FirewallSettings(("drop tcp dport 22",), "allow"))
    assert r.desired.functions[b].settings == FirewallSettings(("allow icmp",), "drop")
    assert not r.desired.functions[a].settings.allow_replies
    assert r.verdicts[("CubeChain", "web", "early")].pods == 1
    assert r.verdicts[("CubeChain", "web", "late")].pods == 2
    # pods, not pod sides: fw-b is on both of api-1's sides and db-1's ingress
    assert r.verdicts[("NetworkFunction", "web", "fw-b")].pods == 2
    assert r.verdicts[("NetworkFunction", "web", "fw-a")].pods == 1


def test_firewall_reply_tracking_is_part_of_its_spec() -> None:
    """allowReplies reaches the data plane's FunctionSpec, and a change of it
    alone is a set-function."""
    rule = {"action": "allow", "protocol": "tcp", "destinationPorts": "80"}
    many = [rule] * 10_000
    pods, att = [pod("web", "api-1", {"app": "api"})], {"c1": ("web", "api-1")}

    def state(fn: dict[str, Any]) -> Any:
        return desired_state(Inputs("n1", S, pods=pods, attachments=att, functions=[fn],
                                    chains=[chain("web", "c", ["fw"], egress=["fw"])]))

    on, off = state(nf("web", "fw", many, allowReplies=True)), state(nf("web", "fw", many))
    key = cube_name("web", "fw")
    assert on.desired.functions[key].settings.allow_replies
    assert len(on.desired.functions[key].settings.rules) == 10_000
    assert not off.desired.functions[key].settings.allow_replies
    assert [o.kind for o in plan(off.desired, on.desired, attached=["c1"])] == ["set-function"]
    too_many = state(nf("web", "fw", [*many, rule]))
    assert too_many.verdicts[("NetworkFunction", "web", "fw")].reason == "Invalid"


def test_bad_objects_get_a_reason() -> None:
    fns = [nf("web", "broken", [{"action": "drop", "protocol": "icmp", "destinationPorts": "22"}]),
           nf("web", "cidr", [{"action": "drop", "source": "10.0.0.300/8"}])]
    chains = [chain("web", "missing", ["nope"]), chain("web", "uses-broken", ["broken"]),
              {**chain("web", "dupe", ["cidr"]),
               "spec": {"ingress": [{"function": "x"}, {"function": "x"}]}}]
    r = desired_state(Inputs("n1", S, functions=fns, chains=chains))
    v = r.verdicts
    assert v[("NetworkFunction", "web", "broken")].reason == "Invalid"
    assert "destinationPorts needs protocol" in v[("NetworkFunction", "web", "broken")].message
    assert "not an IPv4 address" in v[("NetworkFunction", "web", "cidr")].message
    assert v[("CubeChain", "web", "missing")].reason == "FunctionNotFound"
    assert "web/nope" in v[("CubeChain", "web", "missing")].message
    assert v[("CubeChain", "web", "uses-broken")].reason == "InvalidFunction"
    assert "more than once" in v[("CubeChain", "web", "dupe")].message
    assert r.desired.functions == {} and r.desired.chains == {}


def test_plan_orders_functions_around_chains() -> None:
    f = FunctionSpec("firewall", FirewallSettings(("drop tcp dport 22",)))
    old = Desired(functions={"nf.a.old": f}, chains={"p1": ((), ("nf.a.old",))})
    new = Desired(functions={"nf.a.new": f}, chains={"p1": ((), ("nf.a.new",))},
                  services={("10.96.0.1", 80, "tcp"): ServiceSpec(())})
    ops = plan(old, new, attached=["p1"])
    kinds = [o.kind for o in ops]
    assert kinds.index("set-function") < kinds.index("set-chain") < kinds.index("delete-function")
    assert Op("set-service", ("10.96.0.1", 80, "tcp"), ServiceSpec(())) in ops
    assert plan(new, new, attached=["p1"]) == []
    # chains of pods not attached here are not planned
    assert all(o.key != "p9" for o in plan(Desired(), Desired(chains={"p9": ((), ("x",))})))


def test_settings_validation() -> None:
    with pytest.raises(ValueError, match="overlaps"):
        ClusterSettings(podCIDR="10.96.0.0/16")
    with pytest.raises(ValueError, match="port range"):
        ClusterSettings(serviceNodePortRange="32767-30000")
    assert ClusterSettings(mtu="1400").mtu == 1400  # ConfigMap values are strings


def test_backends_are_found_per_service_as_by_scanning_every_slice() -> None:
    """services_of() groups the EndpointSlices by service once per pass; each
    Service must get exactly what service_backends() finds scanning them all."""
    from pcn_agent.control.reconcile import service_backends, services_of

    http = [{"name": "http", "port": 8080, "protocol": "TCP"}]
    dns = [{"name": "dns", "port": 53, "protocol": "UDP"}]
    svcs = [service(ns, name, f"10.96.{i}.{j}",
                    [{"name": "http", "port": 80, "protocol": "TCP"},
                     {"name": "dns", "port": 53, "protocol": "UDP"}])
            for i, ns in enumerate(("a", "b")) for j, name in enumerate(("web", "db", "x"), 1)]
    slices = [eps("a", "web", [("10.244.1.2", True), ("10.244.1.3", False)], http),
              eps("a", "web", [("10.244.1.4", None)], http + dns),
              eps("b", "web", [("10.244.2.2", True)], http),
              eps("a", "db", [("10.244.1.9", True)], dns),
              {"metadata": {"namespace": "a", "name": "orphan"}, "ports": http,
               "endpoints": [{"addresses": ["10.244.1.7"]}]},
              eps("b", "nosuch", [("10.244.2.9", True)], http)]
    slices[1]["metadata"]["name"] = "web-y"
    services, _, _ = services_of(Inputs(node="n1", settings=S, services=svcs,
                                        endpointslices=slices))
    expected = {}
    for s in svcs:
        for port in s["spec"]["ports"]:
            key = (s["spec"]["clusterIP"], port["port"], port["protocol"].lower())
            expected[key] = service_backends(s, port, slices)
    assert {k: v.backends for k, v in services.items()} == expected
    assert services[("10.96.0.1", 80, "tcp")].backends == (
        Backend("10.244.1.2", 8080), Backend("10.244.1.4", 8080))
    assert services[("10.96.1.1", 80, "tcp")].backends == (Backend("10.244.2.2", 8080),)
    assert services[("10.96.0.2", 53, "udp")].backends == (Backend("10.244.1.9", 53),)


# --------------------------------------------------------------------------- kube-proxy semantics
HTTP = [{"name": "http", "port": 80, "protocol": "TCP"}]
HTTP_EP = [{"name": "http", "port": 8080, "protocol": "TCP"}]


def _backends(svcs: list[dict[str, Any]], slices: list[dict[str, Any]]
              ) -> dict[tuple[str, int, str], tuple[Backend, ...]]:
    from pcn_agent.control.reconcile import services_of

    services, _, _ = services_of(Inputs(node="n1", settings=S, services=svcs,
                                        endpointslices=slices))
    return {k: v.backends for k, v in services.items()}


def _slice(endpoints: list[tuple[str, dict[str, bool]]]) -> dict[str, Any]:
    return {"metadata": {"namespace": "a", "name": "web-x",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": HTTP_EP,
            "endpoints": [{"addresses": [ip], "conditions": c} for ip, c in endpoints]}


TERMINATING = {"ready": False, "serving": True, "terminating": True}


def test_serving_terminating_endpoints_are_used_only_while_none_is_ready() -> None:
    """KEP-1669: a Service whose only endpoint is terminating but still
    serving keeps working; once a ready endpoint exists, only it gets new
    connections; a terminating endpoint that no longer serves never does."""
    svc = [service("a", "web", "10.96.0.10", HTTP)]
    key = ("10.96.0.10", 80, "tcp")
    only_terminating = _slice([("10.244.1.2", TERMINATING)])
    assert _backends(svc, [only_terminating])[key] == (Backend("10.244.1.2", 8080),)
    both = _slice([("10.244.1.2", TERMINATING), ("10.244.1.3", {"ready": True})])
    assert _backends(svc, [both])[key] == (Backend("10.244.1.3", 8080),)
    not_serving = _slice([("10.244.1.2", {**TERMINATING, "serving": False}),
                          ("10.244.1.4", {"ready": False})])
    assert _backends(svc, [not_serving])[key] == ()
    nil_serving = _slice([("10.244.1.5", {"ready": False, "terminating": True})])
    assert _backends(svc, [nil_serving])[key] == (Backend("10.244.1.5", 8080),)


def test_services_another_proxy_owns_headless_and_external_names_are_not_programmed() -> None:
    slices = [_slice([("10.244.1.2", {"ready": True})])]
    other = service("a", "web", "10.96.0.10", HTTP)
    other["metadata"]["labels"] = {"service.kubernetes.io/service-proxy-name": "other"}
    assert _backends([other], slices) == {}
    headless_label = service("a", "web", "10.96.0.11", HTTP)
    headless_label["metadata"]["labels"] = {"service.kubernetes.io/headless": ""}
    assert _backends([headless_label], slices) == {}
    assert _backends([service("a", "web", "None", HTTP)], slices) == {}
    ext = service("a", "web", "", HTTP, type="ExternalName", externalName="example.org")
    assert _backends([ext], slices) == {}
    assert _backends([service("a", "web", "10.96.0.12", HTTP)], slices) == {
        ("10.96.0.12", 80, "tcp"): (Backend("10.244.1.2", 8080),)}


def test_endpoint_slices_labelled_headless_or_for_another_proxy_are_left_out() -> None:
    """Upstream's "should implement service.kubernetes.io/headless": a
    Service without selector whose EndpointSlice gets the headless label
    loses those endpoints (kube-proxy's EndpointSlice informer selector)."""
    svc = service("a", "web", "10.96.0.12", HTTP)
    key = ("10.96.0.12", 80, "tcp")
    for label in ("service.kubernetes.io/headless", "service.kubernetes.io/service-proxy-name"):
        plain, labelled = _slice([("10.244.1.2", READY)]), _slice([("10.244.1.3", READY)])
        labelled["metadata"]["labels"][label] = ""
        assert _backends([svc], [plain, labelled]) == {key: (Backend("10.244.1.2", 8080),)}
        assert service_backends(svc, HTTP[0], [plain, labelled]) == (Backend("10.244.1.2", 8080),)
        assert _backends([svc], [labelled]) == {key: ()}


def test_dual_stack_service_is_programmed_on_its_ipv4_cluster_ip() -> None:
    """ipFamilies [IPv6, IPv4]: spec.clusterIP is the IPv6 address, the IPv4
    one is only in spec.clusterIPs."""
    slices = [_slice([("10.244.1.2", {"ready": True})])]
    svc = service("a", "web", "fd00:10:96::a", HTTP, clusterIPs=["fd00:10:96::a", "10.96.0.20"],
                  ipFamilies=["IPv6", "IPv4"], ipFamilyPolicy="PreferDualStack")
    assert _backends([svc], slices) == {("10.96.0.20", 80, "tcp"): (Backend("10.244.1.2", 8080),)}
    v6only = service("a", "web", "fd00:10:96::b", HTTP, clusterIPs=["fd00:10:96::b"])
    assert _backends([v6only], slices) == {}


# --------------------------------------------------------------------------- traffic policies
def _on(endpoints: list[tuple[str, dict[str, bool], str | None]]) -> dict[str, Any]:
    """An EndpointSlice of a/web: (address, conditions, nodeName) per endpoint."""
    sl = _slice([(ip, c) for ip, c, _ in endpoints])
    for ep, (_, _, n) in zip(sl["endpoints"], endpoints, strict=True):
        if n is not None:
            ep["nodeName"] = n
    return sl


READY = {"ready": True}
NP_HTTP = [{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}]


def _state(node_name: str, svcs: list[dict[str, Any]], slices: list[dict[str, Any]]) -> Any:
    return desired_state(Inputs(node_name, S, services=svcs, endpointslices=slices)).desired


def test_internal_traffic_policy_local_uses_this_nodes_endpoints_only() -> None:
    """KEP-2086: with internalTrafficPolicy Local, ClusterIP traffic goes to
    endpoints on the client's node only (EndpointSlice nodeName); with none
    there, it is dropped if other nodes have some (kube-proxy's "drop"),
    rejected if no node has any."""
    svc = service("a", "web", "10.96.0.10", HTTP, internalTrafficPolicy="Local")
    key = ("10.96.0.10", 80, "tcp")
    sl = _on([("10.244.1.2", READY, "n1"), ("10.244.2.2", READY, "n2"),
                    ("10.244.1.3", {"ready": False}, "n1"), ("10.244.2.3", READY, None)])
    assert _state("n1", [svc], [sl]).services[key] == ServiceSpec(
        (Backend("10.244.1.2", 8080),))
    assert _state("n2", [svc], [sl]).services[key] == ServiceSpec(
        (Backend("10.244.2.2", 8080),))
    assert _state("n3", [svc], [sl]).services[key] == ServiceSpec((), drop_if_empty=True)
    assert _state("n1", [svc], [_on([])]).services[key] == ServiceSpec(())
    # Cluster (the default) ignores where endpoints are
    plain = service("a", "web", "10.96.0.10", HTTP)
    assert _state("n3", [plain], [sl]).services[key].backends == (
        Backend("10.244.1.2", 8080), Backend("10.244.2.2", 8080), Backend("10.244.2.3", 8080))


def test_external_ips_get_every_cluster_endpoint() -> None:
    """spec.externalIPs (the upstream test "should be possible to connect to
    a service via ExternalIP when the external IP is not assigned to a node"):
    each IPv4 one serves the Service's ports to pods and the node with every
    Cluster endpoint, whatever internalTrafficPolicy says (kube-proxy)."""
    svc = service("a", "web", "10.96.0.10", HTTP, internalTrafficPolicy="Local",
                  externalIPs=["203.0.113.250", "2001:db8::1", "not-an-ip"])
    sl = _on([("10.244.1.2", READY, "n1"), ("10.244.2.2", READY, "n2")])
    state = _state("n3", [svc], [sl])
    assert state.services[("203.0.113.250", 80, "tcp")] == ServiceSpec(
        (Backend("10.244.1.2", 8080), Backend("10.244.2.2", 8080)))
    assert state.services[("10.96.0.10", 80, "tcp")] == ServiceSpec((), drop_if_empty=True)
    assert {k[0] for k in state.services} == {"10.96.0.10", "203.0.113.250"}


def test_local_policies_fall_back_to_this_nodes_terminating_endpoints_on_their_own() -> None:
    """kube-proxy's CategorizeEndpoints decides the serving-and-terminating
    fall-back for the node's own endpoints apart from the cluster-wide one: a
    ready endpoint elsewhere does not hide this node's terminating one."""
    svc = service("a", "web", "10.96.0.10", NP_HTTP, type="NodePort",
                  internalTrafficPolicy="Local", externalTrafficPolicy="Local")
    sl = _on([("10.244.1.2", TERMINATING, "n1"), ("10.244.2.2", READY, "n2")])
    d = _state("n1", [svc], [sl])
    assert d.services[("10.96.0.10", 80, "tcp")] == ServiceSpec((Backend("10.244.1.2", 8080),))
    assert d.nodeports[(30080, "tcp")] == NodePortSpec(
        "Local", (Backend("10.244.2.2", 8080),), local=(Backend("10.244.1.2", 8080),))


def test_external_traffic_policy_local_nodeport_still_serves_the_cluster_everywhere() -> None:
    """A NodePort with externalTrafficPolicy Local: outside clients get this
    node's endpoints only (`local`), pods and the node itself all of them
    (`backends`): kube-proxy short-circuits cluster traffic to the Cluster
    endpoints. internalTrafficPolicy Local narrows the ClusterIP, never the
    NodePort."""
    svc = service("a", "web", "10.96.0.10", NP_HTTP, type="NodePort",
                  externalTrafficPolicy="Local", internalTrafficPolicy="Local")
    sl = _on([("10.244.2.2", READY, "n2"), ("10.244.2.3", READY, "n2")])
    d = _state("n1", [svc], [sl])
    both = (Backend("10.244.2.2", 8080), Backend("10.244.2.3", 8080))
    assert d.nodeports[(30080, "tcp")] == NodePortSpec("Local", both, local=())
    assert d.services[("10.96.0.10", 80, "tcp")] == ServiceSpec((), drop_if_empty=True)
    cluster = service("a", "web", "10.96.0.10", NP_HTTP, type="NodePort",
                      internalTrafficPolicy="Local")
    assert _state("n1", [cluster], [sl]).nodeports[(30080, "tcp")] == NodePortSpec(
        "Cluster", both)


def test_a_nodeport_rule_naming_a_local_service_gets_its_local_endpoints() -> None:
    svc = service("a", "web", "10.96.0.10", HTTP)
    rule = {"apiVersion": "pcn.dev/v1alpha1", "kind": "NodePortRule",
            "metadata": {"name": "web-np"},
            "spec": {"port": 30090, "externalTrafficPolicy": "Local",
                     "service": {"namespace": "a", "name": "web", "port": 80}}}
    sl = _on([("10.244.1.2", READY, "n1"), ("10.244.2.2", READY, "n2")])
    r = desired_state(Inputs("n1", S, services=[svc], endpointslices=[sl], nodeportrules=[rule]))
    assert r.desired.nodeports[(30090, "tcp")] == NodePortSpec(
        "Local", (Backend("10.244.1.2", 8080), Backend("10.244.2.2", 8080)),
        local=(Backend("10.244.1.2", 8080),))
    assert r.verdicts[("NodePortRule", "", "web-np")].ready


@pytest.mark.parametrize("allocate", [True, False])
def test_a_load_balancer_service_without_a_controller_is_served(allocate: bool) -> None:
    """type LoadBalancer with no controller to give it an address: its
    ClusterIP and (unless allocateLoadBalancerNodePorts is false and the port
    has none) its NodePort work as for a NodePort Service."""
    ports = NP_HTTP if allocate else HTTP
    svc = service("a", "web", "10.96.0.10", ports, type="LoadBalancer",
                  allocateLoadBalancerNodePorts=allocate)
    sl = _on([("10.244.2.2", READY, "n2")])
    r = desired_state(Inputs("n1", S, services=[svc], endpointslices=[sl]))
    assert r.desired.services == {("10.96.0.10", 80, "tcp"):
                                  ServiceSpec((Backend("10.244.2.2", 8080),))}
    if allocate:
        assert r.desired.nodeports == {(30080, "tcp"): NodePortSpec(
            "Cluster", (Backend("10.244.2.2", 8080),))}
        assert set(r.derived_rules) == {"svc-a-web-30080-tcp"}
    else:
        assert r.desired.nodeports == {} and r.derived_rules == {}


# --------------------------------------------------------------------------- fail closed
def _fw_pass(fns: list[dict[str, Any]], chains: list[dict[str, Any]],
             last_good: dict[Any, Any] | None = None) -> Any:
    pods = [pod("web", "api-1", {"app": "api"})]
    return desired_state(Inputs("n1", S, pods=pods, attachments={"c1": ("web", "api-1")},
                                functions=fns, chains=chains, last_good=last_good or {}))


def test_an_invalid_edit_keeps_the_last_valid_function_in_force() -> None:
    """Editing an in-use firewall to add one invalid rule must not remove it
    (that would open every port it blocks): the last valid version stays,
    and the object is reported not Ready with the reason."""
    ssh = {"action": "drop", "protocol": "tcp", "destinationPorts": "22"}
    good = _fw_pass([nf("web", "fw", [ssh])], [chain("web", "c", ["fw"])])
    fw = cube_name("web", "fw")
    assert good.desired.chains["c1"] == ((), (fw,))
    bad_rule = {"action": "drop", "protocol": "icmp", "destinationPorts": "80"}
    edited = _fw_pass([nf("web", "fw", [ssh, bad_rule])], [chain("web", "c", ["fw"])],
                      good.last_good)
    assert edited.desired.chains["c1"] == ((), (fw,))
    assert edited.desired.functions[fw] == FunctionSpec(
        "firewall", FirewallSettings(("drop tcp dport 22",)))
    v = edited.verdicts[("NetworkFunction", "web", "fw")]
    assert not v.ready and v.reason == "Invalid"
    assert "destinationPorts" in v.message and "last valid version stays in force" in v.message
    assert edited.last_good == good.last_good  # the valid one is still the one to keep
    # Without a valid version ever seen, there is nothing to keep: no function.
    fresh = _fw_pass([nf("web", "fw", [ssh, bad_rule])], [chain("web", "c", ["fw"])])
    assert "c1" not in fresh.desired.chains and fw not in fresh.desired.functions
    # Fixed: the new version is in force and becomes the one kept.
    fixed = _fw_pass([nf("web", "fw", [ssh, {"action": "drop", "protocol": "udp"}])],
                     [chain("web", "c", ["fw"])], edited.last_good)
    assert fixed.desired.functions[fw].settings == FirewallSettings(
        ("drop tcp dport 22", "drop udp"))
    assert fixed.verdicts[("NetworkFunction", "web", "fw")].ready


def test_a_chain_naming_a_missing_function_keeps_its_last_valid_version() -> None:
    ssh = {"action": "drop", "protocol": "tcp", "destinationPorts": "22"}
    fns = [nf("web", "fw", [ssh])]
    good = _fw_pass(fns, [chain("web", "c", ["fw"])])
    typo = _fw_pass(fns, [chain("web", "c", ["fw", "fw-typo"])], good.last_good)
    assert typo.desired.chains["c1"] == ((), (cube_name("web", "fw"),))
    v = typo.verdicts[("CubeChain", "web", "c")]
    assert not v.ready and v.reason == "FunctionNotFound" and "fw-typo" in v.message
    assert "stays in force" in v.message
    invalid = chain("web", "c", ["fw"])
    invalid["spec"]["priority"] = "high"
    kept = _fw_pass(fns, [invalid], good.last_good)
    assert kept.desired.chains["c1"] == ((), (cube_name("web", "fw"),))
    assert kept.verdicts[("CubeChain", "web", "c")].reason == "Invalid"
    # Deleting the function (or the chain) is a real removal, not an invalid edit.
    gone = _fw_pass([], [chain("web", "c", ["fw"])], good.last_good)
    assert "c1" not in gone.desired.chains
    assert _fw_pass(fns, [], good.last_good).desired.chains == {}
    assert ("CubeChain", "web", "c") not in _fw_pass(fns, [], good.last_good).last_good


# ----------------------------------------------------------------------------- network policy
def _policy_inputs(policies: list[dict[str, Any]]) -> Inputs:
    def running(ns: str, name: str, labels: dict[str, str], ip: str,
                host: bool = False) -> dict[str, Any]:
        p = pod(ns, name, labels)
        p["spec"]["hostNetwork"] = host
        p["status"] = {"phase": "Running", "podIP": ip}
        return p

    pods = [running("web", "api-1", {"app": "api"}, "10.244.1.5"),
            running("web", "db-1", {"app": "db"}, "10.244.1.6"),
            running("kube-system", "host-1", {}, "192.168.1.1", host=True)]
    return Inputs("n1", S, pods=pods, all_pods=pods,
                  nodes=[node("n1", "192.168.1.1", "10.244.1.0/24")],
                  namespaces=[{"metadata": {"name": "web"}}],
                  networkpolicies=policies,
                  attachments={"c1": ("web", "api-1"), "c2": ("web", "db-1")})


def test_once_a_policy_exists_every_pod_of_the_node_is_tracked() -> None:
    """The selected pod gets its rules; the other pods an empty policy (the
    cube tracks their connections, so a later policy knows who opened
    what); hostNetwork pods none. With no policy in the cluster, no pod
    carries the cube."""
    deny = {"metadata": {"namespace": "web", "name": "deny-api", "uid": "u1",
                         "resourceVersion": "1"},
            "spec": {"podSelector": {"matchLabels": {"app": "api"}}, "policyTypes": ["Ingress"]}}
    desired = desired_state(_policy_inputs([deny])).desired
    assert set(desired.policies) == {"c1", "c2"}
    assert desired.policies["c1"].ingress.isolated
    empty = desired.policies["c2"]
    assert not empty.enforced and not empty.ingress.rules and not empty.egress.rules
    assert desired_state(_policy_inputs([])).desired.policies == {}
    # once tracking, the last policy gone: every pod stays tracked (a policy
    # created later must still know who opened each connection)
    after = desired_state(replace(_policy_inputs([]), tracking=True)).desired.policies
    assert set(after) == {"c1", "c2"} and not any(p.enforced for p in after.values())


# ----------------------------------------------------------------------------- policers
def policer(ns: str, name: str, **config: Any) -> dict[str, Any]:
    return {"apiVersion": "pcn.dev/v1alpha1", "kind": "NetworkFunction",
            "metadata": {"namespace": ns, "name": name},
            "spec": {"type": "policer", "config": config}}


def test_a_policer_function_becomes_policer_settings() -> None:
    from pcn_agent.dataplane.cubes.policer import PolicerSettings

    fns = [policer("web", "slow", rate="10M", burst="1Mi", scope="shared"),
           policer("web", "dflt", rate="1G"),
           nf("web", "fw", [{"action": "drop", "protocol": "udp"}])]
    chains = [chain("web", "c", ["slow", "fw"], egress=["dflt"])]
    r = desired_state(Inputs("n1", S, pods=[pod("web", "a", {})], attachments={"k": ("web", "a")},
                             functions=fns, chains=chains))
    slow, dflt, fw = (cube_name("web", n) for n in ("slow", "dflt", "fw"))
    assert r.desired.chains["k"] == ((dflt,), (slow, fw))
    assert r.desired.functions[slow] == FunctionSpec(
        "policer", PolicerSettings(10_000_000, 1 << 20, "shared"))
    assert r.desired.functions[dflt] == FunctionSpec(
        "policer", PolicerSettings(10**9, 10**9 // 16, "pod"))  # half a second of the rate
    assert r.desired.functions[fw].type == "firewall"
    # settings are values: the same config twice plans nothing
    assert plan(r.desired, desired_state(Inputs(
        "n1", S, pods=[pod("web", "a", {})], attachments={"k": ("web", "a")}, functions=fns,
        chains=chains)).desired, attached=["k"]) == []


def test_an_invalid_policer_names_the_field_at_fault() -> None:
    fns = [policer("web", "p", rate="10Mbps"), policer("web", "q", rate="10M", burst="1k"),
           policer("web", "r", rate="10M", rules=[])]
    r = desired_state(Inputs("n1", S, functions=fns))
    assert "config.rate" in r.verdicts[("NetworkFunction", "web", "p")].message
    q = r.verdicts[("NetworkFunction", "web", "q")]
    assert "config.burst" in q.message and "64Ki-1Gi" in q.message
    assert "config.rules" in r.verdicts[("NetworkFunction", "web", "r")].message
    assert r.desired.functions == {}


def test_changing_a_functions_type_is_one_set_function() -> None:
    ssh = [{"action": "drop", "protocol": "tcp", "destinationPorts": "22"}]
    base = {"pods": [pod("web", "a", {})], "attachments": {"k": ("web", "a")},
            "chains": [chain("web", "c", ["f"])]}
    before = desired_state(Inputs("n1", S, functions=[nf("web", "f", ssh)], **base)).desired
    after = desired_state(Inputs("n1", S, functions=[policer("web", "f", rate="5M")],
                                 **base)).desired
    ops = plan(before, after, attached=["k"])
    assert [(o.kind, o.key, o.value.type) for o in ops] == \
        [("set-function", cube_name("web", "f"), "policer")]


def annotated(ns: str, name: str, **annotations: str) -> dict[str, Any]:
    p = pod(ns, name, {"app": "x"})
    p["metadata"]["annotations"] = {f"kubernetes.io/{k.replace('_', '-')}": v
                                    for k, v in annotations.items()}
    return p


def test_bandwidth_annotations_put_a_policer_nearest_the_pod() -> None:
    from pcn_agent.control.reconcile import ANNOTATION_BURST_BYTES, bandwidth_cube_name
    from pcn_agent.dataplane.cubes.policer import PolicerSettings

    fns = [nf("web", "fw", [{"action": "drop", "protocol": "udp"}])]
    chains = [chain("web", "c", ["fw"], egress=["fw"])]
    pods = [annotated("web", "a.b", ingress_bandwidth="10M", egress_bandwidth="1G"),
            annotated("web", "only-in", ingress_bandwidth="500k"), pod("web", "plain", {})]
    att = {"k1": ("web", "a.b"), "k2": ("web", "only-in"), "k3": ("web", "plain")}
    r = desired_state(Inputs("n1", S, pods=pods, attachments=att, functions=fns, chains=chains))
    fw = cube_name("web", "fw")
    bin_, bout = bandwidth_cube_name("ingress", "web", "a.b"), \
        bandwidth_cube_name("egress", "web", "a.b")
    # from the pod: its egress limit first; to the pod: its ingress limit last
    assert r.desired.chains["k1"] == ((bout, fw), (fw, bin_))
    assert r.desired.functions[bin_] == FunctionSpec(
        "policer", PolicerSettings(10_000_000, ANNOTATION_BURST_BYTES, "pod"))
    assert r.desired.functions[bout].settings == PolicerSettings(
        10**9, ANNOTATION_BURST_BYTES, "pod")
    assert ANNOTATION_BURST_BYTES == 536_870_911  # containerd: MaxUint32 bits
    only_in = bandwidth_cube_name("ingress", "web", "only-in")
    assert r.desired.chains["k2"] == ((fw,), (fw, only_in))
    assert r.desired.functions[only_in].settings == PolicerSettings(500_000,
                                                                    ANNOTATION_BURST_BYTES)
    assert r.desired.chains["k3"] == ((fw,), (fw,))
    assert r.bandwidth_errors == {}
    # no chain at all: the annotation alone makes a chain
    alone = desired_state(Inputs("n1", S, pods=pods[:1], attachments={"k1": ("web", "a.b")}))
    assert alone.desired.chains["k1"] == ((bout,), (bin_,))
    # the annotation goes: so does its policer
    gone = desired_state(Inputs("n1", S, pods=[pod("web", "a.b", {})],
                                attachments={"k1": ("web", "a.b")}))
    ops = plan(alone.desired, gone.desired, attached=["k1"])
    assert [(o.kind, o.key) for o in ops] == [("set-chain", "k1"), ("delete-function", bin_),
                                              ("delete-function", bout)] or \
        [(o.kind, o.key) for o in ops] == [("set-chain", "k1"), ("delete-function", bout),
                                           ("delete-function", bin_)]


@pytest.mark.parametrize("value,why", [("10 M", "not a quantity"), ("999", "small"),
                                       ("2P", "large"), ("fast", "not a quantity")])
def test_an_invalid_bandwidth_annotation_is_reported_and_not_applied(value: str, why: str) -> None:
    pods = [annotated("web", "a", ingress_bandwidth=value, egress_bandwidth="1M")]
    r = desired_state(Inputs("n1", S, pods=pods, attachments={"k": ("web", "a")}))
    err = r.bandwidth_errors[("web", "a")]
    assert "kubernetes.io/ingress-bandwidth" in err and why in err
    assert r.desired.chains["k"] == (("bw.egress.web.a",), ())


def test_bandwidth_policers_keep_their_place_when_chains_are_full() -> None:
    from pcn_agent.control.reconcile import MAX_STACKED

    names = [f"f{i}" for i in range(MAX_STACKED)]
    fns = [nf("web", n, []) for n in names]
    pods = [annotated("web", "a", ingress_bandwidth="1M")]
    r = desired_state(Inputs("n1", S, pods=pods, attachments={"k": ("web", "a")},
                             functions=fns, chains=[chain("web", "c", names)]))
    to_pod = r.desired.chains["k"][1]
    assert len(to_pod) == MAX_STACKED and to_pod[-1] == "bw.ingress.web.a"
    assert r.verdicts[("CubeChain", "web", "c")].reason == "TooManyFunctions"


def test_every_crd_function_type_has_a_cube() -> None:
    from pcn_agent.dataplane.cubes.functions import FUNCTION_CUBES
    from pcn_crds import FUNCTION_TYPES

    assert FUNCTION_CUBES.keys() == FUNCTION_TYPES.keys()
    for type_, cube in FUNCTION_CUBES.items():
        assert cube.type == type_ and cube.config_model is FUNCTION_TYPES[type_]
        with pytest.raises(TypeError):  # another type's config is refused
            other = next(m for t, m in FUNCTION_TYPES.items() if t != type_)
            cube.settings_of(other.model_validate({"rate": "1M"} if type_ == "firewall"
                                                  else {}))


# --------------------------------------------------------------------------- CubeTypes
def _custom_pass(config: dict[str, Any], cubetypes: dict[str, Any],
                 last_good: dict[Any, Any] | None = None, type_: str = "dscp-marker") -> Any:
    fn = {"apiVersion": "pcn.dev/v1alpha1", "kind": "NetworkFunction",
          "metadata": {"namespace": "web", "name": "mark"},
          "spec": {"type": type_, "config": config}}
    pods = [pod("web", "api-1", {"app": "api"})]
    return desired_state(Inputs("n1", S, pods=pods, attachments={"c1": ("web", "api-1")},
                                functions=[fn], chains=[chain("web", "c", [], ["mark"])],
                                cubetypes=cubetypes, last_good=last_good or {}))


def test_functions_of_a_cubetype() -> None:
    """A CubeType's function: its config checked against the type's schema
    (the field named), realised only where the type compiled, kept in force
    through an invalid edit, and kept (reported) when the type is deleted."""
    from pcn_agent.control.reconcile import CubeTypeInfo
    from pcn_agent.dataplane.cubes.custom import CustomSettings
    from pcn_crds.cubetype import param_layout

    params = param_layout({"type": "object", "required": ["dscp"], "properties": {
        "dscp": {"type": "integer", "minimum": 0, "maximum": 63},
        "protocol": {"type": "string", "enum": ["any", "udp"]}}})
    ready = {"dscp-marker": CubeTypeInfo(True, params, ("marked",))}
    key = ("NetworkFunction", "web", "mark")
    cube = cube_name("web", "mark")

    r = _custom_pass({"dscp": 46}, ready)
    assert r.desired.functions[cube] == FunctionSpec("cubetype.dscp-marker", CustomSettings(
        "dscp-marker", params, ("marked",), (("dscp", 46), ("protocol", "any"))))
    assert r.desired.chains["c1"] == ((cube,), ()) and r.verdicts[key].ready

    edited = _custom_pass({"dscp": 99, "proto": "udp"}, ready, r.last_good)
    v = edited.verdicts[key]
    assert v.reason == "Invalid" and "spec.config.dscp: 99 is greater than the maximum" \
        in v.message and "spec.config.proto: not a parameter of this type" in v.message
    assert "last valid version stays in force" in v.message
    assert edited.desired.functions[cube] == r.desired.functions[cube]
    fresh = _custom_pass({"dscp": 99}, ready)
    assert cube not in fresh.desired.functions and "c1" not in fresh.desired.chains

    missing = _custom_pass({"dscp": 1}, {})
    assert missing.verdicts[key].reason == "CubeTypeNotFound"
    assert cube not in missing.desired.functions
    broken = _custom_pass({"dscp": 1}, {"dscp-marker": CubeTypeInfo(
        False, message="line 3: use of undeclared identifier 'x'")})
    assert broken.verdicts[key].reason == "CubeTypeNotReady"
    assert "line 3: use of undeclared identifier" in broken.verdicts[key].message
    assert cube not in broken.desired.functions

    gone = _custom_pass({"dscp": 46}, {"dscp-marker": CubeTypeInfo(
        True, params, ("marked",), deleted=True)})
    assert gone.verdicts[key].reason == "CubeTypeDeleted"
    assert gone.desired.functions[cube] == r.desired.functions[cube]
