"""The firewall's bit vectors (pcn_agent.dataplane.cubes.fwvectors), without a
kernel: what the program's lookups would find, checked against the rules read
one by one in order (the linear first match the vectors replace)."""

from __future__ import annotations

import ipaddress
import random

import pytest

from pcn_agent.dataplane.cubes import fwvectors
from pcn_agent.dataplane.cubes.fwvectors import (
    F_DPORT,
    F_SRC,
    OTHER_PROTO,
    classify,
    compile_rules,
    port_blocks,
)
from pcn_crds.rules import FW_PROTOCOLS, Rule, parse_rule

PROTOS = {"tcp": 6, "udp": 17, "icmp": 1, "sctp": 132}


def linear(rules: list[Rule], src: str, dst: str, proto: int, sport: int, dport: int
           ) -> tuple[int | None, bool]:
    """The first rule, read in order, that the packet meets (the old firewall)."""
    for i, r in enumerate(rules):
        if r.src and ipaddress.IPv4Address(src) not in ipaddress.IPv4Network(r.src):
            continue
        if r.dst and ipaddress.IPv4Address(dst) not in ipaddress.IPv4Network(r.dst):
            continue
        if r.proto and FW_PROTOCOLS[r.proto] != proto:
            continue
        if r.sport and not r.sport[0] <= sport <= r.sport[1]:
            continue
        if r.dport and not r.dport[0] <= dport <= r.dport[1]:
            continue
        return i, r.action == "drop"
    return None, False


@pytest.mark.parametrize("lo,hi,want", [
    (0, 65535, [(0, 0)]),
    (80, 80, [(80, 16)]),
    (1, 65535, [(1, 16), (2, 15), (4, 14), (8, 13), (16, 12), (32, 11), (64, 10), (128, 9),
                (256, 8), (512, 7), (1024, 6), (2048, 5), (4096, 4), (8192, 3), (16384, 2),
                (32768, 1)]),
    (8000, 8080, [(8000, 10), (8064, 12), (8080, 16)]),
])
def test_port_blocks_cover_exactly_the_range(lo: int, hi: int, want: list[tuple[int, int]]
                                             ) -> None:
    assert port_blocks(lo, hi) == want
    covered = [p for start, plen in want for p in range(start, start + (1 << (16 - plen)))]
    assert covered == list(range(lo, hi + 1))


def test_worst_case_range_needs_thirty_blocks() -> None:
    assert len(port_blocks(1, 65534)) == 30


def test_vectors_of_nested_prefixes_hold_their_ancestors_rules() -> None:
    rules = [parse_rule(t) for t in ("drop from 10.0.0.0/8", "allow from 10.1.0.0/16",
                                     "drop from 10.1.2.3/32", "allow tcp")]
    t = compile_rules(rules)
    by_prefix = {(e.value, e.plen): t.vectors[(F_SRC, e.vector)] for e in t.lpm
                 if e.field == F_SRC}
    ten = int(ipaddress.IPv4Address("10.0.0.0"))
    assert by_prefix[(0, 0)] == 0b1000  # the rule without a source
    assert by_prefix[(ten, 8)] == 0b1001
    assert by_prefix[(int(ipaddress.IPv4Address("10.1.0.0")), 16)] == 0b1011
    assert by_prefix[(int(ipaddress.IPv4Address("10.1.2.3")), 32)] == 0b1111
    assert classify(t, "10.1.2.3", "1.1.1.1", 6, 1, 2) == (0, True)
    assert classify(t, "11.0.0.1", "1.1.1.1", 6, 1, 2) == (3, False)
    assert classify(t, "11.0.0.1", "1.1.1.1", 17, 1, 2) == (None, False)


def test_identical_vectors_are_stored_once_and_empty_ones_not_at_all() -> None:
    rules = [parse_rule(f"drop tcp dport {p}") for p in (22, 23)] + [parse_rule("allow udp")]
    t = compile_rules(rules)
    assert (fwvectors.F_PROTO, OTHER_PROTO) not in t.vectors  # no rule for any protocol
    assert t.vectors[(fwvectors.F_ACTION, 0)] == 0b011
    dport = [e for e in t.lpm if e.field == F_DPORT]
    # the base (/0: the udp rule, without ports) and one entry per port
    assert sorted((e.value >> 16, e.plen) for e in dport) == [(0, 0), (22, 16), (23, 16)]
    assert len({e.vector for e in dport}) == 3
    # every source is /0 with all three rules: one vector
    assert [(e.value, e.plen) for e in t.lpm if e.field == F_SRC] == [(0, 0)]


