"""The packet capture filter language (a subset of tcpdump's, pcap-filter(7))
and its compiler into the packetcapture cube's match program.

Grammar (keywords are case-insensitive; `&&`, `||`, `!` are accepted for
`and`, `or`, `not`; `not` binds tighter than `and`, which binds tighter than
`or`, as in pcap-filter(7)):

    expr    := and ("or" and)*
    and     := unary ("and" unary)*
    unary   := "not" unary | "(" expr ")" | term
    term    := [PROTO] [DIR] KIND VALUE | PROTO | [DIR] VALUE
    PROTO   := ip | arp | tcp | udp | icmp | sctp
    DIR     := src | dst | src or dst | src and dst
    KIND    := host ADDR | net CIDR | port N | portrange N-M

`host`/`net` without DIR mean "src or dst" (so does `port`); a VALUE after
`and`/`or` with no KIND repeats the last term's qualifiers, as tcpdump does
(`host 10.0.0.1 or 10.0.0.2`); a bare address means `host ADDR`. `port`
matches TCP, UDP and SCTP ports (pcap-filter: "tcp, udp or sctp"); a
fragment after the first carries no ports and matches no port term. `ip`
(ethertype 0x0800) and `arp` (0x0806) test the frame; IPv4 terms never match
another ethertype. IPv6 is not supported (pcn is IPv4 only).

The compiled form (`compile_filter`) is a list of `Insn`: each tests one
field (`(field & mask)` within `lo..hi`, host byte order) and jumps to `jt`
when the test holds, `jf` when it does not; a jump is either to a later
instruction (strictly forward, so the cube evaluates at most `len(program)`
steps in its bounded loop) or to ACCEPT / REJECT. This is the control-flow
graph form of classic BPF (McCanne and Jacobson, "The BSD Packet Filter",
1993): `and`/`or` short-circuit, `not` swaps the targets and costs nothing.
An empty filter is the empty program, which accepts every frame.

Errors are FilterError with the offending token and its 0-based character
position in the text.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

MAX_INSNS = 64  # the cube's loop bound (CAP_MAX_INSNS in bpf/include/pcn_capfilter.h)
ACCEPT = 0xFFFF
REJECT = 0xFFFE

# Fields a match instruction tests (CAP_F_* in pcn_capfilter.h).
F_ETHERTYPE, F_PROTO, F_SRC_IP, F_DST_IP, F_SPORT, F_DPORT = range(6)
FIELD_NAMES = ("ethertype", "proto", "src", "dst", "sport", "dport")

ETH_P_IP, ETH_P_ARP = 0x0800, 0x0806
PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1, "sctp": 132}
PORT_PROTOCOLS = frozenset({6, 17, 132})
FULL = 0xFFFFFFFF


class FilterError(ValueError):
    """A filter that cannot be parsed or compiled, with where the mistake is."""

    def __init__(self, text: str, position: int, token: str, message: str) -> None:
        where = f"at position {position}, token {token!r}" if token else f"at position {position}" \
            " (end of filter)"
        super().__init__(f"invalid capture filter {text!r} {where}: {message}")
        self.text = text
        self.position = position
        self.token = token
        self.message = message


# ------------------------------------------------------------------------ AST
@dataclass(frozen=True)
class Test:
    """One field test: `(value & mask)` lies within `lo..hi` (host order)."""

    field: int
    mask: int
    lo: int
    hi: int


@dataclass(frozen=True)
class And:
    left: Node
    right: Node


@dataclass(frozen=True)
class Or:
    left: Node
    right: Node


@dataclass(frozen=True)
class Not:
    inner: Node


Node = Test | And | Or | Not


@dataclass(frozen=True)
class Insn:
    """One instruction of the compiled program (struct cap_insn)."""

    field: int
    mask: int
    lo: int
    hi: int
    jt: int
    jf: int


# ------------------------------------------------------------------------ lexer
_TOKEN = re.compile(r"\s*(?:(\(|\)|&&|\|\||!)|([A-Za-z0-9_./:-]+))")


@dataclass(frozen=True)
class _Tok:
    text: str
    pos: int


def _tokens(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    i = 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        m = _TOKEN.match(text, i)
        if m is None or m.end() == i:
            raise FilterError(text, i, text[i], "unexpected character")
        start = m.start(1) if m.group(1) else m.start(2)
        out.append(_Tok(m.group(1) or m.group(2), start))
        i = m.end()
    return out


_AND = {"and", "&&"}
_OR = {"or", "||"}
_NOT = {"not", "!"}
_DIRS = {"src", "dst"}
_KINDS = {"host", "net", "port", "portrange"}
_PROTOS = {"ip", "arp", *PROTOCOLS}
Dir = Literal["src", "dst", "src or dst", "src and dst"]
_KEYWORDS = sorted((_AND | _OR | _NOT | _DIRS | _KINDS | _PROTOS) - {"&&", "||", "!"})
# pcap-filter(7) primitives this subset lacks, and why: a typo of a keyword
# gets a suggestion instead (_unknown_word), an address the address error.
_UNSUPPORTED = {
    **dict.fromkeys(("ip6", "icmp6", "ipv6"), "IPv4 only: pcn has no IPv6"),
    **dict.fromkeys(("vlan", "mpls", "pppoed", "pppoes", "geneve", "vxlan"),
                    "IPv4 only: encapsulated or tagged frames are not looked into"),
    **dict.fromkeys(("ether", "gateway", "broadcast", "multicast", "less", "greater", "len",
                     "proto", "inbound", "outbound", "rarp", "igmp", "igrp", "pim", "ah",
                     "esp", "vrrp", "atalk", "decnet", "iso", "stp", "ipx", "netbeui"),
                    "IPv4 only; the filter knows " + ", ".join(sorted(_KINDS | _PROTOS))),
}
_IDENT = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


@dataclass(frozen=True)
class _Quals:
    proto: str | None
    dir: Dir | None
    kind: str


# ------------------------------------------------------------------------ parser
class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokens(text)
        self.i = 0
        self.last: _Quals | None = None

    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def word(self) -> str:
        t = self.peek()
        return t.text.lower() if t else ""

    def error(self, message: str, tok: _Tok | None = None) -> FilterError:
        tok = tok or self.peek()
        if tok is None:
            return FilterError(self.text, len(self.text), "", message)
        return FilterError(self.text, tok.pos, tok.text, message)

    def take(self) -> _Tok:
        t = self.peek()
        if t is None:
            raise self.error("the filter ends too early")
        self.i += 1
        return t

    def parse(self) -> Node | None:
        if not self.toks:
            return None
        node = self.expr()
        left = self.peek()
        if left is not None:
            unknown = self._unknown_word(left)
            if unknown is not None and "did you mean" in unknown.message:
                raise unknown  # `tcp prot 80`
            raise self.error("expected 'and', 'or' or the end of the filter")
        return node

    def expr(self) -> Node:
        node = self.conj()
        while self.word() in _OR:
            self.take()
            node = Or(node, self.conj())
        return node

    def conj(self) -> Node:
        node = self.unary()
        while self.word() in _AND:
            self.take()
            node = And(node, self.unary())
        return node

    def unary(self) -> Node:
        w = self.word()
        if w in _NOT:
            self.take()
            return Not(self.unary())
        if w == "(":
            self.take()
            node = self.expr()
            if self.word() != ")":
                raise self.error("expected ')'")
            self.take()
            return node
        if w == ")":
            raise self.error("unexpected ')'")
        if w in _AND or w in _OR:
            raise self.error("expected a term before this operator")
        return self.term()

    def _dir(self) -> Dir | None:
        w = self.word()
        if w not in _DIRS:
            return None
        self.take()
        # "src or dst" / "src and dst": only when the next words make that phrase
        nxt = self.toks[self.i: self.i + 2]
        if len(nxt) == 2 and nxt[0].text.lower() in ("or", "and") \
                and nxt[1].text.lower() in _DIRS and nxt[1].text.lower() != w:
            self.i += 2
            return "src or dst" if nxt[0].text.lower() == "or" else "src and dst"
        return "src" if w == "src" else "dst"

    def _unknown_word(self, tok: _Tok) -> FilterError | None:
        """The error for a word that is no keyword of this language (`hots`,
        `ip6`, `vlan`), naming it, instead of reading it as an address; None
        for anything else (an address, a number)."""
        w = tok.text.lower()
        if w in _UNSUPPORTED:
            return self.error(f"{w}: not supported ({_UNSUPPORTED[w]})", tok)
        if not _IDENT.fullmatch(tok.text) or w in _KEYWORDS:
            return None
        close = difflib.get_close_matches(w, _KEYWORDS, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else \
            f" (expected one of {', '.join(_KEYWORDS)} or an IPv4 address)"
        return self.error(f"unknown keyword {w!r}{hint}", tok)

    def term(self) -> Node:
        start = self.peek()
        if start is not None and (unknown := self._unknown_word(start)) is not None:
            raise unknown
        proto: str | None = None
        if self.word() in _PROTOS:
            proto = self.take().text.lower()
        direction = self._dir()
        if self.word() in _KINDS:
            kind = self.take().text.lower()
            quals = _Quals(proto, direction, kind)
        elif proto is not None and direction is None:
            return _proto_test(proto)  # a protocol alone
        elif direction is not None or proto is not None:
            nxt = self.peek()
            unknown = self._unknown_word(nxt) if nxt is not None else None
            if unknown is not None and "did you mean" in unknown.message:
                raise unknown
            raise self.error("expected host, net, port or portrange")
        elif self.last is not None:
            quals = self.last  # tcpdump: an identifier alone repeats the last keywords
        else:
            quals = _Quals(None, None, "host")
        value = self.take()
        if value.text.lower() in _AND | _OR | _NOT | _KINDS | _DIRS | _PROTOS | {"(", ")"}:
            raise self.error(f"expected a value after {quals.kind!r}", value)
        self.last = quals
        return self.build(quals, value, start or value)

    def build(self, q: _Quals, value: _Tok, start: _Tok) -> Node:
        if q.kind in ("host", "net"):
            if q.proto == "arp":
                raise self.error("arp has no IPv4 header to match addresses in", start)
            try:
                if q.kind == "host":
                    net = ipaddress.IPv4Network(f"{ipaddress.IPv4Address(value.text)}/32")
                else:
                    net = ipaddress.IPv4Network(value.text, strict=True)
            except ValueError as exc:
                what = "an IPv4 address" if q.kind == "host" else "an IPv4 network (A.B.C.D/LEN)"
                raise self.error(f"{q.kind} needs {what}: {exc}", value) from None
            lo = int(net.network_address)
            mask = int(net.netmask)
            tests = {d: Test(f, mask, lo, lo) for d, f in (("src", F_SRC_IP), ("dst", F_DST_IP))}
        else:
            if q.proto in ("icmp", "arp", "ip"):
                raise self.error(f"{q.proto} has no ports", start)
            if q.kind == "port":
                if not value.text.isdigit():
                    raise self.error("port needs a number 0-65535", value)
                lo = hi = int(value.text)
            else:
                m = re.fullmatch(r"(\d+)-(\d+)", value.text)
                if m is None:
                    raise self.error("portrange needs N-M", value)
                lo, hi = int(m.group(1)), int(m.group(2))
            if not 0 <= lo <= hi <= 65535:
                raise self.error("ports lie within 0-65535, low to high", value)
            tests = {d: Test(f, FULL, lo, hi) for d, f in (("src", F_SPORT), ("dst", F_DPORT))}
        d = q.dir or "src or dst"
        node: Node
        if d == "src":
            node = tests["src"]
        elif d == "dst":
            node = tests["dst"]
        elif d == "src and dst":
            node = And(tests["src"], tests["dst"])
        else:
            node = Or(tests["src"], tests["dst"])
        if q.proto is not None:
            node = And(_proto_test(q.proto), node)
        return node


def _proto_test(proto: str) -> Test:
    if proto == "ip":
        return Test(F_ETHERTYPE, FULL, ETH_P_IP, ETH_P_IP)
    if proto == "arp":
        return Test(F_ETHERTYPE, FULL, ETH_P_ARP, ETH_P_ARP)
    n = PROTOCOLS[proto]
    return Test(F_PROTO, FULL, n, n)


def parse_filter(text: str) -> Node | None:
    """The filter's syntax tree; None for an empty filter (everything)."""
    return _Parser(text).parse()


