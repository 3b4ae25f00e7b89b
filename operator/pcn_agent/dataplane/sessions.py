"""Session lifetimes and the sessions' garbage collector.

The data path (bpf/include/pcn_session.h) gives every connection it
translates a state, advanced by the packets of both directions as Linux
conntrack does, and treats a connection silent for longer than its state's
lifetime as over: absent for its own ports, its masquerading port free for
another connection. This module writes those lifetimes (`write_config`) and
removes what is over from the session tables (`SessionCollector`, run every
few seconds by `SessionGC`), in the manner of Cilium's conntrack GC
(pkg/maps/ctmap/gc): a walk of the table, deleting entries whose lifetime has
passed, both directions of a connection.

Rules shared with the C, which this module mirrors:

* a connection is two entries (`peer_key` names the other direction's); it
  is live while either of them saw a packet within the lifetime of the state
  (`lifetime_slot`), which both entries share;
* past its lifetime, an entry is *expired* for `grace` seconds: the data path
  may give its port to a new connection (it claims the entry with a
  compare-and-swap of `seen_ns`); after that it is *dead*, and the data
  path no longer reuses it. The collector deletes dead entries only, so it
  never deletes what the data path just gave to a new connection; it
  re-reads each entry just before deleting it, which leaves a window of
  microseconds to the one other writer: a packet that opens a new
  connection on the very same ports, rewriting the entry in place;
* a TCP connection that both sides closed (TIME_WAIT) or reset may also give
  its port to a new TCP connection before its lifetime ends, when no other
  port is free (k8sdispatcher.c's disp_take_over, pcn_lb.h's
  pcn_lb_take_over for the lbrp's masquerading): the collector does not
  take part in that.
"""

from __future__ import annotations

import ctypes as ct
import enum
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import astuple, dataclass, field, fields

from pcn_agent.dataplane import maps

log = logging.getLogger(__name__)

TCP, UDP, ICMP = 6, 17, 1
NS_PER_S = 1_000_000_000
MAX_LIFETIME_S = 30 * 86400  # a bound for configuration mistakes, not for the data path


class Kind(enum.IntEnum):
    """PCN_SESS_*: odd kinds translate the opening direction, even ones replies
    (and LB_HAIRPIN_REV, a reply looked up on the opening side's hook)."""

    LB = 1
    LB_REV = 2
    SNAT = 3
    SNAT_REV = 4
    NODEPORT = 5
    NODEPORT_REV = 6
    LB_HAIRPIN_REV = 7  # the reply half of a hairpin connection, paired with LB


class State(enum.IntEnum):
    """PCN_CT_*, conntrack's TCP states (LAST_ACK with TIME_WAIT's lifetime).
    UDP and ICMP use the first three values as unreplied, replied and (UDP)
    stream."""

    NONE = 0
    SYN_SENT = 1
    SYN_RECV = 2
    ESTABLISHED = 3
    FIN_WAIT = 4
    CLOSE_WAIT = 5
    TIME_WAIT = 6
    CLOSE = 7
    LAST_ACK = 8


UNREPLIED, REPLIED, STREAM = State.SYN_SENT, State.SYN_RECV, State.ESTABLISHED


class Age(enum.IntEnum):
    """PCN_AGE_*: how an entry or a connection stands at a given time."""

    LIVE = 0
    EXPIRED = 1
    DEAD = 2


@dataclass(frozen=True)
class SessionTimeouts:
    """How long a connection lives without a packet, in seconds, by protocol
    and state: the slots of pcn_session_cfg.lifetime_ns, in order.

    Defaults are Linux conntrack's (Documentation/networking/
    nf_conntrack-sysctl.rst: nf_conntrack_tcp_timeout_*, _udp_timeout,
    _udp_timeout_stream, _icmp_timeout), with kube-proxy's values for the two
    it sets (--conntrack-tcp-timeout-established 24h,
    --conntrack-tcp-timeout-close-wait 1h). Raises ValueError for a value
    that is not a positive number of seconds up to 30 days."""

    tcp_syn_sent: float = 120
    tcp_syn_recv: float = 60
    tcp_established: float = 86400
    tcp_fin_wait: float = 120
    tcp_close_wait: float = 3600
    tcp_time_wait: float = 120
    tcp_close: float = 10
    udp: float = 30
    udp_stream: float = 120
    icmp: float = 30

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) \
                    or not 0 < v <= MAX_LIFETIME_S:
                raise ValueError(f"session lifetime {f.name}={v!r}: must be a number of "
                                 f"seconds above 0 and at most {MAX_LIFETIME_S}")

    def slots_ns(self) -> list[int]:
        """The lifetimes in nanoseconds, in slot order (pcn_session.h PCN_LT_*)."""
        return [max(1, round(v * NS_PER_S)) for v in astuple(self)]


assert len(fields(SessionTimeouts)) == maps.LIFETIMES


