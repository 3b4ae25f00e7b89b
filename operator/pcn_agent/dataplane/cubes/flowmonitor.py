"""Control of `flowmonitor` cubes (bpf/flowmonitor.c): per-flow accounting
(5-tuple and direction: packets, L3 bytes, first/last seen, TCP flags OR-ed)
in an LRU hash of a bounded number of entries.

Each instance has a program slot of its own and a program compiled for it
(-DFM_MAX_FLOWS, -DFM_PIN): its own flow table, pinned under the runtime's
pin directory as `fm_flows_<cube id>_<max flows>`, so a restarted agent
finds the counts again, and a bound that is this instance's alone. A change
of the bound compiles a new program with a new, empty table, swapped into
the slot in one update.

Bytes are L3 bytes, as conntrack's accounting counts them (the IP datagram
with its header, no Ethernet header; a GSO frame counts once, whole).
"""

from __future__ import annotations

import ctypes as ct
import logging
import socket
import time
from dataclasses import dataclass

from pcn_agent.dataplane import maps
from pcn_agent.dataplane.compiler import BpfModule, compile_cube
from pcn_agent.dataplane.runtime import Runtime

log = logging.getLogger(__name__)

TYPE = "flowmonitor"
DEFAULT_MAX_FLOWS = 1024
MAX_FLOWS_LIMIT = 65536
DIRECTIONS = {maps.HOOK_INGRESS: "from-pod", maps.HOOK_EGRESS: "to-pod"}
PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 132: "sctp"}
TCP_FLAG_NAMES = ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR")


class FmTotal(ct.Structure):
    _fields_ = [("packets", ct.c_uint64), ("bytes", ct.c_uint64)]


FmKey, FmVal = maps.FmKey, maps.FmVal  # pinned: mirrored in maps.MIRRORS

MIRRORS: dict[str, tuple[type, type]] = {
    "fm_flows": (FmKey, FmVal),
    "fm_totals": (ct.c_int, FmTotal),
}


def tcp_flags_text(flags: int) -> str:
    """`SYN|ACK|FIN` style, in the header's bit order; "" for none."""
    return "|".join(n for i, n in enumerate(TCP_FLAG_NAMES) if flags & (1 << i))


@dataclass(frozen=True)
class Flow:
    """One flow as accounted. Ports in host order (an ICMP echo's identifier
    in both); `first_ns`/`last_ns` CLOCK_MONOTONIC ns; `bytes` L3 bytes."""

    src: str
    dst: str
    sport: int
    dport: int
    proto: int
    direction: str  # "from-pod" or "to-pod" (the hook of the pod's port)
    packets: int
    bytes: int
    first_ns: int
    last_ns: int
    tcp_flags: int

    def as_dict(self, now_ns: int | None = None) -> dict[str, object]:
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) if now_ns is None else now_ns
        return {"src": self.src, "dst": self.dst, "sport": self.sport, "dport": self.dport,
                "protocol": PROTOCOLS.get(self.proto, str(self.proto)),
                "direction": self.direction, "packets": self.packets, "bytes": self.bytes,
                "firstSeenSecondsAgo": max(0.0, (now - self.first_ns) / 1e9),
                "lastSeenSecondsAgo": max(0.0, (now - self.last_ns) / 1e9),
                "durationSeconds": max(0.0, (self.last_ns - self.first_ns) / 1e9),
                "tcpFlags": tcp_flags_text(self.tcp_flags)}


def _pin_name(cube_id: int, max_flows: int) -> str:
    return f"fm_flows_{cube_id}_{max_flows}"


class FlowMonitor:
    def __init__(self, rt: Runtime, name: str, max_flows: int = DEFAULT_MAX_FLOWS) -> None:
        self.rt = rt
        self.name = name
        self._module: BpfModule | None = None
        adopted = name in rt.cubes
        self.cube = rt.cube(name) if adopted else rt.add_cube(name, TYPE, own_slot=True)
        self.max_flows = 0
        try:
            self.set_max_flows(int(self.cube.config.get("max_flows", max_flows))
                               if adopted else max_flows)
        except BaseException:
            if not adopted:
                rt.remove_cube(name)
            raise

    @property
    def _slot(self) -> int:
        slot = self.cube.slot
        assert slot is not None, f"flowmonitor {self.name} has no program slot of its own"
        return slot

    def set_max_flows(self, max_flows: int) -> None:
        """Bound the flow table to `max_flows` entries (1-65536). A new bound
        is a new program and a new, empty table, swapped in in one update."""
        if not 1 <= max_flows <= MAX_FLOWS_LIMIT:
            raise ValueError(f"maxFlows must lie within 1-{MAX_FLOWS_LIMIT}, got {max_flows}")
        if max_flows == self.max_flows and self._module is not None:
            return
        assert self.rt.pin_dir is not None, "Runtime.open() first"
        old_module, old_max = self._module, self.max_flows
        module = compile_cube(TYPE, self.rt.pin_dir,
                              {**self.rt.defines, "FM_MAX_FLOWS": max_flows,
                               "FM_PIN": _pin_name(self.cube.id, max_flows)})
        from bcc import BPF  # late: pure users of this module need no kernel

        fd = module.load_func(f"{TYPE}_rx", int(BPF.SCHED_CLS)).fd
        self.rt.set_slot(self._slot, fd)
        self._module, self.max_flows = module, max_flows
        self._flows_t = module[b"fm_flows"]
        self._totals_t = module[b"fm_totals"]
        self.cube.config = {"max_flows": max_flows}
        if old_module is not None:
            old_module.cleanup()
            if old_max != max_flows:
                self._unpin(old_max)

    def _unpin(self, max_flows: int) -> None:
        if self.rt.pin_dir is not None:
            (self.rt.pin_dir / _pin_name(self.cube.id, max_flows)).unlink(missing_ok=True)

    def flows(self) -> list[Flow]:
        """Every flow in the table (at most max_flows)."""
        out = []
        for k, v in self._flows_t.items():
            out.append(Flow(maps.ip_str(k.saddr), maps.ip_str(k.daddr),
                            socket.ntohs(int(k.sport)), socket.ntohs(int(k.dport)),
                            int(k.proto), DIRECTIONS.get(int(k.dir), str(int(k.dir))),
                            int(v.packets), int(v.bytes), int(v.first_ns), int(v.last_ns),
                            int(v.tcp_flags)))
        return out

    def totals(self) -> dict[str, dict[str, int]]:
        """Packets and L3 bytes per direction since the program was loaded
        (an agent restart starts them again), and the flows in the table."""
        out = {d: {"packets": 0, "bytes": 0, "flows": 0} for d in DIRECTIONS.values()}
        for hook, d in DIRECTIONS.items():
            for t in self._totals_t[ct.c_int(hook)]:
                out[d]["packets"] += int(t.packets)
                out[d]["bytes"] += int(t.bytes)
        for k, _v in self._flows_t.items():
            name = DIRECTIONS.get(int(k.dir))
            if name is not None:
                out[name]["flows"] += 1
        return out

    def delete(self) -> None:
        self.rt.remove_cube(self.name)  # frees the slot: the program stops running
        if self._module is not None:
            self._module.cleanup()
            self._module = None
        self._unpin(self.max_flows)
