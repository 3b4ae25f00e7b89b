"""Control of `packetcapture` cubes (bpf/packetcapture.c): a transparent cube
that copies the frames its filter matches to the agent through a BPF ring
buffer, at most `budget` copies a second, at most `snaplen` bytes each.

Its counters (`PacketCapture.stats`) partition what it matched exactly:

    matched == copied + not_copied + lost

every matched frame counts once as copied (its record is in the ring
buffer), not_copied (over the budget, or nothing to copy) or lost (the ring
buffer had no room: nobody reading fast enough). Read them after
`stop_matching` for the identity to hold to the frame (a frame the program
runs meanwhile has one and not yet the other).

One program serves every capture of a runtime (the type's shared slot); an
instance is its map entries: the match program (pcn_crds.capfilter), the
snap length and the budget. `CaptureRing` reads the type's one ring buffer
and hands each copy to the capture it belongs to.

Captures are not adopted by a restarted agent: they belong to whoever reads
them (pcn_agent.control.captures), and that reader went with the process.
"""

from __future__ import annotations

import ctypes as ct
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pcn_agent.dataplane.runtime import Runtime
from pcn_crds.capfilter import MAX_INSNS, REJECT, Insn

log = logging.getLogger(__name__)

TYPE = "packetcapture"
SNAP_MAX = 8192  # CAP_SNAP_MAX: the largest copy of one frame, bytes
DEFAULT_SNAPLEN = SNAP_MAX
DEFAULT_BUDGET = 2000  # copies per second
MAX_BUDGET = 100_000
STATS = ("matched", "copied", "not_copied", "lost")  # CAP_STAT_* order
RING_BYTES = 4096 * 4096  # CAP_RING_PAGES pages: a second of DEFAULT_BUDGET at SNAP_MAX


class CapCfg(ct.Structure):
    _fields_ = [("n_insns", ct.c_uint32), ("snaplen", ct.c_uint32), ("budget", ct.c_uint32),
                ("port", ct.c_uint32)]  # port: only that port's frames match; 0: every port


class CapInsn(ct.Structure):
    _fields_ = [("field", ct.c_uint8), ("pad", ct.c_uint8), ("jt", ct.c_uint16),
                ("jf", ct.c_uint16), ("pad2", ct.c_uint16), ("mask", ct.c_uint32),
                ("lo", ct.c_uint32), ("hi", ct.c_uint32)]


class RateBudget(ct.Structure):
    _fields_ = [("window", ct.c_uint64), ("used", ct.c_uint64)]


class CapEvent(ct.Structure):
    _fields_ = [("ts_ns", ct.c_uint64), ("inst", ct.c_uint32), ("port", ct.c_uint32),
                ("wire_len", ct.c_uint32), ("cap_len", ct.c_uint32), ("hook", ct.c_uint8),
                ("pad", ct.c_uint8 * 7)]


# (map name in C, key struct, value struct) for the size check against BCC's.
MIRRORS: dict[str, tuple[type, type]] = {
    "cap_cfgs": (ct.c_uint32, CapCfg),
    "cap_prog": (ct.c_int, CapInsn),
    "cap_budget": (ct.c_int, RateBudget),
}


@dataclass(frozen=True)
class Captured:
    """One copied frame. `ts_ns`: CLOCK_MONOTONIC ns (bpf_ktime_get_ns);
    `hook`: maps.HOOK_INGRESS (the port's ingress hook: what a pod sends) or
    maps.HOOK_EGRESS (what it receives); `wire_len`: the frame's whole length
    (`data` holds its first min(wire_len, snaplen) bytes)."""

    ts_ns: int
    instance: int
    port: int
    hook: int
    wire_len: int
    data: bytes


