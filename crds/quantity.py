"""Kubernetes quantities ("10M", "1Gi", "500k", "1e6") as
k8s.io/apimachinery's resource.ParseQuantity reads them, and the bandwidth
rules of the pod annotations `kubernetes.io/ingress-bandwidth` and
`kubernetes.io/egress-bandwidth` as kubelet and the container runtimes apply
them (containerd internal/cri/bandwidth, from kubernetes pkg/util/bandwidth):
bits per second, at least 1k and at most 1P.

Grammar (apimachinery pkg/api/resource/quantity.go):

    quantity  ::= signedNumber suffix
    number    ::= digits | digits.digits | digits. | .digits
    suffix    ::= binarySI | decimalSI | ("e" | "E") signedInteger
    binarySI  ::= Ki | Mi | Gi | Ti | Pi | Ei          (powers of 1024)
    decimalSI ::= n | u | m | "" | k | M | G | T | P | E  (powers of 1000)
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

_QUANTITY = re.compile(r"^([+-]?)([0-9]+\.?[0-9]*|\.[0-9]+)"
                       r"(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?$")
_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"n": -3, "u": -2, "m": -1, "k": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}

# pkg/util/bandwidth (kubelet) and containerd's copy: validateBandwidthIsReasonable
MIN_BANDWIDTH = 1_000  # bit/s, "1k"
MAX_BANDWIDTH = 10**15  # bit/s, "1P"
INGRESS_ANNOTATION = "kubernetes.io/ingress-bandwidth"
EGRESS_ANNOTATION = "kubernetes.io/egress-bandwidth"


class QuantityError(ValueError):
    """Text that is not a Kubernetes quantity, or one out of the range it is used in."""


def parse_quantity(text: str) -> Fraction:
    """The exact value of a quantity; QuantityError when it does not parse
    (ParseQuantity's ErrFormatWrong / ErrSuffix cases)."""
    m = _QUANTITY.match(text.strip()) if isinstance(text, str) else None
    if m is None or m.group(2) in ("", "."):
        raise QuantityError(f"{text!r} is not a quantity (e.g. 10M, 1G, 512Ki, 1e6)")
    sign, number, suffix = m.group(1), m.group(2), m.group(3) or ""
    value = Fraction(number if not number.endswith(".") else number[:-1])
    if suffix in _BINARY:
        value *= 1024 ** _BINARY[suffix]
    elif suffix in _DECIMAL:
        value *= Fraction(1000) ** _DECIMAL[suffix]
    elif suffix:
        value *= Fraction(10) ** int(suffix[1:])
    return -value if sign == "-" else value


def quantity_value(text: str) -> int:
    """Quantity.Value(): the value as an integer, rounded up (away from zero)."""
    v = parse_quantity(text)
    return math.ceil(v) if v >= 0 else -math.ceil(-v)


# What a rate and a size look like, for the messages of the client, the agent
# and the CRD's CEL rules alike.
RATE_FORM = "use a Kubernetes quantity of bits per second such as 50M (50 Mbit/s) or 1G"
BYTES_FORM = "use a Kubernetes quantity of bytes such as 64Ki, 1M or 256k"
# A number with a unit people write for rates and sizes: 50mbit, 50Mbps,
# 10 Mbit/s, 1GB, 512KiB. Groups: the number, the SI or binary prefix, the
# unit (b, bit, bps: bits; B, byte, Bps: bytes), an optional "/s".
_WITH_UNIT = re.compile(r"^\s*([0-9]+\.?[0-9]*|\.[0-9]+)\s*([kKmMgGtTpPeE]i?)?"
                        r"(bits?|bps|b|[Bb]ytes?|Bps|B)(/s)?\s*$")


def unit_advice(text: str, unit: str = "bit") -> str:
    """How to write `text`, a number with a unit ("50mbit", "10MB"), as a
    quantity of `unit`s (bit or byte): " (write 50M: ...)"; "" for other text.
    A size in the other unit is converted (10MB as bits: 80M)."""
    m = _WITH_UNIT.match(text) if isinstance(text, str) else None
    if m is None:
        return ""
    number, prefix, given = m.group(1), m.group(2) or "", m.group(3)
    bytes_given = given[0] == "B" or given.lower().startswith("byte")
    value = Fraction(number if not number.endswith(".") else number[:-1])
    if bytes_given and unit == "bit":
        value *= 8
    elif not bytes_given and unit == "byte":
        value /= 8
    shown = str(value.numerator) if value.denominator == 1 else f"{float(value):g}"
    suffix = prefix[0].upper() + "i" if len(prefix) == 2 else \
        ("k" if prefix in ("k", "K") else prefix.upper())
    why = (f"a quantity of {unit}s takes no unit, only the multiplier"
           + ("; m would be milli" if prefix[:1] == "m" else ""))
    return f" (write {shown}{suffix}: {why})"


def milli_advice(text: str) -> str:
    """For a quantity with the milli suffix ("50m": 0.05), that m is milli
    and M mega; else ""."""
    if isinstance(text, str) and text.strip().endswith("m"):
        return f" (m is milli, a thousandth: for mega write {text.strip()[:-1]}M)"
    return ""


def bandwidth_bits(text: str) -> int:
    """A bandwidth annotation's rate in bit/s, checked as kubelet checks it:
    QuantityError unless 1k <= value <= 1P. The message says what to write
    (RATE_FORM), with unit_advice for a number with a unit ("50mbit") and
    milli_advice for "50m"."""
    try:
        bits = quantity_value(text)
    except QuantityError:
        raise QuantityError(f"{text!r} is not a quantity: {RATE_FORM}"
                            f"{unit_advice(text)}") from None
    if bits < MIN_BANDWIDTH:
        raise QuantityError(f"{text!r} is unreasonably small (< 1kbit){milli_advice(text)}: "
                            f"{RATE_FORM}")
    if bits > MAX_BANDWIDTH:
        raise QuantityError(f"{text!r} is unreasonably large (> 1Pbit): {RATE_FORM}")
    return bits
