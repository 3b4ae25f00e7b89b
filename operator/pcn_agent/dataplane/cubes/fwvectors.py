"""The firewall's rule set as the tables of a Linear Bit Vector Search
(T. V. Lakshman and D. Stiliadis, "High-speed policy-based packet forwarding
using efficient multi-dimensional range matching", SIGCOMM 1998; the
classifier of Polycube's pcn-firewall). Pure: no kernel, no BCC.

Each rule is a bit: rule i is bit i % 64 of 64-bit word i // 64. For every
field of a packet one lookup gives the vector of the rules whose condition on
that field the packet meets; the rules the packet matches are the AND of the
five vectors, and the first match is the lowest set bit. bpf/firewall.c does
the lookups and the AND; this module computes what they find:

- source and destination addresses: one LPM entry per distinct prefix the
  rules name (and 0.0.0.0/0 for rules without one). The vector of prefix P
  holds the rules whose prefix contains P. The longest prefix containing an
  address A is P, and every rule prefix containing A contains P (two prefixes
  that both contain A are nested), so P's vector is exactly the rules A meets.
- source and destination ports: the port space 0-65535 cut into elementary
  intervals at every rule's bounds (at most 2N + 1 of them), merged where
  neighbours hold the same rules. The rules without a port condition form the
  base vector, one /0 entry; every interval whose rules differ from the base
  becomes its aligned power-of-two blocks (a range splits into at most 30,
  RFC 4632-style prefixes of a 16-bit space), each an LPM entry more specific
  than /0. The trade-off against an entry per port: ranges cost O(log) entries
  each instead of up to 65 536, at the price of one LPM lookup (a 16-level
  trie walk) instead of a hash lookup per packet.
- protocol: one vector per protocol the rules name (its rules and the rules
  without a protocol) and one, OTHER_PROTO, for every other protocol.
- actions: one vector whose bit i says that rule i drops.

Identical vectors of a field are stored once (LPM entries hold a vector id).
A vector that is all zero is not stored at all: the program reads a missing
one as "no rule matches".

Sizes: a vector is CAP_WORDS 64-bit words (CAP_RULES rules), whatever the
rule count; a rule set of N rules stores at most 2N + 4 address vectors, 4N + 2
port vectors, 6 protocol vectors and 1 action vector, and at most
N + 1 + 30 * (2N + 1) LPM entries per port field (typically one per range).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from pcn_crds.rules import FW_PROTOCOLS, Rule

CAP_WORDS = 160  # bpf/firewall.c FW_CAP_WORDS: the size of a vector in the shared map
CAP_RULES = CAP_WORDS * 64  # 10 240
VECTOR_BYTES = CAP_WORDS * 8

# bpf/firewall.c FW_F_*: the field a vector or an LPM entry belongs to
F_SRC, F_DST, F_SPORT, F_DPORT, F_PROTO, F_ACTION = range(6)
OTHER_PROTO = 256  # the protocol vector of protocols no rule names
LPM_FIXED_BITS = 96  # inst, gen and field precede the value in an LPM key


@dataclass(frozen=True)
class LpmEntry:
    """One LPM entry: `value` (an address, or a port in the upper 16 bits),
    its first `plen` bits significant, as an unsigned 32-bit number in host
    order, leads to vector `vector` of `field`."""

    field: int
    value: int
    plen: int
    vector: int


@dataclass
class Tables:
    """What a rule set writes into the firewall's maps.

    lpm: LPM entries of the address and port fields.
    vectors: (field, id) -> the vector as a Python int (bit i: rule i);
    only non-zero vectors. For F_PROTO the id is the protocol number or
    OTHER_PROTO; for F_ACTION it is 0."""

    n_rules: int
    lpm: list[LpmEntry] = field(default_factory=list)
    vectors: dict[tuple[int, int], int] = field(default_factory=dict)

    def vector_bytes(self, key: tuple[int, int]) -> bytes:
        """The vector as the C struct fw_vec holds it: CAP_WORDS little-endian
        u64 words, word j holding rules 64 j .. 64 j + 63 (bit k: rule 64 j + k)."""
        return self.vectors[key].to_bytes(VECTOR_BYTES, "little")


def _net(cidr: str | None) -> tuple[int, int]:
    """(network as an unsigned 32-bit number, prefix length); any address is /0."""
    if not cidr:
        return 0, 0
    net = ipaddress.IPv4Network(cidr)
    return int(net.network_address), net.prefixlen


def _mask(plen: int, width: int) -> int:
    return ((1 << width) - 1) ^ ((1 << (width - plen)) - 1)


class _Ids:
    """Vector ids of one field, one per distinct vector."""

    def __init__(self, tables: Tables, fld: int) -> None:
        self.tables, self.field, self.ids = tables, fld, dict[int, int]()

    def of(self, vector: int) -> int:
        vid = self.ids.get(vector)
        if vid is None:
            vid = self.ids[vector] = len(self.ids)
            self.tables.vectors[(self.field, vid)] = vector
        return vid


def _prefix_entries(tables: Tables, fld: int, nets: Sequence[tuple[int, int]]) -> None:
    own: dict[tuple[int, int], int] = {}
    for i, net in enumerate(nets):
        own[net] = own.get(net, 0) | (1 << i)
    full: dict[tuple[int, int], int] = {}
    ids = _Ids(tables, fld)
    lengths = sorted({plen for _, plen in own}, reverse=True)  # the only ones to look at
    masks = {plen: _mask(plen, 32) for plen in lengths}
    for addr, plen in sorted(own, key=lambda n: n[1]):  # ancestors first
        vector = own[(addr, plen)]
        for shorter in (x for x in lengths if x < plen):  # the nearest ancestor holds the rest
            up = full.get((addr & masks[shorter], shorter))
            if up is not None:
                vector |= up
                break
        full[(addr, plen)] = vector
        tables.lpm.append(LpmEntry(fld, addr, plen, ids.of(vector)))


def port_blocks(lo: int, hi: int) -> list[tuple[int, int]]:
    """[lo, hi] (0 <= lo <= hi <= 65535) as aligned blocks (start, prefix
    length in a 16-bit space), in order: the fewest prefixes that cover it."""
    out: list[tuple[int, int]] = []
    while lo <= hi:
        size = lo & -lo if lo else 1 << 16
        while size > hi - lo + 1:
            size //= 2
        out.append((lo, 16 - size.bit_length() + 1))
        lo += size
    return out


def _port_entries(tables: Tables, fld: int, ranges: Sequence[tuple[int, int] | None]) -> None:
    base = 0
    starts: dict[int, int] = {}
    ends: dict[int, int] = {}  # the first port past the range
    for i, rng in enumerate(ranges):
        if rng is None:
            base |= 1 << i
            continue
        starts[rng[0]] = starts.get(rng[0], 0) | (1 << i)
        ends[rng[1] + 1] = ends.get(rng[1] + 1, 0) | (1 << i)
    ids = _Ids(tables, fld)
    if base:
        tables.lpm.append(LpmEntry(fld, 0, 0, ids.of(base)))
    points = sorted({0, *starts, *(p for p in ends if p <= 65535)})
    ranged = 0
    intervals: list[tuple[int, int, int]] = []  # (lo, hi, ranged rules), neighbours merged
    for k, p in enumerate(points):
        ranged = (ranged | starts.get(p, 0)) & ~ends.get(p, 0)
        hi = points[k + 1] - 1 if k + 1 < len(points) else 65535
        if intervals and intervals[-1][2] == ranged:
            intervals[-1] = (intervals[-1][0], hi, ranged)
        else:
            intervals.append((p, hi, ranged))
    for lo, hi, bits in intervals:
        if not bits:
            continue  # the base entry covers it
        vid = ids.of(base | bits)
        for start, plen in port_blocks(lo, hi):
            tables.lpm.append(LpmEntry(fld, start << 16, plen, vid))


def compile_rules(rules: Sequence[Rule]) -> Tables:
    """The tables of `rules` (first match wins). ValueError for more than
    CAP_RULES rules."""
    if len(rules) > CAP_RULES:
        raise ValueError(f"a firewall's vectors hold at most {CAP_RULES} rules, got {len(rules)}")
    tables = Tables(len(rules))
    _prefix_entries(tables, F_SRC, [_net(r.src) for r in rules])
    _prefix_entries(tables, F_DST, [_net(r.dst) for r in rules])
    _port_entries(tables, F_SPORT, [r.sport for r in rules])
    _port_entries(tables, F_DPORT, [r.dport for r in rules])
    anyproto = 0
    named: dict[int, int] = {}
    drops = 0
    for i, r in enumerate(rules):
        if r.proto:
            num = FW_PROTOCOLS[r.proto]
            named[num] = named.get(num, 0) | (1 << i)
        else:
            anyproto |= 1 << i
        if r.action == "drop":
            drops |= 1 << i
    for num, bits in named.items():
        tables.vectors[(F_PROTO, num)] = bits | anyproto
    if anyproto:
        tables.vectors[(F_PROTO, OTHER_PROTO)] = anyproto
    if drops:
        tables.vectors[(F_ACTION, 0)] = drops
    return tables


def lookup(tables: Tables, fld: int, value: int, width: int) -> int:
    """What the program's LPM lookup of `value` (an address, or a port) finds
    for `fld`: the vector of the longest matching entry, 0 when none matches.
    A reference for tests, linear in the entries."""
    best: LpmEntry | None = None
    for e in tables.lpm:
        if e.field != fld:
            continue
        shifted = value << (32 - width)
        if (shifted & _mask(e.plen, 32)) == e.value and (best is None or e.plen > best.plen):
            best = e
    return 0 if best is None else tables.vectors[(fld, best.vector)]


def classify(tables: Tables, src: str, dst: str, proto: int, sport: int, dport: int
             ) -> tuple[int | None, bool]:
    """The first matching rule's index (None: none, the default action) and
    whether it drops, as bpf/firewall.c decides it from `tables`; ports are 0
    for packets without them. A reference for tests."""
    proto_vec = tables.vectors.get((F_PROTO, proto), tables.vectors.get((F_PROTO, OTHER_PROTO), 0))
    hits = (lookup(tables, F_SRC, int(ipaddress.IPv4Address(src)), 32)
            & lookup(tables, F_DST, int(ipaddress.IPv4Address(dst)), 32)
            & lookup(tables, F_SPORT, sport, 16) & lookup(tables, F_DPORT, dport, 16)
            & proto_vec & ((1 << tables.n_rules) - 1))
    if not hits:
        return None, False
    first = (hits & -hits).bit_length() - 1
    return first, bool(tables.vectors.get((F_ACTION, 0), 0) >> first & 1)
