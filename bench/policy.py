"""Network policy at scale (issue 11, item 4): what reconciling NetworkPolicy
costs the agent of one node, and what enforcing it costs the traffic.

Scenarios:

* `policy-reconcile`: a synthetic cluster (bench.policyobjects: 1 000
  NetworkPolicies, 5 000 pods on 100 nodes, 50 namespaces) seen by the agent
  of node 1, which is a real one-node pcn lab whose 50 pods are that node's
  pods of the cluster (addresses and all). The agent's reconcile pass is
  played as pcn_agent.control.agent.Agent.reconcile_once plays it: Inputs
  built from the watched objects, `desired_state()` (the policy compile),
  then `DataplaneManager.apply()` (`plan()` and every operation on the
  node's data plane: address sets, pod policies in the policy cube's pinned
  maps). After one untimed first pass, rounds of five changes (CHANGES:
  a pod label, a namespace label, a policy added, a policy removed, a pod
  added on another node), one reconcile pass timed per change. After each
  pass (untimed) the node is checked to hold exactly the desired policies
  and sets. Target: < 100 ms a change (judged on the p95 over all changes;
  p50, p95 and max reported per change).
* `policy-pod-add`: the same cluster with node 1's pods not there yet; they
  come one at a time: the pod object (with its address) is stored and the
  pod wired into the lab node (untimed: that is `pod-add` and `cni-add`),
  then one reconcile pass, whose `DataplaneManager.apply()` (the address
  sets that gain the pod or that its rules need, then its policy:
  set_address_sets + set_pod_policy, the cube stacked on its port) is the
  sample; the whole pass (with the compile) is reported too. Target: the
  apply < 50 ms (p95).
* `policy-throughput`: one lab node with three pairs of pods: p1 -> p2
  with no policy (`pcn`, the reference), p3 -> p4 with the policy cube on
  both pods and 100 rules in force on each (`pcn-policy`; pair_policy(): 50
  a direction, each rule's address set holding the peer so that each rule
  costs a set lookup and a port comparison; the first 25 ClusterNetworkPolicy
  Admin Deny rules on other ports, then 24 NetworkPolicy rules on other
  ports, and the last rule accepts: every new connection evaluates all 50
  rules of the client's egress and all 50 of the server's ingress), and p5
  -> p6 with the cube and one accepting rule a direction (`pcn-policy-1`:
  what the cube costs whatever the number of rules). iperf3 TCP throughput,
  rounds interleaved as in pod-to-pod (Context.compare), and new-connection
  request latency (pcn_lab.probe rr: connect, 32-byte request, answer,
  close; each request a new connection, so a new judgement of all the
  rules), pooled over interleaved rounds. Checked (untimed): p1 cannot
  reach p4 nor p6; after the runs the last rules' counters hold the
  traffic, the other rules' none. Target: `pcn-policy` >= 95% of `pcn`'s
  throughput.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from pcn_agent.control.manager import DataplaneManager
from pcn_agent.control.reconcile import Desired, Inputs, desired_state
from pcn_agent.control.settings import ClusterSettings
from pcn_agent.node.wiring import NodeDataplane
from pcn_lab.topology import Lab
from pcn_policy.rules import (
    IPPROTO_TCP,
    Action,
    AddressSet,
    Direction,
    DirectionPolicy,
    PodPolicy,
    PortMatch,
    Rule,
    RuleRef,
    SetEntry,
)

from . import policyobjects as po
from . import rr
from .netns import exec_in, stop
from .references import Endpoint
from .results import Result, now_iso
from .rr import percentile
from .scenarios import Context, Variant, latency_results

POLICY_RECONCILE = "policy-reconcile"
POLICY_POD_ADD = "policy-pod-add"
POLICY_THROUGHPUT = "policy-throughput"
PCN, PCN_POLICY, PCN_POLICY_ONE = "pcn", "pcn-policy", "pcn-policy-1"
RULES_PER_DIRECTION = 50
ADMIN_RULES = 25  # of the 50: ClusterNetworkPolicy Admin Deny, the rest NetworkPolicy
MISS_PORT_BASE = 20000  # ports of the rules that do not accept (no server listens there)


# ----------------------------------------------------------------------------- the agent's pass
@dataclass
class Sample:
    """One reconcile pass: milliseconds building Inputs and compiling
    (desired_state), applying (DataplaneManager.apply: plan + data plane),
    and the operations applied, by kind."""

    compile_ms: float
    apply_ms: float
    ops: dict[str, int]
    what: str = ""

    @property
    def total_ms(self) -> float:
        return self.compile_ms + self.apply_ms


@dataclass
class AgentView:
    """Node 1 of `cluster` as its agent sees it, applying to the real `node`
    through a DataplaneManager. `attachments`: lab pod key -> (namespace,
    name) of the cluster's pod it is."""

    cluster: po.SyntheticCluster
    node: NodeDataplane
    settings: ClusterSettings = field(default_factory=ClusterSettings)
    attachments: dict[str, tuple[str, str]] = field(default_factory=dict)
    manager: DataplaneManager = field(init=False)
    desired: Desired = field(init=False, default_factory=Desired)

    def __post_init__(self) -> None:
        self.manager = DataplaneManager(self.node)

    def attach(self, lab_key: str, pod: po.Obj) -> None:
        meta = pod["metadata"]
        self.attachments[lab_key] = (meta["namespace"], meta["name"])

    def inputs(self) -> Inputs:
        """What Agent.reconcile_once gives desired_state (the objects it
        watches, listed from its store)."""
        c = self.cluster
        return Inputs(node=c.local_node, settings=self.settings,
                      nodes=list(c.nodes.values()),
                      pods=[p for p in c.pods.values()
                            if p["spec"].get("nodeName") == c.local_node],
                      all_pods=list(c.pods.values()), namespaces=list(c.namespaces.values()),
                      networkpolicies=list(c.policies.values()), attachments=dict(self.attachments))

    def reconcile(self, what: str = "") -> Sample:
        """One pass, timed; raises if an operation failed."""
        t0 = time.perf_counter()
        result = desired_state(self.inputs())
        t1 = time.perf_counter()
        report = self.manager.apply(result.desired)
        t2 = time.perf_counter()
        if report.errors:
            op, err = report.errors[0]
            raise RuntimeError(f"{len(report.errors)} operation(s) failed after {what or 'a'} "
                               f"change, the first: {op.kind} {op.key}: {err}")
        self.desired = result.desired
        ops: dict[str, int] = {}
        for op in report.ops:
            ops[op.kind] = ops.get(op.kind, 0) + 1
        return Sample((t1 - t0) * 1000, (t2 - t1) * 1000, ops, what)

    def check(self) -> None:
        """The node holds exactly the desired policies, and every desired
        address set with its entries (untimed)."""
        held = self.node.pod_policies()
        want = self.desired.policies
        if held != want:
            diff = sorted(k for k in held.keys() | want.keys() if held.get(k) != want.get(k))
            raise RuntimeError(f"the node's pod policies differ from the desired ones: {diff}")
        cube = self.node.policy
        assert cube is not None
        missing = [n for n, s in self.desired.address_sets.items() if cube.sets.get(n) != s]
        if missing:
            raise RuntimeError(f"address sets not (or not so) in the policy cube: {missing[:5]}")


