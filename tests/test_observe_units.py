"""Pure parts of captures and flow monitors: `kubectl pcn flows`' sorting
and table, the capture stream's framing, and the flow monitors' Prometheus
metrics (by function and direction, never by flow)."""

from __future__ import annotations

import io
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from kubectl_pcn import capture as cap
from kubectl_pcn import flows as fl
from kubectl_pcn.errors import Forbidden, PcnError
from pcn_agent.control import captureproto as proto
from pcn_agent.control.metrics import AgentCollector


def _reader(sock: socket.socket, got: bytearray) -> threading.Thread:
    """A thread reading `sock` into `got` until the other end closes."""
    def read() -> None:
        while chunk := sock.recv(1 << 20):
            got.extend(chunk)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t


def flow(src: str, sport: int, packets: int, nbytes: int, last: float,
         direction: str = "from-pod", protocol: str = "tcp") -> dict[str, Any]:
    return {"src": src, "dst": "10.0.0.9", "sport": sport, "dport": 80, "protocol": protocol,
            "direction": direction, "packets": packets, "bytes": nbytes,
            "firstSeenSecondsAgo": last + 1, "lastSeenSecondsAgo": last,
            "durationSeconds": 1.0, "tcpFlags": "SYN|ACK"}


DATA = {"pod": "demo/web-1", "ip": "10.0.0.1", "node": "n1", "monitors": [
    {"function": "nf.demo.a", "maxFlows": 64,
     "flows": [flow("10.0.0.1", 1, 10, 5000, 3.0), flow("10.0.0.1", 2, 50, 4000, 0.5)]},
    {"function": "nf.demo.b", "maxFlows": 8,
     "flows": [flow("10.0.0.1", 3, 5, 90_000, 10.0, "to-pod")]}]}


def test_sorting_and_top() -> None:
    assert [f["sport"] for f in fl.rows(DATA, "bytes", 0)] == [3, 1, 2]
    assert [f["sport"] for f in fl.rows(DATA, "packets", 0)] == [2, 1, 3]
    assert [f["sport"] for f in fl.rows(DATA, "last", 0)] == [2, 1, 3]
    assert [f["sport"] for f in fl.rows(DATA, "bytes", 2)] == [3, 1]
    assert fl.rows(DATA, "bytes", 1)[0]["function"] == "nf.demo.b"


def test_json_output_is_sorted_and_cut_too() -> None:
    """-o json|yaml holds the flows --sort orders and --top cuts, not every
    monitor's flows unsorted (a trial of issue 12: -o json ignored both)."""
    doc = fl.document(DATA, fl.rows(DATA, "packets", 2), "packets", 2)
    assert [f["sport"] for f in doc["flows"]] == [2, 1]
    assert (doc["sort"], doc["top"]) == ("packets", 2)
    assert doc["monitors"] == [{"function": "nf.demo.a", "maxFlows": 64, "flowCount": 2},
                               {"function": "nf.demo.b", "maxFlows": 8, "flowCount": 1}]
    assert "flows" not in str(doc["monitors"])
    assert (doc["pod"], doc["ip"], doc["node"]) == ("demo/web-1", "10.0.0.1", "n1")


def test_table() -> None:
    text = fl.table(DATA, fl.rows(DATA, "bytes", 0), wide=True)
    lines = text.splitlines()
    assert lines[0] == "Pod:  demo/web-1 (10.0.0.1) on node n1"
    assert "nf.demo.a keeps at most 64 flows" in lines[1]
    assert lines[3].split()[:3] == ["DIRECTION", "PROTO", "SOURCE"]
    assert lines[4].split()[:6] == ["to-pod", "tcp", "10.0.0.1:3", "10.0.0.9:80", "5", "87.9"]
    assert lines[4].split()[-1] == "nf.demo.b"
    empty = {**DATA, "monitors": []}
    assert "No flow monitor on this pod's chain" in fl.table(empty, [])


