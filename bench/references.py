"""Reference topologies built from plain kernel parts, for comparison with pcn.

* `veth_pair`: two namespaces joined directly by one veth pair, the limit of
  any pod-to-pod path on one machine.
* `switched_pair`: two "node" namespaces on a replica of the lab's physical
  network (veth, Linux bridge switch, veth), the limit of a cross-node path.
* `vxlan_pair`: the kernel's VXLAN devices over a `switched_pair`, the limit
  of an encapsulated cross-node path.
* `routed_pods`: a pod namespace behind each node of either, on a veth pair,
  forwarded by the kernel's own IP routing: pcn's cross-node topology (a
  pod's veth on each side) without pcn, as Flannel's host-gw (over the
  underlay) and vxlan (over `vxlan_pair`) backends build it.
* `LinuxBridgeCNI`: a "node" namespace and pod namespaces wired by the
  reference CNI `bridge` plugin with `host-local` IPAM, called exactly as a
  kubelet (container runtime) calls a CNI plugin.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute

from .netns import Namespaces, exec_in

log = logging.getLogger(__name__)

CNI_BIN_DIR = Path("/usr/lib/cni")
VETH_NET = ipaddress.IPv4Network("192.168.251.0/24")
BRIDGE_NET = ipaddress.IPv4Network("10.245.1.0/24")
UNDERLAY_NET = ipaddress.IPv4Network("192.168.252.0/24")
VXLAN_NET = ipaddress.IPv4Network("10.247.0.0/24")  # vxlan_pair's overlay
ROUTED_PODS_NET = ipaddress.IPv4Network("10.249.0.0/16")  # routed_pods: node i's pod in 10.249.i/24


@dataclass(frozen=True)
class Endpoint:
    netns: str
    ip: str


def veth_pair(nss: Namespaces, mtu: int) -> tuple[Endpoint, Endpoint]:
    """Two fresh namespaces `<prefix>-va`/`-vb` joined by a veth pair `eth0`."""
    a, b = nss.create("va"), nss.create("vb")
    with IPRoute(netns=a) as ipr:
        ipr.link("add", ifname="eth0", kind="veth", peer={"ifname": "eth0", "net_ns_fd": b})
    ends = []
    for i, ns in enumerate((a, b), start=1):
        ip = str(VETH_NET.network_address + i)
        _address(ns, "eth0", ip, VETH_NET.prefixlen, mtu)
        ends.append(Endpoint(ns, ip))
    return ends[0], ends[1]


def _address(netns: str, ifname: str, ip: str, prefixlen: int, mtu: int) -> None:
    """Give `ifname` in `netns` its MTU and address, then bring it up."""
    with IPRoute(netns=netns) as ipr:
        idx = ipr.link_lookup(ifname=ifname)[0]
        ipr.link("set", index=idx, mtu=mtu)
        ipr.addr("add", index=idx, address=ip, prefixlen=prefixlen)
        ipr.link("set", index=idx, state="up")


def switched_pair(nss: Namespaces, mtu: int, tag: str = "") -> tuple[Endpoint, Endpoint]:
    """The lab's physical network without pcn: two "node" namespaces
    `-un1<tag>`/`-un2<tag>` whose `uplink` veths meet on a Linux bridge `sw` in
    `-uphy<tag>`, as pcn_lab.topology.Lab wires its nodes, with the uplinks at
    `mtu` (`tag` tells two such networks of one run apart)."""
    phy = nss.create(f"uphy{tag}")
    nodes = [nss.create(f"un1{tag}"), nss.create(f"un2{tag}")]
    ends = []
    with IPRoute(netns=phy) as ipr:
        ipr.link("add", ifname="sw", kind="bridge")
        sw = ipr.link_lookup(ifname="sw")[0]
        ipr.link("set", index=sw, state="up")
        for i, ns in enumerate(nodes, start=1):
            port = f"n{i}"
            ipr.link("add", ifname=port, kind="veth", peer={"ifname": "uplink", "net_ns_fd": ns})
            ipr.link("set", index=ipr.link_lookup(ifname=port)[0], master=sw, state="up")
            ip = str(UNDERLAY_NET.network_address + i)
            _address(ns, "uplink", ip, UNDERLAY_NET.prefixlen, mtu)
            ends.append(Endpoint(ns, ip))
    return ends[0], ends[1]


def vxlan_pair(a: Endpoint, b: Endpoint, mtu: int) -> tuple[Endpoint, Endpoint]:
    """The kernel's VXLAN alone between the two ends of a `switched_pair`
    (uplinks at 1500): a VXLAN device `vx` in each namespace made as pcn's
    node wiring makes its own (VNI 42, port 4789, learning, one all-zero
    FDB entry towards the other end; RFC 7348), at `mtu`, with an address in
    VXLAN_NET. What encapsulation costs without pcn: pcn's VXLAN path is
    measured against it and against the bare underlay."""
    ends = []
    for i, (me, other) in enumerate(((a, b), (b, a)), start=1):
        with IPRoute(netns=me.netns) as ipr:
            uplink = ipr.link_lookup(ifname="uplink")[0]
            ipr.link("add", ifname="vx", kind="vxlan", vxlan_id=42, vxlan_local=me.ip,
                     vxlan_link=uplink, vxlan_port=4789, vxlan_learning=1)
            idx = ipr.link_lookup(ifname="vx")[0]
            ipr.fdb("append", ifindex=idx, lladdr="00:00:00:00:00:00", dst=other.ip)
        ip = str(VXLAN_NET.network_address + i)
        _address(me.netns, "vx", ip, VXLAN_NET.prefixlen, mtu)
        ends.append(Endpoint(me.netns, ip))
    return ends[0], ends[1]


def _pod_net(i: int) -> ipaddress.IPv4Network:
    """Node i's pod network in routed_pods: the i-th /24 of ROUTED_PODS_NET."""
    return ipaddress.IPv4Network((int(ROUTED_PODS_NET.network_address) + (i << 8), 24))


