"""NetworkPolicy and ClusterNetworkPolicy end to end, as a user applies them:
the emulated lab's API server, the node agents (watch, compile, the policy
cube on the selected pods' ports), the kubelet stand-in's pods on two nodes,
real traffic between them. Same node, across nodes, through a ClusterIP,
a pod's label change, a namespace's label change, a revoked connection, and
`kubectl pcn chain` counting what the policy let through."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pcn_lab import cli as lab

pytestmark = pytest.mark.netns
BIN = Path(sys.executable).parent
PORT = 8080  # a containerPort every test pod serves (TCP), named "http"
VIP = "10.96.77.7"


def run(d: Path, *args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pcn_lab.cli", "--dir", str(d), *args],
                          capture_output=True, text=True, timeout=timeout)


class Api:
    """The lab's API server, spoken to as a client does (JSON over HTTP)."""

    def __init__(self, d: Path) -> None:
        cfg = yaml.safe_load((d / "kubeconfig").read_text())
        self.url = cfg["clusters"][0]["cluster"]["server"]

    def call(self, method: str, path: str, body: Any = None,
             ctype: str = "application/json") -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": ctype})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"null")

    def create(self, obj: dict[str, Any]) -> None:
        kind, ns = obj["kind"], obj["metadata"].get("namespace")
        path = {"Namespace": "/api/v1/namespaces",
                "Pod": f"/api/v1/namespaces/{ns}/pods",
                "Service": f"/api/v1/namespaces/{ns}/services",
                "NetworkPolicy": f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies",
                "ClusterNetworkPolicy":
                    "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies"}[kind]
        self.call("POST", path, obj)

    def label(self, path: str, labels: dict[str, str | None]) -> None:
        self.call("PATCH", path, {"metadata": {"labels": labels}},
                  "application/merge-patch+json")

    def delete(self, path: str) -> None:
        self.call("DELETE", path)


def _wait(what: str, fn: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


def pod(name: str, ns: str, node: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": node, "containers": [{
                "name": "app", "image": "probe",
                "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}]}]}}


def netpol(name: str, ns: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Api, dict]]:
    d = tmp_path_factory.mktemp("netpol") / "run"
    r = run(d, "up", "--nodes", "2", "--pods-per-node", "0")
    state = lab.LabState.load(d)
    try:
        assert r.returncode == 0, r.stderr + r.stdout
        assert state is not None
        api = Api(d)
        n1, n2 = f"{state.prefix}-n1", f"{state.prefix}-n2"
        for ns, labels in (("np-x", {"team": "x"}), ("np-y", {"team": "y"})):
            api.create({"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": ns, "labels": labels}})
        placed = {"xa": ("np-x", n1, {"app": "a"}), "xb": ("np-x", n2, {"app": "b"}),
                  "ya": ("np-y", n1, {"app": "a"}), "yb": ("np-y", n2, {"app": "b"})}
        for name, (ns, node, labels) in placed.items():
            api.create(pod(name, ns, node, labels))
        api.create({"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": "xa", "namespace": "np-x"},
                    "spec": {"clusterIP": VIP, "selector": {"app": "a"},
                             "ports": [{"port": 80, "targetPort": PORT, "protocol": "TCP"}]}})
        ips = {name: _wait(f"{name}'s address", lambda name=name, ns=ns: (api.call(
            "GET", f"/api/v1/namespaces/{ns}/pods/{name}").get("status") or {}).get("podIP"))
            for name, (ns, _, _) in placed.items()}
        yield d, api, ips
    finally:
        prefix = state.prefix if state else ""
        down = run(d, "down")
        assert down.returncode == 0, down.stderr
        assert prefix


def reach(d: Path, src: str, ip: str, port: int = PORT, timeout: float = 1.5) -> bool:
    r = run(d, "exec", src, "--", sys.executable, "-m", "pcn_lab.probe", "tcp", ip, str(port),
            "--timeout", str(timeout), timeout=60)
    out = r.stdout.strip().splitlines()
    return bool(out) and json.loads(out[-1]).get("ok", False)


