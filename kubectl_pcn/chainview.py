"""What `kubectl pcn chain` shows: a pod's ordered chain (which CubeChains
select it, the functions per side with their rule hits and drops, the pod's
counters) or a namespace's chains, pods and functions. Plain data (printed
as is with -o yaml/json) and its text rendering. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from . import agents
from . import chains as ch
from .output import NONE, human_bytes, ready, table
from .views import Obj, arrow, meta, rules_of, typed_table

# The agents list a firewall's first 256 rules with their hits and, of the
# later ones, the hits of the 256 most hit (pcn_agent.dataplane.cubes.
# functions STATUS_RULES and STATUS_LATER_HITS): the status ConfigMap holds 1 MiB.
AGENT_LATER_HITS = 256
# The text view lists a firewall's rules when it has at most this many, else
# this many of its most hit ones (-o json lists all)
RULES_LISTED = 20


def _valid_functions(nfs: Sequence[Obj]) -> dict[str, Obj]:
    from pydantic import ValidationError

    from pcn_crds import NetworkFunction

    out = {}
    for nf in nfs:
        try:
            NetworkFunction.model_validate({**nf, "apiVersion": "pcn.dev/v1alpha1",
                                            "kind": "NetworkFunction", "status": None})
        except ValidationError:
            continue
        out[meta(nf).get("name") or ""] = nf
    return out


def firewall_rules(texts: Sequence[str], hits: Sequence[int], total: int,
                   later: Mapping[str, int], spec_rules: Sequence[str]) -> list[dict[str, Any]]:
    """Every rule of a firewall, in order, as {"rule": text, "hits": n}.

    The agent reports the first len(`texts`) rules with their `hits`, the
    count of all (`total`, its rulesTotal) and the hits of the most hit later
    rules by 0-based index (`later`, its laterHits). A later rule's text comes
    from the NetworkFunction (`spec_rules`; "rule N" if the spec has fewer);
    its hits from `later`, else 0 when `later` lists fewer than the agent's
    bound (then it lists every later rule with hits), else None (unknown,
    at most the least listed)."""
    out = [{"rule": r, "hits": int(h)} for r, h in zip(texts, hits, strict=False)]
    complete = len(later) < AGENT_LATER_HITS
    for i in range(len(out), max(total, len(out))):
        h = later.get(str(i))
        out.append({"rule": spec_rules[i] if i < len(spec_rules) else f"rule {i + 1}",
                    "hits": int(h) if h is not None else (0 if complete else None)})
    return out


def _rule_hits(rules: Sequence[Mapping[str, Any]]) -> int | None:
    """The hits of all rules (None when no agent reported any)."""
    hits = [r["hits"] for r in rules if r["hits"] is not None]
    return sum(hits) if hits else None


def _function_entry(position: int, slot: ch.Slot, nf: Obj | None,
                    counters: Mapping[str, Any] | None, realized: Sequence[str] | None,
                    namespace: str) -> dict[str, Any]:
    spec = (nf or {}).get("spec") or {}
    config = spec.get("config") or {}
    firewall = spec.get("type") == "firewall"
    entry: dict[str, Any] = {"position": position, "function": slot.function,
                             "chain": slot.chain, "type": spec.get("type"),
                             "defaultAction": config.get("defaultAction", "allow")
                             if firewall else None}
    if not firewall:
        entry["config"] = dict(config)
    if counters is not None and not firewall:
        entry["counters"], entry["settings"] = agents.type_counters(counters)
    if counters is not None:
        entry["rules"] = firewall_rules(
            counters.get("rules") or [], counters.get("hits") or [],
            int(counters.get("rulesTotal") or 0), counters.get("laterHits") or {},
            rules_of(nf or {}) if int(counters.get("rulesTotal") or 0) > len(
                counters.get("rules") or []) else [])
        entry["defaultHits"] = int(counters.get("defaultHits") or 0)
        entry["drops"] = int(counters.get("drops") or 0)
        if firewall and counters.get("allowReplies"):
            # replies let through by tracking, counted apart from the rules
            entry["replyHits"] = int(counters.get("replyHits") or 0)
    else:
        entry["rules"] = [{"rule": r, "hits": None} for r in rules_of(nf or {})]
        entry["defaultHits"] = None
        entry["drops"] = None
    entry["rulesTotal"] = len(entry["rules"])
    entry["ruleHits"] = _rule_hits(entry["rules"])
    if realized is not None:
        entry["realized"] = f"nf.{namespace}.{slot.function}" in realized
    return entry


def _chain_summary(c: Obj, skipped: Mapping[str, str]) -> dict[str, Any]:
    spec = c.get("spec") or {}
    status, reason, message = ready(c)
    return {"name": ch.name_of(c), "priority": spec.get("priority", ch.DEFAULT_PRIORITY),
            "selector": ch.format_selector(spec.get("podSelector")),
            "ingress": ch.side_of(c, "ingress"), "egress": ch.side_of(c, "egress"),
            "ready": status, "reason": reason, "message": message,
            "pods": (c.get("status") or {}).get("realizedPods", 0),
            "skipped": skipped.get(ch.name_of(c))}


def pod_chain_data(pod: Obj, chains: Sequence[Obj], nfs: Sequence[Obj],
                   reports: Sequence[agents.NodeReport]) -> dict[str, Any]:
    m = meta(pod)
    namespace, name = m.get("namespace") or "", m.get("name") or ""
    labels = m.get("labels") or {}
    functions = _valid_functions(nfs)
    eff = ch.effective_chain(chains, labels, set(functions))
    view = agents.pod(reports, namespace, name)
    node = view.node if view else (pod.get("spec") or {}).get("nodeName")
    node_report = next((r for r in reports if r.node == node), None)
    by_name = {ch.name_of(c): c for c in chains}
    out: dict[str, Any] = {
        "namespace": namespace, "pod": name, "node": node, "labels": dict(labels),
        "ip": view.entry.get("ip") if view else (pod.get("status") or {}).get("podIP"),
        "port": view.entry.get("port") if view else None,
        "counters": view.counters if view else None,
        "chains": [{"name": c, "priority": (by_name[c].get("spec") or {}).get(
            "priority", ch.DEFAULT_PRIORITY), "selector": ch.format_selector(
            (by_name[c].get("spec") or {}).get("podSelector"))} for c in eff.chains],
        "skippedChains": dict(eff.skipped),
        "beyondLimit": list(eff.dropped)}
    for side in ch.SIDES:
        realized = view.entry.get(side) if view else None
        out[side] = [
            _function_entry(i, slot, functions.get(slot.function),
                            (node_report.functions.get(f"nf.{namespace}.{slot.function}")
                             if node_report else None), realized, namespace)
            for i, slot in enumerate(getattr(eff, side), 1)]
        if view is not None:
            want = [f"nf.{namespace}.{s.function}" for s in getattr(eff, side)]
            out.setdefault("realized", {})[side] = list(realized or [])
            out.setdefault("inSync", True)
            out["inSync"] = out["inSync"] and list(realized or []) == want
    if view is None:
        out["realized"] = None
        out["inSync"] = None
    # NetworkPolicy and ClusterNetworkPolicy in force (the node's policy cube,
    # innermost on both sides): per rule, packets of what it let in or out
    out["policy"] = view.entry.get("policy") if view else None
    # its bandwidth annotations' policers (by side: rate, burst, counters)
    out["bandwidth"] = view.entry.get("bandwidth") if view else None
    return out


def namespace_chain_data(namespace: str, chains: Sequence[Obj], nfs: Sequence[Obj],
                         pods: Sequence[Obj] | None, reports: Sequence[agents.NodeReport]
                         ) -> dict[str, Any]:
    functions = _valid_functions(nfs)
    usable, skipped = ch.usable_chains(chains, set(functions))
    order = [name for _, name, _ in usable] + sorted(skipped)
    by_name = {ch.name_of(c): c for c in chains}
    pod_rows = []
    for p in pods or []:
        eff = ch.effective_chain(chains, meta(p).get("labels") or {}, set(functions))
        view = agents.pod(reports, namespace, meta(p).get("name") or "")
        pod_rows.append({"pod": meta(p).get("name"),
                         "node": view.node if view else (p.get("spec") or {}).get("nodeName"),
                         "chains": eff.chains,
                         "ingress": [s.function for s in eff.ingress],
                         "egress": [s.function for s in eff.egress]})
    totals = agents.functions(reports, namespace)
    fn_rows = []
    for fname, nf in sorted(functions.items()):
        t = totals.get((namespace, fname))
        config = (nf.get("spec") or {}).get("config") or {}
        firewall = (nf.get("spec") or {}).get("type") == "firewall"
        rules = (firewall_rules(t.rules, t.hits, t.rules_total, t.later_hits,
                                rules_of(nf) if t.rules_total > len(t.rules) else [])
                 if t else [{"rule": r, "hits": None} for r in rules_of(nf)])
        extra = {} if firewall else {"config": dict(config),
                                     "counters": t.counters if t else None,
                                     "settings": t.settings if t else None}
        fn_rows.append({**extra, "function": fname, "type": (nf.get("spec") or {}).get("type"),
                        "defaultAction": config.get("defaultAction", "allow")
                        if firewall else None,
                        "rules": rules, "rulesTotal": len(rules),
                        "ruleHits": _rule_hits(rules),
                        "defaultHits": t.default_hits if t else None,
                        "drops": t.drops if t else None, "nodes": t.nodes if t else []})
    return {"namespace": namespace,
            "chains": [_chain_summary(by_name[n], skipped) for n in order],
            "pods": pod_rows if pods is not None else None,
            "functions": fn_rows}


def _n(v: Any) -> Any:
    return NONE if v is None else v


def pod_chain_text(d: Mapping[str, Any]) -> str:
    lines = [f"Pod:       {d['namespace']}/{d['pod']}",
             f"Node:      {d.get('node') or NONE}",
             f"IP:        {d.get('ip') or NONE}    port {d.get('port') or NONE}",
             f"Labels:    {','.join(f'{k}={v}' for k, v in sorted(d['labels'].items())) or NONE}",
             "Chains:    " + (", ".join(f"{c['name']} (priority {c['priority']}, selects "
                                        f"{c['selector']})" for c in d["chains"]) or NONE)]
    c = d.get("counters")
    if c is not None:
        lines.append(f"Counters:  rx {c.get('rx_packets', 0)} packets / "
                     f"{human_bytes(c.get('rx_bytes', 0))}   tx {c.get('tx_packets', 0)} "
                     f"packets / {human_bytes(c.get('tx_bytes', 0))}   drops "
                     f"{c.get('drops', 0)}")
    else:
        lines.append("Counters:  <none> (no agent reports this pod)")
    if d.get("inSync") is False:
        lines.append("Warning:   the agent's chain differs from the one above (it catches up "
                     "within seconds; if not, see `kubectl pcn status`)")
    for name, why in sorted(d["skippedChains"].items()):
        lines.append(f"Skipped:   cubechain {name}: {why}")
    if d["beyondLimit"]:
        lines.append(f"Dropped:   {', '.join(d['beyondLimit'])} (more than "
                     f"{ch.MAX_STACKED} functions on one side)")
    rule_rows: list[list[Any]] = []
    # a function on both sides is one cube with one set of counters: its
    # rules are listed once, side "both", not once per side with the same hits
    listed: dict[str, list[list[Any]]] = {}
    typed_rows: dict[str, list[tuple[str, Mapping[str, Any]]]] = {}
    for side, title in (("ingress", "INGRESS (traffic to the pod)"),
                        ("egress", "EGRESS (traffic from the pod)")):
        lines += ["", title]
        entries = d[side]
        if not entries:
            lines.append(NONE)
            continue
        headers = ["#", "function", "type", "chain", "rules", "rule hits", "default",
                   "default hits", "drops", "realized"]
        rows = []
        for e in entries:
            realized = e.get("realized")
            firewall = e["type"] == "firewall"
            rows.append([e["position"], e["function"], e["type"], e["chain"],
                         e.get("rulesTotal", len(e["rules"])) if firewall else NONE,
                         _n(e.get("ruleHits")) if firewall else NONE,
                         _n(e["defaultAction"]), _n(e["defaultHits"]) if firewall else NONE,
                         _n(e["drops"]),
                         NONE if realized is None else ("yes" if realized else "no")])
            if not firewall:
                # one cube on both sides: its counters once, side "both"
                typed = typed_rows.setdefault(e["type"], [])
                twice = [i for i, (_, t) in enumerate(typed) if t["function"] == e["function"]]
                if twice:
                    typed[twice[0]] = ("both", typed[twice[0]][1])
                else:
                    typed.append((side, e))
                continue
            if e["function"] in listed:
                for row in listed[e["function"]]:
                    row[0] = "both"
                continue
            rows_of = [[side, e["function"], *row] for row in rule_listing(e["rules"])]
            rows_of.append([side, e["function"], "default", e["defaultAction"],
                            _n(e["defaultHits"])])
            if "replyHits" in e:
                rows_of.append([side, e["function"], "replies",
                                "of connections it allowed (allowReplies)", e["replyHits"]])
            listed[e["function"]] = rows_of
            rule_rows += rows_of
        lines.append(table(headers, rows))
    both = [f for f, rows_of in listed.items() if rows_of and rows_of[0][0] == "both"]
    if both:
        lines += ["", f"Note:      {', '.join(both)} on both sides: one cube, whose counters "
                      "are both sides' together (shown on each side's row)"]
    if rule_rows:
        lines += ["", f"RULES (hits on node {d.get('node') or NONE})",
                  table(["side", "function", "#", "rule", "hits"], rule_rows)]
    for type_, typed in typed_rows.items():
        lines += ["", f"{type_.upper()}S (counters on node {d.get('node') or NONE})",
                  typed_table(type_, [(side, e["function"], e) for side, e in typed])]
    bandwidth = d.get("bandwidth") or {}
    if bandwidth:
        lines += ["", "BANDWIDTH (kubernetes.io/ingress-bandwidth, egress-bandwidth: a policer "
                  "nearest the pod)",
                  typed_table("policer", [(side, f"bw.{side}", {
                      "settings": agents.type_counters(b)[1],
                      "counters": agents.type_counters(b)[0]})
                      for side, b in sorted(bandwidth.items())])]
    lines += _policy_text(d.get("policy"), d.get("node"))
    return "\n".join(lines)


def rule_listing(rules: Sequence[Mapping[str, Any]], most: int = RULES_LISTED
                 ) -> list[list[Any]]:
    """The rows [number (1-based), rule, hits] that the text view lists of a
    firewall's rules: all of them when they are at most `most`, else the
    `most` most hit ones with hits (in rule order; the first `most` when no
    agent reported hits) and a last row "... N more rules (M with hits),
    -o json for all"."""
    if len(rules) <= most:
        return [[i, r["rule"], _n(r["hits"])] for i, r in enumerate(rules, 1)]
    hit = [i for i, r in enumerate(rules) if r["hits"]]
    if any(r["hits"] is not None for r in rules):
        shown = sorted(sorted(hit, key=lambda i: -int(rules[i]["hits"]))[:most])
    else:
        shown = list(range(most))
    rows: list[list[Any]] = [[i + 1, rules[i]["rule"], _n(rules[i]["hits"])] for i in shown]
    more = f"{len(rules) - len(shown)} more rules"
    if hit or any(r["hits"] is not None for r in rules):
        more += f" ({len(hit) - len(set(hit) & set(shown))} with hits)"
    return [*rows, ["...", f"{more}, -o json for all", ""]]


