"""The policer's accuracy (issue 12, item 2): iperf3 through a policer at 10,
100 and 1 000 Mbit/s, the measured rate over the configured one, target 0.95
to 1.05.

Scenario `policer-rate`: one lab node, a pair of pods (client, server) per
variant. A variant `pcn-RATE-SIDE` has a policer NetworkFunction of RATE with
the default burst (half a second of the rate, crds/networkfunction.py
default_burst), scope pod, on its server's `ingress` side (traffic to the
server: its port's egress hook) or on its client's `egress` side (traffic
from the client: its port's ingress hook), put there by the agent's own
path (DataplaneManager.apply of the FunctionSpecs and chains that
desired_state makes of the objects). Variants `udp-RATE` (10M and 100M)
are the ingress policers' pairs again, with iperf3 UDP offered at twice the
rate in 1400-byte datagrams; not at 1G: one iperf3 UDP sender offers 200 to
300 Mbit/s on the 2-vCPU VM, so the policer would never bite.

Measured, rounds interleaved over all variants (a round runs each variant
once, starting with a different one each round): iperf3 for WARMUP_S
(slow start, and the full bucket a new flow starts with: left out, iperf3
-O) then measure_seconds(ctx.duration): at least MIN_MEASURE_S, as a
bucket lets a window of T seconds see up to burst / (rate * T) more than
the rate (a flow that stalled, on a retransmission timeout or a
descheduled sender, saved tokens it spends when it resumes, as it may):
with the default burst (0.5 s of the rate) that is 5 % over 10 s, the
target's tolerance. Per run:
 - the goodput ratio: iperf3's received bit/s over the rate; for TCP, the
   figure the target applies to (a GSO packet's headers count once in the
   bucket, so goodput and frames differ by under 1 %);
 - the wire ratio: the policer's own passed bytes (frames with their
   Ethernet header, bpf/policer.c) over a window inside the measured
   seconds, read from its counters, over the rate: what the bucket let
   through, whatever TCP made of it. A policer can never pass more than
   rate * window + burst; UDP offered above the rate shows the bucket's
   arithmetic alone. Its goodput ratio is 1400/1442 of the frames' at most
   and lower on a busy machine (the receiving iperf3 falls behind and its
   socket drops what the policer passed): the wire ratio is the policer's.

`short-burst-1G` is the 1G ingress pair's policer again with a burst of
SHORT_BURST_S of the rate, below Linux TCP's minimum retransmission
timeout (200 ms): when the bucket runs dry, a sender far faster than the
rate loses its whole window and its retransmissions, and waits for a
timeout, during which the bucket refills only up to its burst; such a flow
gets about one burst per timeout (0.5 of the rate here), which is why the
default burst is half a second.

References measured in the same run, to tell the policer from the rest:
 - `pcn-unpoliced`: a pair without policer, TCP: what the machine carries
   through pcn at this load (a policed flow cannot exceed it; at 1G on a
   busy 2-core machine it may be near the rate);
 - `tbf-RATE`: two namespaces joined by a veth pair with the tc `tbf` qdisc
   on the client's end at RATE, the same burst, and a queue of 25 ms of the
   rate plus the burst: what the reference `bandwidth` CNI plugin does
   (plugins/meta/bandwidth, createTBF: a shaper, packets wait in the queue
   instead of being dropped, so TCP sees delay, not loss).

The results are medians over the runs (metrics tcp-ratio or udp-ratio,
wire-ratio, and the references' throughput); the acceptance line gives
every pcn TCP ratio against 0.95-1.05.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from pcn_agent.control.manager import DataplaneManager
from pcn_agent.control.reconcile import Desired, FunctionSpec, cube_name
from pcn_agent.dataplane.cubes.functions import PolicerFunction
from pcn_agent.dataplane.cubes.policer import PolicerCounters, PolicerSettings, human_rate
from pcn_crds.networkfunction import DEFAULT_BURST_S, default_burst

from . import iperf
from .netns import exec_in, popen_in, stop
from .references import Endpoint, veth_pair
from .results import THROUGHPUT, Result, now_iso
from .scenarios import MTU, Context

POLICER_RATE = "policer-rate"
MBIT = 1_000_000
RATES = (10 * MBIT, 100 * MBIT, 1000 * MBIT)
SIDES = ("ingress", "egress")
TARGET_LOW, TARGET_HIGH = 0.95, 1.05
WARMUP_S = 3  # iperf3 -O: slow start and the new flow's full bucket
UDP_PORT = 5302
UDP_RATES = RATES[:2]  # see the module docstring: not 1G
MIN_MEASURE_S = DEFAULT_BURST_S / (TARGET_HIGH - 1)  # 10 s: see the module docstring
SHORT_BURST_S = 0.1
SHORT_BURST = "short-burst-1G"
UDP_PAYLOAD = 1400  # bytes a datagram: 1442-byte frames at the lab's MTU
UDP_OFFERED = 2.0  # times the rate
# The policer's counters are read inside the measured seconds, this far from
# either end: our timer and iperf3's start a few ms apart.
WINDOW_MARGIN_S = 0.25
TBF_LATENCY_S = 0.025  # the bandwidth plugin's latencyInMillis
NAMESPACE = "bench"
UNPOLICED = "pcn-unpoliced"
TCP_RATIO, UDP_RATIO, WIRE_RATIO = "tcp-ratio", "udp-ratio", "wire-ratio"


def rate_name(rate: int) -> str:
    """10000000 -> '10M', 1000000000 -> '1G'."""
    return human_rate(rate).removesuffix("bit/s")


def measure_seconds(duration: float) -> float:
    """The measured seconds of a run: `duration` (bench --duration), at
    least MIN_MEASURE_S."""
    return max(duration, MIN_MEASURE_S)


def variant(rate: int, side: str) -> str:
    return f"pcn-{rate_name(rate)}-{side}"


def udp_variant(rate: int) -> str:
    return f"udp-{rate_name(rate)}"


def tbf_variant(rate: int) -> str:
    return f"tbf-{rate_name(rate)}"


@dataclass
class Case:
    """One variant: iperf3 from `client` to `server`, TCP or UDP at
    UDP_OFFERED times `rate`; `counters` reads its policer's (None: no
    policer); `before` runs before each of its runs."""

    name: str
    rate: int | None
    client: Endpoint
    server: Endpoint
    udp: bool = False
    counters: Callable[[], PolicerCounters] | None = None
    before: Callable[[], None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sample:
    """One run: goodput (bit/s, iperf3's receiver), the policer's passed
    frames in bit/s over the window (None without a policer), TCP
    retransmits, the policer's drops over the whole run, UDP loss (%)."""

    goodput_bps: float
    wire_bps: float | None
    retransmits: int | None
    dropped_packets: int | None
    lost_percent: float | None


def _goodput(end: dict[str, Any], udp: bool) -> tuple[float, float | None]:
    """(received bit/s, UDP loss %) from iperf3's JSON `end`. For UDP, iperf3
    3.12's `sum` is the sender's rate and the receiver's loss; later ones
    have `sum_received`."""
    if not udp:
        return float(end["sum_received"]["bits_per_second"]), None
    if "sum_received" in end:
        return (float(end["sum_received"]["bits_per_second"]),
                float(end["sum"].get("lost_percent", 0.0)))
    s = end["sum"]
    lost = float(s.get("lost_percent", 0.0))
    return float(s["bits_per_second"]) * (1 - lost / 100), lost


def run_once(case: Case, duration: float) -> Sample:
    """One iperf3 run of `case`: WARMUP_S left out, then `duration` s; the
    policer's counters read at WARMUP_S + WINDOW_MARGIN_S and at the end of
    the measured seconds minus WINDOW_MARGIN_S. RuntimeError when iperf3
    fails."""
    port = UDP_PORT if case.udp else iperf.PORT
    argv = ["iperf3", "-c", case.server.ip, "-p", str(port), "-J", "-t", f"{duration:g}",
            "-O", str(WARMUP_S)]
    if case.udp:
        assert case.rate is not None
        argv += ["-u", "-b", str(int(case.rate * UDP_OFFERED)), "-l", str(UDP_PAYLOAD)]
    start = case.counters() if case.counters else None
    proc = popen_in(case.client.netns, argv)
    wire: float | None = None
    try:
        if case.counters is not None:
            time.sleep(WARMUP_S + WINDOW_MARGIN_S)
            c0, t0 = case.counters(), time.monotonic()
            time.sleep(max(0.5, duration - 2 * WINDOW_MARGIN_S))
            c1, t1 = case.counters(), time.monotonic()
            wire = (c1.passed_bytes - c0.passed_bytes) * 8 / (t1 - t0)
        out, err = proc.communicate(timeout=duration + WARMUP_S + 30)
    finally:
        stop(proc)
    end = iperf.report_end(f"{POLICER_RATE}/{case.name}: iperf3 client in {case.client.netns}",
                           proc.returncode, out, err)
    goodput, lost = _goodput(end, case.udp)
    dropped = None
    if case.counters is not None and start is not None:
        dropped = case.counters().dropped_packets - start.dropped_packets
    retr = None if case.udp else int(end["sum_sent"].get("retransmits", 0))
    return Sample(goodput, wire, retr, dropped, lost)


def _policers(lab_node: Any, pairs: dict[str, tuple[str, str]]
              ) -> tuple[DataplaneManager, dict[str, str]]:
    """The policers of every `pcn-RATE-SIDE` pair and SHORT_BURST's in force through
    DataplaneManager.apply, as the agent applies NetworkFunctions and their
    chains; returns the manager and each variant's cube name."""
    functions: dict[str, FunctionSpec] = {}
    chains: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
    names: dict[str, str] = {}
    for rate in RATES:
        for side in SIDES:
            v = variant(rate, side)
            cn = cube_name(NAMESPACE, v)
            names[v] = cn
            functions[cn] = FunctionSpec("policer", PolicerSettings(rate, default_burst(rate)))
            client, server = pairs[v]
            # chains: (the port's ingress hook: from the pod, its egress hook: to it)
            if side == "ingress":
                chains[server] = ((), (cn,))
            else:
                chains[client] = ((cn,), ())
    # SHORT_BURST's pair: 1G on its server's ingress, a burst of SHORT_BURST_S
    short = cube_name(NAMESPACE, SHORT_BURST)
    names[SHORT_BURST] = short
    giga = int(RATES[-1])
    functions[short] = FunctionSpec("policer", PolicerSettings(giga, int(giga * SHORT_BURST_S)
                                                               // 8))
    chains[pairs[SHORT_BURST][1]] = ((), (short,))
    manager = DataplaneManager(lab_node)
    report = manager.apply(Desired(functions=functions, chains=chains))
    if report.errors:
        raise RuntimeError(f"{POLICER_RATE}: applying the policers failed: {report.errors}")
    return manager, names


def _counters_of(manager: DataplaneManager, cube: str) -> Callable[[], PolicerCounters]:
    fn = manager.functions[cube]
    if not isinstance(fn, PolicerFunction):
        raise RuntimeError(f"{cube} is a {type(fn).__name__}, not a policer")
    return fn.policer.counters


def _tbf(netns: str, rate: int) -> Callable[[], None]:
    """Put the bandwidth plugin's tbf on `netns`'s eth0 at `rate` (replacing
    the previous one): rate, burst, and a queue of TBF_LATENCY_S of the rate
    plus the burst (createTBF's limit)."""
    burst = default_burst(rate)
    limit = int(rate / 8 * TBF_LATENCY_S) + burst

    def apply() -> None:
        exec_in(netns, ["tc", "qdisc", "replace", "dev", "eth0", "root", "tbf",
                        "rate", f"{rate}bit", "burst", str(burst), "limit", str(limit)])
    return apply


def _server_ping(case: Case) -> None:
    ping = exec_in(case.client.netns, ["ping", "-c", "3", "-i", "0.2", "-W", "2",
                                       case.server.ip], check=False)
    if ping.returncode != 0:
        raise RuntimeError(f"{POLICER_RATE}/{case.name}: {case.client.netns} cannot reach "
                           f"{case.server.ip}:\n{ping.stdout}")


def policer_rate(ctx: Context) -> list[Result]:
    names = [*(variant(r, s) for r in RATES for s in SIDES), SHORT_BURST, UNPOLICED]
    with ExitStack() as st:
        lab, pairs, ep = ctx.pair_lab(st, names)
        node = lab.node(1)
        manager, cubes = _policers(node, pairs)
        st.callback(lambda: manager.apply(Desired()))
        ctx.progress(f"{POLICER_RATE}: {len(cubes)} policers in force, default bursts "
                     + ", ".join(f"{rate_name(r)} {default_burst(r)} B" for r in RATES))
        cases: list[Case] = []
        for rate in RATES:
            for side in SIDES:
                v = variant(rate, side)
                client, server = pairs[v]
                cases.append(Case(v, rate, ep[client], ep[server],
                                  counters=_counters_of(manager, cubes[v]),
                                  extra={"side": side, "burst_bytes": default_burst(rate)}))
        for rate in UDP_RATES:
            client, server = pairs[variant(rate, "ingress")]
            cases.append(Case(udp_variant(rate), rate, ep[client], ep[server], udp=True,
                              counters=_counters_of(manager, cubes[variant(rate, "ingress")]),
                              extra={"side": "ingress", "burst_bytes": default_burst(rate),
                                     "offered_bit_s": int(rate * UDP_OFFERED),
                                     "datagram_bytes": UDP_PAYLOAD}))
        client, server = pairs[SHORT_BURST]
        giga = int(RATES[-1])
        cases.append(Case(SHORT_BURST, giga, ep[client], ep[server],
                          counters=_counters_of(manager, cubes[SHORT_BURST]),
                          extra={"side": "ingress", "burst_bytes": int(giga * SHORT_BURST_S) // 8,
                                 "what": "a burst below TCP's minimum retransmission timeout"}))
        client, server = pairs[UNPOLICED]
        cases.append(Case(UNPOLICED, None, ep[client], ep[server],
                          extra={"path": "pod -> pcn bridge -> pod, no policer"}))
        a, b = veth_pair(ctx.nss, MTU)
        for e in (a, b):
            st.callback(ctx.nss.remove, e.netns)
        for rate in RATES:
            cases.append(Case(tbf_variant(rate), rate, a, b, before=_tbf(a.netns, rate),
                              extra={"path": "veth pair, tc tbf on the sender's end (the "
                                             "bandwidth CNI plugin's shaper)",
                                     "burst_bytes": default_burst(rate),
                                     "limit_bytes": int(rate / 8 * TBF_LATENCY_S)
                                     + default_burst(rate)}))
        for netns in sorted({c.server.netns for c in cases}):
            st.callback(stop, iperf.start_server(netns, ctx.pinning))
            if any(c.udp and c.server.netns == netns for c in cases):
                st.callback(stop, iperf.start_server(netns, ctx.pinning, UDP_PORT))
        for c in cases:
            _server_ping(c)
        samples = _measure(ctx, cases)
    return _results(ctx, cases, samples)


def _measure(ctx: Context, cases: list[Case]) -> dict[str, list[Sample]]:
    seconds = measure_seconds(ctx.duration)
    ctx.progress(f"{POLICER_RATE}: {ctx.runs} rounds of {len(cases)} x {seconds:g} s "
                 f"(+{WARMUP_S} s warm-up)")
    out: dict[str, list[Sample]] = {c.name: [] for c in cases}
    for i in range(ctx.runs):
        for k in range(len(cases)):
            c = cases[(i + k) % len(cases)]
            if c.before is not None:
                c.before()
            # the tbf cases share one server, back to back: the previous test must be over
            iperf.wait_idle(c.server.netns, UDP_PORT if c.udp else iperf.PORT)
            s = run_once(c, seconds)
            out[c.name].append(s)
            if c.rate is None:
                ctx.progress(f"{POLICER_RATE}/{c.name}: run {i + 1}/{ctx.runs}: "
                             f"{s.goodput_bps / 1e9:.2f} Gbit/s ({s.retransmits} retransmits)")
                continue
            wire = f", wire {s.wire_bps / c.rate:.3f}" if s.wire_bps is not None else ""
            tail = (f"lost {s.lost_percent:.1f}%" if c.udp else f"{s.retransmits} retransmits")
            drops = f", {s.dropped_packets} dropped" if s.dropped_packets is not None else ""
            ctx.progress(f"{POLICER_RATE}/{c.name}: run {i + 1}/{ctx.runs}: "
                         f"{s.goodput_bps / MBIT:.2f} Mbit/s = {s.goodput_bps / c.rate:.3f} "
                         f"of {rate_name(c.rate)}{wire} ({tail}{drops})")
    return out


def _results(ctx: Context, cases: list[Case], samples: dict[str, list[Sample]]) -> list[Result]:
    out: list[Result] = []
    for c in cases:
        runs = samples[c.name]
        common: dict[str, Any] = {"stat": "median", "runs_n": len(runs),
                                  "duration_s": measure_seconds(ctx.duration),
                                  "warmup_s": WARMUP_S,
                                  "mtu": MTU, "date": now_iso(), **c.extra}
        if c.rate is None:
            gbps = [s.goodput_bps / 1e9 for s in runs]
            out.append(Result(POLICER_RATE, c.name, THROUGHPUT, statistics.median(gbps),
                              "Gbit/s", {**common, "runs": [round(x, 3) for x in gbps],
                                         "retransmits": [s.retransmits for s in runs]}))
            continue
        common["rate_bit_s"] = c.rate
        ratios = [s.goodput_bps / c.rate for s in runs]
        detail: dict[str, Any] = {"runs": [round(x, 4) for x in ratios],
                                  "goodput_bit_s": [round(s.goodput_bps) for s in runs],
                                  "target": [TARGET_LOW, TARGET_HIGH]}
        if c.udp:
            detail["lost_percent"] = [s.lost_percent for s in runs]
        else:
            detail["retransmits"] = [s.retransmits for s in runs]
        if c.counters is not None:
            detail["dropped_packets"] = [s.dropped_packets for s in runs]
        out.append(Result(POLICER_RATE, c.name, UDP_RATIO if c.udp else TCP_RATIO,
                          statistics.median(ratios), "x", {**common, **detail}))
        wires = [s.wire_bps / c.rate for s in runs if s.wire_bps is not None]
        if wires:
            out.append(Result(POLICER_RATE, c.name, WIRE_RATIO, statistics.median(wires), "x",
                              {**common, "runs": [round(x, 4) for x in wires],
                               "what": "the policer's passed frames (Ethernet header "
                                       "included, a GSO packet's headers once) over the "
                                       "measured window, bit/s over the rate"}))
    return out


SCENARIOS: dict[str, Callable[[Context], list[Result]]] = {POLICER_RATE: policer_rate}
