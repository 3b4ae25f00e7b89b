"""Socket-level ClusterIP load balancing: bpf/sock_lb.c on a cgroup v2.

The four programs of sock_lb.c run at the socket system calls of every
process in one cgroup v2 directory (and its descendants): a node's pods. They
translate a ClusterIP:port at connect()/sendmsg() from the node's service
table (the lbrp's pinned lb_services/lb_slots: same map updates, both paths),
and give the ClusterIP back at recvmsg()/getpeername(). Packets of a
translated socket carry the backend's address, so the per-packet lbrp finds
no service in them and lets them through untouched.

Attachment is the legacy BPF_PROG_ATTACH with BPF_F_ALLOW_MULTI, so other
programs on the same cgroup (systemd's, a kubelet's device filters) stay,
and the programs are pinned beside the node's maps in ``<pin_root>/<name>-sock/``
(bpffs takes no dot in a name):
an agent that died leaves them attached, and the next one detaches exactly
those (found by their pins) before attaching its own. An agent that removes
its node detaches them and removes the pins.

Needs Linux 5.18 or later (getpeername hooks 5.8, bpf_get_netns_cookie 5.7,
bpf_set_retval 5.18, which turns a refusal into ECONNREFUSED rather than
EPERM); on an older kernel the load fails, attach() raises and the node's
lbrp translates every connection.

Sources: the kernel's BPF_PROG_TYPE_CGROUP_SOCK_ADDR (include/uapi/linux/
bpf.h, struct bpf_sock_addr; attach types BPF_CGROUP_INET4_CONNECT = 10,
BPF_CGROUP_UDP4_SENDMSG = 14, BPF_CGROUP_UDP4_RECVMSG = 19,
BPF_CGROUP_INET4_GETPEERNAME = 29), Cilium's socket LB (bpf/bpf_sock.c) for
the design.
"""

from __future__ import annotations

import ctypes as ct
import ctypes.util
import errno
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from pcn_agent.dataplane.compiler import BpfModule, compile_cube
from pcn_agent.dataplane.maps import BpfTable, discard

log = logging.getLogger(__name__)

TYPE = "sock_lb"
PROG_TYPE_CGROUP_SOCK_ADDR = 18
BPF_F_ALLOW_MULTI = 2
# program name -> attach type (enum bpf_attach_type)
HOOKS: dict[str, int] = {
    "sock_connect4": 10,
    "sock_sendmsg4": 14,
    "sock_recvmsg4": 19,
    "sock_getpeername4": 29,
}
# Where kubelet puts its pods on cgroup v2 (cgroupDriver systemd, then
# cgroupfs; kubelet's cgroupRoot "/" with cgroupsPerQOS, the default).
KUBELET_POD_CGROUPS = ("kubepods.slice", "kubepods")


class SocketLBError(RuntimeError):
    """Raised when the programs cannot be attached (no cgroup v2, a cgroup
    that is not a directory of it, a kernel without the hooks)."""


@cache
def _libbpf() -> Any:
    lib = ct.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)
    lib.bpf_prog_attach.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.c_uint]
    lib.bpf_prog_attach.restype = ct.c_int
    lib.bpf_prog_detach2.argtypes = [ct.c_int, ct.c_int, ct.c_int]
    lib.bpf_prog_detach2.restype = ct.c_int
    lib.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
    lib.bpf_obj_pin.restype = ct.c_int
    lib.bpf_obj_get.argtypes = [ct.c_char_p]
    lib.bpf_obj_get.restype = ct.c_int
    lib.bpf_prog_query.argtypes = [ct.c_int, ct.c_int, ct.c_uint32, ct.POINTER(ct.c_uint32),
                                   ct.POINTER(ct.c_uint32), ct.POINTER(ct.c_uint32)]
    lib.bpf_prog_query.restype = ct.c_int
    return lib


def attached_programs(cgroup: Path, attach_type: int, limit: int = 64) -> list[int]:
    """The ids of the programs attached to `cgroup` itself (not inherited)
    at `attach_type` (BPF_PROG_QUERY). Raises OSError."""
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ids = (ct.c_uint32 * limit)()
        count = ct.c_uint32(limit)
        flags = ct.c_uint32(0)
        _check(_libbpf().bpf_prog_query(fd, attach_type, 0, ct.byref(flags), ids,
                                        ct.byref(count)), f"query {cgroup}")
        return list(ids[: count.value])
    finally:
        os.close(fd)


def _check(rc: int, what: str) -> None:
    """libbpf returns -errno (and sets errno); raise OSError on failure."""
    if rc < 0:
        err = -rc if rc != -1 else (ct.get_errno() or errno.EIO)
        raise OSError(err, f"{what}: {os.strerror(err)}")


def cgroup2_mount(mounts: Path = Path("/proc/self/mounts")) -> Path:
    """The mount point of the cgroup v2 hierarchy: /sys/fs/cgroup on a
    unified host, /sys/fs/cgroup/unified on a hybrid (systemd's) one.
    Raises SocketLBError when there is none."""
    for line in mounts.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "cgroup2":
            return Path(parts[1])
    raise SocketLBError("no cgroup v2 hierarchy mounted (needed for socket load balancing)")


