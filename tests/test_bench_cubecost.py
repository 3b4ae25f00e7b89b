"""bench.cubecost's collectors: program sizes from bpf_prog_info and ns/packet
from BPF_PROG_TEST_RUN, on small programs whose answers are known."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest

from bench import cubecost
from pcn_testsupport.frames import inet_csum

pytestmark = [pytest.mark.bpf,
              pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning")]

FRAME = bytes.fromhex("020000000002" "020000000001" "0800") + bytes(46)

PROGRAMS = r"""
int verdict_two(struct __sk_buff *skb) { return 2; }

int rewrite_first_byte(struct __sk_buff *skb) {
    /* each run changes the frame: repeated runs would not see the same packet */
    u8 v = 0x42;
    bpf_skb_store_bytes(skb, 0, &v, 1, 0);
    return 0;
}
"""


@pytest.fixture(scope="module")
def progs() -> Iterator[dict[str, int]]:
    from bcc import BPF

    b = BPF(text=PROGRAMS)
    fds = {name: b.load_func(name.encode(), BPF.SCHED_CLS).fd
           for name in ("verdict_two", "rewrite_first_byte")}
    yield fds
    b.cleanup()


def test_prog_info_of_a_two_instruction_program(progs: dict[str, int]) -> None:
    info = cubecost.prog_info(progs["verdict_two"])
    assert info.name == "verdict_two"
    assert info.xlated_insns == 2  # r0 = 2; exit
    assert info.jited_bytes > 0 and info.prog_id > 0
    assert info.verified_insns >= 2  # Linux >= 5.16 (the CI kernel is 6.x)
    bigger = cubecost.prog_info(progs["rewrite_first_byte"])
    assert bigger.xlated_insns > info.xlated_insns


def test_prog_info_of_a_bad_fd() -> None:
    with pytest.raises(OSError):
        cubecost.prog_info(10**6)


def test_parse_prog_info_reads_the_uapi_offsets() -> None:
    raw = bytearray(cubecost.BPF_PROG_INFO_SIZE)
    struct.pack_into("=I", raw, 4, 77)  # id
    struct.pack_into("=II", raw, 16, 321, 8 * 40)  # jited_prog_len, xlated_prog_len
    raw[64:64 + 5] = b"hello"
    struct.pack_into("=I", raw, 216, 99)  # verified_insns
    assert cubecost.parse_prog_info(bytes(raw)) == cubecost.ProgInfo("hello", 77, 40, 321, 99)
    with pytest.raises(ValueError):
        cubecost.parse_prog_info(bytes(100))


def test_ns_per_packet_repeats_a_program_that_leaves_the_frame(progs: dict[str, int]) -> None:
    cost = cubecost.ns_per_packet(progs["verdict_two"], FRAME, repeat=1000, rounds=3)
    assert cost.method == "repeat" and cost.retval == 2
    assert len(cost.samples) == 3 and 0 < cost.ns < 100_000


def test_ns_per_packet_runs_a_rewriting_program_singly(progs: dict[str, int]) -> None:
    cost = cubecost.ns_per_packet(progs["rewrite_first_byte"], FRAME, repeat=50, rounds=3)
    assert cost.method == "single" and cost.retval == 0
    assert len(cost.samples) == 3 and cost.ns > 0
    with pytest.raises(ValueError):
        cubecost.ns_per_packet(progs["verdict_two"], FRAME, repeat=0)


def test_tcp_frame_checksums() -> None:
    f = cubecost.tcp_frame("02:00:00:00:00:01", "02:00:00:00:00:02", "10.244.1.2",
                           "10.96.0.50", 40000, 80, cubecost.TCP_ACK, payload=10)
    assert f[12:14] == b"\x08\x00" and len(f) == 14 + 20 + 20 + 10
    ip, seg = f[14:34], f[34:]
    assert inet_csum(ip) == 0
    pseudo = (socket.inet_aton("10.244.1.2") + socket.inet_aton("10.96.0.50")
              + struct.pack("!BBH", 0, 6, len(seg)))
    assert inet_csum(pseudo + seg) == 0
    assert struct.unpack("!HH", seg[:4]) == (40000, 80) and seg[13] == cubecost.TCP_ACK
