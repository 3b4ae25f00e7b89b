"""pcn-lab's commands, without a lab: what `check` tries, `status` into a
pipe, `apply` as kubectl applies."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pcn_lab import checks
from pcn_lab import cli as lab
from pcn_lab.manifests import workload_namespace
from pcn_lab.supervisor import load_documents

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

P = lab._LabView.P
NODES = [{"metadata": {"name": f"pcnt-abc-n{i}"},
          "status": {"addresses": [{"type": "InternalIP", "address": f"192.168.250.{i}"}]}}
         for i in (1, 2)]


def _svc(name: str, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "demo"},
            "spec": {"selector": {"app": "web"}, "ports": [
                {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}], **spec}}


def _slice(svc: str, ip: str, node: str) -> dict[str, Any]:
    return {"metadata": {"name": f"{svc}-x", "namespace": "demo",
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": node}]}


class FakeApi:
    def __init__(self, objects: dict[str, list[dict[str, Any]]]) -> None:
        self.objects = objects

    def request(self, method: str, path: str, *a: Any) -> dict[str, Any]:
        assert method == "GET"
        return {"items": self.objects.get(path, [])}


class FakeView:
    """Two pods, one per node, and the external host."""

    def __init__(self, state: Any) -> None:
        self.pods = {"client": P("ns-client", "10.244.1.10", "pcnt-abc-n1"),
                     "web-2": P("ns-web2", "10.244.2.10", "pcnt-abc-n2")}
        self.ext_ns = "ns-ext"


def test_check_tries_what_pcn_programs(monkeypatch: pytest.MonkeyPatch) -> None:
    """No tries of a headless Service's "None" or of an ExternalName; the
    IPv4 address of a dual-stack Service whose primary family is IPv6, none
    for an IPv6-only one; a Local NodePort on the node that has the
    endpoint (node 2 here), a Cluster NodePort on node 1."""
    services = [
        _svc("headless", clusterIP="None", clusterIPs=["None"]),
        _svc("ext", type="ExternalName", externalName="example.com"),
        _svc("v6", clusterIP="fd00:10:96::a", clusterIPs=["fd00:10:96::a"]),
        _svc("dual", clusterIP="fd00:10:96::b", clusterIPs=["fd00:10:96::b", "10.96.0.20"]),
        _svc("local", clusterIP="10.96.0.21", type="NodePort", externalTrafficPolicy="Local",
             ports=[{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080,
                     "protocol": "TCP"}]),
        _svc("cluster", clusterIP="10.96.0.22", type="NodePort", externalTrafficPolicy="Cluster",
             ports=[{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30081,
                     "protocol": "TCP"}]),
    ]
    slices = [_slice(s["metadata"]["name"], "10.244.2.10", "pcnt-abc-n2") for s in services]
    api = FakeApi({"/api/v1/services": services, "/api/v1/nodes": NODES,
                   "/apis/discovery.k8s.io/v1/endpointslices": slices})
    tried: list[tuple[str, str, str, int]] = []

    def record(proto: str):  # type: ignore[no-untyped-def]
        def check(view: Any, src: str, ip: str, target: str | None = None, port: int = 8080,
                  **kw: Any) -> checks.CheckResult:
            tried.append((proto, src, ip, port))
            return checks.CheckResult(src, target or ip, proto, True)
        return check

    monkeypatch.setattr(lab, "_LabView", FakeView)
    monkeypatch.setattr(lab, "_client", lambda state: api)
    monkeypatch.setattr(checks, "tcp", record("tcp"))
    monkeypatch.setattr(checks, "udp", record("udp"))
    monkeypatch.setattr(checks, "ping", record("icmp"))
    monkeypatch.setattr(checks, "servers", lambda *a, **kw: _null())
    state = lab.LabState(Path("/nonexistent"), prefix="pcnt-abc")
    lab.connectivity(state)
    services_tried = {(ip, port) for _, _, ip, port in tried if port in (80, 30080, 30081)}
    assert services_tried == {("10.96.0.20", 80), ("10.96.0.21", 80), ("10.96.0.22", 80),
                              ("192.168.250.2", 30080), ("192.168.250.1", 30081)}


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_status_into_a_closed_pipe_says_nothing(tmp_path: Path) -> None:
    """`pcn-lab status | head -1`: when the reader has gone, the command
    stops quietly, as a Unix tool does (no traceback)."""
    state = lab.LabState(tmp_path, run_id="abc", nodes=2, supervisor_pid=os.getpid(),
                         api_url="http://127.0.0.1:9", ready=True, prefix="pcnt-abc",
                         agents={"pcnt-abc-n1": os.getpid(), "pcnt-abc-n2": os.getpid()})
    state.save()
    read, write = os.pipe()
    os.close(read)  # `head` has read its line and left
    try:
        r = subprocess.run([sys.executable, "-m", "pcn_lab.cli", "--dir", str(tmp_path),
                            "status"], stdout=write, stderr=subprocess.PIPE, text=True,
                           timeout=60)
    finally:
        os.close(write)
    assert r.stderr == ""
    assert r.returncode != 0


def test_the_kubeconfig_namespace_is_the_workloads() -> None:
    """`pcn-lab up -f examples/` puts everything in demo: the kubeconfig's
    context points there (so `kubectl pcn stats` without -n shows it)."""
    docs = load_documents(EXAMPLES)
    assert workload_namespace(docs) == "demo"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}}
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n"}}
    assert workload_namespace([*docs, pod]) is None  # demo and default
    assert workload_namespace([pod, node]) == "default"
    assert workload_namespace([node]) is None


def test_the_real_cluster_applies_what_the_emulated_lab_applies(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`pcn-lab up --kubernetes -f examples/` skipped examples/cubetypes/ (a
    folder without a kustomization), which the emulated lab applies (trial
    of issue 12): both follow pcn_lab.manifests now, and the CubeType (no
    namespace) does not keep the kubeconfig's namespace from being demo."""
    from types import SimpleNamespace

    from pcn_lab.cluster import bringup, kubeconfig, kubectl, runner
    from pcn_lab.manifests import manifest_files, manifest_targets

    targets = manifest_targets(EXAMPLES)
    assert targets == [("-f", EXAMPLES / "app.yaml"), ("-k", EXAMPLES / "argocd"),
                       ("-f", EXAMPLES / "cubetypes" / "dscp-marker.yaml")]
    assert manifest_files(EXAMPLES) == [
        EXAMPLES / "app.yaml", *[EXAMPLES / "argocd" / f for f in (
            "application.yaml", "no-ssh.yaml", "protect-web.yaml")],
        EXAMPLES / "cubetypes" / "dscp-marker.yaml"]
    assert "CubeType" in {d["kind"] for d in load_documents(EXAMPLES)}

    applied: list[tuple[str, ...]] = []
    monkeypatch.setattr(kubectl, "run", lambda kcfg, *args, **kw: applied.append(args) or
                        subprocess.CompletedProcess(args, 0, "", ""))
    monkeypatch.setattr(runner, "wait_for", lambda *a, **kw: None)
    monkeypatch.setattr(kubeconfig, "for_cert", lambda *a, **kw: {})
    monkeypatch.setattr(kubeconfig, "write", lambda *a, **kw: None)
    b = bringup.Bringup.__new__(bringup.Bringup)
    b.step = lambda name, msg: None  # type: ignore[method-assign]
    monkeypatch.setattr(bringup.Bringup, "kcfg", tmp_path / "kubeconfig")
    b.layout = None  # type: ignore[assignment]
    b.state = SimpleNamespace(namespace=None, relay_port=1,  # type: ignore[assignment]
                              save=lambda: None)
    b.apply_user(EXAMPLES)
    assert applied == [("apply", flag, str(p)) for flag, p in targets]
    assert b.state.namespace == "demo"


