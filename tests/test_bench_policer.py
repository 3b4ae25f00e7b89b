"""The policer-rate benchmark: its pure parts (bench.policer's names and
iperf3 parsing, bench.results' acceptance line), and the wait between its
back-to-back iperf3 runs to one server (two namespaces on a veth pair)."""

from __future__ import annotations

import subprocess
import time

import pytest

from bench import iperf
from bench.netns import Namespaces, new_run_prefix, stop
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
from bench.references import veth_pair
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


def test_back_to_back_runs_wait_for_the_server_to_finish_the_last_test() -> None:
    """An iperf3 server answers a client that comes while it still ends the
    previous test with a reset: iperf.wait_idle waits while a connection to
    it is established, and gives up with a message after its timeout."""
    nss = Namespaces(new_run_prefix())
    nss = Namespaces(new_run_prefix())
    server = holder = None
    try:
        a, b = veth_pair(nss, 1500)
        server = iperf.start_server(b.netns, iperf.Pinning())
        assert iperf.wait_idle(b.netns, timeout=1) < 1  # nobody connected
        # a client that holds a control connection open for 1.5 s
        holder = subprocess.Popen(
            ["ip", "netns", "exec", a.netns, "python3", "-c",
             "import socket, time; s = socket.create_connection(("
             f"{b.ip!r}, {iperf.PORT})); print('up', flush=True); time.sleep(1.5)"],
            stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdout.readline().strip() == "up"
        with pytest.raises(RuntimeError, match="still busy"):
            iperf.wait_idle(b.netns, timeout=0.2)
        t = time.monotonic()
        iperf.wait_idle(b.netns, timeout=10)
        assert time.monotonic() - t > 0.2  # it waited for the holder to go
        assert holder.wait(timeout=10) == 0
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
        if server is not None:
            stop(server)
        nss.remove_all()
