"""Node wiring: the L2/L3 part of the default node topology (DESIGN §2).

    pod eth0 == veth == bridge(br0) -- router(r0) -- vxlan netdev -- other nodes

The bridge joins the node's pods on one L2 segment (the node's pod CIDR); the
router is their gateway and reaches other nodes' pod CIDRs through the kernel
VXLAN device, whose FDB holds one all-zero entry per remote node (flooding
for ARP) and learns the rest.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2.netlink.exceptions import NetlinkError

from . import bpffs, podnet
from .cubes.bridge import Bridge
from .cubes.router import Router
from .runtime import PortState, Runtime
from .slowpath import ArpResolver, SlowPath

log = logging.getLogger(__name__)

VXLAN_DEV = "pcn-vxlan"
BRIDGE = "br0"
ROUTER = "r0"


@dataclass(frozen=True)
class NodeConfig:
    name: str
    netns: str | None
    uplink: str  # the node's NIC
    node_ip: str  # address of the uplink, the VXLAN underlay source
    pod_cidr: str  # e.g. 10.244.1.0/24
    vtep: str  # router address on the overlay, e.g. 10.18.0.1/16 (ConfigMap vtepsRange)
    mtu: int = 1450
    vni: int = 42
    vxlan_port: int = 4789

    @property
    def gateway(self) -> str:
        net = ipaddress.IPv4Network(self.pod_cidr)
        return str(net.network_address + 1)


@dataclass(frozen=True)
class PeerNode:
    name: str
    node_ip: str
    pod_cidr: str
    vtep_ip: str


@dataclass
class Pod:
    key: str
    netns: str
    iface: podnet.PodInterface
    port: PortState


@dataclass
class NodeDataplane:
    cfg: NodeConfig
    pin_root: Path = bpffs.DEFAULT_ROOT
    rt: Runtime = field(init=False)
    pods: dict[str, Pod] = field(default_factory=dict)
    peers: dict[str, PeerNode] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rt = Runtime(self.cfg.name, self.cfg.netns, self.pin_root)
        self.slow: SlowPath | None = None
        self.bridge: Bridge | None = None
        self.router: Router | None = None
        self._vxlan_created = False

    # ---------------------------------------------------------------- up/down
    def up(self) -> NodeDataplane:
        start = time.monotonic()
        try:
            self.rt.open()
            self.slow = SlowPath(self.rt).start()
            self.bridge = Bridge(self.rt, BRIDGE)
            self.router = Router(self.rt, ROUTER)
            gw = f"{self.cfg.gateway}/{ipaddress.IPv4Network(self.cfg.pod_cidr).prefixlen}"
            r_pods = self.router.add_port("pods", gw)
            b_up = self.bridge.add_port("uplink")
            self.rt.connect_ports(r_pods, b_up)
            vx_mac = self._create_vxlan()
            r_vx = self.router.add_port("vxlan", self.cfg.vtep, mac=vx_mac)
            self.rt.connect_netdev(r_vx, VXLAN_DEV)
            self.slow.listen(self.rt.types["router"].module)
            ArpResolver(self.rt, self.slow, self.rt.table("router_neigh", "router"))
        except Exception:
            self.down()
            raise
        log.info("node %s up in %.0f ms", self.cfg.name, (time.monotonic() - start) * 1000)
        return self

    def down(self) -> None:
        """Remove everything this node created; safe to call twice or after a failed up()."""
        for key in list(self.pods):
            self.remove_pod(key)
        if self.slow is not None:
            self.slow.stop()
            self.slow = None
        if self._vxlan_created and self.rt.ipr is not None:
            _del_link(self.rt, VXLAN_DEV)
            self._vxlan_created = False
        self.rt.close(remove=True)

    # ---------------------------------------------------------------- overlay
    def _create_vxlan(self) -> str:
        ipr = self.rt.ipr
        assert ipr is not None
        uplink = self.rt.ifindex(self.cfg.uplink)
        if not ipr.link_lookup(ifname=VXLAN_DEV):
            ipr.link("add", ifname=VXLAN_DEV, kind="vxlan", vxlan_id=self.cfg.vni,
                     vxlan_local=self.cfg.node_ip, vxlan_link=uplink,
                     vxlan_port=self.cfg.vxlan_port, vxlan_learning=1)
            self._vxlan_created = True
        idx = self.rt.ifindex(VXLAN_DEV)
        podnet.write_sysctl(self.cfg.netns, f"net.ipv6.conf.{VXLAN_DEV}.disable_ipv6", "1")
        ipr.link("set", index=idx, state="up")
        return ipr.get_links(idx)[0].get_attr("IFLA_ADDRESS")

    def set_peers(self, peers: list[PeerNode]) -> None:
        """Make the overlay match `peers` (idempotent): FDB flood entries and one
        route per remote pod CIDR via that node's VTEP."""
        assert self.router is not None and self.rt.ipr is not None
        idx = self.rt.ifindex(VXLAN_DEV)
        wanted = {p.name: p for p in peers if p.name != self.cfg.name}
        for name, old in list(self.peers.items()):
            if name not in wanted or wanted[name] != old:
                self._fdb("del", idx, old.node_ip)
                self.router.remove_route(old.pod_cidr)
                del self.peers[name]
        for name, peer in wanted.items():
            if name in self.peers:
                continue
            self._fdb("append", idx, peer.node_ip)
            self.router.add_route(peer.pod_cidr, "vxlan", nexthop=peer.vtep_ip)
            self.peers[name] = peer
            log.info("node %s: route %s via %s (node %s)", self.cfg.name, peer.pod_cidr,
                     peer.vtep_ip, peer.node_ip)

    def _fdb(self, op: str, idx: int, dst: str) -> None:
        assert self.rt.ipr is not None
        try:
            self.rt.ipr.fdb(op, ifindex=idx, lladdr="00:00:00:00:00:00", dst=dst)
        except NetlinkError as exc:
            if not (op == "del" and exc.code == errno.ENOENT) and exc.code != errno.EEXIST:
                raise

    # ---------------------------------------------------------------- pods
    def add_pod(self, key: str, pod_netns: str, address: str) -> Pod:
        """Wire a pod (veth, address, route) and attach it: no compilation here."""
        iface = podnet.create(self.rt.ipr, self.cfg.netns, pod_netns, podnet.host_ifname(key),
                              address, self.cfg.gateway, self.cfg.mtu)
        try:
            port = self.attach_pod(key, iface.host_ifname)
        except Exception:
            podnet.delete(self.rt.ipr, iface.host_ifname)
            raise
        pod = Pod(key, pod_netns, iface, port)
        self.pods[key] = pod
        return pod

    def attach_pod(self, key: str, host_if: str) -> PortState:
        assert self.bridge is not None
        port = self.bridge.add_port(f"pod-{key}")
        try:
            self.rt.connect_netdev(port, host_if)
        except Exception:
            self.bridge.remove_port(port.name)
            raise
        return port

    def remove_pod(self, key: str) -> None:
        pod = self.pods.pop(key, None)
        if pod is None:
            return
        assert self.bridge is not None
        self.bridge.remove_port(pod.port.name)
        podnet.delete(self.rt.ipr, pod.iface.host_ifname)


def _del_link(rt: Runtime, name: str) -> None:
    assert rt.ipr is not None
    try:
        rt.ipr.link("del", ifname=name)
    except NetlinkError as exc:
        if exc.code != errno.ENODEV:
            raise