def stats_ms(samples: list[float]) -> dict[str, float]:
    """p50 (median), p95 (nearest rank) and max of a non-empty list, rounded."""
    return {"p50_ms": round(statistics.median(samples), 2),
            "p95_ms": round(percentile(samples, 95), 2), "max_ms": round(max(samples), 2)}


def _synthetic(ctx: Context, lab: Lab, skip_local_pods: bool) -> po.SyntheticCluster:
    shape = po.Shape()
    names = [lab.node_name(1)] + [f"node-{k:03d}" for k in range(2, shape.nodes + 1)]
    c = po.build(shape, node_names=names, skip_local_pods=skip_local_pods)
    ctx.progress(f"synthetic cluster: {len(c.policies)} NetworkPolicies, {len(c.pods)} pods on "
                 f"{shape.nodes} nodes, {len(c.namespaces)} namespaces; node 1 is "
                 f"{lab.node_name(1)}")
    return c


def _shape_extra(c: po.SyntheticCluster) -> dict[str, Any]:
    return {"cluster": {"nodes": c.shape.nodes, "pods": c.shape.pods,
                        "namespaces": c.shape.namespaces, "networkpolicies": c.shape.policies,
                        "policy_kinds": [t.kind for t in po.TEMPLATES]}}


def policy_reconcile(ctx: Context) -> list[Result]:
    rng = random.Random(7)
    samples: list[Sample] = []
    with ExitStack() as st:
        lab = ctx.lab(st, nodes=1, pods=po.Shape().pods_per_node)
        c = _synthetic(ctx, lab, skip_local_pods=False)
        view = AgentView(c, lab.node(1))
        for s in range(1, c.shape.pods_per_node + 1):
            view.attach(f"n1p{s}", c.pods[_slot_key(c, s)])
        first = view.reconcile("the first")
        view.check()
        ctx.progress(f"{POLICY_RECONCILE}: first pass {first.total_ms:.0f} ms (compile "
                     f"{first.compile_ms:.0f}, apply {first.apply_ms:.0f}): "
                     f"{len(view.desired.policies)} pods under policy, "
                     f"{len(view.desired.address_sets)} address sets, ops {first.ops}")
        view.reconcile("no")  # a pass with nothing new: caches warm, as in a running agent
        for n in range(ctx.policy_rounds):
            for kind in po.CHANGES:
                what = po.change(c, kind, n, rng)
                sample = view.reconcile(what)
                sample.what = f"{kind}: {what}"
                samples.append(sample)
                view.check()
            last = samples[-len(po.CHANGES):]
            ctx.progress(f"{POLICY_RECONCILE}: round {n + 1}/{ctx.policy_rounds}: "
                         + ", ".join(f"{k} {s.total_ms:.0f}" for k, s in
                                     zip(po.CHANGES, last, strict=True)) + " ms")
    return _reconcile_results(c, samples, first)


