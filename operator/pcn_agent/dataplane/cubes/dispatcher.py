"""Control of the `k8sdispatcher` cube: node addresses, cluster networks,
NodePort rules, pods' hostPorts and masquerading (see bpf/k8sdispatcher.c)."""

from __future__ import annotations

import ctypes as ct
import ipaddress
from dataclasses import asdict, dataclass

from pcn_agent.dataplane import maps
from pcn_agent.dataplane.cubes.lbrp import Backend, ServiceTable, be16, from_be16, proto_number
from pcn_agent.dataplane.runtime import Runtime

TYPE = "k8sdispatcher"
POLICIES = {"Cluster": 0, "Local": 1}
POLICY_HOSTPORT = 2  # k8sdispatcher.c DISP_POLICY_HOSTPORT: Local, at any port
POLICY_ENDPOINT = 3  # k8sdispatcher.c DISP_POLICY_ENDPOINT: a hostNetwork endpoint's port
WILDCARD_HOST_IPS = ("", "0.0.0.0")  # a hostPort with no hostIP: every node address
LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
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


@dataclass(frozen=True)
class HostPort:
    """One hostPort of a pod (the CNI `portMappings` capability, as kubelet
    and containerd pass a container's ports[].hostPort): traffic to
    host_ip:port/proto on this node goes to pod_ip:container_port.

    host_ip: "" or "0.0.0.0" (every address of the node: its node IP and
        127.0.0.1), the node IP, or a loopback address (127.0.0.0/8: the
        node's own stack only). owner: the attachment (CNI container id) it
        belongs to; pod: "namespace/name" (or the container id), for errors.
    """

    host_ip: str
    port: int
    proto: str
    pod_ip: str
    container_port: int
    owner: str
    pod: str = ""


class HostPortError(ValueError):
    """A hostPort that cannot be installed (bad address or port)."""


class HostPortConflict(HostPortError):
    """A hostPort that another live pod (or a NodePort) holds already."""


