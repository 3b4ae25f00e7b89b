"""Services and the `lbrp` cube.

`ServiceTable` owns the node-wide service maps (lb_services, lb_slots) that
both the lbrp (ClusterIP, stacked on every pod port) and the k8sdispatcher
(NodePort) read. A service is a few map updates, whatever the number of pods.
"""

from __future__ import annotations

import builtins
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from pcn_agent.dataplane import maps
from pcn_agent.dataplane.runtime import Runtime, RuntimeError_

TYPE = "lbrp"
PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132}
MAX_SLOTS_PER_SERVICE = 1024
MAX_SERVICES = 65535


AFFINITY_CLIENT_IP = 1
SESSION_KINDS = {1: "lb", 2: "lb-reverse", 3: "snat", 4: "snat-reverse", 5: "nodeport",
                 6: "nodeport-reverse"}
# pcn_session.h's PCN_SESS_*: the kinds of a Service's sessions, by direction
SESSION_LB, SESSION_LB_REV, SESSION_NODEPORT, SESSION_NODEPORT_REV = 1, 2, 5, 6
UDP = PROTOCOLS["udp"]


def proto_number(proto: str | int) -> int:
    if isinstance(proto, int):
        return proto
    try:
        return PROTOCOLS[proto.lower()]
    except KeyError:
        raise ValueError(f"unknown protocol {proto!r}; use one of {', '.join(PROTOCOLS)}") from None


def be16(port: int) -> int:
    return int.from_bytes(port.to_bytes(2, "big"), "little")


def from_be16(value: int) -> int:
    return int.from_bytes(int(value).to_bytes(2, "little"), "big")


@dataclass(frozen=True)
class Backend:
    ip: str
    port: int
    weight: int = 1

    def __post_init__(self) -> None:
        ipaddress.IPv4Address(self.ip)
        if not 1 <= self.port <= 65535:
            raise ValueError(f"backend port {self.port} outside 1-65535")
        if not 0 <= self.weight <= 1_000_000:
            raise ValueError(f"backend weight {self.weight} outside 0-1000000")


@dataclass
class Service:
    id: int
    vip: str
    port: int
    proto: str
    backends: list[Backend] = field(default_factory=list)
    affinity_timeout_s: int = 0  # 0: no session affinity
    n_slots: int = 0


def weighted_slots(backends: list[Backend], limit: int = MAX_SLOTS_PER_SERVICE) -> list[Backend]:
    """The slot table of a service: each backend appears in proportion to its
    weight (largest remainder), interleaved. Equal weights give one slot each."""
    live = [b for b in backends if b.weight > 0]
    if not live:
        return []
    if len({b.weight for b in live}) == 1:
        return sorted(live, key=lambda b: (b.ip, b.port))
    n = min(limit, max(64, 8 * len(live)))
    total = sum(b.weight for b in live)
    exact = [b.weight * n / total for b in live]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(live)), key=lambda i: exact[i] - counts[i], reverse=True):
        if sum(counts) >= n:
            break
        counts[i] += 1
    slots: list[Backend] = []
    remaining = counts[:]
    while any(remaining):  # round-robin so no backend owns a long run of slots
        for i, b in enumerate(live):
            if remaining[i]:
                slots.append(b)
                remaining[i] -= 1
    return slots


