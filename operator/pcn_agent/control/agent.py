"""The node agent's operator: kopf handlers only record what they see and
wake the reconcile loop; the loop runs the pure reconciler, applies its plan
to the node's data plane in a worker thread, then writes status, Events and
derived NodePortRules.

The command line and the environment it reads are pcn_agent.control.cli's
(`pcn-agent --help`), which starts compiling before importing this module.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import functools
import json
import logging
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict

import kopf

from pcn_agent.control.cubetypes import CubeTypes
from pcn_agent.control.healthcheck import HealthServers
from pcn_agent.control.kube import ApiError, Kube, discover
from pcn_agent.control.manager import DataplaneManager
from pcn_agent.control.prepare import start_prepare
from pcn_agent.control.reconcile import (
    Inputs,
    ObjectKey,
    ServiceIndex,
    Verdict,
    desired_state,
    node_addresses,
    vtep_for,
)
from pcn_agent.control.settings import DEFAULT_FILE as DEFAULT_SETTINGS_FILE
from pcn_agent.control.settings import ClusterSettings
from pcn_agent.control.watch import ListWatch
from pcn_agent.dataplane import bpffs, socklb
from pcn_agent.dataplane.runtime import STATE_ROOT, Runtime
from pcn_agent.node.wiring import NodeConfig, NodeDataplane

if TYPE_CHECKING:
    from pcn_agent.control.localapi import DataplaneHandler, LocalApiServer
    from pcn_agent.control.observe import Observer

log = logging.getLogger("pcn_agent.control.agent")

VERSION = "0.1.0"
DEBOUNCE_S = 0.005
WARM_PERIOD_S = 0.25  # see Agent._prepared_runtime
STATUS_CONFIGMAP = "pcn-agent-status"  # one ConfigMap per node: <this>-<node>
STATUS_PERIOD_S = 2.0
GROUP_PATH = "/apis/pcn.dev/v1alpha1"
# Watched by the agent itself (control.watch), not through kopf: the kinds a
# cluster has thousands of, which the agent only reads
WATCHED = (("Service", "v1", "/api/v1/services"),
           ("EndpointSlice", "discovery.k8s.io/v1", "/apis/discovery.k8s.io/v1/endpointslices"))
KINDS = {  # store kind -> (api path, plural, namespaced)
    "NetworkFunction": (GROUP_PATH, "networkfunctions", True),
    "CubeChain": (GROUP_PATH, "cubechains", True),
    "NodePortRule": (GROUP_PATH, "nodeportrules", False),
}


class NodeVerdict(TypedDict):
    """One node's entry in status.nodes of a pcn custom resource."""

    ready: bool
    pods: int
    message: str


class ReadyCondition(TypedDict):
    type: str
    status: str
    reason: str
    message: str
    observedGeneration: int | None
    lastTransitionTime: NotRequired[str | None]  # only in what is sent


class WrittenStatus(TypedDict):
    """The status this agent writes on a pcn custom resource (merge-patched:
    other nodes' entries in `nodes` stay)."""

    observedGeneration: int | None
    conditions: list[ReadyCondition]
    nodes: dict[str, NodeVerdict]
    realizedNodes: int
    realizedPods: int


def _key(body: Mapping[str, Any]) -> tuple[str, str]:
    m = body.get("metadata") or {}
    return m.get("namespace") or "", m.get("name") or ""


def socket_lb_cgroup(s: ClusterSettings) -> str | None:
    """Where socket load balancing attaches (NodeConfig.socket_lb_cgroup):
    None when the ConfigMap turns it off (socketLB: "false") or no pods
    cgroup is found (then the lbrp translates everything, as before; logged).
    The kubelet's pods cgroup is looked up under $PCN_CGROUP_ROOT (the
    DaemonSet mounts the host's /sys/fs/cgroup there: the container's own
    /sys/fs/cgroup shows only its own cgroup), else the cgroup v2 mount."""
    if not s.socketLB:
        return None
    if s.socketLBCgroup:
        return s.socketLBCgroup
    root = os.environ.get("PCN_CGROUP_ROOT")
    try:
        return str(socklb.kubelet_pods_cgroup(Path(root) if root else None))
    except (socklb.SocketLBError, OSError) as exc:
        log.warning("socket load balancing off: %s", exc)
        return None


