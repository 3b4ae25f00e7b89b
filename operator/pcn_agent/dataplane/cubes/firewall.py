"""Control of `firewall` cubes: ordered rules, a default action, per-rule hit
counters, and a program specialised to the rule set (bpf/firewall.c).

The rule language is pcn_crds.rules (shared with `kubectl pcn --rule`).
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import logging
import threading
from dataclasses import asdict

from pcn_agent.dataplane import maps
from pcn_agent.dataplane.compiler import BpfModule
from pcn_agent.dataplane.runtime import Runtime
from pcn_crds.rules import ACTIONS, FW_PROTOCOLS, Rule

log = logging.getLogger(__name__)

TYPE = "firewall"
MAX_RULES = 64
HITS_PER_INSTANCE = 256
GENERIC = {"FW_MAX_RULES": MAX_RULES, "FW_NEED_L4": 1}  # evaluates any rule set


def _net(cidr: str | None) -> tuple[int, int]:
    if not cidr:
        return 0, 0
    net = ipaddress.IPv4Network(cidr)
    return maps.ip_be(net.network_address), maps.ip_be(net.netmask)


def specialisation(rules: list[Rule]) -> dict[str, int]:
    """Compile-time shape of a rule set: loop bound (a power of two, so rule
    edits rarely need a new compile) and whether L4 must be parsed."""
    bound = 1
    while bound < len(rules):
        bound *= 2
    return {"FW_MAX_RULES": bound, "FW_NEED_L4": int(any(r.needs_l4 for r in rules))}


class Firewall:
    def __init__(self, rt: Runtime, name: str, rules: list[Rule] | None = None,
                 default: str = "allow", fast: bool = False) -> None:
        self.rt = rt
        self.name = name
        adopted = name in rt.cubes
        self.cube = rt.cube(name) if adopted else rt.add_cube(name, TYPE, own_slot=True)
        self.rules: list[Rule] = []
        self.default = default
        self.gen = 0
        self.spec: dict[str, int] = {}  # the shape of the program in the slot
        self.wanted_spec: dict[str, int] = {}  # the shape the rules in force need
        if adopted:
            c = self.cube.config
            self.rules = [Rule(**{**r, "sport": tuple(r["sport"]) if r["sport"] else None,
                                  "dport": tuple(r["dport"]) if r["dport"] else None})
                          for r in c["rules"]]
            self.default, self.gen = c["default"], c["gen"]
            self.spec = self.wanted_spec = specialisation(self.rules)
            variant = rt.load_variant(TYPE, self.spec)
            self._bind_tables(variant.module)
            rt.set_slot(self._slot, variant.fd)  # new program, same slot: atomic
        else:
            try:
                self.set_rules(rules or [], default, fast)
            except BaseException:
                rt.remove_cube(name)  # no half-made cube for a retry to trip over
                raise

    @property
    def _slot(self) -> int:
        """The program slot of this instance's own (specialised) program."""
        slot = self.cube.slot
        assert slot is not None, f"firewall {self.name} has no program slot of its own"
        return slot

    def _bind_tables(self, module: BpfModule) -> None:
        self._rules_t = module[b"fw_rules"]
        self._cfg_t = module[b"fw_cfgs"]
        self._hits_t = module[b"fw_hits"]

    def set_rules(self, rules: list[Rule], default: str = "allow", fast: bool = False) -> None:
        """Replace the rule set. The new rules are written under a new
        generation, then one config update switches to them; the program is
        recompiled only when the rule set's shape changes, and swapped into
        the instance's slot in one update each time, before and/or after the
        switch, so that the program in place can always evaluate the rules in
        force."""
        if len(rules) > MAX_RULES:
            raise ValueError(f"a firewall holds at most {MAX_RULES} rules, got {len(rules)}")
        if default not in ACTIONS:
            raise ValueError(f"default action must be allow or drop, not {default!r}")
        self.wanted_spec = specialisation(rules)
        # fast: when the specialised program is not compiled yet, run the generic
        # one (it evaluates any rule set) now and specialise() later.
        spec = GENERIC if fast and not self.rt.has_variant(TYPE, self.wanted_spec) \
            else self.wanted_spec
        variant = self.rt.load_variant(TYPE, spec)
        old_spec, old_gen, old_n = self.spec, self.gen, len(self.rules)
        # Around the switch, the program in the slot must evaluate the old rules
        # and the new ones: the one specialised for the larger of each bound.
        # That is the new program when the shape grows, the old one when it
        # shrinks, and a third one when the loop bound shrinks while ports
        # become needed, or the reverse.
        span = {k: max(v, old_spec.get(k, 0)) for k, v in spec.items()}
        bridge = self.rt.load_variant(TYPE, span)
        self._bind_tables(variant.module)
        gen = old_gen + 1
        for i, r in enumerate(rules):
            src, smask = _net(r.src)
            dst, dmask = _net(r.dst)
            sp = r.sport or (0, 65535)
            dp = r.dport or (0, 65535)
            self._rules_t[maps.FwRuleKey(self.cube.id, gen, i)] = maps.FwRule(
                src, smask, dst, dmask, sp[0], sp[1], dp[0], dp[1],
                FW_PROTOCOLS[r.proto] if r.proto else 0, ACTIONS[r.action])
        if span != old_spec:
            self.rt.set_slot(self._slot, bridge.fd)
        self._cfg_t[ct.c_uint32(self.cube.id)] = maps.FwCfg(gen, len(rules), ACTIONS[default])
        if span != spec:
            self.rt.set_slot(self._slot, variant.fd)
        for i in range(old_n):
            try:
                del self._rules_t[maps.FwRuleKey(self.cube.id, old_gen, i)]
            except KeyError:
                pass
        self._zero_hits()
        self.rules, self.default, self.gen, self.spec = list(rules), default, gen, spec
        self.cube.config = {"rules": [asdict(r) for r in self.rules], "default": default,
                            "gen": gen}

    @property
    def specialised(self) -> bool:
        return self.spec == self.wanted_spec

    def specialise(self, lock: threading.RLock) -> bool:
        """Swap the program specialised to the rules in force in for the generic
        one. The compile runs without `lock`; the swap (one program-array
        update, same rules, same config) under it, and only if the rules did
        not change meanwhile. True when a program was swapped."""
        wanted = dict(self.wanted_spec)
        if self.spec == wanted:
            return False
        variant = self.rt.load_variant(TYPE, wanted)
        with lock:
            if self.wanted_spec != wanted or self.spec == wanted:
                return False
            self.rt.set_slot(self._slot, variant.fd)
            self.spec = wanted
        log.info("firewall %s now runs its specialised program %s", self.name, wanted)
        return True

    def hits(self) -> dict[str, int]:
        """Hits per rule (by its text) and of the default action."""
        out = {}
        base = self.cube.id * HITS_PER_INSTANCE
        for i, r in enumerate(self.rules):
            out[f"{i}: {r}"] = int(sum(self._hits_t[ct.c_uint32(base + i)]))
        out[f"default: {self.default}"] = int(
            sum(self._hits_t[ct.c_uint32(base + HITS_PER_INSTANCE - 1)]))
        return out

    def rule_hits(self) -> list[int]:
        base = self.cube.id * HITS_PER_INSTANCE
        return [int(sum(self._hits_t[ct.c_uint32(base + i)])) for i in range(len(self.rules))]

    def _zero_hits(self) -> None:
        base = self.cube.id * HITS_PER_INSTANCE
        zeros = self._hits_t.Leaf()
        for i in [*range(MAX_RULES), HITS_PER_INSTANCE - 1]:
            self._hits_t[ct.c_uint32(base + i)] = zeros

    def delete(self) -> None:
        for i in range(len(self.rules)):
            try:
                del self._rules_t[maps.FwRuleKey(self.cube.id, self.gen, i)]
            except KeyError:
                pass
        try:
            del self._cfg_t[ct.c_uint32(self.cube.id)]
        except KeyError:
            pass
        self.rt.remove_cube(self.name)