def test_stream_framing_round_trip() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(proto.packet_frame(123, 1500, proto.HOOK_TO_POD, b"abc")
                  + proto.packet_frame(124, 60, proto.HOOK_FROM_POD, b"")
                  + proto.end_frame("count", {"matched": 2}))
        r = proto.StreamReader(b)
        p1, p2, end = r.next(), r.next(), r.next()
    assert p1 == proto.Packet(123, 1500, 1, b"abc") and p1.direction == "to-pod"
    assert isinstance(p2, proto.Packet) and p2.direction == "from-pod" and p2.data == b""
    assert end == {"reason": "count", "stats": {"matched": 2}}


class _Manager:
    def counters(self) -> dict[str, dict[str, int]]:
        return {}

    def flow_stats(self) -> dict[str, dict[str, dict[str, int]]]:
        return {"nf.demo.mon": {"from-pod": {"packets": 3, "bytes": 300, "flows": 2},
                                "to-pod": {"packets": 1, "bytes": 60, "flows": 1}}}


class _Agent:
    node_name = "n1"
    reconciles = 0
    reconcile_seconds: list[float] = []
    apply_errors = 0
    node = None
    manager = _Manager()


def test_flow_metrics_are_per_function_and_direction() -> None:
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for m in AgentCollector(_Agent()).collect() for s in m.samples
               if s.name.startswith("pcn_flowmonitor")}
    lab = (("direction", "from-pod"), ("function", "mon"), ("namespace", "demo"), ("node", "n1"))
    assert samples[("pcn_flowmonitor_bytes_total", lab)] == 300
    assert samples[("pcn_flowmonitor_packets_total", lab)] == 3
    assert samples[("pcn_flowmonitor_flows", lab)] == 2
    assert len(samples) == 6  # 3 metrics x 2 directions, whatever the flows


# ---------------------------------------------------------------------------- flowmonitor type
def _nf(name: str, type_: str, config: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "pcn.dev/v1alpha1", "kind": "NetworkFunction",
            "metadata": {"namespace": "web", "name": name},
            "spec": {"type": type_, "config": config}}


def test_flowmonitor_functions_reach_the_desired_state() -> None:
    """Flow monitors reach the desired state with their bound (default 1024);
    another type's field (the CRD's config schema is every type's, without
    defaults, so the API server adds none) or a bound out of range is
    Invalid."""
    from pcn_agent.control.reconcile import FunctionSpec, Inputs, cube_name, desired_state
    from pcn_agent.control.settings import ClusterSettings
    from pcn_agent.dataplane.cubes.functions import FlowMonitorSettings

    fns = [_nf("mon", "flowmonitor", {"maxFlows": 300}),
           _nf("plain", "flowmonitor", {}),
           _nf("bad", "flowmonitor", {"defaultAction": "drop"}),
           _nf("big", "flowmonitor", {"maxFlows": 70000})]
    chains = [{"apiVersion": "pcn.dev/v1alpha1", "kind": "CubeChain",
               "metadata": {"namespace": "web", "name": "c"},
               "spec": {"podSelector": {}, "ingress": [{"function": "mon"}],
                        "egress": [{"function": "mon"}, {"function": "plain"}]}}]
    pods = [{"metadata": {"namespace": "web", "name": "p", "labels": {}},
             "spec": {"nodeName": "n1"}}]
    r = desired_state(Inputs("n1", ClusterSettings(), pods=pods, attachments={"k": ("web", "p")},
                             functions=fns, chains=chains))
    mon, plain = cube_name("web", "mon"), cube_name("web", "plain")
    assert r.desired.functions[mon] == FunctionSpec("flowmonitor", FlowMonitorSettings(300))
    assert r.desired.functions[plain] == FunctionSpec("flowmonitor", FlowMonitorSettings(1024))
    assert r.desired.chains["k"] == ((mon, plain), (mon,))
    assert r.verdicts[("NetworkFunction", "web", "bad")].reason == "Invalid"
    assert r.verdicts[("NetworkFunction", "web", "big")].reason == "Invalid"


