"""Plumbing of one pod's network: a veth pair whose inner end is the pod's
interface (address, default route, MTU) and whose outer end stays in the node
namespace for the agent to peer with a bridge port. No BPF here: this is the
CNI plugin's side of the contract.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pyroute2 is imported where it is used: pcn-cni imports this
    from pyroute2 import IPRoute  # module for host_ifname() and must start fast

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PodInterface:
    host_ifname: str
    ifname: str
    address: str  # interface notation, e.g. 10.244.1.5/24
    mac: str
    gateway: str
    mtu: int


def host_ifname(pod_key: str) -> str:
    """A stable host-side name (at most 15 characters) for a pod's veth."""
    return f"pcn{zlib.crc32(pod_key.encode()):08x}"


def write_sysctl(netns: str | None, key: str, value: str) -> None:
    """Write a net.* sysctl as seen from `netns` (/proc/sys/net follows the
    namespace of the writing thread). A missing namespace is an error, never
    created on the fly."""
    from pcn_agent.dataplane.netns import entered

    path = Path("/proc/sys") / key.replace(".", "/")
    with entered(netns):
        path.write_text(value)


def read_sysctl(netns: str | None, key: str) -> str:
    """A net.* sysctl as seen from `netns` (see write_sysctl)."""
    from pcn_agent.dataplane.netns import entered

    path = Path("/proc/sys") / key.replace(".", "/")
    with entered(netns):
        return path.read_text().strip()


def create(node_ipr: IPRoute, node_netns: str | None, pod_netns: str, host_if: str,
           address: str, gateway: str, mtu: int, ifname: str = "eth0") -> PodInterface:
    """Create and configure the pod's veth pair; on any failure nothing is left."""
    from pcn_agent.dataplane.netns import iproute

    iface = ipaddress.IPv4Interface(address)
    gw = ipaddress.IPv4Address(gateway)
    if gw not in iface.network:
        raise ValueError(f"gateway {gw} is outside the pod network {iface.network}")
    tmp = f"{host_if}p"[:15]
    node_ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": tmp, "net_ns_fd": pod_netns})
    try:
        host_idx = node_ipr.link_lookup(ifname=host_if)[0]
        node_ipr.link("set", index=host_idx, mtu=mtu)
        no_ipv6(node_netns, host_if)
        with iproute(pod_netns) as pod:  # never creates the namespace
            idx = pod.link_lookup(ifname=tmp)[0]
            pod.link("set", index=idx, ifname=ifname, mtu=mtu)
            no_ipv6(pod_netns, ifname)
            pod.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
            pod.link("set", index=idx, state="up")
            lo = pod.link_lookup(ifname="lo")
            if lo:
                pod.link("set", index=lo[0], state="up")
            pod.route("replace", dst="0.0.0.0/0", gateway=str(gw), oif=idx)
            mac = pod.get_links(idx)[0].get_attr("IFLA_ADDRESS")
        node_ipr.link("set", index=host_idx, state="up")
    except Exception:
        delete(node_ipr, host_if)
        raise
    log.info("pod interface %s/%s (%s, %s) via host veth %s", pod_netns, ifname, address, mac,
             host_if)
    return PodInterface(host_if, ifname, str(iface), mac, str(gw), mtu)


def delete(node_ipr: IPRoute, host_if: str) -> bool:
    """Delete the veth pair (both ends go together). True if it existed."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        node_ipr.link("del", ifname=host_if)
        return True
    except NetlinkError as exc:
        if exc.code in (errno.ENODEV, errno.ENOENT):
            return False
        raise


def no_ipv6(netns: str | None, ifname: str) -> None:
    """pcn routes IPv4 only: keep the kernel from sending IPv6 neighbour and
    router discovery into the data plane."""
    key = f"net.ipv6.conf.{ifname}.disable_ipv6"
    try:
        write_sysctl(netns, key, "1")
    except FileNotFoundError:
        pass  # IPv6 disabled in this kernel
