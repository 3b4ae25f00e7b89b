"""End to end: session lifetimes. One pod opens 20 000 short connections to
an outside server (masqueraded) and to a ClusterIP: none fails, and the
session tables stay bounded, because a connection that is over is forgotten
(its masquerading port reused) and its entries collected.

The lab runs with conntrack's lifetimes except a short TIME_WAIT and CLOSE
(0.2 s) and a collector every 0.2 s, so that the ports and entries turn
over within a test of seconds rather than minutes; the client closes first
(the `burst` probe), so no server keeps a TIME_WAIT that a reused port
could run into. Without lifetimes the 4 536 masquerading ports towards the
server run out after about 4 500 connections and both tables keep two
entries per connection (40 000).

With the default lifetimes (TIME_WAIT 120 s), the issue's case: 12 000
short connections from one pod to one server, which used to fail from the
4 537th on, and the same from a pod to itself through its Service (a
hairpin, masqueraded by the lbrp from the same range). They need the ports
of closed connections before their lifetime is over: a new connection
takes one when no port is free."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from pcn_agent.dataplane import maps
from pcn_agent.dataplane.sessions import NS_PER_S, SessionTimeouts, monotonic_ns
from pcn_lab import checks
from pcn_lab.topology import EXTERNAL_IP, Lab

pytestmark = pytest.mark.netns

COUNT = 20_000
ISSUE_COUNT = 12_000
PARALLEL = 16
SNAT_PORTS = 65535 - 61000 + 1  # NodeConfig's default snatPortRange
VIP = "10.96.0.40"
TIMEOUTS = SessionTimeouts(tcp_time_wait=0.2, tcp_close=0.2)
GC_INTERVAL_S = 0.2
TARGETS = {  # what the client connects to, the table of its sessions, who answers
    "masquerade": (EXTERNAL_IP, checks.TCP_PORT, ("nat_sessions", "k8sdispatcher"), "ext"),
    "clusterip": (VIP, 80, ("lb_sessions", "lbrp"), "n1p2"),
}


@pytest.fixture(scope="module")
def short_lab() -> Iterator[Lab]:
    with Lab(nodes_count=1, pods_per_node=2, session_timeouts=TIMEOUTS,
             session_gc_interval_s=GC_INTERVAL_S) as lab:
        lab.set_service(VIP, 80, "tcp", [lab.backend("n1p2", checks.TCP_PORT)])
        with checks.servers(lab, ["ext", "n1p2"]):
            yield lab
    assert lab.leftovers() == [], f"teardown left {lab.leftovers()}"


@dataclass
class Peak:
    entries: int = 0
    samples: int = 0


@contextmanager
def peak_size(table: maps.BpfTable, every_s: float = 0.1) -> Iterator[Peak]:
    """The most entries `table` held, sampled while the body runs."""
    peak, stop = Peak(), threading.Event()

    def sample() -> None:
        while True:
            peak.entries = max(peak.entries, sum(1 for _ in table.items_lookup_batch()))
            peak.samples += 1
            if stop.wait(every_s):
                return

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield peak
    finally:
        stop.set()
        t.join()


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_many_short_connections_none_fail_and_the_tables_stay_bounded(short_lab: Lab,
                                                                      target: str) -> None:
    host, port, (table_name, cube_type), answers = TARGETS[target]
    node = short_lab.node(1)
    table = node.rt.table(table_name, cube_type)
    collector = node.session_collector
    assert collector is not None
    collected = collector.deleted_total[table_name]
    with peak_size(table) as peak:
        r = checks.probe(short_lab, "n1p1", ["burst", host, str(port), "--count", str(COUNT),
                                             "--parallel", str(PARALLEL), "--timeout", "5"], 600)
    assert r.get("failures") == 0 and r.get("hosts") == {answers: COUNT}, r
    assert node.rt.cube_drops("k8s").get("nat_exhausted", 0) == 0
    # Two entries per connection without lifetimes: 40 000. With them, the
    # connections of the last fraction of a second (a few thousand entries).
    assert peak.samples >= 2 and peak.entries < COUNT // 2, (peak, r)
    assert collector.deleted_total[table_name] - collected > COUNT  # the collector did it

    # Once every lifetime has passed, one pass removes what is left of the
    # run, both directions of every connection (the orphans of ports taken
    # over included): nothing of the client's stays.
    later = monotonic_ns() + 2 * (86400 + 3600) * NS_PER_S
    collector.collect(now_ns=later)
    client = maps.ip_be(short_lab.pods["n1p1"].ip)
    left = [k for k, x in table.items() if client in (k.saddr, k.daddr, x.ip, x.ip2)]
    assert left == []


ISSUE_TARGETS = {  # what the client connects to, the table and the cube of its ports, who answers
    "masquerade": (EXTERNAL_IP, checks.TCP_PORT, ("nat_sessions", "k8sdispatcher"), "k8s", "ext"),
    # the pod reaches itself through its Service: masqueraded to the pods'
    # gateway by the lbrp (kube-proxy's hairpin masquerade), from the same range
    "hairpin": (VIP, 80, ("lb_sessions", "lbrp"), "lb", "n1p1"),
}


@pytest.mark.parametrize("target", sorted(ISSUE_TARGETS))
def test_the_issues_case_with_default_lifetimes(target: str) -> None:
    host, port, (table_name, cube_type), cube, answers = ISSUE_TARGETS[target]
    with Lab(nodes_count=1, pods_per_node=1) as lab:
        lab.set_service(VIP, 80, "tcp", [lab.backend("n1p1", checks.TCP_PORT)])
        with checks.servers(lab, [answers]):
            node = lab.node(1)
            table = node.rt.table(table_name, cube_type)
            with peak_size(table) as peak:
                r = checks.probe(lab, "n1p1", ["burst", host, str(port), "--count",
                                               str(ISSUE_COUNT), "--parallel", str(PARALLEL),
                                               "--timeout", "5"], 600)
            assert r.get("failures") == 0 and r.get("hosts") == {answers: ISSUE_COUNT}, r
            assert node.rt.cube_drops(cube).get("nat_exhausted", 0) == 0
            # every port towards the server held once, by one connection each
            # way (a sample walks the table while connections come and go: it
            # may see a connection leaving and one arriving, at most PARALLEL
            # of each)
            assert sum(1 for _ in table.items_lookup_batch()) <= 2 * SNAT_PORTS
            assert peak.entries <= 2 * SNAT_PORTS + 2 * PARALLEL, peak
    assert lab.leftovers() == [], f"teardown left {lab.leftovers()}"