def routed_pods(nss: Namespaces, a: Endpoint, b: Endpoint, via: str, mtu: int,
                tag: str = "") -> tuple[Endpoint, Endpoint]:
    """A pod behind each of two "node" namespaces (`a`, `b`: the ends of a
    `switched_pair` or a `vxlan_pair`), forwarded by the kernel: pod
    namespace `-rp<i><tag>` with `eth0` at `mtu` (10.249.<i>.2/24) on a veth
    pair whose node end `pod` is its gateway (10.249.<i>.1), the node
    forwarding (net.ipv4.ip_forward=1 in its namespace only) with a route to
    the other pod's /24 via the other end's address on `via` (the uplink:
    direct routing; the VXLAN device `vx`: encapsulated). No netfilter rule
    anywhere. Returns the two pods' Endpoints; the caller removes the pod
    namespaces (`<prefix>-rp1<tag>`, `-rp2<tag>`)."""
    ends = []
    for i, (node, other) in enumerate(((a, b), (b, a)), start=1):
        pod = nss.create(f"rp{i}{tag}")
        net, peer_net = _pod_net(i), _pod_net(3 - i)
        gw, ip = str(net.network_address + 1), str(net.network_address + 2)
        with IPRoute(netns=node.netns) as ipr:
            ipr.link("add", ifname="pod", kind="veth", peer={"ifname": "eth0", "net_ns_fd": pod})
        _address(node.netns, "pod", gw, net.prefixlen, mtu)
        _address(pod, "eth0", ip, net.prefixlen, mtu)
        with IPRoute(netns=pod) as ipr:
            ipr.route("add", dst="0.0.0.0/0", gateway=gw)
        with IPRoute(netns=node.netns) as ipr:
            ipr.route("add", dst=str(peer_net), gateway=other.ip,
                      oif=ipr.link_lookup(ifname=via)[0])
        exec_in(node.netns, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        ends.append(Endpoint(pod, ip))
    return ends[0], ends[1]


@dataclass
class LinuxBridgeCNI:
    """Pods attached to a Linux bridge in `node_ns` by /usr/lib/cni/bridge."""

    nss: Namespaces
    node_ns: str
    data_dir: Path  # host-local's state, unique to this run
    mtu: int
    network_name: str = "pcnb-bridge"
    bridge: str = "cni0"
    subnet: ipaddress.IPv4Network = BRIDGE_NET
    added: list[tuple[str, str]] = field(default_factory=list)  # (container id, pod netns)

    def config(self) -> dict[str, object]:
        return {
            "cniVersion": "1.0.0",
            "name": self.network_name,
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": True,
            "ipMasq": False,
            "mtu": self.mtu,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": str(self.subnet)}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": str(self.data_dir),
            },
        }

    def _invoke(self, command: str, container_id: str, pod_ns: str) -> str:
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": f"/var/run/netns/{pod_ns}",
            "CNI_IFNAME": "eth0",
            "CNI_PATH": str(CNI_BIN_DIR),
        }
        proc = exec_in(self.node_ns, [str(CNI_BIN_DIR / "bridge")], env=env,
                       stdin=json.dumps(self.config()), check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"CNI {command} of {container_id} failed ({proc.returncode}): "
                               f"{proc.stdout.strip()} {proc.stderr.strip()}")
        return proc.stdout

    def add_pod(self, suffix: str) -> Endpoint:
        pod_ns = self.nss.create(suffix)
        container_id = pod_ns  # unique per run, as a runtime's sandbox id is
        out = self._invoke("ADD", container_id, pod_ns)
        self.added.append((container_id, pod_ns))
        result = json.loads(out)
        ip = str(ipaddress.IPv4Interface(result["ips"][0]["address"]).ip)
        log.info("CNI bridge: %s has %s", pod_ns, ip)
        return Endpoint(pod_ns, ip)

    def delete_all(self) -> None:
        """CNI DEL of every pod added, newest first; keeps going after a failure."""
        errors = []
        while self.added:
            container_id, pod_ns = self.added.pop()
            try:
                self._invoke("DEL", container_id, pod_ns)
            except Exception as exc:  # noqa: BLE001 - report all, then raise
                errors.append(str(exc))
        if errors:
            raise RuntimeError("; ".join(errors))
