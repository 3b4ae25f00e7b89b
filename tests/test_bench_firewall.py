"""The pure parts of the firewall-scale benchmark (bench.firewall's rule sets,
bench.results' acceptance line): no kernel, no timing."""

from __future__ import annotations

import pytest

from bench.firewall import LEVELS, _function, scale_rules
from bench.results import Result, acceptance
from pcn_agent.dataplane.cubes.fwvectors import classify, compile_rules
from pcn_crds import NetworkFunction
from pcn_crds.rules import parse_rule

CLIENT, SERVER, OTHER = "10.244.1.5", "10.244.1.6", "10.244.1.3"


@pytest.mark.parametrize("level", LEVELS)
def test_every_packet_of_the_pair_meets_the_last_rule_first(level: int) -> None:
    nf = NetworkFunction.model_validate(_function(level, scale_rules(level, CLIENT, SERVER)))
    texts = [r.to_text() for r in nf.spec.typed_config().rules]  # type: ignore[attr-defined]
    assert len(texts) == level
    tables = compile_rules([parse_rule(t) for t in texts])
    last = level - 1 if level else None
    for proto, sport, dport in [(6, 40000, 5201), (6, 1500, 8080), (6, 33000, 20001),
                                (17, 5000, 53), (1, 0, 0)]:
        assert classify(tables, CLIENT, SERVER, proto, sport, dport) == (last, False)
    if level:
        # any other source is refused by the default action (drop)
        assert classify(tables, OTHER, SERVER, 6, 40000, 5201)[0] is None
        # and the fillers are live rules: each kind catches something
        assert classify(tables, CLIENT, SERVER, 6, 40000, 20000)[0] == 0
        if level > 3:
            assert classify(tables, "10.200.0.2", SERVER, 6, 40000, 5201) == (2, True)
            assert classify(tables, CLIENT, "10.204.0.3", 6, 4, 5201) == (3, False)


def test_the_second_rule_set_differs_in_every_filler() -> None:
    a, b = scale_rules(10_000, CLIENT, SERVER), scale_rules(10_000, CLIENT, SERVER, 100_000)
    assert len(a) == len(b) == 10_000 and a[-1] == b[-1]
    assert sum(x != y for x, y in zip(a[:-1], b[:-1], strict=True)) == 9_999


def test_acceptance_line() -> None:
    results = [Result("firewall-scale", "fw-0", "throughput", 20.0, "Gbit/s"),
               Result("firewall-scale", "fw-10000", "throughput", 19.4, "Gbit/s"),
               Result("firewall-scale", "fw-10000", "latency", 80.0, "us"),
               Result("firewall-scale", "fw-10000", "apply-change", 640.0, "ms")]
    line, = [x for x in acceptance(results) if "firewall" in x]
    assert "97% of with 0 rules" in line and line.count("PASS") == 1
    assert "fw-10000 19.40 Gbit/s, 80 us" in line and "640 ms" in line
    results[1] = Result("firewall-scale", "fw-10000", "throughput", 18.0, "Gbit/s")
    assert "FAIL" in next(x for x in acceptance(results) if "firewall" in x)