class Agent:
    def __init__(self, node_name: str, settings: ClusterSettings, kube: Kube,
                 netns: str | None = None, socket_path: str = "/run/pcn/agent.sock",
                 pin_root: Path = bpffs.DEFAULT_ROOT, state_root: Path = STATE_ROOT) -> None:
        self.node_name = node_name
        self.settings = settings
        self.kube = kube
        self.netns = netns
        self.socket_path = socket_path
        self.pin_root = pin_root
        self.state_root = state_root
        self.store: dict[str, dict[tuple[str, str], dict[str, Any]]] = defaultdict(dict)
        self.node: NodeDataplane | None = None
        self.manager: DataplaneManager | None = None
        self.api: LocalApiServer | None = None
        self.cni_handler: DataplaneHandler | None = None
        self.observer: Observer | None = None  # captures and flows (control.observe)
        self.health = HealthServers(netns)  # kube-proxy's healthCheckNodePorts
        self.cubetypes = CubeTypes()  # CubeTypes compiled on this node
        self.trigger = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.tasks: list[asyncio.Task[None]] = []  # start_tasks(); ended by stop_tasks()
        self.written: dict[tuple[str, str, str], WrittenStatus] = {}
        self.events_sent: set[tuple[Any, ...]] = set()
        self.last_error = ""
        self.reconciles = 0
        self.reconcile_seconds: list[float] = []
        self.apply_errors = 0
        # pods whose bandwidth annotation is invalid ("ns/name" -> why): they run unlimited
        self.bandwidth_errors: dict[str, str] = {}
        self.up_error = ""
        self._warmed = False  # manager.warm_up started (after the first pass's apply)
        self._published_at = 0.0
        self._restart_warned = ""  # the pending settings change last logged
        self.status_namespace = os.environ.get("PCN_NAMESPACE", "pcn-system")
        self._prepared: concurrent.futures.Future[Runtime] | None = None
        # Last valid version of each NetworkFunction/CubeChain (Inputs.last_good),
        # kept on disk too: an invalid edit made while the agent was down must
        # not open what the last valid version blocked.
        self.last_good_path = state_root / f"{node_name}.last-good.json"
        self.last_good: dict[ObjectKey, Mapping[str, Any]] = _load_last_good(self.last_good_path)
        # Services and EndpointSlices: each pass computes only what changed
        self.service_index = ServiceIndex()

    def prepare(self, started: concurrent.futures.Future[Runtime] | None = None
                ) -> concurrent.futures.Future[Runtime]:
        """Start, once, opening the runtime and compiling the node's cube types
        in a thread of their own (or take the one the command line `started`):
        seconds of work that needs no Node object, done while kopf starts and
        lists the cluster."""
        if self._prepared is None:
            self._prepared = started or start_prepare(self.node_name, self.netns,
                                                      self.pin_root, self.state_root,
                                                      self.settings.lb_sizes)
        return self._prepared

    # ------------------------------------------------------------------ events
    def observe(self, kind: str, event_type: str | None, body: Mapping[str, Any]) -> None:
        key = _key(body)
        obj: dict[str, Any] | None = None
        if event_type == "DELETED":
            self.store[kind].pop(key, None)
        else:
            obj = self.store[kind][key] = dict(body)
        if kind in ("Service", "EndpointSlice"):
            self.service_index.observe(kind, key, obj)  # its journal: no scan of the store
        self.wake()

    def replace(self, kind: str, api_version: str, items: list[Mapping[str, Any]]) -> None:
        """A LIST of `kind` (control.watch): objects not in `items` are
        deleted, those whose resourceVersion changed (or new) stored."""
        have = self.store[kind]
        listed = {_key(o) for o in items}
        for key in [k for k in have if k not in listed]:
            self.observe(kind, "DELETED", have[key])
        for item in items:
            old = have.get(_key(item))
            rv = (item.get("metadata") or {}).get("resourceVersion")
            if old is None or not rv or (old.get("metadata") or {}).get("resourceVersion") != rv:
                self.observe(kind, None, {"apiVersion": api_version, "kind": kind, **item})

    def wake(self) -> None:
        """Thread-safe: ask the loop for a reconcile."""
        if self.loop is None:
            return
        self.loop.call_soon_threadsafe(self.trigger.set)

    # ------------------------------------------------------------------ loop
    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        while True:
            await self.trigger.wait()
            await asyncio.sleep(DEBOUNCE_S)  # gather a burst of events into one pass
            self.trigger.clear()
            try:
                await self.reconcile_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("reconcile failed")
                await asyncio.sleep(1)
                self.trigger.set()  # level-based: try again

    async def reconcile_once(self) -> None:
        start = time.monotonic()
        if self.node is None and not await self._bring_up():
            return
        assert self.node is not None and self.manager is not None
        loop = asyncio.get_running_loop()
        manager, rt = self.manager, self.node.rt
        await loop.run_in_executor(None, self.cubetypes.sync, rt,
                                   list(self.store["CubeType"].values()), _types_in_use(manager))
        attachments = {k: (p.k8s_namespace, p.k8s_name)
                       for k, p in list(self.node.pods.items()) if getattr(p, "k8s_name", "")}
        inputs = Inputs(
            node=self.node_name, settings=self.settings,
            nodes=list(self.store["Node"].values()),
            pods=[p for p in self.store["Pod"].values()
                  if (p.get("spec") or {}).get("nodeName") == self.node_name],
            all_pods=list(self.store["Pod"].values()),
            namespaces=list(self.store["Namespace"].values()),
            networkpolicies=list(self.store["NetworkPolicy"].values()),
            clusternetworkpolicies=list(self.store["ClusterNetworkPolicy"].values()),
            attachments=attachments,
            services=list(self.store["Service"].values()),
            endpointslices=list(self.store["EndpointSlice"].values()),
            functions=list(self.store["NetworkFunction"].values()),
            chains=list(self.store["CubeChain"].values()),
            nodeportrules=list(self.store["NodePortRule"].values()),
            cubetypes=self.cubetypes.infos(),
            last_good=self.last_good, tracking=bool(self.manager.current.policies),
            service_index=self.service_index)
        result = desired_state(inputs)
        if result.last_good != self.last_good:
            self.last_good = result.last_good
            _save_last_good(self.last_good_path, self.last_good)
        report = await asyncio.get_running_loop().run_in_executor(
            None, self.manager.apply, result.desired)
        if result.health_checks or self.health.ports:
            await asyncio.get_running_loop().run_in_executor(
                None, self.health.sync, result.health_checks)
        if not self._warmed:
            # Compiling the function cubes ahead of need (seconds of CPU) waits
            # for the first pass's plan to be in: facing 10 000 Services, that
            # pass is the cold start, and the compiles took half its CPU.
            self._warmed = True
            loop.run_in_executor(None, self.manager.warm_up)  # in the background
        if any(op.kind == "set-function" for op in report.ops):
            loop = asyncio.get_running_loop()
            loop.run_in_executor(None, self.manager.specialise_pending)
        bandwidth_errors = {f"{ns}/{name}": why
                            for (ns, name), why in sorted(result.bandwidth_errors.items())}
        for pod, why in bandwidth_errors.items():
            if self.bandwidth_errors.get(pod) != why:
                log.warning("pod %s runs without its bandwidth limit: %s", pod, why)
        self.bandwidth_errors = bandwidth_errors
        for op, err in report.errors:
            self.apply_errors += 1
            self.last_error = f"{op.kind} {op.key}: {err}"
            self._blame(result.verdicts, op, err)
        if self.reconciles == 0:
            # after the first reconcile (Services, pods and functions in
            # place), not with the functions' warm-up when the data plane
            # comes up: its compile must not delay them
            loop.run_in_executor(None, self.manager.warm_up_capture)
        self.reconciles += 1
        self.reconcile_seconds.append(time.monotonic() - start)
        del self.reconcile_seconds[:-1000]
        await loop.run_in_executor(None, self.cubetypes.release_unused, rt,
                                   _types_in_use(manager))
        await self._sync_derived_rules(result.derived_rules)
        await self._write_statuses(result.verdicts)
        await self._write_cubetype_statuses()
        await self.publish_status()

    def node_status(self) -> dict[str, Any]:
        """What `kubectl pcn status/chain/stats` show about this node (see
        STATUS_CONFIGMAP). Sides use the user's words: ingress is traffic to
        the pod, egress traffic from it."""
        out: dict[str, Any] = {
            "node": self.node_name, "version": VERSION, "dataplane": "up" if self.node else "down",
            "healthy": self.node is not None and not self.up_error, "heartbeat": _now(),
            "lastError": self.last_error or self.up_error, "reconciles": self.reconciles,
            "applyErrors": self.apply_errors, "pods": {}, "functions": {}, "realized": {},
            "bandwidthErrors": dict(self.bandwidth_errors)}
        if self.node is None or self.manager is None:
            return out
        pending = self.restart_needed()
        if pending:
            out["restartNeeded"] = pending
        node, cur = self.node, self.manager.current
        # how pods reach other nodes; "overlaySwitched": this agent found a
        # data plane built with the other mode and moved its routes (the
        # ConfigMap's overlay is read at start: a change takes a restart)
        out["overlay"] = node.cfg.overlay
        out["podMTU"] = node.cfg.mtu
        if node.overlay_switched:
            out["overlaySwitched"] = node.overlay_switched
        out["realized"] = {"services": len(cur.services), "nodeports": len(cur.nodeports),
                           "functions": len(cur.functions), "chains": len(cur.chains),
                           "pods": len(node.pods), "peers": len(cur.peers)}
        with self.manager.lock:
            for key, pod in list(node.pods.items()):
                c = node.rt.port_counters(pod.port)
                name = f"{pod.k8s_namespace}/{pod.k8s_name}" if pod.k8s_name else key
                out["pods"][name] = {
                    "key": key, "ip": pod.iface.address.split("/")[0],
                    "port": f"{pod.port.cube}:{pod.port.name}",
                    "ingress": list(pod.egress), "egress": list(pod.ingress),
                    "counters": {"rx_packets": c.tx_packets, "rx_bytes": c.tx_bytes,
                                 "tx_packets": c.rx_packets, "tx_bytes": c.rx_bytes,
                                 "drops": c.drops}}
                if node.policy is not None and pod.policy:
                    # the policies in force, per rule (the user's sides, as above)
                    out["pods"][name]["policy"] = {
                        "rules": node.policy.counters(pod.port.id),
                        "drops": node.policy.drops(pod.port.id)}
            for cname, f in list(self.manager.functions.items()):
                entry = {"type": f.function_type().removeprefix("cubetype."), **f.status()}
                if cname.startswith("bw."):  # a pod's bandwidth annotation: under the pod
                    _, side, ns, pname = cname.split(".", 3)
                    pod_entry = out["pods"].get(f"{ns}/{pname}")
                    if pod_entry is not None:
                        pod_entry.setdefault("bandwidth", {})[side] = entry
                    continue
                _, ns, fname = cname.split(".", 2)
                out["functions"][cname] = {"namespace": ns, "name": fname, **entry}
        return out

    async def publish_status(self, force: bool = False) -> None:
        """Write node_status() to this node's ConfigMap, at most every
        STATUS_PERIOD_S unless forced."""
        now = time.monotonic()
        if not force and now - self._published_at < STATUS_PERIOD_S:
            return
        self._published_at = now
        loop = asyncio.get_running_loop()
        status = await loop.run_in_executor(None, self.node_status)
        cm_name = f"{STATUS_CONFIGMAP}-{self.node_name}"
        cm = {"apiVersion": "v1", "kind": "ConfigMap",
              "metadata": {"name": cm_name,
                           "namespace": self.status_namespace,
                           "labels": {"app.kubernetes.io/component": STATUS_CONFIGMAP,
                                      "pcn.dev/node": self.node_name}},
              "data": {"status.json": json.dumps(status, sort_keys=True)}}
        path = f"/api/v1/namespaces/{self.status_namespace}/configmaps"
        try:
            await self.kube.request("PATCH", f"{path}/{cm_name}", cm,
                                    "application/merge-patch+json")
        except ApiError as exc:
            if exc.status != 404:
                log.warning("could not publish node status: %s", exc)
                return
            await self._try(self.kube.create("/api/v1", "configmaps", cm, self.status_namespace),
                            {409})
        except Exception as exc:
            log.warning("could not publish node status: %s", exc)

    async def heartbeat(self) -> None:
        """Publish counters and health regularly, traffic or not."""
        while True:
            await asyncio.sleep(STATUS_PERIOD_S)
            await self.publish_status()

    def restart_needed(self, path: Path | None = None) -> str:
        """What the mounted ConfigMap (PCN_CONFIG, or `path`) now says that
        only an agent restart applies: the overlay and the pods' MTU, which
        the data plane and the CNI configuration are built with at start
        (kubelet refreshes a mounted ConfigMap in place; the agent does not
        rebuild a running node under its pods). "" when none, or when the
        file cannot be read; logged once per change."""
        src = path or Path(os.environ.get("PCN_CONFIG", str(DEFAULT_SETTINGS_FILE)))
        if not src.exists():  # settings given otherwise (tests, embedding): nothing to watch
            return ""
        try:
            now = ClusterSettings.load(src)
        except Exception:  # noqa: BLE001 - the next restart reports it, naming the key
            return ""
        diffs = [f"{what} {old} -> {new}" for what, old, new in (
            ("overlay", self.settings.overlay, now.overlay),
            ("pod MTU", self.settings.pod_mtu, now.pod_mtu),
            ("lbServiceMapMax", self.settings.lbServiceMapMax, now.lbServiceMapMax),
            ("lbBackendMapMax", self.settings.lbBackendMapMax, now.lbBackendMapMax))
            if old != new]
        msg = ""
        if diffs:
            msg = (f"the ConfigMap changed ({', '.join(diffs)}): restart the agent to apply it "
                   "(kubectl -n pcn-system rollout restart daemonset/pcn-agent)")
        if msg and msg != self._restart_warned:
            log.warning("node %s: %s", self.node_name, msg)
        self._restart_warned = msg
        return msg

    def _blame(self, verdicts: dict[tuple[str, str, str], Verdict], op: Any, err: str) -> None:
        """Turn a data-plane failure into the status of the object behind it."""
        if op.kind in ("set-function", "delete-function") and isinstance(op.key, str) \
                and op.key.startswith("nf."):
            _, ns, name = op.key.split(".", 2)
            v = verdicts.setdefault(("NetworkFunction", ns, name), Verdict())
            v.fail("DataplaneError", err)

    async def _bring_up(self) -> bool:
        me = self.store["Node"].get(("", self.node_name))
        if me is None:
            return False
        node_ip, pod_cidr = node_addresses(me)
        if not node_ip or not pod_cidr:
            self.up_error = "the Node has no InternalIP or spec.podCIDR yet"
            return False
        s = self.settings
        vtep = ""
        if s.overlay == "vxlan":
            vtep = vtep_for(s, pod_cidr, (me.get("metadata") or {}).get("annotations") or {})
        loop = asyncio.get_running_loop()
        # pyroute2's synchronous API runs its own event loop: keep it off ours.
        uplink = await loop.run_in_executor(None, _interface_with, self.netns, node_ip)
        if uplink is None:
            self.up_error = f"no interface holds the node address {node_ip}"
            log.error("%s; is NODE_NAME right and the agent in the host network?", self.up_error)
            return False
        vteps_len = int(s.vtepsRange.split("/")[1])
        cfg = NodeConfig(name=self.node_name, netns=self.netns, uplink=uplink, node_ip=node_ip,
                         pod_cidr=pod_cidr, vtep=f"{vtep}/{vteps_len}" if vtep else "",
                         mtu=s.pod_mtu, overlay=s.overlay,
                         cluster_pod_cidr=s.podCIDR, service_cidr=s.serviceClusterIPRange,
                         nodeport_range=s.nodeport_range, snat_range=s.snat_range,
                         session_timeouts=s.session_timeouts,
                         session_gc_interval_s=s.sessionGCInterval,
                         socket_lb_cgroup=socket_lb_cgroup(s), lb_sizes=s.lb_sizes)
        try:
            rt = await self._prepared_runtime()
            node = NodeDataplane(cfg, self.pin_root, self.state_root, prepared=rt)
            await loop.run_in_executor(None, node.up)  # closes the runtime if it fails
        except Exception as exc:
            self._prepared = None  # the next try starts from scratch
            self.up_error = f"could not build the node's data plane: {exc}"
            raise
        self.node = node
        self.up_error = ""
        self.manager = DataplaneManager(node)
        self._start_local_api()
        log.info("node %s data plane %s (pod CIDR %s, overlay %s, VTEP %s, uplink %s, pod "
                 "MTU %d)", self.node_name, "adopted" if node.rt.adopted else "built", pod_cidr,
                 s.overlay, vtep or "-", uplink, s.pod_mtu)
        return True

    async def _prepared_runtime(self) -> Runtime:
        """The runtime prepare() opens (raising what it raised). While its cube
        types compile (seconds: the C compiler and the verifier run without
        the GIL), every WARM_PERIOD_S the Services and EndpointSlices seen so
        far are turned into their entries (the ServiceIndex, pure), so that
        the first pass after bring-up has only the latest ones to compute
        (at a start facing 10 000 Services, 0.5 s of a quiet machine's CPU
        otherwise spent after the data plane is up)."""
        fut = asyncio.wrap_future(self.prepare())
        while True:
            done, _ = await asyncio.wait({fut}, timeout=WARM_PERIOD_S)
            if done:
                return fut.result()
            self.service_index.tables(list(self.store["Service"].values()),
                                      list(self.store["EndpointSlice"].values()),
                                      self.node_name)

    def _start_local_api(self) -> None:
        try:
            from pcn_agent.control.localapi import CniService, DataplaneHandler, LocalApiServer
        except ImportError:  # pragma: no cover - the module ships with the package
            log.error("local API unavailable: the CNI plugin cannot attach pods")
            return
        assert self.node is not None
        assert self.manager is not None
        from pcn_agent.control.observe import Observer

        handler = self.cni_handler = DataplaneHandler(self.node, lock=self.manager.lock)
        self.observer = observer = Observer(self.node, self.manager)

        from pcn_agent.dataplane.netns import netns_path

        cni = CniService(handler, netns_path(self.netns) if self.netns else None,
                         settled=self.wake)

        def serve(request: dict[str, Any]) -> dict[str, Any]:
            if request.get("op") in Observer.OPS:  # flows
                return observer(request)
            response = handler(request)
            # a pod came or went: its chain may change; after a burst of
            # pcn-cni invocations, one reconcile for them all
            if request.get("op") in ("attach", "detach", "gc") \
                    and not cni.defer():
                self.wake()
            return response

        cni.handler = serve
        self.api = LocalApiServer(self.socket_path, serve,
                                  streams={"capture": observer.capture,
                                           "flows": observer.flows_stream, "cni": cni})
        self.api.start()

    # ------------------------------------------------------------------ writes
    async def _sync_derived_rules(self, derived: Mapping[str, dict[str, Any]]) -> None:
        have = self.store["NodePortRule"]
        for name, obj in derived.items():
            if ("", name) not in have:
                await self._try(self.kube.create(GROUP_PATH, "nodeportrules", obj), {409})
        for (_, name), obj in list(have.items()):
            labels = (obj.get("metadata") or {}).get("labels") or {}
            if labels.get("app.kubernetes.io/managed-by") == "pcn-agent" and name not in derived:
                await self._try(self.kube.delete(GROUP_PATH, "nodeportrules", name), {404})

    async def _write_statuses(self, verdicts: Mapping[tuple[str, str, str], Verdict]) -> None:
        for kind, (path, plural, namespaced) in KINDS.items():
            for (ns, name), obj in list(self.store[kind].items()):
                v = verdicts.get((kind, ns, name), Verdict())
                mine: NodeVerdict = {"ready": v.ready, "pods": v.pods,
                                     "message": v.message or v.reason}
                nodes = dict((obj.get("status") or {}).get("nodes") or {})
                nodes[self.node_name] = mine
                ready_nodes = [n for n, s in nodes.items() if s.get("ready")]
                failing = [(n, s) for n, s in sorted(nodes.items()) if not s.get("ready")]
                gen = (obj.get("metadata") or {}).get("generation")
                cond: ReadyCondition = {
                    "type": "Ready", "status": "False" if failing else "True",
                    "reason": v.reason if not v.ready else ("Realized" if not failing
                                                            else "NotRealizedEverywhere"),
                    "message": (v.message if not v.ready else
                                (f"node {failing[0][0]}: {failing[0][1].get('message')}"
                                 if failing else f"realized on {len(ready_nodes)} node(s)")),
                    "observedGeneration": gen}
                status: WrittenStatus = {
                    "observedGeneration": gen, "conditions": [cond],
                    "nodes": {self.node_name: mine}, "realizedNodes": len(ready_nodes),
                    "realizedPods": sum(int(s.get("pods", 0)) for s in nodes.values())}
                wkey = (kind, ns, name)
                if self.written.get(wkey) == status:
                    continue
                sent = copy.deepcopy(status)
                old = ((obj.get("status") or {}).get("conditions") or [{}])[0]
                sent["conditions"][0]["lastTransitionTime"] = old.get("lastTransitionTime") \
                    if old.get("status") == cond["status"] else _now()
                if await self._try(self.kube.patch_status(path, plural, ns if namespaced else None,
                                                          name, sent), {404}):
                    self.written[wkey] = status
                if not v.ready:
                    await self._warn(obj, v)

    async def _write_cubetype_statuses(self) -> None:
        """Each CubeType's status: this node's entry (compiled, errors at the
        source's lines, the functions using it here) merged with the other
        nodes', a Ready condition that is True when it compiled on every
        node that reported, and the generation this node compiled."""
        from pcn_agent.dataplane.cubes.custom import runtime_type

        assert self.manager is not None
        for (_, name), obj in list(self.store["CubeType"].items()):
            st = self.cubetypes.states.get(name)
            if st is None:
                continue
            used = sorted(f"{cname.split('.', 2)[1]}/{cname.split('.', 2)[2]}"
                          for cname, f in list(self.manager.functions.items())
                          if f.function_type() == runtime_type(name) and cname.startswith("nf."))
            mine = st.node_status(used)
            nodes = dict((obj.get("status") or {}).get("nodes") or {})
            nodes[self.node_name] = mine
            ready = [n for n, s in nodes.items() if s.get("ready")]
            failing = [(n, s) for n, s in sorted(nodes.items()) if not s.get("ready")]
            stage = (st.errors[0].get("stage") if st.errors else "") or ""
            reason = {"name": "ReservedName", "schema": "InvalidSchema",
                      "compile": "CompileFailed", "verify": "VerifierRejected",
                      }.get(stage, "NotCompiled")
            cond: dict[str, Any] = {
                    "type": "Ready", "status": "False" if failing else "True",
                    "reason": reason if not mine["ready"] else
                    ("Compiled" if not failing else "NotCompiledEverywhere"),
                    "message": (st.message if not mine["ready"] else
                                (f"node {failing[0][0]}: {failing[0][1].get('message')}"
                                 if failing else f"compiled on {len(ready)} node(s)")),
                    "observedGeneration": st.generation}
            status: dict[str, Any] = {"observedGeneration": st.generation, "conditions": [cond],
                      "nodes": {self.node_name: mine}, "realizedNodes": len(ready),
                      "realizedPods": 0}
            wkey = ("CubeType", "", name)
            if self.written.get(wkey) == status:
                continue
            sent = copy.deepcopy(status)
            old = ((obj.get("status") or {}).get("conditions") or [{}])[0]
            sent["conditions"][0]["lastTransitionTime"] = old.get("lastTransitionTime") \
                if old.get("status") == cond["status"] else _now()
            if await self._try(self.kube.patch_status(GROUP_PATH, "cubetypes", None, name, sent),
                               {404}):
                self.written[wkey] = status  # type: ignore[assignment]

    async def _warn(self, obj: Mapping[str, Any], v: Verdict) -> None:
        key = (_key(obj), obj.get("kind"), v.reason, v.message)
        if key in self.events_sent:
            return
        self.events_sent.add(key)
        await self._try(self.kube.event(dict(obj), v.reason, v.message, self.node_name), set())

    async def _try(self, coro: Any, ok_statuses: set[int]) -> bool:
        try:
            await coro
            return True
        except ApiError as exc:
            if exc.status in ok_statuses:
                return True
            self.last_error = str(exc)
            log.warning("API call failed: %s", exc)
        except Exception as exc:  # network trouble: the next pass tries again
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("API call failed: %s", self.last_error)
        return False

    def start_tasks(self) -> None:
        """Start the reconcile loop and the status heartbeat on the running loop.
        They run until stop_tasks(): the agent keeps the references (the loop
        keeps only weak ones, so an unreferenced task may be collected)."""
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self.run(), name="pcn-agent reconcile loop"),
                      loop.create_task(self.heartbeat(), name="pcn-agent heartbeat")]
        for kind, api_version, path in WATCHED:
            lw = ListWatch(self.kube, path, kind, functools.partial(self.observe, kind),
                           functools.partial(self.replace, kind, api_version))
            self.tasks.append(loop.create_task(lw.run(), name=f"pcn-agent watch {kind}"))

    async def stop_tasks(self) -> None:
        """Cancel the tasks of start_tasks() and wait until they have ended (a
        reconcile pass running then ends at its next await; a data-plane call
        already in a worker thread finishes there). Left running, kopf would
        take them for hung handlers and wait 5 s before cancelling them itself:
        5 s more of a restart with the local API already gone."""
        tasks, self.tasks = self.tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def shutdown(self) -> None:
        if self.observer is not None:
            self.observer.close()  # ends the capture streams the API server waits for
        if self.api is not None:
            self.api.stop()
        if self.cni_handler is not None:
            self.cni_handler.close()
        self.health.close()


