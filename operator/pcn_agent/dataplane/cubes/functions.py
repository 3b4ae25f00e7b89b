"""The cube types a NetworkFunction can name (spec.type), behind one
interface, so that the manager creates, reconfigures, adopts and deletes
them, and the agent reports their counters, without knowing which type is
which. A new type is a FunctionCube subclass listed in FUNCTION_CUBES (and
its config model in pcn_crds.FUNCTION_TYPES; a test checks both tables list
the same types).

Each type turns its validated pydantic config into *settings*: a frozen,
hashable value that the reconciler compares (a NetworkFunction whose settings
did not change causes no data-plane operation) and that an adopted cube
reports back, so an agent restart re-applies nothing.
"""

from __future__ import annotations

import builtins
import threading
from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from pcn_agent.dataplane.cubes.firewall import GENERIC, Firewall
from pcn_agent.dataplane.cubes.firewall import TYPE as FIREWALL
from pcn_agent.dataplane.cubes.flowmonitor import TYPE as FLOWMONITOR
from pcn_agent.dataplane.cubes.flowmonitor import FlowMonitor
from pcn_agent.dataplane.cubes.packetcapture import TYPE as PACKETCAPTURE
from pcn_agent.dataplane.cubes.packetcapture import PacketCapture
from pcn_agent.dataplane.cubes.policer import TYPE as POLICER
from pcn_agent.dataplane.cubes.policer import Policer, PolicerSettings
from pcn_agent.dataplane.runtime import Runtime
from pcn_crds.capfilter import Insn, compile_filter
from pcn_crds.common import Model
from pcn_crds.networkfunction import (
    FirewallConfig,
    FlowMonitorConfig,
    PacketCaptureConfig,
    PolicerConfig,
)
from pcn_crds.rules import parse_rule

S = TypeVar("S")


class FunctionCube(ABC):
    """One NetworkFunction's cube on this node."""

    type: ClassVar[str]
    config_model: ClassVar[builtins.type[Model]]
    name: str

    @classmethod
    @abstractmethod
    def settings_of(cls, config: Model) -> Hashable:
        """The settings of a validated config (TypeError for another type's)."""

    @classmethod
    @abstractmethod
    def create(cls, rt: Runtime, name: str, settings: Hashable) -> FunctionCube:
        """A new cube `name` in force with `settings`; nothing is left behind
        when it fails (the exception is the runtime's or ValueError)."""

    @classmethod
    @abstractmethod
    def adopt(cls, rt: Runtime, name: str) -> FunctionCube:
        """The cube `name` a previous agent left in `rt`, with its settings."""

    @classmethod
    def warm_up(cls, rt: Runtime) -> None:
        """Compile ahead of need what the first instance will run."""
        rt.load_type(cls.type)

    @property
    @abstractmethod
    def settings(self) -> Hashable:
        """The settings in force."""

    @abstractmethod
    def configure(self, settings: Hashable) -> None:
        """Put new settings in force, without a packet of a flow seeing no cube."""

    @abstractmethod
    def status(self) -> dict[str, Any]:
        """Its configuration and counters as JSON-able data, summed over CPUs
        (the node status ConfigMap; `kubectl pcn chain` shows it)."""

    @abstractmethod
    def delete(self) -> None:
        """Remove the cube and its map entries (stack it on no port first)."""

    def function_type(self) -> str:
        """The type a FunctionSpec names for this cube: the class's, or for a
        custom cube its CubeType's runtime type (custom.runtime_type)."""
        return self.type

    def specialise(self, lock: threading.RLock) -> bool:
        """Swap in a program compiled for the settings in force, if the type
        has such programs (see Firewall.specialise). True when swapped."""
        return False

    def stacked_on(self, ports: set[int]) -> None:
        """Learn the ports the cube is stacked on now (after chains changed),
        to drop per-port state of the others; a type without such state
        keeps nothing to drop."""
        return None


