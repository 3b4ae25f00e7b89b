"""pcn_testsupport.testrun, the BPF_PROG_TEST_RUN wrapper, on a tiny program of its own."""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest
from bpfunit import BROADCAST, ETH_P_IP, UnitNet, eth, random_mac, unit_net

from pcn_testsupport import testrun

pytestmark = [pytest.mark.bpf,
              pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning")]

PROBE = b"""
int echo_ctx(struct __sk_buff *skb)
{
    /* reports what it was given: cb[0..4] shifted by one word, ifindex in cb[0] */
    u32 c0 = skb->cb[0], c1 = skb->cb[1], c2 = skb->cb[2], c3 = skb->cb[3];
    skb->cb[4] = c3;
    skb->cb[3] = c2;
    skb->cb[2] = c1;
    skb->cb[1] = c0;
    skb->cb[0] = skb->ifindex;
    return skb->len;
}

int grow(struct __sk_buff *skb)
{
    if (bpf_skb_change_tail(skb, skb->len + 100, 0) < 0)
        return 1;
    return 0;
}
"""


@pytest.fixture(scope="module")
def probe() -> Iterator[tuple[UnitNet, dict[str, int]]]:
    from bcc import BPF

    with unit_net(veths=1) as net:
        module = BPF(text=PROBE, cflags=["-w"])
        try:
            fds = {name: module.load_func(name, BPF.SCHED_CLS).fd for name in ("echo_ctx", "grow")}
            yield net, fds
        finally:
            module.cleanup()


def a_frame() -> bytes:
    return eth(BROADCAST, random_mac(), ETH_P_IP, b"\x45" + bytes(40))


def test_context_goes_in_and_comes_back(probe: tuple[UnitNet, dict[str, int]]) -> None:
    net, fds = probe
    frame = a_frame()
    res = net.run(fds["echo_ctx"], frame, cb=[11, 22, 33, 44], ifindex=net.ifindex["u1"])
    assert res.retval == len(frame)
    assert res.cb == (net.ifindex["u1"], 11, 22, 33, 44)
    assert res.data == frame


def test_without_ifindex_the_device_is_loopback(probe: tuple[UnitNet, dict[str, int]]) -> None:
    net, fds = probe
    res = net.run(fds["echo_ctx"], a_frame())
    assert res.cb[0] == 1  # lo


def test_output_frame_may_grow(probe: tuple[UnitNet, dict[str, int]]) -> None:
    net, fds = probe
    frame = a_frame()
    res = net.run(fds["grow"], frame)
    assert res.retval == 0
    assert res.data[: len(frame)] == frame and len(res.data) == len(frame) + 100


def test_unknown_ifindex_is_an_oserror(probe: tuple[UnitNet, dict[str, int]]) -> None:
    net, fds = probe
    with pytest.raises(OSError) as info:
        net.run(fds["echo_ctx"], a_frame(), ifindex=net.ifindex["u1"] + 1000)
    assert info.value.errno == errno.ENODEV
    assert "network namespace" in str(info.value)


def test_bad_fd_is_an_oserror() -> None:
    with pytest.raises(OSError) as info:
        testrun.run_sched_cls(987654, a_frame())
    assert info.value.errno == errno.EBADF


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        testrun.run_sched_cls(0, b"\0" * 13)
    with pytest.raises(ValueError):
        testrun.run_sched_cls(0, a_frame(), cb=[0] * 6)