def kubelet_pods_cgroup(root: Path | None = None) -> Path:
    """The kubelet's pods cgroup on cgroup v2 (every pod's cgroup is below
    it): kubepods.slice (systemd driver) or kubepods (cgroupfs driver) under
    `root` (the host's /sys/fs/cgroup as the agent's container mounts it; a
    hybrid host's v2 tree is its "unified" directory), else under the cgroup
    v2 mount. Raises SocketLBError when none exists."""
    bases = [root, root / "unified"] if root is not None else [cgroup2_mount()]
    for base in bases:
        for name in KUBELET_POD_CGROUPS:
            if (base / name).is_dir():
                return base / name
    raise SocketLBError(f"no kubelet pods cgroup ({' or '.join(KUBELET_POD_CGROUPS)}) "
                        f"under {bases[0]}")


@dataclass
class SocketLB:
    """The socket programs of node `name` attached to `cgroup`.

    pin_dir: the node's instance directory (its lb_services and lb_slots are
    pinned there: the programs must be compiled against the same maps).
    cgroup: a directory of the cgroup v2 hierarchy.
    """

    name: str
    pin_dir: Path
    cgroup: Path
    # the runtime's -D flags (Runtime.defines): the sizes of the service
    # tables it shares with the lbrp
    defines: Mapping[str, int | str] = field(default_factory=dict)
    module: BpfModule | None = field(default=None, repr=False)
    attached: dict[str, int] = field(default_factory=dict)  # program -> fd

    @property
    def prog_dir(self) -> Path:
        """Where the attached programs are pinned (beside the node's maps, in
        a directory the runtime's own cleanup never removes)."""
        return self.pin_dir.parent / f"{self.name}-sock"

    def attach(self) -> SocketLB:
        """Compile and load sock_lb.c, attach the four programs, then detach
        whatever a previous agent of this node left on the cgroup (in that
        order: a connect() meanwhile meets the old programs or the new, never
        none; both at once is harmless, the second finds the backend's
        address in no service). Raises SocketLBError or CompileError
        (nothing of ours left attached then)."""
        if not self.cgroup.is_dir():
            raise SocketLBError(f"cgroup {self.cgroup} does not exist")
        self.module = compile_cube(TYPE, self.pin_dir, self.defines)
        # Affinity choices made while nobody kept them in step with the
        # service table (socket LB off, or between two agents) may name a
        # backend that left, or a service id given to another service.
        affinity = self.table("sock_affinity")
        for key, _ in list(affinity.items()):
            discard(affinity, key)
        fd = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for prog, attach_type in HOOKS.items():
                try:
                    fn = self.module.load_func(prog, PROG_TYPE_CGROUP_SOCK_ADDR, None,
                                               attach_type)
                except Exception as exc:  # bcc raises plain Exception
                    raise OSError(errno.EINVAL, f"load {prog}: {exc}") from exc
                _check(_libbpf().bpf_prog_attach(fn.fd, fd, attach_type, BPF_F_ALLOW_MULTI),
                       f"attach {prog} to {self.cgroup}")
                self.attached[prog] = fn.fd
            self.detach_stale()
            self.prog_dir.mkdir(parents=True, exist_ok=True)
            for prog, pfd in self.attached.items():
                _check(_libbpf().bpf_obj_pin(pfd, str(self.prog_dir / prog).encode()),
                       f"pin {prog}")
        except OSError as exc:
            self.detach()
            raise SocketLBError(str(exc)) from exc
        finally:
            os.close(fd)
        log.info("socket load balancing of %s on cgroup %s", self.name, self.cgroup)
        return self

    def table(self, name: str) -> BpfTable:
        """A map of the attached programs (sock_rev, sock_affinity, or the
        service table they share with the lbrp)."""
        if self.module is None:
            raise SocketLBError("the socket programs are not loaded")
        return self.module[name.encode()]

    def detach_stale(self) -> None:
        """Detach the programs pinned in prog_dir (a previous agent's) from
        the cgroup, and remove the pins."""
        if not self.prog_dir.is_dir():
            return
        cg = _open_dir(self.cgroup)
        try:
            for prog, attach_type in HOOKS.items():
                pin = self.prog_dir / prog
                if not pin.exists():
                    continue
                pfd = _libbpf().bpf_obj_get(str(pin).encode())
                if pfd >= 0:
                    try:
                        if cg is not None:
                            _libbpf().bpf_prog_detach2(pfd, cg, attach_type)
                    finally:
                        os.close(pfd)
        finally:
            if cg is not None:
                os.close(cg)
        shutil.rmtree(self.prog_dir, ignore_errors=True)

    def detach(self) -> None:
        """Detach this agent's programs and remove their pins (idempotent)."""
        cg = _open_dir(self.cgroup)
        try:
            for prog, pfd in list(self.attached.items()):
                if cg is not None:
                    rc = _libbpf().bpf_prog_detach2(pfd, cg, HOOKS[prog])
                    if rc < 0:
                        log.warning("detaching %s from %s: %s", prog, self.cgroup,
                                    os.strerror(-rc))
                del self.attached[prog]
        finally:
            if cg is not None:
                os.close(cg)
        shutil.rmtree(self.prog_dir, ignore_errors=True)
        if self.module is not None:
            self.module.cleanup()
            self.module = None

    def abandon(self) -> None:
        """Forget the programs as a killed agent would: they stay attached
        and pinned for the next agent to replace (closing our descriptors
        detaches nothing: the cgroup holds them)."""
        self.attached.clear()
        if self.module is not None:
            self.module.cleanup()
            self.module = None


def _open_dir(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return None  # the cgroup is gone, and its programs with it
