"""The API proxy the lab puts in front of the emulator (what kubectl and the
agents talk to): watches, discovery and the server-side Table format, as a
real API server serves them."""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from pcn_lab.apiproxy import ApiProxy, printer_columns, to_table
from pcn_lab.apiserver import EmulatedApiServer


class Proxied:
    """An emulator and the proxy in front of it, the proxy on a loop of its own."""

    def __init__(self) -> None:
        self.api = EmulatedApiServer().start()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.proxy: ApiProxy = self._run(ApiProxy(self.api.url).start())
        self.host, self.port = "127.0.0.1", self.proxy.port

    def _run(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self._run(self.proxy.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.api.stop()

    def get(self, path: str, accept: str = "application/json", timeout: float = 10
            ) -> tuple[int, dict]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request("GET", path, headers={"Accept": accept})
            r = conn.getresponse()
            return r.status, json.loads(r.read() or b"null")
        finally:
            conn.close()

    def watch(self, path: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        conn.request("GET", path + ("&" if "?" in path else "?") + "watch=true")
        r = conn.getresponse()
        assert r.status == 200
        return conn, r


@pytest.fixture
def proxied() -> Iterator[Proxied]:
    p = Proxied()
    try:
        yield p
    finally:
        p.close()


def established_to(port: int) -> int:
    """TCP connections on this machine, established, to 127.0.0.1:`port`."""
    n = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "01" and int(fields[2].split(":")[1], 16) == port:
            n += 1
    return n


def test_a_closed_watch_lets_go_of_the_api_server(proxied: Proxied) -> None:
    """A client that goes away (an agent killed) takes its watches with it:
    the proxy closes what it held open to the API server for them."""
    upstream = urlsplit(proxied.api.url).port
    assert upstream is not None
    watches = [proxied.watch(f"/api/v1/namespaces/ns{i}/configmaps") for i in range(5)]
    assert established_to(upstream) >= 5
    for conn, r in watches:
        r.close()
        conn.close()
    deadline = time.monotonic() + 20
    while established_to(upstream) > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert established_to(upstream) == 0


def test_many_watches_at_once_do_not_block_other_requests(proxied: Proxied) -> None:
    """A real API server does not count long-running requests (watches)
    against any limit of requests in flight: with 101 watches open (ten
    agents' worth), a GET still answers."""
    watches = [proxied.watch(f"/api/v1/namespaces/ns{i}/pods") for i in range(101)]
    try:
        status, body = proxied.get("/api/v1/namespaces/default/configmaps")
        assert status == 200 and body["items"] == []
    finally:
        for conn, r in watches:
            r.close()
            conn.close()


def _service(api: EmulatedApiServer, name: str, **spec: object) -> None:
    from pcn_lab.apiserver import apply

    apply(api, {"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": "demo"},
                "spec": {"selector": {"app": "web"}, **spec}})


def test_discovery_names_resources_as_kubernetes_does(proxied: Proxied) -> None:
    """Singular names (`kubectl get endpointslice`) and short names
    (`svc`, `ep`) as a real API server advertises them."""
    _, core = proxied.get("/api/v1")
    _, disc = proxied.get("/apis/discovery.k8s.io/v1")
    by_name = {r["name"]: r for doc in (core, disc) for r in doc["resources"]}
    assert by_name["endpointslices"]["singularName"] == "endpointslice"
    assert by_name["services"]["singularName"] == "service"
    assert by_name["services"]["shortNames"] == ["svc"]
    assert by_name["endpoints"]["singularName"] == "endpoints"
    assert by_name["endpoints"]["shortNames"] == ["ep"]
    assert by_name["pods"]["singularName"] == "pod"
    assert core["groupVersion"] == "v1"
    # a subresource is no resource of its own: no names for kubectl to match
    status = by_name["services/status"]
    assert status["shortNames"] == [] and status["singularName"] == ""
    assert sorted(status["verbs"]) == ["get", "patch", "update"]


def test_service_table_has_kubectls_columns(proxied: Proxied) -> None:
    """TYPE, CLUSTER-IP, EXTERNAL-IP, PORT(S), AGE (and SELECTOR with -o
    wide) as kube-apiserver prints Services."""
    _service(proxied.api, "web", type="NodePort", clusterIP="10.96.0.100",
             ports=[{"port": 80, "nodePort": 30080, "protocol": "TCP"},
                    {"port": 53, "protocol": "UDP", "nodePort": 30053}])
    _service(proxied.api, "plain", ports=[{"port": 80}])  # defaulted by the server
    _service(proxied.api, "lb", type="LoadBalancer", clusterIP="10.96.0.101",
             ports=[{"port": 443, "nodePort": 30443}])
    _service(proxied.api, "ext", type="ExternalName", externalName="example.com")
    status, table = proxied.get("/api/v1/namespaces/demo/services",
                                accept="application/json;as=Table;v=v1;g=meta.k8s.io")
    assert status == 200
    assert [c["name"] for c in table["columnDefinitions"]] == [
        "Name", "Type", "Cluster-IP", "External-IP", "Port(s)", "Age", "Selector"]
    assert table["columnDefinitions"][-1]["priority"] == 1
    rows = {r["cells"][0]: r["cells"][1:5] + r["cells"][6:] for r in table["rows"]}
    assert rows.pop("plain")[0:4:3] == ["ClusterIP", "80/TCP"]
    assert rows == {
        "web": ["NodePort", "10.96.0.100", "<none>", "80:30080/TCP,53:30053/UDP", "app=web"],
        "lb": ["LoadBalancer", "10.96.0.101", "<pending>", "443:30443/TCP", "app=web"],
        "ext": ["ExternalName", "<none>", "example.com", "<none>", "app=web"]}
    assert [c["name"] for c in table["columnDefinitions"]][1:3] == ["Type", "Cluster-IP"]
    # what the table shows of a Service as stored before the server's defaults
    bare = {"metadata": {"name": "bare"}, "spec": {"ports": [{"port": 80}]}}
    cells = to_table("Service", [bare], printer_columns()["Service"])["rows"][0]["cells"]
    assert cells[1:5] == ["ClusterIP", "<none>", "<none>", "80/TCP"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_resolves_singular_and_short_names(proxied: Proxied, tmp_path: Path) -> None:
    from pcn_lab.supervisor import write_kubeconfig

    _service(proxied.api, "web", clusterIP="10.96.0.10", type="ClusterIP",
             ports=[{"port": 80, "protocol": "TCP"}])
    cfg = tmp_path / "kubeconfig"
    write_kubeconfig(cfg, proxied.proxy.url, "demo")
    for what in ("endpointslice", "endpointslices", "ep", "endpoints", "svc", "service"):
        r = subprocess.run(["kubectl", "--kubeconfig", str(cfg), "--cache-dir",
                            str(tmp_path / "cache"), "get", what], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0 and "Warning" not in r.stderr, (what, r.stderr)
    r = subprocess.run(["kubectl", "--kubeconfig", str(cfg), "--cache-dir",
                        str(tmp_path / "cache"), "get", "svc"], capture_output=True, text=True,
                       timeout=60)
    assert r.stdout.split("\n")[0].split() == ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP",
                                               "PORT(S)", "AGE"]
    assert r.stdout.split("\n")[1].split()[:5] == ["web", "ClusterIP", "10.96.0.10", "<none>",
                                                   "80/TCP"]


# ----------------------------------------------------------------------------- selectors
def _pod(name: str, labels: dict[str, str], node: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "demo", "labels": labels},
            "spec": {"nodeName": node}}


def test_label_and_field_selectors() -> None:
    from pcn_lab.selection import SelectorError, field_selector, label_selector

    web = _pod("web-1", {"app": "web", "tier": "fe", "n": "3"}, "n1")
    db = _pod("db-1", {"app": "db"}, "n2")

    def picks(sel: str) -> list[str]:
        m = label_selector(sel)
        return [p["metadata"]["name"] for p in (web, db) if m(p)]

    assert picks("app=web") == picks("app==web") == ["web-1"]
    assert picks("app!=web") == ["db-1"]
    assert picks("tier!=fe") == ["db-1"]  # no label: not equal
    assert picks("app in (web, db)") == ["web-1", "db-1"]
    assert picks("app in (web,db),tier notin (be)") == ["web-1", "db-1"]
    assert picks("tier") == ["web-1"] and picks("!tier") == ["db-1"]
    assert picks("n>2") == ["web-1"] and picks("n<3") == []
    assert picks("") == ["web-1", "db-1"]
    for bad in ("app in (web", "a=b=c", "n>x", "!app in (a)"):
        with pytest.raises(SelectorError):
            label_selector(bad)
    assert field_selector("spec.nodeName=n1")(web) and not field_selector("spec.nodeName=n1")(db)
    assert field_selector("metadata.name!=web-1,metadata.namespace=demo")(db)
    assert field_selector("status.phase=")(web)  # a missing field is ""


def test_lists_and_watches_honour_selectors(proxied: Proxied) -> None:
    """`kubectl get pods -l app=web`, `--field-selector spec.nodeName=n1`;
    a watch with a selector hears of an object that stops matching as
    DELETED and of one that comes to match as ADDED."""
    from pcn_lab.apiserver import apply

    apply(proxied.api, _pod("web-1", {"app": "web"}, "n1"))
    apply(proxied.api, _pod("db-1", {"app": "db"}, "n1"))
    apply(proxied.api, _pod("web-2", {"app": "web"}, "n2"))

    def names(query: str) -> list[str]:
        status, body = proxied.get(f"/api/v1/namespaces/demo/pods?{query}")
        assert status == 200, body
        return sorted(i["metadata"]["name"] for i in body["items"])

    assert names("labelSelector=app%3Dweb") == ["web-1", "web-2"]
    assert names("fieldSelector=spec.nodeName%3Dn1") == ["db-1", "web-1"]
    assert names("labelSelector=app%3Dweb&fieldSelector=spec.nodeName%3Dn2") == ["web-2"]
    status, _ = proxied.get("/api/v1/namespaces/demo/pods?labelSelector=app+in+(web")
    assert status == 400
    conn, r = proxied.watch("/api/v1/namespaces/demo/pods?labelSelector=app%3Dweb")
    try:
        first = [json.loads(r.readline()) for _ in range(2)]
        assert sorted((e["type"], e["object"]["metadata"]["name"]) for e in first) == [
            ("ADDED", "web-1"), ("ADDED", "web-2")]
        path = "/api/v1/namespaces/demo/pods/"
        proxied.api.request("PATCH", path + "db-1", {"metadata": {"labels": {"app": "web"}}},
                            "application/merge-patch+json")
        proxied.api.request("PATCH", path + "web-1", {"metadata": {"labels": {"app": "x"}}},
                            "application/merge-patch+json")
        seen = [json.loads(r.readline()) for _ in range(2)]
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in seen] == [
            ("ADDED", "db-1"), ("DELETED", "web-1")]
    finally:
        r.close()
        conn.close()


def test_strategic_merge_patches_are_applied_not_stored(proxied: Proxied) -> None:
    """What kubectl apply sends for a Service whose ports changed: the
    directives take effect (kmock stored them as fields and replaced the
    list, losing the nodePort); on a custom resource the server refuses
    such a patch (415), and server-side apply is refused as not served."""
    _service(proxied.api, "web", type="NodePort",
             ports=[{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080,
                     "protocol": "TCP"}])
    patch = {"spec": {"$setElementOrder/ports": [{"port": 80}],
                      "ports": [{"port": 80, "targetPort": 9090}]}}

    def send(path: str, body: object, ctype: str) -> tuple[int, dict]:
        conn = http.client.HTTPConnection(proxied.host, proxied.port, timeout=10)
        try:
            conn.request("PATCH", path, json.dumps(body), {"Content-Type": ctype})
            r = conn.getresponse()
            return r.status, json.loads(r.read() or b"null")
        finally:
            conn.close()

    smp = "application/strategic-merge-patch+json"
    status, svc = send("/api/v1/namespaces/demo/services/web", patch, smp)
    assert status == 200, svc
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": 9090,
                                     "nodePort": 30080, "protocol": "TCP"}]
    assert not any(k.startswith("$") for k in svc["spec"])
    status, _ = send("/apis/pcn.dev/v1alpha1/namespaces/demo/networkfunctions/x", {}, smp)
    assert status == 415
    status, _ = send("/api/v1/namespaces/demo/services/web", {},
                     "application/apply-patch+yaml")
    assert status == 415
    status, _ = send("/api/v1/namespaces/demo/services/nope", patch, smp)
    assert status == 404


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_apply_twice(proxied: Proxied, tmp_path: Path) -> None:
    """The real kubectl apply against the lab: a re-apply with a changed
    port and a label removed."""
    from pcn_lab.supervisor import write_kubeconfig

    cfg = tmp_path / "kubeconfig"
    write_kubeconfig(cfg, proxied.proxy.url, "demo")
    svc = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "web", "namespace": "demo", "labels": {"a": "1", "b": "2"}},
           "spec": {"type": "NodePort", "selector": {"app": "web"},
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}
    kubectl = ["kubectl", "--kubeconfig", str(cfg), "--cache-dir", str(tmp_path / "cache")]
    for step in range(2):
        f = tmp_path / f"svc{step}.json"
        f.write_text(json.dumps(svc))
        r = subprocess.run([*kubectl, "apply", "-f", str(f)], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        if step == 0:  # the API server allocates a nodePort
            proxied.api.request("PATCH", "/api/v1/namespaces/demo/services/web", {
                "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080,
                                    "nodePort": 30080, "protocol": "TCP"}]}},
                "application/merge-patch+json")
            del svc["metadata"]["labels"]["b"]
            svc["spec"]["ports"][0]["targetPort"] = 9090
    _, live = proxied.get("/api/v1/namespaces/demo/services/web")
    assert live["metadata"]["labels"] == {"a": "1"}
    assert live["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": 9090,
                                      "nodePort": 30080, "protocol": "TCP"}]
    assert not any(k.startswith("$") for k in live["spec"])