def _slot_key(c: po.SyntheticCluster, slot: int) -> str:
    """Key of node 1's pod in `slot` (its name is pod-001-<slot>)."""
    name = f"pod-001-{slot:02d}"
    return next(k for k in c.pods if k.endswith(f"/{name}"))


def _reconcile_results(c: po.SyntheticCluster, samples: list[Sample], first: Sample
                       ) -> list[Result]:
    total = [s.total_ms for s in samples]
    by_kind = {k: [s for s in samples if s.what.startswith(f"{k}:")] for k in po.CHANGES}
    per_kind: dict[str, dict[str, Any]] = {k: {**stats_ms([s.total_ms for s in v]),
                    "compile_p50_ms": round(statistics.median(s.compile_ms for s in v), 2),
                    "apply_p50_ms": round(statistics.median(s.apply_ms for s in v), 2),
                    "ops": _sum_ops(v)}
                for k, v in by_kind.items() if v}
    common: dict[str, Any] = {
        "changes": len(samples), "date": now_iso(), **_shape_extra(c),
        "what": "one agent reconcile pass per change: Inputs + desired_state (compile) + "
                "DataplaneManager.apply (plan, policy cube maps of a real lab node)",
        "first_pass_ms": round(first.total_ms, 1)}
    out = [
        Result(POLICY_RECONCILE, PCN, "latency", statistics.median(total), "ms",
               {"stat": "median", "per_change": per_kind,
                "samples": [[s.what, round(s.compile_ms, 2), round(s.apply_ms, 2)]
                            for s in samples], **common}),
        Result(POLICY_RECONCILE, PCN, "latency-p95", percentile(total, 95), "ms",
               {"stat": "p95", **common}),
        Result(POLICY_RECONCILE, PCN, "latency-max", max(total), "ms",
               {"stat": "max", **common}),
        Result(POLICY_RECONCILE, PCN, "compile", statistics.median(s.compile_ms for s in samples),
               "ms", {**common, "stat": "median", "what": "Inputs + desired_state"}),
        Result(POLICY_RECONCILE, PCN, "apply", statistics.median(s.apply_ms for s in samples),
               "ms", {**common, "stat": "median", "what": "DataplaneManager.apply"}),
    ]
    for k, st in per_kind.items():
        out.append(Result(POLICY_RECONCILE, PCN, f"latency-p95@{k}", float(st["p95_ms"]), "ms",
                          {"stat": "p95", "change": k, **st, "samples": len(by_kind[k]),
                           "date": common["date"]}))
    return out