def _types_in_use(manager: DataplaneManager) -> set[str]:
    """The runtime types of the functions' cubes (CubeTypes among them)."""
    with manager.lock:
        return {f.function_type() for f in manager.functions.values()}


def _load_last_good(path: Path) -> dict[ObjectKey, Mapping[str, Any]]:
    try:
        rows = json.loads(path.read_text())
        return {(r["kind"], r["namespace"], r["name"]): r["object"] for r in rows}
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return {}


def _save_last_good(path: Path, last_good: Mapping[ObjectKey, Mapping[str, Any]]) -> None:
    rows = [{"kind": k, "namespace": ns, "name": n, "object": obj}
            for (k, ns, n), obj in sorted(last_good.items())]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, sort_keys=True))
        tmp.replace(path)
    except OSError as exc:  # memory still holds it; only a restart would lose it
        log.warning("cannot save %s: %s", path, exc)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _interface_with(netns: str | None, ip: str) -> str | None:
    from pcn_agent.dataplane.netns import iproute

    with iproute(netns) as ipr:
        for a in ipr.get_addr(family=2):
            if a.get_attr("IFA_ADDRESS") == ip:
                links = ipr.get_links(a["index"])
                return links[0].get_attr("IFLA_IFNAME") if links else None
    return None


# ---------------------------------------------------------------------- kopf wiring
AGENT: Agent | None = None


