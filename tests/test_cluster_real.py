"""A real cluster on this machine (`pcn-lab up --kubernetes -f examples/`):
upstream etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
containerd and kubelets built by `make k8s`, pcn installed with `kubectl
apply -k manifests/`, CoreDNS. Checks every node Ready, pcn-agent Running
on every node, CoreDNS Ready, pod to pod and pod to Service through pcn,
and that `pcn-lab down` leaves nothing (processes, mounts, namespaces,
cgroups, links, files).

Skipped (naming `make k8s`) when the built binaries or images are absent,
as on CI, so `make test` never brings a cluster up there; with the cache
it takes a few minutes (marked k8s: `-m "not k8s"` leaves it out)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pcn_lab.cluster import artifacts, bringup, cleanup, connectivity, kubectl
from pcn_lab.cluster.state import ClusterState

pytestmark = [pytest.mark.k8s, pytest.mark.netns]
ROOT = Path(__file__).resolve().parents[1]


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def _pcn_lab(d: Path, *args: str, timeout: float = 1500) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pcn_lab", "--dir", str(d), *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterState]:
    missing = bringup.missing_binaries("all")
    if missing:
        pytest.skip(f"{artifacts.bin_dir()} lacks {', '.join(missing)}: run `make k8s`")
    if not (artifacts.image_dir() / "images.json").is_file():
        pytest.skip(f"{artifacts.image_dir()}/images.json is missing: run `make k8s`")
    d = tmp_path_factory.mktemp("cluster")
    links = _root_links()
    # --agent-source: the agent runs this checkout's code, the code under test
    # (the image's environment, the checkout's Python)
    up = _pcn_lab(d, "up", "--kubernetes", "--agent-source", str(ROOT),
                  "-f", str(ROOT / "examples"))
    state = ClusterState.load(d)
    try:
        assert up.returncode == 0, f"up failed:\n{up.stderr[-4000:]}"
        assert state is not None
        yield state
    finally:
        down = _pcn_lab(d, "down", timeout=300)
        if state is not None:
            assert cleanup.leftovers(state.layout) == [], down.stdout + down.stderr
        assert _root_links() == links, "down left links in the root namespace"
        assert down.returncode == 0, down.stdout + down.stderr


def test_nodes_ready_and_agents_running(cluster: ClusterState) -> None:
    nodes = kubectl.get(cluster.kubeconfig, "nodes")["items"]
    assert sorted(n["metadata"]["name"] for n in nodes) == cluster.layout.nodes
    for n in nodes:
        ready = {c["type"]: c["status"] for c in n["status"]["conditions"]}["Ready"]
        assert ready == "True", n["metadata"]["name"]
        assert n["spec"].get("podCIDR", "").startswith("10.244.")
    agents = kubectl.get(cluster.kubeconfig, "pods", "-n", "pcn-system")["items"]
    running = {p["spec"]["nodeName"] for p in agents if p["status"].get("phase") == "Running"}
    assert running == set(cluster.layout.nodes)


def test_coredns_ready(cluster: ClusterState) -> None:
    dep = kubectl.get(cluster.kubeconfig, "-n", "kube-system", "deployment", "coredns")
    assert dep["status"].get("readyReplicas") == dep["spec"]["replicas"]


def test_pod_to_pod_and_service(cluster: ClusterState) -> None:
    results, notes = connectivity.matrix(cluster)
    table = "\n".join(f"{r.source} -> {r.target} {r.protocol}: "
                      f"{'ok' if r.passed else 'FAILED'} {r.detail}" for r in results)
    by = {(r.target.split(" ")[0], r.protocol): r for r in results}
    assert by[("web-1", "http")].passed and by[("web-2", "http")].passed, table
    assert any(r.passed for r in results if "ClusterIP" in r.target), table
    failed = [r for r in results if not r.passed]
    assert not failed, table


def test_status_and_exec(cluster: ClusterState) -> None:
    d = cluster.dir
    st = _pcn_lab(d, "status", timeout=60)
    assert st.returncode == 0 and "pcn-agent" in st.stdout, st.stdout + st.stderr
    ex = _pcn_lab(d, "exec", "client", "--", "cat", "/etc/resolv.conf", timeout=60)
    assert ex.returncode == 0 and "10.96.0.10" in ex.stdout, ex.stderr


def _kubectl_pcn(cluster: ClusterState, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "kubectl-pcn"), *args],
                          env={"KUBECONFIG": str(cluster.kubeconfig),
                               "PATH": "/usr/local/bin:/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)


def test_the_example_chain_is_ready_and_kubectl_pcn_works(cluster: ClusterState) -> None:
    """What a user does next on the real API server: the example CubeChain
    Ready on every node, then kubectl pcn add-cube (a firewall placed in
    the demo namespace's chain), chain (it shows), remove-cube (gone)."""
    import json
    import time

    def chain_ready() -> bool:
        cc = kubectl.get(cluster.kubeconfig, "cubechains", "-n", "demo")["items"]
        conds = [c for o in cc for c in (o.get("status") or {}).get("conditions") or []]
        return bool(conds) and all(c["status"] == "True" for c in conds)

    deadline = time.monotonic() + 60
    while not chain_ready() and time.monotonic() < deadline:
        time.sleep(1)
    assert chain_ready(), kubectl.get(cluster.kubeconfig, "cubechains", "-n", "demo")
    add = _kubectl_pcn(cluster, "add-cube", "firewall", "real-fw", "-n", "demo",
                       "--selector", "app=web", "--rule", "drop tcp dport 2222")
    assert add.returncode == 0, add.stdout + add.stderr
    try:
        seen = ""
        for _ in range(60):
            ch = _kubectl_pcn(cluster, "chain", "web-1", "-n", "demo", "-o", "json")
            seen = ch.stdout + ch.stderr
            if ch.returncode == 0 and "real-fw" in json.dumps(
                    json.loads(ch.stdout).get("realized") or {}):
                break
            time.sleep(1)
        assert "real-fw" in seen, seen
    finally:
        rm = _kubectl_pcn(cluster, "remove-cube", "real-fw", "-n", "demo")
    assert rm.returncode == 0, rm.stdout + rm.stderr
    nfs = kubectl.get(cluster.kubeconfig, "networkfunctions", "-n", "demo")["items"]
    assert "real-fw" not in [n["metadata"]["name"] for n in nfs]


def test_capture_and_flows_through_kubectl_exec(cluster: ClusterState, tmp_path: Path) -> None:
    """kubectl pcn capture and flows on the real cluster: through `kubectl
    exec -i` into web-1's node's pcn-agent pod. A TCP connection from the
    client to web-1:8080 shows its SYN (to the pod) and SYN-ACK (from it) in
    the pcap, and in the flow monitor put on web-1's chain."""
    import json
    import os
    import shutil
    import time

    env = {"KUBECONFIG": str(cluster.kubeconfig), "HOME": str(tmp_path),  # kubectl's cache
           "PATH": f"{artifacts.bin_dir()}:/usr/local/bin:/usr/bin:/bin"}
    kpcn = str(Path(sys.executable).parent / "kubectl-pcn")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([kpcn, *args], env=env, capture_output=True, text=True,
                              timeout=120)

    web = kubectl.get(cluster.kubeconfig, "pods", "-n", "demo", "web-1")
    ip = web["status"]["podIP"]
    for hook in ("ingress", "egress"):
        add = run("add-cube", "flowmonitor", "real-mon", "-n", "demo", "--selector", "app=web",
                  "--hook", hook)
        assert add.returncode == 0, add.stdout + add.stderr
    try:
        deadline = time.monotonic() + 90
        flows = run("flows", "web-1", "-n", "demo", "-o", "json")
        while time.monotonic() < deadline and (
                flows.returncode != 0 or not json.loads(flows.stdout)["monitors"]):
            time.sleep(2)
            flows = run("flows", "web-1", "-n", "demo", "-o", "json")
        assert flows.returncode == 0 and json.loads(flows.stdout)["monitors"], \
            flows.stdout + flows.stderr
        pcap = tmp_path / "web.pcap"
        cap = subprocess.Popen([kpcn, "capture", "web-1", "-n", "demo", "-f", "tcp port 8080",
                                "-c", "2", "--duration", "60", "-w", str(pcap)], env=env,
                               stderr=subprocess.PIPE, text=True)
        try:
            assert cap.stderr is not None
            line = cap.stderr.readline()
            assert line.startswith("capturing demo/web-1"), line + cap.stderr.read()
            con = _pcn_lab(cluster.dir, "exec", "client", "--", "/agnhost", "connect",
                           f"{ip}:8080", "--timeout", "5s", timeout=60)
            assert con.returncode == 0, con.stdout + con.stderr
            _, err = cap.communicate(timeout=60)
        finally:
            if cap.poll() is None:
                cap.kill()
                cap.wait()
        assert cap.returncode == 0, err
        assert "2 packets captured (1 from the pod, 1 to it); stopped: 2 packets captured (-c 2)" in err, err
        tcpdump = shutil.which("tcpdump")
        if tcpdump is not None:
            out = subprocess.run([tcpdump, "-r", str(pcap), "-nn"], capture_output=True,
                                 text=True, timeout=30, check=True).stdout
            assert f"> {ip}.8080: Flags [S]," in out and f"IP {ip}.8080 > " in out, out
        flows = run("flows", "web-1", "-n", "demo", "-o", "json", "--top", "0")
        data = json.loads(flows.stdout)
        to_pod = [f for f in data["flows"] if f["dst"] == ip and f["dport"] == 8080
                  and f["direction"] == "to-pod"]
        assert to_pod and "SYN" in to_pod[0]["tcpFlags"], data
    finally:
        rm = run("remove-cube", "real-mon", "-n", "demo")
        assert rm.returncode == 0, rm.stdout + rm.stderr
    assert os.path.getsize(pcap) > 24
