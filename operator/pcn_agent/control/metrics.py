"""Prometheus metrics of the agent: per-port traffic and drops, reconcile
durations and errors. Read at scrape time, so the fast path pays nothing."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Protocol

from prometheus_client import REGISTRY, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


class CounterSource(Protocol):
    def counters(self) -> dict[str, dict[str, int]]: ...

    def flow_stats(self) -> dict[str, dict[str, dict[str, int]]]: ...


class MetricsSource(Protocol):
    """What the collector reads at scrape time (the agent has these)."""

    @property
    def node_name(self) -> str: ...

    @property
    def reconciles(self) -> int: ...

    @property
    def reconcile_seconds(self) -> Iterable[float]: ...

    @property
    def apply_errors(self) -> int: ...

    @property
    def node(self) -> object | None: ...

    @property
    def manager(self) -> CounterSource | None: ...


class AgentCollector(Collector):
    def __init__(self, agent: MetricsSource) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        a = self.agent
        node = a.node_name
        up = GaugeMetricFamily("pcn_dataplane_up", "1 when the node's data plane is running",
                               labels=["node"])
        up.add_metric([node], 1.0 if a.node is not None else 0.0)
        yield up
        rec = SummaryMetricFamily("pcn_reconcile_seconds", "Duration of reconcile passes",
                                  labels=["node"])
        rec.add_metric([node], count_value=a.reconciles, sum_value=sum(a.reconcile_seconds))
        yield rec
        errs = CounterMetricFamily("pcn_reconcile_errors", "Data-plane operations that failed",
                                   labels=["node"])
        errs.add_metric([node], a.apply_errors)
        yield errs
        yield from _session_metrics(node, getattr(a.node, "session_collector", None))
        if a.manager is None:
            return
        fams = {name: CounterMetricFamily(f"pcn_port_{name}", f"{name.replace('_', ' ')} per "
                                          "cube port", labels=["node", "cube", "port"])
                for name in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "drops")}
        try:
            counters = a.manager.counters()
        except Exception:  # a port removed mid-scrape: skip this round
            log.debug("counter read failed", exc_info=True)
            return
        for key, values in counters.items():
            cube, _, port = key.partition(":")
            for name, value in values.items():
                fams[name].add_metric([node, cube, port], value)
        yield from fams.values()
        yield from _flow_metrics(node, a.manager)


def _flow_metrics(node: str, manager: CounterSource) -> Iterator[Metric]:
    """The flow monitors' totals: by function and direction (from-pod,
    to-pod), never by flow, so the series are bounded by the functions on
    the node whatever the traffic. Bytes are L3 bytes (as conntrack counts)."""
    try:
        stats = manager.flow_stats()
    except Exception:
        log.debug("flow monitor read failed", exc_info=True)
        return
    if not stats:
        return
    labels = ["node", "namespace", "function", "direction"]
    packets = CounterMetricFamily("pcn_flowmonitor_packets", "Packets a flow monitor "
                                  "accounted", labels=labels)
    nbytes = CounterMetricFamily("pcn_flowmonitor_bytes", "L3 bytes (IP datagrams, as "
                                 "conntrack counts them) a flow monitor accounted", labels=labels)
    flows = GaugeMetricFamily("pcn_flowmonitor_flows", "Flows in a flow monitor's table "
                              "(bounded by its maxFlows)", labels=labels)
    for cube, by_dir in sorted(stats.items()):
        _, ns, name = cube.split(".", 2) if cube.count(".") >= 2 else ("", "", cube)
        for direction, t in sorted(by_dir.items()):
            values = [node, ns, name, direction]
            packets.add_metric(values, t["packets"])
            nbytes.add_metric(values, t["bytes"])
            flows.add_metric(values, t["flows"])
    yield from (packets, nbytes, flows)


def _session_metrics(node: str, collector: object | None) -> Iterator[Metric]:
    """The session collector's counters (pcn_agent.dataplane.sessions): what
    its last pass found in each session table and what it deleted so far."""
    deleted: dict[str, int] = getattr(collector, "deleted_total", None) or {}
    last = getattr(collector, "last", None)
    if not deleted:
        return
    gone = CounterMetricFamily("pcn_sessions_collected", "Session entries deleted by the "
                               "garbage collector (connections past their lifetime)",
                               labels=["node", "table"])
    for table, n in deleted.items():
        gone.add_metric([node, table], n)
    yield gone
    if last is not None:
        size = GaugeMetricFamily("pcn_sessions", "Session entries in the table at the "
                                 "collector's last pass", labels=["node", "table"])
        for table, n in last.scanned.items():
            size.add_metric([node, table], n - last.deleted.get(table, 0))
        yield size


def serve_metrics(agent: MetricsSource, port: int, addr: str = "0.0.0.0") -> None:
    REGISTRY.register(AgentCollector(agent))
    start_http_server(port, addr)
    log.info("metrics on http://%s:%d/metrics", addr, port)