@pytest.mark.netns
def test_a_daemon_outlives_its_namespaces_name_but_not_the_lab() -> None:
    """A process keeps its network namespace alive after the name is removed
    (what the lab's supervisor does to pods and nodes when it stops), so
    `ip netns pids NAME` finds nothing then: down takes the namespaces'
    inodes first and kills by those (kubelet.kill_netns_processes)."""
    import secrets

    from pyroute2 import netns as pr_netns

    from pcn_lab import kubelet

    name = f"pcnt-{secrets.token_hex(4)}-p-daemon"
    pr_netns.create(name)
    pid = 0
    try:
        r = subprocess.run(["ip", "netns", "exec", name, "sh", "-c",
                            "sleep 600 </dev/null >/dev/null 2>&1 & echo $!"],
                           capture_output=True, text=True, timeout=30, check=True)
        pid = int(r.stdout)
        inodes = kubelet.netns_inodes([name, "no-such-namespace"])
        assert len(inodes) == 1
        pr_netns.remove(name)
        assert lab.alive(pid)  # the namespace lives on, nameless
        assert kubelet.kill_netns_processes(inodes) == [pid]
        deadline = time.monotonic() + 10
        while lab.alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not lab.alive(pid)
    finally:
        if name in pr_netns.listnetns():
            pr_netns.remove(name)
        if pid and lab.alive(pid):
            os.kill(pid, 9)
