"""Services and the `lbrp` cube.

`ServiceTable` owns the node-wide service maps (lb_services, lb_slots, lb_vips)
that both the lbrp (ClusterIP, stacked on every pod port and on the router's
host port) and the k8sdispatcher (NodePort) read. A service is a few map
updates, whatever the number of pods.
"""

from __future__ import annotations

import builtins
import ctypes as ct
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from pcn_agent.dataplane import maps
from pcn_agent.dataplane.runtime import Runtime, RuntimeError_
from pcn_agent.dataplane.servicestore import ServiceStore

TYPE = "lbrp"
PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132}
MAX_SLOTS_PER_SERVICE = 1024
# Service ids are u32 in every map (pcn_svc.id, pcn_slot_key.svc, the
# sessions' and affinity keys' svc): the table's size, not the id, bounds
# how many services a node holds.
MAX_SERVICE_ID = 0xFFFFFFFF
# The settings whose values size the tables (pcn_agent.control.settings),
# named in the errors that ask for a larger one.
SERVICES_SETTING = "lbServiceMapMax"
BACKENDS_SETTING = "lbBackendMapMax"
TABLES = ("lb_services", "lb_slots", "lb_vips")  # what ServiceTable writes


@dataclass(frozen=True)
class LbSizes:
    """Sizes of the node-wide service tables (bpf/include/pcn_lb.h), from the
    ConfigMap, compiled in as -D flags (defines()) into every module that
    includes the header (lbrp, k8sdispatcher, sock_lb).

    services: entries of lb_services and lb_vips: one per Service port
        (ClusterIP) and per NodePort entry (internal, and external under a
        Local policy); Cilium's bpf-lb-map-max plays this part. The default,
        131 072, holds 100 000 single-port Services with room for NodePorts.
    backends: entries of lb_slots: one per backend of each service port
        with equal weights, up to 1024 for weighted ones (weighted_slots).
        The default, 1 048 576, holds 100 000 services of 5 backends twice
        over; the map is not preallocated, so slots in use cost memory, the
        size only its buckets.

    Kernel memory at the defaults (fdinfo memlock, Linux 6.18): 29 MiB with
    no service (lb_services 11.0 preallocated, lb_vips 2.0, lb_slots 16.0),
    70 MiB with 100 000 services of 5 backends (11.0, 8.9, 50.3).
    """

    services: int = 131072
    backends: int = 1048576

    def __post_init__(self) -> None:
        for what, v in (("services", self.services), ("backends", self.backends)):
            if not 1 <= v <= MAX_TABLE_ENTRIES:
                raise ValueError(f"{what} table size {v} outside 1-{MAX_TABLE_ENTRIES}")

    def defines(self) -> dict[str, int | str]:
        """-D flags of pcn_lb.h (compiler.cflags)."""
        return {"PCN_LB_SERVICES_MAX": self.services, "PCN_LB_BACKENDS_MAX": self.backends}


# A bound well below what the kernel takes (max_entries is u32; a
# preallocated hash of 2^24 entries is already over a gigabyte).
MAX_TABLE_ENTRIES = 1 << 24


class TableFullError(RuntimeError_):
    """A service that does not fit in the node's tables; nothing of it was
    written. `setting`: the ConfigMap key to raise."""

    def __init__(self, message: str, setting: str) -> None:
        super().__init__(message)
        self.setting = setting


AFFINITY_CLIENT_IP = maps.LB_AFFINITY_CLIENT_IP
SESSION_KINDS = {1: "lb", 2: "lb-reverse", 3: "snat", 4: "snat-reverse", 5: "nodeport",
                 6: "nodeport-reverse", 7: "lb-hairpin-reverse"}
# pcn_session.h's PCN_SESS_*: the kinds of a Service's sessions, by direction
SESSION_LB, SESSION_LB_REV, SESSION_NODEPORT, SESSION_NODEPORT_REV = 1, 2, 5, 6
SESSION_LB_HAIRPIN_REV = 7
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
    # No backend here while the Service has endpoints on other nodes (a Local
    # traffic policy): its traffic is dropped instead of rejected.
    drop_if_empty: bool = False
    # The entry for a NodePort's traffic from outside the cluster (Local
    # policy); the internal one serves pods and the node itself.
    external: bool = False


