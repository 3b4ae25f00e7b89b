"""pcn-lab as a person uses it: up, apply, kubectl, kubectl pcn, check, exec,
down; and that nothing is left behind, also when `up` is interrupted or the
lab crashed."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pyroute2 import netns as pr_netns

from pcn_agent.dataplane import bpffs
from pcn_lab import cli as lab

pytestmark = pytest.mark.netns
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BIN = Path(sys.executable).parent


def run(d: Path, *args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pcn_lab.cli", "--dir", str(d), *args],
                          capture_output=True, text=True, timeout=timeout)


def kube_env(d: Path) -> dict[str, str]:
    return {**os.environ, "KUBECONFIG": str(d / "kubeconfig"),
            "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}


def leftovers(prefix: str, d: Path) -> list[str]:
    left = [ns for ns in pr_netns.listnetns() if ns.startswith(prefix)]
    left += [str(p) for p in bpffs.DEFAULT_ROOT.glob(f"{prefix}-*")]
    if d.exists():
        left.append(str(d))
    return left


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, lab.LabState]]:
    d = tmp_path_factory.mktemp("lab") / "run"
    r = run(d, "up", "--nodes", "2", "--pods-per-node", "1", "-f", str(EXAMPLES))
    state = lab.LabState.load(d)
    try:
        assert r.returncode == 0, r.stderr + r.stdout
        assert state is not None and state.ready
        assert f"KUBECONFIG={d / 'kubeconfig'}" in r.stdout  # it says how to use it
        yield d, state
    finally:
        prefix = state.prefix if state else ""
        daemons = _daemons_in(prefix) if prefix else []
        down = run(d, "down")
        assert down.returncode == 0, down.stderr
        assert prefix and leftovers(prefix, d) == []
        # what people start in a pod or on a node goes with the lab (`pcn-lab
        # exec POD -- iperf3 -D` outlived `down` in the trial of issue 12)
        assert [pid for pid in daemons if lab.alive(pid)] == [], down.stdout


def _daemons_in(prefix: str) -> list[int]:
    """A daemon (a detached sleep, as `iperf3 -D` detaches) in one pod's and
    one node's namespace of the lab; their pids."""
    names = [ns for ns in pr_netns.listnetns() if ns.startswith(prefix)]
    pod = next(ns for ns in names if ns.startswith(f"{prefix}-p-"))
    node = next(ns for ns in names if ns.endswith("-n1"))
    pids = []
    for ns in (pod, node):
        r = subprocess.run(["ip", "netns", "exec", ns, "sh", "-c",
                            "sleep 600 </dev/null >/dev/null 2>&1 & echo $!"],
                           capture_output=True, text=True, timeout=30, check=True)
        pids.append(int(r.stdout))
    assert all(lab.alive(p) for p in pids)
    return pids


def _wait(what: str, fn, timeout: float = 60):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


def test_check_matrix_passes(running) -> None:
    d, _ = running

    rows = ("same node", "from its node", "other node", "ClusterIP", "NodePort", "egress SNAT")

    def ok():
        # `up -f` returns once applied, like kubectl apply: the example's pods and
        # Services may still be starting, so wait for a full matrix.
        r = run(d, "check", timeout=300)
        return r if r.returncode == 0 and all(row in r.stdout for row in rows) else None

    r = _wait("a full, passing matrix", ok, timeout=180)
    assert "✗" not in r.stdout


def test_status_and_exec(running) -> None:
    d, state = running
    st = run(d, "status")
    assert st.returncode == 0 and "running" in st.stdout and "pod-1-1" in st.stdout
    ex = run(d, "exec", "pod-1-1", "--", "ip", "-4", "-o", "addr", "show", "eth0")
    assert ex.returncode == 0 and "10.244.1." in ex.stdout
    bad = run(d, "exec", "nope", "--", "true")
    assert bad.returncode != 0 and "no running pod" in bad.stderr


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_get_shows_readiness_columns(running) -> None:
    d, _ = running

    def ready():
        r = subprocess.run(["kubectl", "get", "cubechains", "-A"], env=kube_env(d),
                           capture_output=True, text=True, timeout=30)
        return r.stdout if r.returncode == 0 and re.search(r"protect-web\s+True\s+2", r.stdout) \
            else None

    out = _wait("the chain Ready on both web pods", ready)
    assert out.split("\n")[0].split()[:5] == ["NAMESPACE", "NAME", "READY", "PODS", "NODES"]
    pods = subprocess.run(["kubectl", "get", "pods", "-n", "demo", "-o", "wide"],
                          env=kube_env(d), capture_output=True, text=True, timeout=30)
    assert pods.returncode == 0 and "Running" in pods.stdout and "10.244." in pods.stdout


