"""Control of `policer` cubes (bpf/policer.c): a token bucket per pod, or one
shared by every pod the instance is stacked on, with pass and drop counters.

The bucket's parameters are fixed point (bpf/include/pcn_tbf.h explains the
units and why they cannot overflow); `tbf_params` computes them from a rate
in bit/s and a burst in bytes.
"""

from __future__ import annotations

import ctypes as ct
import logging
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pcn_agent.dataplane import maps
from pcn_agent.dataplane.runtime import Runtime
from pcn_crds.networkfunction import MAX_BURST, PolicerConfig
from pcn_crds.quantity import MAX_BANDWIDTH, MIN_BANDWIDTH

log = logging.getLogger(__name__)

TYPE = "policer"
SCOPES = {"pod": 0, "shared": 1}
FP_SHIFT = 32  # 32.32 fixed point
NS_PER_S = 1_000_000_000


@dataclass(frozen=True)
class PolicerSettings:
    """A policer's validated configuration, hashable (the reconciler compares
    them): rate in bit/s, burst in bytes, scope pod or shared."""

    rate_bits: int
    burst_bytes: int
    scope: Literal["pod", "shared"] = "pod"

    @classmethod
    def of(cls, cfg: PolicerConfig) -> PolicerSettings:
        return cls(cfg.rate_bits(), cfg.burst_bytes(), cfg.scope_or_default())

    def describe(self) -> str:
        return f"{human_rate(self.rate_bits)} burst {self.burst_bytes} B per {self.scope}" \
            if self.scope == "pod" else \
            f"{human_rate(self.rate_bits)} burst {self.burst_bytes} B shared"