def _policy_text(policy: Mapping[str, Any] | None, node: str | None) -> list[str]:
    """The pod's network policies (next to the bridge, after the chain's
    functions on the way out and before them on the way in), one row per
    rule in evaluation order, with the packets of the connections it let in
    or out (or refused): PACKETS those going the rule's way (to the pod on
    an ingress row), REPLIES those going back, counted on the same row and
    never added to the other side's (agents before the reply counters
    report none: NONE)."""
    lines = ["", f"NETWORK POLICY (innermost on both sides; counters on node {node or NONE}; "
                 "replies: the same connections' packets the other way)"]
    if not policy:
        return lines + ["<none>: no NetworkPolicy or ClusterNetworkPolicy applies to the pod"]
    rows = []
    for r in policy.get("rules") or []:
        if r["rule"] in ("default", "host") and not r.get("packets") and \
                not r.get("replyPackets"):
            continue
        what = r["rule"]
        if r["rule"] == "isolation":
            what = "isolation by " + ", ".join(r.get("policies") or []) if r.get(
                "policies") else "isolation"
        replied = "replyPackets" in r
        rows.append([r.get("direction") or NONE, what, r.get("action") or NONE,
                     r.get("packets", 0), human_bytes(r.get("bytes", 0)),
                     r["replyPackets"] if replied else NONE,
                     human_bytes(r.get("replyBytes", 0)) if replied else NONE])
    drops = policy.get("drops") or {}
    for side in ("ingress", "egress"):
        dr = drops.get(side) or {}
        rows.append([side, "dropped by policy", "DENY", dr.get("packets", 0),
                     human_bytes(dr.get("bytes", 0)), "", ""])
    return lines + [table(["side", "rule", "action", "packets", "bytes", "replies",
                           "reply bytes"], rows)]


