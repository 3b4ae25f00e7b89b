"""A node's own world on the shared machine: its mount plan (what the
holder process mounts in the node's mount namespace) and its cgroups.

The holder is started with ``ip netns exec <node> ...``, which already
unshares the mount namespace, makes / a slave (nothing mounted inside
reaches the root namespace) and mounts a sysfs of the node's network
namespace over /sys, which hides the machine's /sys/fs/cgroup and
/sys/fs/bpf. The plan then:

1. bind-mounts the node's folders of the lab's data folder over
   /var/lib/kubelet, /var/lib/containerd, /run/containerd, ... (layout's
   NODE_BINDS), /var/lib/kubelet and /run/netns made rshared (kubelet's
   volume mounts and containerd's pod namespaces must reach the containers:
   the agent opens CNI_NETNS for pcn-cni's launcher);
2. mounts a fresh bpffs on /sys/fs/bpf, shared (the agent's DaemonSet
   mounts it with Bidirectional propagation);
3. mounts the machine's cgroup hierarchies again under /sys/fs/cgroup as
   /proc/1/mountinfo lists them (mounting a v1 hierarchy with the same
   options gives the same hierarchy, as container runtimes do).

Mount points missing on the machine (/opt/pcn, /var/lib/containerd, ...)
are created as empty folders beforehand by `create_mountpoints` (the only
trace in the root file system; `down` removes the ones it created).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pcn_lab.cluster.layout import NODE_BINDS, RSHARED, Layout

CGROUP_FS = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class CgroupMount:
    """One cgroup hierarchy as mounted on the machine."""

    path: str  # mount point, e.g. /sys/fs/cgroup/cpu
    fstype: str  # "cgroup" (v1) or "cgroup2"
    options: str  # what to pass to mount -o, e.g. "cpu" or "none,name=systemd"

    @property
    def v1(self) -> bool:
        return self.fstype == "cgroup"


def cgroup_mounts(mountinfo: str) -> list[CgroupMount]:
    """The cgroup hierarchies mounted under /sys/fs/cgroup, from a
    /proc/<pid>/mountinfo text (proc(5): fields, " - ", fstype, source, super
    options)."""
    found = []
    for line in mountinfo.splitlines():
        pre, sep, post = line.partition(" - ")
        if not sep:
            continue
        fields, tail = pre.split(), post.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        point, fstype, super_opts = fields[4], tail[0], tail[2]
        if fstype not in ("cgroup", "cgroup2") or not point.startswith(f"{CGROUP_FS}/"):
            continue
        opts = [o for o in super_opts.split(",") if o not in ("rw", "ro")]
        if fstype == "cgroup":
            ctls = [o for o in opts if o != "xattr" and not o.startswith("release_agent")]
            if ctls and all(o.startswith("name=") for o in ctls):
                ctls = ["none", *ctls]
            options = ",".join(ctls)
        else:
            options = ",".join(o for o in opts if o in ("nsdelegate", "memory_recursiveprot"))
        found.append(CgroupMount(point, fstype, options))
    return found


def mount_plan(layout: Layout, node: str, cgroups: list[CgroupMount]) -> list[list[str]]:
    """The commands the node's holder runs, in order, in the node's fresh
    mount namespace (see the module's doc)."""
    plan: list[list[str]] = []
    for point, _sub in NODE_BINDS:
        src = layout.node_path(node, point)
        plan.append(["mount", "--bind", str(src), point])
        if point in RSHARED:
            plan.append(["mount", "--make-rshared", point])
    plan.append(["mount", "-t", "bpf", "bpffs", "/sys/fs/bpf"])
    plan.append(["mount", "--make-shared", "/sys/fs/bpf"])
    if cgroups:
        plan.append(["mount", "-t", "tmpfs", "-o", "mode=755,nosuid,nodev,noexec", "cgroup",
                     str(CGROUP_FS)])
        for cg in cgroups:
            plan.append(["mkdir", "-p", cg.path])
            args = ["mount", "-t", cg.fstype]
            if cg.options:
                args += ["-o", cg.options]
            plan.append([*args, cg.fstype, cg.path])
    return plan


def node_folders(layout: Layout, node: str) -> list[Path]:
    """The node's folders in the data folder (bind sources and its config)."""
    return [layout.node_path(node, p) for p, _ in NODE_BINDS] + [
        layout.config_dir(node), layout.node_dir(node) / "opt-containerd"]


def create_mountpoints() -> list[str]:
    """Create the NODE_BINDS mount points missing on the machine; returns the
    ones created (deepest last)."""
    made = []
    for point, _ in NODE_BINDS:
        p = Path(point)
        missing = []
        while not p.exists():
            missing.append(p)
            p = p.parent
        for m in reversed(missing):
            m.mkdir()
            made.append(str(m))
    return made


def cgroup_dirs(layout: Layout, node: str, cgroups: list[CgroupMount]) -> list[Path]:
    """The node's cgroup root in every v1 hierarchy (kubelet's cgroupfs
    driver uses v1 only on a v1 host)."""
    root = layout.cgroup_root(node).lstrip("/")
    return [Path(cg.path) / root for cg in cgroups if cg.v1]


def create_cgroups(dirs: list[Path]) -> None:
    """Make the node's cgroup roots; a new v1 cpuset has no CPUs or memory
    nodes until given its parent's."""
    for d in dirs:
        d.mkdir(exist_ok=True)
        if (d / "cpuset.cpus").exists():
            for f in ("cpuset.cpus", "cpuset.mems"):
                if not (d / f).read_text().strip():
                    (d / f).write_text((d.parent / f).read_text())


def cgroup_pids(d: Path) -> set[int]:
    """Every process in the cgroup `d` and below."""
    pids: set[int] = set()
    if not d.is_dir():
        return pids
    for procs in d.rglob("cgroup.procs"):
        try:
            pids.update(int(x) for x in procs.read_text().split())
        except OSError:
            continue
    return pids


def remove_cgroup_tree(d: Path) -> list[str]:
    """rmdir `d` and its children, deepest first (a cgroup folder is removed
    with rmdir, never by deleting its files); returns what is left."""
    if not d.is_dir():
        return []
    left = []
    for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        try:
            sub.rmdir()
        except OSError:
            left.append(str(sub))
    try:
        d.rmdir()
    except OSError:
        left.append(str(d))
    return left
