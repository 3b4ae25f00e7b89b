"""The pod-to-service socket LB variant's acceptance lines (issue 13)."""

from __future__ import annotations

from bench.results import Result, acceptance

SVC = "pod-to-service"


def _lines(results: list[Result]) -> list[str]:
    return [x for x in acceptance(results) if "socket-LB" in x]


def test_against_iptables_while_no_nftables_reference_runs() -> None:
    results = [Result(SVC, "iptables", "throughput", 20.0, "Gbit/s"),
               Result(SVC, "pcn-socklb", "throughput", 22.0, "Gbit/s"),
               Result(SVC, "iptables", "rr-rate", 5000.0, "req/s"),
               Result(SVC, "pcn-socklb", "rr-rate", 5500.0, "req/s")]
    tp, rate = _lines(results)
    assert "1.10x iptables (20.00 Gbit/s" in tp and tp.endswith("PASS") and "compared with iptables" in tp
    assert "1.10x iptables (5000/s" in rate and rate.endswith("FAIL")  # 1.10 < 1.15


def test_nftables_is_the_reference_when_present() -> None:
    results = [Result(SVC, "iptables", "throughput", 10.0, "Gbit/s"),
               Result(SVC, "nftables", "throughput", 20.0, "Gbit/s"),
               Result(SVC, "pcn-socklb", "throughput", 20.0, "Gbit/s")]
    tp, = _lines(results)
    assert "1.00x nftables (20.00" in tp and tp.endswith("FAIL") and "compared with" not in tp


def test_no_line_without_the_variant() -> None:
    assert _lines([Result(SVC, "iptables", "throughput", 20.0, "Gbit/s")]) == []


def test_request_rate_is_taken_at_the_median_exchange() -> None:
    from bench.rr import Latency
    from bench.services import _rate_results

    stalled = Latency(samples_us=[100.0, 100.0, 100.0, 100.0, 50_000.0])
    r, = _rate_results(SVC, {"pcn-socklb": stalled})
    assert (r.metric, r.unit, r.value) == ("rr-rate", "req/s", 10_000.0)
    assert r.extra["mean_rate"] == round(5 / 0.0504, 1)  # the stall's 50 ms dominate the mean
