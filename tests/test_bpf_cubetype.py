"""The shipped example CubeType (examples/cubetypes/dscp-marker.yaml) through
the real wrapper (pcn_agent.dataplane.cubes.custom), on crafted frames
(BPF_PROG_TEST_RUN); and what a broken source gives.

Topology: bridge `b` with ports `a` (veth u1) and `b` (u2); the destination
MAC is learned behind `b`. Each test stacks an instance of the type on the
ingress hook of `a`; a frame enters through the entry program of u1 and the
bridge forwards what the cube lets through to u2 (TC_ACT_REDIRECT).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from bpfunit import (
    ETH_P_IP,
    IPPROTO_UDP,
    UnitNet,
    cube_lab,
    eth,
    inet_csum,
    ipv4,
    parse_eth,
    parse_ipv4,
    random_mac,
    tcp,
    udp_csum,
)

from pcn_agent.dataplane import maps
from pcn_agent.dataplane.cubes.bridge import Bridge
from pcn_agent.dataplane.cubes.custom import (
    PROGRAM,
    CubeBuildError,
    CustomFunction,
    CustomSettings,
    build,
    runtime_type,
)
from pcn_agent.dataplane.runtime import PortState
from pcn_crds.cubetype import config_values
from pcn_testsupport.testrun import TC_ACT_REDIRECT, TC_ACT_SHOT

pytestmark = [pytest.mark.bpf,
              pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning")]

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cubetypes" / "dscp-marker.yaml"
TYPE = "dscp-marker"
_names = itertools.count(1)


def example() -> dict[str, Any]:
    docs = list(yaml.safe_load_all(EXAMPLE.read_text()))
    return next(d for d in docs if d["kind"] == "CubeType")


@dataclass
class CtLab:
    net: UnitNet
    ports: dict[str, PortState]
    dst_mac: str
    spec: dict[str, Any]


@pytest.fixture(scope="module")
def lab() -> Iterator[CtLab]:
    with cube_lab() as cl:
        spec = example()["spec"]
        built = build(cl.rt, TYPE, spec["source"], spec["parameters"], spec["counters"])
        cl.rt.install_program(runtime_type(TYPE), built.module, built.fd, PROGRAM)
        yield CtLab(cl.net, cl.ports, cl.dst_mac, spec)


Factory = Callable[[dict[str, Any]], CustomFunction]


def settings(lab: CtLab, config: dict[str, Any]) -> CustomSettings:
    from pcn_crds.cubetype import param_layout

    params = param_layout(lab.spec["parameters"])
    return CustomSettings(TYPE, params, tuple(lab.spec["counters"]),
                          config_values(params, config))


@pytest.fixture
def stack(lab: CtLab) -> Iterator[Factory]:
    made: list[CustomFunction] = []
    rt = lab.net.rt

    def make(config: dict[str, Any]) -> CustomFunction:
        f = CustomFunction.create(rt, f"dscp{next(_names)}", settings(lab, config))
        made.append(f)
        rt.set_hook(lab.ports["a"], maps.HOOK_INGRESS, [rt.stacked(f.name)])
        return f

    try:
        yield make
    finally:
        rt.set_hook(lab.ports["a"], maps.HOOK_INGRESS, [])
        for f in made:
            f.delete()
            assert f.name not in rt.cubes


def udp_frame(lab: CtLab, dst: str = "10.0.2.1", tos: int = 0) -> bytes:
    payload = udp_csum("10.0.1.1", dst, 5000, 6000, b"hello")
    raw = bytearray(ipv4("10.0.1.1", dst, IPPROTO_UDP, payload))
    raw[1] = tos
    raw[10:12] = b"\0\0"
    raw[10:12] = inet_csum(bytes(raw[:20])).to_bytes(2, "big")
    return eth(lab.dst_mac, random_mac(), ETH_P_IP, bytes(raw))


def send(lab: CtLab, pkt: bytes) -> tuple[int, bytes]:
    res = lab.net.run(lab.net.rt._entry_fds["pcn_ingress"], pkt,
                      ifindex=lab.net.ifindex["u1"])
    assert res.retval in (TC_ACT_REDIRECT, TC_ACT_SHOT), res.retval
    return res.retval, res.data


def tos_of(frame: bytes) -> tuple[int, bool]:
    """The TOS byte of a frame's IPv4 header and whether its checksum holds."""
    ip = parse_ipv4(parse_eth(frame).payload)
    return ip.header[1], inet_csum(ip.header) == 0


