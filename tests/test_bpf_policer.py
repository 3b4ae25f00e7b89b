"""The policer cube's program on crafted frames (BPF_PROG_TEST_RUN).

Topology: bridge `b` with ports `a` (veth u1), `b` (u2) and `c` (u3); the
destination MAC of every frame is learned behind `b`. Each test stacks a
policer of its own on the ingress hook of `a` (and `c` for the scope tests);
a frame enters through the entry program of u1 (or u3) and the bridge
forwards what the policer lets through to u2 (TC_ACT_REDIRECT).

There is no clock to control in BPF_PROG_TEST_RUN: the tests use rates so
low that the refill during a test is a small, bounded fraction of a frame,
or read the timestamps the program wrote into the bucket and check the
arithmetic exactly against them.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from bpfunit import ETH_P_IP, IPPROTO_UDP, UnitNet, cube_lab, eth, ipv4, random_mac, udp_csum

from pcn_agent.dataplane import maps
from pcn_agent.dataplane.cubes.bridge import Bridge
from pcn_agent.dataplane.cubes.policer import FP_SHIFT, Policer, PolicerSettings, tbf_params
from pcn_agent.dataplane.runtime import PortState
from pcn_crds.networkfunction import MAX_BURST, MIN_BURST
from pcn_testsupport.testrun import TC_ACT_REDIRECT, TC_ACT_SHOT

pytestmark = [pytest.mark.bpf,
              pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning")]

_names = itertools.count(1)
SLOW = 1_000  # bit/s: 125 bytes a second, an eighth of a 1000-byte frame
FRAME = 1000


@dataclass
class PlcLab:
    net: UnitNet
    b: Bridge
    ports: dict[str, PortState]
    dst_mac: str


@pytest.fixture(scope="module")
def lab() -> Iterator[PlcLab]:
    with cube_lab(("a", "b", "c")) as cl:
        yield PlcLab(cl.net, cl.bridge, cl.ports, cl.dst_mac)


Factory = Callable[..., Policer]


@pytest.fixture
def stack(lab: PlcLab) -> Iterator[Factory]:
    """stack(settings, on=("a",)): a new policer on the ingress hook of the
    named ports, taken off and deleted after the test."""
    made: list[Policer] = []
    rt = lab.net.rt

    def make(settings: PolicerSettings, on: tuple[str, ...] = ("a",)) -> Policer:
        p = Policer(rt, f"plc{next(_names)}", settings)
        made.append(p)
        for port in on:
            rt.set_hook(lab.ports[port], maps.HOOK_INGRESS, [rt.stacked(p.name)])
        return p

    try:
        yield make
    finally:
        for port in lab.ports.values():
            rt.set_hook(port, maps.HOOK_INGRESS, [])
        for p in made:
            p.delete()
            assert p.name not in rt.cubes
            assert p.buckets() == {}


def frame(lab: PlcLab, size: int = FRAME) -> bytes:
    """A UDP frame of exactly `size` bytes (skb->len, what the policer counts)."""
    data = b"x" * (size - 14 - 20 - 8)
    return eth(lab.dst_mac, random_mac(), ETH_P_IP,
               ipv4("10.0.1.1", "10.0.2.1", IPPROTO_UDP, udp_csum("10.0.1.1", "10.0.2.1", 5000,
                                                                   6000, data)))


def send(lab: PlcLab, pkt: bytes, dev: str = "u1") -> bool:
    """True when the frame passed (redirected to u2), False when dropped."""
    res = lab.net.run(lab.net.rt._entry_fds["pcn_ingress"], pkt, ifindex=lab.net.ifindex[dev])
    assert res.retval in (TC_ACT_REDIRECT, TC_ACT_SHOT), res.retval
    if res.retval == TC_ACT_REDIRECT:
        assert res.data == pkt  # a policer never touches the frame
    return res.retval == TC_ACT_REDIRECT


def passes(lab: PlcLab, n: int, size: int = FRAME, dev: str = "u1") -> list[bool]:
    pkt = frame(lab, size)
    return [send(lab, pkt, dev) for _ in range(n)]


# ---------------------------------------------------------------------------- the bucket
def test_a_full_bucket_passes_its_burst_then_drops(lab: PlcLab, stack: Factory) -> None:
    p = stack(PolicerSettings(SLOW, MIN_BURST))
    got = passes(lab, 70)
    full = MIN_BURST // FRAME  # 65 frames of 1000 bytes fit in 65 536
    assert got == [True] * full + [False] * (70 - full)
    c = p.counters()
    assert (c.passed_packets, c.passed_bytes) == (full, full * FRAME)
    assert (c.dropped_packets, c.dropped_bytes) == (70 - full, (70 - full) * FRAME)
    assert lab.net.rt.cube_drops(p.name) == {"rate": 70 - full}
    # what is left: 536 bytes plus a refill of 125 bytes a second
    [left] = p.buckets().values()
    assert MIN_BURST - full * FRAME <= left < MIN_BURST - full * FRAME + 125 * 5


def test_drops_cost_no_tokens_and_size_matters(lab: PlcLab, stack: Factory) -> None:
    stack(PolicerSettings(SLOW, MIN_BURST))
    assert all(passes(lab, MIN_BURST // FRAME))  # 536 bytes left
    assert passes(lab, 3) == [False] * 3  # a 1000-byte frame does not fit ...
    assert passes(lab, 1, size=500) == [True]  # ... a 500-byte one still does
    assert passes(lab, 1, size=500) == [False]  # now 36 bytes (and a refill) are left


def test_a_frame_larger_than_the_burst_never_passes(lab: PlcLab, stack: Factory) -> None:
    p = stack(PolicerSettings(10**12, MIN_BURST))  # refills in 0.5 us: only the size counts
    pkt = frame(lab, 1400)
    assert send(lab, pkt)
    # a frame beyond the burst: the largest test_run accepts is the page, so
    # lower the burst to under one frame instead of growing the frame
    p.configure(PolicerSettings(10**12, 1000))
    assert [send(lab, pkt) for _ in range(3)] == [False] * 3
    assert send(lab, frame(lab, 900))


def test_the_bucket_refills_with_time(lab: PlcLab, stack: Factory) -> None:
    """8 kbit/s refills 1000 bytes a second: after a drained bucket, a second's
    sleep lets about one frame through again, and a full bucket's worth after
    its fill time (coarse: the bounds hold for any scheduling delay under
    several seconds)."""
    p = stack(PolicerSettings(800_000, MIN_BURST))  # 100 bytes/ms; full after 0.66 s
    got = passes(lab, 100)
    assert got[0] and not all(got)  # drained
    time.sleep(1.0)  # more than the fill time: full again
    again = passes(lab, 100)
    assert 65 <= sum(again) < 100, sum(again)
    c = p.counters()
    assert c.passed_packets == sum(got) + sum(again)


# ---------------------------------------------------------------------------- scope
def test_scope_pod_gives_each_port_a_bucket(lab: PlcLab, stack: Factory) -> None:
    p = stack(PolicerSettings(SLOW, MIN_BURST, "pod"), on=("a", "c"))
    full = MIN_BURST // FRAME
    assert sum(passes(lab, 70, dev="u1")) == full
    assert sum(passes(lab, 70, dev="u3")) == full  # its own, full bucket
    assert set(p.buckets()) == {lab.ports["a"].id, lab.ports["c"].id}


def test_buckets_of_ports_it_left_are_forgotten(lab: PlcLab, stack: Factory) -> None:
    p = stack(PolicerSettings(SLOW, MIN_BURST, "pod"), on=("a", "c"))
    passes(lab, 1, dev="u1")
    passes(lab, 1, dev="u3")
    assert p.keep_buckets({lab.ports["a"].id, lab.ports["c"].id}) == 0
    assert p.keep_buckets({lab.ports["a"].id}) == 1  # c's pod went
    assert set(p.buckets()) == {lab.ports["a"].id}
    shared = stack(PolicerSettings(SLOW, MIN_BURST, "shared"), on=("a",))
    passes(lab, 1, dev="u1")
    assert shared.keep_buckets(set()) == 0 and set(shared.buckets()) == {0}


def test_scope_shared_gives_all_ports_one_bucket(lab: PlcLab, stack: Factory) -> None:
    p = stack(PolicerSettings(SLOW, MIN_BURST, "shared"), on=("a", "c"))
    assert sum(passes(lab, 40, dev="u1")) == 40
    assert sum(passes(lab, 40, dev="u3")) == MIN_BURST // FRAME - 40  # the rest of it
    assert set(p.buckets()) == {0}
    p.configure(PolicerSettings(SLOW, MIN_BURST, "pod"))  # new meaning: fresh buckets
    assert p.buckets() == {}
    assert sum(passes(lab, 70, dev="u3")) == MIN_BURST // FRAME


# ---------------------------------------------------------------------------- arithmetic
@pytest.mark.parametrize("rate,burst", [(10_000, MIN_BURST), (10**12, MAX_BURST),
                                        (10**15, MAX_BURST), (1_000, MAX_BURST)])
def test_refill_arithmetic_is_exact_and_does_not_overflow(lab: PlcLab, stack: Factory,
                                                          rate: int, burst: int) -> None:
    """An empty bucket whose last refill was `ago` ns before now: after one
    frame, the bucket holds exactly (now - last) * rate_fp - cost (or the
    burst minus the cost when that is more than full), `now` being the
    timestamp the program wrote. At 1e12 and 1e15 bit/s with a 1 GiB burst
    the products come close to 2^63; at 10 kbit/s a refill of 0.1 s is 125
    bytes and its fraction of a byte is kept."""
    p = stack(PolicerSettings(rate, burst))
    params = tbf_params(rate, burst)
    assert 2 * params.burst_fp + params.rate_fp < 2**64  # pcn_tbf.h's bound
    buckets = lab.net.rt.table("plc_buckets", "policer")
    key = maps.PlcKey(p.cube.id, lab.ports["a"].id)
    for ago in (params.fill_ns // 2, params.fill_ns - 1, 10**18):
        cost = 60 if rate < 10**6 else FRAME
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) - min(ago, 10**9 * 3600)
        if ago == 10**18:
            before = 1  # idle since boot: dt far beyond anything a product could hold
        buckets[key] = maps.Tbf(0, 0, 0, before)
        passed = send(lab, frame(lab, cost))
        b = buckets[key]
        dt = b.last_ns - before
        refill = params.burst_fp if dt >= params.fill_ns else dt * params.rate_fp
        want = min(refill, params.burst_fp)
        if want >= cost << FP_SHIFT:
            assert passed and b.tokens_fp == want - (cost << FP_SHIFT), (ago, dt)
        else:
            assert not passed and b.tokens_fp == want, (ago, dt)


def test_fixed_point_precision() -> None:
    for rate in (1_000, 10_000, 10**6, 10**9, 10**12, 10**15):
        params = tbf_params(rate, MIN_BURST)
        exact = rate * 2**29 / 1e9
        assert abs(params.rate_fp - exact) <= 0.5
        assert abs(params.rate_fp - exact) / exact < (1e-3 if rate == 1_000 else 1e-4)
        assert params.fill_ns * params.rate_fp >= params.burst_fp
    with pytest.raises(ValueError):
        tbf_params(999, MIN_BURST)
    with pytest.raises(ValueError):
        tbf_params(10**6, MAX_BURST + 1)


def test_adopted_policer_keeps_its_settings(lab: PlcLab, stack: Factory) -> None:
    p = stack(PolicerSettings(5 * 10**6, 2 * MIN_BURST, "shared"))
    again = Policer(lab.net.rt, p.name)
    assert again.settings == p.settings and again.cube is p.cube
