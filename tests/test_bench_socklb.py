"""The pod-to-service socket LB variant's acceptance lines (issue 13)."""

from __future__ import annotations

from bench.results import KUBE_PROXY_IPT, KUBE_PROXY_NFT, TCP_RR, Result, acceptance

SVC = "pod-to-service"


def _lines(results: list[Result]) -> list[str]:
    return [x for x in acceptance(results) if "socket-LB" in x]


def test_against_iptables_while_no_nftables_reference_runs() -> None:
    results = [Result(SVC, KUBE_PROXY_IPT, "throughput", 20.0, "Gbit/s"),
               Result(SVC, "pcn-socklb", "throughput", 22.0, "Gbit/s"),
               Result(SVC, KUBE_PROXY_IPT, TCP_RR, 5000.0, "trans/s"),
               Result(SVC, "pcn-socklb", TCP_RR, 5500.0, "trans/s")]
    tp, rate = _lines(results)
    assert f"1.10x {KUBE_PROXY_IPT} (20.00 Gbit/s" in tp and tp.endswith("PASS")
    assert f"compared with {KUBE_PROXY_IPT}" in tp
    assert f"1.10x {KUBE_PROXY_IPT} (5000/s" in rate and rate.endswith("FAIL")  # 1.10 < 1.15


def test_nftables_is_the_reference_when_present() -> None:
    results = [Result(SVC, KUBE_PROXY_IPT, "throughput", 10.0, "Gbit/s"),
               Result(SVC, KUBE_PROXY_NFT, "throughput", 20.0, "Gbit/s"),
               Result(SVC, "pcn-socklb", "throughput", 20.0, "Gbit/s")]
    tp, = _lines(results)
    assert f"1.00x {KUBE_PROXY_NFT} (20.00" in tp and tp.endswith("FAIL")
    assert "compared with" not in tp


def test_no_line_without_the_variant() -> None:
    assert _lines([Result(SVC, KUBE_PROXY_IPT, "throughput", 20.0, "Gbit/s")]) == []
