"""The pod link: the veth pair whose inner end is the pod's interface
(address, default route, MTU, no IPv6) and whose outer end stays in the
node's namespace for the agent to attach. Netlink through the stdlib-only
pcn_agent.cni.rtnl (the CNI bundle has no pyroute2)."""

from __future__ import annotations

import errno
import ipaddress
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

from pcn_agent.cni import rtnl
from pcn_agent.cni.spec import INVALID_ENV, CniError, Env


def host_ifname(container_id: str) -> str:
    """The host end's name for a container (at most 15 characters, stable:
    DEL and CHECK find the link again from CNI_CONTAINERID alone)."""
    return f"pcn{zlib.crc32(container_id.encode()):08x}"


def check_netns(path: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CniError(INVALID_ENV, f"CNI_NETNS {path} does not exist",
                       "the pod's network namespace must exist before ADD/CHECK") from None
    own = os.stat("/proc/thread-self/ns/net")  # the agent runs ADDs on its threads
    if st.st_dev != own.st_dev:
        raise CniError(INVALID_ENV, f"CNI_NETNS {path} is not a network namespace",
                       "CNI_NETNS is the path of a network namespace, e.g. /var/run/netns/<name>")
    if st.st_ino == own.st_ino:
        raise CniError(INVALID_ENV, f"CNI_NETNS {path} is pcn-cni's own (the node's) network "
                                    f"namespace", "a pod needs a namespace of its own")


def no_ipv6(ifname: str) -> None:
    """pcn routes IPv4 only: keep the kernel from sending IPv6 neighbour and
    router discovery into the data plane (the calling thread's namespace).

    Written only when it is not set already: the kernel serves a write of
    an interface's disable_ipv6 only with the rtnl lock, and while any
    other thread holds that lock (the netlink work of the ADDs alongside)
    it restarts the write over and over (addrconf_sysctl_disable:
    rtnl_trylock or restart_syscall), CPU spent for nothing; a read takes
    no lock."""
    key = f"net.ipv6.conf.{ifname}.disable_ipv6"
    try:
        if rtnl.read_sysctl(key) != "1":
            rtnl.write_sysctl(key, "1")
    except FileNotFoundError:
        pass  # IPv6 disabled in this kernel


@contextmanager
def _born_without_ipv6(netns: str) -> Iterator[None]:
    """Interfaces made in the namespace at `netns` while the body runs start
    with IPv6 disabled: its default disable_ipv6 (what a new interface's
    settings are copied from, ipv6_add_dev) is 1 meanwhile, and as it was
    after. The default is written without the rtnl lock (see no_ipv6), and
    the pod's namespace is this ADD's alone."""
    key = "net.ipv6.conf.default.disable_ipv6"
    with rtnl.netns(netns):
        try:
            before = rtnl.read_sysctl(key)
        except FileNotFoundError:
            before = ""  # IPv6 disabled in this kernel
        if before not in ("", "1"):
            rtnl.write_sysctl(key, "1")
    try:
        yield
    finally:
        if before not in ("", "1"):
            with rtnl.netns(netns):
                rtnl.write_sysctl(key, before)


class PodLink:
    """What create_pod_link made (a plain class: see rtnl.Link)."""

    __slots__ = ("address", "mac", "host_mac")

    def __init__(self, address: str, mac: str, host_mac: str) -> None:
        self.address = address  # interface notation, 10.244.1.5/24
        self.mac = mac  # of the pod's interface
        self.host_mac = host_mac


def create_pod_link(env: Env, host_if: str, address: str, gateway: str,
                    mtu: int) -> PodLink:
    """The pod's veth pair (podnet.create's contract, on pcn_agent.cni.rtnl): the
    host end `host_if` here, the pod end born in the pod's namespace, renamed
    to CNI_IFNAME, MTU, no IPv6, the address, up, lo up, the default route
    via `gateway`; then the host end up. On any failure nothing is left."""
    iface = ipaddress.IPv4Interface(address)
    gw = ipaddress.IPv4Address(gateway)
    if gw not in iface.network:
        raise ValueError(f"gateway {gw} is outside the pod network {iface.network}")
    tmp = f"{host_if}p"[:15]
    with rtnl.Rtnl() as node:
        pod_fd = os.open(env.netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with _born_without_ipv6(env.netns):  # the pod's end: no write to undo it
                node.create_veth(host_if, tmp, pod_fd, mtu)
        finally:
            os.close(pod_fd)
        try:
            host_idx = rtnl.link_index(host_if)
            if host_idx is None:
                raise rtnl.NetlinkError(errno.ENODEV, f"{host_if} vanished")
            no_ipv6(host_if)
            with rtnl.netns(env.netns), rtnl.Rtnl() as pod:
                idx = rtnl.link_index(tmp)
                if idx is None:
                    raise rtnl.NetlinkError(errno.ENODEV, f"{tmp} is not in {env.netns}")
                pod.set_link(idx, ifname=env.ifname, mtu=mtu)
                no_ipv6(env.ifname)
                pod.add_address(idx, str(iface.ip), iface.network.prefixlen)
                pod.set_link(idx, up=True)
                lo = rtnl.link_index("lo")
                if lo is not None:
                    pod.set_link(lo, up=True)
                pod.replace_route("0.0.0.0", 0, str(gw), idx)
                mac = pod.link(idx).mac
            node.set_link(host_idx, up=True)
            host_mac = node.link(host_idx).mac
        except BaseException:
            node.delete_link(host_if)
            raise
    return PodLink(str(iface), mac, host_mac)


def delete_host_link(host_if: str) -> bool:
    """Delete a pod's veth pair by its host end. True if it existed."""
    with rtnl.Rtnl() as node:
        return node.delete_link(host_if)
