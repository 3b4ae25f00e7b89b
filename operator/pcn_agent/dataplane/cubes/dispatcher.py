"""Control of the `k8sdispatcher` cube: node addresses, cluster networks,
NodePort rules and masquerading (see bpf/k8sdispatcher.c)."""

from __future__ import annotations

import ctypes as ct
import ipaddress
from dataclasses import asdict, dataclass

from pcn_agent.dataplane import maps
from pcn_agent.dataplane.cubes.lbrp import Backend, ServiceTable, be16, from_be16, proto_number
from pcn_agent.dataplane.runtime import Runtime

TYPE = "k8sdispatcher"
POLICIES = {"Cluster": 0, "Local": 1}
NET_POD, NET_NO_SNAT = 1, 2


@dataclass(frozen=True)
class DispatcherConfig:
    node_ip: str
    vtep_ip: str
    local_pods: str                 # this node's pod CIDR
    pod_networks: tuple[str, ...]   # sources that are masqueraded (the cluster pod CIDR)
    no_snat: tuple[str, ...]        # destinations never masqueraded (pods, services, VTEPs)
    nodeport_range: tuple[int, int] = (30000, 32767)
    snat_range: tuple[int, int] = (61000, 65535)


@dataclass(frozen=True)
class NodePort:
    port: int
    proto: str
    policy: str
    backends: tuple[Backend, ...]
    local: tuple[Backend, ...] | None = None  # this node's, if given (else by pod CIDR)
    affinity_timeout_s: int = 0  # sessionAffinity ClientIP (0: none)


class Dispatcher:
    def __init__(self, rt: Runtime, name: str, services: ServiceTable,
                 cfg: DispatcherConfig) -> None:
        self.rt = rt
        self.name = name
        self.services = services
        self.cfg = cfg
        self.cube = rt.cube(name) if name in rt.cubes else rt.add_cube(name, TYPE)
        self._cfgs = rt.table("disp_cfgs", TYPE)
        self._nets = rt.table("disp_nets", TYPE)
        self._nodeports = rt.table("disp_nodeports", TYPE)
        self._sessions = rt.table("nat_sessions", TYPE)
        services.session_tables.append(self._sessions)  # NodePort sessions live here
        self.nodeports: dict[tuple[int, str], NodePort] = {}
        for n in self.cube.config.get("nodeports", []):
            local = n.get("local")
            np_ = NodePort(n["port"], n["proto"], n["policy"],
                           tuple(Backend(**b) for b in n["backends"]),
                           None if local is None else tuple(Backend(**b) for b in local),
                           int(n.get("affinity_timeout_s", 0)))
            self.nodeports[(np_.port, np_.proto)] = np_
        self._ports = tuple(self.cube.config.get("ports", (0, 0)))

    def save(self) -> None:
        self.cube.config = {"nodeports": [asdict(n) for n in self.nodeports.values()],
                            "ports": list(self._ports)}

    def configure(self, uplink_port: int, overlay_port: int) -> None:
        """Write the node's addresses and networks (idempotent)."""
        c = self.cfg
        local = ipaddress.IPv4Network(c.local_pods)
        v = maps.DispCfg(maps.ip_be(c.node_ip), maps.ip_be(c.vtep_ip),
                    maps.ip_be(local.network_address), maps.ip_be(local.netmask),
                    uplink_port, overlay_port, c.nodeport_range[0], c.nodeport_range[1],
                    c.snat_range[0], c.snat_range[1])
        self._cfgs[ct.c_uint32(self.cube.id)] = v
        kinds: dict[ipaddress.IPv4Network, int] = {}
        for n in c.pod_networks:
            net = ipaddress.IPv4Network(n)
            kinds[net] = kinds.get(net, 0) | NET_POD
        for n in c.no_snat:
            net = ipaddress.IPv4Network(n)
            kinds[net] = kinds.get(net, 0) | NET_NO_SNAT
        for net, kind in kinds.items():
            key = maps.NetKey(32 + net.prefixlen, self.cube.id, maps.ip_be(net.network_address))
            self._nets[key] = ct.c_uint32(kind)
        self._ports = (uplink_port, overlay_port)
        self.save()

    def set_nodeport(self, port: int, proto: str, policy: str, backends: list[Backend],
                     local: list[Backend] | None = None,
                     affinity_timeout_s: int = 0) -> NodePort:
        """Expose `backends` (the Service's Cluster endpoints) at `port` of the
        node's address. Traffic from outside the cluster gets all of them with
        the Cluster policy; with Local only this node's (`local`, by default
        the backends in this node's pod CIDR) and its client address is kept.
        Pods and the node itself reaching the NodePort get all of them whatever
        the policy (kube-proxy short-circuits cluster-internal traffic to the
        Cluster endpoints, pkg/proxy/nftables/proxier.go). With no backend a
        connection is rejected; under Local with backends on other nodes only,
        traffic from outside is dropped (kube-proxy's "no local endpoints").
        `affinity_timeout_s` is the Service's ClientIP session affinity, which
        kube-proxy applies to its NodePorts as to its cluster IP."""
        lo, hi = self.cfg.nodeport_range
        if not lo <= port <= hi:
            raise ValueError(f"NodePort {port} is outside the configured range {lo}-{hi}")
        if policy not in POLICIES:
            raise ValueError(f"externalTrafficPolicy must be Cluster or Local, not {policy!r}")
        proto = proto.lower()
        if local is None:
            local_net = ipaddress.IPv4Network(self.cfg.local_pods)
            mine = [b for b in backends if ipaddress.IPv4Address(b.ip) in local_net]
        else:
            mine = list(local)
        self.services.set(self.cfg.node_ip, port, proto, backends, affinity_timeout_s)
        if policy == "Local":
            self.services.set(self.cfg.node_ip, port, proto, mine, affinity_timeout_s,
                              external=True, drop_if_empty=bool(backends) and not mine)
        else:
            self.services.delete(self.cfg.node_ip, port, proto, external=True)
        self._nodeports[maps.NodePortKey(self.cube.id, be16(port), proto_number(proto))] = \
            ct.c_uint32(POLICIES[policy])
        np_ = NodePort(port, proto, policy, tuple(backends),
                       None if local is None else tuple(local), affinity_timeout_s)
        self.nodeports[(port, proto)] = np_
        self.save()
        return np_

    def delete_nodeport(self, port: int, proto: str) -> bool:
        proto = proto.lower()
        found = self.nodeports.pop((port, proto), None) is not None
        try:
            del self._nodeports[maps.NodePortKey(self.cube.id, be16(port), proto_number(proto))]
        except KeyError:
            pass
        self.services.delete(self.cfg.node_ip, port, proto)
        self.services.delete(self.cfg.node_ip, port, proto, external=True)
        self.save()
        return found

    def sessions(self) -> list[dict[str, str | int]]:
        from pcn_agent.dataplane.cubes.lbrp import SESSION_KINDS

        out: list[dict[str, str | int]] = []
        for k, v in self._sessions.items():
            out.append({"kind": SESSION_KINDS.get(v.kind, str(v.kind)), "proto": k.proto,
                        "from": f"{maps.ip_str(k.saddr)}:{from_be16(k.sport)}",
                        "to": f"{maps.ip_str(k.daddr)}:{from_be16(k.dport)}",
                        "rewrite": f"{maps.ip_str(v.ip)}:{from_be16(v.port)}"})
        return out
