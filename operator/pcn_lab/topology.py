"""A multi-node pcn topology on one machine, for tests, the demo and benchmarks.

A "node" is a network namespace running its own data plane; a "pod" is a
namespace behind a veth into its node; the nodes' uplinks and an "external
host" meet on a switch (a Linux bridge in a namespace of its own), their
physical network. Nothing touches the root namespace; every
name carries a per-run id, and `close()` removes all of it, also after a
failure half-way through `build()`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import secrets
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from pcn_agent.control.settings import UNDERLAY_MTU, VXLAN_OVERHEAD
from pcn_agent.dataplane import bpffs
from pcn_agent.dataplane.cubes.lbrp import Backend, LbSizes
from pcn_agent.dataplane.sessions import SessionTimeouts
from pcn_agent.node.wiring import (
    OVERLAY_VXLAN,
    OVERLAYS,
    NodeConfig,
    NodeDataplane,
    PeerNode,
    Pod,
)
from pcn_lab.cgroups import LabCgroups

log = logging.getLogger(__name__)

UNDERLAY = ipaddress.IPv4Network("192.168.250.0/24")
POD_SUPERNET = ipaddress.IPv4Network("10.244.0.0/16")
VTEPS = ipaddress.IPv4Network("10.18.0.0/16")
PREFIX = "pcnt"
EXTERNAL_IP = str(UNDERLAY.network_address + 100)


@dataclass
class LabPod:
    name: str
    node: str
    netns: str
    ip: str
    pod: Pod | None = None


@dataclass
class Lab:
    nodes_count: int = 2
    pods_per_node: int = 2
    # the nodes' overlay (wiring.OVERLAYS): "none" routes pods' traffic to the
    # other nodes' addresses unencapsulated, which the lab's underlay allows:
    # every node's uplink is on one switch (L2-adjacent, as direct routing needs)
    overlay: str = OVERLAY_VXLAN
    mtu: int | None = None  # the pods' MTU; None: 1450 over VXLAN, 1500 with none
    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    pin_root: Path = bpffs.DEFAULT_ROOT
    dataplane: bool = True  # False: namespaces and network only; agents build the data plane
    session_timeouts: SessionTimeouts = SessionTimeouts()  # the nodes' session lifetimes
    session_gc_interval_s: float = 10.0
    # Socket load balancing (socklb.py): each node's pods run in a cgroup of
    # that node (cgroups.py), where its sock_lb programs are attached.
    socket_lb: bool = False
    # the nodes' service table sizes (ConfigMap lbServiceMapMax, lbBackendMapMax)
    lb_sizes: LbSizes = LbSizes()
    cgroups: LabCgroups | None = None
    nodes: dict[str, NodeDataplane] = field(default_factory=dict)
    pods: dict[str, LabPod] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 1 <= self.nodes_count <= 50:
            raise ValueError("the lab holds 1 to 50 nodes")
        if self.overlay not in OVERLAYS:
            raise ValueError(f"overlay {self.overlay!r} is not one of {', '.join(OVERLAYS)}")
        if self.mtu is None:
            self.mtu = UNDERLAY_MTU - (VXLAN_OVERHEAD if self.overlay == OVERLAY_VXLAN else 0)

    @property
    def pod_mtu(self) -> int:
        """The pods' MTU (set by __post_init__ when not given)."""
        assert self.mtu is not None
        return self.mtu

    # ------------------------------------------------------------------ names
    @property
    def prefix(self) -> str:
        return f"{PREFIX}-{self.run_id}"

    @property
    def phy_ns(self) -> str:
        return f"{self.prefix}-phy"

    @property
    def ext_ns(self) -> str:
        """The external host, on the nodes' physical network but outside the cluster."""
        return f"{self.prefix}-ext"

    def node_name(self, i: int) -> str:
        return f"{self.prefix}-n{i}"

    def node_ip(self, i: int) -> str:
        return str(UNDERLAY.network_address + i)

    def pod_cidr(self, i: int) -> str:
        return str(list(POD_SUPERNET.subnets(new_prefix=24))[i])

    def vtep_ip(self, i: int) -> str:
        return str(VTEPS.network_address + i)

    def _vtep(self, i: int) -> str:
        """Node i's VTEP in interface notation, "" with direct routing."""
        return f"{self.vtep_ip(i)}/{VTEPS.prefixlen}" if self.overlay == OVERLAY_VXLAN else ""

    # ------------------------------------------------------------------ build
    def build(self) -> Lab:
        try:
            for i in range(1, self.nodes_count + 1):
                self._netns(self.node_name(i))
            self._underlay()
            if not self.dataplane:
                return self
            if self.socket_lb:
                self.cgroups = LabCgroups(self.prefix)
            for i in range(1, self.nodes_count + 1):
                cgroup = self.cgroups.node(self.node_name(i)) if self.cgroups else None
                cfg = NodeConfig(
                    name=self.node_name(i), netns=self.node_name(i), uplink="uplink",
                    node_ip=self.node_ip(i), pod_cidr=self.pod_cidr(i),
                    vtep=self._vtep(i), mtu=self.pod_mtu, overlay=self.overlay,
                    session_timeouts=self.session_timeouts,
                    session_gc_interval_s=self.session_gc_interval_s,
                    socket_lb_cgroup=str(cgroup) if cgroup else None, lb_sizes=self.lb_sizes)
                self.nodes[cfg.name] = NodeDataplane(cfg, self.pin_root).up()
            peers = self._peers()
            for node in self.nodes.values():
                node.set_peers(peers)
            for i in range(1, self.nodes_count + 1):
                for j in range(1, self.pods_per_node + 1):
                    self.add_pod(i, j)
        except BaseException:
            self.close()
            raise
        return self

    def add_pod(self, node_index: int, pod_index: int) -> LabPod:
        node = self.nodes[self.node_name(node_index)]
        net = ipaddress.IPv4Network(self.pod_cidr(node_index))
        name = f"n{node_index}p{pod_index}"
        ns = f"{self.prefix}-{name}"
        ip = str(net.network_address + 10 + pod_index)
        self._netns(ns)
        lp = LabPod(name, node.cfg.name, ns, ip)
        lp.pod = node.add_pod(name, ns, f"{ip}/{net.prefixlen}")
        self.pods[name] = lp
        return lp

    def _netns(self, name: str) -> None:
        pr_netns.create(name)
        self.namespaces.append(name)
        with IPRoute(netns=name) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")

    def _underlay(self) -> None:
        """The physical network: a switch (a Linux bridge in a namespace of its
        own) with every node's uplink and an external host on it."""
        phy = self.phy_ns
        self._netns(phy)
        with IPRoute(netns=phy) as ipr:
            ipr.link("add", ifname="sw", kind="bridge")
            sw = ipr.link_lookup(ifname="sw")[0]
            ipr.link("set", index=sw, state="up")
            members = [(f"n{i}", self.node_name(i), "uplink", self.node_ip(i))
                       for i in range(1, self.nodes_count + 1)]
            members.append(("ext", self.ext_ns, "eth0", EXTERNAL_IP))
            self._netns(self.ext_ns)
            for port, ns, ifname, ip in members:
                ipr.link("add", ifname=port, kind="veth", peer={"ifname": ifname, "net_ns_fd": ns})
                idx = ipr.link_lookup(ifname=port)[0]
                ipr.link("set", index=idx, master=sw, state="up")
                with IPRoute(netns=ns) as peer:
                    pidx = peer.link_lookup(ifname=ifname)[0]
                    peer.addr("add", index=pidx, address=ip, prefixlen=UNDERLAY.prefixlen)
                    peer.link("set", index=pidx, state="up")

    # ------------------------------------------------------------------ use
    def node(self, i: int) -> NodeDataplane:
        return self.nodes[self.node_name(i)]

    def node_netns(self, name: str) -> str:
        """The namespace of node `name`'s own stack (where its kubelet would run)."""
        if name not in self.nodes and name not in self.namespaces:
            raise KeyError(f"no pod, node or 'ext' named {name!r} in lab {self.prefix}")
        node = self.nodes.get(name)
        return (node.cfg.netns if node is not None else None) or name

    def _in_netns(self, netns: str, argv: list[str]) -> list[str]:
        """`argv` run in `netns`, and, in a pod's namespace with socket load
        balancing, in its node's cgroup (as the kubelet puts a pod's processes
        in its pods cgroup)."""
        full = ["ip", "netns", "exec", netns, *argv]
        if self.cgroups is not None:
            for lp in self.pods.values():
                if lp.netns == netns:
                    return self.cgroups.wrap(lp.node, full)
        return full

    def exec(self, netns: str, argv: list[str], timeout: float = 30,
             check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self._in_netns(netns, argv), capture_output=True,
                              text=True, timeout=timeout, check=check)

    def popen(self, netns: str, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self._in_netns(netns, argv), **kw)

    def set_socket_lb(self, on: bool) -> None:
        """Turn socket load balancing on or off on every node (off: the
        lbrp translates every connection, as with socketLB: false)."""
        if on and self.cgroups is None:
            self.cgroups = LabCgroups(self.prefix)
        for node in self.nodes.values():
            cgroup = str(self.cgroups.node(node.cfg.name)) if on and self.cgroups else None
            node.cfg = dataclasses.replace(node.cfg, socket_lb_cgroup=cgroup)  # for restarts
            node.set_socket_lb(cgroup)

    def restart_node(self, i: int, while_down: Callable[[], object] | None = None
                     ) -> NodeDataplane:
        """Kill node i's agent (as a crash would: nothing torn down), run
        `while_down` (what happens on the node meanwhile), and start a new one
        that adopts the data plane it left."""
        old = self.node(i)
        old.crash()
        if while_down is not None:
            while_down()
        new = NodeDataplane(old.cfg, self.pin_root, old.state_root).up(adopt=True)
        self.nodes[old.cfg.name] = new
        for lp in self.pods.values():
            if lp.node == old.cfg.name:
                lp.pod = new.pods[lp.name]
        return new

    def switch_overlay(self, overlay: str) -> None:
        """Restart every node's agent with another overlay (what a changed
        ConfigMap and `kubectl rollout restart` do): each new agent adopts
        the data plane its predecessor left and converts it
        (NodeDataplane._switch_overlay), then gets the peers of the new mode.
        The pods keep their MTU (self.mtu is left as it was)."""
        if overlay not in OVERLAYS:
            raise ValueError(f"overlay {overlay!r} is not one of {', '.join(OVERLAYS)}")
        self.overlay = overlay
        for i in range(1, self.nodes_count + 1):
            old = self.node(i)
            old.crash()
            cfg = replace(old.cfg, overlay=overlay, vtep=self._vtep(i))
            new = NodeDataplane(cfg, self.pin_root, old.state_root).up(adopt=True)
            self.nodes[cfg.name] = new
            for lp in self.pods.values():
                if lp.node == cfg.name:
                    lp.pod = new.pods[lp.name]
        peers = self._peers()
        for node in self.nodes.values():
            node.set_peers(peers)

    def _peers(self) -> list[PeerNode]:
        return [PeerNode(self.node_name(i), self.node_ip(i), self.pod_cidr(i),
                         self.vtep_ip(i) if self.overlay == OVERLAY_VXLAN else "")
                for i in range(1, self.nodes_count + 1)]

    # ------------------------------------------------------------------ services
    def backend(self, pod: str, port: int, weight: int = 1) -> Backend:
        return Backend(self.pods[pod].ip, port, weight)

    def set_service(self, vip: str, port: int, proto: str, backends: list[Backend],
                    affinity_timeout_s: int = 0) -> None:
        """A ClusterIP service, realised on every node as the agents would."""
        for node in self.nodes.values():
            node.set_service(vip, port, proto, backends, affinity_timeout_s)

    def delete_service(self, vip: str, port: int, proto: str) -> None:
        for node in self.nodes.values():
            node.delete_service(vip, port, proto)

    def set_nodeport(self, port: int, proto: str, policy: str, backends: list[Backend]) -> None:
        for node in self.nodes.values():
            node.set_nodeport(port, proto, policy, backends)

    def delete_nodeport(self, port: int, proto: str) -> None:
        for node in self.nodes.values():
            node.delete_nodeport(port, proto)

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        errors = []
        for node in list(self.nodes.values()):
            try:
                node.down()
            except Exception as exc:  # keep tearing down the rest
                errors.append(exc)
                log.exception("teardown of %s failed", node.cfg.name)
        self.nodes.clear()
        self.pods.clear()
        for ns in reversed(self.namespaces):
            try:
                pr_netns.remove(ns)
            except FileNotFoundError:
                pass  # already gone (e.g. a pod removed by its owner)
            except OSError as exc:
                errors.append(exc)
        self.namespaces.clear()
        if self.cgroups is not None:
            try:
                self.cgroups.close()
            except OSError as exc:
                errors.append(exc)
        if errors:
            raise RuntimeError(f"lab teardown left errors: {errors}")

    def leftovers(self) -> list[str]:
        """Anything of this run still present: namespaces and pinned objects."""
        left = [ns for ns in pr_netns.listnetns() if ns.startswith(self.prefix)]
        if self.cgroups is not None:
            left += self.cgroups.leftovers()
        for i in range(1, self.nodes_count + 1):
            d = self.pin_root / self.node_name(i)
            if d.exists():
                left.append(str(d))
        return left

    def __enter__(self) -> Lab:
        return self.build()

    def __exit__(self, *exc: object) -> None:
        self.close()
