"""Label and field selectors as the Kubernetes API evaluates them on a list
or watch (`?labelSelector=app=web,tier in (fe,be)`, `?fieldSelector=
spec.nodeName=n1`): the emulator (kmock 0.8) ignores both and answers with
every object, so the lab's API proxy filters with these.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

Matcher = Callable[[Mapping[str, Any]], bool]

_KEY = r"[A-Za-z0-9][A-Za-z0-9_./-]*"  # [prefix/]name
_VALUE = r"[A-Za-z0-9_.-]*"
_SET = re.compile(rf"^\s*(!?)\s*({_KEY})\s+(in|notin)\s*\(([^()]*)\)\s*$")
_CMP = re.compile(rf"^\s*({_KEY})\s*(==|=|!=|<|>)\s*({_VALUE})\s*$")
_EXISTS = re.compile(rf"^\s*(!?)\s*({_KEY})\s*$")


class SelectorError(ValueError):
    """A selector the API server would refuse (400 Bad Request)."""


def _requirements(selector: str) -> list[str]:
    """Split on the commas outside parentheses."""
    out, cur, depth = [], "", 0
    for ch in selector:
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        depth += ch == "("
        depth -= ch == ")"
        if depth < 0:
            raise SelectorError(f"unbalanced parentheses in {selector!r}")
        cur += ch
    if depth:
        raise SelectorError(f"unbalanced parentheses in {selector!r}")
    out.append(cur)
    return [r for r in out if r.strip()]


def label_selector(selector: str) -> Matcher:
    """A label selector (k8s.io/apimachinery labels.Parse): requirements
    joined by commas, all of which must hold: `k=v`/`k==v`, `k!=v` (also
    true without the label), `k in (a,b)`, `k notin (a,b)` (also true
    without it), `k` (has the label), `!k` (has not), `k>n`/`k<n` (an
    integer label). Returns a test of an object's metadata.labels; raises
    SelectorError for a selector that does not parse."""
    tests: list[Callable[[Mapping[str, str]], bool]] = []
    for req in _requirements(selector):
        if m := _SET.match(req):
            if m.group(1):
                raise SelectorError(f"'!' before a set requirement: {req!r}")
            values = frozenset(v.strip() for v in m.group(4).split(",") if v.strip())
            if not all(re.fullmatch(_VALUE, v) for v in values):
                raise SelectorError(f"invalid value in {req!r}")
            tests.append(_requirement(m.group(2), m.group(3), values))
        elif m := _CMP.match(req):
            key, op, value = m.groups()
            if op in ("<", ">"):
                try:
                    int(value)
                except ValueError:
                    raise SelectorError(f"{op} needs an integer: {req!r}") from None
            tests.append(_requirement(key, op, frozenset([value])))
        elif m := _EXISTS.match(req):
            tests.append(_requirement(m.group(2), "!" if m.group(1) else "exists", frozenset()))
        else:
            raise SelectorError(f"unable to parse requirement {req!r}")

    def match(obj: Mapping[str, Any]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(t(labels) for t in tests)

    return match


def _requirement(key: str, op: str, values: frozenset[str]
                 ) -> Callable[[Mapping[str, str]], bool]:
    def test(labels: Mapping[str, str]) -> bool:
        have = labels.get(key)
        if op in ("=", "==", "in"):
            return have in values
        if op in ("!=", "notin"):
            return have not in values
        if op == "exists":
            return key in labels
        if op == "!":
            return key not in labels
        try:  # < and >: integers
            n, bound = int(have or ""), int(next(iter(values)))
        except ValueError:
            return False
        return n > bound if op == ">" else n < bound

    return test


def field_selector(selector: str) -> Matcher:
    """A field selector (fields.ParseSelector): `path=value`,
    `path==value`, `path!=value`, joined by commas; `path` is a dotted path
    into the object (metadata.name, metadata.namespace, spec.nodeName,
    status.phase, ...), a missing field reads as "". Raises SelectorError
    for anything else."""
    tests: list[tuple[list[str], bool, str]] = []
    for req in _requirements(selector):
        m = re.match(r"^\s*([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*?)\s*$", req)
        if not m:
            raise SelectorError(f"invalid field selector requirement {req!r}")
        tests.append((m.group(1).split("."), m.group(2) != "!=", m.group(3)))

    def value(obj: Any, path: list[str]) -> str:
        for part in path:
            obj = obj.get(part) if isinstance(obj, Mapping) else None
        if obj is None:
            return ""
        return str(obj).lower() if isinstance(obj, bool) else str(obj)

    def match(obj: Mapping[str, Any]) -> bool:
        return all((value(obj, path) == want) == equal for path, equal, want in tests)

    return match


def selector_of(query: Mapping[str, str]) -> Matcher | None:
    """The test of a list or watch request's labelSelector and fieldSelector
    (both must hold); None when it has neither. SelectorError if one does
    not parse."""
    tests = []
    if query.get("labelSelector"):
        tests.append(label_selector(query["labelSelector"]))
    if query.get("fieldSelector"):
        tests.append(field_selector(query["fieldSelector"]))
    if not tests:
        return None
    return lambda obj: all(t(obj) for t in tests)
