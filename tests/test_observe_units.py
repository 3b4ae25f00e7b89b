"""Pure parts of captures and flow monitors: `kubectl pcn flows`' sorting
and table, the capture stream's framing, and the flow monitors' Prometheus
metrics (by function and direction, never by flow)."""

from __future__ import annotations

import socket
from typing import Any

from kubectl_pcn import flows as fl
from pcn_agent.control import captureproto as proto
from pcn_agent.control.metrics import AgentCollector


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
