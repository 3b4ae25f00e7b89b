"""Per-node cgroups of a lab run: the processes of a node's pods live in
``<cgroup v2 mount>/<run prefix>/<node>/``, where that node's socket load
balancer is attached, so one node's programs never see another node's pods
(on a real node the agent attaches to the kubelet's pods cgroup instead).

A process enters its cgroup before it execs the pod's command: the wrapper
``sh -c 'echo 0 > DIR/cgroup.procs && exec "$@"'`` writes "0" (the writer
itself, cgroup v2's cgroup.procs semantics) from the shell, then execs; every
socket the command creates then belongs to the node's cgroup. `close()`
moves any process still there to the hierarchy's root and removes the
directories.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from pcn_agent.dataplane.socklb import cgroup2_mount

log = logging.getLogger(__name__)

_ENTER = 'echo 0 > "$0/cgroup.procs" && exec "$@"'


def enter_argv(cgroup: Path, argv: list[str]) -> list[str]:
    """`argv` run inside `cgroup` (a cgroup v2 directory): a shell moves
    itself there, then execs it (the pid and the process stay the same)."""
    return ["sh", "-c", _ENTER, str(cgroup), *argv]


@dataclass
class LabCgroups:
    """The cgroup tree of one lab run: `name` is the run's unique prefix."""

    name: str
    root: Path = field(default_factory=cgroup2_mount)
    created: list[Path] = field(default_factory=list)

    @property
    def top(self) -> Path:
        return self.root / self.name

    def node(self, node: str) -> Path:
        """Node `node`'s cgroup, created on first use."""
        if not node or "/" in node or node.startswith("."):
            raise ValueError(f"invalid node name {node!r}")
        for path in (self.top, self.top / node):
            if not path.is_dir():
                path.mkdir()
                self.created.append(path)
        return self.top / node

    def wrap(self, node: str, argv: list[str]) -> list[str]:
        """`argv` run inside node `node`'s cgroup (a shell enters it, then execs)."""
        return enter_argv(self.node(node), argv)

    def close(self) -> None:
        """Move the processes left in the tree to the root cgroup and remove
        the directories (idempotent). Raises OSError when one cannot go."""
        errors: list[OSError] = []
        for path in reversed(self.created):
            if not path.is_dir():
                continue
            try:
                for pid in (path / "cgroup.procs").read_text().split():
                    try:
                        (self.root / "cgroup.procs").write_text(pid)
                    except ProcessLookupError:
                        pass  # exited meanwhile
                os.rmdir(path)
            except OSError as exc:
                errors.append(exc)
                log.warning("cannot remove cgroup %s: %s", path, exc)
        self.created.clear()
        if errors:
            raise errors[0]

    def leftovers(self) -> list[str]:
        return [str(self.top)] if self.top.exists() else []
