"""Control of `router` cubes: addressed ports, connected and static routes,
the neighbour (ARP) table."""

from __future__ import annotations

import ctypes as ct
import ipaddress
from dataclasses import dataclass

from pcn_agent.dataplane import maps
from pcn_agent.dataplane.runtime import PortState, Runtime, RuntimeError_

TYPE = "router"
UNREACHABLE = ""  # Route.port of a route that drops what matches it


@dataclass(frozen=True)
class Route:
    network: ipaddress.IPv4Network
    port: str
    nexthop: ipaddress.IPv4Address | None


class Router:
    def __init__(self, rt: Runtime, name: str) -> None:
        self.rt = rt
        self.name = name
        adopted = name in rt.cubes
        self.cube = rt.cube(name) if adopted else rt.add_cube(name, TYPE)
        self._routes = rt.table("router_routes", TYPE)
        self._neigh = rt.table("router_neigh", TYPE)
        self._addrs = rt.table("router_addrs", TYPE)
        self._mtus = rt.table("router_mtus", TYPE)
        self.routes: dict[ipaddress.IPv4Network, Route] = {}
        for r in self.cube.config.get("routes", []) if adopted else []:
            net = ipaddress.IPv4Network(r["network"])
            nh = ipaddress.IPv4Address(r["nexthop"]) if r["nexthop"] else None
            self.routes[net] = Route(net, r["port"], nh)
        self._save()

    def _save(self) -> None:
        self.cube.config = {"routes": [
            {"network": str(r.network), "port": r.port,
             "nexthop": str(r.nexthop) if r.nexthop else None} for r in self.routes.values()]}

    # ports ---------------------------------------------------------------
    def add_port(self, port_name: str, address: str, mac: str | None = None,
                 flags: int = 0, mtu: int | None = None) -> PortState:
        """`address` is interface notation, e.g. 10.244.1.1/24: the port's IP and
        its directly connected network. The router answers pings to its
        addresses, except on a port that shares its netdev with the host
        (PORT_HOST_SHARED): that address is the host's, and what is sent to
        it is the host's to answer. `mtu`: see set_mtu."""
        iface = ipaddress.IPv4Interface(address)
        port = self.rt.add_port(self.name, port_name, mac=mac, ip=str(iface.ip),
                                prefixlen=iface.network.prefixlen, flags=flags)
        if not flags & maps.PORT_HOST_SHARED:
            self._addrs[maps.RouterAddrKey(self.cube.id, maps.ip_be(iface.ip))] = \
                ct.c_uint32(port.id)
        if mtu is not None:
            self.set_mtu(port_name, mtu)
        self.add_route(str(iface.network), port_name)
        return port

    def set_mtu(self, port_name: str, mtu: int | None) -> None:
        """The MTU (bytes of IP datagram) of what lies behind port `port_name`,
        or None to forget it (idempotent). A port peered with a netdev needs
        none: the router reads that netdev's MTU from the kernel when a packet
        leaves (bpf_check_mtu), so a later `ip link set mtu` is followed. A
        port peered with another cube's port has no netdev to ask (the pods'
        port, behind which the bridge leads to the pods' veths): give it the
        MTU of those. A packet that does not fit is answered with ICMP
        fragmentation needed carrying this MTU when it has DF set (RFC 1191),
        otherwise handed to the host stack to fragment when it came in by the
        node's NIC, or dropped (bpf/router.c). Raises ValueError below 68, the
        least MTU of IPv4 (RFC 791), or above 65535."""
        port = self.port(port_name)
        key = ct.c_uint32(port.id)
        if mtu is None:
            maps.discard(self._mtus, key)
            return
        if not 68 <= mtu <= 65535:
            raise ValueError(f"MTU {mtu} of port {port_name} is not within 68..65535")
        self._mtus[key] = ct.c_uint32(mtu)

    def mtu(self, port_name: str) -> int | None:
        """The MTU set with set_mtu, or None."""
        try:
            return int(self._mtus[ct.c_uint32(self.port(port_name).id)].value)
        except KeyError:
            return None

    def port(self, port_name: str) -> PortState:
        return self.rt.port(self.name, port_name)

    def remove_port(self, port_name: str) -> None:
        port = self.port(port_name)
        for net, r in list(self.routes.items()):
            if r.port == port_name:
                self.remove_route(str(net))
        if port.ip:
            maps.discard(self._addrs, maps.RouterAddrKey(self.cube.id, maps.ip_be(port.ip)))
        maps.discard(self._mtus, ct.c_uint32(port.id))
        for k, v in list(self._neigh.items()):
            if k.cube == self.cube.id and v.port == port.id:
                del self._neigh[k]
        self.rt.remove_port(self.name, port_name)

    # routes --------------------------------------------------------------
    def add_route(self, cidr: str, port_name: str, nexthop: str | None = None) -> Route:
        """Add or replace the route for `cidr` (idempotent)."""
        net = ipaddress.IPv4Network(cidr, strict=True)
        port = self.port(port_name)
        nh = ipaddress.IPv4Address(nexthop) if nexthop else None
        if nh is not None and port.ip:
            connected = ipaddress.IPv4Interface(f"{port.ip}/{port.prefixlen}").network
            if nh not in connected:
                raise RuntimeError_(f"next hop {nh} is not on port {port_name}'s network {connected}")
        value = maps.RouterRoute(port.id, maps.ip_be(nh) if nh else 0)
        self._routes[self._route_key(net)] = value
        route = Route(net, port_name, nh)
        self.routes[net] = route
        self._save()
        return route

    def add_unreachable(self, cidr: str) -> Route:
        """A route that drops what it matches, counted as "no route" (like an
        `unreachable` route in Linux, without the ICMP answer): for a range
        that only more specific routes may carry, such as the cluster's pod
        CIDR, which the default route would otherwise send out of the NIC
        with whatever source it has (idempotent)."""
        net = ipaddress.IPv4Network(cidr, strict=True)
        self._routes[self._route_key(net)] = maps.RouterRoute(0, 0)
        route = Route(net, UNREACHABLE, None)
        self.routes[net] = route
        self._save()
        return route

    def remove_route(self, cidr: str) -> None:
        net = ipaddress.IPv4Network(cidr, strict=True)
        maps.discard(self._routes, self._route_key(net))
        self.routes.pop(net, None)
        self._save()

    def _route_key(self, net: ipaddress.IPv4Network) -> maps.RouterRouteKey:
        return maps.RouterRouteKey(32 + net.prefixlen, self.cube.id, maps.ip_be(net.network_address))

    # neighbours ----------------------------------------------------------
    def neighbors(self) -> dict[str, str]:
        return {maps.ip_str(k.ip): maps.mac_str(v.mac)
                for k, v in self._neigh.items() if k.cube == self.cube.id}

    def neighbor(self, ip: str) -> str | None:
        try:
            v = self._neigh[maps.RouterNeighKey(self.cube.id, maps.ip_be(ip))]
        except KeyError:
            return None
        return maps.mac_str(v.mac)

    def delete(self) -> None:
        for net in list(self.routes):
            self.remove_route(str(net))
        for port_name in list(self.cube.ports):
            self.remove_port(port_name)
        self.rt.remove_cube(self.name)

