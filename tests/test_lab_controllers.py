"""The lab's stand-ins for the controllers of kube-controller-manager and the
API server's allocators, against the emulated API server (no namespaces)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from pcn_lab import controllers
from pcn_lab.apiserver import EmulatedApiServer, apply, delete

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
