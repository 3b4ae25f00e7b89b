"""The firewall cube at scale (issue 12, item 1): what 10 000 rules cost the
traffic and how long a 10 000-rule change takes to be in force.

Scenario `firewall-scale`: one lab node with five pairs of pods. The pair
`pcn` has no firewall (for reference); each pair `fw-N` (N in LEVELS: 0,
100, 1 000, 10 000) has a NetworkFunction of N rules on its server's
ingress (traffic to the server pod: the port's egress hook), default drop,
put there by the agent's own path (desired_state from the NetworkFunction
and CubeChain objects, then DataplaneManager.apply, then the specialised
program swapped in as the agent does in the background). Its N - 1 first
rules (scale_rules) are met by none of the pair's packets but each shares
fields with them (the client's source with another port, the server's
address with another protocol or another source), so that their bits are
set in the vectors the packets' lookups find; the last rule allows the
client to the server: every packet's first match is the last rule, and the
program ANDs every word of the vectors before it finds it (N = 0: no rule,
the default allows).

Measured: iperf3 TCP throughput, rounds interleaved over the five pairs
(Context.compare), and TCP request latency (pcn_lab.probe rr: a new
connection per request) pooled over interleaved rounds. Checked
(untimed): the `pcn` pair's client cannot reach fw-10000's server (the rules
are in force: it is not the allowed source); after the runs the last rule
of each firewall counted the traffic and no other rule did. Then the time
to apply a 10 000-rule change: the fw-10000 NetworkFunction alternates
between two rule sets of 10 000 rules that differ in every filler (other
addresses and ports), APPLY_ROUNDS times; each round times desired_state
(validating the object, the rules as text) and DataplaneManager.apply
(parsing, the vectors, the map writes under a new generation, the switch
and the old generation's deletion), and checks that the allowed pair still
connects. Target: fw-10000 throughput >= 95% of fw-0's.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from pcn_agent.control.manager import DataplaneManager
from pcn_agent.control.reconcile import Inputs, cube_name, desired_state
from pcn_agent.control.settings import ClusterSettings
from pcn_agent.dataplane.cubes.firewall import Firewall
from pcn_agent.dataplane.cubes.functions import FirewallFunction

from . import rr
from .netns import exec_in, stop
from .references import Endpoint
from .results import Result, now_iso
from .scenarios import Context, Variant, latency_results

FIREWALL_SCALE = "firewall-scale"
LEVELS = (0, 100, 1_000, 10_000)
PCN = "pcn"
NAMESPACE = "bench"
APPLY_ROUNDS = 6


def variant(level: int) -> str:
    return f"fw-{level}"


def scale_rules(n: int, client: str, server: str, shift: int = 0) -> list[dict[str, Any]]:
    """The NetworkFunction rules of a level: n - 1 rules the pair's packets do
    not meet, then `allow from client/32 to server/32`. Filler i (shifted by
    `shift`, for a second rule set that differs in every filler) is one of:
    the client as source, a TCP destination port nobody uses (20000 +); the
    server as destination, UDP; the server as destination, from a /24 of
    10.200.0.0/14 (not the client's); TCP from anywhere to a /32 of
    10.204.0.0/14 (not the server)."""
    out: list[dict[str, Any]] = []
    for i in range(n - 1):
        k = i + shift
        kind = i % 4
        if kind == 0:
            rule = {"action": "drop", "protocol": "tcp", "source": f"{client}/32",
                    "destinationPorts": str(20_000 + k % 40_000)}
        elif kind == 1:
            rule = {"action": "drop", "protocol": "udp", "destination": f"{server}/32",
                    "destinationPorts": str(1 + k % 60_000)}
        elif kind == 2:
            rule = {"action": "drop", "source": f"10.{200 + k // 65_536 % 4}.{k // 256 % 256}."
                                                f"{k % 256}/32",
                    "destination": f"{server}/32"}
        else:
            rule = {"action": "allow", "protocol": "tcp",
                    "destination": f"10.{204 + k // 65_536 % 4}.{k // 256 % 256}.{k % 256}/32",
                    "sourcePorts": f"{1 + k % 1000}-{2000 + k % 1000}"}
        out.append(rule)
    if n:
        out.append({"action": "allow", "source": f"{client}/32", "destination": f"{server}/32"})
    return out


def _function(level: int, rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "pcn.dev/v1alpha1", "kind": "NetworkFunction",
            "metadata": {"namespace": NAMESPACE, "name": variant(level)},
            "spec": {"type": "firewall",
                     "config": {"rules": rules, "defaultAction": "drop" if level else "allow"}}}


def _chain(level: int) -> dict[str, Any]:
    return {"apiVersion": "pcn.dev/v1alpha1", "kind": "CubeChain",
            "metadata": {"namespace": NAMESPACE, "name": variant(level)},
            "spec": {"podSelector": {"matchLabels": {"fw": variant(level)}},
                     "ingress": [{"function": variant(level)}]}}


def _pod(name: str, labels: dict[str, str], node: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": NAMESPACE, "name": name, "labels": labels},
            "spec": {"nodeName": node}, "status": {"phase": "Running"}}


class _Agent:
    """Node 1's agent as far as functions go: objects in, desired_state,
    DataplaneManager.apply, then the specialised programs swapped in."""

    def __init__(self, lab_node: Any, node_name: str) -> None:
        self.manager = DataplaneManager(lab_node)
        self.node_name = node_name
        self.functions: dict[int, dict[str, Any]] = {}
        self.pods: list[dict[str, Any]] = []
        self.attachments: dict[str, tuple[str, str]] = {}

    def inputs(self) -> Inputs:
        return Inputs(node=self.node_name, settings=ClusterSettings(), pods=list(self.pods),
                      attachments=dict(self.attachments),
                      functions=list(self.functions.values()),
                      chains=[_chain(level) for level in self.functions])

    def reconcile(self) -> tuple[float, float]:
        """One pass: (desired_state ms, apply ms). Raises RuntimeError when an
        object is refused or an operation fails."""
        t0 = time.monotonic()
        result = desired_state(self.inputs())
        t1 = time.monotonic()
        bad = {k: v.message for k, v in result.verdicts.items() if not v.ready}
        if bad:
            raise RuntimeError(f"objects refused: {bad}")
        report = self.manager.apply(result.desired)
        t2 = time.monotonic()
        if report.errors:
            raise RuntimeError(f"apply failed: {report.errors}")
        return (t1 - t0) * 1000, (t2 - t1) * 1000

    def firewall(self, level: int) -> Firewall:
        """The firewall cube of `level`'s NetworkFunction (the manager holds
        each function behind its FunctionCube)."""
        fn = self.manager.functions[cube_name(NAMESPACE, variant(level))]
        if not isinstance(fn, FirewallFunction):
            raise RuntimeError(f"{variant(level)} is a {fn.type} function, not a firewall")
        return fn.fw


def _check_counted(fw: Firewall, level: int) -> dict[str, int]:
    """The last rule counted the pair's traffic, the others nothing (N = 0:
    the default did). Raises RuntimeError otherwise."""
    hits = fw.rule_hits()
    if not level:
        counted = {"default": fw.hits()["default: allow"]}
        if not counted["default"]:
            raise RuntimeError(f"{variant(level)}: the default action counted nothing")
        return counted
    counted = {"last": hits[-1], "others": sum(hits[:-1]),
               "default": fw.hits()["default: drop"]}
    if counted["last"] == 0 or counted["others"]:
        raise RuntimeError(f"{variant(level)}: the last rule should count the traffic and the "
                           f"others none, counted {counted}")
    return counted


def firewall_scale(ctx: Context) -> list[Result]:
    names = [PCN, *(variant(level) for level in LEVELS)]
    with ExitStack() as st:
        lab, pairs, ep = ctx.pair_lab(st, names)
        node = lab.node(1)
        agent = _Agent(node, lab.node_name(1))
        extras: dict[str, dict[str, Any]] = {PCN: {
            "rules": None, "path": "pod -> pcn bridge -> pod, one node, no firewall"}}
        for level in LEVELS:
            client, server = pairs[variant(level)]
            for key, role in ((client, "client"), (server, "server")):
                labels = {"fw": variant(level)} if role == "server" else {}
                agent.pods.append(_pod(key, labels, agent.node_name))
                agent.attachments[key] = (NAMESPACE, key)
            agent.functions[level] = _function(level, scale_rules(level, ep[client].ip,
                                                                  ep[server].ip))
            extras[variant(level)] = {
                "rules": level, "path": f"pod -> pcn bridge -> firewall of {level} rules "
                                        f"(server's ingress; the allow rule last) -> pod"}
        agent.pods += [_pod(k, {}, agent.node_name) for k in pairs[PCN]]
        compile_ms, apply_ms = agent.reconcile()
        ctx.progress(f"{FIREWALL_SCALE}: {len(LEVELS)} firewalls ({sum(LEVELS)} rules) in "
                     f"force: desired_state {compile_ms:.0f} ms, apply {apply_ms:.0f} ms")
        t = time.monotonic()
        swapped = agent.manager.specialise_pending()
        ctx.progress(f"{FIREWALL_SCALE}: {swapped} specialised programs swapped in, "
                     f"{time.monotonic() - t:.1f} s")
        for level in LEVELS:
            fw = agent.firewall(level)
            if not fw.specialised:
                raise RuntimeError(f"{fw.name} still runs {fw.spec}, not {fw.wanted_spec}")
            extras[variant(level)]["program"] = dict(fw.spec)
        # the rules are in force: the reference pair's client is not the allowed source
        denied = exec_in(ep[pairs[PCN][0]].netns,
                         ["ping", "-c", "1", "-W", "1", ep[pairs[variant(LEVELS[-1])][1]].ip],
                         check=False)
        if denied.returncode == 0:
            raise RuntimeError("the reference client reached the 10 000-rule firewall's server")
        for name in names:
            st.callback(stop, rr.start_server(lab.pods[pairs[name][1]].netns, pairs[name][1]))
        lat = ctx.request_latency(
            FIREWALL_SCALE, {name: (ep[pairs[name][0]], ep[pairs[name][1]].ip) for name in names},
            ctx.requests)
        variants = [Variant(name, ep[pairs[name][0]], ep[pairs[name][1]], extra=extras[name])
                    for name in names]
        # no TCP_RR: the rules measured are about the iperf3 flows
        results = ctx.compare(FIREWALL_SCALE, variants, tcp_rr=False)
        for level in LEVELS:
            counted = _check_counted(agent.firewall(level), level)
            ctx.progress(f"{FIREWALL_SCALE}/{variant(level)}: packets by rule: {counted}")
            extras[variant(level)]["packets_by_rule"] = counted
        change = _time_changes(ctx, agent, ep[pairs[variant(LEVELS[-1])][0]],
                               ep[pairs[variant(LEVELS[-1])][1]])
    for r in results:
        if "packets_by_rule" in extras[r.variant]:
            r.extra["packets_by_rule"] = extras[r.variant]["packets_by_rule"]
    return results + latency_results(FIREWALL_SCALE, lat, extras) + change


def _time_changes(ctx: Context, agent: _Agent, client: Endpoint, server: Endpoint
                  ) -> list[Result]:
    """Alternate the largest firewall between two rule sets, APPLY_ROUNDS
    passes timed; after each the allowed client still connects."""
    level = LEVELS[-1]
    fw = agent.firewall(level)
    passes: list[tuple[float, float]] = []
    phases: list[dict[str, float]] = []
    for i in range(APPLY_ROUNDS):
        shift = 100_000 * ((i + 1) % 2)
        agent.functions[level] = _function(level, scale_rules(level, client.ip, server.ip,
                                                              shift))
        passes.append(agent.reconcile())
        phases.append(dict(fw.last_apply))
        rr.run_client(client.netns, server.ip, rr.PORT, 5)  # raises if any request failed
        ctx.progress(f"{FIREWALL_SCALE}: {level}-rule change {i + 1}/{APPLY_ROUNDS}: "
                     f"desired_state {passes[-1][0]:.0f} ms, apply {passes[-1][1]:.0f} ms "
                     f"({', '.join(f'{k} {v * 1000:.0f}' for k, v in phases[-1].items())} ms)")
    apply_ms = [a for _, a in passes]
    total_ms = [c + a for c, a in passes]
    common: dict[str, Any] = {
        "rules": level, "changes": APPLY_ROUNDS, "date": now_iso(),
        "what": "a NetworkFunction of 10000 rules replaced by another 10000 (every filler "
                "differs): DataplaneManager.apply, i.e. parse, vectors, map writes under a new "
                "generation, the switch, the old generation deleted",
        "samples_ms": [round(x, 1) for x in apply_ms],
        "phases_ms": {k: round(statistics.median(p[k] for p in phases) * 1000, 1)
                      for k in phases[0]},
        "desired_state_ms": [round(c, 1) for c, _ in passes]}
    return [
        Result(FIREWALL_SCALE, variant(level), "apply-change", statistics.median(apply_ms), "ms",
               {"stat": "median", **common}),
        Result(FIREWALL_SCALE, variant(level), "apply-change-max", max(apply_ms), "ms",
               {"stat": "max", **common}),
        Result(FIREWALL_SCALE, variant(level), "pass-change", statistics.median(total_ms), "ms",
               {"stat": "median", "what": "desired_state (the 10000-rule object validated) + "
                                          "apply", "date": common["date"]}),
    ]


SCENARIOS: dict[str, Callable[[Context], list[Result]]] = {FIREWALL_SCALE: firewall_scale}