# ---------------------------------------------------------------------------- exec denied
DENIED = ('Error from server (Forbidden): pods "pcn-agent-x1" is forbidden: User "alice" '
          'cannot create resource "pods/exec" in API group "" in the namespace "pcn-system"')


def _fake_kubectl(tmp: Path, stderr: str, status: int, stdout: str = "") -> cap.Route:
    """A stand-in for `kubectl exec ...` that prints `stdout` and `stderr` and
    exits with `status`, routed as the real one is (exec_namespace set)."""
    exe = tmp / "kubectl"
    exe.write_text(f"#!/bin/sh\nprintf '%s' '{stdout}'\nprintf '%s\\n' '{stderr}' >&2\n"
                   f"exit {status}\n")
    exe.chmod(0o755)
    return cap.Route((str(exe),), (), "pod pcn-system/pcn-agent-x1", "pcn-system")


def test_flows_denied_exec_names_the_permission(tmp_path: Path) -> None:
    r = _fake_kubectl(tmp_path, DENIED, 1)
    with pytest.raises(Forbidden) as info:
        cap.run_json(r, [*r.argv, "flows", "web-1", "-n", "demo"])
    msg = info.value.message
    assert "get and create on pods/exec in namespace pcn-system" in msg
    assert "pod pcn-system/pcn-agent-x1" in msg and 'User "alice"' in msg
    assert "kubectl auth can-i create pods/exec -n pcn-system" in msg
    # another failure is not dressed up as RBAC
    other = _fake_kubectl(tmp_path, "error: unable to upgrade connection: container not found",
                          1)
    with pytest.raises(PcnError) as info2:
        cap.run_json(other, [*other.argv, "flows", "web-1", "-n", "demo"])
    assert not isinstance(info2.value, Forbidden)
    assert "container not found" in info2.value.message
    # in the lab (no kubectl exec) nothing is read as RBAC's
    lab = cap.Route(r.argv, (), "the lab's agent socket /x.sock")
    assert cap.exec_denied(lab, DENIED) is None


def test_capture_denied_exec_names_the_permission(tmp_path: Path) -> None:
    r = _fake_kubectl(tmp_path, DENIED, 1)
    out, err = io.BytesIO(), io.BytesIO()
    with pytest.raises(Forbidden) as info:
        cap.run_capture(r, [*r.argv, "capture", "web-1"], out, err)
    assert "pods/exec" in info.value.message and out.getvalue() == b""
    assert DENIED.encode() in err.getvalue()  # the command's stderr still reaches the user
    # a capture that works: pcap out, progress relayed, status 0
    ok = _fake_kubectl(tmp_path, "capturing demo/web-1", 0, stdout="PCAP")
    out, err = io.BytesIO(), io.BytesIO()
    assert cap.run_capture(ok, [*ok.argv, "capture", "web-1"], out, err) == 0
    assert out.getvalue() == b"PCAP" and err.getvalue() == b"capturing demo/web-1\n"


def test_help_of_capture_and_flows_names_the_permission() -> None:
    from click.testing import CliRunner

    from kubectl_pcn.cli import cli

    for verb in ("capture", "flows"):
        res = CliRunner().invoke(cli, [verb, "--help"])
        assert res.exit_code == 0
        assert "get and create pods/exec" in res.output and "resources: [pods/exec]" in res.output


def test_readme_shows_the_same_role() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"```yaml\n{cap.EXEC_ROLE}```" in readme


