"""healthCheckNodePort: which Services get one on a node (reconcile) and
what the server answers (kube-proxy's pkg/proxy/healthcheck), over real
HTTP on loopback."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from typing import Any

import pytest

from pcn_agent.control.healthcheck import HealthServers, answer
from pcn_agent.control.reconcile import HealthCheck, Inputs, desired_state, health_checks_of
from pcn_agent.control.settings import ClusterSettings

HTTP = [{"name": "http", "port": 80, "protocol": "TCP"}]


def _svc(name: str, policy: str, hc: int | None, typ: str = "LoadBalancer") -> dict[str, Any]:
    spec: dict[str, Any] = {"type": typ, "clusterIP": "10.96.0.50", "ports": HTTP,
                            "externalTrafficPolicy": policy}
    if hc:
        spec["healthCheckNodePort"] = hc
    return {"metadata": {"namespace": "a", "name": name}, "spec": spec}


def _slice(name: str, eps: list[tuple[str, dict[str, bool], str]]) -> dict[str, Any]:
    return {"metadata": {"namespace": "a", "name": f"{name}-x",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": c, "nodeName": n}
                          for ip, c, n in eps]}


def test_health_checks_count_this_nodes_ready_endpoints() -> None:
    svcs = [_svc("lb", "Local", 32001), _svc("cluster", "Cluster", 32002),
            _svc("nohc", "Local", None)]
    slices = [_slice("lb", [("10.244.1.2", {"ready": True}, "n1"),
                            ("10.244.1.3", {"ready": False, "serving": True,
                                            "terminating": True}, "n1"),
                            ("10.244.2.2", {"ready": True}, "n2")])]
    inputs = Inputs("n1", ClusterSettings(), services=svcs, endpointslices=slices)
    assert health_checks_of(inputs) == {32001: HealthCheck("a", "lb", 1)}
    # terminating but serving endpoints do not count (the upstream test
    # "should fail health check node port if there are only terminating endpoints")
    assert health_checks_of(Inputs("n1", ClusterSettings(), services=svcs, endpointslices=[
        _slice("lb", [("10.244.1.3", {"ready": False, "serving": True, "terminating": True},
                       "n1")])])) == {32001: HealthCheck("a", "lb", 0)}
    assert health_checks_of(Inputs("n3", ClusterSettings(), services=svcs,
                                   endpointslices=slices))[32001].local_endpoints == 0
    assert desired_state(inputs).health_checks == health_checks_of(inputs)


def test_the_answer_is_kube_proxys() -> None:
    status, headers, body = answer(HealthCheck("a", "lb", 2))
    assert status == 200 and headers["X-Load-Balancing-Endpoint-Weight"] == "2"
    assert json.loads(body) == {"service": {"namespace": "a", "name": "lb"},
                                "localEndpoints": 2, "serviceProxyHealthy": True}
    assert answer(HealthCheck("a", "lb", 0))[0] == 503


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_servers_follow_sync() -> None:
    servers = HealthServers(host="127.0.0.1")
    port = _free_port()
    try:
        servers.sync({port: HealthCheck("a", "lb", 1)})
        assert _get(port) == (200, {"service": {"namespace": "a", "name": "lb"},
                                    "localEndpoints": 1, "serviceProxyHealthy": True})
        servers.sync({port: HealthCheck("a", "lb", 0)})  # the endpoint went away
        assert _get(port)[0] == 503
        servers.sync({})
        assert servers.ports == set()
        with pytest.raises(OSError):
            _get(port)  # nobody listens any more
    finally:
        servers.close()
