"""Figures that stay put on a noisy machine: what each eBPF program costs per
packet (BPF_PROG_TEST_RUN, the kernel's own clock around the program, no
scheduler, no wire) and how big it is (bpf_prog_info).

* `prog_info(fd)`: the kernel's view of a loaded program
  (BPF_OBJ_GET_INFO_BY_FD through libbpf's `bpf_obj_get_info_by_fd`, struct
  bpf_prog_info of include/uapi/linux/bpf.h): its name, `xlated_insns` (the
  instructions after the verifier's rewrites, xlated_prog_len / 8),
  `jited_bytes` (native code) and `verified_insns` (instructions the verifier
  walked, Linux >= 5.16; 0 before), and the kernel's run-time statistics
  `run_time_ns` and `run_cnt` (counted only while BPF_ENABLE_STATS is on,
  bench.bpfload).
* `ns_per_packet(...)`: the cost of one run of a SCHED_CLS program on one
  frame, in ns. BPF_PROG_TEST_RUN with `repeat` N runs the program N times
  on the same skb and reports the mean time per run (net/bpf/test_run.c,
  bpf_test_timer_leave): exact when every run takes the same path, which is
  not so for a program that rewrites the frame (the lbrp's DNAT: the second
  run would see the backend's address). So the frame is first run alone
  until its verdict is steady (a first packet may wait for the slow path's
  ARP), then: when that run leaves the frame as it was, the repeated runs
  are equivalent and the figure is the median over `rounds` of the mean of
  `repeat` runs ("repeat"); else it is the median of `rounds` x min(`repeat`,
  1000) single runs ("single", each including the timer's own overhead of a
  few tens of ns).

Tail calls run inside a test run: a cube's figure includes what it
tail-calls on that packet's path (the lbrp on a pod's port continues to the
bridge). The scenario (`cube_cost`) therefore measures each path's entry
program and each cube on its own, so the differences show every cube's share.
A packet to a pod is delivered into the pod's eth0 (bpf_redirect_peer) by the
walk that started at tc ingress, which runs the destination port's egress
cubes itself; `veth-egress` is the destination veth's tc egress entry program
with those cubes, which every such packet also ran while delivery went out of
the veth's host end (bpf_redirect) and only flooded copies run now: the sum
of `entry>bridge` and `veth-egress` then is comparable with `entry>bridge`
now. What the kernel saves besides (the host end's transmit and a pass
through the backlog queue) is not in any of these figures.
"""

from __future__ import annotations

import ctypes as ct
import statistics
import struct
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyroute2 import netns as pr_netns

from pcn_agent.dataplane import maps
from pcn_agent.node import wiring
from pcn_testsupport import frames, testrun
from pcn_testsupport.frames import TCP_ACK, TCP_SYN

from .results import Result, now_iso

if TYPE_CHECKING:  # scenarios imports bench.bpfload, which reads prog_info from here
    from .scenarios import Context

BPF_PROG_INFO_SIZE = 232  # bytes of struct bpf_prog_info up to verified_insns (Linux 6.x)
# offsets in struct bpf_prog_info (include/uapi/linux/bpf.h)
_OFF_JITED_LEN, _OFF_XLATED_LEN, _OFF_NAME, _OFF_VERIFIED = 16, 20, 64, 216
_OFF_RUN_TIME = 192  # run_time_ns, then run_cnt (u64 each)
BPF_INSN_SIZE = 8
STEADY_TRIES, STEADY_WAIT_S = 20, 0.1  # a frame's verdict must settle within 2 s


@dataclass(frozen=True)
class ProgInfo:
    """A loaded program as the kernel describes it."""

    name: str  # the kernel's name (first 15 characters of the function's)
    prog_id: int
    xlated_insns: int  # instructions after the verifier's rewrites
    jited_bytes: int  # native code size
    verified_insns: int  # instructions the verifier processed (0: kernel too old)
    # the kernel's statistics of the program's runs, while BPF_ENABLE_STATS is
    # on (kernel/bpf/syscall.c: bpf_prog_get_stats); a tail-called program's
    # time counts for the program that ran first
    run_time_ns: int = 0
    run_cnt: int = 0


