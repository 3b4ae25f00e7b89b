"""The runtime's lean rtnetlink socket (pcn_agent.dataplane.rtnl) against the
kernel, checked with independent readers: pyroute2's decoder and iproute2's
`tc`. Two network namespaces of this test's own, removed at the end."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import secrets
import subprocess
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from pcn_agent.dataplane import tc
from pcn_agent.dataplane.netns import entered
from pcn_agent.dataplane.rtnl import Rtnl

pytestmark = pytest.mark.netns

BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SCHED_CLS = 3
NR_BPF = {"x86_64": 321, "aarch64": 280}


class _ProgLoadAttr(ctypes.Structure):
    """The head of union bpf_attr for BPF_PROG_LOAD (include/uapi/linux/bpf.h);
    the rest of the 128 bytes stays zero."""

    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32),
                ("insns", ctypes.c_uint64), ("license", ctypes.c_uint64),
                ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32),
                ("prog_flags", ctypes.c_uint32), ("pad", ctypes.c_uint8 * 88)]


def _load_pass_program() -> int:
    """A tc program that returns 0 (TC_ACT_OK): `r0 = 0; exit`. Its fd."""
    machine = os.uname().machine
    if machine not in NR_BPF:
        pytest.skip(f"no bpf(2) number known for {machine}")
    insns = (ctypes.c_uint8 * 16)(0xB7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0)
    license_ = ctypes.c_char_p(b"GPL")
    attr = _ProgLoadAttr(prog_type=BPF_PROG_TYPE_SCHED_CLS, insn_cnt=2,
                         insns=ctypes.addressof(insns),
                         license=ctypes.cast(license_, ctypes.c_void_p).value or 0)
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fd = libc.syscall(NR_BPF[machine], BPF_PROG_LOAD, ctypes.byref(attr),
                      ctypes.sizeof(attr))
    if fd < 0:
        raise OSError(ctypes.get_errno(), "BPF_PROG_LOAD")
    return int(fd)


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    """Namespace `a` holding `out` (a veth whose peer `in` lives in `b`) and
    `v0`/`v1` (a veth pair both in `a`)."""
    run = secrets.token_hex(3)
    a, b = f"pcnrtnl-{run}-a", f"pcnrtnl-{run}-b"
    made: list[str] = []
    try:
        for name in (a, b):
            pr_netns.create(name)
            made.append(name)
        for argv in (["link", "add", "out", "type", "veth", "peer", "name", "in", "netns", b],
                     ["link", "add", "v0", "type", "veth", "peer", "name", "v1"]):
            subprocess.run(["ip", "-n", a, *argv], check=True, capture_output=True)
        yield a, b
    finally:
        for name in made:
            pr_netns.remove(name)


def test_link_reports_index_kind_and_where_the_peer_is(namespaces: tuple[str, str]) -> None:
    a, _ = namespaces
    with IPRoute(netns=a) as ipr:
        want = {link.get_attr("IFLA_IFNAME"): link["index"] for link in ipr.get_links()}
    with entered(a):
        nl = Rtnl()
    try:
        out = nl.link(name="out")
        assert out is not None and out.index == want["out"] and out.name == "out"
        assert out.kind == "veth" and out.link_netnsid is not None and out.veth_peer_elsewhere
        v0 = nl.link(name="v0")
        assert v0 is not None and v0.kind == "veth" and not v0.veth_peer_elsewhere
        v1 = nl.link(want["v1"])  # by index
        assert v1 is not None and (v1.name, v1.kind) == ("v1", "veth")
        lo = nl.link(name="lo")
        assert lo is not None and (lo.index, lo.kind, lo.link_netnsid) == (1, "", None)
        assert nl.link(name="missing") is None
        assert nl.link(max(want.values()) + 1000) is None
    finally:
        nl.close()


def test_tc_attach_replaces_in_place_and_detaches(namespaces: tuple[str, str]) -> None:
    a, _ = namespaces
    fd = _load_pass_program()
    with entered(a):
        nl = Rtnl()
    try:
        with IPRoute(netns=a) as ipr:
            idx = ipr.link_lookup(ifname="out")[0]
            assert tc.ensure_clsact(nl, idx) is True
            assert tc.ensure_clsact(nl, idx) is False  # there already
            tc.attach(nl, idx, tc.INGRESS, fd, "first")
            assert tc.filters(ipr, idx, tc.INGRESS) == ["first"]
            tc.attach(nl, idx, tc.INGRESS, fd, "second")  # replaced, not stacked
            assert tc.filters(ipr, idx, tc.INGRESS) == ["second"]
            assert tc.filters(ipr, idx, tc.EGRESS) == []
            shown = subprocess.run(["tc", "-n", a, "filter", "show", "dev", "out", "ingress"],
                                   check=True, capture_output=True, text=True).stdout
            assert "pref 1 bpf" in shown and "handle 0x1" in shown
            assert "second" in shown and "direct-action" in shown
            tc.attach(nl, idx, tc.EGRESS, fd, "out-egress")
            assert tc.filters(ipr, idx, tc.EGRESS) == ["out-egress"]
            tc.detach(nl, idx, tc.INGRESS)
            assert tc.filters(ipr, idx, tc.INGRESS) == []
            tc.detach(nl, idx, tc.INGRESS)  # gone already: not an error
            tc.remove_clsact(nl, idx)  # its egress filter goes with it
            tc.remove_clsact(nl, idx)  # gone already: not an error
            qdiscs = subprocess.run(["tc", "-n", a, "qdisc", "show", "dev", "out"],
                                    check=True, capture_output=True, text=True).stdout
            assert "clsact" not in qdiscs
    finally:
        nl.close()
        os.close(fd)
