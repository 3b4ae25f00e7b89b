"""containerd 2.x on a node: its config.toml (config version 3) and how
images get in.

Each node's containerd has its own root, state and socket (the node's
/var/lib/containerd and /run/containerd, bind-mounted from the lab's data
folder in the node's mount namespace), NRI disabled (several containerds
on one machine would share /var/run/nri), the overlayfs snapshotter, runc
with cgroupfs (the kubelets use the cgroupfs driver, each under its own
cgroup root), CNI from the node's /opt/cni/bin and /etc/cni/net.d, and
the pause image from the lab's image archives pinned as sandbox image, so
nothing is ever pulled. Plugin names and keys: containerd's
docs/cri/config.md (v2.x, "version = 3").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pcn_lab.cluster.layout import Layout

CRI_IMAGES = "io.containerd.cri.v1.images"
CRI_RUNTIME = "io.containerd.cri.v1.runtime"
NAMESPACE = "k8s.io"  # the CRI plugin's containerd namespace


def can_lower_oom_score() -> bool:
    """Whether this process has CAP_SYS_RESOURCE (capability 24), which
    writing a negative /proc/<pid>/oom_score_adj needs. Some machines (this
    one's sandbox among them) withhold it even from root."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 24 & 1)
    return True


def config(layout: Layout, node: str, pause_ref: str, runc: Path,
           restrict_oom_score_adj: bool = False) -> dict[str, Any]:
    """The node's containerd configuration as a dict (see `to_toml`).

    `restrict_oom_score_adj`: clamp the containers' oom_score_adj to no lower
    than containerd's own, as for rootless containerd. Without
    CAP_SYS_RESOURCE, runc cannot give a critical pod (pcn-agent, CoreDNS:
    kubelet asks -998) a negative score and every such sandbox fails with
    "nsexec: failed to update /proc/self/oom_score_adj: Permission denied"."""
    return {
        "version": 3,
        "root": "/var/lib/containerd",
        "state": "/run/containerd",
        "disabled_plugins": ["io.containerd.nri.v1.nri"],
        "grpc": {"address": "/run/containerd/containerd.sock"},
        "ttrpc": {"address": "/run/containerd/containerd.sock.ttrpc"},
        "debug": {"address": ""},
        "metrics": {"address": ""},
        "plugins": {
            "io.containerd.internal.v1.opt": {"path": str(layout.node_dir(node) / "opt-containerd")},
            CRI_IMAGES: {
                "snapshotter": "overlayfs",
                "pinned_images": {"sandbox": pause_ref},
            },
            CRI_RUNTIME: {
                "enable_selinux": False,
                "restrict_oom_score_adj": restrict_oom_score_adj,
                "containerd": {
                    "default_runtime_name": "runc",
                    "runtimes": {"runc": {
                        "runtime_type": "io.containerd.runc.v2",
                        "options": {"BinaryName": str(runc), "SystemdCgroup": False},
                    }},
                },
                "cni": {"bin_dirs": ["/opt/cni/bin"], "conf_dir": "/etc/cni/net.d"},
            },
        },
    }


def to_toml(data: dict[str, Any]) -> str:
    """TOML of `data`: scalars and lists of scalars first, then one [table]
    per nested dict (dotted, quoted keys where needed)."""
    out: list[str] = []
    _table(data, [], out)
    return "\n".join(out).lstrip("\n") + "\n"


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else f"'{k}'"


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"no TOML for {type(v).__name__}")


def _table(data: dict[str, Any], path: list[str], out: list[str]) -> None:
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    if path and (scalars or not tables):
        out.append("")
        out.append("[" + ".".join(_key(p) for p in path) + "]")
    for k, v in scalars.items():
        out.append(f"{_key(k)} = {_value(v)}")
    for k, v in tables.items():
        _table(v, [*path, k], out)


def import_argv(ctr: Path, socket: Path, archive: Path) -> list[str]:
    """Import one OCI image archive into the CRI's namespace of the containerd
    at `socket` (run from the root namespace: the socket is a file)."""
    return [str(ctr), "--address", str(socket), "--namespace", NAMESPACE, "images", "import",
            str(archive)]


def list_argv(ctr: Path, socket: Path) -> list[str]:
    return [str(ctr), "--address", str(socket), "--namespace", NAMESPACE, "images", "list",
            "--quiet"]


def tag_argv(ctr: Path, socket: Path, source: str, target: str) -> list[str]:
    return [str(ctr), "--address", str(socket), "--namespace", NAMESPACE, "images", "tag",
            "--force", source, target]