def human_rate(bits: int) -> str:
    """10000000 -> '10Mbit/s' (exact SI multiples), else the number of bit/s."""
    for suffix, scale in (("P", 10**15), ("T", 10**12), ("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if bits % scale == 0:
            return f"{bits // scale}{suffix}bit/s"
    return f"{bits}bit/s"


def tbf_params(rate_bits: int, burst_bytes: int) -> maps.TbfParams:
    """pcn_tbf.h's parameters: bytes per ns in 32.32 fixed point, rounded to
    the nearest (at 10 kbit/s, 5369 for 5368.7: 0.006 % fast; at 1 kbit/s,
    the least rate kubelet accepts, 0.02 %), the burst in fixed point, and the
    time an empty bucket takes to fill (rounded up). ValueError outside
    1 kbit/s..1 Pbit/s or 1 byte..MAX_BURST."""
    if not MIN_BANDWIDTH <= rate_bits <= MAX_BANDWIDTH:
        raise ValueError(f"rate {rate_bits} bit/s is outside 1k..1P")
    if not 1 <= burst_bytes <= MAX_BURST:
        raise ValueError(f"burst {burst_bytes} bytes is outside 1..{MAX_BURST}")
    # bytes per ns = rate / 8 / 1e9; times 2^32 = rate * 2^29 / 1e9
    rate_fp = (rate_bits * (1 << (FP_SHIFT - 3)) + NS_PER_S // 2) // NS_PER_S
    burst_fp = burst_bytes << FP_SHIFT
    fill_ns = -(-burst_fp // rate_fp)
    return maps.TbfParams(rate_fp, burst_fp, fill_ns)


@dataclass
class PolicerCounters:
    passed_packets: int = 0
    passed_bytes: int = 0
    dropped_packets: int = 0
    dropped_bytes: int = 0


class Policer:
    """One policer instance. Stacked on port hooks like any transparent cube
    (Runtime.stacked); all instances share the type's one program."""

    def __init__(self, rt: Runtime, name: str, settings: PolicerSettings | None = None) -> None:
        """Create `name` with `settings`, or adopt it from a previous agent
        (settings None: the saved ones). RuntimeError_ when there is no such
        cube to adopt; ValueError for settings out of range."""
        self.rt = rt
        self.name = name
        self._cfgs = rt.table("plc_cfgs", TYPE)
        self._buckets = rt.table("plc_buckets", TYPE)
        self._ctrs = rt.table("plc_ctrs", TYPE)
        if settings is None:
            self.cube = rt.cube(name)
            self.settings = PolicerSettings(**self.cube.config["settings"])
            return
        self.cube = rt.add_cube(name, TYPE)
        try:
            self._zero_counters()
            self.settings = settings
            self._write(settings)
        except BaseException:
            rt.remove_cube(name)  # no half-made cube for a retry to trip over
            raise

    def configure(self, settings: PolicerSettings) -> None:
        """Apply new settings in one map update. Buckets keep their tokens
        (capped at a lowered burst by the program); a change of scope starts
        from fresh, full buckets, as their keys change meaning."""
        old = self.settings
        self._write(settings)
        if settings.scope != old.scope:
            self._forget_buckets()
        self.settings = settings

    def _write(self, settings: PolicerSettings) -> None:
        if settings.scope not in SCOPES:
            raise ValueError(f"scope must be pod or shared, not {settings.scope!r}")
        params = tbf_params(settings.rate_bits, settings.burst_bytes)
        self._cfgs[ct.c_uint32(self.cube.id)] = maps.PlcCfg(params, SCOPES[settings.scope])
        self.cube.config = {"settings": asdict(settings)}

    def counters(self) -> PolicerCounters:
        """Packets and bytes passed and dropped since the instance was created,
        summed over CPUs."""
        out = PolicerCounters()
        for cpu in self._ctrs[ct.c_uint32(self.cube.id * 2)]:
            out.passed_packets += cpu.packets
            out.passed_bytes += cpu.bytes
        for cpu in self._ctrs[ct.c_uint32(self.cube.id * 2 + 1)]:
            out.dropped_packets += cpu.packets
            out.dropped_bytes += cpu.bytes
        return out

    def buckets(self) -> dict[int, float]:
        """Tokens (bytes) in each of this instance's buckets, by port id (0:
        the shared bucket), as of their last packet."""
        return {int(k.port): v.tokens_fp / (1 << FP_SHIFT)
                for k, v in self._buckets.items() if k.inst == self.cube.id}

    def status(self) -> dict[str, Any]:
        """What `kubectl pcn chain` shows of it (node_status)."""
        c = self.counters()
        return {"rate": self.settings.rate_bits, "burst": self.settings.burst_bytes,
                "scope": self.settings.scope, "passedPackets": c.passed_packets,
                "passedBytes": c.passed_bytes, "droppedPackets": c.dropped_packets,
                "droppedBytes": c.dropped_bytes, "drops": c.dropped_packets}

    def keep_buckets(self, ports: set[int]) -> int:
        """Forget the per-pod buckets of ports other than `ports` (the ports
        the instance is stacked on now): a pod gone or out of the chain. Its
        bucket would otherwise stay in the map, which is bounded (a full map
        lets new pods' packets pass unpoliced) and cannot be an LRU one (no
        spin lock there). The shared bucket stays. Returns how many went."""
        gone = [k for k, _ in self._buckets.items()
                if k.inst == self.cube.id and k.port != 0 and k.port not in ports]
        for k in gone:
            try:
                del self._buckets[k]
            except KeyError:
                pass
        return len(gone)

    def _zero_counters(self) -> None:
        zeros = self._ctrs.Leaf()
        for i in (0, 1):
            self._ctrs[ct.c_uint32(self.cube.id * 2 + i)] = zeros

    def _forget_buckets(self) -> None:
        for k in [k for k, _ in self._buckets.items() if k.inst == self.cube.id]:
            try:
                del self._buckets[k]
            except KeyError:
                pass

    def delete(self) -> None:
        try:
            del self._cfgs[ct.c_uint32(self.cube.id)]
        except KeyError:
            pass
        self._forget_buckets()
        self.rt.remove_cube(self.name)
