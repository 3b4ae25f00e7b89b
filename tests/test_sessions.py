"""Session lifetimes and the garbage collector (pcn_agent.dataplane.sessions):
the Python rules against the C ones, the ConfigMap keys, and the collector on
a real pinned session table (BPF_PROG_TEST_RUN-free: entries written as the
data path writes them, time moved by `now_ns`)."""

from __future__ import annotations

import ctypes as ct
import logging
import re
import threading
from collections.abc import Iterator
from dataclasses import fields

import pytest
from bpfunit import UnitNet, unit_net
from pydantic import ValidationError
from test_maps_mirror import c_defines

from pcn_agent.control.settings import ClusterSettings
from pcn_agent.dataplane import maps, sessions
from pcn_agent.dataplane.compiler import source_text
from pcn_agent.dataplane.sessions import (
    NS_PER_S,
    Age,
    Clock,
    Kind,
    SessionCollector,
    SessionGC,
    SessionTimeouts,
    State,
    lifetime_slot,
    paired,
    peer_key,
    write_config,
)

TCP, UDP, ICMP = 6, 17, 1
S = NS_PER_S


def ip(a: str) -> int:
    return maps.ip_be(a)


def port(p: int) -> int:
    return int.from_bytes(p.to_bytes(2, "big"), "little")


# ---------------------------------------------------------------------------- the C's numbers
def test_kinds_states_and_slots_match_the_c() -> None:
    c = c_defines()
    assert {k.name: k.value for k in Kind} == {
        n.removeprefix("PCN_SESS_"): v for n, v in c.items() if n.startswith("PCN_SESS_")}
    ct_states = {n.removeprefix("PCN_CT_"): v for n, v in c.items()
                 if n.startswith("PCN_CT_") and n != "PCN_CT_UDP_STREAM_AFTER_MS"}
    assert {s.name: s.value for s in State}.items() <= ct_states.items()
    aliases = dict(re.findall(r"#define PCN_CT_(\w+)\s+PCN_CT_(\w+)\b", source_text("lbrp")))
    assert {a: State[t] for a, t in aliases.items()} == {
        "UNREPLIED": sessions.UNREPLIED, "REPLIED": sessions.REPLIED, "STREAM": sessions.STREAM}
    slots = {n.removeprefix("PCN_LT_").lower(): v for n, v in c.items()
             if n.startswith("PCN_LT_")}
    assert slots == {f.name: i for i, f in enumerate(fields(SessionTimeouts))}
    assert c["PCN_LIFETIMES"] == maps.LIFETIMES == len(fields(SessionTimeouts))


def test_default_lifetimes_are_the_cs() -> None:
    """pcn_session_default_s (used when session_cfg holds 0) says what the
    SessionTimeouts defaults say."""
    text = source_text("lbrp")
    body = re.search(r"pcn_session_default_s\(u32 slot\)\s*\{(.*?)\n\}", text, re.S)
    assert body, "pcn_session_default_s not found"
    cases = dict(re.findall(r"case PCN_LT_(\w+): return (\d+);", body.group(1)))
    fallback = re.search(r"default: return (\d+);", body.group(1))
    assert fallback
    want = {f.name: getattr(SessionTimeouts(), f.name) for f in fields(SessionTimeouts)}
    got = {f.name: int(cases.get(f.name.upper(), fallback.group(1)))
           for f in fields(SessionTimeouts)}
    assert got == want


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), 31 * 86400, True, "10"])
def test_lifetimes_must_be_positive_seconds(bad: object) -> None:
    with pytest.raises(ValueError, match="tcp_close"):
        SessionTimeouts(tcp_close=bad)  # type: ignore[arg-type]


def test_lifetime_slots() -> None:
    assert [lifetime_slot(TCP, s) for s in State] == [2, 0, 1, 2, 3, 4, 5, 6, 5]
    assert [lifetime_slot(UDP, s) for s in (0, 1, 2, 3)] == [8, 7, 7, 8]
    assert lifetime_slot(ICMP, 1) == lifetime_slot(ICMP, 2) == 9


