"""tc clsact attachment of the entry programs.

Filters get an explicit priority and handle and are replaced, not stacked, so
re-attaching (an agent restart, a program upgrade) swaps the program atomically.
Attaching and detaching go through the runtime's lean socket (dataplane.rtnl:
every pod attach and removal does them); listing, which tests and diagnostics
use, through pyroute2.
"""

from __future__ import annotations

import errno
import logging

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pcn_agent.dataplane.rtnl import Rtnl

log = logging.getLogger(__name__)

INGRESS = "ffff:fff2"
EGRESS = "ffff:fff3"
PRIO = 1
HANDLE = 1  # ":1"
_PARENT_NUM = {INGRESS: 0xFFFFFFF2, EGRESS: 0xFFFFFFF3}


def ensure_clsact(nl: Rtnl, ifindex: int) -> bool:
    """Add a clsact qdisc; returns True when this call created it."""
    return nl.add_clsact(ifindex)


def attach(nl: Rtnl, ifindex: int, parent: str, fd: int, name: str) -> None:
    """Run program `fd` (named `name`) on `parent` (INGRESS or EGRESS) of
    the device, in place of what ran there."""
    nl.replace_bpf_filter(ifindex, _PARENT_NUM[parent], PRIO, HANDLE, fd, name)


def detach(nl: Rtnl, ifindex: int, parent: str) -> None:
    """Remove our filter; a missing device or filter is not an error."""
    try:
        nl.del_bpf_filter(ifindex, _PARENT_NUM[parent], PRIO, HANDLE)
    except NetlinkError as exc:
        if exc.code not in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
            raise


def remove_clsact(nl: Rtnl, ifindex: int) -> None:
    try:
        nl.del_clsact(ifindex)
    except NetlinkError as exc:
        if exc.code not in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
            raise


def filters(ipr: IPRoute, ifindex: int, parent: str) -> list[str]:
    """Names of the bpf programs attached on one side of a netdev."""
    names = []
    try:
        for f in ipr.get_filters(ifindex, parent=_PARENT_NUM[parent]):
            opts = f.get_attr("TCA_OPTIONS")
            if opts:
                name = dict(opts["attrs"]).get("TCA_BPF_NAME")
                if name:
                    names.append(name)
    except NetlinkError as exc:
        if exc.code != errno.ENODEV:
            raise
    return names
