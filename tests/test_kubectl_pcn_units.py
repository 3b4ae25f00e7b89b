"""Pure parts of kubectl-pcn: selectors, chain naming and placement, a pod's
effective chain (checked against the agent's reconciler), rule text, merge
patches, agent status aggregation, output helpers."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest
import yaml

from kubectl_pcn import agents, objects, output
from kubectl_pcn import chains as ch
from kubectl_pcn.errors import InputError
from kubectl_pcn.rules import caret, config_from_flags, load_config_file, rule_from_text
from pcn_agent.control.reconcile import MAX_STACKED, Inputs, chains_of, functions_of
from pcn_agent.control.settings import ClusterSettings
from pcn_crds import FirewallRule
from pcn_crds.rules import parse_rule


# ----------------------------------------------------------------------------- selectors
def test_parse_selector_kubectl_syntax() -> None:
    sel = ch.parse_selector("app=web, tier!=db,env in (prod,dev),!legacy,gpu,zone==a")
    assert sel == {
        "matchLabels": {"app": "web", "zone": "a"},
        "matchExpressions": [
            {"key": "env", "operator": "In", "values": ["dev", "prod"]},
            {"key": "gpu", "operator": "Exists"},
            {"key": "legacy", "operator": "DoesNotExist"},
            {"key": "tier", "operator": "NotIn", "values": ["db"]},
        ]}
    assert ch.parse_selector(ch.format_selector(sel)) == sel
    assert ch.format_selector({}) == "<all pods>"


@pytest.mark.parametrize("text", ["app=web,,x=y", "bad key=1", "app=we b", "a=1,a=2",
                                  "k in (a b)"])
def test_parse_selector_rejects(text: str) -> None:
    with pytest.raises(InputError, match="--selector"):
        ch.parse_selector(text)


def test_selector_chain_names() -> None:
    assert ch.selector_chain_name({}) == "default"
    assert ch.selector_chain_name(ch.parse_selector("app=web")) == "pods-app-web"
    assert ch.selector_chain_name(ch.parse_selector("tier=fe,app=web")) == "pods-app-web-tier-fe"
    lossy = ch.selector_chain_name(ch.parse_selector("example.com/App=Web"))
    assert lossy.startswith("pods-example-com-app-web-") and len(lossy) == len(
        "pods-example-com-app-web-") + 6
    assert lossy == ch.selector_chain_name(ch.parse_selector("example.com/App=Web"))
    taken = ch.selector_chain_name(ch.parse_selector("app=web"), taken={"pods-app-web"})
    assert taken.startswith("pods-app-web-") and taken != "pods-app-web"


def _chain(name: str, selector: dict[str, Any] | None = None, ingress: tuple[str, ...] = (),
           egress: tuple[str, ...] = (), priority: int = 100, ns: str = "web"
           ) -> dict[str, Any]:
    return {"apiVersion": "pcn.dev/v1alpha1", "kind": "CubeChain",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"podSelector": selector or {}, "priority": priority,
                     "ingress": [{"function": f} for f in ingress],
                     "egress": [{"function": f} for f in egress]}}


def test_choose_chain() -> None:
    chains = [_chain("default", ingress=("a",)),
              _chain("web-team", {"matchLabels": {"app": "web"}}, priority=50),
              _chain("web-late", {"matchLabels": {"app": "web"}}, priority=200)]
    assert ch.choose_chain(chains, None, None, None).name == "default"
    # the chain with the same selector, whatever its name (lowest priority first)
    got = ch.choose_chain(chains, ch.parse_selector("app=web"), None, None)
    assert (got.name, got.priority) == ("web-team", 50)
    new = ch.choose_chain(chains, ch.parse_selector("app=db"), None, 7)
    assert (new.name, new.existing, new.selector, new.priority) == (
        "pods-app-db", None, {"matchLabels": {"app": "db"}}, 7)
    with pytest.raises(InputError, match="selects <all pods>, not app=web"):
        ch.choose_chain(chains, ch.parse_selector("app=web"), "default", None)
    named = ch.choose_chain(chains, None, "web-late", None)
    assert named.selector == {"matchLabels": {"app": "web"}} and named.priority == 200


def test_place() -> None:
    none = ch.Placement()
    assert ch.place([], "fw", none) == ["fw"]
    assert ch.place(["a", "b"], "fw", none) == ["a", "b", "fw"]
    assert ch.place(["a", "fw", "b"], "fw", none) == ["a", "fw", "b"]  # stays: idempotent
    assert ch.place(["a", "b"], "fw", ch.Placement(before="b")) == ["a", "fw", "b"]
    assert ch.place(["a", "b"], "fw", ch.Placement(after="a")) == ["a", "fw", "b"]
    assert ch.place(["a", "b"], "fw", ch.Placement(position=1)) == ["fw", "a", "b"]
    assert ch.place(["a", "b"], "fw", ch.Placement(position=3)) == ["a", "b", "fw"]
    assert ch.place(["fw", "a", "b"], "fw", ch.Placement(after="b")) == ["a", "b", "fw"]
    moved = ch.place(["fw", "a", "b"], "fw", ch.Placement(position=2))
    assert moved == ["a", "fw", "b"] and ch.place(moved, "fw", ch.Placement(position=2)) == moved
    with pytest.raises(InputError, match="x is not in the egress side .*holds a, b"):
        ch.place(["a", "b"], "fw", ch.Placement(before="x"), "egress")
    with pytest.raises(InputError, match="relative to itself"):
        ch.place(["fw"], "fw", ch.Placement(after="fw"))
    with pytest.raises(InputError, match="use 1 to 3"):
        ch.place(["a", "b"], "fw", ch.Placement(position=4))
    with pytest.raises(InputError, match="at most 6"):
        ch.place(list("abcdef"), "fw", none)


# ----------------------------------------------------------------------------- effective
def _nf(name: str, rules: list[dict[str, Any]] | None = None, ns: str = "web"
        ) -> dict[str, Any]:
    return {"apiVersion": "pcn.dev/v1alpha1", "kind": "NetworkFunction",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"type": "firewall", "config": {"rules": rules or []}}}


def _pod(name: str, labels: dict[str, str], ns: str = "web") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": "n1"}}


def test_effective_chain_matches_the_agents_reconciler() -> None:
    """The plugin's view of a pod's chain is the agent's: same order, same
    deduplication, same chains skipped, same limit."""
    assert ch.MAX_STACKED == MAX_STACKED
    fns = [_nf(n) for n in "abcdefghij"] + [
        _nf("bad", [{"action": "drop", "destinationPorts": "22"}])]  # ports need a protocol
    chains = [
        _chain("z-first", {"matchLabels": {"app": "web"}}, ("c", "a"), ("e",), priority=10),
        _chain("default", {}, ("a", "b"), ("f", "e")),
        _chain("b-same-priority", {"matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["fe"]}]}, ("d",), ("g", "h", "i")),
        _chain("missing", {}, ("nope",)),
        _chain("uses-bad", {}, ("bad",)),
        _chain("many", {"matchLabels": {"app": "web"}}, ("f", "g", "h", "i", "j"), priority=900),
        _chain("other-ns", {}, ("a",), ns="other"),
    ]
    pods = [_pod("web-1", {"app": "web", "tier": "fe"}), _pod("web-2", {"app": "web"}),
            _pod("db-1", {"app": "db"}), _pod("bare", {})]
    inputs = Inputs("n1", ClusterSettings(), pods=pods,
                    attachments={f"k{i}": ("web", p["metadata"]["name"])
                                 for i, p in enumerate(pods)},
                    functions=fns, chains=chains)
    verdicts: dict[Any, Any] = {}
    agent, _ = chains_of(inputs, functions_of(inputs, verdicts), verdicts)
    valid = {n for (ns, n) in functions_of(inputs, {}) if ns == "web"}
    web_chains = [c for c in chains if c["metadata"]["namespace"] == "web"]
    for i, p in enumerate(pods):
        eff = ch.effective_chain(web_chains, p["metadata"]["labels"], valid)
        from_pod, to_pod = agent.get(f"k{i}", ((), ()))
        assert [f"nf.web.{s.function}" for s in eff.ingress] == list(to_pod), p
        assert [f"nf.web.{s.function}" for s in eff.egress] == list(from_pod), p
    web1 = ch.effective_chain(web_chains, {"app": "web", "tier": "fe"}, valid)
    assert web1.chains == ["z-first", "b-same-priority", "default", "many"]
    assert set(web1.skipped) == {"missing", "uses-bad"}
    assert [s.function for s in web1.ingress] == ["c", "a", "d", "b", "f", "g"]
    assert web1.dropped == ["h", "i", "j"]  # beyond six on the ingress side (lbrp, policy)
    assert [s.chain for s in web1.ingress][:3] == ["z-first", "z-first", "b-same-priority"]


# ----------------------------------------------------------------------------- rules
@pytest.mark.parametrize("text", ["drop tcp dport 22", "allow udp to 10.96.0.10/32 dport 53",
                                  "drop from 10.244.2.7/24", "allow", "DROP SCTP sport 1-2",
                                  "allow tcp from 1.2.3.4 to 5.6.7.0/24 sport 1000-2000 dport 80"])
def test_rule_text_round_trip(text: str) -> None:
    cr = rule_from_text(text)
    assert FirewallRule.model_validate(cr).to_text() == str(parse_rule(text))


def test_rule_fields() -> None:
    assert rule_from_text("allow udp from 10.0.0.9/8 dport 53-54") == {
        "action": "allow", "protocol": "udp", "source": "10.0.0.0/8",
        "destinationPorts": "53-54"}


@pytest.mark.parametrize("text,column", [("drop tcp prot 22", 10), ("block tcp", 1),
                                         ("drop tcp dport 99999", 16), ("drop dport 22", 6),
                                         ("allow from 10.0.0.300", 12)])
def test_invalid_rule_points_at_the_mistake(text: str, column: int) -> None:
    with pytest.raises(InputError) as info:
        rule_from_text(text)
    lines = info.value.message.splitlines()
    assert f"column {column}" in lines[0]
    assert lines[1] == f"    {text}"
    assert lines[2] == " " * (4 + column - 1) + "^"
    assert caret("ab", 2) == "    ab\n     ^"


def test_config_from_flags() -> None:
    existing = {"rules": [{"action": "drop", "protocol": "tcp", "destinationPorts": "22"}],
                "defaultAction": "allow"}
    assert config_from_flags("firewall", existing, None, (), None) == existing
    assert config_from_flags("firewall", existing, None, (), "drop") == {
        **existing, "defaultAction": "drop"}
    assert config_from_flags("firewall", existing, None, ("allow icmp",), None) == {
        "rules": [{"action": "allow", "protocol": "icmp"}], "defaultAction": "allow"}
    assert config_from_flags("firewall", None, None, (), None) == {"rules": [],
                                                                  "defaultAction": "allow"}
    with pytest.raises(InputError, match="not both"):
        config_from_flags("firewall", None, ("f", "{}"), ("allow",), None)
    assert len(config_from_flags("firewall", None, None, ("allow",) * 10_000, None)["rules"]) \
        == 10_000
    with pytest.raises(InputError, match="at most 10000"):
        config_from_flags("firewall", None, None, ("allow",) * 10_001, None)
    assert config_from_flags("firewall", existing, None, (), None, {"allow-replies": True}) == {
        **existing, "allowReplies": True}


@pytest.mark.parametrize("rate,advice", [
    ("50mbit", "(write 50M: a quantity of bits takes no unit, only the multiplier; m would be "
               "milli)"),
    ("50Mbps", "(write 50M: a quantity of bits takes no unit, only the multiplier)"),
    ("50m", "(m is milli, a thousandth: for mega write 50M)"),
])
def test_a_rate_that_is_no_quantity_says_what_to_write(rate: str, advice: str) -> None:
    """--rate 50mbit printed only the quantity's regular expression (trial of
    issue 12); 50m only that it was unreasonably small."""
    with pytest.raises(InputError) as err:
        config_from_flags("policer", None, None, (), None, {"rate": rate})
    msg = err.value.message
    assert msg.startswith(f"options: invalid policer config: rate: '{rate}' is "), msg
    assert "use a Kubernetes quantity of bits per second such as 50M (50 Mbit/s) or 1G" in msg
    assert advice in msg and "[0-9]" not in msg, msg


def test_config_file_forms() -> None:
    plain = "rules:\n- {action: drop, protocol: tcp, destinationPorts: '22'}\ndefaultAction: drop\n"
    want = {"rules": [{"action": "drop", "protocol": "tcp", "destinationPorts": "22"}],
            "defaultAction": "drop"}
    assert load_config_file(plain, "firewall", "f.yaml") == want
    whole = json.dumps({"apiVersion": "pcn.dev/v1alpha1", "kind": "NetworkFunction",
                        "metadata": {"name": "x"}, "spec": {"type": "firewall", "config": want}})
    assert load_config_file(whole, "firewall", "f.json") == want
    with pytest.raises(InputError, match=r"f.yaml: invalid firewall config: rules.0.source"):
        load_config_file("rules: [{action: drop, source: nowhere}]", "firewall", "f.yaml")
    with pytest.raises(InputError, match="not valid YAML"):
        load_config_file("rules: [", "firewall", "f.yaml")
    with pytest.raises(InputError, match="expected a mapping"):
        load_config_file("- 1", "firewall", "f.yaml")


def test_a_config_file_takes_rules_as_the_rule_option_writes_them() -> None:
    """A firewall file's rules may be --rule text, mappings, or both; a rule
    of neither form, or text that does not parse, names the item and the
    forms (trial of issue 12: each gave "Input should be a valid dictionary
    or instance of FirewallRule")."""
    text = ("rules:\n- drop tcp dport 22\n- allow udp to 10.96.0.10/32 dport 53\n"
            "- {action: allow, protocol: icmp}\ndefaultAction: drop\n")
    assert load_config_file(text, "firewall", "f.yaml") == {
        "rules": [{"action": "drop", "protocol": "tcp", "destinationPorts": "22"},
                  {"action": "allow", "protocol": "udp", "destination": "10.96.0.10/32",
                   "destinationPorts": "53"},
                  {"action": "allow", "protocol": "icmp"}],
        "defaultAction": "drop"}
    whole = yaml.safe_dump({"kind": "NetworkFunction", "spec": {
        "type": "firewall", "config": {"rules": ["drop tcp dport 22"]}}})
    assert load_config_file(whole, "firewall", "nf.yaml")["rules"] == [
        {"action": "drop", "protocol": "tcp", "destinationPorts": "22"}]
    with pytest.raises(InputError) as err:
        load_config_file("rules: [allow icmp, drop tpc dport 22]", "firewall", "f.yaml")
    assert err.value.message.startswith("f.yaml: rules.1: invalid rule at column 6"), \
        err.value.message
    with pytest.raises(InputError) as err:
        load_config_file("rules: [allow icmp, 22]", "firewall", "f.yaml")
    assert err.value.message == (
        "f.yaml: rules.1: a rule is a string in --rule's grammar ('drop tcp dport 22') or a "
        "mapping ({action: drop, protocol: tcp, destinationPorts: '22'}); got 22")


def test_a_config_file_is_read_with_libyaml(monkeypatch: pytest.MonkeyPatch) -> None:
    """With libyaml's loader (PyYAML has it on Debian): yaml.safe_load, the
    pure-Python one, took 14.6 s for a 10 000-rule file against 1 s for the
    same rules as --rule (trial of issue 12)."""
    from kubectl_pcn import rules

    def pure_python(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("read with the pure-Python loader")

    monkeypatch.setattr(yaml, "safe_load", pure_python)
    assert rules.load_yaml("a: [1, b]") == {"a": [1, "b"]}
    assert load_config_file("rules: [allow icmp]", "firewall", "f.yaml")["rules"] == [
        {"action": "allow", "protocol": "icmp"}]
    assert rules._YAML_LOADER is yaml.CSafeLoader


# ----------------------------------------------------------------------------- objects
def _apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386, as a server applies it."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _apply_merge_patch(out.get(k), v)
    return out


@pytest.mark.parametrize("old,new", [
    ({"a": 1, "b": {"c": 2, "d": 3}, "l": [1, 2]}, {"a": 1, "b": {"c": 5}, "l": [2]}),
    ({"x": {"y": {"z": 1}}}, {"x": {"y": {"z": 1}}, "w": [{"k": 1}]}),
    ({"rules": [{"action": "drop"}], "defaultAction": "allow"}, {"defaultAction": "drop"}),
])
def test_merge_patch(old: dict[str, Any], new: dict[str, Any]) -> None:
    patch = objects.merge_patch(old, new)
    assert _apply_merge_patch(old, patch) == new
    assert objects.merge_patch(new, new) == {}


def test_objects_compare_by_meaning_and_patch_minimally() -> None:
    rule = {"action": "drop", "protocol": "tcp", "source": "10.1.2.3/8"}
    existing = {**_nf("fw", [rule]), "metadata": {"name": "fw", "namespace": "web",
                                                 "resourceVersion": "42", "uid": "u"}}
    same = objects.network_function("web", "fw", "firewall", {
        "rules": [{**rule, "source": "10.0.0.0/8"}], "defaultAction": "allow"}, existing)
    assert objects.same(same, existing)
    other = objects.network_function("web", "fw", "firewall", {"rules": []}, existing)
    assert not objects.same(other, existing)
    patch = objects.update_patch(existing, other)
    assert patch == {"spec": {"config": {"rules": []}}, "metadata": {"resourceVersion": "42"}}
    new = objects.network_function("web", "fw2", "firewall", {})
    assert new["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "kubectl-pcn"}
    clean = objects.clean({**existing, "status": {"realizedPods": 1}})
    assert "status" not in clean and set(clean["metadata"]) == {"name", "namespace"}
    with pytest.raises(InputError, match="would be invalid"):
        objects.cube_chain("web", "c", {}, list("abcdefg"), [], 100)


# ----------------------------------------------------------------------------- agents
def _cm(node: str, data: Any) -> dict[str, Any]:
    return {"metadata": {"name": f"pcn-agent-status-{node}", "namespace": "pcn-system"},
            "data": {"status.json": data if isinstance(data, str) else json.dumps(data)}}


def test_agent_reports_and_totals() -> None:
    now = agents.parse_time("2030-01-01T00:00:30Z")
    fn = {"namespace": "web", "name": "fw", "type": "firewall", "rules": ["drop tcp dport 22"],
          "default": "allow", "hits": [2], "defaultHits": 5, "drops": 2}
    a = {"node": "a", "healthy": True, "heartbeat": "2030-01-01T00:00:25Z",
         "pods": {"web/p1": {"counters": {"rx_packets": 1}}, "kube-system/dns": {}},
         "functions": {"nf.web.fw": fn}}
    b = {"node": "b", "healthy": False, "heartbeat": "2030-01-01T00:00:29Z",
         "functions": {"nf.web.fw": {**fn, "hits": [3], "defaultHits": 1, "drops": 4},
                       "nf.other.x": {**fn, "namespace": "other", "name": "x"}}}
    c = {**b, "node": "c", "healthy": True, "heartbeat": "2029-12-31T00:00:00Z",
         "functions": {"nf.web.fw": {**fn, "rules": ["allow"], "hits": [100]}}}
    reps = agents.reports([_cm("b", b), _cm("a", a), _cm("c", c), _cm("d", "{oops")])
    assert [r.node for r in reps] == ["a", "b", "c", "d"]
    assert [agents.state(r, now) for r in reps] == ["Healthy", "Unhealthy", "Stale", "Unknown"]
    assert "unreadable" in reps[3].error
    totals = agents.functions(reps, "web")
    t = totals[("web", "fw")]
    # c runs other rules (an update on its way): its per-rule hits are not added
    assert (t.hits, t.default_hits, t.drops, t.nodes) == ([5], 6 + 5, 2 + 4 + 2,
                                                          ["a", "b", "c"])
    assert set(agents.functions(reps)) == {("web", "fw"), ("other", "x")}
    assert "rulesTotal" not in t.as_dict() and "replyHits" not in t.as_dict()
    assert [(p.namespace, p.name) for p in agents.pods(reps, "web")] == [("web", "p1")]
    assert agents.pod(reps, "web", "p1").counters == {"rx_packets": 1}


def test_function_totals_of_a_firewall_listed_in_part() -> None:
    """An agent lists the first rules of a large firewall (rulesTotal counts
    them all) and the hits of later ones by index: summed over the nodes."""
    fn = {"namespace": "web", "name": "big", "type": "firewall", "rules": ["drop tcp dport 22"],
          "hits": [1], "rulesTotal": 10_000, "laterHits": {"9999": 7}, "default": "drop",
          "allowReplies": True, "replyHits": 3}
    reps = agents.reports([_cm(n, {"node": n, "healthy": True, "functions": {"nf.web.big": {
        **fn, "laterHits": {"9999": 7, "300": 1} if n == "b" else fn["laterHits"]}}})
        for n in ("a", "b")])
    d = agents.functions(reps)[("web", "big")].as_dict()
    assert d["rules"] == [{"rule": "drop tcp dport 22", "hits": 2}]
    assert (d["rulesTotal"], d["laterHits"]) == (10_000, {"9999": 14, "300": 1})
    assert (d["allowReplies"], d["replyHits"]) == (True, 6)


# ----------------------------------------------------------------------------- output
def test_output_helpers() -> None:
    assert output.table(["name", "n"], [["a", 1], ["long-name", None]]).splitlines() == [
        "NAME        N", "a           1", "long-name   <none>"]
    assert [output.human_bytes(n) for n in (0, 1023, 1536, 5 * 1024 ** 3)] == [
        "0 B", "1023 B", "1.5 KiB", "5.0 GiB"]
    assert [output.human_duration(s) for s in (5, 300, 7200, 400000)] == [
        "5s", "5m", "120m", "4d"]
    docs = output.documents([{"a": 1}, {"b": "x\ny"}], "yaml")
    assert docs == "a: 1\n---\nb: |-\n  x\n  y\n"


# ----------------------------------------------------------------------------- chain: policy
def test_chain_shows_a_rules_replies_on_its_own_row_apart() -> None:
    """`kubectl pcn chain POD`'s NETWORK POLICY table: an ingress rule's row
    counts what came in as PACKETS and the pod's answers as REPLIES (never on
    the egress side's rows); egress's default shows what the pod opened and
    its answers the same way; an agent that reports no reply counters shows
    <none> there, not 0."""
    from kubectl_pcn.chainview import _policy_text

    rule = "NetworkPolicy shop/allow-client ingress[0]"
    policy = {"rules": [
        {"rule": rule, "action": "ACCEPT", "direction": "ingress", "packets": 10,
         "bytes": 1000, "replyPackets": 7, "replyBytes": 70_000},
        {"rule": "isolation", "action": "DENY", "direction": "ingress", "packets": 1,
         "bytes": 60, "replyPackets": 0, "replyBytes": 0, "policies": [rule]},
        {"rule": "default", "action": "ACCEPT", "direction": "ingress", "packets": 0,
         "bytes": 0, "replyPackets": 0, "replyBytes": 0},
        {"rule": "default", "action": "ACCEPT", "direction": "egress", "packets": 3,
         "bytes": 300, "replyPackets": 2, "replyBytes": 200},
        {"rule": "host", "action": "ACCEPT", "direction": "ingress", "packets": 0, "bytes": 0,
         "replyPackets": 4, "replyBytes": 400}],
        "drops": {"ingress": {"packets": 1, "bytes": 60}, "egress": {"packets": 0, "bytes": 0}}}
    lines = _policy_text(policy, "n1")
    head = next(i for i, ln in enumerate(lines) if ln.startswith("SIDE"))
    table_ = lines[head].split("\n")
    assert table_[0].split() == ["SIDE", "RULE", "ACTION", "PACKETS", "BYTES", "REPLIES",
                                 "REPLY", "BYTES"]
    ingress_rule = next(r for r in table_[1:] if rule in r).split()
    assert ingress_rule[0] == "ingress" and ingress_rule[-7:-2] == ["ACCEPT", "10", "1000",
                                                                   "B", "7"]
    egress_default = next(r for r in table_[1:] if r.startswith("egress") and "default" in r)
    assert egress_default.split()[3:] == ["3", "300", "B", "2", "200", "B"]
    assert not any(r.startswith("ingress") and "default" in r for r in table_[1:])  # all 0
    host = next(r for r in table_[1:] if "host" in r)  # replies alone keep a row
    assert host.split()[-2:] == ["400", "B"]
    old = {"rules": [{k: v for k, v in policy["rules"][0].items() if not k.startswith("reply")}]}
    row = next(r for r in "\n".join(_policy_text(old, "n1")).splitlines() if rule in r)
    assert row.split()[-2:] == ["<none>", "<none>"]


def test_chain_lists_a_firewall_on_both_sides_once_with_its_replies() -> None:
    """A firewall NetworkFunction on both sides of a pod is one cube: its
    rules are listed once (side "both"), not twice with the same hits, and
    with allowReplies the replies it let through are a line of their own."""
    from kubectl_pcn.chainview import pod_chain_text

    def fw(position: int) -> dict[str, Any]:
        return {"position": position, "function": "fw", "type": "firewall", "chain": "c",
                "defaultAction": "drop", "rules": [{"rule": "allow tcp dport 80", "hits": 12}],
                "defaultHits": 3, "drops": 3, "realized": True, "replyHits": 9}

    other = {**fw(2), "function": "solo", "rules": [], "defaultHits": 1}
    del other["replyHits"]
    d = {"namespace": "shop", "pod": "web-1", "node": "n1", "ip": "10.244.1.5", "port": "p1",
         "labels": {}, "chains": [], "counters": None, "inSync": True, "skippedChains": {},
         "beyondLimit": [], "ingress": [fw(1), other], "egress": [fw(1)], "bandwidth": None,
         "policy": None}
    out = pod_chain_text(d)
    rules = out.split("RULES (hits on node n1)\n")[1].split("\n\n")[0].splitlines()[1:]
    assert [r.split()[:3] for r in rules] == [["both", "fw", "1"], ["both", "fw", "default"],
                                             ["both", "fw", "replies"],
                                             ["ingress", "solo", "default"]]
    assert rules[0].split()[-1] == "12" and rules[2].split()[-1] == "9"
    assert "allowReplies" in rules[2]
    assert "Note:      fw on both sides: one cube" in out
    d["egress"] = []
    once = pod_chain_text(d)
    assert "Note:" not in once and "ingress   fw" in once


def test_docs_suggesting_kubectl_explain_say_what_works_in_the_emulated_lab() -> None:
    """`kubectl explain` needs the API server's OpenAPI schemas, which the
    emulated lab does not serve (pcn_lab.apiproxy answers /openapi/v3 with no
    paths); every place suggesting it says so and names what works there (a
    trial of issue 12 ran it in the lab and got an error)."""
    from pathlib import Path

    from pcn_lab.apiproxy import ApiProxy

    served = json.loads(bytes(ApiProxy._openapi("/openapi/v3").body))
    assert served == {"paths": {}}  # nothing to explain in the lab
    root = Path(__file__).resolve().parents[1]
    docs = [root / "README.md", *sorted((root / "docs").glob("*.md")),
            *sorted((root / "examples").rglob("*.yaml"))]
    seen = 0
    for doc in docs:
        lines = doc.read_text().splitlines()
        for i, line in enumerate(lines):
            if "kubectl explain" not in line:
                continue
            seen += 1
            near = " ".join(" ".join(lines[max(0, i - 3): i + 8]).split())
            where = f"{doc.relative_to(root)}:{i + 1}"
            assert "emulated lab" in near, where
            assert "add-cube TYPE --help" in near or "crds/pcn.dev_" in near, where
            for name in re.findall(r"crds/(pcn\.dev_\w+\.yaml)", near):
                assert (root / "crds" / name).is_file(), (where, name)
    assert seen >= 2