# ---------------------------------------------------------------------------- the ConfigMap
def test_configmap_sets_the_lifetimes_in_seconds() -> None:
    s = ClusterSettings.model_validate({"sessionTimeoutTCPEstablished": "3600",
                                        "sessionTimeoutUDP": "5", "sessionGCInterval": "30"})
    assert s.session_timeouts == SessionTimeouts(tcp_established=3600, udp=5)
    assert s.sessionGCInterval == 30
    assert ClusterSettings().session_timeouts == SessionTimeouts()


@pytest.mark.parametrize("key,value", [("sessionTimeoutTCPTimeWait", "0"),
                                       ("sessionTimeoutUDPStream", "2 minutes"),
                                       ("sessionTimeoutICMP", "2592001"),
                                       ("sessionGCInterval", "0")])
def test_configmap_rejects_bad_lifetimes_naming_the_key(key: str, value: str) -> None:
    with pytest.raises(ValidationError, match=key):
        ClusterSettings.model_validate({key: value})


# ---------------------------------------------------------------------------- the rules
def xlate(kind: int, ip_: str, port_: int, is_src: int, state: int = State.ESTABLISHED,
          seen: int = 0, ip2: str | None = None, port2: int = 0) -> maps.Xlate:
    return maps.Xlate(ip=ip(ip_), port=port(port_), is_src=is_src, kind=kind,
                      ip2=ip(ip2) if ip2 else 0, port2=port(port2), state=state, seen_ns=seen)


def key(src: str, dst: str, sport: int, dport: int, proto: int = TCP) -> sessions.FlowKey:
    return (ip(src), ip(dst), port(sport), port(dport), proto)


CLIENT, VIP, BACKEND, NODE, VTEP, SERVER, GATEWAY = (
    "10.244.1.10", "10.96.0.10", "10.244.2.20", "192.168.50.10", "10.250.0.1", "203.0.113.5",
    "10.244.1.1")
# the two entries of each kind of connection, as the data path records them
PAIRS = {
    "clusterip": ((key(CLIENT, VIP, 40000, 80), xlate(Kind.LB, BACKEND, 8080, 0)),
                  (key(BACKEND, CLIENT, 8080, 40000), xlate(Kind.LB_REV, VIP, 80, 1))),
    "masquerade": ((key(CLIENT, SERVER, 40000, 443), xlate(Kind.SNAT, NODE, 61000, 1)),
                   (key(SERVER, NODE, 443, 61000), xlate(Kind.SNAT_REV, CLIENT, 40000, 0))),
    "masquerade-echo": ((key(CLIENT, SERVER, 7, 7, ICMP), xlate(Kind.SNAT, NODE, 61001, 1)),
                        (key(SERVER, NODE, 61001, 61001, ICMP),
                         xlate(Kind.SNAT_REV, CLIENT, 7, 0))),
    "nodeport-local": ((key(SERVER, NODE, 5000, 30080), xlate(Kind.NODEPORT, BACKEND, 8080, 0)),
                       (key(BACKEND, SERVER, 8080, 5000),
                        xlate(Kind.NODEPORT_REV, NODE, 30080, 1))),
    "nodeport-cluster": ((key(SERVER, NODE, 5000, 30080),
                          xlate(Kind.NODEPORT, BACKEND, 8080, 0, ip2=VTEP, port2=61002)),
                         (key(BACKEND, VTEP, 8080, 61002),
                          xlate(Kind.NODEPORT_REV, NODE, 30080, 1, ip2=SERVER, port2=5000))),
    # a pod that is its own Service's backend: masqueraded to the pods' gateway
    "hairpin": ((key(CLIENT, VIP, 40000, 80),
                 xlate(Kind.LB, CLIENT, 8080, 0, ip2=GATEWAY, port2=61003)),
                (key(CLIENT, GATEWAY, 8080, 61003),
                 xlate(Kind.LB_HAIRPIN_REV, VIP, 80, 1, ip2=CLIENT, port2=40000))),
}


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_each_entry_names_its_peer(kind: str) -> None:
    (fk, fx), (rk, rx) = PAIRS[kind]
    assert peer_key(fk, fx) == rk and peer_key(rk, rx) == fk
    assert paired(fk, fx, rk, rx) and paired(rk, rx, fk, fx)
    other = maps.Xlate.from_buffer_copy(rx)
    other.port = port(1)  # a later connection reusing the reply's tuple
    assert not paired(fk, fx, rk, other)


