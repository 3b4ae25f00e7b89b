"""Issue 12's acceptance, end to end through the real agent (kopf, against the
emulated API server) and `kubectl pcn` as a user types it: on one server pod,
at once, a firewall of 10 000 rules, a 50 Mbit/s policer, a flow monitor and a
packet capture. iperf3 from a client pod must see the policed rate, `tcpdump
-r` must read the capture, `kubectl pcn flows` must list the iperf3 flow with
its bytes within 1 % of what iperf3 says the server received, and removing
each cube again must not lose a packet of an unrelated flow (a UDP stream
from a third pod to the server through the same chain).

Bytes: the flow monitor counts L3 bytes; iperf3 counts payload. The monitor
is placed nearest the pod, after the policer, so it sees what reaches the
pod; the payload of its flow is its L3 bytes less one IPv4 and one TCP
header (with timestamps: 52 bytes) per packet, as tests/test_e2e_observe.py
explains.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_agent import Cluster, wait_for
from test_e2e_observe import accounting

from pcn_agent.control import agent as agent_mod
from pcn_lab.apiserver import apply

pytestmark = pytest.mark.netns

KPCN = str(Path(sys.executable).parent / "kubectl-pcn")
RATE = 50_000_000  # bit/s
DURATION_S, OMIT_S = 5, 2
IPERF_PORT, UDP_PORT = 5201, 9999
RULES = 10_000
STREAM = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
n, end = 0, time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    s.sendto(n.to_bytes(4, "big") + b"x" * 96, (sys.argv[1], int(sys.argv[2])))
    n += 1
    time.sleep(0.005)
print(n, flush=True)
"""
SINK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(float(sys.argv[2]))
print("ready", flush=True)
seen = set()
try:
    while True:
        seen.add(int.from_bytes(s.recv(2048)[:4], "big"))
except TimeoutError:
    pass
print(len(seen), max(seen) + 1 if seen else 0, flush=True)
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if shutil.which("iperf3") is None or shutil.which("tcpdump") is None:
        pytest.skip("iperf3 and tcpdump are needed (make setup installs them)")
    from kopf.testing import KopfRunner

    c = Cluster(tmp_path_factory.mktemp("catalogue"))
    mp = pytest.MonkeyPatch()
    try:
        for k, v in c.env().items():
            mp.setenv(k, v)
        agent_mod.AGENT = None
        apply(c.api, c.node_object())
        with KopfRunner(["run", "--standalone", "--all-namespaces", "-m",
                         "pcn_agent.control.agent"], timeout=120):
            wait_for("the agent", lambda: agent_mod.AGENT is not None
                     and agent_mod.AGENT.node is not None, 60)
            apply(c.api, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "web"}})
            c.add_pod("server", {"app": "server"})
            c.add_pod("client", {"app": "client"})
            c.add_pod("other", {"app": "other"})
            # kubectl pcn finds the lab's agent by <kubeconfig dir>/<node>.sock
            (c.tmp / f"{c.node}.sock").symlink_to(c.socket)
            (c.tmp / "kubeconfig").write_text(json.dumps({
                "apiVersion": "v1", "kind": "Config", "current-context": "lab",
                "clusters": [{"name": "lab", "cluster": {"server": c.api.url}}],
                "users": [{"name": "me", "user": {}}],
                "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "me",
                                                          "namespace": "web"}}]}))
            wait_for("the pods wired", lambda: len(agent_mod.AGENT.node.pods) == 3, 60)
            yield c
    finally:
        c.close()
        mp.undo()
    assert c.lab.leftovers() == [], f"teardown left {c.lab.leftovers()}"


def _say(text: str) -> None:
    """Measurements, on the real stderr (kopf's runner holds sys.stdout)."""
    print(text, file=sys.__stderr__, flush=True)


def kpcn(c: Cluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([KPCN, "--kubeconfig", str(c.tmp / "kubeconfig"), *args],
                       capture_output=True, text=True, timeout=timeout, check=False)
    assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-2000:])
    return r


def ip(c: Cluster, pod: str) -> str:
    return str(c.pods[pod].ip).split("/")[0]


def stack(c: Cluster) -> list[str]:
    """The cube types on the server's to-pod side, outermost first."""
    node = agent_mod.AGENT.node
    pod = next(p for p in node.pods.values() if p.k8s_name == "server")
    return [node.rt.cubes[name].type for name in pod.egress]


class UdpStream:
    """A UDP stream from `other` to the server, 200 packets a second, whose
    losses are counted by sequence number."""

    def __init__(self, c: Cluster, seconds: float) -> None:
        self.sink = c.lab.popen(c.pods["server"].netns,
                                [sys.executable, "-c", SINK, str(UDP_PORT), "3"],
                                stdout=subprocess.PIPE, text=True)
        assert self.sink.stdout is not None and self.sink.stdout.readline().strip() == "ready"
        self.source = c.lab.popen(c.pods["other"].netns,
                                  [sys.executable, "-c", STREAM, ip(c, "server"),
                                   str(UDP_PORT), str(seconds)],
                                  stdout=subprocess.PIPE, text=True)

    def lost(self) -> tuple[int, int]:
        """(sent, lost) once the stream is over."""
        out, _ = self.source.communicate(timeout=120)
        sent = int(out.strip())
        got, _ = self.sink.communicate(timeout=30)
        seen, _ = map(int, got.split())
        return sent, sent - seen


