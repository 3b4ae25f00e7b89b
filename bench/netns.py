"""Network namespaces owned by one benchmark run.

Every namespace the references create is named `pcnb-<run id>-...` and is
registered in a `Namespaces` set so that teardown (also on Ctrl-C) removes all
of them and the run can check that none is left.
"""

from __future__ import annotations

import logging
import secrets
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from pcn_lab.cgroups import enter_argv

log = logging.getLogger(__name__)

PREFIX = "pcnb"


def new_run_prefix() -> str:
    return f"{PREFIX}-{secrets.token_hex(3)}"


# Namespaces whose commands run in a cgroup: a pcn lab pod whose node has
# socket load balancing, which only sees the processes of the node's cgroup
# (pcn_lab.cgroups). Set with in_cgroup(), for the scenario that needs it.
_CGROUP_OF: dict[str, Path] = {}


def in_cgroup(netns: str, cgroup: Path | None) -> None:
    """Run the commands of `netns` inside `cgroup` from now on (None: no longer)."""
    if cgroup is None:
        _CGROUP_OF.pop(netns, None)
    else:
        _CGROUP_OF[netns] = cgroup


def _argv(netns: str, argv: Sequence[str]) -> list[str]:
    full = ["ip", "netns", "exec", netns, *argv]
    cgroup = _CGROUP_OF.get(netns)
    return enter_argv(cgroup, full) if cgroup is not None else full


def exec_in(netns: str, argv: Sequence[str], timeout: float = 60, check: bool = True,
            env: dict[str, str] | None = None,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_argv(netns, argv), capture_output=True, text=True,
                          timeout=timeout, check=check, env=env, input=stdin)


def popen_in(netns: str, argv: Sequence[str]) -> subprocess.Popen[str]:
    # `ip netns exec` (and the cgroup's shell) exec the command: the Popen
    # pid is the command itself.
    return subprocess.Popen(_argv(netns, argv), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen[Any], timeout: float = 5) -> None:
    """Terminate one process this run started (by its own Popen handle)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
    else:
        proc.communicate()


def existing(prefixes: Sequence[str]) -> list[str]:
    return sorted(ns for ns in pr_netns.listnetns() if ns.startswith(tuple(prefixes)))


class Namespaces:
    """The namespaces of one run: created with `lo` up, removed in reverse order."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._names: list[str] = []

    def create(self, suffix: str) -> str:
        name = f"{self.prefix}-{suffix}"
        pr_netns.create(name)
        self._names.append(name)
        with IPRoute(netns=name) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        return name

    def remove(self, name: str) -> None:
        if name in self._names:
            self._names.remove(name)
        try:
            pr_netns.remove(name)
        except OSError as exc:
            log.warning("could not remove namespace %s: %s", name, exc)

    def remove_all(self) -> None:
        for name in reversed(list(self._names)):
            self.remove(name)