def parse_event(raw: bytes) -> Captured:
    """A ring buffer record (struct cap_event + the copied bytes)."""
    hdr = CapEvent.from_buffer_copy(raw[: ct.sizeof(CapEvent)])
    body = raw[ct.sizeof(CapEvent): ct.sizeof(CapEvent) + hdr.cap_len]
    if len(body) != hdr.cap_len:
        raise ValueError(f"capture record holds {len(body)} bytes, its header says {hdr.cap_len}")
    return Captured(int(hdr.ts_ns), int(hdr.inst), int(hdr.port), int(hdr.hook),
                    int(hdr.wire_len), body)


def _check(program: Sequence[Insn], snaplen: int, budget: int, least_budget: int) -> None:
    """ValueError naming the bound when a capture's filter, snap length or
    budget (frames a second; 0, copying nothing, only for a capture point
    nobody reads) is out of the cube's range."""
    if len(program) > MAX_INSNS:
        raise ValueError(f"a capture filter holds at most {MAX_INSNS} match terms")
    if not 1 <= snaplen <= SNAP_MAX:
        raise ValueError(f"snaplen must lie within 1-{SNAP_MAX} bytes, got {snaplen}")
    if not least_budget <= budget <= MAX_BUDGET:
        raise ValueError(f"the budget must lie within {least_budget}-{MAX_BUDGET} frames a "
                         f"second, got {budget}")


class PacketCapture:
    """One capture instance: a filter program, a snap length, a budget."""

    def __init__(self, rt: Runtime, name: str, program: Sequence[Insn],
                 snaplen: int = DEFAULT_SNAPLEN, budget: int = DEFAULT_BUDGET) -> None:
        _check(program, snaplen, budget, least_budget=1)
        self.rt = rt
        self.name = name
        self.program = list(program)
        self.snaplen = snaplen
        self.budget = budget
        t = rt.load_type(TYPE)
        self._cfg_t = t.module[b"cap_cfgs"]
        self._prog_t = t.module[b"cap_prog"]
        self._budget_t = t.module[b"cap_budget"]
        self._stats_t = t.module[b"cap_stats"]
        self.cube = rt.add_cube(name, TYPE)
        try:
            cid = self.cube.id
            for i, x in enumerate(self.program):
                self._prog_t[ct.c_int(cid * MAX_INSNS + i)] = CapInsn(
                    x.field, 0, x.jt, x.jf, 0, x.mask, x.lo, x.hi)
            self._budget_t[ct.c_int(cid)] = RateBudget(0, 0)
            zeros = self._stats_t.Leaf()
            for k in range(len(STATS)):
                self._stats_t[ct.c_int(cid * len(STATS) + k)] = zeros
            # the config last: the program runs nothing of this instance before it
            self._cfg_t[ct.c_uint32(cid)] = CapCfg(len(self.program), snaplen, budget, 0)
            self.cube.config = {"snaplen": snaplen, "budget": budget,
                                "insns": len(self.program)}
        except BaseException:
            rt.remove_cube(name)
            raise

    @classmethod
    def adopt(cls, rt: Runtime, name: str, program: Sequence[Insn]) -> PacketCapture:
        """The capture cube `name` a previous agent left in `rt` (a
        packetcapture NetworkFunction's), whose maps hold `program` (the
        caller compiles it again from the function's filter) and the snap
        length and budget of its config."""
        cap = cls.__new__(cls)
        cap.rt, cap.name, cap.program = rt, name, list(program)
        cap.cube = rt.cube(name)
        cap.snaplen = int(cap.cube.config.get("snaplen", DEFAULT_SNAPLEN))
        cap.budget = int(cap.cube.config.get("budget", 0))
        t = rt.load_type(TYPE)
        cap._cfg_t, cap._prog_t = t.module[b"cap_cfgs"], t.module[b"cap_prog"]
        cap._budget_t, cap._stats_t = t.module[b"cap_budget"], t.module[b"cap_stats"]
        return cap

    def reconfigure(self, program: Sequence[Insn], snaplen: int, budget: int,
                    port: int = 0) -> None:
        """Copy what `program` matches, `snaplen` bytes of each (1-SNAP_MAX),
        at most `budget` a second (0-MAX_BUDGET; 0: copy nothing, count the
        matches), of port `port` only (a port id; 0: every port the cube is
        stacked on), from the next frame on. A frame meanwhile runs the old
        program, or matches nothing, or runs the new one: the config entry
        (the program's length) is rewritten first and last."""
        _check(program, snaplen, budget, least_budget=0)
        cid = self.cube.id
        # no frame must run a mix of two programs: one term only (its jumps
        # past it reject), then a term that rejects both ways, meanwhile
        # (n_insns 0 would match everything)
        self._cfg_t[ct.c_uint32(cid)] = CapCfg(1, snaplen, 0, 0)
        self._prog_t[ct.c_int(cid * MAX_INSNS)] = CapInsn(0, 0, REJECT, REJECT, 0, 0, 0, 0)
        for i, x in enumerate(program):
            self._prog_t[ct.c_int(cid * MAX_INSNS + i)] = CapInsn(
                x.field, 0, x.jt, x.jf, 0, x.mask, x.lo, x.hi)
        self._cfg_t[ct.c_uint32(cid)] = CapCfg(len(program), snaplen, budget, port)
        self.program, self.snaplen, self.budget = list(program), snaplen, budget
        self.cube.config = {**self.cube.config, "snaplen": snaplen, "budget": budget,
                            "insns": len(program)}

    @property
    def instance(self) -> int:
        return self.cube.id

    def stop_matching(self) -> None:
        """Match nothing from the next frame on (every frame passes,
        uncounted): the counters stay as they are, and the ring buffer
        receives no more of this instance's copies. `reconfigure` matches
        again."""
        try:
            del self._cfg_t[ct.c_uint32(self.cube.id)]
        except KeyError:
            pass

    def stats(self) -> dict[str, int]:
        """Frames since the start: {"matched", "copied", "not_copied",
        "lost"}, with matched == copied + not_copied + lost (exactly, once
        the instance stopped matching): not_copied over the budget (or for
        no byte to copy), lost for a full ring buffer (or a failed copy)."""
        base = self.cube.id * len(STATS)
        return {name: int(sum(self._stats_t[ct.c_int(base + k)]))
                for k, name in enumerate(STATS)}

    def delete(self) -> None:
        """Stop copying (the config goes first), then remove the cube. The
        caller takes it off every hook before."""
        self.stop_matching()
        self.rt.remove_cube(self.name)