def _scope(external: bool) -> int:
    return maps.SVC_EXTERNAL if external else maps.SVC_INTERNAL


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
    """The node's services (ClusterIP and NodePort), keyed by (vip, port, proto):
    `services` holds the entries that serve the cluster's own traffic (pods
    and the node: kube-proxy's internal policy, and its short-circuit of
    NodePorts reached from inside), `external` the NodePort entries for
    traffic from outside the cluster under externalTrafficPolicy Local.

    What a restarted agent adopts is `state` (an older agent's snapshot())
    or, with `store`, the store's rows when `state` says {"store": true}
    (LoadBalancer.save); otherwise the store is made to hold `state`'s
    services. With a store, set() and delete() write their own row, so a
    save costs one row per change rather than the whole table."""

    def __init__(self, rt: Runtime, module_type: str,
                 state: dict[str, Any] | None = None, store: ServiceStore | None = None) -> None:
        self.rt = rt
        self.store = store
        self._svcs = rt.table("lb_services", module_type)
        self._slots = rt.table("lb_slots", module_type)
        self._sessions = rt.table("lb_sessions", module_type)
        self._affinity = rt.table("lb_affinity", module_type)
        self._vips = rt.table("lb_vips", module_type)
        # Every table holding sessions of these services (the dispatcher adds
        # its NodePort sessions' table): UDP flows leave with their backend.
        self.session_tables: list[maps.BpfTable] = [self._sessions]
        # Every table of affinity choices by service id (socket load balancing
        # adds its per-netns one while attached, socklb.py): a backend that
        # leaves, or a service that goes, is forgotten in all of them.
        self.affinity_tables: list[maps.BpfTable] = [self._affinity]
        self.services: dict[tuple[str, int, str], Service] = {}
        self.external: dict[tuple[str, int, str], Service] = {}
        rows = (state or {}).get("services", [])
        if store is not None:
            if (state or {}).get("store"):
                rows = store.rows()
            else:  # a new table, or an older agent's: the store starts from it
                store.replace(((r["vip"], r["port"], r["proto"], r.get("external", False)), r)
                              for r in rows)
        for s in rows:
            svc = Service(s["id"], s["vip"], s["port"], s["proto"],
                          [Backend(**b) for b in s["backends"]], s["affinity_timeout_s"],
                          s["n_slots"], s.get("drop_if_empty", False), s.get("external", False))
            self._entries(svc.external)[(svc.vip, svc.port, svc.proto)] = svc
        # How many entries the kernel's tables take (their compiled size).
        self.max_services = int(self._svcs.max_entries)
        self.max_slots = int(self._slots.max_entries)
        # Ids: never used above _next_id; those below it that are free, the
        # last freed first (a restarted agent gives the same ids as the old one).
        used = {svc.id for svc in self._all()}
        self._next_id = max(used, default=0) + 1
        self._free_ids = [i for i in range(self._next_id - 1, 0, -1) if i not in used]
        self.slots_used = sum(svc.n_slots for svc in self._all())
        # The tables were made anew (sized otherwise than the previous agent's,
        # Runtime.resized): every service of the saved state is written again.
        if set(TABLES) & set(getattr(rt, "resized", ())):
            for svc in self._all():
                self._write(svc, weighted_slots(svc.backends))
        # Service ports per internal address (lb_vips holds the addresses);
        # written again on start: the pinned map of an older agent may lack it.
        self._vip_ports: dict[str, int] = {}
        for vip, _, _ in self.services:
            self._vip_ports[vip] = self._vip_ports.get(vip, 0) + 1
        for vip in self._vip_ports:
            self._vips[ct.c_uint32(maps.ip_be(vip))] = ct.c_uint32(1)

    def _entries(self, external: bool) -> dict[tuple[str, int, str], Service]:
        return self.external if external else self.services

    def _all(self) -> list[Service]:
        return [*self.services.values(), *self.external.values()]

    def snapshot(self) -> dict[str, Any]:
        """What save() records without a store: row() of every Service."""
        return {"services": [self.row(s) for s in self._all()]}

    @staticmethod
    def row(s: Service) -> dict[str, Any]:
        """asdict() of a Service, written out by hand (asdict's generic
        recursion cost seconds for thousands of services)."""
        return {"id": s.id, "vip": s.vip, "port": s.port, "proto": s.proto,
                "backends": [{"ip": b.ip, "port": b.port, "weight": b.weight}
                             for b in s.backends],
                "affinity_timeout_s": s.affinity_timeout_s, "n_slots": s.n_slots,
                "drop_if_empty": s.drop_if_empty, "external": s.external}

    def set(self, vip: str, port: int, proto: str, backends: list[Backend],
            affinity_timeout_s: int = 0, *, drop_if_empty: bool = False,
            external: bool = False) -> Service:
        """Create or update a service (idempotent). Established connections keep
        their backend: only new flows see the new slot table. With no backend,
        new connections are rejected (TCP RST, ICMP port unreachable), or
        dropped with `drop_if_empty` (kube-proxy's verdicts for "no endpoints"
        and "no local endpoints"). `external`: the entry for a NodePort's
        traffic from outside the cluster (vip is the node's address), apart
        from the internal one that pods and the node use."""
        ipaddress.IPv4Address(vip)
        if not 1 <= port <= 65535:
            raise ValueError(f"service port {port} outside 1-65535")
        proto = proto.lower()
        proto_number(proto)  # ValueError for an unknown protocol, before anything is written
        key = (vip, port, proto)
        entries = self._entries(external)
        svc = entries.get(key)
        existed = svc is not None
        slots = weighted_slots(backends)
        self._check(f"{vip}:{port}/{proto}", int(svc is None),
                    len(slots) - (svc.n_slots if svc else 0))
        if svc is None:
            svc = Service(self._take_id(), vip, port, proto, external=external)
        svc.affinity_timeout_s, svc.drop_if_empty = affinity_timeout_s, drop_if_empty
        self._write(svc, slots)
        for i in range(len(slots), svc.n_slots):
            maps.discard(self._slots, maps.SlotKey(svc.id, i))
        self.slots_used += len(slots) - svc.n_slots
        if existed:  # clients must not stick to a backend that left
            keep = {(maps.ip_be(b.ip), be16(b.port)) for b in slots}
            self._forget_affinity(svc.id, keep)
            gone = {(maps.ip_be(b.ip), be16(b.port)) for b in svc.backends} - keep
            if gone:
                self._forget_udp_sessions(svc, keep)
        elif not external:
            self._vip_ports[vip] = self._vip_ports.get(vip, 0) + 1
            if self._vip_ports[vip] == 1:
                self._vips[ct.c_uint32(maps.ip_be(vip))] = ct.c_uint32(1)
        svc.backends, svc.n_slots = list(backends), len(slots)
        entries[key] = svc
        if self.store is not None:
            self.store.put((vip, port, proto, external), self.row(svc))
        return svc

    def check_room(self, changes: list[tuple[str, int, str, bool, list[Backend]]]) -> None:
        """TableFullError when the services `changes` would set, (vip, port,
        proto, external, backends) each, do not all fit in the tables: the
        kernel would refuse an update half-way (E2BIG). Writes nothing; a
        caller that sets several entries for one object (a NodePort's
        internal and external ones) asks for all before writing any."""
        new = more_slots = 0
        for vip, port, proto, external, backends in changes:
            svc = self._entries(external).get((vip, port, proto.lower()))
            new += svc is None
            more_slots += len(weighted_slots(backends)) - (svc.n_slots if svc else 0)
        vip, port, proto = changes[0][:3]
        self._check(f"{vip}:{port}/{proto.lower()}", new, more_slots)

    def _check(self, what: str, new: int, more_slots: int) -> None:
        """TableFullError naming service `what` unless `new` more entries and
        `more_slots` more slots fit."""
        n = len(self.services) + len(self.external)
        if new and n + new > self.max_services:
            raise TableFullError(
                f"service {what} does not fit: the node's service table (lb_services) has "
                f"{self.max_services - n} of {self.max_services} entries left, it needs {new}; "
                f"raise the ConfigMap's {SERVICES_SETTING} (now {self.max_services}) and "
                "restart the agents", SERVICES_SETTING)
        if more_slots > 0 and self.slots_used + more_slots > self.max_slots:
            raise TableFullError(
                f"service {what} does not fit: its backends need {more_slots} more slots and "
                f"the backend table (lb_slots) has {self.max_slots - self.slots_used} of "
                f"{self.max_slots} left; raise the ConfigMap's {BACKENDS_SETTING} (now "
                f"{self.max_slots}) and restart the agents", BACKENDS_SETTING)

    def _take_id(self) -> int:
        if self._free_ids:
            return self._free_ids.pop()
        if self._next_id > MAX_SERVICE_ID:
            raise RuntimeError_("service ids exhausted")
        self._next_id += 1
        return self._next_id - 1

    def _write(self, svc: Service, slots: list[Backend]) -> None:
        """Write `svc`'s slot table and its lb_services entry (slots first: a
        packet that finds the entry finds its slots); lb_vips is the
        caller's."""
        for i, b in enumerate(slots):
            self._slots[maps.SlotKey(svc.id, i)] = maps.BackendVal(maps.ip_be(b.ip), be16(b.port))
        flags = (AFFINITY_CLIENT_IP if svc.affinity_timeout_s else 0) | \
            (maps.LB_DROP_EMPTY if svc.drop_if_empty else 0)
        value = maps.Svc(svc.id, len(slots), flags, svc.affinity_timeout_s)
        self._svcs[maps.SvcKey(maps.ip_be(svc.vip), be16(svc.port), proto_number(svc.proto),
                               _scope(svc.external))] = value

    def delete(self, vip: str, port: int, proto: str, external: bool = False) -> bool:
        key = (vip, port, proto.lower())
        svc = self._entries(external).pop(key, None)
        if svc is None:
            return False
        if self.store is not None:
            self.store.delete((*key, external))
        maps.discard(self._svcs, maps.SvcKey(maps.ip_be(vip), be16(port), proto_number(key[2]),
                                             _scope(external)))
        for i in range(svc.n_slots):
            maps.discard(self._slots, maps.SlotKey(svc.id, i))
        self.slots_used -= svc.n_slots
        if not external:
            left = self._vip_ports.get(vip, 0) - 1
            if left > 0:
                self._vip_ports[vip] = left
            else:
                self._vip_ports.pop(vip, None)
                maps.discard(self._vips, ct.c_uint32(maps.ip_be(vip)))
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
        for table in self.affinity_tables:
            for k, v in list(table.items()):
                if k.svc == svc_id and (v.backend.ip, v.backend.port) not in keep:
                    maps.discard(table, k)

    def _forget_udp_sessions(self, svc: Service, keep: builtins.set[tuple[int, int]]) -> None:
        """Remove the UDP sessions of `svc` whose backend is not in `keep`, both
        directions, as kube-proxy clears UDP conntrack entries of endpoints
        that leave a Service (pkg/proxy conntrack cleanup): a connected UDP
        socket keeps sending to the VIP and must reach a live backend, not
        the session of one that is gone. TCP sessions stay: a terminating
        backend may still finish its connections, and a vanished one resets them."""
        if svc.proto != "udp":
            return
        fwd = (SESSION_LB, SESSION_NODEPORT)
        rev = (SESSION_LB_REV, SESSION_NODEPORT_REV, SESSION_LB_HAIRPIN_REV)
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


