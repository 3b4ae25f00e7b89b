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
        firewall = spec.get("type") == "firewall"
        row = [name, spec.get("type"), len(config.get("rules") or []) if firewall else NONE,
               config.get("defaultAction", "allow") if firewall else NONE, ",".join(chains_of),
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
    typed: dict[str, list[tuple[str, str, Mapping[str, Any]]]] = {}
    for f in data["functions"]:
        hits = sum(r["hits"] for r in f["rules"])
        firewall = f["type"] == "firewall"
        fn_rows.append(([f["namespace"]] if all_namespaces else []) +
                       [f["name"], f["type"], len(f["rules"]) if firewall else NONE,
                        hits if firewall else NONE, f["defaultAction"] if firewall else NONE,
                        f["defaultHits"] if firewall else NONE, f["drops"],
                        ",".join(f["nodes"])])
        if not firewall:
            typed.setdefault(f["type"], []).append((",".join(f["nodes"]) or NONE,
                                                    f"{f['namespace']}/{f['name']}", f))
    out.append(table(ns_col + ["function", "type", "rules", "rule hits", "default",
                               "default hits", "drops", "nodes"], fn_rows)
               if fn_rows else NONE)
    for type_, entries in typed.items():
        out += ["", f"{type_.upper()}S (summed over nodes)",
                typed_table(type_, entries, where="nodes")]
    if wide and any(f["type"] == "firewall" for f in data["functions"]):
        out += ["", "RULES"]
        rule_rows = []
        for f in data["functions"]:
            if f["type"] != "firewall":
                continue
            for i, r in enumerate(f["rules"], 1):
                rule_rows.append(([f["namespace"]] if all_namespaces else []) +
                                 [f["name"], i, r["rule"], r["hits"]])
            rule_rows.append(([f["namespace"]] if all_namespaces else []) +
                             [f["name"], "default", f["defaultAction"], f["defaultHits"]])
        out.append(table(ns_col + ["function", "#", "rule", "hits"], rule_rows))
    return "\n".join(out)


def _rate(bits: Any) -> str:
    if not isinstance(bits, int):
        return NONE
    for suffix, scale in (("P", 10**15), ("T", 10**12), ("G", 10**9), ("M", 10**6),
                          ("k", 10**3)):
        if bits % scale == 0:
            return f"{bits // scale} {suffix}bit/s"
    return f"{bits} bit/s"


def typed_table(type_: str, rows: Sequence[tuple[str, str, Mapping[str, Any]]],
                where: str = "side") -> str:
    """One table of a type's own settings and counters, a row per (side or
    node, function, entry with "settings"/"counters" or "config"). Policers:
    rate, burst, scope, what passed and what was dropped; other types: their
    counters by name."""
    if type_ == "policer":
        out = []
        for place, fname, e in rows:
            st, c, cfg = e.get("settings") or {}, e.get("counters"), e.get("config") or {}
            out.append([place, fname, _rate(st.get("rate")) if "rate" in st else
                        cfg.get("rate", NONE),
                        human_bytes(st["burst"]) if "burst" in st else cfg.get("burst", NONE),
                        st.get("scope") or cfg.get("scope") or "pod",
                        NONE if c is None else c.get("passedPackets", 0),
                        NONE if c is None else human_bytes(c.get("passedBytes", 0)),
                        NONE if c is None else c.get("droppedPackets", 0),
                        NONE if c is None else human_bytes(c.get("droppedBytes", 0))])
        return table([where, "function", "rate", "burst", "scope", "passed", "passed bytes",
                      "dropped", "dropped bytes"], out)
    keys = sorted({k for _, _, e in rows for k in (e.get("counters") or {})})
    return table([where, "function", *keys],
                 [[w, f, *[(e.get("counters") or {}).get(k, NONE) for k in keys]]
                  for w, f, e in rows])
