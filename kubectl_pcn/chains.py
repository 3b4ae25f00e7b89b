"""Where a cube goes: which CubeChain, which side, which position; and the
ordered chain a pod ends up with. Pure functions over plain objects.

Naming and placement rules (also in `kubectl pcn add-cube --help`):
- Without --selector, a function goes in the namespace's chain named
  "default", whose empty podSelector selects every pod of the namespace.
- With --selector, it goes in the chain of the namespace whose podSelector is
  exactly that selector, whatever its name; if there is none, a new chain is
  named after the selector: "pods-" + keys and values ("pods-app-web"), with
  a hash of the selector appended when the name had to be shortened or
  cleaned, or is taken by a chain that selects other pods.
- --chain NAME picks the chain by name instead (created with the --selector,
  or selecting every pod when none is given).
- Positions are 1-based within the chosen chain's side. --position N, --before
  F or --after F move a function that is already there; with none of them a
  function already in the side stays where it is, a new one goes last.
- A pod's effective chain per side is the concatenation of the sides of all
  chains selecting it, in ascending priority then name, each function once
  (its first place), at most MAX_STACKED functions: as the agent does.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from pcn_crds import CubeChain

from .errors import InputError

SIDES = ("ingress", "egress")
DEFAULT_CHAIN = "default"
MAX_PER_CHAIN_SIDE = 6  # CubeChainSpec: max_length of ingress and egress
MAX_STACKED = 6  # per pod and side; the agent's reconcile.MAX_STACKED
DEFAULT_PRIORITY = 100

_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                  r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_SET = re.compile(r"^\s*(?P<key>[^\s!=()]+)\s+(?P<op>in|notin)\s*\((?P<values>[^)]*)\)\s*$")


@dataclass(frozen=True)
class Placement:
    before: str | None = None
    after: str | None = None
    position: int | None = None  # 1-based

    @property
    def given(self) -> bool:
        return self.before is not None or self.after is not None or self.position is not None


# ----------------------------------------------------------------------------- selectors
def _split_terms(text: str) -> list[str]:
    """Split at commas outside parentheses: "a=b,c in (d,e)"."""
    terms, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append(cur)
            cur = ""
        else:
            cur += ch
    terms.append(cur)
    return [t.strip() for t in terms]


def _check_key(key: str, text: str) -> str:
    if not _KEY.match(key):
        raise InputError(f"invalid --selector {text!r}: {key!r} is not a label key")
    return key


def _check_value(value: str, text: str) -> str:
    if not _VALUE.match(value):
        raise InputError(f"invalid --selector {text!r}: {value!r} is not a label value")
    return value


def parse_selector(text: str) -> dict[str, Any]:
    """A kubectl label selector ("app=web,tier!=db,env in (a,b),!legacy,gpu")
    as a CubeChain podSelector."""
    labels: dict[str, str] = {}
    exprs: list[dict[str, Any]] = []
    for term in _split_terms(text):
        if not term:
            raise InputError(f"invalid --selector {text!r}: empty term; write k=v,k2=v2")
        if m := _SET.match(term):
            values = [_check_value(v.strip(), text) for v in m["values"].split(",")]
            exprs.append({"key": _check_key(m["key"], text),
                          "operator": "In" if m["op"] == "in" else "NotIn",
                          "values": sorted(values)})
        elif "!=" in term:
            k, _, v = term.partition("!=")
            exprs.append({"key": _check_key(k.strip(), text), "operator": "NotIn",
                          "values": [_check_value(v.strip(), text)]})
        elif "=" in term:
            k, _, v = term.partition("=")
            k, v = k.strip(), v.strip().removeprefix("=")  # == is = too
            if k in labels and labels[k] != v:
                raise InputError(f"invalid --selector {text!r}: {k} given twice")
            labels[_check_key(k, text)] = _check_value(v, text)
        elif term.startswith("!"):
            exprs.append({"key": _check_key(term[1:].strip(), text), "operator": "DoesNotExist"})
        else:
            exprs.append({"key": _check_key(term, text), "operator": "Exists"})
    sel: dict[str, Any] = {}
    if labels:
        sel["matchLabels"] = dict(sorted(labels.items()))
    if exprs:
        sel["matchExpressions"] = sorted(exprs, key=lambda e: (e["key"], e["operator"]))
    return sel


def canonical_selector(sel: Mapping[str, Any] | None) -> dict[str, Any]:
    """A podSelector with defaults dropped and lists in a stable order, so two
    selectors that select the same pods by the same terms compare equal."""
    sel = sel or {}
    out: dict[str, Any] = {}
    if sel.get("matchLabels"):
        out["matchLabels"] = dict(sorted(sel["matchLabels"].items()))
    exprs = []
    for e in sel.get("matchExpressions") or []:
        item = {"key": e["key"], "operator": e["operator"]}
        if e.get("values"):
            item["values"] = sorted(e["values"])
        exprs.append(item)
    if exprs:
        out["matchExpressions"] = sorted(exprs, key=lambda e: (e["key"], e["operator"],
                                                               e.get("values", [])))
    return out


def format_selector(sel: Mapping[str, Any] | None) -> str:
    """kubectl's selector syntax; "<all pods>" for the empty selector."""
    sel = canonical_selector(sel)
    terms = [f"{k}={v}" for k, v in (sel.get("matchLabels") or {}).items()]
    for e in sel.get("matchExpressions") or []:
        op, key, values = e["operator"], e["key"], e.get("values") or []
        if op == "Exists":
            terms.append(key)
        elif op == "DoesNotExist":
            terms.append(f"!{key}")
        elif op == "NotIn" and len(values) == 1:
            terms.append(f"{key}!={values[0]}")
        else:
            terms.append(f"{key} {op.lower()} ({','.join(values)})")
    return ",".join(terms) or "<all pods>"