# ------------------------------------------------------------------------ compiler
def compile_filter(text: str) -> list[Insn]:
    """The match program of a filter; raises FilterError when it does not
    parse or needs more than MAX_INSNS instructions."""
    node = parse_filter(text)
    if node is None:
        return []
    emitted: list[tuple[Test, int, int]] = []  # in reverse program order

    def emit(n: Node, t: int, f: int) -> int:
        """Emit `n` so that it jumps to `t` when true, `f` when false; targets
        are indexes into `emitted` (or ACCEPT/REJECT). Returns its entry."""
        if isinstance(n, Test):
            emitted.append((n, t, f))
            return len(emitted) - 1
        if isinstance(n, Not):
            return emit(n.inner, f, t)
        if isinstance(n, And):
            return emit(n.left, emit(n.right, t, f), f)
        return emit(n.left, t, emit(n.right, t, f))

    emit(node, ACCEPT, REJECT)
    if len(emitted) > MAX_INSNS:
        raise FilterError(text, 0, text.split()[0] if text.split() else "",
                          f"the filter needs {len(emitted)} match terms; a capture holds at "
                          f"most {MAX_INSNS}")
    last = len(emitted) - 1

    def target(j: int) -> int:
        return j if j in (ACCEPT, REJECT) else last - j

    # Reversed, every jump goes forward: an instruction is emitted after the
    # ones it jumps to.
    return [Insn(test.field, test.mask, test.lo, test.hi, target(t), target(f))
            for test, t, f in reversed(emitted)]


