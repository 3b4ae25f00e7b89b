"""bench.tcprr: the TCP_RR-style rate (sockperf ping-pong) parsed from
sockperf's summary, and measured between two namespaces on a veth pair."""

from __future__ import annotations

import pytest

from bench import tcprr
from bench.netns import Namespaces, new_run_prefix, stop
from bench.references import veth_pair
from bench.results import TCP_RR, Result, table

SUMMARY = """sockperf: == version #3.7-no.git ==
sockperf: [Valid Duration] RunTime=1.550 sec; SentMessages=58437; ReceivedMessages=58430
sockperf: [2;35m====> avg-latency=13.253 (std-dev=91.080)[0m
sockperf: Summary: Latency is 13.253 usec
"""


def test_parse_summary() -> None:
    run = tcprr.parse(SUMMARY)
    assert run == tcprr.RrRun(1.55, 58430, 13.253)
    assert run.rate == pytest.approx(58430 / 1.55)


def test_parse_without_summary() -> None:
    with pytest.raises(ValueError, match="no sockperf summary"):
        tcprr.parse("sockperf: ERROR: connect failed\n")


def test_tcp_rr_is_compared_higher_is_better() -> None:
    res = [Result("s", "linux-bridge", TCP_RR, 20000.0, "trans/s"),
           Result("s", "pcn", TCP_RR, 25000.0, "trans/s")]
    assert "125%" in table(res).splitlines()[3]


def test_rate_between_two_namespaces() -> None:
    if not tcprr.available():
        pytest.skip("sockperf not installed (apt-get install sockperf; make setup does)")
    nss = Namespaces(new_run_prefix())
    server = None
    try:
        a, b = veth_pair(nss, 1500)
        server = tcprr.start_server(b.netns)
        run = tcprr.run_client(a.netns, b.ip, tcprr.PORT, 1)
        # sockperf's valid duration: at most the 1 s asked (plus its rounding);
        # how much of it is valid depends on the machine's load, not on us
        assert run.received > 100 and 0 < run.seconds <= 1.5
        assert run.rate > 100 and run.half_rtt_us > 0
        with pytest.raises(RuntimeError, match="sockperf ping-pong"):
            tcprr.run_client(a.netns, b.ip, tcprr.PORT + 1, 1)  # nobody listens there
    finally:
        if server is not None:
            stop(server)
        nss.remove_all()
