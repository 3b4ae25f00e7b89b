"""The lab's stand-ins for the controllers of kube-controller-manager and the
API server's allocators (against the emulated API server, no namespaces),
and for the kubelet (ports, restart back-off)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from pcn_lab import controllers, kubelet
from pcn_lab.apiserver import EmulatedApiServer, apply, delete
from pcn_lab.supervisor import RestartBackoff

NS = "demo"


@pytest.fixture
def api() -> Iterator[EmulatedApiServer]:
    with EmulatedApiServer() as a:
        yield a


def pod(name: str, ip: str | None, node: str = "n1", labels: dict[str, str] | None = None,
        **spec: Any) -> dict[str, Any]:
    status = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
              "conditions": [{"type": "Ready", "status": "True"}]} if ip else {"phase": "Pending"}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": labels or {"app": "web"}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}], **spec},
            "status": status}


def service(name: str = "web", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NS},
            "spec": {"selector": {"app": "web"},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080}], **spec}}


def slices(api: EmulatedApiServer, svc: str = "web") -> list[dict[str, Any]]:
    items = api.request("GET", f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices")
    return [s for s in items.get("items", [])
            if (s["metadata"].get("labels") or {}).get("kubernetes.io/service-name") == svc]


def addresses(api: EmulatedApiServer, svc: str = "web") -> set[str]:
    return {a for s in slices(api, svc) for e in s.get("endpoints") or []
            for a in e["addresses"]}


def test_endpoint_slices_follow_pod_changes(api: EmulatedApiServer) -> None:
    apply(api, service())
    apply(api, pod("web-1", "10.244.1.10"))
    controllers.sync_endpoint_slices(api)
    assert addresses(api) == {"10.244.1.10"}
    apply(api, pod("web-2", "10.244.2.10", node="n2"))
    controllers.sync_endpoint_slices(api)
    assert addresses(api) == {"10.244.1.10", "10.244.2.10"}
    delete(api, pod("web-1", None))
    controllers.sync_endpoint_slices(api)
    assert addresses(api) == {"10.244.2.10"}
    (only,) = slices(api)
    assert only["ports"] == [{"name": "http", "protocol": "TCP", "port": 8080}]
    assert only["endpoints"][0]["nodeName"] == "n2"


def test_slices_go_with_their_service_or_its_selector(api: EmulatedApiServer) -> None:
    """The garbage collector deletes a deleted Service's slices (they are
    owned by it); the controller deletes them when the selector goes. A
    slice someone else manages stays."""
    apply(api, service())
    apply(api, service("other"))
    apply(api, pod("web-1", "10.244.1.10"))
    mine = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "by-hand", "namespace": NS,
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [], "endpoints": []}
    apply(api, mine)
    controllers.sync_endpoint_slices(api)
    assert addresses(api, "other") == {"10.244.1.10"}
    delete(api, service("web"))
    api.request("PUT", f"/api/v1/namespaces/{NS}/services/other",
                {**service("other"), "spec": {"ports": [{"port": 80}]}})
    controllers.sync_endpoint_slices(api)
    assert [s["metadata"]["name"] for s in slices(api, "web")] == ["by-hand"]
    assert slices(api, "other") == []


def test_slice_conditions_ports_and_labels_as_the_controller_sets_them(
        api: EmulatedApiServer) -> None:
    """Ready from the pod's Ready condition; a pod being deleted is
    terminating (and not ready) but still serving; a named targetPort is the
    container port of that name; the Service's labels are copied (so a
    service-proxy-name label reaches the slices, as kube-proxy expects)."""
    apply(api, {**service(), "metadata": {"name": "web", "namespace": NS, "labels": {
        "service.kubernetes.io/service-proxy-name": "other-proxy"}},
        "spec": {"selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "targetPort": "web"}]}})
    ports = [{"name": "web", "containerPort": 9090}]
    ready = pod("web-1", "10.244.1.10", containers=[{"name": "c", "image": "i",
                                                      "ports": ports}])
    not_ready = pod("web-2", "10.244.1.11", containers=[{"name": "c", "image": "i",
                                                          "ports": ports}])
    not_ready["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    leaving = pod("web-3", "10.244.1.12", containers=[{"name": "c", "image": "i",
                                                        "ports": ports}])
    leaving["metadata"]["finalizers"] = ["pcn.dev/test"]
    for p in (ready, not_ready, leaving):
        apply(api, p)
    delete(api, leaving)  # held by its finalizer: terminating
    controllers.sync_endpoint_slices(api)
    (s,) = slices(api)
    assert s["ports"] == [{"name": "http", "protocol": "TCP", "port": 9090}]
    assert s["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"] == "other-proxy"
    assert s["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] == \
        "endpointslice-controller.k8s.io"
    conds = {e["targetRef"]["name"]: e["conditions"] for e in s["endpoints"]}
    assert conds == {"web-1": {"ready": True, "serving": True, "terminating": False},
                     "web-2": {"ready": False, "serving": False, "terminating": False},
                     "web-3": {"ready": False, "serving": True, "terminating": True}}


def test_slices_hold_at_most_100_endpoints(api: EmulatedApiServer) -> None:
    apply(api, service())
    for i in range(130):
        apply(api, pod(f"web-{i:03}", f"10.244.{1 + i // 200}.{10 + i % 200}"))
    controllers.sync_endpoint_slices(api)
    sizes = sorted(len(s["endpoints"]) for s in slices(api))
    assert sizes == [30, 100]
    assert len(addresses(api)) == 130


def test_service_defaults_and_addresses(api: EmulatedApiServer) -> None:
    """As the API server fills in a new Service: type ClusterIP and a cluster
    IP by default; none for ExternalName; headless stays "None"; an IPv6 or
    dual-stack Service gets addresses of its families, primary first;
    NodePorts for NodePort Services."""
    apply(api, {**service("plain"), "spec": {"ports": [{"port": 80}]}})
    apply(api, {**service("ext"), "spec": {"type": "ExternalName",
                                           "externalName": "example.com"}})
    apply(api, {**service("headless"), "spec": {"clusterIP": "None", "selector": {"a": "b"},
                                                "ports": [{"port": 80}]}})
    apply(api, {**service("v6"), "spec": {"ipFamilies": ["IPv6", "IPv4"],
                                          "ipFamilyPolicy": "RequireDualStack",
                                          "ports": [{"port": 80}]}})
    apply(api, {**service("np"), "spec": {"type": "NodePort", "ports": [{"port": 80}]}})
    controllers.allocate_service_addresses(api)

    def spec(name: str) -> dict[str, Any]:
        return api.request("GET", f"/api/v1/namespaces/{NS}/services/{name}")["spec"]

    plain = spec("plain")
    assert plain["type"] == "ClusterIP" and plain["clusterIP"].startswith("10.96.")
    assert plain["clusterIPs"] == [plain["clusterIP"]] and plain["ipFamilies"] == ["IPv4"]
    assert plain["ports"] == [{"port": 80, "protocol": "TCP", "targetPort": 80}]
    assert "clusterIP" not in spec("ext") and spec("ext")["type"] == "ExternalName"
    assert spec("headless")["clusterIP"] == "None"
    v6 = spec("v6")
    assert v6["clusterIP"].startswith("fd00:10:96::") and v6["clusterIP"] == v6["clusterIPs"][0]
    assert v6["clusterIPs"][1].startswith("10.96.") and v6["ipFamilies"] == ["IPv6", "IPv4"]
    np = spec("np")
    assert 30000 <= np["ports"][0]["nodePort"] <= 32767
    assert np["externalTrafficPolicy"] == "Cluster"
    assert len({plain["clusterIP"], v6["clusterIPs"][1], np["clusterIP"]}) == 3
    before = api.request("GET", "/api/v1/services")
    controllers.allocate_service_addresses(api)  # a second pass changes nothing
    assert api.request("GET", "/api/v1/services") == before


def test_endpoints_follow_their_service(api: EmulatedApiServer) -> None:
    """The endpoints controller's v1 Endpoints (`kubectl get ep`): ready and
    not-ready addresses, resolved ports; gone with the Service."""
    apply(api, service())
    apply(api, pod("web-1", "10.244.1.10"))
    late = pod("web-2", "10.244.1.11")
    late["status"]["conditions"] = []
    apply(api, late)
    controllers.sync_endpoints(api)
    ep = api.request("GET", f"/api/v1/namespaces/{NS}/endpoints/web")
    (subset,) = ep["subsets"]
    assert [a["ip"] for a in subset["addresses"]] == ["10.244.1.10"]
    assert [a["ip"] for a in subset["notReadyAddresses"]] == ["10.244.1.11"]
    assert subset["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]
    delete(api, service())
    controllers.sync_endpoints(api)
    assert api.request("GET", f"/api/v1/namespaces/{NS}/endpoints").get("items") == []


def test_agent_restart_backoff_is_kubelets() -> None:
    """A DaemonSet's agent that exits is started again at once, then after
    10 s, 20 s, ... up to 5 minutes (CrashLoopBackOff); ten minutes of
    running forget the back-off."""
    b = RestartBackoff()
    assert [b.delay("n1", 1.0) for _ in range(8)] == [0, 10, 20, 40, 80, 160, 300, 300]
    assert b.delay("n2", 1.0) == 0  # per node
    assert b.delay("n1", 600.0) == 0
    assert b.delay("n1", 1.0) == 10


def test_lab_pods_listen_on_their_declared_ports() -> None:
    """A lab pod serves the ports its containers declare (as the real
    containers would), besides the probe's TCP 8080 and UDP 8081."""
    p = pod("web-1", "10.244.1.10", containers=[
        {"name": "a", "ports": [{"containerPort": 9090}, {"containerPort": 53,
                                                           "protocol": "UDP"}]},
        {"name": "b", "ports": [{"containerPort": 8080, "protocol": "TCP"},
                                {"containerPort": 3868, "protocol": "SCTP"}]}])
    assert kubelet.container_ports(p, 8080, 8081) == ([8080, 9090], [53, 8081])


def test_one_bad_service_does_not_hold_up_the_others(api: EmulatedApiServer,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A controller works through its Services one by one: an invalid one
    (a selector that is no map, which a real API server would refuse) is
    reported once, however many passes fail on it, and the others are
    synced."""
    apply(api, {**service("bad"), "spec": {"selector": ["app", "web"], "ports": [{"port": 80}]}})
    apply(api, service())
    apply(api, pod("web-1", "10.244.1.10"))
    with caplog.at_level("WARNING", logger="pcn_lab.controllers"):
        for _ in range(3):
            controllers.sync_endpoint_slices(api)
    assert addresses(api) == {"10.244.1.10"}
    assert [r.getMessage() for r in caplog.records if "demo/bad" in r.getMessage()] == [
        "endpointslice controller: demo/bad: AttributeError: 'list' object has no attribute "
        "'items' (retried on every pass)"]
