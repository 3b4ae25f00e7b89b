"""The cube runtime of one agent instance.

One Runtime drives the data plane of one node (one network namespace): it
compiles each cube type once, puts each loaded program in a slot of the shared
program array, keeps per-instance and per-port state in pinned maps keyed by
id, attaches the single entry program to every peered netdev, and removes
exactly what it created.
"""

from __future__ import annotations

import concurrent.futures
import ctypes as ct
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from pcn_agent.dataplane import bpffs, maps, programs, tc
from pcn_agent.dataplane.compiler import BpfModule, CompileError, compile_bundle, compile_cube
from pcn_agent.dataplane.netns import entered, iproute
from pcn_agent.dataplane.rtnl import Netdev, Rtnl

log = logging.getLogger(__name__)

ENTRY = "entry"
# Types whose program comes from elsewhere than bpf/<type>.c (CubeTypes:
# pcn_agent.dataplane.cubes.custom compiles them and install_program() puts
# them in a slot). An adopted runtime keeps their slots, whose programs stay
# in the pinned program array, until they are installed again.
EXTERNAL_PREFIX = "cubetype."
STATE_ROOT = Path(os.environ.get("PCN_STATE_DIR", "/run/pcn/state"))

# A specialised compile: (cube type, sorted defines).
VariantKey = tuple[str, tuple[tuple[str, int | str], ...]]


class RuntimeError_(RuntimeError):
    """A data-plane operation that cannot be carried out (bad name, no room...)."""


@dataclass
class CubeType:
    name: str
    module: BpfModule
    program: str
    slot: int
    fd: int


@dataclass
class Cube:
    id: int
    name: str
    type: str
    ports: dict[str, int] = field(default_factory=dict)  # port name -> port id
    slot: int | None = None  # a program slot of its own (specialised cubes)
    # the controller's state (JSON), saved for adoption
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class StackedCube:
    """A transparent cube placed on a port hook: its program slot and instance id."""

    slot: int
    instance: int


@dataclass
class PortState:
    id: int
    cube: str
    name: str
    mac: str = "00:00:00:00:00:00"
    ip: str | None = None
    prefixlen: int = 0
    peer_kind: int = maps.PEER_NONE
    peer: int = 0  # ifindex or port id
    netdev: str | None = None
    flags: int = 0  # maps.PORT_* bits
    hooks: dict[int, list[StackedCube]] = field(
        default_factory=lambda: {maps.HOOK_INGRESS: [], maps.HOOK_EGRESS: []}
    )


@dataclass
class PortCounters:
    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    drops: int = 0


class _IdPool:
    def __init__(self, limit: int, what: str) -> None:
        self._free = list(range(limit - 1, 0, -1))
        self._what = what

    def take(self) -> int:
        if not self._free:
            raise RuntimeError_(f"no free {self._what} id left")
        return self._free.pop()

    def give(self, value: int) -> None:
        self._free.append(value)

    def reserve(self, value: int) -> None:
        """Mark an id as used (adopting state left by a previous agent)."""
        self._free.remove(value)