def lifetime_slot(proto: int, state: int) -> int:
    """pcn_session_slot: which lifetime applies to a connection of `proto` in
    `state`. States recorded before sessions had any (NONE) get the long one."""
    if proto == TCP:
        if state == State.LAST_ACK:
            return 5
        return 2 if state == State.NONE or state > State.CLOSE else state - 1
    if proto == UDP:
        return 7 if state in (UNREPLIED, REPLIED) else 8
    return 9


def write_config(table: maps.BpfTable, timeouts: SessionTimeouts, grace_s: float) -> None:
    """Give the data path its lifetimes and grace (session_cfg, one entry).
    `grace_s` 0 means no collector runs: the data path may then take over any
    expired entry."""
    if grace_s < 0:
        raise ValueError(f"session grace {grace_s!r} must not be negative")
    cfg = maps.SessionCfg()
    for i, ns in enumerate(timeouts.slots_ns()):
        cfg.lifetime_ns[i] = ns
    cfg.grace_ns = round(grace_s * NS_PER_S)
    table[ct.c_uint32(0)] = cfg


# ---------------------------------------------------------------------- the rules, as in C
FlowKey = tuple[int, int, int, int, int]  # saddr, daddr, sport, dport, proto as the map holds them


def flow_key(k: maps.Flow) -> FlowKey:
    """A session key as a hashable tuple (the map's raw network-order ints)."""
    return (k.saddr, k.daddr, k.sport, k.dport, k.proto)


def peer_key(k: FlowKey, x: maps.Xlate) -> FlowKey:
    """pcn_session_peer_key: the other direction's entry of the connection
    that `x` (found at `k`) translates: the reply to `k` once translated."""
    saddr, daddr, sport, dport, proto = k
    if x.is_src:
        saddr, sport = x.ip, x.port
        if x.ip2:
            daddr, dport = x.ip2, x.port2
    else:
        daddr, dport = x.ip, x.port
        if x.ip2:
            saddr, sport = x.ip2, x.port2
    if proto == ICMP:  # an echo's identifier is both of its "ports"
        sport = dport = x.port2 if x.ip2 else x.port
    return (daddr, saddr, dport, sport, proto)


def kinds_pair(kind: int, peer: int) -> bool:
    """pcn_session_kinds_pair: LB <-> LB_REV, SNAT <-> SNAT_REV, NODEPORT <->
    NODEPORT_REV, and LB <-> LB_HAIRPIN_REV."""
    if Kind.LB_HAIRPIN_REV in (kind, peer):
        return kind + peer == Kind.LB + Kind.LB_HAIRPIN_REV
    return peer == (kind + 1 if kind & 1 else kind - 1)


def paired(k: FlowKey, x: maps.Xlate, pk: FlowKey, peer: maps.Xlate | None) -> bool:
    """pcn_session_paired: `peer` (at `pk`) is the other half of `x`'s
    connection, not an entry of a later one that reuses the ports."""
    return peer is not None and kinds_pair(x.kind, peer.kind) and peer_key(pk, peer) == k


@dataclass(frozen=True)
class Clock:
    """What decides an entry's age: the lifetimes, the grace, and now
    (CLOCK_MONOTONIC, which bpf_ktime_get_ns reads)."""

    lifetimes_ns: tuple[int, ...]
    grace_ns: int
    now_ns: int

    def age(self, proto: int, x: maps.Xlate) -> Age:
        """pcn_session_age."""
        idle = since(x.seen_ns, self.now_ns)
        life = self.lifetimes_ns[lifetime_slot(proto, x.state)]
        if idle <= life:
            return Age.LIVE
        if self.grace_ns and idle - life > self.grace_ns:
            return Age.DEAD
        return Age.EXPIRED

    def pair_age(self, k: FlowKey, x: maps.Xlate, entries: Mapping[FlowKey, maps.Xlate]) -> Age:
        """pcn_session_pair_age: the younger direction decides."""
        age = self.age(k[4], x)
        if age == Age.LIVE:
            return age
        pk = peer_key(k, x)
        peer = entries.get(pk)
        if peer is None or not paired(k, x, pk, peer):
            return age
        return min(age, self.age(k[4], peer))


def since(seen_ns: int, now_ns: int) -> int:
    """pcn_since: now - seen as the C computes it, a 64-bit difference read
    as signed (negative when another CPU wrote a later time than `now_ns`)."""
    d = (now_ns - seen_ns) & (2**64 - 1)
    return d - 2**64 if d >= 2**63 else d