def _overlap(a: HostPort, b: HostPort) -> bool:
    """Whether two hostPorts claim the same traffic: the same port and
    protocol on the same hostIP, or either without one (kubelet's scheduler
    sees 0.0.0.0 as every address: k8s.io/kube-scheduler framework
    HostPortInfo.CheckConflict)."""
    if (a.port, a.proto) != (b.port, b.proto):
        return False
    return a.host_ip in WILDCARD_HOST_IPS or b.host_ip in WILDCARD_HOST_IPS or \
        a.host_ip == b.host_ip


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
        self.hostports: list[HostPort] = [HostPort(**h)
                                          for h in self.cube.config.get("hostports", [])]
        self._ports = tuple(self.cube.config.get("ports", (0, 0)))
        self._endpoint_ports: set[tuple[int, str]] = {
            (int(p), str(proto)) for p, proto in self.cube.config.get("endpoint_ports", [])}
        self._sync_endpoint_ports()  # an older agent's cube has none

    def save(self) -> None:
        self.cube.config = {"nodeports": [asdict(n) for n in self.nodeports.values()],
                            "hostports": [asdict(h) for h in self.hostports],
                            "ports": list(self._ports),
                            "endpoint_ports": sorted(self._endpoint_ports)}

    def _sync_endpoint_ports(self) -> None:
        """Mark the ports of this node's hostNetwork NodePort endpoints (the
        node's own address among a NodePort's backends) that no NodePort or
        hostPort holds: a flow from outside straight to one of them whose
        replies clash with a NodePort session's gets its source port remapped
        (bpf/k8sdispatcher.c disp_nodeport, DISP_POLICY_ENDPOINT). Other ports cost no lookup."""
        ip = self.cfg.node_ip
        held = set(self.nodeports) | {(h.port, h.proto) for h in self.hostports
                                      if ip in self.hostport_addresses(h.host_ip)}
        wanted = {(b.port, n.proto) for n in self.nodeports.values() for b in n.backends
                  if b.ip == ip} - held
        for port, proto in self._endpoint_ports - wanted:
            key = maps.NodePortKey(self.cube.id, be16(port), proto_number(proto))
            try:
                ours = self._nodeports[key].policy == POLICY_ENDPOINT
            except KeyError:
                ours = False
            if ours:  # else a NodePort or hostPort took the port over
                maps.discard(self._nodeports, key)
        for port, proto in wanted - self._endpoint_ports:
            self._nodeports[maps.NodePortKey(self.cube.id, be16(port), proto_number(proto))] = \
                ct.c_uint32(POLICY_ENDPOINT)
        self._endpoint_ports = wanted

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
        the backends in this node's pod CIDR and the node's own address, a
        hostNetwork server) and its client address is kept. An endpoint that
        is no pod is served as kube-proxy does: the node's own address through
        its host stack, any other from the node's address.
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
        for h in self.hostports:
            if (h.port, h.proto) == (port, proto.lower()) and \
                    self.cfg.node_ip in self.hostport_addresses(h.host_ip):
                raise ValueError(f"NodePort {port}/{proto.lower()} is pod {h.pod or h.owner}'s "
                                 f"hostPort on this node; choose another nodePort")
        if policy not in POLICIES:
            raise ValueError(f"externalTrafficPolicy must be Cluster or Local, not {policy!r}")
        proto = proto.lower()
        if local is None:
            local_net = ipaddress.IPv4Network(self.cfg.local_pods)
            mine = [b for b in backends if ipaddress.IPv4Address(b.ip) in local_net
                    or b.ip == self.cfg.node_ip]
        else:
            mine = list(local)
        ip = self.cfg.node_ip
        self.services.check_room([(ip, port, proto, False, backends),
                                  *([(ip, port, proto, True, mine)] if policy == "Local" else [])])
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
        self._sync_endpoint_ports()
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
        self._sync_endpoint_ports()
        self.save()
        return found

    # ---------------------------------------------------------------- hostPorts
    def hostport_addresses(self, host_ip: str) -> tuple[str, ...]:
        """The addresses a hostPort with `host_ip` is served on: the node IP
        and 127.0.0.1 for none ("" or 0.0.0.0, as the portmap plugin matches
        every local address), else host_ip itself, which must be the node IP
        or a loopback address. Raises HostPortError for any other."""
        if host_ip in WILDCARD_HOST_IPS:
            return (self.cfg.node_ip, "127.0.0.1")
        try:
            ip = ipaddress.IPv4Address(host_ip)
        except ValueError:
            raise HostPortError(f"hostIP {host_ip!r} is not an IPv4 address (pcn is IPv4 "
                                f"only)") from None
        if str(ip) == self.cfg.node_ip or ip in LOOPBACK:
            return (str(ip),)
        raise HostPortError(f"hostIP {host_ip} is not an address pcn serves on this node: use "
                            f"the node IP {self.cfg.node_ip}, 127.0.0.1, or none (every "
                            f"address)")

    def _hostport_keys(self, h: HostPort) -> set[tuple[str, int, str]]:
        return {(a, h.port, h.proto) for a in self.hostport_addresses(h.host_ip)}

    def hostport_service_keys(self) -> set[tuple[str, int, str]]:
        """The service table entries (address, port, proto) that hostPorts own."""
        keys: set[tuple[str, int, str]] = set()
        for h in self.hostports:
            keys |= self._hostport_keys(h)
        return keys

    def set_hostports(self, owner: str, mappings: list[HostPort]) -> None:
        """Make `owner`'s hostPorts exactly `mappings` (idempotent; [] removes
        them). Traffic to host_ip:port/proto from outside (the NIC), from pods
        (hairpin included) and from the node itself (its address, and
        127.0.0.1 through lo) goes to the pod, with the client's address kept
        from outside: a NodePort with externalTrafficPolicy Local and one
        endpoint, at any port (bpf/k8sdispatcher.c DISP_POLICY_HOSTPORT).
        Raises HostPortError for an address pcn does not serve and
        HostPortConflict, naming the other pod, when another owner holds the
        same port and protocol on an overlapping address (no hostIP overlaps
        every one, as kubelet's scheduler sees it) or a NodePort holds it;
        nothing changes then."""
        wanted: dict[tuple[str, int, str], HostPort] = {}
        for m in mappings:
            if m.owner != owner:
                raise HostPortError(f"hostPort {m.port} belongs to {m.owner}, not {owner}")
            if not 1 <= m.port <= 65535 or not 1 <= m.container_port <= 65535:
                raise HostPortError(f"hostPort {m.port} -> containerPort {m.container_port}: "
                                    f"ports are 1-65535")
            if m.proto not in ("tcp", "udp"):
                raise HostPortError(f"hostPort {m.port}/{m.proto}: pcn translates TCP and UDP "
                                    f"hostPorts only")
            ipaddress.IPv4Address(m.pod_ip)
            for key in self._hostport_keys(m):
                if key in wanted and wanted[key] != m:
                    raise HostPortConflict(f"hostPort {key[1]}/{key[2]} on {key[0]} is listed "
                                           f"twice for pod {m.pod or owner}")
                wanted[key] = m
        for m in mappings:
            for other in self.hostports:
                if other.owner != owner and _overlap(m, other):
                    raise HostPortConflict(
                        f"hostPort {m.port}/{m.proto} on {m.host_ip or '0.0.0.0'} is already "
                        f"taken by pod {other.pod or other.owner} on this node (its hostIP "
                        f"{other.host_ip or '0.0.0.0'}); use another hostPort, hostIP or "
                        f"protocol")
        for key, m in wanted.items():
            if key[0] == self.cfg.node_ip and (m.port, m.proto) in self.nodeports:
                raise HostPortConflict(f"hostPort {m.port}/{m.proto} is a NodePort of this "
                                       f"cluster; use another hostPort")
        mine = [h for h in self.hostports if h.owner == owner]
        gone = {k for h in mine for k in self._hostport_keys(h)} - set(wanted)
        for vip, port, proto in gone:
            self.services.delete(vip, port, proto)
            if vip == self.cfg.node_ip:
                self.services.delete(vip, port, proto, external=True)
                maps.discard(self._nodeports,
                             maps.NodePortKey(self.cube.id, be16(port), proto_number(proto)))
        for (vip, port, proto), m in wanted.items():
            backend = [Backend(m.pod_ip, m.container_port)]
            self.services.set(vip, port, proto, backend)
            if vip == self.cfg.node_ip:
                self.services.set(vip, port, proto, backend, external=True)
                self._nodeports[maps.NodePortKey(self.cube.id, be16(port),
                                                 proto_number(proto))] = \
                    ct.c_uint32(POLICY_HOSTPORT)
        self.hostports = [h for h in self.hostports if h.owner != owner] + \
            list(dict.fromkeys(mappings))
        self._sync_endpoint_ports()
        self.save()

    def sessions(self) -> list[dict[str, str | int]]:
        from pcn_agent.dataplane.cubes.lbrp import SESSION_KINDS

        out: list[dict[str, str | int]] = []
        for k, v in self._sessions.items():
            out.append({"kind": SESSION_KINDS.get(v.kind, str(v.kind)), "proto": k.proto,
                        "from": f"{maps.ip_str(k.saddr)}:{from_be16(k.sport)}",
                        "to": f"{maps.ip_str(k.daddr)}:{from_be16(k.dport)}",
                        "rewrite": f"{maps.ip_str(v.ip)}:{from_be16(v.port)}"})
        return out