# ----------------------------------------------------------------------------- firewall
@dataclass(frozen=True)
class FirewallSettings:
    """Rules in the firewall's rule language (pcn_crds.rules), in order, and
    the default action."""

    rules: tuple[str, ...]
    default: str = "allow"
    allow_replies: bool = False  # replies of allowed connections pass (allowReplies)


# Rules (text and hits) a firewall lists in its status: the node's status
# ConfigMap holds 1 MiB, and a firewall up to 10 000 rules (~400 KB of text).
STATUS_RULES = 256
STATUS_LATER_HITS = 256  # and the hits of that many of the others (the most hit)


class FirewallFunction(FunctionCube):
    type = FIREWALL
    config_model = FirewallConfig

    def __init__(self, fw: Firewall) -> None:
        self.fw = fw
        self.name = fw.name

    @classmethod
    def settings_of(cls, config: Model) -> FirewallSettings:
        if not isinstance(config, FirewallConfig):
            raise TypeError(f"not a firewall config: {type(config).__name__}")
        return FirewallSettings(tuple(r.to_text() for r in config.rules), config.defaultAction,
                                bool(config.allowReplies))

    @classmethod
    def create(cls, rt: Runtime, name: str, settings: Hashable) -> FirewallFunction:
        s = _settings(settings, FirewallSettings)
        # fast: in force at once with the generic program; specialise() swaps
        # the specialised one in once it is compiled
        return cls(Firewall(rt, name, [parse_rule(t) for t in s.rules], s.default, fast=True,
                            allow_replies=s.allow_replies))

    @classmethod
    def adopt(cls, rt: Runtime, name: str) -> FirewallFunction:
        return cls(Firewall(rt, name))

    @classmethod
    def warm_up(cls, rt: Runtime) -> None:
        rt.load_variant(FIREWALL, GENERIC)

    @property
    def settings(self) -> FirewallSettings:
        return FirewallSettings(tuple(str(r) for r in self.fw.rules), self.fw.default,
                                self.fw.allow_replies)

    def configure(self, settings: Hashable) -> None:
        s = _settings(settings, FirewallSettings)
        self.fw.set_rules([parse_rule(t) for t in s.rules], s.default, fast=True,
                          allow_replies=s.allow_replies)

    def status(self) -> dict[str, Any]:
        """The first STATUS_RULES rules and their hits, the count of all
        (rulesTotal) and, beyond those, the hits of the STATUS_LATER_HITS most
        hit later rules by index (laterHits); the default action's hits, the
        replies let through (replyHits) and the drops."""
        fw = self.fw
        hits = fw.rule_hits()
        out: dict[str, Any] = {
            "rules": [str(r) for r in fw.rules[:STATUS_RULES]], "default": fw.default,
            "hits": hits[:STATUS_RULES], "rulesTotal": len(fw.rules),
            "defaultHits": fw.default_hits(), "allowReplies": fw.allow_replies,
            "replyHits": fw.reply_hits(),
            "drops": fw.rt.cube_drops(self.name).get("filtered", 0)}
        if len(hits) > STATUS_RULES:
            later = sorted(((h, i) for i, h in enumerate(hits) if i >= STATUS_RULES and h),
                           reverse=True)[:STATUS_LATER_HITS]
            out["laterHits"] = {str(i): h for h, i in sorted(later, key=lambda x: x[1])}
        return out

    def delete(self) -> None:
        self.fw.delete()

    def specialise(self, lock: threading.RLock) -> bool:
        return self.fw.specialise(lock)


