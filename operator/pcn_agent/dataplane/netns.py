"""Working inside a network namespace from the calling thread.

pyroute2's `IPRoute(netns=...)` forks a helper process to open its socket.
In a process with asyncio signal handlers (the agent, under kopf) the forked
child shares the loop's signal wake-up pipe, and its exit reads as a SIGTERM
to the parent; forking is also slow on the CNI's path. setns(2) on the
calling thread does the same job without a fork: sockets opened while inside
stay bound to that namespace.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns


def netns_path(netns: str) -> str:
    """A namespace name (under /var/run/netns) or a path, as a path."""
    return netns if netns.startswith("/") else f"/var/run/netns/{netns}"


@contextmanager
def entered(netns: str | None) -> Iterator[None]:
    """Run the body with this thread in `netns` (None: stay). A missing
    namespace is an error (FileNotFoundError), never created on the fly.

    The thread's own namespace is saved from /proc/thread-self (pyroute2's
    pushns/popns keep one process-wide stack and read /proc/self, the main
    thread's namespace, which is wrong for any other thread)."""
    if not netns:
        yield
        return
    target = os.open(netns_path(netns), os.O_RDONLY)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        pr_netns.setns(target)
        try:
            yield
        finally:
            pr_netns.setns(home)
    finally:
        os.close(home)
        os.close(target)


def iproute(netns: str | None) -> IPRoute:
    """An rtnetlink socket bound to `netns`, opened without forking."""
    with entered(netns):
        return IPRoute()
