"""Node wiring: the default node topology of DESIGN §2.

    pod eth0 == veth == [lbrp, extra cubes] bridge(br0) -- router(r0) --+-- vxlan netdev -- other nodes
                                                                          +-- [k8sdispatcher] -- node NIC

The bridge joins the node's pods on one L2 segment (the node's pod CIDR); the
router is their gateway, reaches other nodes' pod CIDRs through the kernel
VXLAN device (one all-zero FDB entry per remote node, the rest learned) and
the outside world through the node's NIC, which it shares with the host
stack. With the overlay "none" (direct routing, `NodeConfig.overlay`) there
is no VXLAN device: the router sends other nodes' pod traffic out of the NIC
to their node IPs, unencapsulated (`peer_routes`), which needs the nodes on
one L2 segment or an underlay that routes the pod CIDRs. The lbrp on every pod port translates ClusterIP services; the
k8sdispatcher on the NIC does NodePort and masquerading. The node's own stack
meets the router on the host link (a veth pair), where an lbrp translates the
node's own connections to its NodePorts, which the entry program on its lo
hands there.

Everything the node builds is recorded with the runtime's state, so an agent
that restarts adopts it (`up(adopt=True)`) instead of rebuilding it.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import subprocess
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pyroute2.netlink.exceptions import NetlinkError

from pcn_agent.dataplane import bpffs, maps, sessions
from pcn_agent.dataplane.compiler import CompileError
from pcn_agent.dataplane.cubes.bridge import TYPE as BRIDGE_TYPE
from pcn_agent.dataplane.cubes.bridge import Bridge
from pcn_agent.dataplane.cubes.dispatcher import TYPE as DISPATCHER_TYPE
from pcn_agent.dataplane.cubes.dispatcher import Dispatcher, DispatcherConfig, HostPort
from pcn_agent.dataplane.cubes.lbrp import TYPE as LB_TYPE
from pcn_agent.dataplane.cubes.lbrp import Backend, LbConfig, LbSizes, LoadBalancer, Service
from pcn_agent.dataplane.cubes.policy import TYPE as POLICY_TYPE
from pcn_agent.dataplane.cubes.policy import PolicyCube
from pcn_agent.dataplane.cubes.router import TYPE as ROUTER_TYPE
from pcn_agent.dataplane.cubes.router import Router
from pcn_agent.dataplane.runtime import STATE_ROOT, PortState, Runtime, RuntimeError_
from pcn_agent.dataplane.slowpath import ArpResolver, SlowPath
from pcn_agent.dataplane.socklb import SocketLB, SocketLBError
from pcn_agent.node import localnet, podnet
from pcn_policy.rules import AddressSet, PodPolicy

log = logging.getLogger(__name__)

VXLAN_DEV = "pcn-vxlan"
OVERLAY_VXLAN = "vxlan"
OVERLAY_NONE = "none"  # direct routing
OVERLAYS = (OVERLAY_VXLAN, OVERLAY_NONE)
VXLAN_PORT = "vxlan"  # the router's ports towards other nodes
UPLINK_PORT = "uplink"
# The host link: a veth pair between the node's own stack (HOST_DEV) and the
# router's "host" port (HOST_CUBE_DEV), so that the kubelet's probes reach the
# node's pods and pods reach services the node itself serves on its address.
HOST_DEV = "pcn-host"
HOST_CUBE_DEV = "pcn-host-r"
HOST_PORT = "host"
# The node's answers to its own connections to a NodePort come from its own
# address: the kernel takes a local source only on lo with accept_local.
LO_ACCEPT_LOCAL = "net.ipv4.conf.lo.accept_local"
# The answers to its connections to a hostPort on 127.0.0.1 come from (and go
# to) 127.0.0.1: a packet put into lo's ingress is routed again, and the
# kernel takes loopback addresses there only with route_localnet (on lo only;
# kube-proxy and the portmap plugin set it on every or the pods' interfaces).
LO_ROUTE_LOCALNET = "net.ipv4.conf.lo.route_localnet"
LO_SYSCTLS = {"lo_accept_local": LO_ACCEPT_LOCAL, "lo_route_localnet": LO_ROUTE_LOCALNET}
BRIDGE = "br0"
ROUTER = "r0"
LB = "lb"
DISPATCHER = "k8s"
POLICY = "policy"  # the node's one policy cube: NetworkPolicy and ClusterNetworkPolicy


@dataclass(frozen=True)
class NodeConfig:
    name: str
    netns: str | None
    uplink: str  # the node's NIC
    node_ip: str  # address of the uplink, the VXLAN underlay source
    pod_cidr: str  # this node's pods, e.g. 10.244.1.0/24
    vtep: str  # router address on the overlay, e.g. 10.18.0.1/16 (ConfigMap vtepsRange); "" with overlay none
    mtu: int = 1450
    # "vxlan": other nodes' pods over the VXLAN device; "none": routed to their
    # node IPs through the NIC, unencapsulated (ConfigMap overlay)
    overlay: str = OVERLAY_VXLAN
    vni: int = 42
    vxlan_port: int = 4789
    cluster_pod_cidr: str = "10.244.0.0/16"
    service_cidr: str = "10.96.0.0/12"
    nodeport_range: tuple[int, int] = (30000, 32767)
    snat_range: tuple[int, int] = (61000, 65535)
    default_gateway: str | None = None  # next hop for the outside world, if any
    host_link: str = "169.254.42.0/30"  # router .1, host .2; never leaves the node
    # how long connections live without traffic (ConfigMap sessionTimeout*), and
    # how often the collector removes those that are over (sessionGCInterval)
    session_timeouts: sessions.SessionTimeouts = sessions.SessionTimeouts()
    session_gc_interval_s: float = 10.0
    # the cgroup v2 directory whose processes (the node's pods) get socket
    # load balancing (socklb.py): the kubelet's pods cgroup on a real node, a
    # per-node directory in the lab; None: the lbrp alone translates
    socket_lb_cgroup: str | None = None
    # the sizes of the node's service tables (ConfigMap lbServiceMapMax,
    # lbBackendMapMax), compiled into its programs
    lb_sizes: LbSizes = LbSizes()

    @property
    def host_pod_ip(self) -> str:
        """The node's own address inside its pod CIDR (the network address,
        which IPAM never gives a pod): its source towards other nodes' pods."""
        return str(ipaddress.IPv4Network(self.pod_cidr).network_address)

    @property
    def host_link_ips(self) -> tuple[str, str]:
        """(the router's, the host's) address on the host link."""
        net = ipaddress.IPv4Network(self.host_link)
        return str(net.network_address + 1), str(net.network_address + 2)

    @property
    def gateway(self) -> str:
        net = ipaddress.IPv4Network(self.pod_cidr)
        return str(net.network_address + 1)

    @property
    def vtep_ip(self) -> str:
        return str(ipaddress.IPv4Interface(self.vtep).ip) if self.vtep else ""

    @property
    def return_ip(self) -> str:
        """The address a remote pod backend of a NodePort (Cluster policy)
        answers, so that its reply comes back here to be translated: the
        VTEP address over VXLAN, the pod CIDR's network address (routed to
        this node like its pods) with direct routing."""
        return self.vtep_ip if self.overlay == OVERLAY_VXLAN else self.host_pod_ip

    def __post_init__(self) -> None:
        if self.overlay not in OVERLAYS:
            raise ValueError(f"overlay {self.overlay!r} is not one of {', '.join(OVERLAYS)}")
        if self.overlay == OVERLAY_VXLAN and not self.vtep:
            raise ValueError("the vxlan overlay needs the node's VTEP address")