def test_marks_the_dscp_keeps_ecn_and_fixes_the_checksum(lab: CtLab, stack: Factory) -> None:
    f = stack({"dscp": 46})
    verdict, out = send(lab, udp_frame(lab, tos=0b01))  # ECT(1)
    assert verdict == TC_ACT_REDIRECT
    tos, csum_ok = tos_of(out)
    assert tos == (46 << 2) | 0b01 and csum_ok
    assert f.counters() == {"marked": 1, "unchanged": 0, "skipped": 0, "notIpv4": 0,
                            "failed": 0}
    verdict, out = send(lab, out)  # already marked: left alone
    assert verdict == TC_ACT_REDIRECT and tos_of(out) == ((46 << 2) | 1, True)
    assert f.counters()["unchanged"] == 1
    assert f.status()["params"] == {"dscp": 46, "protocol": "any", "destination": "0.0.0.0"}


def test_protocol_and_destination_parameters_take_effect(lab: CtLab, stack: Factory) -> None:
    f = stack({"dscp": 10, "protocol": "tcp"})
    udp_pkt = udp_frame(lab)
    verdict, out = send(lab, udp_pkt)
    assert verdict == TC_ACT_REDIRECT and out == udp_pkt  # UDP: not marked
    assert f.counters()["skipped"] == 1
    tcp_pkt = eth(lab.dst_mac, random_mac(), ETH_P_IP,
                  ipv4("10.0.1.1", "10.0.2.1", 6, tcp("10.0.1.1", "10.0.2.1", 1234, 80)))
    verdict, out = send(lab, tcp_pkt)
    assert tos_of(out) == (10 << 2, True)
    # a NetworkFunction's edit: one map update, the next packet sees it
    f.configure(settings(lab, {"dscp": 12, "destination": "10.0.2.9"}))
    verdict, out = send(lab, udp_frame(lab, dst="10.0.2.1"))
    assert tos_of(out) == (0, True) and f.counters()["skipped"] == 2
    verdict, out = send(lab, udp_frame(lab, dst="10.0.2.9"))
    assert tos_of(out) == (12 << 2, True) and f.counters()["marked"] == 2


def test_counts_what_is_not_ipv4(lab: CtLab, stack: Factory) -> None:
    f = stack({"dscp": 1})
    arp = eth(lab.dst_mac, random_mac(), 0x0806, bytes(28))
    verdict, _ = send(lab, arp)
    assert verdict == TC_ACT_REDIRECT and f.counters()["notIpv4"] == 1


def test_a_new_version_is_swapped_in_and_a_broken_one_changes_nothing(
        lab: CtLab, stack: Factory) -> None:
    """The type's slot takes a recompiled program in one update; a source
    that does not compile raises with the user's line, and the program in
    force keeps running."""
    rt = lab.net.rt
    f = stack({"dscp": 46})
    spec = lab.spec
    broken = spec["source"].replace("u8 tos =", "u8 tos = undefined_thing +")
    line = next(i for i, x in enumerate(broken.splitlines(), 1) if "undefined_thing" in x)
    with pytest.raises(CubeBuildError) as err:
        build(rt, TYPE, broken, spec["parameters"], spec["counters"])
    d = err.value.diagnostics[0]
    assert (d.stage, d.line) == ("compile", line) and "undefined_thing" in d.message, d
    assert tos_of(send(lab, udp_frame(lab))[1])[0] == 46 << 2  # still marking
    dropper = spec["source"].replace(
        "struct iphdr *ip = pcn_cube_ipv4(skb);",
        "struct iphdr *ip = pcn_cube_ipv4(skb);\n    if (ip) return pcn_cube_drop(ctx);")
    built = build(rt, TYPE, dropper, spec["parameters"], spec["counters"])
    slot = rt.types[runtime_type(TYPE)].slot
    try:
        assert rt.install_program(runtime_type(TYPE), built.module, built.fd, PROGRAM) == slot
        assert send(lab, udp_frame(lab))[0] == TC_ACT_SHOT
        assert f.status()["drops"] == 1
    finally:
        again = build(rt, TYPE, spec["source"], spec["parameters"], spec["counters"])
        rt.install_program(runtime_type(TYPE), again.module, again.fd, PROGRAM)
    assert tos_of(send(lab, udp_frame(lab))[1])[0] == 46 << 2


