"""`kubectl pcn flows`: a pod's top talkers from the flow monitors on its
chain (NetworkFunctions of type flowmonitor), as the node's agent reports
them (`pcn-agent flows`). Pure formatting here; the transport is capture.py's.

Bytes are L3 bytes (IP datagrams, headers included), as conntrack counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

SORT_KEYS = {"bytes": "bytes", "packets": "packets", "last": "lastSeenSecondsAgo"}


def rows(data: dict[str, Any], sort: str, top: int) -> list[dict[str, Any]]:
    """Every monitor's flows, each with its function, sorted (largest first;
    `last`: most recent first) and cut to `top` (0: all)."""
    out = [{**f, "function": m.get("function", "")} for m in data.get("monitors") or []
           for f in m.get("flows") or []]
    key = SORT_KEYS[sort]
    out.sort(key=lambda f: (f[key], -f["bytes"]) if sort == "last" else (-f[key], -f["bytes"]))
    return out[:top] if top else out


def document(data: dict[str, Any], flows: Sequence[dict[str, Any]], sort: str,
             top: int) -> dict[str, Any]:
    """What `-o json|yaml` prints: the agent's answer with `flows` (rows():
    every monitor's flows, each naming its function, sorted by `sort` and cut
    to `top`) in place of the monitors' own flow lists, which would hold
    every flow unsorted; each monitor keeps its function, maxFlows and
    `flowCount` (how many flows it holds for the pod, before --top):
    {"pod", "ip", "node", "sort", "top", "monitors": [...], "flows": [...]}."""
    monitors = [{**{k: v for k, v in m.items() if k != "flows"},
                 "flowCount": len(m.get("flows") or [])} for m in data.get("monitors") or []]
    return {**data, "sort": sort, "top": top, "monitors": monitors, "flows": list(flows)}


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n = n / 1024  # type: ignore[assignment]
    return str(n)


def _ago(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def table(data: dict[str, Any], flows: Sequence[dict[str, Any]], wide: bool = False) -> str:
    head = f"Pod:  {data.get('pod')} ({data.get('ip')}) on node {data.get('node')}"
    monitors = data.get("monitors") or []
    if not monitors:
        return (f"{head}\nNo flow monitor on this pod's chain: add one with\n"
                f"  kubectl pcn add-cube flowmonitor NAME --selector ... (both --hook sides)")
    cols = ["DIRECTION", "PROTO", "SOURCE", "DESTINATION", "PACKETS", "BYTES", "TCP FLAGS",
            "LAST SEEN", "DURATION"]
    if wide:
        cols.append("FUNCTION")
    lines = []
    for f in flows:
        src = f"{f['src']}:{f['sport']}" if f["protocol"] != "icmp" else f["src"]
        dst = f"{f['dst']}:{f['dport']}" if f["protocol"] != "icmp" else f"{f['dst']} id {f['dport']}"
        row = [f["direction"], f["protocol"], src, dst, str(f["packets"]), _size(f["bytes"]),
               f["tcpFlags"] or "-", _ago(f["lastSeenSecondsAgo"]) + " ago",
               f"{f['durationSeconds']:.1f}s"]
        if wide:
            row.append(f["function"])
        lines.append(row)
    widths = [max(len(c), *(len(r[i]) for r in lines)) if lines else len(c)
              for i, c in enumerate(cols)]
    fmt = "   ".join(f"{{:<{w}}}" for w in widths)
    body = [fmt.format(*cols).rstrip(), *(fmt.format(*r).rstrip() for r in lines)]
    bound = ", ".join(f"{m['function']} keeps at most {m['maxFlows']} flows" for m in monitors)
    return "\n".join([head, f"Monitors: {bound}", "", *(body if lines else ["<no flows>"])])