@dataclass(frozen=True)
class PeerNode:
    name: str
    node_ip: str
    pod_cidr: str
    vtep_ip: str  # "" with overlay none


@dataclass(frozen=True)
class PeerRoute:
    """The router's route to one other node's pods: `port` (a router port
    name) and the next hop's address."""
    pod_cidr: str
    port: str
    nexthop: str


def peer_routes(cfg: NodeConfig, peers: Iterable[PeerNode], uplink_net: str
                ) -> tuple[dict[str, PeerRoute], dict[str, str]]:
    """The routes to the other nodes' pod CIDRs, by peer name, and the peers
    that get none with why (by name). `uplink_net`: the NIC's network, e.g.
    192.168.100.0/24.

    vxlan: via the peer's VTEP address on the router's "vxlan" port (the
    kernel's VXLAN device finds the node IP in its FDB). none: via the peer's
    node IP on the "uplink" port when it lies on the NIC's network (an L2
    neighbour, resolved with ARP: Flannel's host-gw and Calico without
    encapsulation ask the same), else via the node's default gateway, which
    must then route the peer's pod CIDR (Calico's BGP peering with the
    network's routers); with no gateway the peer is unreachable (the
    cluster CIDR's guard drops its pods' traffic) and reported. This node
    itself gets no route."""
    routes: dict[str, PeerRoute] = {}
    skipped: dict[str, str] = {}
    net = ipaddress.IPv4Network(uplink_net, strict=False)
    for p in peers:
        if p.name == cfg.name:
            continue
        if cfg.overlay == OVERLAY_VXLAN:
            if not p.vtep_ip:
                skipped[p.name] = "it has no VTEP address"
                continue
            routes[p.name] = PeerRoute(p.pod_cidr, VXLAN_PORT, p.vtep_ip)
        elif ipaddress.IPv4Address(p.node_ip) in net:
            routes[p.name] = PeerRoute(p.pod_cidr, UPLINK_PORT, p.node_ip)
        elif cfg.default_gateway:
            routes[p.name] = PeerRoute(p.pod_cidr, UPLINK_PORT, cfg.default_gateway)
        else:
            skipped[p.name] = (f"its node IP {p.node_ip} is not on the uplink's network "
                               f"{net} and there is no default gateway: direct routing "
                               "needs L2 adjacency or an underlay that routes pod CIDRs")
    return routes, skipped


@dataclass
class Pod:
    key: str
    netns: str
    iface: podnet.PodInterface
    port: PortState
    ingress: list[str] = field(default_factory=list)  # extra cubes on the port's ingress hook
    egress: list[str] = field(default_factory=list)  # (from the pod) and egress hook (to it)
    k8s_namespace: str = ""
    k8s_name: str = ""
    origin: str = ""  # "cni" when the CNI plugin made the veth (see register_pod)
    policy: bool = False  # the policy cube is stacked on its port (set_pod_policy)


TAP_TYPE = "packetcapture"  # pcn_agent.dataplane.cubes.packetcapture.TYPE
# on-demand captures' cube names (pcn_agent.control.observe); a packetcapture
# NetworkFunction's (nf.NS.NAME, a capture point in a chain) is adopted instead
CAPTURE_PREFIX = "capture."
BASE_TYPES = (BRIDGE_TYPE, ROUTER_TYPE, LB_TYPE, DISPATCHER_TYPE,
              POLICY_TYPE)  # in _build's order


def prepare_runtime(name: str, netns: str | None, pin_root: Path = bpffs.DEFAULT_ROOT,
                    state_root: Path = STATE_ROOT, lb_sizes: LbSizes | None = None) -> Runtime:
    """Open node `name`'s runtime (adopting what a previous agent left) with
    the cube types every node runs compiled in one module with the entry
    programs, and load them into their slots. This is most of an agent's start
    and needs only the node's name, so the agent runs it while it still waits
    for its Node object; NodeDataplane(..., prepared=rt).up() goes on from it.
    On failure nothing new is left: a fresh runtime is removed, an adopting
    one let go of (the data plane it found stays for the next try).
    `lb_sizes`: the node's service table sizes (NodeConfig.lb_sizes, which
    NodeDataplane checks against the prepared runtime's; None: the defaults)."""
    start = time.monotonic()
    rt = Runtime(name, netns, pin_root, state_root, bundle=BASE_TYPES,
                 defines=(lb_sizes or LbSizes()).defines())
    try:
        rt.open(adopt=True)
        if not rt.adopted:
            for type_name in BASE_TYPES:
                rt.load_type(type_name)
    except BaseException:
        if rt.adopted or rt.state_path.is_file():
            rt.abandon()
        else:
            rt.close(remove=True)
        raise
    log.info("runtime %s prepared in %.0f ms (%s)", name, (time.monotonic() - start) * 1000,
             "adopted" if rt.adopted else f"compiled {', '.join(BASE_TYPES)}")
    return rt