def test_a_connection_lives_while_either_direction_does() -> None:
    (fk, fx), (rk, rx) = PAIRS["masquerade"]
    life, grace = 10 * S, 5 * S
    lifetimes = tuple(life for _ in range(maps.LIFETIMES))
    now = 1000 * S
    fx.seen_ns, rx.seen_ns = now - 3 * S, now - 12 * S  # one-way: only the forward side talks
    entries = {fk: fx, rk: rx}
    clock = Clock(lifetimes, grace, now)
    assert clock.age(TCP, rx) == Age.EXPIRED
    assert clock.pair_age(rk, rx, entries) == clock.pair_age(fk, fx, entries) == Age.LIVE
    fx.seen_ns = now - 14 * S
    assert clock.pair_age(rk, rx, entries) == Age.EXPIRED
    fx.seen_ns, rx.seen_ns = now - 16 * S, now - 17 * S
    assert clock.pair_age(rk, rx, entries) == clock.pair_age(fk, fx, entries) == Age.DEAD
    rx.seen_ns = now + 1  # written by another CPU after our `now`
    assert clock.age(TCP, rx) == Age.LIVE
    rx.seen_ns = (now - 2**63 // 2) % 2**64  # an old time, whatever the uptime
    assert clock.age(TCP, rx) == Age.DEAD


# ---------------------------------------------------------------------------- the collector
@pytest.fixture(scope="module")
def net() -> Iterator[UnitNet]:
    with unit_net(veths=0) as built:
        built.rt.load_type("lbrp")
        yield built


@pytest.fixture
def table(net: UnitNet) -> Iterator[maps.BpfTable]:
    t = net.rt.table("lb_sessions", "lbrp")
    yield t
    for k in [k for k, _ in t.items()]:
        maps.discard(t, k)


def put(table: maps.BpfTable, k: sessions.FlowKey, x: maps.Xlate, seen: int,
        state: int = State.TIME_WAIT) -> None:
    x = maps.Xlate.from_buffer_copy(x)
    x.seen_ns, x.state = seen, state
    table[maps.Flow(*k)] = x


def keys(table: maps.BpfTable) -> set[sessions.FlowKey]:
    return {sessions.flow_key(k) for k, _ in table.items()}


TIMEOUTS = SessionTimeouts()  # TIME_WAIT: 120 s
GRACE_S = 5


def test_collector_deletes_connections_past_lifetime_and_grace(table: maps.BpfTable) -> None:
    """Both directions of a closed connection go once it is 120 s (TIME_WAIT)
    + 5 s (grace) silent; within the grace it is still the data path's, and
    one direction still talking keeps both."""
    now = sessions.monotonic_ns()
    (fk, fx), (rk, rx) = PAIRS["clusterip"]
    (mfk, mfx), (mrk, mrx) = PAIRS["masquerade"]
    (ofk, ofx), (ork, orx) = PAIRS["nodeport-cluster"]
    put(table, fk, fx, now)  # closed, silent 130 s: over
    put(table, rk, rx, now)
    put(table, mfk, mfx, now + 7 * S)  # closed, silent 123 s: expired, within the grace
    put(table, mrk, mrx, now + 7 * S)
    put(table, ofk, ofx, now + 100 * S, State.ESTABLISHED)  # one-way: the reply side is old
    put(table, ork, orx, now - 100_000 * S, State.ESTABLISHED)
    collector = SessionCollector({"lb_sessions": table}, TIMEOUTS, GRACE_S)
    r = collector.collect(now_ns=now + 123 * S)
    assert r.deleted == {"lb_sessions": 0} and r.scanned == {"lb_sessions": 6}
    r = collector.collect(now_ns=now + 130 * S)
    assert r.deleted == {"lb_sessions": 2}
    assert keys(table) == {mfk, mrk, ofk, ork}
    r = collector.collect(now_ns=now + 130 * S + 86400 * S)
    assert r.deleted == {"lb_sessions": 4} and keys(table) == set()
    assert collector.deleted_total == {"lb_sessions": 6} and collector.runs == 3


def test_collector_deletes_what_a_later_connection_left_behind(table: maps.BpfTable) -> None:
    """A port taken over by a new connection leaves the old connection's
    other entry alone (an orphan): it goes on its own lifetime, the new
    connection stays."""
    now = sessions.monotonic_ns()
    (fk, fx), (rk, rx) = PAIRS["masquerade"]
    put(table, fk, fx, now - 200 * S)  # the old pod's side, over
    newer = maps.Xlate.from_buffer_copy(rx)
    newer.ip, newer.port = ip("10.244.1.99"), port(41000)  # the port, now another pod's
    put(table, rk, newer, now, State.ESTABLISHED)
    put(table, peer_key(rk, newer), xlate(Kind.SNAT, NODE, 61000, 1), now, State.ESTABLISHED)
    r = SessionCollector({"lb_sessions": table}, TIMEOUTS, GRACE_S).collect(now_ns=now)
    assert r.deleted == {"lb_sessions": 1}
    assert keys(table) == {rk, peer_key(rk, newer)}


class RacingTable:
    """A session table that the data path writes right after the
    collector's snapshot: the entry it gives to a new connection."""

    def __init__(self, table: maps.BpfTable, k: sessions.FlowKey, x: maps.Xlate) -> None:
        self.table, self.k, self.x = table, k, x

    def items_lookup_batch(self) -> Iterator[tuple[object, object]]:
        items = list(self.table.items_lookup_batch())
        self.table[maps.Flow(*self.k)] = self.x
        return iter(items)

    def __getitem__(self, k: object) -> object:
        return self.table[k]

    def __delitem__(self, k: object) -> None:
        del self.table[k]


def test_collector_spares_an_entry_rewritten_after_its_snapshot(table: maps.BpfTable) -> None:
    now = sessions.monotonic_ns()
    (fk, fx), (rk, rx) = PAIRS["clusterip"]
    put(table, fk, fx, now - 200 * S)
    put(table, rk, rx, now - 200 * S)
    fresh = maps.Xlate.from_buffer_copy(fx)
    fresh.seen_ns, fresh.state = now, State.SYN_SENT  # the client reopened on the same ports
    racing = RacingTable(table, fk, fresh)
    r = SessionCollector({"lb_sessions": racing}, TIMEOUTS,  # type: ignore[dict-item]
                         GRACE_S).collect(now_ns=now)
    assert r.deleted == {"lb_sessions": 1}
    assert keys(table) == {fk} and bytes(table[maps.Flow(*fk)]) == bytes(fresh)


def test_write_config_gives_the_data_path_its_lifetimes(net: UnitNet) -> None:
    cfg = net.rt.table("session_cfg", "lbrp")
    try:
        write_config(cfg, SessionTimeouts(udp=0.5), grace_s=2)
        got = cfg[ct.c_uint32(0)]
        assert list(got.lifetime_ns) == SessionTimeouts(udp=0.5).slots_ns()
        assert got.lifetime_ns[7] == S // 2 and got.grace_ns == 2 * S
    finally:
        cfg[ct.c_uint32(0)] = maps.SessionCfg()


class CountingCollector:
    def __init__(self) -> None:
        self.calls = 0
        self.ran = threading.Event()

    def collect(self) -> sessions.CollectResult:
        self.calls += 1
        if self.calls == 1:
            raise OSError("a failing pass")  # logged; the next one runs
        if self.calls >= 3:
            self.ran.set()
        return sessions.CollectResult()


def test_gc_thread_collects_every_interval_until_stopped() -> None:
    c = CountingCollector()
    gc = SessionGC(c, 0.01, "t").start()  # type: ignore[arg-type]
    try:
        assert c.ran.wait(10)
    finally:
        gc.stop()
    assert "pcn-session-gc-t" not in {t.name for t in threading.enumerate()}  # joined


@pytest.mark.parametrize(("took", "wait"), [(0.0, 10.0), (4.0, 6.0), (9.5, 1.0), (30.0, 1.0)])
def test_passes_start_every_interval_but_never_back_to_back(took: float, wait: float) -> None:
    assert sessions.next_pass_in(10.0, took) == pytest.approx(wait)


class SlowCollector:
    """Passes that report `seconds` each, the second one telling `done`."""

    def __init__(self, seconds: list[float]) -> None:
        self.seconds = seconds
        self.done = threading.Event()

    def collect(self) -> sessions.CollectResult:
        if not self.seconds:
            self.done.set()
            return sessions.CollectResult()
        return sessions.CollectResult(scanned={"nat_sessions": 5000},
                                      seconds=self.seconds.pop(0))


def test_a_pass_longer_than_the_interval_is_logged_once_while_it_lasts(
        caplog: pytest.LogCaptureFixture) -> None:
    """Past the grace (one interval), what a pass has not yet removed holds
    its port: the operator is told, with the setting that helps, once per
    spell of slow passes."""
    c = SlowCollector([0.5, 0.5, 0.001, 0.5])
    with caplog.at_level(logging.WARNING, logger="pcn_agent.dataplane.sessions"):
        gc = SessionGC(c, 0.01, "slow").start()  # type: ignore[arg-type]
        try:
            assert c.done.wait(10)
        finally:
            gc.stop()
    warned = [r.getMessage() for r in caplog.records if "longer than its interval" in r.message]
    assert len(warned) == 2, warned
    assert "5000 entries took 0.5 s" in warned[0] and "sessionGCInterval" in warned[0]


def test_gc_collects_at_once_when_started(table: maps.BpfTable) -> None:
    """The first pass runs when the thread starts, not one interval later: an
    agent restarted more often than its interval (the restart soak: ~8 s
    against 10 s) used to never collect, so the dead entries of closed
    masqueraded connections, which the data path may not take over, held
    their ports until every port was held (nat_exhausted)."""
    now = sessions.monotonic_ns()
    (fk, fx), (rk, rx) = PAIRS["masquerade"]
    put(table, fk, fx, now - 200 * S)  # closed 200 s ago: past TIME_WAIT and the grace
    put(table, rk, rx, now - 200 * S)
    collector = SessionCollector({"nat_sessions": table}, TIMEOUTS, GRACE_S)
    first = threading.Event()
    collect = collector.collect

    def collect_and_tell(now_ns: int | None = None) -> sessions.CollectResult:
        r = collect(now_ns)
        first.set()
        return r

    collector.collect = collect_and_tell  # type: ignore[method-assign]
    gc = SessionGC(collector, 3600, "first").start()
    try:
        assert first.wait(10), "no pass within 10 s of the start (the interval is 1 h)"
    finally:
        gc.stop()
    assert collector.runs == 1 and collector.deleted_total == {"nat_sessions": 2}
    assert keys(table) == set()


def test_agent_metrics_count_the_collected_sessions(table: maps.BpfTable) -> None:
    from types import SimpleNamespace

    from pcn_agent.control.metrics import AgentCollector

    now = sessions.monotonic_ns()
    (fk, fx), (rk, rx) = PAIRS["clusterip"]
    put(table, fk, fx, now - 200 * S)
    put(table, rk, rx, now - 200 * S)
    put(table, *PAIRS["masquerade"][0], now)
    collector = SessionCollector({"lb_sessions": table}, TIMEOUTS, GRACE_S)
    collector.collect(now_ns=now)
    agent = SimpleNamespace(node_name="n1", reconciles=0, reconcile_seconds=[], apply_errors=0,
                            node=SimpleNamespace(session_collector=collector), manager=None)
    samples = {(s.name, s.labels.get("table")): s.value
               for m in AgentCollector(agent).collect() for s in m.samples}
    assert samples[("pcn_sessions_collected_total", "lb_sessions")] == 2
    assert samples[("pcn_sessions", "lb_sessions")] == 1
