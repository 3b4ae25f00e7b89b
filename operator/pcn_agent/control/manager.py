"""The data-plane manager: applies reconciler plans to a node's data plane,
idempotently, one operation at a time, remembering what took effect."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace

from pcn_agent.control.reconcile import Desired, Op, plan
from pcn_agent.dataplane.cubes.firewall import Firewall
from pcn_agent.dataplane.cubes.flowmonitor import FlowMonitor
from pcn_agent.node.wiring import NodeDataplane
from pcn_crds.rules import parse_rule
from pcn_policy.rules import used_sets

log = logging.getLogger(__name__)


@dataclass
class ApplyReport:
    applied: int = 0
    ops: list[Op] = field(default_factory=list)  # the operations that took effect
    errors: list[tuple[Op, str]] = field(default_factory=list)
    seconds: float = 0.0


class DataplaneManager:
    def __init__(self, node: NodeDataplane) -> None:
        self.node = node
        self.current = Desired()
        self.functions: dict[str, Firewall] = {}
        self.monitors: dict[str, FlowMonitor] = {}  # flowmonitor functions, by cube name
        self.lock = threading.RLock()  # shared with the local API: one writer at a time
        if node.rt.adopted:
            self._adopt()

    def _adopt(self) -> None:
        """Rebuild what was applied from the adopted node, so that an agent
        restart re-applies nothing that is already in force."""
        from pcn_agent.control.reconcile import FunctionSpec, NodePortSpec, ServiceSpec

        n = self.node
        for name, cube in n.rt.cubes.items():
            if cube.type == "firewall":
                self.functions[name] = Firewall(n.rt, name)
            elif cube.type == "flowmonitor":
                self.monitors[name] = FlowMonitor(n.rt, name)
        # the node's address holds NodePorts and hostPorts, 127.0.0.1 hostPorts:
        # none of them is a ClusterIP the reconciler would remove
        hostports = n.dispatcher.hostport_service_keys() if n.dispatcher else set()
        services = {k: ServiceSpec(tuple(s.backends), s.affinity_timeout_s, s.drop_if_empty)
                    for k, s in n.lb.services.services.items()
                    if k[0] != n.cfg.node_ip and k not in hostports} \
            if n.lb else {}
        nodeports = {k: NodePortSpec(v.policy, tuple(v.backends), v.local, v.affinity_timeout_s)
                     for k, v in n.dispatcher.nodeports.items()} if n.dispatcher else {}
        functions = {name: FunctionSpec("firewall", tuple(str(r) for r in fw.rules), fw.default)
                     for name, fw in self.functions.items()}
        functions.update({name: FunctionSpec("flowmonitor", (), max_flows=fm.max_flows)
                          for name, fm in self.monitors.items()})
        chains = {k: (tuple(p.ingress), tuple(p.egress)) for k, p in n.pods.items()
                  if p.ingress or p.egress}
        policies = n.pod_policies()
        used = used_sets(policies.values())
        sets = {name: s for name, s in n.policy.sets.items() if name in used} \
            if n.policy else {}
        self.current = Desired(frozenset(n.peers.values()), services, nodeports, functions,
                               chains, policies, sets)

    def apply(self, desired: Desired) -> ApplyReport:
        start = time.monotonic()
        report = ApplyReport()
        with self.lock, self.node.batch():
            for op in plan(self.current, desired, self.node.pods.keys()):
                try:
                    self._do(op)
                    self.current = _advance(self.current, op)
                    report.applied += 1
                    report.ops.append(op)
                except Exception as exc:  # keep going: one bad object must not block others
                    log.exception("could not apply %s %s", op.kind, op.key)
                    report.errors.append((op, f"{type(exc).__name__}: {exc}"))
        report.seconds = time.monotonic() - start
        if report.applied:
            log.info("applied %d data-plane operations in %.1f ms", report.applied,
                     report.seconds * 1000)
        return report

    def _do(self, op: Op) -> None:
        n = self.node
        if op.kind == "set-function" and op.value.type == "flowmonitor":
            self._set_monitor(op.key, op.value.max_flows)
        elif op.kind == "set-function":
            retyped = op.key in self.monitors
            if retyped:
                self._retype(op.key)
            rules = [parse_rule(t) for t in op.value.rules]
            fw = self.functions.get(op.key)
            # fast: in force at once with the generic program; specialise_pending()
            # swaps the specialised one in once it is compiled.
            if fw is None:
                self.functions[op.key] = Firewall(n.rt, op.key, rules, op.value.default,
                                                  fast=True)
                if retyped:
                    self._restack(op.key)
            else:
                fw.set_rules(rules, op.value.default, fast=True)
            n.save()
        elif op.kind == "delete-function":
            fw = self.functions.pop(op.key, None)
            if fw is not None:
                fw.delete()
            fm = self.monitors.pop(op.key, None)
            if fm is not None:
                fm.delete()
            n.save()
        elif op.kind == "set-peers":
            n.set_peers(sorted(op.value, key=lambda p: p.name))
        elif op.kind == "set-service":
            vip, port, proto = op.key
            n.set_service(vip, port, proto, list(op.value.backends), op.value.affinity_timeout_s,
                          op.value.drop_if_empty)
        elif op.kind == "delete-service":
            n.delete_service(*op.key)
        elif op.kind == "set-nodeport":
            port, proto = op.key
            local = op.value.local
            n.set_nodeport(port, proto, op.value.policy, list(op.value.backends),
                           None if local is None else list(local), op.value.affinity_timeout_s)
        elif op.kind == "delete-nodeport":
            n.delete_nodeport(*op.key)
        elif op.kind == "set-chain":
            from_pod, to_pod = op.value
            n.set_pod_chain(op.key, list(from_pod), list(to_pod))
        elif op.kind == "set-address-sets":
            n.set_address_sets(op.value.values())
        elif op.kind == "set-policy":
            n.set_pod_policy(op.key, op.value)
        elif op.kind == "prune-address-sets":
            n.prune_address_sets()
        else:
            raise ValueError(f"unknown operation {op.kind}")

    def _set_monitor(self, name: str, max_flows: int) -> None:
        """Create flow monitor `name`, or give it a new bound."""
        if name in self.functions:
            self._retype(name)
        fm = self.monitors.get(name)
        if fm is None:
            self.monitors[name] = FlowMonitor(self.node.rt, name, max_flows)
            self._restack(name)
        else:
            fm.set_max_flows(max_flows)  # same slot: the hooks need no change
        self.node.save()

    def _retype(self, name: str) -> None:
        """A NetworkFunction whose type changed: its old cube goes (the
        pods' hooks are rewritten once the new one exists, _restack)."""
        old: Firewall | FlowMonitor | None = self.functions.pop(name, None) or \
            self.monitors.pop(name, None)
        if old is not None:
            old.delete()

    def _restack(self, name: str) -> None:
        """Rewrite the hooks of the pods whose chains name cube `name` (a
        cube made again under the same name has another slot and instance)."""
        n = self.node
        for key, pod in list(n.pods.items()):
            if name in pod.ingress or name in pod.egress:
                n.set_pod_chain(key, list(pod.ingress), list(pod.egress))

    def flow_stats(self) -> dict[str, dict[str, dict[str, int]]]:
        """Per flow monitor (cube name) and direction: packets, L3 bytes and
        flows in its table; for metrics of bounded cardinality."""
        out = {}
        for name, fm in list(self.monitors.items()):
            try:
                out[name] = fm.totals()
            except Exception:  # removed mid-read: skip it this round
                log.debug("flow monitor %s could not be read", name, exc_info=True)
        return out

    def specialise_pending(self) -> int:
        """Compile and swap in the specialised programs of functions running a
        generic one (seed 004: code shaped by the configuration, hot-swapped).
        Slow (a compile each); call it off the reconcile path."""
        swapped = 0
        for fw in list(self.functions.values()):
            try:
                swapped += fw.specialise(self.lock)
            except Exception:
                log.exception("could not specialise %s; it keeps the generic program", fw.name)
        return swapped

    def warm_up(self) -> None:
        """Compile the generic firewall ahead of need, so the first NetworkFunction
        takes effect without waiting for a compile."""
        from pcn_agent.dataplane.cubes.firewall import GENERIC, TYPE

        self.node.rt.load_variant(TYPE, GENERIC)

    def counters(self) -> dict[str, dict[str, int]]:
        """Per-cube drop counters and per-port traffic, for metrics."""
        rt = self.node.rt
        out: dict[str, dict[str, int]] = {}
        for port in list(rt.ports.values()):
            c = rt.port_counters(port)
            out[f"{port.cube}:{port.name}"] = {"rx_packets": c.rx_packets, "rx_bytes": c.rx_bytes,
                                               "tx_packets": c.tx_packets, "tx_bytes": c.tx_bytes,
                                               "drops": c.drops}
        return out


def _advance(cur: Desired, op: Op) -> Desired:
    """The applied state after one successful operation."""
    if op.kind == "set-function":
        return replace(cur, functions={**cur.functions, op.key: op.value})
    if op.kind == "delete-function":
        return replace(cur, functions={k: v for k, v in cur.functions.items() if k != op.key})
    if op.kind == "set-peers":
        return replace(cur, peers=op.value)
    if op.kind == "set-service":
        return replace(cur, services={**cur.services, op.key: op.value})
    if op.kind == "delete-service":
        return replace(cur, services={k: v for k, v in cur.services.items() if k != op.key})
    if op.kind == "set-nodeport":
        return replace(cur, nodeports={**cur.nodeports, op.key: op.value})
    if op.kind == "delete-nodeport":
        return replace(cur, nodeports={k: v for k, v in cur.nodeports.items() if k != op.key})
    if op.kind == "set-address-sets":
        return replace(cur, address_sets={**cur.address_sets, **op.value})
    if op.kind == "prune-address-sets":
        return replace(cur, address_sets={k: v for k, v in cur.address_sets.items()
                                          if k in op.value})
    if op.kind == "set-policy":
        policies = {k: v for k, v in cur.policies.items() if k != op.key}
        if op.value is not None:
            policies[op.key] = op.value
        return replace(cur, policies=policies)
    if op.kind == "set-chain":
        chains = {k: v for k, v in cur.chains.items() if k != op.key}
        if op.value != ((), ()):
            chains[op.key] = op.value
        return replace(cur, chains=chains)
    return cur
