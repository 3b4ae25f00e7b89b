"""What the node agents report: one ConfigMap per node (pcn-agent-status-<node>
in pcn-system) whose data["status.json"] is the agent's node_status(). Pure
parsing and aggregation."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

STALE_AFTER_S = 30.0  # the agents publish every few seconds


@dataclass
class NodeReport:
    node: str
    data: dict[str, Any] = field(default_factory=dict)
    error: str = ""  # why the report could not be read

    @property
    def pods(self) -> dict[str, dict[str, Any]]:
        return self.data.get("pods") or {}

    @property
    def functions(self) -> dict[str, dict[str, Any]]:
        return self.data.get("functions") or {}


def parse_time(ts: str | None) -> float | None:
    if not ts:
        return None
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).astimezone(UTC).timestamp()
    except ValueError:
        return None


def reports(configmaps: Iterable[Mapping[str, Any]]) -> list[NodeReport]:
    out = []
    for cm in configmaps:
        meta = cm.get("metadata") or {}
        node = (meta.get("labels") or {}).get("pcn.dev/node") or \
            str(meta.get("name", "")).removeprefix("pcn-agent-status-")
        raw = (cm.get("data") or {}).get("status.json")
        if raw is None:
            out.append(NodeReport(node, error="no status.json in the ConfigMap"))
            continue
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            out.append(NodeReport(node, error=f"unreadable status.json: {exc}"))
            continue
        out.append(NodeReport(str(data.get("node") or node), data))
    return sorted(out, key=lambda r: r.node)


def heartbeat_age(report: NodeReport, now: float | None = None) -> float | None:
    at = parse_time(report.data.get("heartbeat"))
    if at is None:
        return None
    return max(0.0, (time.time() if now is None else now) - at)


def state(report: NodeReport, now: float | None = None) -> str:
    """Healthy, Unhealthy, Stale (no heartbeat for STALE_AFTER_S) or Unknown."""
    if report.error:
        return "Unknown"
    age = heartbeat_age(report, now)
    if age is None or age > STALE_AFTER_S:
        return "Stale"
    return "Healthy" if report.data.get("healthy") else "Unhealthy"


@dataclass
class PodView:
    namespace: str
    name: str
    node: str
    entry: dict[str, Any]

    @property
    def counters(self) -> dict[str, int]:
        return {k: int(v) for k, v in (self.entry.get("counters") or {}).items()}


def pods(reports_: Sequence[NodeReport], namespace: str | None = None) -> list[PodView]:
    """Pods the agents attached, optionally of one namespace."""
    out = []
    for r in reports_:
        for key, entry in r.pods.items():
            ns, _, name = key.partition("/")
            if not name:  # a pod the agent could not name: key is its attachment id
                ns, name = "", key
            if namespace is None or ns == namespace:
                out.append(PodView(ns, name, r.node, entry))
    return sorted(out, key=lambda p: (p.namespace, p.name, p.node))


def pod(reports_: Sequence[NodeReport], namespace: str, name: str) -> PodView | None:
    for p in pods(reports_, namespace):
        if p.name == name:
            return p
    return None


@dataclass
class FunctionTotals:
    """One NetworkFunction's counters, summed over the nodes that run it."""

    namespace: str
    name: str
    type: str = ""
    rules: list[str] = field(default_factory=list)
    default: str = ""
    hits: list[int] = field(default_factory=list)
    default_hits: int = 0
    drops: int = 0
    nodes: list[str] = field(default_factory=list)
    # the agents list the first 256 rules of a firewall (their status
    # ConfigMap holds 1 MiB): the count of all, and the hits of the most hit
    # later ones by rule index
    rules_total: int = 0
    later_hits: dict[str, int] = field(default_factory=dict)
    allow_replies: bool = False
    reply_hits: int = 0
    # the type's own counters (a policer's passedPackets...), summed, and its
    # settings as the first node reports them (a policer's rate, burst, scope)
    counters: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def cube(self) -> str:
        return f"nf.{self.namespace}.{self.name}"

    def as_dict(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "name": self.name, "type": self.type,
                "nodes": self.nodes, "defaultAction": self.default,
                "rules": [{"rule": r, "hits": h} for r, h in zip(self.rules, self.hits,
                                                                   strict=False)],
                "defaultHits": self.default_hits, "drops": self.drops,
                **({"rulesTotal": self.rules_total, "laterHits": self.later_hits}
                   if self.rules_total > len(self.rules) else {}),
                **({"allowReplies": True, "replyHits": self.reply_hits}
                   if self.allow_replies else {}),
                **({"counters": self.counters, "settings": self.settings}
                   if self.counters or self.settings else {})}


# What every function's status holds (the firewall's counters among them);
# anything else a type reports is its own (type_counters).
COMMON_KEYS = {"namespace", "name", "type", "rules", "default", "hits", "defaultHits", "drops",
               "rulesTotal", "laterHits", "allowReplies", "replyHits"}


def type_counters(entry: Mapping[str, Any]) -> tuple[dict[str, int], dict[str, Any]]:
    """A function's own counters (integer keys ending in Packets or Bytes) and
    settings (the other keys) beyond COMMON_KEYS, from its status entry."""
    counters: dict[str, int] = {}
    settings: dict[str, Any] = {}
    for k, v in entry.items():
        if k in COMMON_KEYS:
            continue
        if k == "counters" and isinstance(v, Mapping):  # a CubeType's, by the names it gave
            counters.update({str(c): int(n) for c, n in v.items()})
            continue
        if isinstance(v, int) and k.endswith(("Packets", "Bytes")):
            counters[k] = v
        else:
            settings[k] = v
    return counters, settings


def functions(reports_: Sequence[NodeReport], namespace: str | None = None
              ) -> dict[tuple[str, str], FunctionTotals]:
    out: dict[tuple[str, str], FunctionTotals] = {}
    for r in reports_:
        for cube, f in r.functions.items():
            parts = cube.split(".", 2)
            ns = f.get("namespace") or (parts[1] if len(parts) == 3 else "")
            name = f.get("name") or (parts[2] if len(parts) == 3 else cube)
            if namespace is not None and ns != namespace:
                continue
            t = out.setdefault((ns, name), FunctionTotals(ns, name))
            t.type = f.get("type") or t.type
            rules = list(f.get("rules") or [])
            hits = [int(h) for h in f.get("hits") or []]
            later = {str(k): int(v) for k, v in (f.get("laterHits") or {}).items()}
            total = int(f.get("rulesTotal") or len(rules))
            if not t.nodes:
                t.rules, t.hits, t.rules_total, t.later_hits = rules, hits, total, later
            elif rules == t.rules and total == t.rules_total:
                t.hits = [a + b for a, b in zip(t.hits, hits, strict=False)]
                for k, v in later.items():
                    t.later_hits[k] = t.later_hits.get(k, 0) + v
            # else the node still runs other rules (an update on its way): its
            # per-rule hits do not add up with these
            t.default = f.get("default") or t.default
            t.default_hits += int(f.get("defaultHits") or 0)
            t.allow_replies = t.allow_replies or bool(f.get("allowReplies"))
            t.reply_hits += int(f.get("replyHits") or 0)
            t.drops += int(f.get("drops") or 0)
            counters, settings = type_counters(f)
            for k, v in counters.items():
                t.counters[k] = t.counters.get(k, 0) + v
            if not t.nodes:
                t.settings = settings
            t.nodes.append(r.node)
    return out


def sum_counters(views: Iterable[PodView]) -> dict[str, int]:
    total: dict[str, int] = {}
    for v in views:
        for k, n in v.counters.items():
            total[k] = total.get(k, 0) + n
    return total