def test_kubectl_pcn_chain_counters_rise_with_traffic(running) -> None:
    d, _ = running
    cmd = [str(BIN / "kubectl-pcn"), "chain", "web-1", "-n", "demo", "-o", "json"]

    def counters():
        r = subprocess.run(cmd, env=kube_env(d), capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            return None
        doc = json.loads(r.stdout)
        text = json.dumps(doc)
        return doc if "no-ssh" in text and doc else None

    first = _wait("the firewall in web-1's chain", counters)
    web1 = run(d, "exec", "client", "--", "ping", "-c", "5", "-i", "0.2", "-q",
               _pod_ip(d, "web-1"))
    assert web1.returncode == 0, web1.stdout + web1.stderr

    def risen():
        now = counters()
        return now if now and _hits(now) > _hits(first) else None

    _wait("the firewall's counters to rise", risen, timeout=30)


def test_kubectl_pcn_stats_without_n_shows_the_demo_pods(running) -> None:
    """The lab's kubeconfig points at the namespace of what `up -f` applied."""
    d, _ = running
    cfg = yaml.safe_load((d / "kubeconfig").read_text())
    assert cfg["contexts"][0]["context"]["namespace"] == "demo"

    def listed():
        r = subprocess.run([str(BIN / "kubectl-pcn"), "stats"], env=kube_env(d),
                           capture_output=True, text=True, timeout=60)
        return r.stdout if r.returncode == 0 and "web-1" in r.stdout else None

    _wait("web-1 in `kubectl pcn stats`", listed)


def _pod_ip(d: Path, name: str) -> str:
    r = subprocess.run([str(BIN / "kubectl-pcn"), "chain", name, "-n", "demo", "-o", "json"],
                       env=kube_env(d), capture_output=True, text=True, timeout=60)
    ip = re.search(r'"ip":\s*"(10\.244\.\d+\.\d+)', r.stdout)
    assert ip, r.stdout
    return ip.group(1)


def _hits(doc) -> int:
    """Sum of every hit/default-hit/packet counter in the chain view."""
    total = 0

    def walk(x):
        nonlocal total
        if isinstance(x, dict):
            for k, v in x.items():
                if isinstance(v, int) and not isinstance(v, bool) and (
                        "hits" in k.lower() or k.lower() in ("rx_packets", "tx_packets")):
                    total += v
                else:
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(doc)
    return total


def test_a_dead_agent_is_restarted(running) -> None:
    """As a DaemonSet's kubelet would: the lab starts a node's agent again
    when it dies, and the node serves on."""
    d, _ = running
    state = lab.LabState.load(d)
    assert state is not None
    node, pid = sorted(state.agents.items())[0]
    os.kill(pid, signal.SIGKILL)

    def restarted():
        now = lab.LabState.load(d)
        new = now.agents.get(node) if now else None
        return now if new and new != pid and lab.alive(new) else None

    now = _wait("the agent to be started again", restarted, timeout=60)
    assert now.restarts.get(node) == 1
    st = run(d, "status")
    assert f"agent {node}: running (pid {now.agents[node]}, 1 restart(s))" in st.stdout
    r = _wait("a passing matrix after the restart",
              lambda: (c := run(d, "check", timeout=300)).returncode == 0 and c, timeout=180)
    assert "✗" not in r.stdout


def _host_port_pod(name: str, node: str, host_ip: str | None) -> dict:
    port = {"containerPort": 8080, "hostPort": 54323, "protocol": "TCP"}
    if host_ip:
        port["hostIP"] = host_ip
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
            "spec": {"nodeName": node, "containers": [{"name": "app", "image": "probe",
                                                       "ports": [port]}]}}


