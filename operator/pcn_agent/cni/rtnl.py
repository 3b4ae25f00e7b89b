"""A small rtnetlink client on the standard library, for pcn-cni.

The CNI plugin runs once per pod operation, so its start-up is its latency:
importing pyroute2 alone takes ~150 ms, more than all of the plugin's own
work. This module does the few things the plugin needs (a veth pair whose
peer is born in the pod's namespace, rename, MTU, up, an address, routes,
lookups, delete) with one NETLINK_ROUTE socket and no fork or exec, and
enters a network namespace with setns(2) on the calling thread. The results
match what pyroute2 did for the plugin: addresses carry IFA_LOCAL and
IFA_ADDRESS (no broadcast), routes are `proto static scope global` in the
main table. The agent keeps using pyroute2.
"""

from __future__ import annotations

import _socket  # not socket: its enums cost the plugin ~1.5 ms a run
import errno
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager

TYPE_CHECKING = False  # no typing import at run time (see commands)
if TYPE_CHECKING:
    import ctypes

NETLINK_ROUTE = 0
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWROUTE = 24
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE, NLM_F_DUMP = 0x100, 0x200, 0x400, 0x300
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_OPERSTATE = 1, 3, 4, 16
IFLA_LINKINFO, IFLA_NET_NS_FD = 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
VETH_INFO_PEER = 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY = 1, 4, 5
RT_TABLE_MAIN, RTPROT_STATIC, RT_SCOPE_UNIVERSE, RTN_UNICAST = 254, 4, 0, 1
IFF_UP = 0x1
CLONE_NEWNET = 0x40000000
OPERSTATES = {0: "UNKNOWN", 1: "NOTPRESENT", 2: "DOWN", 3: "LOWERLAYERDOWN", 4: "TESTING",
              5: "DORMANT", 6: "UP"}

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBi")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTATTR = struct.Struct("=HH")


class NetlinkError(OSError):
    """A request the kernel refused; `errno` is the kernel's error."""

    def __init__(self, code: int, what: str = "") -> None:
        super().__init__(code, f"{what}: {os.strerror(code)}" if what else os.strerror(code))
        self.code = code  # the attribute pyroute2's NetlinkError has