def eventually(d: Path, src: str, ip: str, want: bool, port: int = PORT,
               timeout: float = 20) -> None:
    """The policy takes effect within seconds (the agent reconciles on the
    event; this waits for it, then asks again to make sure it holds)."""
    _wait(f"{src} -> {ip}:{port} {'allowed' if want else 'denied'}",
          lambda: reach(d, src, ip, port) == want, timeout)
    assert reach(d, src, ip, port) == want


def test_isolation_and_a_namespace_selector_rule(cluster) -> None:
    """deny-all ingress in np-x; then allow from namespaces labelled
    team=y: the same-node and the cross-node client get in, the other
    namespace's label change shuts them out again."""
    d, api, ips = cluster
    assert reach(d, "ya", ips["xa"]) and reach(d, "yb", ips["xa"])  # no policy: open
    api.create(netpol("deny-all", "np-x", {"podSelector": {}}))
    eventually(d, "ya", ips["xa"], False)  # same node
    eventually(d, "yb", ips["xa"], False)  # across nodes
    assert reach(d, "xb", ips["xa"]) is False  # its own namespace too
    assert reach(d, "xa", ips["yb"])  # egress is not isolated
    api.create(netpol("from-team-y", "np-x", {
        "podSelector": {"matchLabels": {"app": "a"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "y"}}}]}]}))
    eventually(d, "ya", ips["xa"], True)
    eventually(d, "yb", ips["xa"], True)
    assert reach(d, "xb", ips["xa"]) is False  # not team=y
    api.label("/api/v1/namespaces/np-y", {"team": "z"})
    eventually(d, "yb", ips["xa"], False)
    api.label("/api/v1/namespaces/np-y", {"team": "y"})
    eventually(d, "yb", ips["xa"], True)
    api.delete("/apis/networking.k8s.io/v1/namespaces/np-x/networkpolicies/from-team-y")
    api.delete("/apis/networking.k8s.io/v1/namespaces/np-x/networkpolicies/deny-all")
    eventually(d, "xb", ips["xa"], True)


def test_a_pod_label_change_and_a_named_port_through_a_clusterip(cluster) -> None:
    """Allow np-y's pods labelled role=client to the named port "http"; the
    ClusterIP's backend is judged (after translation) as the pod itself."""
    d, api, ips = cluster
    api.create(netpol("clients-only", "np-x", {
        "podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "y"}},
                               "podSelector": {"matchLabels": {"role": "client"}}}],
                     "ports": [{"port": "http"}]}]}))
    try:
        eventually(d, "yb", VIP, False, port=80)
        api.label("/api/v1/namespaces/np-y/pods/yb", {"role": "client"})
        eventually(d, "yb", VIP, True, port=80)
        assert reach(d, "yb", ips["xa"])  # and straight to the pod
        assert not reach(d, "ya", VIP, port=80)  # not labelled
        api.label("/api/v1/namespaces/np-y/pods/yb", {"role": None})
        eventually(d, "yb", VIP, False, port=80)
    finally:
        api.delete("/apis/networking.k8s.io/v1/namespaces/np-x/networkpolicies/clients-only")
    eventually(d, "ya", ips["xa"], True)


@pytest.mark.parametrize("types", [["Ingress", "Egress"], ["Ingress"]],
                         ids=["both-isolated", "ingress-only"])