def _agent() -> Agent:
    global AGENT
    if AGENT is None:
        node = os.environ.get("NODE_NAME")
        if not node:
            raise kopf.PermanentError("NODE_NAME is not set: give the agent its node's name "
                                      "(a DaemonSet passes spec.nodeName through the downward API)")
        AGENT = Agent(node, ClusterSettings.load(), Kube(discover()),
                      netns=os.environ.get("PCN_NETNS") or None,
                      socket_path=os.environ.get("PCN_SOCKET", "/run/pcn/agent.sock"),
                      pin_root=Path(os.environ.get("PCN_BPF_ROOT", str(bpffs.DEFAULT_ROOT))),
                      state_root=Path(os.environ.get("PCN_STATE_DIR", str(STATE_ROOT))))
    return AGENT


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    ep = discover()
    return kopf.ConnectionInfo(server=ep.server, token=ep.token, ca_path=ep.ca_file,
                               certificate_path=ep.cert_file, private_key_path=ep.key_file,
                               insecure=ep.insecure, scheme="Bearer" if ep.token else None)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    agent = _agent()
    agent.prepare()  # a no-op when main() already started it
    # One agent per node: no peering, no finalizers, no progress annotations on
    # shared objects (event handlers keep none).
    settings.peering.standalone = True
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    port = int(os.environ.get("PCN_METRICS_PORT", "9090"))
    if port:
        from pcn_agent.control.metrics import serve_metrics

        serve_metrics(agent, port)
    agent.start_tasks()
    agent.wake()


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    if AGENT is not None:
        await AGENT.stop_tasks()
        AGENT.shutdown()
        await AGENT.kube.close()


