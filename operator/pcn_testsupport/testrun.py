"""BPF_PROG_TEST_RUN for SCHED_CLS (tc) programs, through libbpf and ctypes.

BCC's Python module has no test-run wrapper; the libbpf it links (Debian's
libbpf 1.1, `libbpf.so.1`) exports `bpf_prog_test_run_opts`, which this module
calls with the struct layout of libbpf 1.1's `bpf.h`.

The kernel runs the program in the network namespace of the calling thread:
the loopback device of that namespace (or the device named by `ifindex`) is
the packet's device, and helpers such as `bpf_clone_redirect` look ifindexes
up there. Enter the namespace of the netdevs a test expects first.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass

TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7

CB_WORDS = 5
_HEADROOM = 256  # room for a program that grows the frame (bpf_skb_change_tail...)
# The kernel fails with ENOSPC if ctx_out is smaller than its own struct __sk_buff
# (200 bytes on 6.x); leave room for kernels that grow it.
_CTX_OUT_SIZE = 512


class BpfTestRunOpts(ct.Structure):
    """`struct bpf_test_run_opts` of libbpf 1.1 (tools/lib/bpf/bpf.h)."""

    _fields_ = [
        ("sz", ct.c_size_t),
        ("data_in", ct.c_void_p),
        ("data_out", ct.c_void_p),
        ("data_size_in", ct.c_uint32),
        ("data_size_out", ct.c_uint32),
        ("ctx_in", ct.c_void_p),
        ("ctx_out", ct.c_void_p),
        ("ctx_size_in", ct.c_uint32),
        ("ctx_size_out", ct.c_uint32),
        ("retval", ct.c_uint32),
        ("repeat", ct.c_int),
        ("duration", ct.c_uint32),
        ("flags", ct.c_uint32),
        ("cpu", ct.c_uint32),
        ("batch_size", ct.c_uint32),
    ]


class SkBuffPrefix(ct.Structure):
    """The leading fields of the uapi `struct __sk_buff`, up to and including
    `gso_size` (offset 176; `cb` at 48). For SCHED_CLS the kernel accepts only
    mark, priority, ingress_ifindex, ifindex, cb, tstamp, wire_len, gso_segs
    and gso_size here; every other field must stay zero. The two 8-byte
    unions (`flow_keys` and `sk` pointers) have BCC's names for them."""

    _fields_ = [
        ("len", ct.c_uint32),
        ("pkt_type", ct.c_uint32),
        ("mark", ct.c_uint32),
        ("queue_mapping", ct.c_uint32),
        ("protocol", ct.c_uint32),
        ("vlan_present", ct.c_uint32),
        ("vlan_tci", ct.c_uint32),
        ("vlan_proto", ct.c_uint32),
        ("priority", ct.c_uint32),
        ("ingress_ifindex", ct.c_uint32),
        ("ifindex", ct.c_uint32),
        ("tc_index", ct.c_uint32),
        ("cb", ct.c_uint32 * CB_WORDS),
        ("hash", ct.c_uint32),
        ("tc_classid", ct.c_uint32),
        ("data", ct.c_uint32),
        ("data_end", ct.c_uint32),
        ("napi_id", ct.c_uint32),
        ("family", ct.c_uint32),
        ("remote_ip4", ct.c_uint32),
        ("local_ip4", ct.c_uint32),
        ("remote_ip6", ct.c_uint32 * 4),
        ("local_ip6", ct.c_uint32 * 4),
        ("remote_port", ct.c_uint32),
        ("local_port", ct.c_uint32),
        ("data_meta", ct.c_uint32),
        ("__anon0", ct.c_uint64),  # flow_keys
        ("tstamp", ct.c_uint64),
        ("wire_len", ct.c_uint32),
        ("gso_segs", ct.c_uint32),
        ("__anon1", ct.c_uint64),  # sk
        ("gso_size", ct.c_uint32),
    ]



@dataclass(frozen=True)
class TestRunResult:
    retval: int
    data: bytes  # the frame as the program left it
    cb: tuple[int, ...]  # skb->cb after the run
    duration_ns: int

    __test__ = False  # not a pytest test class