@dataclass(frozen=True)
class LbConfig:
    """What the lbrp knows of its node (struct lbrp_cfg in bpf/lbrp.c).

    service_cidr: the Service range (None: none): traffic to an unused port
        of a service address in it is rejected, to an unallocated address
        dropped (kube-proxy's nftables mode).
    hairpin_ip: the pods' gateway, the source a pod sees when it reaches
        itself through a Service (kube-proxy masquerades hairpin traffic).
    node_ip, host_pod_ip, local_pods: the node's address, its address in its
        pod CIDR, that CIDR: the node's own connections to services are
        masqueraded to the first (a backend on this node) or the second
        (one on another node, which answers over the overlay).
    host_port: the id of the router's port to the node's stack (0: none).
    masq_range: the ports of masqueraded sessions (the SNAT range, which the
        node's own ephemeral ports stay out of).
    """

    service_cidr: str | None
    hairpin_ip: str
    node_ip: str
    host_pod_ip: str
    local_pods: str
    host_port: int = 0
    masq_range: tuple[int, int] = (61000, 65535)

    def value(self) -> maps.LbCfg:
        svc = ipaddress.IPv4Network(self.service_cidr) if self.service_cidr else None
        local = ipaddress.IPv4Network(self.local_pods)
        lo, hi = self.masq_range
        if not 1 <= lo <= hi <= 65535:
            raise ValueError(f"masquerading port range {lo}-{hi} is not within 1-65535")
        return maps.LbCfg(maps.ip_be(svc.network_address) if svc else 0,
                          maps.ip_be(svc.netmask) if svc else 0,
                          maps.ip_be(self.hairpin_ip), maps.ip_be(self.node_ip),
                          maps.ip_be(self.host_pod_ip), maps.ip_be(local.network_address),
                          maps.ip_be(local.netmask), self.host_port, lo, hi)