def _observer(kind: str) -> Callable[..., Coroutine[Any, Any, None]]:
    # A coroutine: kopf runs a plain function in a thread of its executor, a
    # hop per event (20 000 of them when the agent starts facing 10 000
    # Services), and the store would change under the loop's reads of it.
    async def handler(event: Mapping[str, Any], **_: Any) -> None:
        _agent().observe(kind, event.get("type"), event.get("object") or {})
    return handler


kopf.on.event("", "v1", "nodes")(_observer("Node"))
# Every pod of the cluster: NetworkPolicy peers are selected anywhere (this
# node's pods are the subjects; see reconcile.policies_of).
kopf.on.event("", "v1", "pods")(_observer("Pod"))
kopf.on.event("", "v1", "namespaces")(_observer("Namespace"))
kopf.on.event("networking.k8s.io", "v1", "networkpolicies")(_observer("NetworkPolicy"))
kopf.on.event("policy.networking.k8s.io", "v1alpha2",
              "clusternetworkpolicies")(_observer("ClusterNetworkPolicy"))
# Services and EndpointSlices: WATCHED, in start_tasks
kopf.on.event("pcn.dev", "v1alpha1", "networkfunctions")(_observer("NetworkFunction"))
kopf.on.event("pcn.dev", "v1alpha1", "cubechains")(_observer("CubeChain"))
kopf.on.event("pcn.dev", "v1alpha1", "nodeportrules")(_observer("NodePortRule"))
kopf.on.event("pcn.dev", "v1alpha1", "cubetypes")(_observer("CubeType"))


def run(liveness: str | None, verbose: bool = False,
        prepared: concurrent.futures.Future[Runtime] | None = None) -> int:
    """Run the operator until stopped (pcn_agent.control.cli.main parses the
    command line and starts `prepared`)."""
    logging.getLogger("kopf").setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        _agent().prepare(prepared)
    except Exception as exc:
        print(f"pcn-agent: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(kopf.operator(standalone=True, clusterwide=True, liveness_endpoint=liveness))
    except KeyboardInterrupt:
        pass
    return 0

