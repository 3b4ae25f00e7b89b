"""tc clsact attachment of the entry programs, with pyroute2.

Filters get an explicit priority and handle and are replaced, not stacked, so
re-attaching (an agent restart, a program upgrade) swaps the program atomically.
"""

from __future__ import annotations

import errno
import logging

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

INGRESS = "ffff:fff2"
EGRESS = "ffff:fff3"
PRIO = 1
HANDLE = ":1"
_PARENT_NUM = {INGRESS: 0xFFFFFFF2, EGRESS: 0xFFFFFFF3}


def ensure_clsact(ipr: IPRoute, ifindex: int) -> bool:
    """Add a clsact qdisc; returns True when this call created it."""
    try:
        ipr.tc("add", "clsact", ifindex)
        return True
    except NetlinkError as exc:
        if exc.code == errno.EEXIST:
            return False
        raise


def attach(ipr: IPRoute, ifindex: int, parent: str, fd: int, name: str) -> None:
    ipr.tc("replace-filter", "bpf", ifindex, HANDLE, fd=fd, name=name, parent=parent,
           classid=1, direct_action=True, prio=PRIO)


def detach(ipr: IPRoute, ifindex: int, parent: str) -> None:
    """Remove our filter; a missing device or filter is not an error."""
    try:
        ipr.tc("del-filter", "bpf", ifindex, HANDLE, parent=parent, prio=PRIO)
    except NetlinkError as exc:
        if exc.code not in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
            raise


def remove_clsact(ipr: IPRoute, ifindex: int) -> None:
    try:
        ipr.tc("del", "clsact", ifindex)
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