class ServiceTable:
    """The node's services (ClusterIP and NodePort), keyed by (vip, port, proto)."""

    def __init__(self, rt: Runtime, module_type: str,
                 state: dict[str, Any] | None = None) -> None:
        self.rt = rt
        self._svcs = rt.table("lb_services", module_type)
        self._slots = rt.table("lb_slots", module_type)
        self._sessions = rt.table("lb_sessions", module_type)
        self._affinity = rt.table("lb_affinity", module_type)
        # Every table holding sessions of these services (the dispatcher adds
        # its NodePort sessions' table): UDP flows leave with their backend.
        self.session_tables: list[maps.BpfTable] = [self._sessions]
        self.services: dict[tuple[str, int, str], Service] = {}
        for s in (state or {}).get("services", []):
            svc = Service(s["id"], s["vip"], s["port"], s["proto"],
                          [Backend(**b) for b in s["backends"]], s["affinity_timeout_s"],
                          s["n_slots"])
            self.services[(svc.vip, svc.port, svc.proto)] = svc
        used = {svc.id for svc in self.services.values()}
        self._free_ids = [i for i in range(MAX_SERVICES, 0, -1) if i not in used]

    def snapshot(self) -> dict[str, Any]:
        """What save() records: asdict() of every Service, written out by hand
        (asdict's generic recursion cost seconds for thousands of services)."""
        return {"services": [
            {"id": s.id, "vip": s.vip, "port": s.port, "proto": s.proto,
             "backends": [{"ip": b.ip, "port": b.port, "weight": b.weight} for b in s.backends],
             "affinity_timeout_s": s.affinity_timeout_s, "n_slots": s.n_slots}
            for s in self.services.values()]}

    def set(self, vip: str, port: int, proto: str, backends: list[Backend],
            affinity_timeout_s: int = 0) -> Service:
        """Create or update a service (idempotent). Established connections keep
        their backend: only new flows see the new slot table."""
        ipaddress.IPv4Address(vip)
        if not 1 <= port <= 65535:
            raise ValueError(f"service port {port} outside 1-65535")
        proto = proto.lower()
        pnum = proto_number(proto)
        key = (vip, port, proto)
        svc = self.services.get(key)
        existed = svc is not None
        if svc is None:
            if not self._free_ids:
                raise RuntimeError_("service table full")
            svc = Service(self._free_ids.pop(), vip, port, proto)
        slots = weighted_slots(backends)
        for i, b in enumerate(slots):
            self._slots[maps.SlotKey(svc.id, i)] = maps.BackendVal(maps.ip_be(b.ip), be16(b.port))
        value = maps.Svc(svc.id, len(slots), AFFINITY_CLIENT_IP if affinity_timeout_s else 0,
                    affinity_timeout_s)
        self._svcs[maps.SvcKey(maps.ip_be(vip), be16(port), pnum)] = value
        for i in range(len(slots), svc.n_slots):
            maps.discard(self._slots, maps.SlotKey(svc.id, i))
        if existed:  # clients must not stick to a backend that left
            keep = {(maps.ip_be(b.ip), be16(b.port)) for b in slots}
            self._forget_affinity(svc.id, keep)
            gone = {(maps.ip_be(b.ip), be16(b.port)) for b in svc.backends} - keep
            if gone:
                self._forget_udp_sessions(svc, keep)
        svc.backends, svc.affinity_timeout_s, svc.n_slots = list(backends), affinity_timeout_s, len(slots)
        self.services[key] = svc
        return svc

    def delete(self, vip: str, port: int, proto: str) -> bool:
        key = (vip, port, proto.lower())
        svc = self.services.pop(key, None)
        if svc is None:
            return False
        maps.discard(self._svcs, maps.SvcKey(maps.ip_be(vip), be16(port), proto_number(key[2])))
        for i in range(svc.n_slots):
            maps.discard(self._slots, maps.SlotKey(svc.id, i))
        # the id goes to the next new service: so would the clients stuck to it
        self._forget_affinity(svc.id, set())
        self._forget_udp_sessions(svc, set())
        self._free_ids.append(svc.id)
        return True

    # builtins.set: in this class, `set` names the method above
    def _forget_affinity(self, svc_id: int, keep: builtins.set[tuple[int, int]]) -> None:
        """Drop the client -> backend choices that session affinity remembers for
        service `svc_id`, except those for a backend in `keep` ((ip, port) as
        the map holds them). Only services with affinity have entries, so the
        walk is short unless many clients use such services."""
        for k, v in list(self._affinity.items()):
            if k.svc == svc_id and (v.backend.ip, v.backend.port) not in keep:
                maps.discard(self._affinity, k)

    def _forget_udp_sessions(self, svc: Service, keep: builtins.set[tuple[int, int]]) -> None:
        """Remove the UDP sessions of `svc` whose backend is not in `keep`, both
        directions, as kube-proxy clears UDP conntrack entries of endpoints
        that leave a Service (pkg/proxy conntrack cleanup): a connected UDP
        socket keeps sending to the VIP and must reach a live backend, not
        the session of one that is gone. TCP sessions stay: a terminating
        backend may still finish its connections, and a vanished one resets them."""
        if svc.proto != "udp":
            return
        fwd, rev = (SESSION_LB, SESSION_NODEPORT), (SESSION_LB_REV, SESSION_NODEPORT_REV)
        for table in self.session_tables:
            for k, v in list(table.items()):
                if v.svc != svc.id or k.proto != UDP:
                    continue
                if v.kind in fwd:
                    backend = (v.ip, v.port)
                elif v.kind in rev:
                    backend = (k.saddr, k.sport)  # the reply comes from the backend
                else:
                    continue
                if backend not in keep:
                    maps.discard(table, k)

    def sessions(self) -> list[dict[str, str | int]]:
        """Load-balanced connections: client, service address, backend."""
        out: list[dict[str, str | int]] = []
        for k, v in self._sessions.items():
            if v.kind != 1:
                continue
            out.append({"client": f"{maps.ip_str(k.saddr)}:{from_be16(k.sport)}",
                        "service": f"{maps.ip_str(k.daddr)}:{from_be16(k.dport)}",
                        "backend": f"{maps.ip_str(v.ip)}:{from_be16(v.port)}",
                        "proto": k.proto})
        return out


class LoadBalancer:
    """The lbrp cube: one instance per node, stacked on every pod port."""

    def __init__(self, rt: Runtime, name: str) -> None:
        self.rt = rt
        self.name = name
        if name in rt.cubes:  # adopted from a previous agent
            self.cube = rt.cube(name)
        else:
            self.cube = rt.add_cube(name, TYPE)
        self.services = ServiceTable(rt, TYPE, self.cube.config)

    def save(self) -> None:
        self.cube.config = self.services.snapshot()

    def set_service(self, vip: str, port: int, proto: str, backends: list[Backend],
                    affinity_timeout_s: int = 0) -> Service:
        svc = self.services.set(vip, port, proto, backends, affinity_timeout_s)
        self.save()
        return svc

    def delete_service(self, vip: str, port: int, proto: str) -> bool:
        found = self.services.delete(vip, port, proto)
        self.save()
        return found