# ------------------------------------------------------------------ encoding
def _align(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    length = _RTATTR.size + len(payload)
    return _RTATTR.pack(length, kind) + payload + b"\0" * (_align(length) - length)


def attr_str(kind: int, value: str) -> bytes:
    return attr(kind, value.encode() + b"\0")


def attr_u32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=I", value))


def attr_ip(kind: int, value: str) -> bytes:
    return attr(kind, _socket.inet_aton(value))


def parse_attrs(data: bytes, offset: int = 0) -> dict[int, bytes]:
    """Attributes of a message body from `offset` (the last of a kind wins)."""
    out: dict[int, bytes] = {}
    while offset + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size:
            break
        out[kind & 0x3FFF] = data[offset + _RTATTR.size:offset + length]
        offset += _align(length)
    return out


def ifinfomsg(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return _IFINFOMSG.pack(_socket.AF_UNSPEC, 0, index, flags, change)


# ------------------------------------------------------------------ namespaces
_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    # ctypes only here: DEL, STATUS, GC and VERSION never enter a namespace
    # and do without its import (~1 ms)
    import ctypes

    global _libc
    if _libc is None:
        # the C library the interpreter already runs on (find_library would
        # run ldconfig: a process per plugin run)
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def netns(path: str | None) -> Iterator[None]:
    """Run the body with this thread in the network namespace at `path`
    (None: stay). Sockets opened inside stay in that namespace; /proc/sys/net
    shows it. A missing namespace is FileNotFoundError, never created."""
    if not path:
        yield
        return
    target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(home)
    finally:
        os.close(target)


def write_sysctl(key: str, value: str) -> None:
    """A net.* sysctl of the calling thread's namespace."""
    with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
        f.write(value)


def read_sysctl(key: str) -> str:
    """A net.* sysctl of the calling thread's namespace, stripped."""
    with open("/proc/sys/" + key.replace(".", "/")) as f:
        return f.read().strip()


def link_index(ifname: str) -> int | None:
    """The index of `ifname` in the calling thread's namespace, or None."""
    try:
        return _socket.if_nametoindex(ifname)
    except OSError:
        return None


# ------------------------------------------------------------------ the socket
class Link:
    """A link as RTM_GETLINK describes it. A plain class, not a dataclass:
    importing dataclasses (inspect, ast, dis) costs the plugin ~4 ms a run."""

    __slots__ = ("index", "ifname", "mtu", "flags", "operstate", "mac")

    def __init__(self, index: int, ifname: str, mtu: int, flags: int, operstate: str,
                 mac: str) -> None:
        self.index = index
        self.ifname = ifname
        self.mtu = mtu
        self.flags = flags
        self.operstate = operstate  # OPERSTATES' names
        self.mac = mac  # aa:bb:cc:dd:ee:ff

    @property
    def up(self) -> bool:
        return self.operstate == "UP" or bool(self.flags & IFF_UP)


class Rtnl:
    """One NETLINK_ROUTE socket in the namespace of the thread that opens it."""

    def __init__(self) -> None:
        self.sock = _socket.socket(_socket.AF_NETLINK,
                                   _socket.SOCK_RAW | _socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        try:
            self.sock.bind((0, 0))
        except BaseException:
            self.sock.close()
            raise
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, kind: int, flags: int, body: bytes, what: str = "") -> list[bytes]:
        """Send one request; the bodies of the answers (a dump's, or a get's)
        until the acknowledgement or the end of the dump. NetlinkError if the
        kernel refuses."""
        self.seq += 1
        seq = self.seq
        self.sock.sendall(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags | NLM_F_REQUEST,
                                         seq, 0) + body)
        out: list[bytes] = []
        while True:
            data = self.sock.recv(1 << 16)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, mtype, mflags, mseq, _ = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    raise NetlinkError(errno.EBADMSG, what)
                payload = data[offset + _NLMSGHDR.size:offset + length]
                offset += _align(length)
                if mseq != seq:
                    continue
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise NetlinkError(code, what)
                    return out  # the acknowledgement
                if mtype == NLMSG_DONE:
                    return out
                out.append(payload)
                if not (mflags & NLM_F_MULTI) and not (flags & NLM_F_ACK):
                    return out

    # ---------------------------------------------------------------- links
    def create_veth(self, ifname: str, peer: str, peer_netns_fd: int, mtu: int) -> None:
        """A veth pair: `ifname` here, `peer` born in the namespace of the fd,
        both at `mtu`, both down."""
        peer_info = ifinfomsg() + attr_str(IFLA_IFNAME, peer) + attr_u32(IFLA_MTU, mtu) + \
            attr_u32(IFLA_NET_NS_FD, peer_netns_fd)
        info = attr_str(IFLA_INFO_KIND, "veth") + \
            attr(IFLA_INFO_DATA, attr(VETH_INFO_PEER, peer_info))
        body = ifinfomsg() + attr_str(IFLA_IFNAME, ifname) + attr_u32(IFLA_MTU, mtu) + \
            attr(IFLA_LINKINFO, info)
        self.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK, body,
                     f"creating veth {ifname}")

    def set_link(self, index: int, ifname: str | None = None, mtu: int | None = None,
                 up: bool | None = None) -> None:
        body = ifinfomsg(index, IFF_UP if up else 0, IFF_UP if up is not None else 0)
        if ifname is not None:
            body += attr_str(IFLA_IFNAME, ifname)
        if mtu is not None:
            body += attr_u32(IFLA_MTU, mtu)
        self.request(RTM_NEWLINK, NLM_F_ACK, body, f"setting link {index}")

    def delete_link(self, ifname: str) -> bool:
        """Delete a link by name (a veth takes its peer along). True if it existed."""
        try:
            self.request(RTM_DELLINK, NLM_F_ACK, ifinfomsg() + attr_str(IFLA_IFNAME, ifname),
                         f"deleting {ifname}")
            return True
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT):
                return False
            raise

    def link(self, index: int) -> Link:
        [msg] = self.request(RTM_GETLINK, NLM_F_ACK, ifinfomsg(index), f"reading link {index}")
        _, _, idx, flags, _ = _IFINFOMSG.unpack_from(msg)
        a = parse_attrs(msg, _IFINFOMSG.size)
        mac = ":".join(f"{b:02x}" for b in a.get(IFLA_ADDRESS, b""))
        return Link(idx, a.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(),
                    struct.unpack("=I", a[IFLA_MTU])[0] if IFLA_MTU in a else 0, flags,
                    OPERSTATES.get(a[IFLA_OPERSTATE][0], "UNKNOWN")
                    if IFLA_OPERSTATE in a else "UNKNOWN", mac)

    # ---------------------------------------------------------------- addresses, routes
    def add_address(self, index: int, address: str, prefixlen: int) -> None:
        body = _IFADDRMSG.pack(_socket.AF_INET, prefixlen, 0, RT_SCOPE_UNIVERSE, index) + \
            attr_ip(IFA_LOCAL, address) + attr_ip(IFA_ADDRESS, address)
        self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK, body,
                     f"adding {address}/{prefixlen}")

    def addresses(self, index: int) -> set[str]:
        """The IPv4 addresses of a link, as address/prefixlen."""
        out = set()
        for msg in self.request(RTM_GETADDR, NLM_F_DUMP,
                                _IFADDRMSG.pack(_socket.AF_INET, 0, 0, 0, 0), "listing addresses"):
            family, prefixlen, _, _, idx = _IFADDRMSG.unpack_from(msg)
            if family != _socket.AF_INET or idx != index:
                continue
            a = parse_attrs(msg, _IFADDRMSG.size)
            raw = a.get(IFA_ADDRESS) or a.get(IFA_LOCAL)
            if raw:
                out.add(f"{_socket.inet_ntoa(raw)}/{prefixlen}")
        return out

    def replace_route(self, dst: str, prefixlen: int, gateway: str, oif: int) -> None:
        body = _RTMSG.pack(_socket.AF_INET, prefixlen, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC,
                           RT_SCOPE_UNIVERSE, RTN_UNICAST, 0)
        if prefixlen:
            body += attr_ip(RTA_DST, dst)
        body += attr_ip(RTA_GATEWAY, gateway) + attr_u32(RTA_OIF, oif)
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE | NLM_F_ACK, body,
                     f"route {dst}/{prefixlen} via {gateway}")