_HINTS = {
    errno.ENODEV: " (is `ifindex` a device of the calling thread's network namespace?)",
    errno.ENOSPC: " (the program grew the frame beyond the output buffer)",
    errno.EINVAL: " (not a SCHED_CLS program, or a context field tc test runs do not accept)",
    errno.EPERM: " (BPF_PROG_TEST_RUN needs CAP_BPF / root)",
    errno.EBADF: " (not an open file descriptor)",
}

_lib: ct.CDLL | None = None


def _libbpf() -> ct.CDLL:
    global _lib
    if _lib is None:
        try:
            lib = ct.CDLL("libbpf.so.1", use_errno=True)
        except OSError as exc:
            raise OSError(exc.errno or 0, f"cannot load libbpf.so.1 for BPF_PROG_TEST_RUN: {exc}") \
                from exc
        fn = lib.bpf_prog_test_run_opts
        fn.argtypes = [ct.c_int, ct.POINTER(BpfTestRunOpts)]
        fn.restype = ct.c_int
        _lib = lib
    return _lib


def run_sched_cls(prog_fd: int, frame: bytes, *, cb: Sequence[int] = (),
                  ifindex: int = 0, ingress_ifindex: int = 0, mark: int = 0,
                  repeat: int = 1, gso_size: int = 0, gso_segs: int = 0) -> TestRunResult:
    """Run a SCHED_CLS program once (or `repeat` times) on `frame`.

    `cb` fills skb->cb[0..4] (missing words are zero); `ifindex` makes the
    device with that index, in the caller's network namespace, the packet's
    device (0: the namespace's loopback); `gso_size` (and `gso_segs`) make it
    a GSO packet, as GRO or a TSO sender leaves one. Raises OSError with the kernel's errno.
    """
    if len(frame) < 14:
        raise ValueError(f"a frame needs at least an Ethernet header, got {len(frame)} bytes")
    if len(cb) > CB_WORDS:
        raise ValueError(f"skb->cb holds {CB_WORDS} words, got {len(cb)}")
    ctx = SkBuffPrefix()
    for i, word in enumerate(cb):
        ctx.cb[i] = word
    ctx.ifindex = ifindex
    ctx.ingress_ifindex = ingress_ifindex
    ctx.mark = mark
    ctx.gso_size = gso_size  # non-zero: a GSO packet of segments of that payload size
    ctx.gso_segs = gso_segs

    data_in = ct.create_string_buffer(bytes(frame), len(frame))
    data_out = ct.create_string_buffer(len(frame) + _HEADROOM)
    ctx_out = ct.create_string_buffer(_CTX_OUT_SIZE)

    opts = BpfTestRunOpts()
    opts.sz = ct.sizeof(BpfTestRunOpts)
    opts.data_in = ct.cast(data_in, ct.c_void_p)
    opts.data_size_in = len(frame)
    opts.data_out = ct.cast(data_out, ct.c_void_p)
    opts.data_size_out = len(data_out)
    opts.ctx_in = ct.cast(ct.pointer(ctx), ct.c_void_p)
    opts.ctx_size_in = ct.sizeof(ctx)
    opts.ctx_out = ct.cast(ctx_out, ct.c_void_p)
    opts.ctx_size_out = len(ctx_out)
    opts.repeat = repeat

    ret = _libbpf().bpf_prog_test_run_opts(prog_fd, ct.byref(opts))
    if ret != 0:
        err = -ret if ret < 0 else ct.get_errno()
        hint = _HINTS.get(err, "")
        raise OSError(err, f"BPF_PROG_TEST_RUN of program fd {prog_fd} on a {len(frame)}-byte "
                           f"frame failed: {os.strerror(err)}{hint}")
    out_ctx = SkBuffPrefix.from_buffer_copy(ctx_out.raw[: ct.sizeof(SkBuffPrefix)])
    return TestRunResult(
        retval=opts.retval,
        data=data_out.raw[: opts.data_size_out],
        cb=tuple(out_ctx.cb),
        duration_ns=opts.duration,
    )