def test_overlapping_port_ranges_split_into_elementary_intervals() -> None:
    rules = [parse_rule(t) for t in ("drop tcp dport 1000-2000", "allow tcp dport 1500-3000",
                                     "drop tcp dport 1500")]
    t = compile_rules(rules)
    for port, want in [(999, None), (1000, 0), (1499, 0), (1500, 0), (2000, 0), (2001, 1),
                       (3000, 1), (3001, None)]:
        assert classify(t, "1.1.1.1", "2.2.2.2", 6, 40000, port)[0] == want, port
    t2 = compile_rules(rules[1:])
    assert classify(t2, "1.1.1.1", "2.2.2.2", 6, 40000, 1500) == (0, False)
    assert classify(t2, "1.1.1.1", "2.2.2.2", 6, 40000, 1499) == (None, False)


def _random_rule(rng: random.Random) -> Rule:
    proto = rng.choice([None, "tcp", "udp", "icmp", "sctp"])
    def net() -> str | None:
        if rng.random() < 0.3:
            return None
        plen = rng.choice([0, 1, 7, 8, 16, 23, 24, 31, 32])
        addr = rng.choice(["10.0.0.0", "10.0.1.0", "10.1.0.0", "192.168.0.0"])
        addr = str(ipaddress.IPv4Address(int(ipaddress.IPv4Address(addr)) + rng.randrange(512)))
        return str(ipaddress.IPv4Network(f"{addr}/{plen}", strict=False))

    def ports() -> tuple[int, int] | None:
        if proto not in ("tcp", "udp", "sctp") or rng.random() < 0.4:
            return None
        lo = rng.choice([1, 53, 79, 80, 443, 1000, 8000, 65535, rng.randrange(1, 65536)])
        return lo, min(65535, lo + rng.choice([0, 0, 1, 20, 1000, 70000]))

    return Rule(rng.choice(["allow", "drop"]), proto, net(), net(), ports(), ports())


@pytest.mark.parametrize("seed", range(6))
def test_first_match_equals_the_linear_scan(seed: int) -> None:
    rng = random.Random(seed)
    rules = [_random_rule(rng) for _ in range(rng.choice([1, 5, 70, 200]))]
    t = compile_rules(rules)
    for _ in range(400):
        proto = rng.choice(list(PROTOS.values()) + [47])
        src = str(ipaddress.IPv4Address(rng.choice([0x0A000000, 0x0A000100, 0x0A010000,
                                                    0xC0A80000]) + rng.randrange(600)))
        dst = str(ipaddress.IPv4Address(rng.choice([0x0A000000, 0x0A010000, 0xC0A80000])
                                        + rng.randrange(600)))
        has_ports = proto in (6, 17, 132)
        sport = rng.choice([53, 80, 1000, 8000, 65535, rng.randrange(1, 65536)]) \
            if has_ports else 0
        dport = rng.choice([53, 79, 80, 443, 1000, 65535, rng.randrange(1, 65536)]) \
            if has_ports else 0
        assert classify(t, src, dst, proto, sport, dport) == \
            linear(rules, src, dst, proto, sport, dport), (src, dst, proto, sport, dport)


def test_ten_thousand_rules_compile_within_bounds() -> None:
    rules = [Rule("drop", "tcp", f"10.{i // 256}.{i % 256}.0/24", None, None, (i % 60000 + 1,) * 2)
             for i in range(9_999)] + [Rule("allow", "tcp", None, "10.250.0.1/32")]
    t = compile_rules(rules)
    assert t.n_rules == 10_000
    assert classify(t, "172.16.0.1", "10.250.0.1", 6, 40000, 5201) == (9_999, False)
    assert classify(t, "10.0.3.1", "10.250.0.1", 6, 40000, 4) == (3, True)
    # one source vector per /24 plus the /0 of the last rule; one per port plus the base
    assert len([k for k in t.vectors if k[0] == F_SRC]) == 10_000
    assert len([e for e in t.lpm if e.field == F_DPORT]) == 10_000
    with pytest.raises(ValueError, match="at most 10240"):
        compile_rules([Rule("drop")] * 10_241)


def test_the_saved_rules_are_asdict() -> None:
    """The firewall saves its rules for adoption without dataclasses.asdict
    (its deep copies cost 250 ms for 10 000 rules): the same dicts."""
    from dataclasses import asdict

    from pcn_agent.dataplane.cubes.firewall import _rule_dict

    for text in ("drop tcp from 10.0.0.0/8 to 10.1.0.0/16 sport 1-2 dport 80", "allow"):
        assert _rule_dict(parse_rule(text)) == asdict(parse_rule(text))