Sink = Callable[[Captured], None]


class CaptureRing:
    """The packetcapture type's ring buffer of one runtime, read by one
    thread at a time (`poll`); each record goes to the sink registered for
    its instance, records of unknown instances are counted and dropped."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._sinks: dict[int, Sink] = {}
        self._lock = threading.Lock()
        self.orphans = 0  # records of no registered capture
        self.bad = 0  # records that did not parse
        module: Any = rt.load_type(TYPE).module
        self._module = module

        def on_record(_ctx: int, data: int, size: int) -> int:
            try:
                event = parse_event(ct.string_at(data, size))
            except ValueError:
                self.bad += 1
                log.warning("capture ring: a record of %d bytes does not parse", size)
                return 0
            with self._lock:
                sink = self._sinks.get(event.instance)
            if sink is None:
                self.orphans += 1
                return 0
            try:
                sink(event)
            except Exception:  # one reader's failure is not the ring's
                log.exception("capture sink of instance %d failed", event.instance)
            return 0

        self._callback = on_record  # BCC keeps a ctypes wrapper; keep the function alive too
        module[b"cap_events"].open_ring_buffer(on_record)

    def register(self, instance: int, sink: Sink) -> None:
        with self._lock:
            self._sinks[instance] = sink

    def unregister(self, instance: int) -> None:
        with self._lock:
            self._sinks.pop(instance, None)

    def poll(self, timeout_ms: int = 100) -> None:
        """Deliver what the ring holds; wait up to `timeout_ms` for a record."""
        self._module.ring_buffer_poll(timeout_ms)
