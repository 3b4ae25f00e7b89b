"""A lean rtnetlink socket for the runtime's per-netdev work on a pod's path.

Peering a pod's veth with a bridge port asks the kernel a few small things:
the device's index, kind and peer namespace (one RTM_GETLINK), a clsact
qdisc (RTM_NEWQDISC) and the entry program as a tc bpf filter
(RTM_NEWTFILTER); removing the pod undoes the last two. pyroute2's
synchronous IPRoute (0.9) runs an asyncio event loop for every call and
decodes every attribute of every answer: 0.2 ms of CPU for a link lookup,
0.13 for a qdisc add (measured on this project's 2-CPU machine under load,
2026-12-01), against 0.016 and 0.006 here; a CNI ADD's attach made five
such calls, and 30 ADDs at once share one interpreter lock. This module
builds those few messages with `struct` and reads only the attributes it
needs, on one NETLINK_ROUTE socket per thread (Runtime's NetlinkPerThread
opens it in the runtime's namespace). Everything else (dumps, routes, FDB,
sysctls) stays with pyroute2.

The messages are those of iproute2's `tc qdisc add dev D clsact` and `tc
filter replace dev D ingress prio 1 handle 1 bpf da fd F name N classid 1`
(include/uapi/linux/rtnetlink.h, pkt_sched.h, pkt_cls.h); refusals are
raised as pyroute2's NetlinkError with the kernel's errno, as the pyroute2
calls they replace raised them.
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

from pyroute2.netlink.exceptions import NetlinkError

NETLINK_ROUTE = 0
RTM_GETLINK = 18
RTM_NEWQDISC, RTM_DELQDISC = 36, 37
RTM_NEWTFILTER, RTM_DELTFILTER = 44, 45
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER

IFLA_IFNAME, IFLA_LINKINFO, IFLA_LINK_NETNSID = 3, 18, 37
IFLA_INFO_KIND = 1
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_BPF_CLASSID, TCA_BPF_FD, TCA_BPF_NAME, TCA_BPF_FLAGS = 3, 6, 7, 8
TCA_BPF_FLAG_ACT_DIRECT = 1
TC_H_CLSACT = 0xFFFFFFF1  # the clsact qdisc's parent (TC_H_INGRESS)
CLSACT_HANDLE = 0xFFFF0000  # its handle, ffff:
ETH_P_ALL = 0x0003

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_TCMSG = struct.Struct("=BxxxiIII")
_NLATTR = struct.Struct("=HH")
_ERRCODE = struct.Struct("=i")
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")


@dataclass(frozen=True)
class Netdev:
    """A device as RTM_GETLINK describes it: `index`, `name`, `kind`
    (IFLA_INFO_KIND: "veth", "vxlan"...; "" for a device without one, such
    as lo or a physical NIC) and `link_netnsid`: the namespace id of the
    device's other end when it lives in another namespace (a veth whose
    peer is in a pod; rtnl_fill_link_netnsid), else None."""

    index: int
    name: str
    kind: str
    link_netnsid: int | None

    @property
    def veth_peer_elsewhere(self) -> bool:
        """A veth whose other end is in another network namespace (the kernel
        leaves IFLA_LINK_NETNSID out when both ends share this one)."""
        return self.kind == "veth" and self.link_netnsid is not None


def _attr(kind: int, payload: bytes) -> bytes:
    length = _NLATTR.size + len(payload)
    return _NLATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def _attrs(data: bytes | memoryview, offset: int = 0) -> dict[int, memoryview]:
    """The attributes from `offset` on, by type (the last of a repeated type)."""
    view = memoryview(data)
    out: dict[int, memoryview] = {}
    while offset + _NLATTR.size <= len(view):
        length, kind = _NLATTR.unpack_from(view, offset)
        if length < _NLATTR.size:
            break
        out[kind & NLA_TYPE_MASK] = view[offset + _NLATTR.size:offset + length]
        offset += (length + 3) & ~3
    return out


def _cstr(value: memoryview | None) -> str:
    return bytes(value or b"").split(b"\0", 1)[0].decode(errors="replace")


class Rtnl:
    """One NETLINK_ROUTE socket, in the namespace of the thread that opens it;
    one request at a time (a thread's own: not thread-safe)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  NETLINK_ROUTE)
        try:
            self.sock.bind((0, 0))
        except BaseException:
            self.sock.close()
            raise
        self._seq = 0

    def close(self) -> None:
        self.sock.close()

    def request(self, kind: int, flags: int, body: bytes, what: str) -> list[memoryview]:
        """Send one request and read its answer: the payloads of the messages
        that answer it (a get's one) up to the acknowledgement. A refusal is
        NetlinkError(errno), its message saying `what` was asked. Answers to
        earlier requests left unread (a caller interrupted) are skipped by
        their sequence number."""
        self._seq = seq = (self._seq + 1) & 0xFFFFFFFF
        self.sock.sendall(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind,
                                         flags | NLM_F_REQUEST, seq, 0) + body)
        out: list[memoryview] = []
        while True:
            data = memoryview(self.sock.recv(65536))
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, mtype, mflags, mseq, _ = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    raise NetlinkError(errno.EBADMSG, f"{what}: a malformed answer")
                payload = data[offset + _NLMSGHDR.size:offset + length]
                offset += (length + 3) & ~3
                if mseq != seq:
                    continue
                if mtype == NLMSG_ERROR:
                    code = -_ERRCODE.unpack_from(payload)[0]
                    if code:
                        raise NetlinkError(code, f"{what}: {errno.errorcode.get(code, code)}")
                    return out  # the acknowledgement
                if mtype == NLMSG_DONE:
                    return out
                out.append(payload)
                if not mflags & NLM_F_MULTI and not flags & NLM_F_ACK:
                    return out

    # ---------------------------------------------------------------- links
    def link(self, index: int = 0, name: str = "") -> Netdev | None:
        """The device of ifindex `index`, or (index 0) named `name`; None if
        there is none."""
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0)
        if not index:
            body += _attr(IFLA_IFNAME, name.encode() + b"\0")
        try:
            [msg] = self.request(RTM_GETLINK, 0, body, f"reading link {index or name}")
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT):
                return None
            raise
        _, _, idx, _, _ = _IFINFOMSG.unpack_from(msg)
        attrs = _attrs(msg, _IFINFOMSG.size)
        info = attrs.get(IFLA_LINKINFO)
        kind = _cstr(_attrs(info).get(IFLA_INFO_KIND)) if info is not None else ""
        nsid = attrs.get(IFLA_LINK_NETNSID)
        return Netdev(idx, _cstr(attrs.get(IFLA_IFNAME)), kind,
                      _I32.unpack(nsid)[0] if nsid is not None else None)

    # ---------------------------------------------------------------- tc
    def add_clsact(self, ifindex: int) -> bool:
        """A clsact qdisc on the device; False if it has one already."""
        try:
            self.request(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK,
                         _TCMSG.pack(socket.AF_UNSPEC, ifindex, CLSACT_HANDLE, TC_H_CLSACT, 0)
                         + _attr(TCA_KIND, b"clsact\0"), f"adding clsact to ifindex {ifindex}")
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:
                return False
            raise
        return True

    def del_clsact(self, ifindex: int) -> None:
        """Remove the device's clsact qdisc (its filters go with it)."""
        self.request(RTM_DELQDISC, NLM_F_ACK,
                     _TCMSG.pack(socket.AF_UNSPEC, ifindex, CLSACT_HANDLE, TC_H_CLSACT, 0)
                     + _attr(TCA_KIND, b"clsact\0"), f"removing clsact of ifindex {ifindex}")

    def replace_bpf_filter(self, ifindex: int, parent: int, prio: int, handle: int, fd: int,
                           name: str, classid: int = 1) -> None:
        """Make the bpf filter (`prio`, `handle`) on `parent` (the clsact's
        ingress or egress, 0xFFFFFFF2 or 0xFFFFFFF3) run program `fd` in
        direct-action mode, created or replaced in place (atomically: no
        packet goes without a program). `name` is what `tc filter show` and
        tc.filters() report."""
        options = (_attr(TCA_BPF_CLASSID, _U32.pack(classid)) + _attr(TCA_BPF_FD, _U32.pack(fd))
                   + _attr(TCA_BPF_NAME, name.encode() + b"\0")
                   + _attr(TCA_BPF_FLAGS, _U32.pack(TCA_BPF_FLAG_ACT_DIRECT)))
        self.request(RTM_NEWTFILTER, NLM_F_CREATE | NLM_F_REPLACE | NLM_F_ACK,
                     _TCMSG.pack(socket.AF_UNSPEC, ifindex, handle, parent, _filter_info(prio))
                     + _attr(TCA_KIND, b"bpf\0") + _attr(TCA_OPTIONS, options),
                     f"attaching {name} to ifindex {ifindex}")

    def del_bpf_filter(self, ifindex: int, parent: int, prio: int, handle: int) -> None:
        """Remove the bpf filter (`prio`, `handle`) from `parent`."""
        self.request(RTM_DELTFILTER, NLM_F_ACK,
                     _TCMSG.pack(socket.AF_UNSPEC, ifindex, handle, parent, _filter_info(prio))
                     + _attr(TCA_KIND, b"bpf\0"), f"detaching the filter of ifindex {ifindex}")


def _filter_info(prio: int) -> int:
    """tcm_info of a filter: its priority in the upper 16 bits, the protocol
    it matches (every one, ETH_P_ALL, in network order) in the lower."""
    return ((prio & 0xFFFF) << 16) | socket.htons(ETH_P_ALL)