class LoadBalancer:
    """The lbrp cube: one instance per node, stacked on every pod port and on
    the router's host port."""

    def __init__(self, rt: Runtime, name: str) -> None:
        self.rt = rt
        self.name = name
        if name in rt.cubes:  # adopted from a previous agent
            self.cube = rt.cube(name)
        else:
            self.cube = rt.add_cube(name, TYPE)
        store = self.store = ServiceStore(rt.state_file(f"{name}.services.sqlite"))
        rt.on_close(lambda remove: store.remove() if remove else store.close())
        self.services = ServiceTable(rt, TYPE, self.cube.config, self.store)

    def save(self) -> None:
        """The services are the store's rows (committed here); the cube's
        configuration only says so."""
        self.store.commit()
        self.cube.config = {"store": True}

    def configure(self, cfg: LbConfig) -> None:
        """Tell the instance about its node (idempotent; the map is pinned, so
        an adopting agent writes the same again)."""
        self.rt.table("lb_cfgs", TYPE)[ct.c_uint32(self.cube.id)] = cfg.value()

    def set_service(self, vip: str, port: int, proto: str, backends: list[Backend],
                    affinity_timeout_s: int = 0, *, drop_if_empty: bool = False) -> Service:
        svc = self.services.set(vip, port, proto, backends, affinity_timeout_s,
                                drop_if_empty=drop_if_empty)
        self.save()
        return svc

    def delete_service(self, vip: str, port: int, proto: str) -> bool:
        found = self.services.delete(vip, port, proto)
        self.save()
        return found