@dataclass
class NodeDataplane:
    cfg: NodeConfig
    pin_root: Path = bpffs.DEFAULT_ROOT
    state_root: Path = STATE_ROOT
    pods: dict[str, Pod] = field(default_factory=dict)
    peers: dict[str, PeerNode] = field(default_factory=dict)
    # a runtime prepare_runtime() opened ahead of the node's configuration
    prepared: Runtime | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.prepared is not None:
            if (self.prepared.name, self.prepared.netns) != (self.cfg.name, self.cfg.netns):
                raise ValueError(f"prepared runtime {self.prepared.name} (netns "
                                 f"{self.prepared.netns}) is not node {self.cfg.name}'s")
            if self.prepared.defines != self.cfg.lb_sizes.defines():
                raise ValueError(f"prepared runtime {self.prepared.name} was built with "
                                 f"{self.prepared.defines}, node {self.cfg.name} asks for "
                                 f"{self.cfg.lb_sizes.defines()}")
            self.rt = self.prepared
        else:
            self.rt = Runtime(self.cfg.name, self.cfg.netns, self.pin_root, self.state_root,
                              bundle=BASE_TYPES, defines=self.cfg.lb_sizes.defines())
        self.slow: SlowPath | None = None
        self.bridge: Bridge | None = None
        self.router: Router | None = None
        self.lb: LoadBalancer | None = None
        self.dispatcher: Dispatcher | None = None
        self.policy: PolicyCube | None = None
        self._localnet_ports: frozenset[tuple[str, int]] = frozenset()  # as last synced
        self.arp: ArpResolver | None = None
        self.session_collector: sessions.SessionCollector | None = None
        self.session_gc: sessions.SessionGC | None = None
        self.socket_lb: SocketLB | None = None
        self._batch_depth = 0
        self._vxlan_created = False
        # "vxlan -> none" when this agent adopted a data plane built with the
        # other overlay and converted it (_switch_overlay), else ""
        self.overlay_switched = ""
        self._unsaved = False  # a save() asked for inside a batch, done at its end
        # Observation taps (packet captures) by port id: (from the pod, to the
        # pod), outermost on the port. Not saved: a capture ends with the agent.
        self.taps: dict[int, tuple[list[str], list[str]]] = {}

    # ---------------------------------------------------------------- up/down
    def up(self, adopt: bool = True) -> NodeDataplane:
        """Build the node's data plane, or adopt the one a previous agent left."""
        start = time.monotonic()
        if self.rt.is_open and self.rt.adopted and not adopt:
            raise ValueError("up(adopt=False) with a runtime that adopted a data plane")
        try:
            if not self.rt.is_open:
                self.rt.open(adopt=adopt)
            self.slow = SlowPath(self.rt).start()
            if self.rt.adopted:
                self._restore()
            else:
                self._build()
            self.slow.listen(self.rt.types["router"].module)
            self.arp = ArpResolver(self.rt, self.slow, self.rt.table("router_neigh", "router"))
            self._start_session_gc()
            self.set_socket_lb(self.cfg.socket_lb_cgroup)
            self.save()
        except BaseException:  # Ctrl-C included: never leave a half-built node behind
            self.down()
            raise
        log.info("node %s %s in %.0f ms", self.cfg.name,
                 "adopted" if self.rt.adopted else "up", (time.monotonic() - start) * 1000)
        return self

    def _start_session_gc(self) -> None:
        """Give the data path the sessions' lifetimes and collect the sessions
        that are over every session_gc_interval_s. The grace (how long the data
        path may still reuse an expired entry in place, see sessions.py) is
        one interval, and passes start every interval: a port is held for about
        lifetime + 2 intervals at most, unless passes take longer (logged)."""
        c = self.cfg
        interval = c.session_gc_interval_s
        sessions.write_config(self.rt.table("session_cfg", LB_TYPE), c.session_timeouts, interval)
        tables = {"lb_sessions": self.rt.table("lb_sessions", LB_TYPE),
                  "nat_sessions": self.rt.table("nat_sessions", DISPATCHER_TYPE)}
        self.session_collector = sessions.SessionCollector(tables, c.session_timeouts, interval)
        self.session_gc = sessions.SessionGC(self.session_collector, interval, c.name).start()

    def set_socket_lb(self, cgroup: str | None) -> bool:
        """Socket load balancing for the processes of `cgroup` (a cgroup v2
        directory), or none (None): the programs of a previous agent or an
        earlier call are detached first. A kernel or host where they cannot
        be attached leaves the lbrp to translate everything (logged, not
        raised: the node works either way). Returns whether they are attached."""
        if self.socket_lb is not None:
            self._forget_socket_affinity()
            self.socket_lb.detach()
            self.socket_lb = None
        if self.rt.pin_dir is None:
            return False
        previous = self.rt.meta.pop("socket_lb_cgroup", None)
        if isinstance(previous, str) and previous != cgroup:
            # a previous agent's on another cgroup, found by their pins (on
            # the same one, attach() replaces them once its own are in place)
            SocketLB(self.cfg.name, self.rt.pin_dir, Path(previous)).detach_stale()
        if cgroup is None:
            return False
        try:
            self.socket_lb = SocketLB(self.cfg.name, self.rt.pin_dir, Path(cgroup),
                                      self.rt.defines).attach()
        except (SocketLBError, CompileError) as exc:
            log.warning("node %s: no socket load balancing (%s); the lbrp translates "
                        "every ClusterIP connection", self.cfg.name, exc)
            return False
        self.rt.meta["socket_lb_cgroup"] = cgroup
        if self.lb is not None:
            self.lb.services.affinity_tables.append(self.socket_lb.table("sock_affinity"))
        return True

    def _forget_socket_affinity(self) -> None:
        if self.lb is not None and self.socket_lb is not None and self.socket_lb.module:
            table = self.socket_lb.table("sock_affinity")
            self.lb.services.affinity_tables = [
                t for t in self.lb.services.affinity_tables if t is not table]

    def _stop_session_gc(self) -> None:
        if self.session_gc is not None:
            self.session_gc.stop()
            self.session_gc = None

    def _build(self) -> None:
        c = self.cfg
        self.bridge = Bridge(self.rt, BRIDGE)
        self.router = Router(self.rt, ROUTER)
        self.lb = LoadBalancer(self.rt, LB)
        self._policy_cube()
        gw = f"{c.gateway}/{ipaddress.IPv4Network(c.pod_cidr).prefixlen}"
        r_pods = self.router.add_port("pods", gw, mtu=c.mtu)
        b_up = self.bridge.add_port("uplink")
        self.rt.connect_ports(r_pods, b_up)

        nic_addr, nic_mac = self._uplink_address()
        r_up = self.router.add_port(UPLINK_PORT, nic_addr, mac=nic_mac,
                                    flags=maps.PORT_HOST_SHARED)
        if c.default_gateway:
            self.router.add_route("0.0.0.0/0", UPLINK_PORT, nexthop=c.default_gateway)
        self._guard_cluster_cidr()

        self.dispatcher = Dispatcher(self.rt, DISPATCHER, self.lb.services,
                                     self._dispatcher_config())
        self.dispatcher.configure(r_up.id, 0)
        disp = [self.rt.stacked(DISPATCHER)]
        # Hooks first, netdevs second: no packet crosses a port before its cubes are there.
        self.rt.set_hook(r_up, maps.HOOK_INGRESS, disp)
        self.rt.set_hook(r_up, maps.HOOK_EGRESS, disp)
        self.rt.meta["overlay"] = c.overlay
        if c.overlay == OVERLAY_VXLAN:
            self._add_overlay_port()
        self.rt.connect_netdev(r_up, c.uplink)
        self._build_host_link()

    def _add_overlay_port(self) -> None:
        """The VXLAN device and the router's port on it, its ingress under
        the dispatcher (replies of remote NodePort backends), and the
        dispatcher told the port."""
        assert self.router is not None and self.dispatcher is not None
        vx_mac = self._create_vxlan()
        self.rt.meta["vxlan_created"] = self._vxlan_created or \
            self.rt.meta.get("vxlan_created", False)
        r_vx = self.router.add_port(VXLAN_PORT, self.cfg.vtep, mac=vx_mac)
        self.rt.set_hook(r_vx, maps.HOOK_INGRESS, [self.rt.stacked(DISPATCHER)])
        self.rt.connect_netdev(r_vx, VXLAN_DEV)
        self.dispatcher.configure(self.router.port(UPLINK_PORT).id, r_vx.id)

    def _switch_overlay(self, old: str) -> None:
        """An adopted data plane built with overlay `old`, this agent's
        configuration another: the other nodes' routes are withdrawn (the
        reconciler's next set_peers adds them on the new path), the VXLAN
        port and device made or removed, the dispatcher told the return
        address. Pods keep their MTU until they are recreated (a pod at
        1500 behind a VXLAN overlay is told the path's MTU by the router's
        "fragmentation needed", RFC 1191)."""
        assert self.router is not None and self.dispatcher is not None
        new = self.cfg.overlay
        log.warning("node %s: overlay changed from %s to %s (ConfigMap overlay): moving the "
                    "routes to %d other node(s); pods made before keep their MTU until "
                    "recreated, new pods get %d", self.cfg.name, old, new, len(self.peers),
                    self.cfg.mtu)
        for peer in self.peers.values():
            self.router.remove_route(peer.pod_cidr)
        self.peers.clear()
        if new == OVERLAY_VXLAN:
            self._add_overlay_port()
        else:
            if VXLAN_PORT in self.router.cube.ports:
                self.router.remove_port(VXLAN_PORT)
            self.dispatcher.configure(self.router.port(UPLINK_PORT).id, 0)
            if self.rt.meta.pop("vxlan_created", False):
                _del_link(self.rt, VXLAN_DEV)
        self._vxlan_created = bool(self.rt.meta.get("vxlan_created", False))
        self.rt.meta["overlay"] = new
        self.overlay_switched = f"{old} -> {new}"

    def _guard_cluster_cidr(self) -> None:
        """Pod addresses the node has no route for (no node owns that part of
        the cluster's pod CIDR) are unreachable: never sent out of the NIC by
        the default route, where they would leave with a pod source or turn
        the node into a transit router for spoofed traffic."""
        c = self.cfg
        assert self.router is not None
        if ipaddress.IPv4Network(c.cluster_pod_cidr) != ipaddress.IPv4Network(c.pod_cidr):
            self.router.add_unreachable(c.cluster_pod_cidr)

    def _build_host_link(self) -> None:
        """The router's "host" port on a veth pair with the node's stack.

        * The node reaches its own pods from its address (route pod CIDR via
          the router, src node IP: what a kubelet probe needs); the router
          sends what pods address to the node's address to the host
          (node_ip/32 via the host's end) rather than out of the NIC. The
          node's address is the host's: the router does not answer for it.
        * The node reaches other nodes' pods over the overlay (route cluster
          pod CIDR via the router) from its pod CIDR's network address, which
          no pod gets and which every node routes to this one, so the
          answers come back the same way (host_pod_ip/32 via the host's end):
          what an API server needs to call webhooks served by pods.
        * The node reaches ClusterIPs the same way (route Service CIDR via
          the router, src the pod CIDR's network address)."""
        c = self.cfg
        router_ip, host_ip = c.host_link_ips
        prefix = ipaddress.IPv4Network(c.host_link).prefixlen
        assert self.router is not None
        r_host = self.router.add_port(HOST_PORT, f"{router_ip}/{prefix}")
        self.rt.meta["host_link_created"] = True  # before: a failure half-way still cleans up
        self._create_host_link(host_ip, prefix)
        self.router.add_route(f"{c.node_ip}/32", HOST_PORT, nexthop=host_ip)
        self.router.add_route(f"{c.host_pod_ip}/32", HOST_PORT, nexthop=host_ip)
        self._serve_the_node(r_host, loopback=False)  # hooks before the netdev
        self.rt.connect_netdev(r_host, HOST_CUBE_DEV)
        self._serve_the_node(r_host)
        self._host_routes()

    def _host_routes(self) -> None:
        """The node stack's routes through the router (idempotent: an adopted
        node built by an older agent gets the ones it lacks)."""
        c = self.cfg
        router_ip, _ = c.host_link_ips
        ipr = self.rt.ipr
        assert ipr is not None
        oif = self.rt.ifindex(HOST_DEV)
        ipr.route("replace", dst=c.pod_cidr, gateway=router_ip, oif=oif, prefsrc=c.node_ip)
        cluster = ipaddress.IPv4Network(c.cluster_pod_cidr)
        if cluster != ipaddress.IPv4Network(c.pod_cidr):
            ipr.route("replace", dst=str(cluster), gateway=router_ip, oif=oif,
                      prefsrc=c.host_pod_ip)
        # The node's own clients of ClusterIPs (hostNetwork pods: DNS with
        # ClusterFirstWithHostNet, agents using the kubernetes Service): the
        # lbrp on the router's host port translates them as it does pods'.
        # From host_pod_ip, like the cluster route: a backend on another node
        # answers it over the overlay (kube-proxy masquerades the node's
        # Service traffic for the same reason).
        ipr.route("replace", dst=c.service_cidr, gateway=router_ip, oif=oif,
                  prefsrc=c.host_pod_ip)

    def _serve_the_node(self, r_host: PortState, loopback: bool = True) -> None:
        """Services for the node's own stack (idempotent): the lbrp on the
        router's host port, told its node; with `loopback`, the node's lo
        hands its connections to NodePorts and hostPorts on its own address
        and to hostPorts on 127.0.0.1 to that port (they never leave the
        stack otherwise), and takes the answers, which come from the node's
        own address (accept_local on lo: only a BPF program can put a packet
        into lo's ingress) or from 127.0.0.1 (route_localnet on lo). kube-proxy
        serves the node too, and masquerades it (its "masquerade local
        traffic")."""
        assert self.lb is not None
        c = self.cfg
        lb = [self.rt.stacked(LB)]
        self.rt.set_hook(r_host, maps.HOOK_INGRESS, lb)
        self.rt.set_hook(r_host, maps.HOOK_EGRESS, lb)
        self.lb.configure(LbConfig(
            service_cidr=c.service_cidr, hairpin_ip=c.gateway, node_ip=c.node_ip,
            host_pod_ip=c.host_pod_ip, local_pods=c.pod_cidr, host_port=r_host.id,
            masq_range=c.snat_range))
        if not loopback:
            return
        for key, sysctl in LO_SYSCTLS.items():
            if key not in self.rt.meta:  # what to put back in down()
                self.rt.meta[key] = podnet.read_sysctl(c.netns, sysctl)
            podnet.write_sysctl(c.netns, sysctl, "1")
        self.rt.attach_loopback(r_host)

    def _create_host_link(self, host_ip: str, prefix: int) -> None:
        ipr = self.rt.ipr
        assert ipr is not None
        if not ipr.link_lookup(ifname=HOST_DEV):  # else one an agent left: the name is ours
            ipr.link("add", ifname=HOST_DEV, kind="veth", peer=HOST_CUBE_DEV)
        for name in (HOST_DEV, HOST_CUBE_DEV):
            podnet.no_ipv6(self.cfg.netns, name)
            ipr.link("set", index=self.rt.ifindex(name), mtu=self.cfg.mtu, state="up")
        idx = self.rt.ifindex(HOST_DEV)
        ipr.addr("replace", index=idx, address=host_ip, prefixlen=prefix)
        ipr.addr("replace", index=idx, address=self.cfg.host_pod_ip, prefixlen=32)

    def _policy_cube(self) -> None:
        """The node's policy cube (made, or adopted with its rules), told the
        node's own addresses: the kubelet's probes come from them and reach
        every pod whatever its policies (NetworkPolicy leaves a pod's own
        node alone, as upstream's e2e requires)."""
        c = self.cfg
        self.policy = PolicyCube(self.rt, POLICY)
        self.policy.configure([f"{c.node_ip}/32", f"{c.host_pod_ip}/32"])

    def _dispatcher_config(self) -> DispatcherConfig:
        c = self.cfg
        vteps = (str(ipaddress.IPv4Interface(c.vtep).network),) \
            if c.overlay == OVERLAY_VXLAN else ()
        return DispatcherConfig(
            node_ip=c.node_ip, vtep_ip=c.return_ip, local_pods=c.pod_cidr,
            pod_networks=(c.cluster_pod_cidr,),
            no_snat=(c.cluster_pod_cidr, c.service_cidr, *vteps),
            nodeport_range=c.nodeport_range, snat_range=c.snat_range)

    def _restore(self) -> None:
        self.bridge = Bridge(self.rt, BRIDGE)
        self.router = Router(self.rt, ROUTER)
        self.lb = LoadBalancer(self.rt, LB)
        self._policy_cube()
        self.dispatcher = Dispatcher(self.rt, DISPATCHER, self.lb.services,
                                     self._dispatcher_config())
        self._vxlan_created = self.rt.meta.get("vxlan_created", False)
        self._guard_cluster_cidr()  # a data plane built before the guard existed gets it
        self.router.set_mtu("pods", self.cfg.mtu)  # and one built before path MTU its pods' MTU
        if HOST_PORT in self.router.cube.ports:  # an older agent's node may not serve it yet
            self._serve_the_node(self.router.port(HOST_PORT))
            self._host_routes()
        for p in self.rt.meta.get("peers", []):
            peer = PeerNode(**p)
            self.peers[peer.name] = peer
        old_overlay = self.rt.meta.get("overlay", OVERLAY_VXLAN)  # older agents: vxlan only
        if old_overlay != self.cfg.overlay:
            self._switch_overlay(old_overlay)
        for key, p in self.rt.meta.get("pods", {}).items():
            port = self.rt.ports.get(p.get("port", -1))
            if port is None or port.id in self.rt.vanished_ports:
                # Deleted (CNI DEL) while no agent ran: a vanished pod is a
                # removed pod. One stale item must not keep the node from serving.
                log.warning("node %s: pod %s is gone (its interface %s no longer exists); "
                            "forgetting it", self.cfg.name, key,
                            (p.get("iface") or {}).get("host_ifname"))
                if port is not None:
                    self.bridge.remove_port(port.name)
                continue
            self.pods[key] = Pod(key, p["netns"], podnet.PodInterface(**p["iface"]), port,
                                 p["ingress"], p["egress"], p.get("k8s_namespace", ""),
                                 p.get("k8s_name", ""), p.get("origin", ""),
                                 p.get("policy", False))
        self._drop_leftover_taps()
        for owner in {h.owner for h in self.dispatcher.hostports} - set(self.pods):
            log.warning("node %s: the hostPorts of %s go with it", self.cfg.name, owner)
            self.dispatcher.set_hostports(owner, [])
        if self.dispatcher.hostports or self.rt.meta.get("localnet_exempted"):
            self._sync_localnet(force=True)  # the chain the previous agent left, made exact

    @contextmanager
    def batch(self, defer: bool = False) -> Iterator[None]:
        """Group many changes under one save (a burst of Service updates).

        `defer`: no save at the end; the changes stay unsaved until the next
        save() or flush(). DataplaneHandler runs each op so and flushes before
        it answers: a flush covers every op done before it began, so attaches
        queued behind each other share one save (a group commit) and none is
        answered before a saved state holds it."""
        self._batch_depth += 1
        try:
            yield
        finally:
            self._batch_depth -= 1
            if not defer and not self._batch_depth and self.rt.ipr is not None \
                    and self._unsaved:
                self.save()

    @property
    def unsaved(self) -> bool:
        """Whether changes were made since the last save (in a batch, or a
        deferred one that ended)."""
        return self._unsaved

    def flush(self) -> bool:
        """Save the changes deferred batches left unsaved, if any and no batch
        is open; returns whether it saved. Callers hold the lock that
        serialises the node's changes (as for every change), so the saved
        state is one the node was in."""
        if not self._unsaved or self._batch_depth or self.rt.ipr is None:
            return False
        self.save()
        return True

    def save(self) -> None:
        """Record the node's state for a restarted agent (after each change, or
        once at the end of a batch that changed anything: a reconcile pass
        that applies nothing writes nothing)."""
        if self._batch_depth:
            self._unsaved = True
            return
        self._unsaved = False
        if self.lb is not None:
            self.lb.save()
        if self.dispatcher is not None:
            self.dispatcher.save()
        self.rt.meta["peers"] = [asdict(p) for p in self.peers.values()]
        # vars(): the interface's fields are all scalars, and asdict's deep
        # copy costs 25 times as much, for every pod at every save
        self.rt.meta["pods"] = {k: {"netns": p.netns, "iface": dict(vars(p.iface)),
                                    "port": p.port.id,
                                    "ingress": p.ingress, "egress": p.egress,
                                    "k8s_namespace": p.k8s_namespace, "k8s_name": p.k8s_name,
                                    "origin": p.origin, "policy": p.policy}
                                for k, p in self.pods.items()}
        self.rt.save()

    def down(self) -> None:
        """Remove everything this node created; safe to call twice or after a failed up()."""
        self._stop_session_gc()
        self.set_socket_lb(None)
        for key in list(self.pods):
            self.remove_pod(key)
        if self.slow is not None:
            self.slow.stop(remove=True)
            self.slow = None
        if self.rt.ipr is not None and getattr(self, "_vxlan_created", False):
            _del_link(self.rt, VXLAN_DEV)
            self._vxlan_created = False
        if self.rt.meta.pop("localnet_exempted", False):
            localnet.remove(self.cfg.netns)
        if self.rt.ipr is not None and self.rt.meta.pop("host_link_created", False):
            _del_link(self.rt, HOST_DEV)  # its peer and the host's route go with it
        for key, sysctl in LO_SYSCTLS.items():
            if self.rt.ipr is not None and key in self.rt.meta:
                podnet.write_sysctl(self.cfg.netns, sysctl, self.rt.meta.pop(key))
        self.rt.close(remove=True)

    def crash(self) -> None:
        """Stop as a killed agent would: threads and file descriptors go, the
        data plane (programs, pinned maps, attachments, state file) stays."""
        self._stop_session_gc()
        if self.socket_lb is not None:
            self._forget_socket_affinity()
            self.socket_lb.abandon()
            self.socket_lb = None
        if self.slow is not None:
            self.slow.stop(remove=False)
            self.slow = None
        self.rt.abandon()

    # ---------------------------------------------------------------- overlay
    def _create_vxlan(self) -> str:
        ipr = self.rt.ipr
        assert ipr is not None
        uplink = self.rt.ifindex(self.cfg.uplink)
        self._vxlan_created = False
        if not ipr.link_lookup(ifname=VXLAN_DEV):
            ipr.link("add", ifname=VXLAN_DEV, kind="vxlan", vxlan_id=self.cfg.vni,
                     vxlan_local=self.cfg.node_ip, vxlan_link=uplink,
                     vxlan_port=self.cfg.vxlan_port, vxlan_learning=1)
            self._vxlan_created = True
        idx = self.rt.ifindex(VXLAN_DEV)
        podnet.no_ipv6(self.cfg.netns, VXLAN_DEV)
        ipr.link("set", index=idx, state="up")
        return ipr.get_links(idx)[0].get_attr("IFLA_ADDRESS")

    def _uplink_address(self) -> tuple[str, str]:
        """The NIC's address (interface notation) holding node_ip, and its MAC."""
        ipr = self.rt.ipr
        assert ipr is not None
        idx = self.rt.ifindex(self.cfg.uplink)
        for a in ipr.get_addr(index=idx, family=2):
            if a.get_attr("IFA_ADDRESS") == self.cfg.node_ip:
                mac = ipr.get_links(idx)[0].get_attr("IFLA_ADDRESS")
                return f"{self.cfg.node_ip}/{a['prefixlen']}", mac
        raise RuntimeError_(f"node address {self.cfg.node_ip} is not configured on "
                            f"{self.cfg.uplink}; set the node IP of the uplink interface")

    def set_peers(self, peers: list[PeerNode]) -> None:
        """Make the routes to other nodes match `peers` (idempotent), as
        peer_routes computes them: over VXLAN also the device's FDB flood
        entries, one per peer node IP. A peer direct routing cannot reach
        is logged and left out (the reconciler offers it again)."""
        assert self.router is not None and self.rt.ipr is not None
        vxlan = self.cfg.overlay == OVERLAY_VXLAN
        idx = self.rt.ifindex(VXLAN_DEV) if vxlan else 0
        up = self.router.port(UPLINK_PORT)
        routes, skipped = peer_routes(self.cfg, peers, f"{up.ip}/{up.prefixlen}")
        wanted = {p.name: p for p in peers if p.name in routes}
        for name, why in skipped.items():
            log.error("node %s: no route to node %s's pods: %s", self.cfg.name, name, why)
        for name, old in list(self.peers.items()):
            if name not in wanted or wanted[name] != old:
                if vxlan:
                    self._fdb("del", idx, old.node_ip)
                self.router.remove_route(old.pod_cidr)
                del self.peers[name]
        for name, peer in wanted.items():
            if name in self.peers:
                continue
            r = routes[name]
            if vxlan:
                self._fdb("append", idx, peer.node_ip)
            self.router.add_route(r.pod_cidr, r.port, nexthop=r.nexthop)
            self.peers[name] = peer
            log.info("node %s: route %s via %s on %s (node %s)", self.cfg.name, r.pod_cidr,
                     r.nexthop, r.port, peer.node_ip)
        self.save()

    def _fdb(self, op: str, idx: int, dst: str) -> None:
        assert self.rt.ipr is not None
        try:
            self.rt.ipr.fdb(op, ifindex=idx, lladdr="00:00:00:00:00:00", dst=dst)
        except NetlinkError as exc:
            if not (op == "del" and exc.code == errno.ENOENT) and exc.code != errno.EEXIST:
                raise

    # ---------------------------------------------------------------- services
    # The service table is recorded by save() (LoadBalancer.save, a snapshot of
    # every service), not after each change: inside a batch, installing N
    # services must not snapshot N times.
    def set_service(self, vip: str, port: int, proto: str, backends: list[Backend],
                    affinity_timeout_s: int = 0, drop_if_empty: bool = False) -> Service:
        """A ClusterIP service (see ServiceTable.set; `drop_if_empty`: with no
        backend here, drop instead of reject, as kube-proxy does for an
        internalTrafficPolicy of Local whose endpoints are all elsewhere)."""
        assert self.lb is not None
        svc = self.lb.services.set(vip, port, proto, backends, affinity_timeout_s,
                                   drop_if_empty=drop_if_empty)
        self.save()
        return svc

    def delete_service(self, vip: str, port: int, proto: str) -> bool:
        assert self.lb is not None
        found = self.lb.services.delete(vip, port, proto)
        self.save()
        return found

    def set_nodeport(self, port: int, proto: str, policy: str, backends: list[Backend],
                     local: list[Backend] | None = None, affinity_timeout_s: int = 0) -> None:
        """A NodePort (see Dispatcher.set_nodeport; `local`: this node's
        backends, by default those in its pod CIDR)."""
        assert self.dispatcher is not None
        self.dispatcher.set_nodeport(port, proto, policy, backends, local, affinity_timeout_s)
        self.save()

    def delete_nodeport(self, port: int, proto: str) -> bool:
        assert self.dispatcher is not None
        found = self.dispatcher.delete_nodeport(port, proto)
        self.save()
        return found

    # ---------------------------------------------------------------- hostPorts
    def set_hostports(self, key: str, mappings: list[HostPort]) -> None:
        """Make pod `key`'s hostPorts exactly `mappings` (see
        Dispatcher.set_hostports, which raises HostPortError or
        HostPortConflict and then changes nothing). detach_pod and remove_pod
        remove them; a restarted agent adopts them with the pod."""
        assert self.dispatcher is not None
        if mappings and key not in self.pods:
            raise RuntimeError_(f"no pod {key!r} on node {self.cfg.name}")
        self.dispatcher.set_hostports(key, mappings)
        self._sync_localnet()
        self.save()

    def _drop_hostports(self, key: str) -> None:
        if self.dispatcher is not None and any(h.owner == key
                                               for h in self.dispatcher.hostports):
            self.dispatcher.set_hostports(key, [])
            self._sync_localnet()

    def _sync_localnet(self, force: bool = False) -> None:
        """The loopback hostPorts past kubelet's localnet guard (node.localnet),
        synced only when they change (or `force`): every CNI ADD sets its
        pod's hostPorts, most of them none, and a sync runs iptables. A
        failure is logged, not raised (and tried again at the next change):
        only the node's own connections to 127.0.0.1 from another of its
        addresses depend on it. A guard kubelet installs after a sync is
        exempted at the next change or agent start."""
        assert self.dispatcher is not None
        ports = frozenset((h.proto, h.port) for h in self.dispatcher.hostports
                          if h.host_ip in ("", "0.0.0.0") or h.host_ip.startswith("127."))
        if ports == self._localnet_ports and not force:
            return
        try:
            if localnet.sync(self.cfg.netns, ports):
                self.rt.meta["localnet_exempted"] = True  # down() removes the chain
            self._localnet_ports = ports
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            log.warning("node %s: loopback hostPorts %s not exempted from kubelet's localnet "
                        "guard (%s): the node reaches them on 127.0.0.1 only from 127.0.0.1; "
                        "install iptables in the agent's image", self.cfg.name,
                        sorted(ports), exc)

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
        self.save()
        return pod

    def attach_pod(self, key: str, host_if: str, ifindex: int = 0) -> PortState:
        """A new bridge port for pod `key`, peered with its host veth end
        `host_if` (`ifindex`: its index if the caller knows it, checked;
        0: looked up). Raises RuntimeError_ if there is no such device, and
        then leaves no port."""
        assert self.bridge is not None
        port = self.bridge.add_port(f"pod-{key}")
        try:
            self._write_pod_hooks(port, [], [])
            # the pod's eth0 is the veth's other end, in the pod's namespace: the
            # data path delivers into it directly (Runtime.connect_netdev)
            self.rt.connect_netdev(port, host_if, into_peer=True, ifindex=ifindex)
        except Exception:
            self.bridge.remove_port(port.name)
            raise
        return port

    def set_pod_chain(self, key: str, from_pod: list[str], to_pod: list[str]) -> None:
        """Stack transparent cubes (by name, in order) on a pod's port: `from_pod`
        sees what the pod sends (the port's ingress hook), `to_pod` what it
        receives (the egress hook). Each side is replaced in one map update.
        They see pod and backend addresses, never service addresses: they
        follow the lbrp on the way out of the pod and precede it on the way in."""
        pod = self.pods.get(key)
        if pod is None:
            raise RuntimeError_(f"no pod {key!r} on node {self.cfg.name}")
        self._write_pod_hooks(pod.port, from_pod, to_pod, pod.policy)
        pod.ingress, pod.egress = list(from_pod), list(to_pod)
        self.save()

    def _write_pod_hooks(self, port: PortState, ingress: list[str], egress: list[str],
                         policy: bool = False) -> None:
        """The lbrp outermost (pods' cubes see backend addresses, never
        service ones), the policy cube innermost, next to the bridge: it judges
        what the pod sends after every other cube of the pod had its say, and
        what the pod receives before them, with the addresses its connection
        tracking saw on the way out."""
        lb = [self.rt.stacked(LB)]
        pol = [self.rt.stacked(POLICY)] if policy else []
        tap_from, tap_to = self.taps.get(port.id, ([], []))
        self.rt.set_hooks(port,
                          [self.rt.stacked(n) for n in tap_from] + lb
                          + [self.rt.stacked(n) for n in ingress] + pol,
                          pol + [self.rt.stacked(n) for n in egress] + lb
                          + [self.rt.stacked(n) for n in tap_to])

    def set_pod_taps(self, key: str, from_pod: list[str], to_pod: list[str]) -> None:
        """Put observation cubes (captures, by name) outermost on pod `key`'s
        port: they see what the pod sends before any other cube (service
        addresses as the pod wrote them) and what it receives after every
        other (what reaches its eth0), as tcpdump in the pod would. Each side
        is replaced in one map update. Raises RuntimeError_ for an unknown pod."""
        pod = self.pods.get(key)
        if pod is None:
            raise RuntimeError_(f"no pod {key!r} on node {self.cfg.name}")
        if from_pod or to_pod:
            self.taps[pod.port.id] = (list(from_pod), list(to_pod))
        else:
            self.taps.pop(pod.port.id, None)
        self._write_pod_hooks(pod.port, pod.ingress, pod.egress, pod.policy)

    def find_pod(self, namespace: str, name: str) -> Pod | None:
        """The attached pod of that Kubernetes namespace and name, if any."""
        for pod in self.pods.values():
            if (pod.k8s_namespace, pod.k8s_name) == (namespace, name):
                return pod
        return None

    def _drop_leftover_taps(self) -> None:
        """On-demand captures a previous agent left stacked (their reader
        went with it): off every pod's port, then gone."""
        left = [c.name for c in self.rt.cubes.values()
                if c.type == TAP_TYPE and c.name.startswith(CAPTURE_PREFIX)]
        if not left:
            return
        for pod in self.pods.values():
            self._write_pod_hooks(pod.port, pod.ingress, pod.egress, pod.policy)
        for name in left:
            log.info("node %s: removing capture %s a previous agent left", self.cfg.name, name)
            self.rt.remove_cube(name)

    # ---------------------------------------------------------------- network policy
    def set_address_sets(self, sets: Iterable[AddressSet]) -> None:
        """Add or update the policies' address sets (a label change is an
        update of the sets it touches: no rule is rewritten)."""
        assert self.policy is not None
        self.policy.set_address_sets(sets)

    def prune_address_sets(self) -> list[str]:
        """Forget the address sets no pod's rules use; their names."""
        assert self.policy is not None
        return self.policy.gc_sets()

    def pod_policies(self) -> dict[str, PodPolicy]:
        """The policy in force on each pod that has one (what an adopting
        agent finds), by pod key."""
        if self.policy is None:
            return {}
        out = {}
        for key, pod in self.pods.items():
            p = self.policy.pods.get(pod.port.id)
            if pod.policy and p is not None:
                out[key] = p.policy
        return out

    def set_pod_policy(self, key: str, policy: PodPolicy | None) -> None:
        """Put pod `key` under `policy` (None: under none): its rules are in
        force before the cube is stacked on its port, and the cube leaves the
        port before its rules go, so no packet meets a half-made policy."""
        assert self.policy is not None
        pod = self.pods.get(key)
        if pod is None:
            raise RuntimeError_(f"no pod {key!r} on node {self.cfg.name}")
        if policy is not None:
            self.policy.set_pod(pod.port.id, policy)
            if not pod.policy:
                self._write_pod_hooks(pod.port, pod.ingress, pod.egress, True)
                pod.policy = True
        else:
            if pod.policy:
                self._write_pod_hooks(pod.port, pod.ingress, pod.egress, False)
                pod.policy = False
            self.policy.remove_pod(pod.port.id)
        self.save()

    def register_pod(self, key: str, netns: str, iface: podnet.PodInterface,
                     k8s_namespace: str = "", k8s_name: str = "", origin: str = "",
                     ifindex: int = 0) -> Pod:
        """Attach a pod whose veth pair someone else made (the CNI plugin) and
        record it: a new bridge port peered with `iface.host_ifname` (of
        index `ifindex`, if the caller looked it up). Creates no veth,
        compiles nothing."""
        port = self.attach_pod(key, iface.host_ifname, ifindex)
        pod = Pod(key, netns, iface, port, k8s_namespace=k8s_namespace, k8s_name=k8s_name,
                  origin=origin)
        self.pods[key] = pod
        self._forget_neighbor(iface.address)  # the address may have had another owner
        self.save()
        return pod

    def detach_pod(self, key: str) -> Pod | None:
        """Undo register_pod: remove the pod's bridge port and forget it; the
        veth stays (its owner deletes it). None if the pod is unknown."""
        pod = self.pods.pop(key, None)
        if pod is None:
            return None
        self.taps.pop(pod.port.id, None)
        assert self.bridge is not None
        self._drop_hostports(key)
        self._drop_policy(pod)
        self.bridge.remove_port(pod.port.name)
        self._forget_neighbor(pod.iface.address)
        if self.rt.ipr is not None and self.rt.pin_dir is not None:
            self.save()
        return pod

    def _drop_policy(self, pod: Pod) -> None:
        """A pod that goes takes its rules, counters and connections along."""
        if self.policy is not None and pod.policy:
            self.policy.remove_pod(pod.port.id)
            pod.policy = False

    def _forget_neighbor(self, address: str) -> None:
        """Drop the router's ARP entry for a pod address, so a pod that later
        gets the address is resolved afresh instead of sent the old MAC."""
        if self.router is None:
            return
        ip = str(ipaddress.IPv4Interface(address).ip)
        try:
            del self.rt.table("router_neigh", "router")[
                maps.RouterNeighKey(self.router.cube.id, maps.ip_be(ip))]
        except KeyError:
            pass

    def remove_pod(self, key: str) -> None:
        pod = self.pods.pop(key, None)
        if pod is None:
            return
        self.taps.pop(pod.port.id, None)
        assert self.bridge is not None
        self._drop_hostports(key)
        self._drop_policy(pod)
        self.bridge.remove_port(pod.port.name)
        podnet.delete(self.rt.ipr, pod.iface.host_ifname)
        if self.rt.ipr is not None and self.rt.pin_dir is not None:
            self.save()


def _del_link(rt: Runtime, name: str) -> None:
    assert rt.ipr is not None
    try:
        rt.ipr.link("del", ifname=name)
    except NetlinkError as exc:
        if exc.code != errno.ENODEV:
            raise