# ----------------------------------------------------------------------------- policer
class PolicerFunction(FunctionCube):
    type = POLICER
    config_model = PolicerConfig

    def __init__(self, policer: Policer) -> None:
        self.policer = policer
        self.name = policer.name

    @classmethod
    def settings_of(cls, config: Model) -> PolicerSettings:
        if not isinstance(config, PolicerConfig):
            raise TypeError(f"not a policer config: {type(config).__name__}")
        return PolicerSettings.of(config)

    @classmethod
    def create(cls, rt: Runtime, name: str, settings: Hashable) -> PolicerFunction:
        return cls(Policer(rt, name, _settings(settings, PolicerSettings)))

    @classmethod
    def adopt(cls, rt: Runtime, name: str) -> PolicerFunction:
        return cls(Policer(rt, name))

    @property
    def settings(self) -> PolicerSettings:
        return self.policer.settings

    def configure(self, settings: Hashable) -> None:
        self.policer.configure(_settings(settings, PolicerSettings))

    def status(self) -> dict[str, Any]:
        return self.policer.status()

    def delete(self) -> None:
        self.policer.delete()

    def stacked_on(self, ports: set[int]) -> None:
        self.policer.keep_buckets(ports)


# ----------------------------------------------------------------------------- flowmonitor
@dataclass(frozen=True)
class FlowMonitorSettings:
    """The flow table's bound (FlowMonitorConfig.max_flows)."""

    max_flows: int


class FlowMonitorFunction(FunctionCube):
    type = FLOWMONITOR
    config_model = FlowMonitorConfig

    def __init__(self, fm: FlowMonitor) -> None:
        self.fm = fm
        self.name = fm.name

    @classmethod
    def settings_of(cls, config: Model) -> FlowMonitorSettings:
        if not isinstance(config, FlowMonitorConfig):
            raise TypeError(f"not a flowmonitor config: {type(config).__name__}")
        return FlowMonitorSettings(config.max_flows)

    @classmethod
    def create(cls, rt: Runtime, name: str, settings: Hashable) -> FlowMonitorFunction:
        return cls(FlowMonitor(rt, name, _settings(settings, FlowMonitorSettings).max_flows))

    @classmethod
    def adopt(cls, rt: Runtime, name: str) -> FlowMonitorFunction:
        return cls(FlowMonitor(rt, name))

    @classmethod
    def warm_up(cls, rt: Runtime) -> None:
        """Nothing: each monitor compiles its own program (its table's bound
        is compiled in)."""

    @property
    def settings(self) -> FlowMonitorSettings:
        return FlowMonitorSettings(self.fm.max_flows)

    def configure(self, settings: Hashable) -> None:
        # a new bound: a new program and table, swapped into the same slot
        self.fm.set_max_flows(_settings(settings, FlowMonitorSettings).max_flows)

    def status(self) -> dict[str, Any]:
        """The bound, and per direction (fromPod, toPod) packets, L3 bytes
        and the flows in the table."""
        out: dict[str, Any] = {"maxFlows": self.fm.max_flows}
        for d, t in self.fm.totals().items():
            side = "fromPod" if d == "from-pod" else "toPod"
            out[f"{side}Packets"] = t["packets"]
            out[f"{side}Bytes"] = t["bytes"]
            out[f"{side}Flows"] = t["flows"]
        return out

    def delete(self) -> None:
        self.fm.delete()


# ----------------------------------------------------------------------------- packetcapture
@dataclass(frozen=True)
class PacketCaptureSettings:
    """A capture point's filter (capfilter text, "" for every frame), snap
    length (bytes) and copies a second while read (PacketCaptureConfig)."""

    filter: str
    snaplen: int
    budget: int


