"""The firewall rule language, as people type it (`kubectl pcn --rule`) and as
the firewall cube's control code reads a NetworkFunction's rules:

    ACTION [PROTO] [from CIDR] [to CIDR] [sport PORT[-PORT]] [dport PORT[-PORT]]

    drop tcp dport 22
    allow udp to 10.96.0.10/32 dport 53
    drop from 10.244.2.0/24

`parse_rule` gives a Rule or raises RuleError with the 1-based column of the
first mistake; FirewallRule.to_text is the inverse for the CRD's form.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

ACTIONS = {"allow": 0, "drop": 1}
FW_PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1, "sctp": 132}


class RuleError(ValueError):
    """A rule that cannot be parsed; `column` is where the mistake starts (1-based)."""

    def __init__(self, text: str, column: int, message: str) -> None:
        super().__init__(f"invalid rule {text!r} at column {column}: {message}")
        self.text = text
        self.column = column
        self.message = message


@dataclass(frozen=True)
class Rule:
    action: str = "allow"
    proto: str | None = None
    src: str | None = None
    dst: str | None = None
    sport: tuple[int, int] | None = None
    dport: tuple[int, int] | None = None

    @property
    def needs_l4(self) -> bool:
        return self.sport is not None or self.dport is not None

    def __str__(self) -> str:
        parts = [self.action]
        if self.proto:
            parts.append(self.proto)
        if self.src:
            parts += ["from", self.src]
        if self.dst:
            parts += ["to", self.dst]
        for name, rng in (("sport", self.sport), ("dport", self.dport)):
            if rng:
                parts += [name, str(rng[0]) if rng[0] == rng[1] else f"{rng[0]}-{rng[1]}"]
        return " ".join(parts)


def parse_rule(text: str) -> Rule:
    """Parse one rule; RuleError names the column of the first mistake."""
    tokens: list[tuple[str, int]] = []
    col = 0
    for word in text.split():
        col = text.index(word, col)
        tokens.append((word, col + 1))
        col += len(word)
    if not tokens:
        raise RuleError(text, 1, "empty rule; start with allow or drop")
    action, acol = tokens[0]
    if action.lower() not in ACTIONS:
        raise RuleError(text, acol, f"unknown action {action!r}; use allow or drop")
    fields: dict[str, object] = {"action": action.lower()}
    i = 1
    if i < len(tokens) and tokens[i][0].lower() in FW_PROTOCOLS:
        fields["proto"] = tokens[i][0].lower()
        i += 1
    while i < len(tokens):
        word, wcol = tokens[i]
        key = word.lower()
        if key not in ("from", "to", "sport", "dport"):
            hint = " (the protocol comes right after the action)" if key in FW_PROTOCOLS or \
                key.isalpha() else ""
            raise RuleError(text, wcol, f"unexpected {word!r}; expected from, to, sport or "
                                        f"dport{hint}")
        if i + 1 >= len(tokens):
            raise RuleError(text, wcol + len(word), f"{key} needs a value")
        value, vcol = tokens[i + 1]
        field = {"from": "src", "to": "dst"}.get(key, key)
        if field in fields:
            raise RuleError(text, wcol, f"{key} given twice")
        if key in ("from", "to"):
            try:
                fields[field] = str(ipaddress.IPv4Network(value, strict=False))
            except ValueError:
                raise RuleError(text, vcol, f"{value!r} is not an IPv4 address or CIDR") from None
        else:
            if fields.get("proto") not in ("tcp", "udp", "sctp"):
                raise RuleError(text, wcol, f"{key} needs the protocol tcp, udp or sctp first")
            fields[field] = _port_range(text, value, vcol)
        i += 2
    return Rule(**fields)  # type: ignore[arg-type]


def _port_range(text: str, value: str, col: int) -> tuple[int, int]:
    lo_s, _, hi_s = value.partition("-")
    try:
        lo = int(lo_s)
        hi = int(hi_s) if hi_s else lo
    except ValueError:
        raise RuleError(text, col, f"{value!r} is not a port or a range like 8000-8080") from None
    if not (1 <= lo <= 65535 and 1 <= hi <= 65535) or lo > hi:
        raise RuleError(text, col, f"port range {value!r} must lie within 1-65535, low to high")
    return lo, hi