def selector_chain_name(sel: Mapping[str, Any], taken: Iterable[str] = ()) -> str:
    """The name of a new chain for a selector (see the module's docstring)."""
    sel = canonical_selector(sel)
    if not sel:
        return DEFAULT_CHAIN
    raw = format_selector(sel)
    slug = re.sub(r"[^a-z0-9]+", "-", raw.lower()).strip("-")
    name = f"pods-{slug}"
    lossy = bool(re.search(r"[^a-z0-9=,-]", raw)) or len(name) > 50
    if lossy or name in set(taken):
        digest = hashlib.sha256(raw.encode()).hexdigest()[:6]
        name = f"{name[:50].rstrip('-')}-{digest}"
    return name


# ----------------------------------------------------------------------------- chains
def spec_of(chain: Mapping[str, Any]) -> Mapping[str, Any]:
    return chain.get("spec") or {}


def name_of(obj: Mapping[str, Any]) -> str:
    return (obj.get("metadata") or {}).get("name") or ""


def side_of(chain: Mapping[str, Any], side: str) -> list[str]:
    return [ref.get("function", "") for ref in spec_of(chain).get(side) or []]


@dataclass
class ChainChoice:
    name: str
    existing: Mapping[str, Any] | None
    selector: dict[str, Any]
    priority: int


def choose_chain(chains: Sequence[Mapping[str, Any]], selector: Mapping[str, Any] | None,
                 chain_name: str | None, priority: int | None) -> ChainChoice:
    """Which chain add-cube writes to (see the module's docstring)."""
    by_name = {name_of(c): c for c in chains}
    want = canonical_selector(selector) if selector is not None else None
    if chain_name is None:
        if want:
            same = sorted((int(spec_of(c).get("priority", DEFAULT_PRIORITY)), name_of(c))
                          for c in chains
                          if canonical_selector(spec_of(c).get("podSelector")) == want)
            chain_name = same[0][1] if same else selector_chain_name(want, by_name)
        else:
            chain_name = DEFAULT_CHAIN
    existing = by_name.get(chain_name)
    if existing is None:
        return ChainChoice(chain_name, None, want or {},
                           DEFAULT_PRIORITY if priority is None else priority)
    have = canonical_selector(spec_of(existing).get("podSelector"))
    if want is not None and have != want:
        raise InputError(f"cubechain {chain_name} selects {format_selector(have)}, not "
                         f"{format_selector(want)}; leave out --selector or --chain, or pick "
                         f"another --chain")
    current = int(spec_of(existing).get("priority", DEFAULT_PRIORITY))
    return ChainChoice(chain_name, existing, have, current if priority is None else priority)