def namespace_chain_text(d: Mapping[str, Any], wide: bool) -> str:
    lines = [f"Namespace: {d['namespace']}", "",
             "CHAINS (applied in this order)"]
    headers = ["chain", "priority", "selector", "ingress", "egress", "ready", "pods"]
    if wide:
        headers += ["reason", "message"]
    rows = []
    for c in d["chains"]:
        row = [c["name"], c["priority"], c["selector"], arrow(c["ingress"]),
               arrow(c["egress"]), "Skipped" if c["skipped"] else c["ready"], c["pods"]]
        if wide:
            row += [c["reason"], c["skipped"] or c["message"]]
        rows.append(row)
    lines.append(table(headers, rows) if rows else NONE)
    if d["pods"] is not None:
        lines += ["", "PODS (their chain, in order)"]
        rows = [[p["pod"], _n(p["node"]), arrow(p["ingress"]), arrow(p["egress"])]
                + ([",".join(p["chains"]) or NONE] if wide else [])
                for p in d["pods"]]
        lines.append(table(["pod", "node", "ingress", "egress"] + (["chains"] if wide else []),
                           rows) if rows else NONE)
    lines += ["", "FUNCTIONS (counters summed over nodes)"]
    rows = []
    typed: dict[str, list[tuple[str, str, Mapping[str, Any]]]] = {}
    for f in d["functions"]:
        firewall = f["type"] == "firewall"
        rows.append([f["function"], f["type"],
                     f.get("rulesTotal", len(f["rules"])) if firewall else NONE,
                     _n(f.get("ruleHits")) if firewall else NONE,
                     _n(f["defaultAction"]), _n(f["defaultHits"]) if firewall else NONE,
                     _n(f["drops"]), ",".join(f["nodes"]) or NONE])
        if not firewall:
            typed.setdefault(f["type"], []).append((",".join(f["nodes"]) or NONE,
                                                    f["function"], f))
    lines.append(table(["function", "type", "rules", "rule hits", "default", "default hits",
                        "drops", "nodes"], rows) if rows else NONE)
    for type_, entries in typed.items():
        lines += ["", f"{type_.upper()}S (counters summed over nodes)",
                  typed_table(type_, entries, where="nodes")]
    return "\n".join(lines)
