"""The cross-node scenario's parts: pcn's topology forwarded by the kernel
(bench.references.routed_pods) over the underlay and over VXLAN, the BPF
run-time statistics of bench.bpfload on a program whose runs are counted,
and the acceptance line that puts them beside the underlay."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from bench import bpfload, cubecost
from bench.netns import Namespaces, exec_in, new_run_prefix
from bench.references import routed_pods, switched_pair, vxlan_pair
from bench.results import THROUGHPUT, Result, acceptance
from pcn_testsupport import testrun

FRAME = bytes.fromhex("020000000002" "020000000001" "0800") + bytes(46)


def test_parse_prog_info_reads_the_run_statistics() -> None:
    raw = bytearray(cubecost.BPF_PROG_INFO_SIZE)
    struct.pack_into("=QQ", raw, 192, 123456, 789)  # run_time_ns, run_cnt
    info = cubecost.parse_prog_info(bytes(raw))
    assert (info.run_time_ns, info.run_cnt) == (123456, 789)


def test_load_figures() -> None:
    load = bpfload.Load((bpfload.ProgramLoad("n1", "pcn_ingress", 1000, 1_200_000),
                         bpfload.ProgramLoad("n2", "pcn_ingress", 2000, 2_000_000),
                         bpfload.ProgramLoad("n2", "pcn_egress", 0, 0)), 2.0, 8.0)
    assert load.total_ns == 3_200_000
    assert load.cpu_share == pytest.approx(3.2e6 / 2e9)
    # 8 Gbit/s for 2 s: 2000 MB
    assert load.ns_per_mbyte == pytest.approx(3.2e6 / 2000)
    assert load.programs[0].ns_per_run == 1200 and load.programs[2].ns_per_run == 0
    extra = load.as_extra()
    assert extra["bpf_cpu_share"] == 0.0016 and extra["bpf_ns_per_mbyte"] == 1600.0
    assert extra["bpf_programs"][1] == {"node": "n2", "program": "pcn_ingress", "runs": 2000,
                                        "ns_per_run": 1000.0}
    text = load.summary()
    assert "n1 pcn_ingress 1000 x 1200 ns, n2 pcn_ingress 2000 x 1000 ns;" in text
    assert "pcn_egress" not in text and "0.2% of one CPU, 1600 ns per MB" in text


@pytest.fixture(scope="module")
def verdict_prog() -> Iterator[int]:
    from bcc import BPF

    b = BPF(text="int verdict_two(struct __sk_buff *skb) { return 2; }")
    yield b.load_func(b"verdict_two", BPF.SCHED_CLS).fd
    b.cleanup()


@pytest.mark.bpf
@pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning")
def test_runs_are_counted_while_the_statistics_are_on(verdict_prog: int) -> None:
    # (whether they stop when the fd closes depends on every other fd of
    # the machine: another run's statistics may be on meanwhile)
    before = cubecost.prog_info(verdict_prog)
    with bpfload.stats_enabled():
        testrun.run_sched_cls(verdict_prog, FRAME, repeat=500)
        on = cubecost.prog_info(verdict_prog)
    assert on.run_cnt - before.run_cnt == 500
    assert on.run_time_ns > before.run_time_ns


@pytest.mark.netns
@pytest.mark.parametrize("over", ["uplink", "vxlan"])
def test_routed_pods_reach_each_other_through_their_nodes(over: str) -> None:
    nss = Namespaces(new_run_prefix())
    try:
        a, b = switched_pair(nss, 1500)
        if over == "vxlan":
            a, b = vxlan_pair(a, b, 1450)
        p1, p2 = routed_pods(nss, a, b, "uplink" if over == "uplink" else "vx",
                             1500 if over == "uplink" else 1450)
        assert (p1.ip, p2.ip) == ("10.249.1.2", "10.249.2.2")
        ping = exec_in(p1.netns, ["ping", "-c", "2", "-i", "0.2", "-W", "2", p2.ip],
                       check=False)
        assert ping.returncode == 0, ping.stdout
        # two forwarding hops: the TTL of the answer is 64 - 2
        assert "ttl=62" in ping.stdout
        # the pods' MTU, with DF: 1450 over VXLAN goes through whole
        size = (1500 if over == "uplink" else 1450) - 28
        big = exec_in(p1.netns, ["ping", "-c", "1", "-W", "2", "-M", "do", "-s", str(size),
                                 p2.ip], check=False)
        assert big.returncode == 0, big.stdout
        # the nodes forward, nothing else: no netfilter rule was added
        rules = exec_in(a.netns, ["nft", "list", "ruleset"], check=False)
        assert rules.stdout.strip() == ""
    finally:
        nss.remove_all()


def test_cross_node_acceptance_names_the_kernel_with_pods_and_the_programs_cost() -> None:
    def tp(variant: str, gbps: float, **extra: object) -> Result:
        return Result("pod-to-pod-cross-node", variant, THROUGHPUT, gbps, "Gbit/s",
                      {"loadavg_after": "1.00 1.00 1.00", **extra})

    lines = [x for x in acceptance([
        tp("pcn", 8.0, bpf_cpu_share=0.061, bpf_ns_per_mbyte=80.0, bpf_gbps_during=7.5),
        tp("veth", 10.0), tp("vxlan-kernel", 9.0), tp("vxlan-kernel-pods", 8.5),
        tp("pcn-direct", 9.0), tp("veth-1500", 10.0), tp("direct-kernel-pods", 9.2)])
        if "cross-node" in x]
    assert len(lines) == 2
    assert "the kernel forwarding between pods' veths 8.50 Gbit/s = 85% of it " \
        "(vxlan-kernel-pods; pcn 94% of that); pcn's programs 80 ns per MB, 6.1% of one " \
        "CPU at 7.50 Gbit/s (load 1.00 1.00 1.00)" in lines[0]
    assert "direct routing 9.00 Gbit/s = 90%" in lines[1]
    assert "9.20 Gbit/s = 92% of it (direct-kernel-pods; pcn 98% of that) (load" in lines[1]


@pytest.mark.parametrize("module", ["bench.scenarios", "bench.bpfload", "bench.cubecost",
                                    "bench.run"])
def test_each_bench_module_imports_first(module: str) -> None:
    # bench.run imports bench.scenarios first, which imports bench.bpfload,
    # which reads bench.cubecost: no module may need another half-initialised
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