def test_a_revoked_connection_stops_and_counters_show_the_rule(cluster, types) -> None:
    """A long transfer accepted by a rule stops once the rule is gone, and
    `kubectl pcn chain` showed the rule's rising packet counter meanwhile.
    With the server's egress not isolated, the connection's next packets
    must not be picked up as replies of one the server opened (a new user
    found a revoked connection going on that way)."""
    d, api, ips = cluster
    egress: dict[str, Any] = {"egress": []} if "Egress" in types else {}
    api.create(netpol("ya-in", "np-x", {
        "podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": types,
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "y"}},
                               "podSelector": {"matchLabels": {"app": "a"}}}]}],
        **egress}))
    try:
        eventually(d, "ya", ips["xa"], True)
        assert not reach(d, "yb", ips["xa"])
        client = subprocess.Popen(
            [sys.executable, "-m", "pcn_lab.cli", "--dir", str(d), "exec", "ya", "--",
             sys.executable, "-m", "pcn_lab.probe", "tcp", ips["xa"], str(PORT), "--bytes",
             "160000000", "--rate", "2000000", "--timeout", "30"],
            stdout=subprocess.PIPE, text=True)
        try:
            def rule_packets() -> int:
                r = subprocess.run([str(BIN / "kubectl-pcn"), "chain", "xa", "-n", "np-x",
                                    "-o", "json"], env={"KUBECONFIG": str(d / "kubeconfig"),
                                                        "PATH": f"{BIN}:/usr/bin:/bin"},
                                   capture_output=True, text=True, timeout=60)
                doc = json.loads(r.stdout) if r.returncode == 0 else {}
                rules = ((doc.get("policy") or {}).get("rules")) or []
                return sum(x["packets"] for x in rules
                           if x["rule"] == "NetworkPolicy np-x/ya-in ingress[0]")

            first = _wait("the rule's counter", rule_packets, timeout=30)
            _wait("the rule's counter to rise", lambda: rule_packets() > first, timeout=30)
            api.delete("/apis/networking.k8s.io/v1/namespaces/np-x/networkpolicies/ya-in")
            # the agents apply the cluster without any policy first (yb gets in
            # again): the connection must still be known when the deny comes
            eventually(d, "yb", ips["xa"], True)
            api.create(netpol("ya-in", "np-x", {
                "podSelector": {"matchLabels": {"app": "a"}},
                "policyTypes": types, "ingress": [], **egress}))
            out, _ = client.communicate(timeout=150)
        finally:
            client.kill()
        r = json.loads(out.strip().splitlines()[-1])
        assert not r["ok"], r  # cut off before its 160 MB at 2 MB/s (80 s)
    finally:
        api.delete("/apis/networking.k8s.io/v1/namespaces/np-x/networkpolicies/ya-in")
    eventually(d, "ya", ips["xa"], True)


def test_a_cluster_network_policy_admin_deny_beats_a_namespaced_allow(cluster) -> None:
    """ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2): an Admin
    tier Deny from np-y wins over np-x's NetworkPolicy allowing everything;
    a Baseline Deny applies only where no NetworkPolicy isolates."""
    d, api, ips = cluster
    api.create(netpol("allow-all", "np-x", {"podSelector": {}, "ingress": [{}]}))
    cnp = {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
           "metadata": {"name": "no-y-to-x"},
           "spec": {"tier": "Admin", "priority": 10,
                    "subject": {"namespaces": {"matchLabels": {"team": "x"}}},
                    "ingress": [{"action": "Deny", "from": [
                        {"namespaces": {"matchLabels": {"team": "y"}}}]}]}}
    base = {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": "baseline-no-x-to-y"},
            "spec": {"tier": "Baseline", "priority": 10,
                     "subject": {"namespaces": {"matchLabels": {"team": "y"}}},
                     "ingress": [{"action": "Deny", "from": [
                         {"namespaces": {"matchLabels": {"team": "x"}}}]}]}}
    cnps = "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies"
    api.create(cnp)
    api.create(base)
    try:
        eventually(d, "ya", ips["xa"], False)
        assert reach(d, "xb", ips["xa"])  # the namespaced allow still admits np-x
        eventually(d, "xa", ips["yb"], False)  # baseline: np-y has no NetworkPolicy
        api.create(netpol("allow-all", "np-y", {"podSelector": {}, "ingress": [{}]}))
        eventually(d, "xa", ips["yb"], True)  # a NetworkPolicy isolates: baseline skipped
    finally:
        api.delete(f"{cnps}/no-y-to-x")
        api.delete(f"{cnps}/baseline-no-x-to-y")
        api.delete("/apis/networking.k8s.io/v1/namespaces/np-x/networkpolicies/allow-all")
        api.delete("/apis/networking.k8s.io/v1/namespaces/np-y/networkpolicies/allow-all")
    eventually(d, "ya", ips["xa"], True)
