"""What the listing verbs show (functions, nodeports, status, stats): plain
data (printed as is with -o yaml/json) and its text rendering (-o
table/wide). Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from . import agents
from . import chains as ch
from .output import NONE, age, human_bytes, human_duration, ready, table
from .rules import rule_to_text

Obj = Mapping[str, Any]


def meta(o: Obj) -> Mapping[str, Any]:
    return o.get("metadata") or {}


def arrow(names: Sequence[str]) -> str:
    return " -> ".join(names) if names else NONE


def as_list(items: Sequence[Obj]) -> dict[str, Any]:
    """Objects as kubectl prints several with -o yaml/json."""
    return {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""},
            "items": list(items)}


# ----------------------------------------------------------------------------- functions
def places(chains: Sequence[Obj]) -> dict[tuple[str, str], list[str]]:
    """(namespace, function) -> ["chain:side#position", ...]."""
    out: dict[tuple[str, str], list[str]] = {}
    for c in chains:
        for side in ch.SIDES:
            for i, f in enumerate(ch.side_of(c, side), 1):
                key = (meta(c).get("namespace") or "", f)
                out.setdefault(key, []).append(f"{ch.name_of(c)}:{side}#{i}")
    return out


def rules_of(nf: Obj) -> list[str]:
    out = []
    for r in ((nf.get("spec") or {}).get("config") or {}).get("rules") or []:
        try:
            out.append(rule_to_text(r))
        except ValueError:
            out.append(f"<invalid: {r}>")
    return out


def functions_table(nfs: Sequence[Obj], chains: Sequence[Obj], all_namespaces: bool,
                    wide: bool, now: float | None = None) -> str:
    where = places(chains)
    headers = ["name", "type", "rules", "default", "chains", "ready", "pods", "age"]
    if wide:
        headers += ["nodes", "reason", "message"]
    if all_namespaces:
        headers.insert(0, "namespace")
    rows = []
    for nf in nfs:
        m, spec = meta(nf), nf.get("spec") or {}
        config = spec.get("config") or {}
        status, reason, message = ready(nf)
        name = m.get("name")
        chains_of = where.get((m.get("namespace") or "", name), []) if name is not None else []
        row = [name, spec.get("type"), len(config.get("rules") or []),
               config.get("defaultAction", "allow"), ",".join(chains_of),
               status, (nf.get("status") or {}).get("realizedPods", 0),
               age(m.get("creationTimestamp"), now)]
        if wide:
            row += [(nf.get("status") or {}).get("realizedNodes", 0), reason, message]
        if all_namespaces:
            row.insert(0, m.get("namespace"))
        rows.append(row)
    return table(headers, rows)


# ----------------------------------------------------------------------------- nodeports
def nodeports_table(rules: Sequence[Obj], wide: bool, now: float | None = None) -> str:
    headers = ["name", "port", "protocol", "policy", "target", "ready", "nodes", "age"]
    if wide:
        headers += ["backends", "reason", "message"]
    rows = []
    for r in rules:
        m, spec = meta(r), r.get("spec") or {}
        svc = spec.get("service")
        backends = spec.get("backends") or []
        target = (f"service {svc.get('namespace')}/{svc.get('name')}:{svc.get('port')}"
                  if svc else f"{len(backends)} backend(s)")
        status, reason, message = ready(r)
        row = [m.get("name"), spec.get("port"), spec.get("protocol", "TCP"),
               spec.get("externalTrafficPolicy", "Cluster"), target, status,
               (r.get("status") or {}).get("realizedNodes", 0),
               age(m.get("creationTimestamp"), now)]
        if wide:
            row += [",".join(f"{b.get('ip')}:{b.get('port')}" for b in backends) or NONE,
                    reason, message]
        rows.append(row)
    return table(headers, rows)


# ----------------------------------------------------------------------------- status
def status_data(reports: Sequence[agents.NodeReport], nodes: Sequence[Obj] | None,
                now: float | None = None) -> list[dict[str, Any]]:
    out = []
    seen = set()
    for r in reports:
        seen.add(r.node)
        d = r.data
        heartbeat_age = agents.heartbeat_age(r, now)
        out.append({"node": r.node, "state": agents.state(r, now),
                    "healthy": bool(d.get("healthy")), "dataplane": d.get("dataplane"),
                    "version": d.get("version"), "heartbeat": d.get("heartbeat"),
                    "heartbeatAgeSeconds": None if heartbeat_age is None else
                    round(heartbeat_age, 1),
                    "lastError": d.get("lastError") or r.error or "",
                    "realized": d.get("realized") or {},
                    "reconciles": d.get("reconciles"), "applyErrors": d.get("applyErrors")})
    for n in nodes or []:
        name = meta(n).get("name")
        if name and name not in seen:
            out.append({"node": name, "state": "NoAgent", "healthy": False, "dataplane": None,
                        "version": None, "heartbeat": None, "heartbeatAgeSeconds": None,
                        "lastError": "no pcn-agent-status ConfigMap for this node: is the "
                                     "agent running here?", "realized": {},
                        "reconciles": None, "applyErrors": None})
    return sorted(out, key=lambda x: x["node"])


def status_table(data: Sequence[Mapping[str, Any]], wide: bool) -> str:
    headers = ["node", "state", "dataplane", "version", "pods", "functions", "chains",
               "heartbeat", "last error"]
    if wide:
        headers[7:7] = ["services", "nodeports", "peers", "reconciles", "apply errors"]
    rows = []
    for d in data:
        real = d.get("realized") or {}
        beat = d.get("heartbeatAgeSeconds")
        row = [d["node"], d["state"], d.get("dataplane"), d.get("version"), real.get("pods"),
               real.get("functions"), real.get("chains"),
               NONE if beat is None else f"{human_duration(beat)} ago", d.get("lastError")]
        if wide:
            row[7:7] = [real.get("services"), real.get("nodeports"), real.get("peers"),
                        d.get("reconciles"), d.get("applyErrors")]
        rows.append(row)
    return table(headers, rows)


# ----------------------------------------------------------------------------- stats
def stats_data(reports: Sequence[agents.NodeReport], namespace: str | None
               ) -> dict[str, Any]:
    pods = [{"namespace": p.namespace, "pod": p.name, "node": p.node,
             "ip": p.entry.get("ip"), "port": p.entry.get("port"), "counters": p.counters}
            for p in agents.pods(reports, namespace)]
    fns = [t.as_dict() for _, t in sorted(agents.functions(reports, namespace).items())]
    return {"pods": pods, "functions": fns}


def stats_namespaces(reports: Sequence[agents.NodeReport]) -> list[str]:
    """The namespaces of the pods and functions the agents report, sorted."""
    return sorted({p.namespace for p in agents.pods(reports)} |
                  {ns for ns, _ in agents.functions(reports)} - {""})


def _counter_cells(c: Mapping[str, int]) -> list[Any]:
    return [c.get("rx_packets", 0), human_bytes(c.get("rx_bytes", 0)), c.get("tx_packets", 0),
            human_bytes(c.get("tx_bytes", 0)), c.get("drops", 0)]


def stats_table(data: Mapping[str, Any], all_namespaces: bool, wide: bool) -> str:
    ns_col = ["namespace"] if all_namespaces else []
    pod_rows = [([p["namespace"]] if all_namespaces else []) +
                [p["pod"], p["node"], p["port"], p["ip"]] + _counter_cells(p["counters"])
                for p in data["pods"]]
    out = ["PODS (their own view: rx = received by the pod, tx = sent by it)",
           table(ns_col + ["pod", "node", "port", "ip", "rx packets", "rx bytes",
                           "tx packets", "tx bytes", "drops"], pod_rows) if pod_rows
           else NONE, "",
           "FUNCTIONS (summed over nodes)"]
    fn_rows = []
    for f in data["functions"]:
        hits = sum(r["hits"] for r in f["rules"])
        fn_rows.append(([f["namespace"]] if all_namespaces else []) +
                       [f["name"], f["type"], len(f["rules"]), hits, f["defaultAction"],
                        f["defaultHits"], f["drops"], ",".join(f["nodes"])])
    out.append(table(ns_col + ["function", "type", "rules", "rule hits", "default",
                               "default hits", "drops", "nodes"], fn_rows)
               if fn_rows else NONE)
    if wide and data["functions"]:
        out += ["", "RULES"]
        rule_rows = []
        for f in data["functions"]:
            for i, r in enumerate(f["rules"], 1):
                rule_rows.append(([f["namespace"]] if all_namespaces else []) +
                                 [f["name"], i, r["rule"], r["hits"]])
            rule_rows.append(([f["namespace"]] if all_namespaces else []) +
                             [f["name"], "default", f["defaultAction"], f["defaultHits"]])
        out.append(table(ns_col + ["function", "#", "rule", "hits"], rule_rows))
    return "\n".join(out)