def place(functions: Sequence[str], name: str, placement: Placement,
          side: str = "ingress") -> list[str]:
    """The side's list with `name` placed as asked (idempotent)."""
    current = list(functions)
    if name in current and not placement.given:
        return current
    rest = [f for f in current if f != name]
    if placement.before is not None or placement.after is not None:
        anchor = placement.before if placement.before is not None else placement.after
        if anchor == name:
            raise InputError(f"cannot place {name} relative to itself")
        if anchor not in rest:
            there = ", ".join(rest) or "nothing"
            raise InputError(f"{anchor} is not in the {side} side of the chain (it holds "
                             f"{there}); use one of those, --position N, or no placement")
        index = rest.index(anchor) + (1 if placement.after is not None else 0)
    elif placement.position is not None:
        if not 1 <= placement.position <= len(rest) + 1:
            raise InputError(f"--position {placement.position} is out of range: the {side} "
                             f"side has {len(rest)} other function(s), so use 1 to "
                             f"{len(rest) + 1}")
        index = placement.position - 1
    else:
        index = len(rest)
    rest.insert(index, name)
    if len(rest) > MAX_PER_CHAIN_SIDE:
        raise InputError(f"the {side} side of the chain would hold {len(rest)} functions; a "
                         f"CubeChain holds at most {MAX_PER_CHAIN_SIDE} per side: use another "
                         f"--chain (chains that select the same pod add up)")
    return rest


def without(functions: Sequence[str], name: str) -> list[str]:
    return [f for f in functions if f != name]


# ----------------------------------------------------------------------------- effective
@dataclass
class Slot:
    function: str
    chain: str


@dataclass
class Effective:
    """What the agent puts in a pod's data path, by side, in order."""

    ingress: list[Slot] = field(default_factory=list)
    egress: list[Slot] = field(default_factory=list)
    chains: list[str] = field(default_factory=list)  # selecting the pod, in order
    skipped: dict[str, str] = field(default_factory=dict)  # chain -> why the agent ignores it
    dropped: list[str] = field(default_factory=list)  # functions beyond MAX_STACKED


def usable_chains(chains: Sequence[Mapping[str, Any]], functions: set[str] | None
                  ) -> tuple[list[tuple[int, str, CubeChain]], dict[str, str]]:
    """Chains the agent uses (valid, every function present and valid), in
    the order it applies them; and why the others are skipped."""
    usable: list[tuple[int, str, CubeChain]] = []
    skipped: dict[str, str] = {}
    for obj in chains:
        name = name_of(obj)
        try:
            chain = CubeChain.model_validate(dict(obj))
        except ValidationError as exc:
            skipped[name] = f"invalid: {exc.errors()[0].get('msg')}"
            continue
        refs = [r.function for r in (*chain.spec.ingress, *chain.spec.egress)]
        missing = [r for r in refs if functions is not None and r not in functions]
        if missing:
            skipped[name] = f"NetworkFunction {missing[0]} is missing or invalid"
            continue
        usable.append((chain.spec.priority, name, chain))
    usable.sort(key=lambda t: (t[0], t[1]))
    return usable, skipped


def effective_chain(chains: Sequence[Mapping[str, Any]], labels: Mapping[str, str],
                    functions: set[str] | None = None) -> Effective:
    """A pod's chain from its namespace's CubeChains and its labels;
    `functions` are the valid NetworkFunctions of the namespace (None: trust
    every reference)."""
    usable, skipped = usable_chains(chains, functions)
    out = Effective(skipped=skipped)
    for _, name, chain in usable:
        if not chain.spec.podSelector.matches(dict(labels)):
            continue
        out.chains.append(name)
        for side in SIDES:
            slots: list[Slot] = getattr(out, side)
            for ref in getattr(chain.spec, side):
                if any(s.function == ref.function for s in slots):
                    continue
                if len(slots) >= MAX_STACKED:
                    out.dropped.append(ref.function)
                    continue
                slots.append(Slot(ref.function, name))
    return out