class Runtime:
    """Data plane of one agent instance inside network namespace `netns`
    (None: the namespace of this process)."""

    def __init__(self, name: str, netns: str | None = None,
                 pin_root: Path = bpffs.DEFAULT_ROOT, state_root: Path = STATE_ROOT,
                 bundle: Sequence[str] = (),
                 defines: Mapping[str, int | str] | None = None) -> None:
        """`bundle`: cube types compiled together with the entry programs, in
        one module, when the runtime opens (one compile instead of several:
        what a node always runs); others are compiled when first used.
        `defines`: -D flags of every compile of this runtime (the sizes of
        shared pinned maps, e.g. lbrp.LbSizes.defines()): all modules see
        the same maps, so all must be built with the same sizes."""
        self.name = name
        self.bundle = tuple(bundle)
        self.defines: dict[str, int | str] = dict(defines or {})
        # pinned maps open() made anew because the previous agent's differed
        # in size from this runtime's (their content is gone; owners refill)
        self.resized: set[str] = set()
        self._opening = False  # in open(): pinned maps are still the previous agent's
        self.netns = netns
        self.pin_root = pin_root
        self.pin_dir: Path | None = None
        self.state_path = state_root / f"{name}.json"
        self.adopted = False
        self.vanished_ports: set[int] = set()  # ports whose netdev was gone at adoption
        self.taken_over: list[str] = []  # programs of the previous agent's, not loaded again
        self.meta: dict[str, Any] = {}  # state of whoever drives this runtime (JSON), saved with it
        self._netlink: NetlinkPerThread | None = None
        self.types: dict[str, CubeType] = {}
        self.variants: dict[VariantKey, CubeType] = {}  # specialised compiles
        # external types a previous agent installed, not compiled again yet: slot by name
        self.adopted_slots: dict[str, int] = {}
        self.cubes: dict[str, Cube] = {}
        self.ports: dict[int, PortState] = {}
        self._cube_ids = _IdPool(maps.MAX_CUBES, "cube")
        self._port_ids = _IdPool(maps.MAX_PORTS, "port")
        self._slots = _IdPool(maps.MAX_SLOTS, "program slot")
        self._attached: dict[int, set[str]] = {}  # ifindex -> tc parents we attached
        self._own_clsact: set[int] = set()
        self._entry_fds: dict[str, int] = {}
        self._program_ids: dict[str, int] = {}  # bundle program -> kernel id, for the next agent
        self._lock = threading.RLock()
        self._entry: BpfModule | None = None
        self._watchers: dict[str, Callable[[PortState], None]] = {}
        self._closers: list[Callable[[bool], None]] = []  # on_close()

    @property
    def is_open(self) -> bool:
        return self._entry is not None

    @property
    def ipr(self) -> IPRoute | None:
        """This thread's rtnetlink socket in the runtime's namespace (None when closed)."""
        return self._netlink.get() if self._netlink is not None else None

    @property
    def nl(self) -> Rtnl | None:
        """This thread's lean rtnetlink socket in the runtime's namespace
        (dataplane.rtnl: link lookups and tc on a pod's path; None when closed)."""
        return self._netlink.lean() if self._netlink is not None else None

    def netlink_sockets(self) -> int:
        """rtnetlink sockets open for this runtime (one or two, pyroute2's and
        the lean one, per live thread using it)."""
        return self._netlink.open_sockets() if self._netlink is not None else 0

    def _lean(self) -> Rtnl:
        nl = self.nl
        if nl is None:
            raise RuntimeError_(f"runtime {self.name} is not open")
        return nl

    # ----------------------------------------------------------------- life cycle
    def open(self, adopt: bool = True) -> Runtime:
        """Load the entry program; with `adopt`, take over the state a previous
        agent of the same name left (pinned maps, program slots, attachments)
        without disturbing the traffic that depends on it."""
        if self.is_open:
            raise RuntimeError_(f"runtime {self.name} is already open")
        pin_dir = self.pin_root / self.name
        state: dict[str, Any] | None = None
        if adopt and self.state_path.is_file() and pin_dir.is_dir():
            state = json.loads(self.state_path.read_text())
        elif pin_dir.is_dir():
            # Nothing to adopt (asked not to, or no saved state: an agent that
            # died before its first save): a fresh start must not inherit the
            # tables it left, which no state describes.
            log.info("runtime %s: removing pins no saved state describes", self.name)
            bpffs.remove_instance(pin_dir)
        self.pin_dir = pin_dir = bpffs.instance_dir(self.name, self.pin_root)
        self._netlink = NetlinkPerThread(self.netns)
        self._opening = True
        try:
            bundle = (ENTRY, *self.bundle)
            self._entry = entry = self._compile_sized(
                "+".join(bundle), pin_dir, lambda: compile_bundle(bundle, pin_dir, self.defines))
            names = programs.names(entry)
            if state is not None:
                self._take_over_programs(entry, state.get("programs", {}))
            _load_in_parallel(entry, names)
            self._program_ids = programs.loaded_ids(entry, names)
            for prog in ("pcn_ingress", "pcn_egress"):
                self._entry_fds[prog] = entry.load_func(prog, _sched_cls()).fd
            if state is not None:
                self._adopt(state)
        finally:
            self._opening = False
        log.info("runtime %s opened (netns %s, pins %s%s)", self.name, self.netns or "-",
                 self.pin_dir, ", adopted" if self.adopted else "")
        return self

    def _compile_sized(self, what: str, pin_dir: Path,
                       compile_module: Callable[[], BpfModule]) -> BpfModule:
        """`compile_module()`, checked against the maps pinned in `pin_dir`.

        BCC reuses a pinned map whatever size the source declares. While the
        runtime opens, a pinned map of another size than this build's is one
        the previous agent made with other sizes (the ConfigMap's
        lbServiceMapMax or lbBackendMapMax changed since) and cannot be
        resized: its pin is removed, the module compiled again (making the
        map anew, empty) and its name put in `resized`, for its owner to
        write its content again from the saved state (the previous agent's
        programs use the old map until this agent replaces them; take-over
        refuses programs of other maps). Once open, the maps are this
        runtime's: a module that disagrees was built with other sizes than
        the runtime's defines, and CompileError is raised."""
        pinned = programs.pinned_maps(pin_dir)
        module = compile_module()
        stale = programs.stale_maps(module, pinned) if pinned else []
        if not stale:
            return module
        module.cleanup()
        if not self._opening:
            raise CompileError(f"{what}: pinned maps of other sizes than it declares: " + ", ".join(
                f"{m.name} {m.pinned[0]} != {m.declared[0]}" for m in stale))
        for m in stale:
            log.warning("runtime %s: pinned map %s holds %d entries (flags %#x), this agent's "
                        "build %d (flags %#x): the ConfigMap's table sizes changed; making it "
                        "anew (its entries are written again from the saved state, its sessions "
                        "are lost)", self.name, m.name, m.pinned[0], m.pinned[1],
                        m.declared[0], m.declared[1])
            m.pin.unlink(missing_ok=True)
        self.resized |= {m.name for m in stale}
        return compile_module()

    def _compile_type(self, type_name: str, pin_dir: Path,
                      defines: Mapping[str, int | str]) -> BpfModule:
        """A module of its own for `type_name`, with the runtime's defines and
        `defines` (_compile_sized checks its maps)."""
        merged = {**self.defines, **defines}
        return self._compile_sized(f"cube type {type_name}", pin_dir,
                                   lambda: compile_cube(type_name, pin_dir, merged))

    def _take_over_programs(self, entry: BpfModule, previous: Mapping[str, int]) -> None:
        """Skip the verifier for the bundle's programs the previous agent
        loaded, when they are exactly these (see dataplane.programs)."""
        try:
            taken = programs.take_over(entry, previous)
        except Exception:  # an optimisation: never a reason not to start
            log.exception("runtime %s: could not take over the previous programs", self.name)
            return
        self.taken_over = taken
        if taken:
            log.info("runtime %s: took over %d loaded programs (%s)", self.name, len(taken),
                     ", ".join(taken))

    def _adopt(self, state: dict[str, Any]) -> None:
        for type_name, slot in state["types"].items():
            self._slots.reserve(slot)
            if type_name.startswith(EXTERNAL_PREFIX):
                self.adopted_slots[type_name] = slot  # its program stays in the slot
                continue
            self._load_type_into(type_name, slot)
        for c in state["cubes"]:
            cube = Cube(c["id"], c["name"], c["type"], dict(c["ports"]), c.get("slot"),
                        c.get("config", {}))
            self._cube_ids.reserve(cube.id)
            if cube.slot is not None:
                self._slots.reserve(cube.slot)
            self.cubes[cube.name] = cube
        for p in state["ports"]:
            hooks = {int(h): [StackedCube(**s) for s in stack] for h, stack in p.pop("hooks").items()}
            port = PortState(**p, hooks=hooks)
            self._port_ids.reserve(port.id)
            self.ports[port.id] = port
        self._own_clsact = set(state.get("own_clsact", []))
        self.meta = state.get("meta", {})
        attached: dict[str, list[str]] = state.get("attached", {})
        gone = self._drop_vanished_netdevs({int(i) for i in attached})
        for ifindex, parents in attached.items():
            if int(ifindex) in gone:
                continue
            for parent in parents:
                prog = "pcn_ingress" if parent == tc.INGRESS else "pcn_egress"
                self._attach(int(ifindex), parent, prog)  # replaces the old program in place
        self.adopted = True

    def _drop_vanished_netdevs(self, attached: set[int]) -> set[int]:
        """Netdevs the saved state peers with that are gone (a pod deleted by
        CNI DEL while no agent ran) or are another device now (a reused
        ifindex): their ports are unpeered and listed in `vanished_ports`, so
        the owner forgets them instead of failing to attach ("No such device")
        forever. Returns the ifindexes not to attach to."""
        assert self.ipr is not None
        names = {int(link["index"]): link.get_attr("IFLA_IFNAME")
                 for link in self.ipr.get_links()}
        gone = {i for i in attached if i not in names}
        for port in self.ports.values():
            if port.peer_kind != maps.PEER_NETDEV:
                continue
            if names.get(port.peer) == port.netdev:
                continue
            log.warning("runtime %s: netdev %s (ifindex %d) of port %s:%s is gone; the port is "
                        "unpeered", self.name, port.netdev, port.peer, port.cube, port.name)
            gone.add(port.peer)
            self._own_clsact.discard(port.peer)
            try:
                del self.table("pcn_ifaces")[ct.c_uint32(port.peer)]
            except KeyError:
                pass
            port.peer_kind, port.peer, port.netdev = maps.PEER_NONE, 0, None
            self._write_port(port)
            self.vanished_ports.add(port.id)
        return gone

    def save(self) -> None:
        """Record what this runtime built, for the next agent to adopt."""
        with self._lock:
            state = {
                "types": {**self.adopted_slots,
                          **{t.name: t.slot for t in self.types.values()}},
                "cubes": [{"id": c.id, "name": c.name, "type": c.type, "ports": c.ports,
                           "slot": c.slot, "config": c.config} for c in self.cubes.values()],
                "ports": [_port_dict(p) for p in self.ports.values()],
                "attached": {str(k): sorted(v) for k, v in self._attached.items()},
                "own_clsact": sorted(self._own_clsact),
                "meta": self.meta,
                "programs": self._program_ids,
            }
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state_path.with_suffix(".tmp")
            # compact: json's C encoder only serves indent=None, and an agent
            # saves after every pod attach (~5x faster at 50 pods than indent=1)
            tmp.write_text(json.dumps(state, sort_keys=True, separators=(",", ":")))
            tmp.replace(self.state_path)

    def _release_modules(self) -> None:
        for t in [*self.types.values(), *self.variants.values()]:
            if t.module is not self._entry:  # bundled types share the entry's module
                t.module.cleanup()
        if self._entry is not None:
            self._entry.cleanup()
            self._entry = None
        self.types.clear()
        self.variants.clear()

    def state_file(self, suffix: str) -> Path:
        """Where state of this runtime's that is not in its JSON file lives
        (`<state root>/<name>.<suffix>`; see on_close for its end)."""
        return self.state_path.with_name(f"{self.name}.{suffix}")

    def on_close(self, fn: Callable[[bool], None]) -> None:
        """Call fn(remove) when the runtime closes (remove: its state goes
        too, as its JSON file does) or is abandoned (fn(False))."""
        self._closers.append(fn)

    def _run_closers(self, remove: bool) -> None:
        closers, self._closers = self._closers, []
        for fn in closers:
            try:
                fn(remove)
            except Exception:  # the rest of the close goes on
                log.exception("closing state of runtime %s", self.name)

    def abandon(self) -> None:
        """Let go of the data plane as a crashing agent would: close every file
        descriptor, leave programs attached, maps pinned and state on disk."""
        with self._lock:
            self._run_closers(False)
            self._release_modules()
            if self._netlink is not None:
                self._netlink.close()
                self._netlink = None

    def close(self, remove: bool = True) -> None:
        """Detach from netdevs and unpin everything this runtime created."""
        with self._lock:
            if self.ipr is None:
                return
            for ifindex, parents in list(self._attached.items()):
                for parent in parents:
                    tc.detach(self._lean(), ifindex, parent)
                if ifindex in self._own_clsact:
                    tc.remove_clsact(self._lean(), ifindex)
            self._attached.clear()
            self._own_clsact.clear()
            self._release_modules()
            assert self._netlink is not None  # self.ipr came from it
            self._netlink.close()
            self._netlink = None
            if remove and self.pin_dir is not None:
                bpffs.remove_instance(self.pin_dir)
            if remove:
                self.state_path.unlink(missing_ok=True)
            self._run_closers(remove)
            log.info("runtime %s closed", self.name)

    def __enter__(self) -> Runtime:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- tables
    def table(self, name: str, cube_type: str = ENTRY) -> maps.BpfTable:
        module = self._entry if cube_type == ENTRY else self.load_type(cube_type).module
        assert module is not None, "Runtime.open() first"
        return module[name.encode()]

    # ---------------------------------------------------------------- types
    def load_type(self, type_name: str) -> CubeType:
        """Compile a cube type once and register its program in the program
        array. The compile (seconds) runs outside the runtime's lock, unless
        the caller holds it, so pods attach meanwhile (as load_variant's); two
        first uses at once compile twice and keep the first."""
        with self._lock:
            if type_name in self.types:
                return self.types[type_name]
            assert self.pin_dir is not None, "Runtime.open() first"
            if type_name in self.bundle:
                return self._load_type_into(type_name, self._slots.take())
            pin_dir = self.pin_dir
        module = self._compile_type(type_name, pin_dir, {})
        with self._lock:
            if type_name in self.types:
                module.cleanup()
                return self.types[type_name]
            return self._load_type_into(type_name, self._slots.take(), module)

    def type_loaded(self, type_name: str) -> bool:
        """Whether `type_name`'s shared program is compiled and loaded."""
        return type_name in self.types

    def load_variant(self, type_name: str, defines: Mapping[str, int | str]) -> CubeType:
        """Compile (once) a cube type specialised by `defines`; the caller puts its
        program in a slot of its own with set_slot(). The compile runs outside
        the runtime's lock, so pods attach meanwhile."""
        key: VariantKey = (type_name, tuple(sorted(defines.items())))
        with self._lock:
            if key in self.variants:
                return self.variants[key]
            assert self.pin_dir is not None, "Runtime.open() first"
            pin_dir = self.pin_dir
        module = self._compile_type(type_name, pin_dir, defines)
        prog = f"{type_name}_rx"
        fd = module.load_func(prog, _sched_cls()).fd
        with self._lock:
            if key in self.variants:  # compiled twice at once: keep the first
                module.cleanup()
            else:
                self.variants[key] = CubeType(type_name, module, prog, -1, fd)
            return self.variants[key]

    def has_variant(self, type_name: str, defines: Mapping[str, int | str]) -> bool:
        return (type_name, tuple(sorted(defines.items()))) in self.variants

    def install_program(self, type_name: str, module: BpfModule, fd: int, program: str) -> int:
        """Put an external type's loaded program (`fd` of `program` in
        `module`) in its program-array slot, taking one the first time: one
        map update, so every instance stacked anywhere runs the new program
        from the next packet on, and none sees no program. The module it
        replaces is released. Returns the slot."""
        if not type_name.startswith(EXTERNAL_PREFIX):
            raise RuntimeError_(f"{type_name!r} is not an external type ({EXTERNAL_PREFIX}...)")
        with self._lock:
            old = self.types.get(type_name)
            if old is not None:
                slot = old.slot
            elif type_name in self.adopted_slots:
                slot = self.adopted_slots.pop(type_name)
            else:
                slot = self._slots.take()
            self.set_slot(slot, fd)
            self.types[type_name] = CubeType(type_name, module, program, slot, fd)
        if old is not None and old.module is not module:
            old.module.cleanup()
        return slot

    def remove_type(self, type_name: str) -> None:
        """Unload an external type no cube uses: its slot is emptied and freed.
        RuntimeError_ while a cube of it exists."""
        with self._lock:
            users = sorted(c.name for c in self.cubes.values() if c.type == type_name)
            if users:
                raise RuntimeError_(f"type {type_name} is still used by {', '.join(users)}")
            t = self.types.pop(type_name, None)
            slot = t.slot if t is not None else self.adopted_slots.pop(type_name, None)
            if slot is not None:
                self.free_slot(slot)
        if t is not None and t.module is not self._entry:
            t.module.cleanup()

    def _type_slot(self, type_name: str) -> int:
        t = self.types.get(type_name)
        if t is not None:
            return t.slot
        if type_name in self.adopted_slots:
            return self.adopted_slots[type_name]
        raise RuntimeError_(f"cube type {type_name!r} is not loaded")

    def _load_type_into(self, type_name: str, slot: int,
                        compiled: BpfModule | None = None) -> CubeType:
        assert self.pin_dir is not None
        module = compiled if compiled is not None else (
            self._entry if type_name in self.bundle
            else self._compile_type(type_name, self.pin_dir, {}))
        assert module is not None  # bundled types: the entry's module, loaded by open()
        prog = f"{type_name}_rx"
        fd = module.load_func(prog, _sched_cls()).fd
        self.table("pcn_progs")[ct.c_int(slot)] = ct.c_int(fd)
        t = CubeType(type_name, module, prog, slot, fd)
        self.types[type_name] = t
        return t

    # ---------------------------------------------------------------- cubes
    def add_cube(self, name: str, type_name: str, own_slot: bool = False) -> Cube:
        """Create a cube instance. A cube with `own_slot` gets a program slot of its
        own (for a program specialised to its configuration); others share the
        type's program."""
        with self._lock:
            if name in self.cubes:
                raise RuntimeError_(f"cube {name!r} already exists")
            if not own_slot and type_name not in self.adopted_slots:
                self.load_type(type_name)
            cube = Cube(self._cube_ids.take(), name, type_name,
                        slot=self._slots.take() if own_slot else None)
            self._zero_cube_stats(cube.id)
            self.cubes[name] = cube
            log.info("cube %s (%s) created with id %d", name, type_name, cube.id)
            return cube

    def remove_cube(self, name: str) -> None:
        with self._lock:
            cube = self.cube(name)
            for port_name in list(cube.ports):
                self.remove_port(name, port_name)
            del self.cubes[name]
            self._watchers.pop(name, None)
            if cube.slot is not None:
                self.free_slot(cube.slot)
            self._cube_ids.give(cube.id)
            log.info("cube %s removed", name)

    def stacked(self, name: str) -> StackedCube:
        """How to stack transparent cube `name` on a port hook."""
        cube = self.cube(name)
        slot = cube.slot if cube.slot is not None else self._type_slot(cube.type)
        return StackedCube(slot, cube.id)

    def cube(self, name: str) -> Cube:
        try:
            return self.cubes[name]
        except KeyError:
            raise RuntimeError_(f"no cube named {name!r}") from None

    # ---------------------------------------------------------------- ports
    def add_port(self, cube_name: str, port_name: str, mac: str | None = None,
                 ip: str | None = None, prefixlen: int = 0, flags: int = 0) -> PortState:
        with self._lock:
            cube = self.cube(cube_name)
            if port_name in cube.ports:
                raise RuntimeError_(f"cube {cube_name!r} already has a port {port_name!r}")
            pid = self._port_ids.take()
            port = PortState(pid, cube_name, port_name, mac or _local_mac(self.name, pid), ip,
                             prefixlen, flags=flags)
            cube.ports[port_name] = pid
            self.ports[pid] = port
            self._zero_port_stats(pid)
            self._write_port(port)
            return port

    def port(self, cube_name: str, port_name: str) -> PortState:
        cube = self.cube(cube_name)
        try:
            return self.ports[cube.ports[port_name]]
        except KeyError:
            raise RuntimeError_(f"cube {cube_name!r} has no port {port_name!r}") from None

    def remove_port(self, cube_name: str, port_name: str) -> None:
        with self._lock:
            port = self.port(cube_name, port_name)
            self.disconnect(port)
            del self.table("pcn_ports")[ct.c_uint32(port.id)]
            del self.cube(cube_name).ports[port_name]
            del self.ports[port.id]
            self._port_ids.give(port.id)

    def _write_port(self, port: PortState) -> None:
        cube = self.cubes[port.cube]
        v = maps.Port()
        v.cube_id = cube.id
        v.cube_slot = cube.slot if cube.slot is not None else self.types[cube.type].slot
        v.peer_kind = port.peer_kind
        v.peer = port.peer
        v.ip = maps.ip_be(port.ip) if port.ip else 0
        v.prefixlen = port.prefixlen
        v.mac = maps.mac_bytes(port.mac)
        v.flags = port.flags
        for hook, stack in port.hooks.items():
            v.hooks[hook].n = len(stack)
            for i, s in enumerate(stack):
                v.hooks[hook].slot[i] = s.slot
                v.hooks[hook].inst[i] = s.instance
        self.table("pcn_ports")[ct.c_uint32(port.id)] = v
        watcher = self._watchers.get(port.cube)
        if watcher is not None:
            watcher(port)

    def watch_ports(self, cube_name: str, fn: Callable[[PortState], None] | None) -> None:
        """Call `fn` after any change to a port of `cube_name` reaches the map."""
        if fn is None:
            self._watchers.pop(cube_name, None)
        else:
            self._watchers[cube_name] = fn

    # ---------------------------------------------------------------- peering
    def netdev(self, ifname: str = "", ifindex: int = 0) -> Netdev | None:
        """The netdev named `ifname` (or of index `ifindex`) in the runtime's
        namespace, as one RTM_GETLINK tells it (index, name, kind, peer
        namespace), or None if there is none."""
        return self._lean().link(ifindex, ifname)

    def ifindex(self, ifname: str) -> int:
        dev = self.netdev(ifname)
        if dev is None:
            raise RuntimeError_(f"no netdev {ifname!r} in netns {self.netns or '(current)'}")
        return dev.index

    def veth_peer_elsewhere(self, ifindex: int) -> bool:
        """Whether netdev `ifindex` is one end of a veth pair whose other end
        lives in another network namespace: rtnetlink then reports the
        other end's namespace (IFLA_LINK_NETNSID, rtnl_fill_link_netnsid),
        which it leaves out when both ends share this one. Raises
        RuntimeError_ for a missing device."""
        dev = self.netdev(ifindex=ifindex)
        if dev is None:
            raise RuntimeError_(f"no netdev of ifindex {ifindex} in netns "
                                f"{self.netns or '(current)'}")
        return dev.veth_peer_elsewhere

    def connect_netdev(self, port: PortState, ifname: str, into_peer: bool = False,
                       ifindex: int = 0) -> None:
        """Peer a port with a netdev: the entry program on its tc ingress.

        `into_peer` (a pod's host-side veth): what the port sends from a
        walk that started on a tc ingress hook goes straight into the veth's
        other end (bpf_redirect_peer, bpf/include/pcn_chain.h
        pcn_port_deliver), its egress cubes run on the way. The kernel
        drops such a redirect to a device without a peer or whose peer is
        in the same namespace, so the flag (maps.PORT_PEER_NS) is set only
        when veth_peer_elsewhere() holds; otherwise the port keeps the
        plain redirect and a warning says why.

        One RTM_GETLINK learns the device's index, kind and peer namespace
        (by `ifindex` when the caller looked it up already, checked to
        still be `ifname`). RuntimeError_ if there is no such device."""
        with self._lock:
            self.disconnect(port)
            dev = self.netdev(ifname, ifindex)
            if dev is None or dev.name != ifname:
                raise RuntimeError_(f"no netdev {ifname!r}"
                                    + (f" of ifindex {ifindex}" if ifindex else "")
                                    + f" in netns {self.netns or '(current)'}")
            ifindex = dev.index
            peer_ns = into_peer and dev.veth_peer_elsewhere
            if into_peer and not peer_ns:
                log.warning("port %s:%s: %s is not a veth with its other end in another "
                            "network namespace: packets go out of it by plain redirect",
                            port.cube, port.name, ifname)
            port.flags = (port.flags | maps.PORT_PEER_NS) if peer_ns \
                else (port.flags & ~maps.PORT_PEER_NS)
            self.table("pcn_ifaces")[ct.c_uint32(ifindex)] = maps.Iface(port.id, maps.IFACE_PORT)
            port.peer_kind, port.peer, port.netdev = maps.PEER_NETDEV, ifindex, ifname
            self._write_port(port)
            self._attach(ifindex, tc.INGRESS, "pcn_ingress")
            self._sync_egress_attach(port)
            log.info("port %s:%s peered with netdev %s (ifindex %d)", port.cube, port.name,
                     ifname, ifindex)

    def attach_inject(self, ifname: str) -> None:
        """Mark a netdev as this runtime's slow-path injection device."""
        with self._lock:
            ifindex = self.ifindex(ifname)
            self.table("pcn_ifaces")[ct.c_uint32(ifindex)] = maps.Iface(0, maps.IFACE_INJECT)
            self._attach(ifindex, tc.INGRESS, "pcn_ingress")

    def attach_loopback(self, port: PortState) -> None:
        """Send the namespace's loopback traffic to services into `port` (the
        router's host port): the egress entry program on lo hands it there
        (bpf/entry.c, pcn_loopback_out). Idempotent; close() detaches it."""
        with self._lock:
            ifindex = self.ifindex("lo")
            if ifindex != maps.LOOPBACK_IFINDEX:  # the C takes lo's index as a constant
                raise RuntimeError_(f"lo has ifindex {ifindex}, not {maps.LOOPBACK_IFINDEX}")
            self.table("pcn_ifaces")[ct.c_uint32(ifindex)] = maps.Iface(port.id,
                                                                        maps.IFACE_LOOPBACK)
            self._attach(ifindex, tc.EGRESS, "pcn_egress")

    def connect_ports(self, a: PortState, b: PortState) -> None:
        with self._lock:
            self.disconnect(a)
            self.disconnect(b)
            a.peer_kind, a.peer = maps.PEER_PORT, b.id
            b.peer_kind, b.peer = maps.PEER_PORT, a.id
            self._write_port(a)
            self._write_port(b)
            log.info("port %s:%s peered with %s:%s", a.cube, a.name, b.cube, b.name)

    def disconnect(self, port: PortState) -> None:
        with self._lock:
            if port.peer_kind == maps.PEER_NETDEV:
                ifindex = port.peer
                for parent in self._attached.pop(ifindex, set()):
                    tc.detach(self._lean(), ifindex, parent)
                if ifindex in self._own_clsact:
                    tc.remove_clsact(self._lean(), ifindex)
                    self._own_clsact.discard(ifindex)
                try:
                    del self.table("pcn_ifaces")[ct.c_uint32(ifindex)]
                except KeyError:
                    pass
            elif port.peer_kind == maps.PEER_PORT:
                other = self.ports.get(port.peer)
                if other is not None and other.peer == port.id:
                    other.peer_kind, other.peer = maps.PEER_NONE, 0
                    self._write_port(other)
            if port.peer_kind != maps.PEER_NONE:
                port.peer_kind, port.peer, port.netdev = maps.PEER_NONE, 0, None
                self._write_port(port)

    def _attach(self, ifindex: int, parent: str, prog: str) -> None:
        nl = self._lean()
        if tc.ensure_clsact(nl, ifindex):
            self._own_clsact.add(ifindex)
        tc.attach(nl, ifindex, parent, self._entry_fds[prog], prog)
        self._attached.setdefault(ifindex, set()).add(parent)

    def _sync_egress_attach(self, port: PortState) -> None:
        """A netdev-peered port with an egress hook needs the egress entry program."""
        if port.peer_kind != maps.PEER_NETDEV:
            return
        parents = self._attached.get(port.peer, set())
        if port.hooks[maps.HOOK_EGRESS] and tc.EGRESS not in parents:
            self._attach(port.peer, tc.EGRESS, "pcn_egress")
        elif not port.hooks[maps.HOOK_EGRESS] and tc.EGRESS in parents:
            tc.detach(self._lean(), port.peer, tc.EGRESS)
            parents.discard(tc.EGRESS)

    # ---------------------------------------------------------------- chains
    def set_hook(self, port: PortState, hook: int, stack: Iterable[StackedCube]) -> None:
        """Replace the transparent cubes on one side of a port in one map update."""
        stack = list(stack)
        if len(stack) > maps.CHAIN_MAX:
            raise RuntimeError_(f"at most {maps.CHAIN_MAX} cubes fit on one port hook")
        with self._lock:
            port.hooks[hook] = stack
            if hook == maps.HOOK_EGRESS and stack:
                self._sync_egress_attach(port)  # program in place before the hook is used
            self._write_port(port)
            if hook == maps.HOOK_EGRESS and not stack:
                self._sync_egress_attach(port)

    def set_hooks(self, port: PortState, ingress: Iterable[StackedCube],
                  egress: Iterable[StackedCube]) -> None:
        """set_hook of both sides in one map update (a new pod's port gets
        both at once)."""
        stacks = {maps.HOOK_INGRESS: list(ingress), maps.HOOK_EGRESS: list(egress)}
        if any(len(stack) > maps.CHAIN_MAX for stack in stacks.values()):
            raise RuntimeError_(f"at most {maps.CHAIN_MAX} cubes fit on one port hook")
        with self._lock:
            port.hooks.update(stacks)
            if stacks[maps.HOOK_EGRESS]:
                self._sync_egress_attach(port)  # program in place before the hook is used
            self._write_port(port)
            if not stacks[maps.HOOK_EGRESS]:
                self._sync_egress_attach(port)

    def set_slot(self, slot: int, fd: int) -> None:
        self.table("pcn_progs")[ct.c_int(slot)] = ct.c_int(fd)

    def free_slot(self, slot: int) -> None:
        try:
            del self.table("pcn_progs")[ct.c_int(slot)]
        except KeyError:
            pass
        self._slots.give(slot)

    # ---------------------------------------------------------------- counters
    def port_counters(self, port: PortState) -> PortCounters:
        per_cpu = self.table("pcn_port_stats")[ct.c_uint32(port.id)]
        total = PortCounters()
        for s in per_cpu:
            total.rx_packets += s.rx_packets
            total.rx_bytes += s.rx_bytes
            total.tx_packets += s.tx_packets
            total.tx_bytes += s.tx_bytes
            total.drops += s.drops
        return total

    def cube_drops(self, cube_name: str) -> dict[str, int]:
        """Drops of a cube by reason name (only reasons with a non-zero count)."""
        cube = self.cube(cube_name)
        t = self.table("pcn_cube_stats")
        out = {}
        for reason in maps.DropReason:
            n = sum(t[ct.c_uint32(cube.id * maps.DROP_REASONS + reason)])
            if n:
                out[reason.name.lower()] = int(n)
        return out

    def _zero_port_stats(self, pid: int) -> None:
        t = self.table("pcn_port_stats")
        t[ct.c_uint32(pid)] = _zeros(t)

    def _zero_cube_stats(self, cid: int) -> None:
        t = self.table("pcn_cube_stats")
        for reason in range(maps.DROP_REASONS):
            t[ct.c_uint32(cid * maps.DROP_REASONS + reason)] = _zeros(t)