def test_a_verifier_refusal_names_the_users_line(lab: CtLab) -> None:
    source = (
        "static int pcn_cube_handle(struct __sk_buff *skb, struct pcn_cube_ctx *ctx)\n"
        "{\n"
        "    u8 *p = (u8 *)(long)skb->data;\n"
        "    if (p[40] == 1)\n"
        "        return pcn_cube_drop(ctx);\n"
        "    return pcn_cube_pass(ctx);\n"
        "}\n")
    with pytest.raises(CubeBuildError) as err:
        build(lab.net.rt, "unchecked", source, {"type": "object", "properties": {}}, [])
    d = err.value.diagnostics[0]
    assert d.stage == "verify" and d.line == 4, d
    assert "packet" in d.message, d


def test_an_undeclared_function_names_the_users_line(lab: CtLab) -> None:
    """A misspelt helper is a compile error at the user's line naming the
    function: clang's -w would hide its "implicit declaration" warning, and
    the call to nothing then failed only in the verifier ("jump out of
    range"), at no line (trial of issue 12)."""
    source = (
        "static int pcn_cube_handle(struct __sk_buff *skb, struct pcn_cube_ctx *ctx)\n"
        "{\n"
        "    u64 lim = pcn_cube_parm(ctx, PCN_PARAM_LIMIT);\n"
        "    if (lim > 1000)\n"
        "        return pcn_cube_drop(ctx);\n"
        "    return pcn_cube_pass(ctx);\n"
        "}\n")
    schema = {"type": "object", "properties": {"limit": {"type": "integer", "minimum": 0,
                                                           "maximum": 100}}}
    with pytest.raises(CubeBuildError) as err:
        build(lab.net.rt, "typo", source, schema, [])
    d = err.value.diagnostics[0]
    assert (d.stage, d.line) == ("compile", 3), d
    assert "implicit declaration of function 'pcn_cube_parm'" in d.message, d
    assert "did you mean 'pcn_cube_param'?" in d.message, d


def test_an_agent_restart_keeps_custom_cubes_running() -> None:
    """A new runtime adopting the pins finds the type's slot with the
    program the previous agent put there (packets are still marked before
    anything is compiled again), the instance's settings and counters; the
    type compiled again goes into the same slot."""
    from pcn_agent.dataplane.runtime import Runtime

    with cube_lab() as cl:
        net, rt, dst_mac = cl.net, cl.rt, cl.dst_mac
        port, far = cl.ports["a"], cl.ports["b"]
        spec = example()["spec"]
        built = build(rt, TYPE, spec["source"], spec["parameters"], spec["counters"])
        slot = rt.install_program(runtime_type(TYPE), built.module, built.fd, PROGRAM)
        lab = CtLab(net, {"a": port, "b": far}, dst_mac, spec)
        f = CustomFunction.create(rt, "keep", settings(lab, {"dscp": 8}))
        rt.set_hook(port, maps.HOOK_INGRESS, [rt.stacked("keep")])
        assert tos_of(send(lab, udp_frame(lab))[1]) == (8 << 2, True)
        rt.save()
        rt.abandon()
        rt2 = Runtime(net.name, netns=net.name, pin_root=net.pin_root)
        try:
            rt2.open()
            assert rt2.adopted and rt2.adopted_slots == {runtime_type(TYPE): slot}
            net.rt = rt2
            Bridge(rt2, "b")
            again = CustomFunction.adopt(rt2, "keep")
            assert again.settings == f.settings
            assert rt2.stacked("keep").slot == slot
            assert tos_of(send(lab, udp_frame(lab))[1]) == (8 << 2, True)
            assert again.counters()["marked"] == 2
            rebuilt = build(rt2, TYPE, spec["source"], spec["parameters"], spec["counters"])
            assert rt2.install_program(runtime_type(TYPE), rebuilt.module, rebuilt.fd,
                                       PROGRAM) == slot
            assert rt2.adopted_slots == {}
            assert tos_of(send(lab, udp_frame(lab))[1]) == (8 << 2, True)
            assert again.counters()["marked"] == 3
            rt2.set_hook(rt2.ports[port.id], maps.HOOK_INGRESS, [])
            again.delete()
            rt2.remove_type(runtime_type(TYPE))
            assert runtime_type(TYPE) not in rt2.types
        finally:
            rt2.close()
