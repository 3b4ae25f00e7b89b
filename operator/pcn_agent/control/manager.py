"""The data-plane manager: applies reconciler plans to a node's data plane,
idempotently, one operation at a time, remembering what took effect."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pcn_agent.control.reconcile import Desired, FunctionSpec, Op, plan
from pcn_agent.dataplane.cubes.custom import CustomFunction, is_custom
from pcn_agent.dataplane.cubes.flowmonitor import FlowMonitor
from pcn_agent.dataplane.cubes.functions import FUNCTION_CUBES, FlowMonitorFunction, FunctionCube
from pcn_agent.node.wiring import NodeDataplane
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
        self.functions: dict[str, FunctionCube] = {}  # by cube name
        self.lock = threading.RLock()  # shared with the local API: one writer at a time
        # what apply() does that takes long, for whoever waits for the lock
        # (the local API's flows says it); "" when nothing slow is under way
        self.busy = ""
        self._stacked_pods: frozenset[str] = frozenset()  # attached pods at the last _tell_stacked
        # the desired services of the last apply without a failure: the
        # applied services equal them (reconcile.plan's `applied`)
        self._services_applied: Mapping[Any, Any] | None = None
        if node.rt.adopted:
            self._adopt()

    def _adopt(self) -> None:
        """Rebuild what was applied from the adopted node, so that an agent
        restart re-applies nothing that is already in force."""
        from pcn_agent.control.reconcile import NodePortSpec, ServiceSpec

        n = self.node
        for name, cube in list(n.rt.cubes.items()):
            kind = _kind(cube.type)
            if kind is not None:
                self.functions[name] = kind.adopt(n.rt, name)
        # the node's address holds NodePorts and hostPorts, 127.0.0.1 hostPorts:
        # none of them is a ClusterIP the reconciler would remove
        hostports = n.dispatcher.hostport_service_keys() if n.dispatcher else set()
        services = {k: ServiceSpec(tuple(s.backends), s.affinity_timeout_s, s.drop_if_empty)
                    for k, s in n.lb.services.services.items()
                    if k[0] != n.cfg.node_ip and k not in hostports} \
            if n.lb else {}
        nodeports = {k: NodePortSpec(v.policy, tuple(v.backends), v.local, v.affinity_timeout_s)
                     for k, v in n.dispatcher.nodeports.items()} if n.dispatcher else {}
        functions = {name: FunctionSpec(f.function_type(), f.settings)
                     for name, f in self.functions.items()}
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
            # The service and NodePort tables are this pass's own copies,
            # written in place as operations succeed: a copy per operation
            # cost O(services) each, O(services^2) for an agent starting
            # with thousands of them.
            self.current = replace(self.current, services=dict(self.current.services),
                                   nodeports=dict(self.current.nodeports))
            applied, self._services_applied = self._services_applied, None
            for op in plan(self.current, desired, self.node.pods.keys(), applied):
                try:
                    self._do(op)
                    self.current = _advance(self.current, op)
                    report.applied += 1
                    report.ops.append(op)
                except Exception as exc:  # keep going: one bad object must not block others
                    log.exception("could not apply %s %s", op.kind, op.key)
                    report.errors.append((op, f"{type(exc).__name__}: {exc}"))
            if not report.errors:  # current.services now equals desired.services
                self._services_applied = desired.services
            pods = frozenset(self.node.pods)
            if pods != self._stacked_pods or any(
                    op.kind in ("set-chain", "set-function") for op in report.ops):
                self._tell_stacked()
                self._stacked_pods = pods
        report.seconds = time.monotonic() - start
        if report.applied:
            log.info("applied %d data-plane operations in %.1f ms", report.applied,
                     report.seconds * 1000)
        return report

    def _do(self, op: Op) -> None:
        n = self.node
        if op.kind == "set-function":
            self._set_function(op.key, op.value)
            n.save()
        elif op.kind == "delete-function":
            f = self.functions.pop(op.key, None)
            if f is not None:
                f.delete()
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

    def _tell_stacked(self) -> None:
        """Tell each function the ports it is stacked on now (pods come, go
        and change chains), so per-pod state of the others is dropped."""
        ports: dict[str, set[int]] = {name: set() for name in self.functions}
        for pod in self.node.pods.values():
            for name in (*pod.ingress, *pod.egress):
                if name in ports:
                    ports[name].add(pod.port.id)
        for name, f in self.functions.items():
            try:
                f.stacked_on(ports[name])
            except Exception:
                log.exception("could not drop the per-pod state of %s", name)

    def _set_function(self, name: str, spec: FunctionSpec) -> None:
        """Create the cube, reconfigure it, or (its type changed) replace it
        and restack it on the pods whose chains hold it: between the two,
        those pods' hooks name an instance that is gone, which lets packets
        pass (a firewall or policer without configuration passes)."""
        kind = _kind(spec.type)
        if kind is None:
            raise ValueError(f"unknown function type {spec.type!r}")
        f = self.functions.get(name)
        self.busy = f"setting up the {spec.type} function {name}" + (
            " (a flow monitor compiles a program of its own for each table size: a few "
            "seconds)" if spec.type == FlowMonitorFunction.type else "")
        try:
            if f is not None and f.function_type() == spec.type:
                f.configure(spec.settings)
                return
            if f is not None:
                f.delete()
                del self.functions[name]
            self.functions[name] = kind.create(self.node.rt, name, spec.settings)
        finally:
            self.busy = ""
        if f is not None:
            for pod, (from_pod, to_pod) in self.current.chains.items():
                if name in from_pod or name in to_pod:
                    self.node.set_pod_chain(pod, list(from_pod), list(to_pod))

    @property
    def monitors(self) -> dict[str, FlowMonitor]:
        """The flow monitor functions' monitors, by cube name."""
        return {name: f.fm for name, f in list(self.functions.items())
                if isinstance(f, FlowMonitorFunction)}

    def flow_stats(self) -> dict[str, dict[str, dict[str, int]]]:
        """Per flow monitor (cube name) and direction: packets, L3 bytes and
        flows in its table; for metrics of bounded cardinality."""
        out = {}
        for name, fm in self.monitors.items():
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
        for f in list(self.functions.values()):
            try:
                swapped += f.specialise(self.lock)
            except Exception:
                log.exception("could not specialise %s; it keeps the generic program", f.name)
        return swapped

    def warm_up(self) -> None:
        """Compile what every function type's first instance runs ahead of
        need, so the first NetworkFunction takes effect without waiting for
        a compile. Off the reconcile path: the agent runs it in the
        background once its data plane is up; the compiles hold no lock."""
        for kind in FUNCTION_CUBES.values():
            try:
                kind.warm_up(self.node.rt)
            except Exception:
                log.exception("could not compile the %s cube ahead of need", kind.type)

    def warm_up_capture(self) -> None:
        """Compile the packet capture program (the packetcapture type's,
        which every `kubectl pcn capture` and capture point runs) ahead of
        need: the first capture on a node missed a flow's first seconds, its
        SYN among them, while it compiled (issue 12 trial). The agent runs it
        in the background after its first reconcile, so that it does not
        compete with the Services' first realisation; no lock held."""
        from pcn_agent.dataplane.cubes import packetcapture

        try:
            self.node.rt.load_type(packetcapture.TYPE)
        except Exception:
            log.exception("could not compile the packet capture program ahead of need")

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