class NetlinkPerThread:
    """rtnetlink sockets per thread, each opened inside `netns` by setns: a
    pyroute2 IPRoute (get) and a lean dataplane.rtnl socket (lean), each
    opened on the thread's first use.

    pyroute2's synchronous IPRoute opens a fresh socket for every thread that
    uses it, in that thread's namespace; a socket opened by setns therefore
    only serves its own thread. `IPRoute(netns=...)` would follow the
    namespace but forks a helper to do it (see pcn_agent.dataplane.netns).
    The sockets of a thread that has ended are closed when the next one is
    opened: short-lived threads (a request's) leave no descriptor behind."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._local = threading.local()
        self._all: list[tuple[threading.Thread, IPRoute | Rtnl]] = []
        self._lock = threading.Lock()

    def get(self) -> IPRoute:
        ipr: IPRoute | None = getattr(self._local, "ipr", None)
        if ipr is None:
            ipr = iproute(self.netns)
            self._local.ipr = ipr
            self._keep(ipr)
        return ipr

    def lean(self) -> Rtnl:
        nl: Rtnl | None = getattr(self._local, "lean", None)
        if nl is None:
            with entered(self.netns):
                nl = Rtnl()
            self._local.lean = nl
            self._keep(nl)
        return nl

    def _keep(self, sock: IPRoute | Rtnl) -> None:
        with self._lock:
            ended = [old for t, old in self._all if not t.is_alive()]
            self._all = [(t, old) for t, old in self._all if t.is_alive()]
            self._all.append((threading.current_thread(), sock))
        for old in ended:
            _close_quietly(old)

    def open_sockets(self) -> int:
        """How many sockets are open (one or two per live thread that used this)."""
        with self._lock:
            return len(self._all)

    def close(self) -> None:
        with self._lock:
            for _, sock in self._all:
                _close_quietly(sock)
            self._all.clear()


def _close_quietly(sock: IPRoute | Rtnl) -> None:
    try:
        sock.close()
    except Exception:  # a thread's socket may already be gone
        log.debug("closing a netlink socket failed", exc_info=True)


_PORT_SCALARS = tuple(f.name for f in fields(PortState) if f.name != "hooks")


def _port_dict(p: PortState) -> dict[str, Any]:
    """asdict(p) without its deep copies (every save writes every port)."""
    d: dict[str, Any] = {name: getattr(p, name) for name in _PORT_SCALARS}
    d["hooks"] = {str(h): [{"slot": s.slot, "instance": s.instance} for s in stack]
                  for h, stack in p.hooks.items()}
    return d


def _zeros(table: maps.BpfTable) -> object:
    """A zero value for a per-CPU table (BCC's Leaf already holds one per CPU)."""
    return table.Leaf()


def _load_in_parallel(module: BpfModule, progs: Sequence[str]) -> None:
    """Load (verify) a module's programs side by side, one thread per CPU:
    the kernel's verifier is most of a load and runs in the calling thread,
    and BCC's load_func keeps what it loaded, so the loads that follow find
    them done. With the node's five programs this saves about a second of an
    agent's start on two CPUs (what the CNI waits for after a restart). A
    failure is raised here as the sequential load would raise it."""
    workers = min(len(progs), os.cpu_count() or 1)
    if workers < 2:
        return
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="pcn-load") as pool:
        for fut in [pool.submit(module.load_func, p, _sched_cls()) for p in progs]:
            fut.result()


def _sched_cls() -> int:
    from bcc import BPF

    return int(BPF.SCHED_CLS)


def _local_mac(instance: str, port_id: int) -> str:
    """A stable, locally administered unicast MAC for a cube port."""
    import zlib

    h = zlib.crc32(instance.encode()) & 0xFFFF
    return f"0a:58:{h >> 8:02x}:{h & 0xff:02x}:{port_id >> 8:02x}:{port_id & 0xff:02x}"