def parse_prog_info(raw: bytes) -> ProgInfo:
    """Decode the fields used here from a struct bpf_prog_info buffer."""
    if len(raw) < _OFF_VERIFIED + 4:
        raise ValueError(f"struct bpf_prog_info needs {_OFF_VERIFIED + 4} bytes, got {len(raw)}")
    prog_id = struct.unpack_from("=I", raw, 4)[0]
    jited, xlated = struct.unpack_from("=II", raw, _OFF_JITED_LEN)
    name = raw[_OFF_NAME:_OFF_NAME + 16].split(b"\0", 1)[0].decode(errors="replace")
    verified = struct.unpack_from("=I", raw, _OFF_VERIFIED)[0]
    run_time, run_cnt = struct.unpack_from("=QQ", raw, _OFF_RUN_TIME)
    return ProgInfo(name, prog_id, xlated // BPF_INSN_SIZE, jited, verified, run_time, run_cnt)


def prog_info(fd: int) -> ProgInfo:
    """bpf_prog_info of the program behind `fd`. Raises OSError with the errno."""
    lib = testrun._libbpf()
    fn = lib.bpf_obj_get_info_by_fd
    fn.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
    fn.restype = ct.c_int
    buf = ct.create_string_buffer(BPF_PROG_INFO_SIZE)
    size = ct.c_uint32(BPF_PROG_INFO_SIZE)
    ret = fn(fd, buf, ct.byref(size))
    if ret != 0:
        err = -ret if ret < 0 else ct.get_errno()
        raise OSError(err, f"bpf_obj_get_info_by_fd({fd}) failed")
    return parse_prog_info(buf.raw[:max(size.value, _OFF_VERIFIED + 4)])


@contextmanager
def inside(netns: str | None) -> Iterator[None]:
    """Run the body in `netns` (test runs resolve ifindexes in the calling
    thread's namespace); None: stay."""
    if netns is None:
        yield
        return
    pr_netns.pushns()
    try:
        pr_netns.setns(netns, flags=0)  # never creates one
        yield
    finally:
        pr_netns.popns()


@dataclass(frozen=True)
class Cost:
    ns: float  # median ns per run
    method: str  # "repeat" (mean of `repeat` runs on one skb) or "single"
    retval: int  # the program's verdict on the frame (TC_ACT_*)
    samples: tuple[float, ...]  # per round: mean ns (repeat) or single-run ns


def ns_per_packet(fd: int, frame: bytes, *, cb: Sequence[int] = (), ifindex: int = 0,
                  netns: str | None = None, repeat: int = 10000, rounds: int = 7) -> Cost:
    """What one run of the SCHED_CLS program `fd` on `frame` costs (see the
    module's docstring for "repeat" against "single"). Raises OSError from
    the test run (ENODEV: `ifindex` is not a device of `netns`)."""
    if repeat < 1 or rounds < 1:
        raise ValueError("repeat and rounds must be positive")
    with inside(netns):
        once = testrun.run_sched_cls(fd, frame, cb=cb, ifindex=ifindex)
        for _ in range(STEADY_TRIES):
            time.sleep(STEADY_WAIT_S)
            again = testrun.run_sched_cls(fd, frame, cb=cb, ifindex=ifindex)
            if (again.retval, again.data) == (once.retval, once.data):
                break
            once = again
        if once.data == frame:
            samples = [float(testrun.run_sched_cls(fd, frame, cb=cb, ifindex=ifindex,
                                                   repeat=repeat).duration_ns)
                       for _ in range(rounds)]
            return Cost(statistics.median(samples), "repeat", once.retval, tuple(samples))
        singles = [float(testrun.run_sched_cls(fd, frame, cb=cb, ifindex=ifindex).duration_ns)
                   for _ in range(rounds * min(repeat, 1000))]
        per_round = [statistics.median(singles[i::rounds]) for i in range(rounds)]
        return Cost(statistics.median(singles), "single", once.retval, tuple(per_round))


# --- frames ---


def tcp_frame(src_mac: str, dst_mac: str, src: str, dst: str, sport: int, dport: int,
              flags: int, payload: int = 64) -> bytes:
    """Ethernet + IPv4 (no options, DF) + TCP (no options) carrying `payload`
    zero bytes, both checksums right."""
    seg = frames.tcp(src, dst, sport, dport, flags, seq=1000,
                     ack=1 if flags & TCP_ACK else 0, data=bytes(payload))
    return frames.eth(dst_mac, src_mac, frames.ETH_P_IP,
                      frames.ipv4(src, dst, frames.IPPROTO_TCP, seg), pad=False)


# --- the scenario ---

CUBE_COST = "cube-cost"
COST_VIP, COST_PORT, COST_TARGET = "10.96.0.50", 80, 8080
HOOK_CTX_CUBE = 0  # PCN_CTX_CUBE (bpf/include/pcn_chain.h): run from the entry or a cube


def cube_cost(ctx: Context) -> list[Result]:
    """ns/packet of the programs on a pod's three main paths (to a pod of its
    node, to a ClusterIP, to a pod of the other node) and the size of every
    program a node loads, in a two-node lab with one Service."""
    results: list[Result] = []
    with ExitStack() as st:
        lab = ctx.lab(st, nodes=2, pods=2)
        node = lab.node(1)
        lab.set_service(COST_VIP, COST_PORT, "tcp", [lab.backend("n1p2", COST_TARGET)])
        p1, p2 = node.pods["n1p1"], node.pods["n1p2"]
        remote_ip = lab.pods["n2p1"].ip
        rt = node.rt
        gw_mac = rt.port(wiring.ROUTER, "pods").mac
        ifindex = rt.ifindex(p1.iface.host_ifname)
        ifindex2 = rt.ifindex(p2.iface.host_ifname)
        ip1 = p1.iface.address.split("/")[0]
        ip2 = p2.iface.address.split("/")[0]
        to_pod = tcp_frame(p1.iface.mac, p2.iface.mac, ip1, ip2, 40000, COST_TARGET, TCP_ACK)
        syn = tcp_frame(p1.iface.mac, gw_mac, ip1, COST_VIP, 40001, COST_PORT, TCP_SYN)
        to_svc = tcp_frame(p1.iface.mac, gw_mac, ip1, COST_VIP, 40001, COST_PORT, TCP_ACK)
        to_remote = tcp_frame(p1.iface.mac, gw_mac, ip1, remote_ip, 40002, COST_TARGET, TCP_ACK)
        router_in = rt.port(wiring.ROUTER, "pods").id
        assert node.lb is not None
        lb_cb = [p1.port.id, maps.HOOK_INGRESS | 0 << 8 | HOOK_CTX_CUBE << 16, node.lb.cube.id]
        entry = rt._entry_fds["pcn_ingress"]
        with inside(rt.netns):  # the connection's session, as its SYN would leave it
            testrun.run_sched_cls(entry, syn, ifindex=ifindex)
        runs = [
            ("entry>bridge", entry, to_pod, [], ifindex, "pod -> pod, same node: the pod "
             "veth's tc ingress entry program, its (empty of services) lbrp hook, the bridge, "
             "the destination port's egress hook (its lbrp) and the delivery into the "
             "destination pod's eth0"),
            ("veth-egress", rt._entry_fds["pcn_egress"], to_pod, [], ifindex2,
             "pod -> pod, same node: the destination veth's tc egress entry program and its "
             "lbrp hook; on every packet's path while delivery went out of the host end of "
             "the pod's veth (bpf_redirect), on flooded copies only since it goes into the "
             "pod's eth0 (bpf_redirect_peer, whose walk runs that hook itself)"),
            ("bridge", rt.types["bridge"].fd, to_pod, [p1.port.id], ifindex,
             "pod -> pod, same node: the bridge alone"),
            ("entry>lbrp>bridge", entry, to_svc, [], ifindex, "pod -> ClusterIP, "
             "established: entry program, lbrp (session hit, DNAT), then what delivers it to "
             "the backend"),
            ("entry>bridge>router", entry, to_remote, [], ifindex, "pod -> pod on the other "
             "node: entry program, lbrp hook, bridge, router to the VXLAN device"),
            ("router", rt.types["router"].fd, to_remote, [router_in], ifindex,
             "pod -> pod on the other node: the router alone, from its port to the pods"),
            ("lbrp>bridge", rt.types["lbrp"].fd, to_svc, lb_cb, ifindex,
             "pod -> ClusterIP, established: the lbrp as the pod port's hook runs it, then "
             "what it tail-calls to deliver to the backend"),
        ]
        for name, fd, frame, cb, dev, what in runs:
            cost = ns_per_packet(fd, frame, cb=cb, ifindex=dev, netns=rt.netns,
                                 repeat=COST_REPEAT, rounds=COST_ROUNDS)
            ctx.progress(f"{CUBE_COST}/{name}: {cost.ns:.0f} ns/packet ({cost.method}, "
                         f"verdict {cost.retval})")
            results.append(Result(CUBE_COST, name, "ns-per-packet", cost.ns, "ns", {
                "stat": "median", "method": cost.method, "repeat": COST_REPEAT,
                "rounds": COST_ROUNDS, "samples_ns": [round(x, 1) for x in cost.samples],
                "verdict": cost.retval, "frame_bytes": len(frame), "what": what,
                "date": now_iso()}))
        progs = {"entry:pcn_ingress": rt._entry_fds["pcn_ingress"],
                 "entry:pcn_egress": rt._entry_fds["pcn_egress"],
                 **{t: ct_.fd for t, ct_ in sorted(rt.types.items())}}
        for name, fd in progs.items():
            info = prog_info(fd)
            results.append(Result(CUBE_COST, name, "xlated-insns", info.xlated_insns, "insns", {
                "jited_bytes": info.jited_bytes, "verified_insns": info.verified_insns,
                "kernel_name": info.name, "date": now_iso()}))
        ctx.progress(f"{CUBE_COST}: program sizes (xlated instructions) "
                     + ", ".join(f"{r.variant} {r.value:.0f}" for r in results
                                 if r.metric == "xlated-insns"))
    return results


COST_REPEAT, COST_ROUNDS = 10000, 7
SCENARIOS = {CUBE_COST: cube_cost}