def test_the_kubelet_stand_in_passes_host_ports_to_cni(running, tmp_path: Path) -> None:
    """A pod's hostPort reaches pcn as kubelet and containerd hand it over
    (runtimeConfig.portMappings, the conflist's capability): served from the
    external host, client address kept; a second pod with the same hostPort
    and protocol on an overlapping address does not start, its ADD refused
    naming the first; it starts once the first is deleted."""
    d, state = running
    node, node_ip = f"{state.prefix}-n1", "192.168.250.1"
    first, second = tmp_path / "hp-a.yaml", tmp_path / "hp-b.yaml"
    first.write_text(yaml.safe_dump(_host_port_pod("hp-a", node, node_ip)))
    second.write_text(yaml.safe_dump(_host_port_pod("hp-b", node, None)))
    assert run(d, "apply", "-f", str(first)).returncode == 0

    def probe() -> dict | None:
        r = subprocess.run(["ip", "netns", "exec", f"{state.prefix}-ext", sys.executable, "-m",
                            "pcn_lab.probe", "tcp", node_ip, "54323", "--timeout", "2"],
                           capture_output=True, text=True, timeout=30)
        out = json.loads(r.stdout.strip().splitlines()[-1]) if r.stdout.strip() else {}
        return out if out.get("ok") else None

    seen = _wait("hostPort 54323 served by hp-a", probe)
    assert (seen["host"], seen["peer_seen"]) == ("hp-a", "192.168.250.100")
    # only then the second: applied together, either could be wired first
    assert run(d, "apply", "-f", str(second)).returncode == 0
    log = d / "supervisor.log"
    _wait("hp-b's ADD refused", lambda: "hp-b" in log.read_text() and
          "already taken by pod default/hp-a" in log.read_text())
    assert re.search(r"pod hp-b: \S+ -$", run(d, "status").stdout, re.M)  # no address
    kubeconfig = yaml.safe_load((d / "kubeconfig").read_text())
    api = kubeconfig["clusters"][0]["cluster"]["server"]
    for name in ("hp-a", "hp-b"):
        subprocess.run(["curl", "-sS", "-X", "DELETE", f"{api}/api/v1/namespaces/default/pods/"
                        f"{name}"], capture_output=True, timeout=30, check=True)
        if name == "hp-a":
            _wait("hp-b served once hp-a is gone",
                  lambda: (p := probe()) is not None and p["host"] == "hp-b" and p)


def test_interrupted_up_leaves_nothing(tmp_path: Path) -> None:
    d = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "pcn_lab.cli", "--dir", str(d), "up",
                          "--nodes", "1", "--pods-per-node", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Interrupt as soon as `up` says what it waits for: it is then in its
        # wait loop, the supervisor building. (Polling for the lab's namespaces
        # raced with a build that, pods attached in milliseconds, could be done
        # before the poll saw them.)
        lines: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(target=lambda: [lines.put(x) for x in p.stderr or []],
                                  daemon=True)
        reader.start()
        said = []
        deadline = time.monotonic() + 60
        # its loop's first word: agents not up yet, or (API already up) pods next
        while not said or not any(w in said[-1] for w in ("waiting for the agents",
                                                          "starting pods")):
            said.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
        state = lab.LabState.load(d)
        assert state is not None and state.prefix, said
        p.send_signal(signal.SIGINT)
        p.wait(timeout=120)
        reader.join(timeout=10)  # what `up` said last, up to its end
        while not lines.empty():
            said.append(lines.get_nowait())
        err = "".join(said)
        assert p.returncode == 130, err
        assert "interrupted" in err
        _wait("everything to be gone", lambda: leftovers(state.prefix, d) == [] or None,
              timeout=60)
        # `down` after that is harmless
        assert run(d, "down").returncode == 0
    finally:  # a failed check must not leave the lab up (its supervisor, agents, pins)
        if p.poll() is None:
            p.kill()
        run(d, "down")


def test_down_after_a_crash_cleans_up(tmp_path: Path) -> None:
    d = tmp_path / "run"
    r = run(d, "up", "--nodes", "1", "--pods-per-node", "1")
    state = lab.LabState.load(d)
    assert r.returncode == 0 and state is not None, r.stderr
    for pid in [state.supervisor_pid, *state.agents.values()]:
        os.kill(pid, signal.SIGKILL)  # as a crash would
    time.sleep(0.5)
    assert run(d, "status").returncode != 0
    down = run(d, "down")
    assert down.returncode == 0, down.stderr
    assert leftovers(state.prefix, d) == []