# ----------------------------------------------------------------------------- flows progress
def test_flows_says_what_the_agent_is_busy_with(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    """A flows request that finds the data plane busy (a new flow monitor
    compiles under the manager's lock: ~7 s of silence in a trial of issue
    12) gets progress lines naming what it waits for, then its answer; the
    client hands each to `progress` and returns the answer."""
    import json
    from types import SimpleNamespace

    from pcn_agent.cni import localapi
    from pcn_agent.control import observe

    monkeypatch.setattr(observe, "PROGRESS_FIRST_S", 0.01)
    monkeypatch.setattr(observe, "PROGRESS_EVERY_S", 0.01)
    pod = SimpleNamespace(ingress=["nf.demo.mon"], egress=[], k8s_namespace="demo",
                          k8s_name="web-1", iface=SimpleNamespace(address="10.0.0.1/24"))
    node = SimpleNamespace(cfg=SimpleNamespace(name="n1"),
                           find_pod=lambda ns, name: pod if (ns, name) == ("demo", "web-1")
                           else None)
    manager = SimpleNamespace(lock=threading.RLock(), monitors={},
                              busy="setting up the flowmonitor function nf.demo.mon")
    obs = observe.Observer(node, manager)  # type: ignore[arg-type]
    held, seen = threading.Event(), threading.Event()

    def compile_under_lock() -> None:
        with manager.lock:
            held.set()
            seen.wait(30)

    worker = threading.Thread(target=compile_under_lock)
    worker.start()
    held.wait(30)
    sock_path = tmp_path / "agent.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock_path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            request = json.loads(localapi.read_line(conn))
            obs.flows_stream(request, conn)

    srv = threading.Thread(target=serve)
    srv.start()
    said: list[str] = []

    def progress(text: str) -> None:
        said.append(text)
        seen.set()  # the "compile" ends once the reader was told

    try:
        answer = localapi.call(sock_path, {"op": "flows", "namespace": "demo",
                                           "pod": "web-1"}, progress=progress)
    finally:
        seen.set()
        worker.join(30)
        srv.join(30)
        server.close()
    assert said and said[0].startswith("waiting for the agent on node n1 ("), said
    assert said[0].endswith("s): setting up the flowmonitor function nf.demo.mon"), said
    assert answer == {"ok": True, "pod": "demo/web-1", "ip": "10.0.0.1", "node": "n1",
                      "monitors": []}


def test_kubectl_flows_relays_progress_and_keeps_errors(tmp_path: Path) -> None:
    """`kubectl pcn flows` shows the agent command's progress lines (ending in
    "...") as they come; its other stderr lines only in the error."""
    import sys

    script = tmp_path / "agent.py"
    script.write_text(
        "import sys\n"
        "print('pcn-agent flows: waiting for the agent on node n1 (1 s): busy...',"
        " file=sys.stderr, flush=True)\n"
        "print('a debug line', file=sys.stderr)\n"
        "print('{\"pod\": \"demo/web-1\"}')\n"
        "sys.exit(int(sys.argv[1]))\n")
    r = cap.Route((sys.executable, str(script)), via="test")
    err = io.BytesIO()
    assert cap.run_json(r, [*r.argv, "0"], err=err) == {"pod": "demo/web-1"}
    assert err.getvalue() == \
        b"pcn-agent flows: waiting for the agent on node n1 (1 s): busy...\n"
    with pytest.raises(PcnError, match="a debug line"):
        cap.run_json(r, [*r.argv, "1"], err=io.BytesIO())


# ----------------------------------------------------------------------------- capture accounting
def test_capture_stats_partition_what_the_cube_matched() -> None:
    """The end frame's stats: every packet the cube matched is captured,
    not copied (rate bound, past -c) or lost (ring buffer, agent queue,
    unsent), once; pcn-agent capture's end line says so."""
    from pcn_agent.control.observe import capture_stats
    from pcn_agent.control.observecli import accounting

    # the cube: 1000 matched = 700 copied + 250 over the budget + 50 ring full;
    # the agent: 700 copied = 600 sent + 40 queue full + 45 past -c + 15 unsent
    kernel = {"matched": 1000, "copied": 700, "not_copied": 250, "lost": 50}
    st = capture_stats(kernel, sent=600, queue_full=40, past_count=45, unsent=15)
    assert (st["matched"], st["captured"], st["notCopied"], st["lost"]) == (1000, 600, 295, 105)
    assert st["matched"] == st["captured"] + st["notCopied"] + st["lost"]
    assert accounting(st) == (
        "; of the 1000 packets the filter matched, 600 were captured, 295 not copied (250 over "
        "the rate bound; 45 past -c) and 105 lost (50 for a full ring buffer; 40 for a full "
        "agent queue; 15 not sent before the reader went)")
    clean = capture_stats({"matched": 4, "copied": 4, "not_copied": 0, "lost": 0}, 4, 0, 0, 0)
    assert accounting(clean) == \
        "; of the 4 packets the filter matched, 4 were captured, 0 not copied and 0 lost"
    assert accounting({}) == ""  # a capture point deleted meanwhile: nothing to account


def test_the_capture_stream_never_waits_while_copies_are_queued(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream sends queued copies back to back, and waits (for a copy
    or a heartbeat) only when none is queued: it once slept 50 ms per 64 KiB
    sent, ~850 full-size frames a second, under the default bound of 2000
    (issue 12 trial: copies lost at the default rate)."""
    import queue
    from types import SimpleNamespace

    from pcn_agent.control import observe
    from pcn_agent.dataplane.cubes.packetcapture import Captured

    q: queue.Queue[Captured] = queue.Queue()
    for i in range(300):
        q.put(Captured(i, 1, 7, 0, 9000, bytes(8192)))
    # (timeout, copies queued) of each select on the reader's socket (a queue.get with
    # a timeout returns at once while copies are queued)
    waits: list[tuple[float, int]] = []
    real_select = observe.select.select

    def select(r: Any, w: Any, x: Any, timeout: float) -> Any:
        waits.append((timeout, q.qsize()))
        return real_select(r, w, x, timeout)

    monkeypatch.setattr(observe.select, "select", select)
    pod = SimpleNamespace(key="demo/web-1")
    node = SimpleNamespace(pods={"demo/web-1": pod}, cfg=SimpleNamespace(name="n1"))
    manager = SimpleNamespace(lock=threading.RLock())
    obs = observe.Observer(node, manager)  # type: ignore[arg-type]
    tally = observe._Tally()
    a, b = socket.socketpair()
    got = bytearray()
    reader = _reader(b, got)
    try:
        reason, there = obs._stream(a, q, pod, 300, 0, 30.0, tally)  # type: ignore[arg-type]
    finally:
        a.close()
        reader.join(30)
        b.close()
    assert (reason, there, tally.sent, tally.failed) == \
        ("stopped: 300 packets captured (-c 300)", True, 300, 0)
    assert len(got) == 300 * (1 + proto.PACKET.size + 8192)
    assert [w for w in waits if w[0] > 0 and w[1] > 0] == []  # no wait with copies queued


def test_the_copies_left_at_the_end_are_sent_or_counted() -> None:
    """What is queued when a capture ends goes to a reader still there, in
    pieces; to a reader gone, nothing, and every copy comes back as unsent."""

    from pcn_agent.control import observe
    from pcn_agent.dataplane.cubes.packetcapture import Captured

    copies = [Captured(i, 1, 7, 1, 9000, bytes(8192)) for i in range(100)]
    a, b = socket.socketpair()
    got = bytearray()
    reader = _reader(b, got)
    try:
        assert observe._send_rest(a, copies, 5) == (105, [])
    finally:
        a.close()
        reader.join(30)
        b.close()
    assert len(got) == 100 * (1 + proto.PACKET.size + 8192)
    a, b = socket.socketpair()
    b.close()
    with a:
        assert observe._send_rest(a, copies, 5) == (5, copies)