# ------------------------------------------------------------------------ reference semantics
@dataclass(frozen=True)
class Fields:
    """What a frame offers to the filter. `None`: the field is absent
    (a non-IPv4 frame has no addresses; ports exist for TCP/UDP/SCTP
    first fragments and unfragmented datagrams only)."""

    ethertype: int
    proto: int | None = None
    src: int | None = None
    dst: int | None = None
    sport: int | None = None
    dport: int | None = None

    def get(self, field: int) -> int | None:
        return (self.ethertype, self.proto, self.src, self.dst, self.sport, self.dport)[field]


def _holds(test: Test | Insn, fields: Fields) -> bool:
    v = fields.get(test.field)
    return v is not None and test.lo <= (v & test.mask) <= test.hi


def evaluate(node: Node | None, fields: Fields) -> bool:
    """The filter's meaning, straight from the syntax tree."""
    if node is None:
        return True
    if isinstance(node, Test):
        return _holds(node, fields)
    if isinstance(node, Not):
        return not evaluate(node.inner, fields)
    if isinstance(node, And):
        return evaluate(node.left, fields) and evaluate(node.right, fields)
    return evaluate(node.left, fields) or evaluate(node.right, fields)


def run_program(program: Iterable[Insn], fields: Fields) -> tuple[bool, int]:
    """Run a compiled program as the cube does: (accepted, steps taken)."""
    prog = list(program)
    if not prog:
        return True, 0
    pc, steps = 0, 0
    while pc not in (ACCEPT, REJECT):
        if pc >= len(prog) or steps >= MAX_INSNS:
            raise AssertionError(f"program runs off at {pc} after {steps} steps")
        insn = prog[pc]
        nxt = insn.jt if _holds(insn, fields) else insn.jf
        if nxt not in (ACCEPT, REJECT) and nxt <= pc:
            raise AssertionError(f"backward jump {pc} -> {nxt}")
        pc, steps = nxt, steps + 1
    return pc == ACCEPT, steps


def describe(program: Iterable[Insn]) -> list[str]:
    """Human-readable listing (for logs and `--debug`)."""

    def tgt(j: int) -> str:
        return {ACCEPT: "accept", REJECT: "reject"}.get(j, str(j))

    return [f"{i}: {FIELD_NAMES[x.field]} & {x.mask:#x} in {x.lo:#x}..{x.hi:#x} "
            f"? {tgt(x.jt)} : {tgt(x.jf)}" for i, x in enumerate(program)]


def as_config(program: Iterable[Insn]) -> list[Mapping[str, int]]:
    """The program as plain data (saved with the cube's state)."""
    return [{"field": x.field, "mask": x.mask, "lo": x.lo, "hi": x.hi, "jt": x.jt, "jf": x.jf}
            for x in program]
