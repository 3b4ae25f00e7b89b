"""What pcn's programs cost under real traffic, a figure that stays put on a
busy machine: the kernel's own run-time statistics of BPF programs
(BPF_ENABLE_STATS with BPF_STATS_RUN_TIME, Linux >= 5.8: while the returned
fd is open every program run is timed with sched_clock around the program,
kernel/bpf/syscall.c and include/linux/filter.h bpf_prog_run), read from a
lab's entry programs (bpf_prog_info run_time_ns and run_cnt) before and
after one iperf3 run.

The entry programs are the only programs attached to netdevs; every cube a
packet meets is reached from them by tail calls, whose time counts for the
program that ran first. So `pcn_ingress` of a node is the whole walk of
every packet that entered one of its netdevs (a pod's veth, the NIC, the
VXLAN device), its cubes and the redirect helper's bookkeeping included;
`pcn_egress` the NIC's egress cubes (the k8sdispatcher). What the kernel
does after a program returns (the redirect itself, the VXLAN device's
encapsulation, the veth) is not in these figures.

Turning the statistics on costs every program on the machine two clock
reads per run while the fd is open: the run measured here is a separate one,
never one of the throughput runs.
"""

from __future__ import annotations

import ctypes as ct
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pcn_lab.topology import Lab
from pcn_testsupport import testrun

from .cubecost import prog_info

BPF_STATS_RUN_TIME = 0  # enum bpf_stats_type, include/uapi/linux/bpf.h
ENTRY_PROGRAMS = ("pcn_ingress", "pcn_egress")


@contextmanager
def stats_enabled() -> Iterator[None]:
    """BPF run-time statistics on for the body (libbpf's bpf_enable_stats;
    the kernel turns them off again when the last such fd is closed).
    OSError with the errno when the kernel refuses (EINVAL before 5.8,
    EPERM without CAP_SYS_ADMIN)."""
    lib = testrun._libbpf()
    fn = lib.bpf_enable_stats
    fn.argtypes = [ct.c_int]
    fn.restype = ct.c_int
    fd = fn(BPF_STATS_RUN_TIME)
    if fd < 0:
        err = ct.get_errno() or -fd  # libbpf 1.x: -errno, and errno set
        raise OSError(err, f"bpf_enable_stats: {os.strerror(err)}")
    try:
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ProgramLoad:
    """One entry program's runs during the measured run."""

    node: str
    program: str  # "pcn_ingress" or "pcn_egress"
    runs: int
    ns: int  # total run time, ns

    @property
    def ns_per_run(self) -> float:
        return self.ns / self.runs if self.runs else 0.0


@dataclass(frozen=True)
class Load:
    """pcn's programs during one iperf3 run of `gbps` over `seconds` of wall
    time (the run's warm-up second included: the programs ran then too)."""

    programs: tuple[ProgramLoad, ...]
    seconds: float
    gbps: float

    @property
    def total_ns(self) -> int:
        return sum(p.ns for p in self.programs)

    @property
    def cpu_share(self) -> float:
        """CPUs the programs kept busy on average (0.06: 6 % of one CPU)."""
        return self.total_ns / (self.seconds * 1e9) if self.seconds else 0.0

    @property
    def ns_per_mbyte(self) -> float:
        """Program run time per MB (10^6 bytes) of TCP payload received, both
        nodes and both directions (the ACKs' runs included)."""
        mbytes = self.gbps * 1e9 / 8 * self.seconds / 1e6
        return self.total_ns / mbytes if mbytes else 0.0

    def as_extra(self) -> dict[str, object]:
        """The figures as a Result's extra."""
        return {"bpf_cpu_share": round(self.cpu_share, 4),
                "bpf_ns_per_mbyte": round(self.ns_per_mbyte, 1),
                "bpf_gbps_during": round(self.gbps, 3),
                "bpf_programs": [{"node": p.node, "program": p.program, "runs": p.runs,
                                  "ns_per_run": round(p.ns_per_run, 1)}
                                 for p in self.programs],
                "bpf_method": "BPF_ENABLE_STATS run_time_ns/run_cnt of the entry programs "
                              "(their tail calls included) over one separate iperf3 run"}

    def summary(self) -> str:
        per = ", ".join(f"{p.node} {p.program} {p.runs} x {p.ns_per_run:.0f} ns"
                        for p in self.programs if p.runs)
        return (f"BPF under load at {self.gbps:.2f} Gbit/s: {per}; "
                f"{self.cpu_share * 100:.1f}% of one CPU, {self.ns_per_mbyte:.0f} ns per MB")


def _snapshot(lab: Lab) -> dict[tuple[str, str], tuple[int, int]]:
    """(node, program) -> (run_cnt, run_time_ns) of every node's entry programs."""
    out = {}
    for name, node in lab.nodes.items():
        fds = node.rt._entry_fds
        for prog in ENTRY_PROGRAMS:
            if prog in fds:
                info = prog_info(fds[prog])
                out[(name, prog)] = (info.run_cnt, info.run_time_ns)
    return out


def measure(lab: Lab, run: Callable[[], float]) -> Load:
    """Run `run` (returns Gbit/s) with the statistics on and return what
    the lab's entry programs did meanwhile. OSError from stats_enabled."""
    with stats_enabled():
        before = _snapshot(lab)
        t = time.monotonic()
        gbps = run()
        seconds = time.monotonic() - t
        after = _snapshot(lab)
    progs = tuple(ProgramLoad(node, prog, after[(node, prog)][0] - cnt,
                              after[(node, prog)][1] - ns)
                  for (node, prog), (cnt, ns) in sorted(before.items())
                  if (node, prog) in after)
    return Load(progs, seconds, gbps)
