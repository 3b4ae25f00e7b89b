"""`kubectl pcn chain`'s views of a large firewall (issue 12 trial: a
10 000-rule firewall showed as 256 rules and 0 hits): the true rule count,
the hits of the rules beyond the agent's first 256 (its laterHits), the
text listing the most hit rules and -o json every rule. Pure."""

from __future__ import annotations

import json
from typing import Any

from kubectl_pcn import agents, chainview

N_RULES = 10_000
FIRST = 256  # what the agent lists with text and hits (functions.STATUS_RULES)


def _rule(i: int) -> dict[str, Any]:
    return {"action": "drop", "protocol": "tcp", "destinationPorts": str(10_000 + i)}


def _nf() -> dict[str, Any]:
    return {"metadata": {"name": "big-fw", "namespace": "demo"},
            "spec": {"type": "firewall", "config": {
                "defaultAction": "allow", "rules": [_rule(i) for i in range(N_RULES)]}}}


def _chain() -> dict[str, Any]:
    return {"apiVersion": "pcn.dev/v1alpha1", "kind": "CubeChain",
            "metadata": {"name": "protect-web", "namespace": "demo"},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "priority": 100,
                     "ingress": [{"function": "big-fw"}], "egress": []}}


def _pod() -> dict[str, Any]:
    return {"metadata": {"name": "web-1", "namespace": "demo", "labels": {"app": "web"}},
            "spec": {"nodeName": "n1"}, "status": {"podIP": "10.244.1.10"}}


def _report(node: str = "n1") -> agents.NodeReport:
    """What the agent reports: the first 256 rules (rule 3 hit 5 times),
    rulesTotal and laterHits (0-based index: rules 10 000 and 5 000)."""
    texts = [f"drop tcp dport {10_000 + i}" for i in range(FIRST)]
    hits = [0] * FIRST
    hits[2] = 5
    fn = {"namespace": "demo", "name": "big-fw", "type": "firewall", "rules": texts,
          "default": "allow", "hits": hits, "rulesTotal": N_RULES,
          "laterHits": {"4999": 7, "9999": 99467}, "defaultHits": 60, "drops": 99479}
    pod = {"ip": "10.244.1.10", "port": "br0:p", "ingress": ["nf.demo.big-fw"], "egress": [],
           "counters": {"rx_packets": 1}}
    return agents.NodeReport(node, {"node": node, "pods": {"demo/web-1": pod},
                                    "functions": {"nf.demo.big-fw": fn}})


def test_pod_view_counts_every_rule_and_its_hits() -> None:
    d = chainview.pod_chain_data(_pod(), [_chain()], [_nf()], [_report()])
    (e,) = d["ingress"]
    assert e["rulesTotal"] == N_RULES and len(e["rules"]) == N_RULES
    assert e["ruleHits"] == 5 + 7 + 99467
    assert e["rules"][9999] == {"rule": "drop tcp dport 19999", "hits": 99467}
    assert e["rules"][4999]["hits"] == 7 and e["rules"][300]["hits"] == 0
    assert e["rules"][2] == {"rule": "drop tcp dport 10002", "hits": 5}
    # -o json carries them all
    assert len(json.loads(json.dumps(d))["ingress"][0]["rules"]) == N_RULES

    text = chainview.pod_chain_text(d)
    row = next(line for line in text.splitlines() if line.startswith("1 ") and "big-fw" in line)
    assert row.split()[4:6] == [str(N_RULES), str(5 + 7 + 99467)]
    listed = [line.split() for line in text.splitlines() if line.startswith("ingress ")]
    numbers = [cols[2] for cols in listed]
    assert numbers == ["3", "5000", "10000", "...", "default"]
    assert "9997 more rules (0 with hits), -o json for all" in text
    assert "dport 10255" not in text  # no longer the first 256 rules one by one


def test_unknown_later_hits_when_the_agent_lists_its_bound() -> None:
    later = {str(FIRST + i): 1 for i in range(chainview.AGENT_LATER_HITS)}
    rules = chainview.firewall_rules(["a"] * FIRST, [0] * FIRST, 1000, later, [])
    assert rules[FIRST]["hits"] == 1 and rules[999]["hits"] is None
    assert rules[999]["rule"] == "rule 1000"


def test_listing_of_many_rules_with_many_hits() -> None:
    rules = [{"rule": f"r{i}", "hits": i % 3} for i in range(100)]
    rows = chainview.rule_listing(rules, most=5)
    assert [r[0] for r in rows[:-1]] == sorted(r[0] for r in rows[:-1])
    assert all(r[2] == 2 for r in rows[:-1]) and len(rows) == 6
    with_hits = sum(1 for r in rules if r["hits"])
    assert rows[-1][1] == f"95 more rules ({with_hits - 5} with hits), -o json for all"
    few = chainview.rule_listing(rules[:4], most=5)
    assert [r[0] for r in few] == [1, 2, 3, 4]


def test_namespace_view_counts_every_rule() -> None:
    d = chainview.namespace_chain_data("demo", [_chain()], [_nf()], [_pod()],
                                       [_report("n1"), _report("n2")])
    (f,) = d["functions"]
    assert f["rulesTotal"] == N_RULES and f["ruleHits"] == 2 * (5 + 7 + 99467)
    assert f["rules"][9999]["hits"] == 2 * 99467
    text = chainview.namespace_chain_text(d, wide=False)
    row = next(line for line in text.splitlines() if line.startswith("big-fw "))
    assert row.split()[2:4] == [str(N_RULES), str(2 * (5 + 7 + 99467))]


def test_a_function_on_both_sides_has_one_row_of_counters() -> None:
    """A flow monitor (or a capture point) on both sides is one cube: its
    counters once, side "both" (the trial listed them under ingress and
    egress)."""
    nf = {"metadata": {"name": "talkers", "namespace": "demo"},
          "spec": {"type": "flowmonitor", "config": {}}}
    chain = _chain()
    chain["spec"]["ingress"] = chain["spec"]["egress"] = [{"function": "talkers"}]
    counters = {"namespace": "demo", "name": "talkers", "type": "flowmonitor",
                "maxFlows": 1024, "fromPodPackets": 2500, "toPodPackets": 2957}
    pod = {"ip": "10.244.1.10", "ingress": ["nf.demo.talkers"], "egress": ["nf.demo.talkers"]}
    report = agents.NodeReport("n1", {"node": "n1", "pods": {"demo/web-1": pod},
                                      "functions": {"nf.demo.talkers": counters}})
    text = chainview.pod_chain_text(chainview.pod_chain_data(_pod(), [chain], [nf], [report]))
    section = text.split("FLOWMONITORS")[1].split("NETWORK POLICY")[0]
    rows = [line.split() for line in section.splitlines()[2:] if line.strip()]
    assert [r[:2] for r in rows] == [["both", "talkers"]], text
    assert "2500" in rows[0] and "2957" in rows[0]