def test_four_cubes_at_once_then_removed_one_by_one(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    # a firewall of 10 000 rules: 9 999 that drop other sources, then the allow
    rules = [{"action": "drop", "protocol": "tcp", "source": f"10.{200 + i // 65536 % 50}."
              f"{i // 256 % 256}.{i % 256}/32", "destinationPorts": str(1000 + i % 60000)}
             for i in range(RULES - 1)] + [{"action": "allow"}]
    cfg = tmp_path / "fw.yaml"
    cfg.write_text(yaml.safe_dump({"rules": rules, "defaultAction": "drop"}))
    sel = ["--selector", "app=server", "--hook", "ingress"]
    kpcn(c, "add-cube", "firewall", "big-fw", *sel, "--config", str(cfg), timeout=300)
    kpcn(c, "add-cube", "policer", "slow", *sel, "--rate", "50M")
    kpcn(c, "add-cube", "flowmonitor", "talkers", *sel)
    wait_for("the three cubes on the server", lambda: {"firewall", "policer", "flowmonitor"}
             <= set(stack(c)), 120)
    order = stack(c)
    _say(f"the server's to-pod side: {order}")
    assert order.index("policer") < order.index("flowmonitor"), order  # monitor after it

    def iperf(*extra: str) -> dict[str, Any]:
        server = c.lab.popen(c.pods["server"].netns,
                             ["iperf3", "-s", "-1", "-p", str(IPERF_PORT)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            r = c.lab.exec(c.pods["client"].netns,
                           ["iperf3", "-c", ip(c, "server"), "-p", str(IPERF_PORT), "-J",
                            "-t", str(DURATION_S), *extra], timeout=DURATION_S + OMIT_S + 60)
            report: dict[str, Any] = json.loads(r.stdout)
            assert "error" not in report, report.get("error")
            return report
        finally:
            if server.poll() is None:
                server.kill()
            server.wait()

    # the policed rate, with the capture running (the bucket's burst left out)
    pcap = tmp_path / "server.pcap"
    capture = subprocess.Popen([KPCN, "--kubeconfig", str(c.tmp / "kubeconfig"), "capture",
                                "server", "-f", f"tcp port {IPERF_PORT}", "-c", "100",
                                "-w", str(pcap)], stderr=subprocess.PIPE, text=True)
    try:
        # the capture's first use compiles its program (seconds on a busy machine)
        wait_for("the capture on the server", lambda: any(
            x.type == "packetcapture" for x in agent_mod.AGENT.node.rt.cubes.values()), 120)
        rate = iperf("-O", str(OMIT_S))["end"]["sum_received"]["bits_per_second"]
        _, err = capture.communicate(timeout=60)
        assert capture.returncode == 0, err
    finally:
        if capture.poll() is None:
            capture.kill()
            capture.wait()
    _say(f"iperf3 through the four cubes: {rate / 1e6:.2f} Mbit/s (policer: 50M)")
    # never above the rate; below it, the policer, not starvation, sets the pace
    # (how close TCP gets is a speed figure, for make bench: 48.7 Mbit/s here
    # once, 47.4 at load 10 on 2 cores)
    assert 0.5 * RATE <= rate <= 1.05 * RATE, f"{rate / 1e6:.2f} Mbit/s through the policer"

    # tcpdump reads the capture
    td = subprocess.run(["tcpdump", "-nr", str(pcap)], capture_output=True, text=True,
                        timeout=60, check=True)
    lines = td.stdout.splitlines()
    assert len(lines) == 100 and all(f".{IPERF_PORT}" in line for line in lines), lines[:3]
    # every packet the capture matched accounted for once (issue 12 trial: 2 631 were not)
    matched, captured, not_copied, lost = accounting(err)
    _say(f"capture: {matched} matched, {captured} captured, {not_copied} not copied, "
         f"{lost} lost")
    assert captured == 100 and matched == captured + not_copied + lost, err

    # the iperf3 flow in kubectl pcn flows, its bytes those the server received
    report = iperf()
    sport = report["start"]["connected"][0]["local_port"]
    received = report["end"]["sum_received"]["bytes"]
    flows = json.loads(kpcn(c, "flows", "server", "-o", "json", "--top", "0").stdout)["flows"]
    [data] = [f for f in flows if f["direction"] == "to-pod" and f["protocol"] == "tcp"
              and f["dport"] == IPERF_PORT and f["sport"] == sport]
    payload = data["bytes"] - 52 * data["packets"]
    _say(f"flow monitor: {data['bytes']} L3 bytes in {data['packets']} packets, payload "
          f"{payload}; iperf3 received {received}")
    # Above what the server received by at most what the sender sent twice: a
    # retransmitted segment that had arrived crosses the monitor again (after
    # a timeout under the policer's drops, SACK resends more than was lost).
    resent = report["end"]["sum_sent"].get("retransmits", 0) * 1448  # an MSS at most each
    assert -0.01 * received <= payload - received <= 0.01 * received + resent, \
        (payload, received, resent, data)

    # each cube removed in turn: no packet of an unrelated flow is lost
    stream = UdpStream(c, seconds=12)
    try:
        time.sleep(1.0)
        for name, kind in (("talkers", "flowmonitor"), ("slow", "policer"),
                           ("big-fw", "firewall")):
            kpcn(c, "remove-cube", name)
            wait_for(f"{kind} gone", lambda kind=kind: kind not in stack(c), 60)
            time.sleep(1.0)
    finally:
        sent, lost = stream.lost()
    _say(f"unrelated UDP stream while the cubes were removed: {lost} of {sent} lost")
    assert sent > 1000 and lost == 0, f"{lost} of {sent} packets lost while cubes were removed"
    assert stack(c) == [t for t in stack(c) if t == "policy"]  # only what was there before
