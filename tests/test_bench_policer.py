"""The pure parts of the policer-rate benchmark (bench.policer's names and
iperf3 parsing, bench.results' acceptance line): no kernel, no timing."""

from __future__ import annotations

import pytest

from bench.policer import (
    MIN_MEASURE_S,
    POLICER_RATE,
    RATES,
    SHORT_BURST,
    TCP_RATIO,
    UDP_RATIO,
    WIRE_RATIO,
    _goodput,
    measure_seconds,
    rate_name,
    tbf_variant,
    udp_variant,
    variant,
)
from bench.results import THROUGHPUT, Result, acceptance


def test_names() -> None:
    assert [rate_name(r) for r in RATES] == ["10M", "100M", "1G"]
    assert variant(10**9, "egress") == "pcn-1G-egress"
    assert udp_variant(10**7) == "udp-10M" and tbf_variant(10**8) == "tbf-100M"


def test_goodput_of_tcp_is_the_receivers() -> None:
    end = {"sum_sent": {"bits_per_second": 1.2e9}, "sum_received": {"bits_per_second": 9.9e8}}
    assert _goodput(end, udp=False) == (9.9e8, None)


@pytest.mark.parametrize("end,want", [
    # iperf3 3.12: `sum` is the sender's rate and the receiver's loss
    ({"sum": {"bits_per_second": 2e7, "lost_percent": 50.0}}, (1e7, 50.0)),
    # later ones also give the receiver's rate
    ({"sum": {"bits_per_second": 2e7, "lost_percent": 51.0},
      "sum_received": {"bits_per_second": 9.8e6}}, (9.8e6, 51.0)),
])
def test_goodput_of_udp_counts_what_arrived(end: dict, want: tuple[float, float]) -> None:
    assert _goodput(end, udp=True) == pytest.approx(want)


def _result(v: str, metric: str, value: float) -> Result:
    return Result(POLICER_RATE, v, metric, value, "x")


def test_acceptance_line_passes_only_when_every_tcp_ratio_is_in_target() -> None:
    good = [_result(variant(r, s), TCP_RATIO, 0.99) for r in RATES for s in ("ingress", "egress")]
    extra = [_result(variant(10**9, "ingress"), WIRE_RATIO, 1.001),
             _result(udp_variant(10**7), UDP_RATIO, 0.97),
             _result(tbf_variant(10**9), TCP_RATIO, 0.96),
             _result(SHORT_BURST, TCP_RATIO, 0.5),
             Result(POLICER_RATE, "pcn-unpoliced", THROUGHPUT, 3.2, "Gbit/s")]
    [line] = [x for x in acceptance(good + extra) if "policer" in x]
    assert line.endswith("unpoliced pcn 3.20 Gbit/s") and ": PASS;" in line
    assert "1G-ingress 0.990 (wire 1.001)" in line and "tbf-1G 0.960" in line
    assert "udp-10M 0.970" in line and "short-burst-1G 0.500" in line  # not judged
    low = [*good[:-1], _result(variant(10**9, "egress"), TCP_RATIO, 0.874)]
    [line] = [x for x in acceptance(low) if "policer" in x]
    assert ": FAIL;" in line and "1G-egress 0.874" in line
    high = [*good[:-1], _result(variant(10**9, "egress"), TCP_RATIO, 1.06)]
    assert ": FAIL;" in next(x for x in acceptance(high) if "policer" in x)
    assert not [x for x in acceptance(extra) if "policer TCP" in x]  # no pcn ratio: no line


def test_measured_seconds_keep_the_bursts_share_within_the_tolerance() -> None:
    """A bucket lets T seconds see up to burst / (rate * T) above the rate:
    with the default burst (0.5 s of the rate) that is the 5 % tolerance at
    10 s, so runs are at least that long."""
    from pcn_crds.networkfunction import DEFAULT_BURST_S

    assert MIN_MEASURE_S == pytest.approx(10.0)
    assert DEFAULT_BURST_S / measure_seconds(5) <= 0.05 + 1e-9
    assert measure_seconds(30) == 30
