"""Removing a real-cluster lab, also after a crash: what is left is found
by name and marker, not only from the state file.

Order (each step idempotent; the result says what was removed):

1. processes: pid files, every process whose environment carries the
   lab's marker (daemons, holders, relay, containerd's shims), every
   process in one of the nodes' cgroups (containers) or network namespaces;
   SIGTERM, SIGKILL after a grace period;
2. mounts in the root mount namespace under the data folder (there should
   be none: every node mounts in its own namespace, which ends with its
   last process);
3. the network namespaces ``<prefix>-*`` (nodes, switch, external host;
   their veths and the pods' go with them);
4. the nodes' cgroups, deepest first;
5. the data folder, the mount points `up` created, the kernel settings the
   kubelets changed (restored to what they were).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import netns as pr_netns

from pcn_lab.cluster import node as nodemod
from pcn_lab.cluster import runner
from pcn_lab.cluster.layout import Layout
from pcn_lab.cluster.state import ClusterState

# what kubelet's container manager sets (setupKernelTunables, protectKernelDefaults false)
KUBELET_SYSCTLS = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic",
                   "kernel/panic_on_oops", "kernel/keys/root_maxkeys",
                   "kernel/keys/root_maxbytes")


@dataclass
class Teardown:
    """What `down` needs besides the layout (from the state file; empty after
    a crash that lost it)."""

    layout: Layout
    created_mountpoints: list[str] = field(default_factory=list)
    sysctls: dict[str, str] = field(default_factory=dict)


def host_sysctls(others: list[ClusterState]) -> dict[str, str]:
    """The host's values of KUBELET_SYSCTLS before any kubelet of ours
    changed them: another cluster still up recorded them (the host's values
    now are its kubelets'), else they are the values now."""
    for o in others:
        if o.sysctls:
            return dict(o.sysctls)
    return read_sysctls()


def read_sysctls() -> dict[str, str]:
    out = {}
    for key in KUBELET_SYSCTLS:
        try:
            out[key] = (Path("/proc/sys") / key).read_text().strip()
        except OSError:
            continue
    return out


def mounts_under(mountinfo: str, root: Path) -> list[str]:
    """Mount points at or below `root` in a mountinfo text, deepest first."""
    points = []
    r = str(root).rstrip("/")
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4:
            p = fields[4].replace("\\040", " ")
            if p == r or p.startswith(r + "/"):
                points.append(p)
    return sorted(set(points), key=lambda p: -p.count("/"))


def namespaces(prefix: str) -> list[str]:
    return sorted(ns for ns in pr_netns.listnetns() if ns.startswith(f"{prefix}-"))


def lab_cgroups(prefix: str) -> list[Path]:
    """Every node cgroup of the lab in every hierarchy (found by name): the v1
    ones the nodes' cgroup roots are made in, and the unified (v2) one of a
    hybrid machine, where runc puts every container's cgroup at the same path
    too (each real-cluster run left its three there, empty, unnoticed)."""
    cgroups = nodemod.cgroup_mounts(Path("/proc/self/mountinfo").read_text())
    return sorted(d for cg in cgroups
                  for d in Path(cg.path).glob(f"{prefix}-n*") if d.is_dir())


def processes(layout: Layout) -> set[int]:
    pids: set[int] = set(runner.marked(layout.prefix))
    if layout.pids.is_dir():
        for f in layout.pids.glob("*.pid"):
            try:
                pids.add(int(f.read_text()))
            except (OSError, ValueError):
                pass
    for d in lab_cgroups(layout.prefix):
        pids |= nodemod.cgroup_pids(d)
    for ns in namespaces(layout.prefix):
        r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                           timeout=10)
        pids.update(int(p) for p in r.stdout.split() if p.isdigit())
    return {p for p in pids if runner.alive(p)}


def leftovers(layout: Layout) -> list[str]:
    """Anything of the lab still present (empty after a clean `down`)."""
    left = [f"process {p}" for p in sorted(processes(layout))]
    left += [f"mount {m}" for m in mounts_under(Path("/proc/self/mountinfo").read_text(),
                                               layout.data)]
    left += [f"netns {n}" for n in namespaces(layout.prefix)]
    left += [f"cgroup {c}" for c in lab_cgroups(layout.prefix)]
    if layout.data.exists():
        left.append(f"dir {layout.data}")
    return left


def remove(td: Teardown, others: list[ClusterState] | None = None) -> list[str]:
    """Remove everything of the lab; returns what was removed, one line each.
    With `others` (clusters still up on this machine) the host's shared
    things stay for the last one to go: the mount points this cluster made
    in the root file system (removing one that another cluster's nodes
    mount over detaches their binds, Linux 3.18 and later: their kubelets
    and containerds then share the host's folders) are handed over to it,
    and the host's sysctls are left as its kubelets want them."""
    layout = td.layout
    removed: list[str] = []
    for _ in range(3):  # a dying containerd may still start a shim: look again
        pids = processes(layout)
        if not pids:
            break
        killed = runner.kill_all(pids)
        removed += [f"process {p}" for p in killed]
    for m in mounts_under(Path("/proc/self/mountinfo").read_text(), layout.data):
        if subprocess.run(["umount", "-l", m], capture_output=True).returncode == 0:
            removed.append(f"mount {m}")
    for ns in namespaces(layout.prefix):
        try:
            pr_netns.remove(ns)
            removed.append(f"netns {ns}")
        except OSError:
            pass
    gone: dict[str, int] = {}
    for d in lab_cgroups(layout.prefix):
        left: list[str] = []
        for _ in range(20):  # processes just killed leave their cgroup a little later
            left = nodemod.remove_cgroup_tree(d)
            if not left:
                break
            time.sleep(0.2)
        if left:
            removed.append(f"cgroup {d} (could not remove {left})")
        else:
            gone[d.name] = gone.get(d.name, 0) + 1
    removed += [f"cgroup /{name} (in {n} hierarchies)" for name, n in sorted(gone.items())]
    if layout.data.exists():
        shutil.rmtree(layout.data, ignore_errors=True)
        removed.append(f"dir {layout.data}")
    if others:
        heir = others[0]
        heir.created_mountpoints = sorted(set(heir.created_mountpoints)
                                          | set(td.created_mountpoints))
        heir.save()
        removed.append(f"nothing of the host's (mount points, sysctls): cluster "
                       f"{heir.layout.prefix} is still up and removes them when it goes")
        return removed
    for point in reversed(td.created_mountpoints):
        try:
            Path(point).rmdir()
            removed.append(f"mount point {point}")
        except OSError:
            pass
    for key, value in td.sysctls.items():
        f = Path("/proc/sys") / key
        try:
            if f.read_text().strip() != value:
                f.write_text(value)
                removed.append(f"sysctl {key.replace('/', '.')} restored to {value}")
        except OSError:
            pass
    return removed