def _sum_ops(samples: list[Sample]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in samples:
        for k, n in s.ops.items():
            out[k] = out.get(k, 0) + n
    return out


def policy_pod_add(ctx: Context) -> list[Result]:
    samples: list[Sample] = []
    rules: list[int] = []
    with ExitStack() as st:
        lab = ctx.lab(st, nodes=1, pods=0)
        c = _synthetic(ctx, lab, skip_local_pods=True)
        n = min(ctx.policy_pod_adds, c.shape.pods_per_node)
        view = AgentView(c, lab.node(1))
        view.reconcile("the first")  # the node's peers, nothing of policy: no pod yet
        ctx.progress(f"{POLICY_POD_ADD}: adding {n} pods to {lab.node_name(1)}, one reconcile "
                     "pass each")
        for s in range(1, n + 1):
            pod = c.put("Pod", po.local_pod(c, s))
            lab.add_pod(1, s)  # veth, address, bridge port: not timed (pod-add, cni-add)
            key = f"n1p{s}"
            view.attach(key, pod)
            sample = view.reconcile(f"pod {po.key_of(pod)} added")
            samples.append(sample)
            view.check()
            policy = view.desired.policies.get(key)
            rules.append(0 if policy is None else
                         len(policy.ingress.rules) + len(policy.egress.rules))
            if s % 10 == 0:
                ctx.progress(f"{POLICY_POD_ADD}: {s} pods, last apply {sample.apply_ms:.1f} ms "
                             f"(pass {sample.total_ms:.1f} ms, ops {sample.ops})")
        under = sum(1 for k in view.attachments if k in view.desired.policies)
        sets = len(view.desired.address_sets)
        _check_stacked(view)
    apply_ms = [s.apply_ms for s in samples]
    total_ms = [s.total_ms for s in samples]
    common: dict[str, Any] = {
        "pods": len(samples), "date": now_iso(), **_shape_extra(c),
        "pods_under_policy": under, "address_sets": sets, "rules_per_pod": {
            "min": min(rules), "median": statistics.median(rules), "max": max(rules)},
        "ops": _sum_ops(samples), "apply": stats_ms(apply_ms), "pass": stats_ms(total_ms)}
    apply_what = ("DataplaneManager.apply of the pass after the pod appeared: "
                  "set_address_sets + set_pod_policy (cube stacked on its port)")
    return [
        Result(POLICY_POD_ADD, PCN, "latency", statistics.median(apply_ms), "ms",
               {"stat": "median", "what": apply_what,
                "samples_ms": [round(x, 2) for x in apply_ms], **common}),
        Result(POLICY_POD_ADD, PCN, "latency-p95", percentile(apply_ms, 95), "ms",
               {"stat": "p95", "what": apply_what, **common}),
        Result(POLICY_POD_ADD, PCN, "pass", statistics.median(total_ms), "ms",
               {"stat": "median", "what": "the whole pass: Inputs + desired_state + apply",
                "samples_ms": [round(x, 2) for x in total_ms], "date": common["date"]}),
    ]


def _check_stacked(view: AgentView) -> None:
    """The policy cube is stacked on the port of every pod under policy and
    of no other (untimed; what the rules do to packets is
    policy-throughput's and the tests' business). Raises RuntimeError."""
    for key, pod in view.node.pods.items():
        if pod.policy != (key in view.desired.policies):
            raise RuntimeError(f"pod {key}: policy cube stacked {pod.policy}, under policy "
                               f"{key in view.desired.policies}")


# ----------------------------------------------------------------------------- throughput
def pair_policy(client: str, server: str, per_direction: int = RULES_PER_DIRECTION,
                admin: int = ADMIN_RULES, tag: str = "hundred"
                ) -> tuple[list[AddressSet], PodPolicy]:
    """The address sets and the policy put on both pods of a policed pair
    (`client`, `server` addresses): `per_direction` rules a direction,
    isolated both ways, from policies named `tag`. Rule i < last has the set
    `<tag>-miss-i` (10.200.i.0/24, the client and the server: the peer is
    always in it) and one TCP port MISS_PORT_BASE + i nobody uses, so it
    matches the peer and misses on the port; the first `admin` of them are
    Admin-tier Deny rules (ClusterNetworkPolicy), the others NetworkPolicy
    rules; the last rule, NetworkPolicy, has the set `<tag>-pair` (client
    and server) and no ports: it accepts every connection between them,
    ICMP included, after all the others were evaluated. Raises ValueError
    unless 0 <= admin < per_direction <= 200."""
    if not 0 <= admin < per_direction <= 200:
        raise ValueError("0 <= admin rules < rules per direction <= 200")
    pair = [SetEntry(f"{client}/32"), SetEntry(f"{server}/32")]
    sets = [AddressSet(f"{tag}-miss-{i}", frozenset([SetEntry(f"10.200.{i}.0/24"), *pair]))
            for i in range(per_direction - 1)]
    sets.append(AddressSet(f"{tag}-pair", frozenset(pair)))

    def side(d: Direction) -> DirectionPolicy:
        def ref(kind: str, i: int) -> RuleRef:
            return RuleRef(kind, "" if kind == "ClusterNetworkPolicy" else "bench", tag, d, i)

        miss = [Rule(f"{tag}-miss-{i}", (PortMatch(IPPROTO_TCP, MISS_PORT_BASE + i,
                                                   MISS_PORT_BASE + i),),
                     action=Action.DENY if i < admin else Action.ACCEPT,
                     ref=ref("ClusterNetworkPolicy" if i < admin else "NetworkPolicy", i))
                for i in range(per_direction - 1)]
        last = Rule(f"{tag}-pair", (), ref=ref("NetworkPolicy", per_direction - 1))
        return DirectionPolicy(admin=tuple(miss[:admin]), namespaced=(*miss[admin:], last),
                               isolated=True,
                               isolated_by=(RuleRef("NetworkPolicy", "bench", tag, d, -1),))

    return sets, PodPolicy(side(Direction.INGRESS), side(Direction.EGRESS))


def _counted(node: NodeDataplane, key: str, per_direction: int) -> dict[str, int]:
    """Packets counted on pod `key` by the last rule of each direction, by
    all the other rules together, and by isolation (dropped)."""
    cube = node.policy
    assert cube is not None
    last = {f"{d}[{per_direction - 1}]" for d in ("ingress", "egress")}
    out = {"last": 0, "others": 0, "isolation": 0}
    for row in cube.counters(node.pods[key].port.id):
        rule = str(row["rule"])
        if rule == "isolation":
            out["isolation"] += int(row["packets"])
        elif rule.startswith(("NetworkPolicy", "ClusterNetworkPolicy")):
            out["last" if rule.split()[-1] in last else "others"] += int(row["packets"])
    return out


@dataclass(frozen=True)
class _Pair:
    """A client and a server pod of policy-throughput, and the rules each holds
    a direction (0: no policy)."""

    variant: str
    client: str  # lab pod key
    server: str
    per_direction: int
    admin: int = 0

    @property
    def rules(self) -> int:
        return 2 * self.per_direction


PAIRS = (_Pair(PCN, "n1p1", "n1p2", 0),
         _Pair(PCN_POLICY, "n1p3", "n1p4", RULES_PER_DIRECTION, ADMIN_RULES),
         _Pair(PCN_POLICY_ONE, "n1p5", "n1p6", 1))


def policy_throughput(ctx: Context) -> list[Result]:
    with ExitStack() as st:
        lab = ctx.lab(st, nodes=1, pods=2 * len(PAIRS))
        node = lab.node(1)
        ep = {k: Endpoint(lab.pods[k].netns, lab.pods[k].ip) for k in lab.pods}
        extras: dict[str, dict[str, Any]] = {}
        for pair in PAIRS:
            extras[pair.variant] = {"rules": pair.rules, "rules_per_direction": pair.per_direction,
                                    "admin_rules_per_direction": pair.admin}
            if not pair.per_direction:
                extras[pair.variant]["path"] = "pod -> pcn bridge -> pod, one node, no policy"
                continue
            sets, policy = pair_policy(ep[pair.client].ip, ep[pair.server].ip,
                                       pair.per_direction, pair.admin, pair.variant)
            with node.batch():
                node.set_address_sets(sets)
                node.set_pod_policy(pair.client, policy)
                node.set_pod_policy(pair.server, policy)
            extras[pair.variant]["path"] = (
                f"pod -> pcn bridge -> pod, one node, the policy cube on both: the client's "
                f"egress and the server's ingress each judge the first packet of a connection "
                f"against {pair.per_direction} rule(s), the last accepting; then connection "
                f"tracking")
            ctx.progress(f"{POLICY_THROUGHPUT}/{pair.variant}: {pair.rules} rules in force on "
                         f"{pair.client} and {pair.server}")
            # a pod of no policed pair is not let in: the rules are in force
            denied = exec_in(ep[PAIRS[0].client].netns,
                             ["ping", "-c", "1", "-W", "1", ep[pair.server].ip], check=False)
            if denied.returncode == 0:
                raise RuntimeError(f"{PAIRS[0].client} reached {pair.server}, which its rules "
                                   "isolate: the policy is not in force")
        for pair in PAIRS:
            st.callback(stop, rr.start_server(lab.pods[pair.server].netns, pair.server))
        lat = ctx.request_latency(
            POLICY_THROUGHPUT,
            {pair.variant: (ep[pair.client], ep[pair.server].ip) for pair in PAIRS}, ctx.requests)
        variants = [Variant(pair.variant, ep[pair.client], ep[pair.server],
                            extra=extras[pair.variant]) for pair in PAIRS]
        # no TCP_RR: the rules measured are about the iperf3 flows
        results = ctx.compare(POLICY_THROUGHPUT, variants, tcp_rr=False)
        for pair in PAIRS:
            if not pair.per_direction:
                continue
            counted = {k: _counted(node, k, pair.per_direction)
                       for k in (pair.client, pair.server)}
            ctx.progress(f"{POLICY_THROUGHPUT}/{pair.variant}: packets by rule: {counted}")
            for key, c in counted.items():
                if c["last"] == 0 or c["others"] != 0:
                    raise RuntimeError(f"{key}: the last rule should count the traffic and "
                                       f"the others none, counted {c}")
            extras[pair.variant]["packets_by_rule"] = counted
    for r in results:
        if "packets_by_rule" in extras[r.variant]:
            r.extra["packets_by_rule"] = extras[r.variant]["packets_by_rule"]
    return results + latency_results(POLICY_THROUGHPUT, lat, extras)


SCENARIOS: dict[str, Callable[[Context], list[Result]]] = {
    POLICY_RECONCILE: policy_reconcile,
    POLICY_POD_ADD: policy_pod_add,
    POLICY_THROUGHPUT: policy_throughput,
}
