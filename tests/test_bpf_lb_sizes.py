"""The service tables sized from the ConfigMap (lbrp.LbSizes, compiled into
bpf/include/pcn_lb.h as -D flags), on the lbrp's program (BPF_PROG_TEST_RUN).

Topology: bridge `b` with port `client` (veth u1, the lbrp on its ingress)
and port `gw` (u2), behind which the gateway MAC is learned; a pod's SYN to a
ClusterIP is translated by the lbrp and forwarded to the gateway.

* A build sized for 16 services holds 16: their traffic is translated, the
  17th is refused with TableFullError naming lbServiceMapMax and nothing of
  it reaches the tables (its address stays unallocated: dropped).
* A build sized above 65 536 holds more than 65 536 entries in the kernel's
  map, and a service whose id is above 65 535 (its slot keys carry the id)
  is translated, its session recording that id.
* A runtime reopened with other sizes adopts nothing stale: the pinned
  service maps are made anew at the new size and filled again from the
  saved state, and the adopted service still works.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from bpfunit import (
    ETH_P_IP,
    IPPROTO_TCP,
    TCP_SYN,
    UnitNet,
    eth,
    ipv4,
    l4_ports,
    parse_eth,
    parse_ipv4,
    random_mac,
    tcp,
    unit_net,
)

from pcn_agent.dataplane import maps, programs
from pcn_agent.dataplane.cubes.bridge import Bridge
from pcn_agent.dataplane.cubes.lbrp import (
    SERVICES_SETTING,
    Backend,
    LbConfig,
    LbSizes,
    LoadBalancer,
    TableFullError,
    be16,
)
from pcn_agent.dataplane.runtime import Runtime
from pcn_testsupport.testrun import TC_ACT_REDIRECT, TC_ACT_SHOT

pytestmark = [pytest.mark.bpf,
              pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning")]

SERVICE_CIDR = "10.96.0.0/12"
GW_IP, NODE_IP, HOST_POD_IP, LOCAL_PODS = "10.244.1.1", "192.168.50.10", "10.244.1.0", \
    "10.244.1.0/24"
CLIENT = "10.244.1.10"
FILLER = ipaddress.IPv4Address("10.100.0.0")  # addresses of the entries put in by batch


@dataclass
class SizedLab:
    net: UnitNet
    lb: LoadBalancer
    client_port: int  # ifindex of the client's veth
    gw_mac: str
    client_mac: str

    def syn(self, dst: str, sport: int, dport: int = 80) -> tuple[int, str, int]:
        """A SYN from the client pod: (verdict, destination address, port)."""
        frame = eth(self.gw_mac, self.client_mac, ETH_P_IP,
                    ipv4(CLIENT, dst, IPPROTO_TCP, tcp(CLIENT, dst, sport, dport, TCP_SYN)))
        res = self.net.run(self.net.rt._entry_fds["pcn_ingress"], frame, ifindex=self.client_port)
        ip = parse_ipv4(parse_eth(res.data).payload)
        return res.retval, ip.dst, l4_ports(ip).dport

    def session_svc(self, dst: str, sport: int, dport: int = 80) -> int:
        key = maps.Flow(maps.ip_be(CLIENT), maps.ip_be(dst), be16(sport), be16(dport),
                        IPPROTO_TCP)
        return int(self.net.rt.table("lb_sessions", "lbrp")[key].svc)


def _build(net: UnitNet, rt: Runtime) -> SizedLab:
    """The bridge and the lbrp on `rt` (new, or adopted: the cubes exist)."""
    b = Bridge(rt, "b")
    lb = LoadBalancer(rt, "lb")
    if rt.adopted:
        client = next(p for p in rt.ports.values() if p.name == "client")
        gw_mac = rt.meta["gw_mac"]
    else:
        client = b.add_port("client")
        gw = b.add_port("gw")
        rt.set_hook(client, maps.HOOK_INGRESS, [rt.stacked("lb")])
        rt.connect_netdev(client, "u1")
        rt.connect_netdev(gw, "u2")
        gw_mac = random_mac()
        rt.table("bridge_fdb", "bridge")[maps.BridgeFdbKey(b.cube.id, maps.mac_bytes(gw_mac))] = \
            maps.BridgeFdbVal(port=gw.id, seen_ns=time.clock_gettime_ns(time.CLOCK_MONOTONIC))
        rt.meta["gw_mac"] = gw_mac
    lb.configure(LbConfig(service_cidr=SERVICE_CIDR, hairpin_ip=GW_IP, node_ip=NODE_IP,
                          host_pod_ip=HOST_POD_IP, local_pods=LOCAL_PODS))
    return SizedLab(net, lb, net.ifindex["u1"], gw_mac, random_mac())


@contextmanager
def sized_lab(sizes: LbSizes) -> Iterator[SizedLab]:
    with unit_net(veths=2, defines=sizes.defines()) as net:
        yield _build(net, net.rt)


def _kernel_size(rt: Runtime, name: str) -> int:
    table = rt.table(name, "lbrp")
    return programs.map_size(table.get_fd())[0]  # type: ignore[attr-defined]


def test_a_table_of_16_services_holds_16_and_refuses_the_17th() -> None:
    with sized_lab(LbSizes(services=16, backends=64)) as lab:
        rt = lab.net.rt
        assert _kernel_size(rt, "lb_services") == _kernel_size(rt, "lb_vips") == 16
        assert _kernel_size(rt, "lb_slots") == 64
        vips = [f"10.96.0.{i}" for i in range(1, 18)]
        for i, v in enumerate(vips[:16]):
            lab.lb.set_service(v, 80, "tcp", [Backend(f"10.244.2.{i + 1}", 8080)])
        with pytest.raises(TableFullError) as err:
            lab.lb.set_service(vips[16], 80, "tcp", [Backend("10.244.2.17", 8080)])
        assert err.value.setting == SERVICES_SETTING
        assert f"{SERVICES_SETTING} (now 16)" in str(err.value)
        for i, v in enumerate(vips[:16]):
            assert lab.syn(v, 40000 + i) == (TC_ACT_REDIRECT, f"10.244.2.{i + 1}", 8080)
        # nothing of the 17th is in: its address is an unallocated one of the range
        verdict, dst, _ = lab.syn(vips[16], 40100)
        assert (verdict, dst) == (TC_ACT_SHOT, vips[16])
        assert len(list(rt.table("lb_services", "lbrp").items())) == 16
        assert len(list(rt.table("lb_slots", "lbrp").items())) == 16
        # the kernel agrees with the check: a 17th entry does not fit the map
        with pytest.raises(Exception, match="Argument list too long"):
            rt.table("lb_services", "lbrp")[maps.SvcKey(maps.ip_be(vips[16]), be16(80),
                                                        IPPROTO_TCP, maps.SVC_INTERNAL)] = \
                maps.Svc(99, 0, 0, 0)


def test_a_table_above_65536_holds_more_and_ids_above_65535_work() -> None:
    n = 70_000
    with sized_lab(LbSizes(services=n + 16, backends=n + 16)) as lab:
        rt = lab.net.rt
        table = rt.table("lb_services", "lbrp")
        # 70 000 entries straight into the kernel's map (one batch: set_service
        # for each would take minutes here), beyond any 16-bit bound
        keys = (maps.SvcKey * n)(*(maps.SvcKey(maps.ip_be(FILLER + i),
                                                be16(80), IPPROTO_TCP, maps.SVC_INTERNAL)
                                   for i in range(n)))
        values = (maps.Svc * n)(*(maps.Svc(200_000 + i, 0, 0, 0) for i in range(n)))
        table.items_update_batch(keys, values)
        assert sum(1 for _ in table.items()) == n
        # the table hands out ids as if 69 999 services were in before
        lab.lb.services._next_id = n
        a = lab.lb.set_service("10.96.0.1", 80, "tcp", [Backend("10.244.2.1", 8080),
                                                          Backend("10.244.2.2", 8080)])
        b = lab.lb.set_service("10.96.0.2", 80, "tcp", [Backend("10.244.2.3", 8080)])
        assert (a.id, b.id) == (n, n + 1) and a.id > 0xFFFF
        slots = {(k.svc, k.slot) for k, _ in rt.table("lb_slots", "lbrp").items()}
        assert slots == {(n, 0), (n, 1), (n + 1, 0)}
        seen = set()
        for sport in range(41000, 41016):
            verdict, dst, port = lab.syn("10.96.0.1", sport)
            assert verdict == TC_ACT_REDIRECT and port == 8080
            seen.add(dst)
            assert lab.session_svc("10.96.0.1", sport) == n
        assert seen == {"10.244.2.1", "10.244.2.2"}
        assert lab.syn("10.96.0.2", 41100) == (TC_ACT_REDIRECT, "10.244.2.3", 8080)
        assert lab.session_svc("10.96.0.2", 41100) == n + 1


def test_reopening_with_other_sizes_makes_the_tables_anew_and_refills_them() -> None:
    with sized_lab(LbSizes(services=16, backends=128)) as lab:
        net, rt = lab.net, lab.net.rt
        lab.lb.set_service("10.96.0.1", 80, "tcp", [Backend("10.244.2.1", 8080)])
        lab.lb.set_service("10.96.0.2", 80, "tcp", [Backend("10.244.2.2", 8080, 3),
                                                      Backend("10.244.2.3", 8080)])
        assert lab.syn("10.96.0.1", 42000) == (TC_ACT_REDIRECT, "10.244.2.1", 8080)
        old_ids = {name: programs.map_id(rt.table(name, "lbrp").get_fd())  # type: ignore[attr-defined]
                   for name in ("lb_services", "lb_slots", "lb_vips", "lb_cfgs")}
        rt.save()
        rt.abandon()
        rt2 = Runtime(net.name, netns=net.name, pin_root=net.pin_root,
                      defines=LbSizes(services=32, backends=256).defines())
        try:
            rt2.open()
            net.rt = rt2
            assert rt2.adopted
            assert rt2.resized == {"lb_services", "lb_slots", "lb_vips"}
            assert _kernel_size(rt2, "lb_services") == 32
            assert _kernel_size(rt2, "lb_slots") == 256
            # the other pinned maps (the lbrp's configuration...) were adopted
            assert programs.map_id(rt2.table("lb_cfgs", "lbrp").get_fd()) == \
                old_ids["lb_cfgs"]  # type: ignore[attr-defined]
            assert programs.map_id(rt2.table("lb_services", "lbrp").get_fd()) != \
                old_ids["lb_services"]  # type: ignore[attr-defined]
            again = _build(net, rt2)
            assert len(list(rt2.table("lb_services", "lbrp").items())) == 2
            assert len(list(rt2.table("lb_slots", "lbrp").items())) == 1 + 64
            assert again.syn("10.96.0.1", 42001) == (TC_ACT_REDIRECT, "10.244.2.1", 8080)
            assert again.syn("10.96.0.2", 42002)[0] == TC_ACT_REDIRECT
            # and reopening with the same sizes adopts without remaking anything
            rt2.save()
            rt2.abandon()
            rt3 = Runtime(net.name, netns=net.name, pin_root=net.pin_root,
                          defines=LbSizes(services=32, backends=256).defines())
            rt2 = rt3
            rt3.open()
            net.rt = rt3
            assert rt3.adopted and rt3.resized == set()
            third = _build(net, rt3)
            assert third.syn("10.96.0.1", 42003) == (TC_ACT_REDIRECT, "10.244.2.1", 8080)
        finally:
            rt2.close()


def test_a_module_built_with_other_sizes_than_the_runtime_is_refused() -> None:
    """Every compile of a runtime must see the tables at the runtime's sizes
    (BCC would silently use the pinned map): one that declares others fails."""
    with unit_net(veths=1, defines=LbSizes(services=16, backends=64).defines()) as net:
        net.rt.load_type("lbrp")
        from pcn_agent.dataplane.compiler import CompileError

        with pytest.raises(CompileError, match="lb_services 16 != 32"):
            net.rt.load_variant("k8sdispatcher", LbSizes(services=32, backends=64).defines())
    assert ct.sizeof(maps.Svc) == 16
