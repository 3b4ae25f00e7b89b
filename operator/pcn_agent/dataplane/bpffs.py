"""The bpffs directory where an agent pins its maps.

`ip netns exec` remounts /sys, hiding a bpffs on /sys/fs/bpf from the
processes it starts; a bpffs mounted under /run stays visible to them. The pin
root is therefore configurable (PCN_BPF_ROOT) and defaults to /run/pcn/bpf.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

BPF_FS_MAGIC = 0xCAFE4A11
DEFAULT_ROOT = Path(os.environ.get("PCN_BPF_ROOT", "/run/pcn/bpf"))


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 112)]


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def is_bpffs(path: Path) -> bool:
    buf = _Statfs()
    if _libc.statfs(str(path).encode(), ctypes.byref(buf)) != 0:
        return False
    f_type = int(buf.f_type)
    return (f_type & 0xFFFFFFFF) == BPF_FS_MAGIC


def ensure_root(root: Path = DEFAULT_ROOT) -> Path:
    """Make `root` a bpffs mount point (idempotent) and return it."""
    root.mkdir(parents=True, exist_ok=True)
    if not is_bpffs(root):
        if _libc.mount(b"bpf", str(root).encode(), b"bpf", 0, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot mount a bpffs on {root} ({os.strerror(err)}); "
                               "run as root, or set PCN_BPF_ROOT to a mounted bpffs")
        log.info("mounted bpffs on %s", root)
    return root


def instance_dir(name: str, root: Path = DEFAULT_ROOT) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"invalid agent instance name {name!r}")
    d = ensure_root(root) / name
    d.mkdir(exist_ok=True)
    return d


def remove_instance(path: Path) -> None:
    """Unpin every object of an instance (unlinking a pin frees the map once
    no program uses it)."""
    if path.exists():
        shutil.rmtree(path)
        log.info("removed pinned objects under %s", path)