def _kind(type_name: str) -> type[FunctionCube] | None:
    """The FunctionCube class of a runtime type: a built-in one, or a
    CubeType's (custom.runtime_type)."""
    if is_custom(type_name):
        return CustomFunction
    return FUNCTION_CUBES.get(type_name)


def _advance(cur: Desired, op: Op) -> Desired:
    """The applied state after one successful operation. The service and
    NodePort operations write into `cur`'s own tables (apply copies them
    once per pass); the others give a new Desired."""
    if op.kind == "set-function":
        return replace(cur, functions={**cur.functions, op.key: op.value})
    if op.kind == "delete-function":
        return replace(cur, functions={k: v for k, v in cur.functions.items() if k != op.key})
    if op.kind == "set-peers":
        return replace(cur, peers=op.value)
    if op.kind in ("set-service", "delete-service"):
        _write(cur.services, op)
        return cur
    if op.kind in ("set-nodeport", "delete-nodeport"):
        _write(cur.nodeports, op)
        return cur
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


def _write(table: Mapping[Any, Any], op: Op) -> None:
    """Set or delete op.key in one of apply's own tables."""
    assert isinstance(table, dict), "apply() gives the pass its own dict"
    if op.kind.startswith("set-"):
        table[op.key] = op.value
    else:
        table.pop(op.key, None)