def monotonic_ns() -> int:
    """Now on the data path's clock (bpf_ktime_get_ns: CLOCK_MONOTONIC), in ns."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


# ---------------------------------------------------------------------- the collector
@dataclass
class CollectResult:
    """One pass over the session tables: entries found and deleted per table
    (by its map name), and the entries left expired or live."""

    scanned: dict[str, int] = field(default_factory=dict)
    deleted: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def total_deleted(self) -> int:
        return sum(self.deleted.values())


class SessionCollector:
    """Deletes the dead sessions of `tables` (map name -> table: lb_sessions,
    nat_sessions), both directions of each connection. `grace_s` must be the
    one written with `write_config` (how long the data path may still take
    over an expired entry)."""

    def __init__(self, tables: Mapping[str, maps.BpfTable], timeouts: SessionTimeouts,
                 grace_s: float) -> None:
        if grace_s <= 0:
            raise ValueError("the collector needs a grace above 0 (see write_config)")
        self.tables = dict(tables)
        self.timeouts = timeouts
        self.grace_ns = round(grace_s * NS_PER_S)
        self.deleted_total: dict[str, int] = {name: 0 for name in self.tables}
        self.runs = 0
        self.last: CollectResult | None = None

    def collect(self, now_ns: int | None = None) -> CollectResult:
        """One pass at `now_ns` (CLOCK_MONOTONIC nanoseconds; default: now).
        A later `now_ns` makes time pass for the lifetimes, which tests use."""
        start = time.monotonic()
        clock = Clock(tuple(self.timeouts.slots_ns()), self.grace_ns,
                      monotonic_ns() if now_ns is None else now_ns)
        result = CollectResult()
        for name, table in self.tables.items():
            entries = _snapshot(table)
            result.scanned[name] = len(entries)
            dead = [k for k, x in entries.items() if clock.pair_age(k, x, entries) == Age.DEAD]
            result.deleted[name] = sum(_delete_if_unchanged(table, k, entries[k]) for k in dead)
            self.deleted_total[name] += result.deleted[name]
        result.seconds = time.monotonic() - start
        self.runs += 1
        self.last = result
        return result


def _snapshot(table: maps.BpfTable) -> dict[FlowKey, maps.Xlate]:
    """Every entry of a session table, copied (one batch syscall per few
    thousand entries where the kernel and BCC have them)."""
    batch: Callable[[], object] | None = getattr(table, "items_lookup_batch", None)
    out: dict[FlowKey, maps.Xlate] = {}
    try:
        items = batch() if batch is not None else table.items()
        for k, v in items:  # type: ignore[attr-defined]
            out[flow_key(k)] = maps.Xlate.from_buffer_copy(v)
    except Exception as exc:  # e.g. a kernel without batch lookups: one by one
        if batch is None:
            raise
        log.debug("batch lookup failed (%s); walking the table", exc)
        out = {flow_key(k): maps.Xlate.from_buffer_copy(v) for k, v in table.items()}
    return out


def _delete_if_unchanged(table: maps.BpfTable, k: FlowKey, seen: maps.Xlate) -> bool:
    """Delete `k` unless its entry changed since the snapshot (a packet of a
    new connection wrote it): True when deleted."""
    key = maps.Flow(k[0], k[1], k[2], k[3], k[4])
    try:
        now = table[key]
    except KeyError:
        return False
    if bytes(now) != bytes(seen):
        return False
    return maps.discard(table, key)


class SessionGC:
    """Runs a SessionCollector every `interval_s` seconds in a thread of its
    own until stop(). A failing pass is logged and the next one runs."""

    def __init__(self, collector: SessionCollector, interval_s: float, name: str = "") -> None:
        if interval_s <= 0:
            raise ValueError(f"session GC interval {interval_s!r} must be above 0")
        self.collector = collector
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._name = name

    def start(self) -> SessionGC:
        """Start the thread (idempotent). The first pass runs at once, then one
        every interval: an agent that adopts a running data plane collects what
        became dead while no agent ran, and one restarted more often than the
        interval (a crash loop, the restart soak's ~8 s) still collects. The
        data path never takes over a dead entry (past its lifetime and the
        grace: it may be deleted under it), so without these passes the
        masquerading ports of closed connections are never freed and new
        connections are dropped as nat_exhausted once the range is used."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=f"pcn-session-gc-{self._name}",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and wait for a pass under way (at most 10 s)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        lagging = False
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                r = self.collector.collect()
                if r.total_deleted:
                    log.debug("session GC: %s deleted of %s scanned in %.0f ms", r.deleted,
                              r.scanned, r.seconds * 1000)
                slow = r.seconds > self.interval_s
                if slow and not lagging:
                    log.warning(
                        "session GC: a pass over %s entries took %.1f s, longer than its "
                        "interval of %.1f s, which is also the grace: connections that are "
                        "over hold their masquerading ports until a pass removes them, so "
                        "new connections may find none free (nat_exhausted drops); raise "
                        "sessionGCInterval in the pcn ConfigMap", sum(r.scanned.values()),
                        r.seconds, self.interval_s)
                lagging = slow
            except Exception:  # a table gone mid-walk (shutdown): try again next time
                log.exception("session garbage collection failed")
            if self._stop.wait(next_pass_in(self.interval_s, time.monotonic() - start)):
                return


def next_pass_in(interval_s: float, took_s: float) -> float:
    """Seconds from the end of a pass that took `took_s` to the next: passes
    start every `interval_s`, so that an entry past its grace waits at most
    about one interval to be removed however long a pass takes, and at least
    a tenth of the interval passes between two (a pass longer than the
    interval must not keep a CPU busy)."""
    return max(interval_s - took_s, interval_s / 10)