class PacketCaptureFunction(FunctionCube):
    """A packetcapture cube kept in the pods' chain: compiled and stacked
    once, so a capture starts at once. While nobody reads it, it copies
    nothing (its budget is 0: it counts the frames its filter matches);
    `kubectl pcn capture` (pcn_agent.control.observe) reads it with
    start_reading/stop_reading, one reader at a time."""

    type = PACKETCAPTURE
    config_model = PacketCaptureConfig

    def __init__(self, cap: PacketCapture, settings: PacketCaptureSettings) -> None:
        self.cap = cap
        self.name = cap.name
        self._settings = settings
        self.reader = False

    @classmethod
    def warm_up(cls, rt: Runtime) -> None:
        """Nothing here: the agent compiles the type after its first
        reconcile (DataplaneManager.warm_up_capture)."""

    @classmethod
    def settings_of(cls, config: Model) -> PacketCaptureSettings:
        if not isinstance(config, PacketCaptureConfig):
            raise TypeError(f"not a packetcapture config: {type(config).__name__}")
        return PacketCaptureSettings(config.filter or "", config.snaplen, config.budget)

    @classmethod
    def create(cls, rt: Runtime, name: str, settings: Hashable) -> PacketCaptureFunction:
        s = _settings(settings, PacketCaptureSettings)
        program = compile_filter(s.filter)
        cap = PacketCapture(rt, name, program, s.snaplen, max(1, s.budget))
        try:
            f = cls(cap, s)
            f._idle()
        except BaseException:
            cap.delete()
            raise
        return f

    @classmethod
    def adopt(cls, rt: Runtime, name: str) -> PacketCaptureFunction:
        config = rt.cube(name).config
        s = PacketCaptureSettings(str(config.get("filter", "")),
                                  int(config.get("snaplen", 8192)),
                                  int(config.get("maxRate", 2000)))
        f = cls(PacketCapture.adopt(rt, name, compile_filter(s.filter)), s)
        f._idle()  # its reader went with the previous agent
        return f

    def _idle(self) -> None:
        s = self._settings
        self.cap.reconfigure(compile_filter(s.filter), s.snaplen, 0)
        self.cap.cube.config = {**self.cap.cube.config, "filter": s.filter,
                                "maxRate": s.budget}

    @property
    def settings(self) -> PacketCaptureSettings:
        return self._settings

    def configure(self, settings: Hashable) -> None:
        """New settings; a reader meanwhile keeps its own until it stops."""
        self._settings = _settings(settings, PacketCaptureSettings)
        if not self.reader:
            self._idle()

    def start_reading(self, program: Sequence[Insn], snaplen: int, budget: int,
                      port: int = 0) -> None:
        """Copy what `program` matches (the function's filter, or a narrower
        one) on port `port` (the reader's pod's; 0: every pod's), at most
        `snaplen` bytes and `budget` copies a second, each bounded by the
        function's own; the other pods' frames pass uncounted meanwhile.
        RuntimeError when someone reads it."""
        if self.reader:
            raise RuntimeError(f"{self.name} has a reader already")
        s = self._settings
        self.cap.reconfigure(program, min(snaplen, s.snaplen), min(budget, s.budget), port)
        self.reader = True

    def stop_reading(self) -> None:
        """Back to counting its filter's matches, copying nothing."""
        self.reader = False
        self._idle()

    def status(self) -> dict[str, Any]:
        """Its settings, whether someone reads it, and the frames its filter
        matched, copied to a reader, not copied over the rate bound (or for
        want of a reader) and lost (a full ring buffer), since created:
        matchedPackets == copiedPackets + notCopiedPackets + lostPackets but
        for frames in flight (PacketCapture.stats)."""
        s = self._settings
        st = self.cap.stats()
        return {"filter": s.filter, "snapLength": s.snaplen, "maxPacketsPerSecond": s.budget,
                "reading": self.reader, "matchedPackets": st["matched"],
                "copiedPackets": st["copied"], "notCopiedPackets": st["not_copied"],
                "lostPackets": st["lost"]}

    def delete(self) -> None:
        self.cap.delete()


def _settings(settings: Hashable, kind: type[S]) -> S:
    if not isinstance(settings, kind):
        raise TypeError(f"expected {kind.__name__}, got {type(settings).__name__}")
    return settings


FUNCTION_CUBES: dict[str, type[FunctionCube]] = {
    c.type: c for c in (FirewallFunction, PolicerFunction, FlowMonitorFunction,
                        PacketCaptureFunction)}
