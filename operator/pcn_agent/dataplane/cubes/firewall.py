"""Control of `firewall` cubes: ordered rules (first match wins, up to
MAX_RULES), a default action, per-rule hit counters, optional tracking of the
connections it allowed so that their replies pass, and a program specialised
to the rule set's shape (bpf/firewall.c).

The rules become the bit vectors of a Linear Bit Vector Search
(fwvectors.py): the per-packet cost does not grow with the rules' order or
count beyond one 64-bit AND per 64 rules. The rule language is
pcn_crds.rules (shared with `kubectl pcn --rule`).
"""

from __future__ import annotations

import ctypes as ct
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from pcn_agent.dataplane import maps
from pcn_agent.dataplane.compiler import BpfModule
from pcn_agent.dataplane.cubes import fwvectors
from pcn_agent.dataplane.cubes.fwvectors import LPM_FIXED_BITS, Tables, compile_rules
from pcn_agent.dataplane.runtime import Runtime
from pcn_crds.rules import ACTIONS, Rule

log = logging.getLogger(__name__)

TYPE = "firewall"
MAX_RULES = 10_000  # the NetworkFunction CRD's limit (vectors hold fwvectors.CAP_RULES)
IDX_DEFAULT = 0xFFFF  # bpf/firewall.c FW_IDX_DEFAULT: the default action's hit counter
IDX_REPLY = 0xFFFE  # FW_IDX_REPLY: replies let through by connection tracking
CFG_ALLOW_REPLIES = 1  # FW_CFG_ALLOW_REPLIES
GENERIC = {"FW_MAX_RULES": fwvectors.CAP_RULES, "FW_NEED_L4": 1, "FW_TRACK": 1}  # any rule set
_BATCH = 4096  # keys per BPF_MAP_*_BATCH call


def specialisation(rules: Sequence[Rule], allow_replies: bool = False) -> dict[str, int]:
    """Compile-time shape of a rule set: the vector words the program ANDs at
    most (FW_MAX_RULES, a power of two of rules, so rule edits rarely need a
    new compile; capped at fwvectors.CAP_RULES), whether L4 must be parsed,
    and FW_TRACK when replies are tracked (only then: a firewall without it
    keeps the two-key shape)."""
    bound = 1
    while bound < len(rules):
        bound *= 2
    spec = {"FW_MAX_RULES": min(bound, fwvectors.CAP_RULES),
            "FW_NEED_L4": int(allow_replies or any(r.needs_l4 for r in rules))}
    if allow_replies:
        spec["FW_TRACK"] = 1
    return spec


def _span(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    """The shape of a program that evaluates the rule sets of both shapes."""
    return {k: max(a.get(k, 0), b.get(k, 0)) for k in sorted({*a, *b})
            if max(a.get(k, 0), b.get(k, 0)) or k != "FW_TRACK"}


def _rule_dict(r: Rule) -> dict[str, Any]:
    """dataclasses.asdict(r), without its deep copies (10 000 rules: 250 ms)."""
    return {"action": r.action, "proto": r.proto, "src": r.src, "dst": r.dst,
            "sport": r.sport, "dport": r.dport}


def _be32(value: int) -> int:
    """An unsigned 32-bit number as the u32 whose memory holds it in network order."""
    return int.from_bytes(value.to_bytes(4, "big"), "little")


class Firewall:
    """One firewall instance: its cube, its rules in force and their tables
    (generation `gen`), and the program shape in its slot. Constructed with
    the name of a cube the runtime already has, it adopts it (an agent
    restart) from the config saved with the cube; otherwise it creates the
    cube and sets `rules` (ValueError as set_rules)."""

    def __init__(self, rt: Runtime, name: str, rules: list[Rule] | None = None,
                 default: str = "allow", fast: bool = False, allow_replies: bool = False
                 ) -> None:
        self.rt = rt
        self.name = name
        adopted = name in rt.cubes
        self.cube = rt.cube(name) if adopted else rt.add_cube(name, TYPE, own_slot=True)
        self.rules: list[Rule] = []
        self.default = default
        self.allow_replies = False
        self.gen = 0
        self.tables = Tables(0)  # what the rules in force wrote under self.gen
        self.spec: dict[str, int] = {}  # the shape of the program in the slot
        self.wanted_spec: dict[str, int] = {}  # the shape the rules in force need
        self.last_apply: dict[str, float] = {}  # seconds per phase of the last set_rules
        if adopted:
            c = self.cube.config
            self.rules = [Rule(**{**r, "sport": tuple(r["sport"]) if r["sport"] else None,
                                  "dport": tuple(r["dport"]) if r["dport"] else None})
                          for r in c["rules"]]
            self.default, self.gen = c["default"], c["gen"]
            self.allow_replies = bool(c.get("allowReplies", False))
            self.tables = compile_rules(self.rules)  # the keys in the pinned maps
            self.spec = self.wanted_spec = specialisation(self.rules, self.allow_replies)
            variant = rt.load_variant(TYPE, self.spec)
            self._bind_tables(variant.module)
            rt.set_slot(self._slot, variant.fd)  # new program, same slot: atomic
            if not self._in_force():
                # saved by an agent whose firewall kept its rules elsewhere (the
                # linear one, before the vectors): write them again, now
                log.warning("firewall %s: its rules were not in the vector maps; rewritten",
                            name)
                self.set_rules(self.rules, self.default, allow_replies=self.allow_replies)
        else:
            try:
                self.set_rules(rules or [], default, fast, allow_replies)
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
        self._lpm_t = module[b"fw_lpm"]
        self._vecs_t = module[b"fw_vecs"]
        self._cfg_t = module[b"fw_conf"]
        self._hits_t = module[b"fw_rule_hits"]

    def _in_force(self) -> bool:
        """Whether the instance's config names the generation this object wrote."""
        try:
            cfg = self._cfg_t[ct.c_uint32(self.cube.id)]
        except KeyError:
            return False
        return int(cfg.gen) == self.gen and int(cfg.n_rules) == len(self.rules)

    # ------------------------------------------------------------------ map writes
    def _lpm_keys(self, tables: Tables, gen: int) -> list[maps.FwLpmKey]:
        return [maps.FwLpmKey(LPM_FIXED_BITS + e.plen, self.cube.id, gen, e.field,
                              _be32(e.value)) for e in tables.lpm]

    def _vec_keys(self, tables: Tables, gen: int) -> list[maps.FwVecKey]:
        return [maps.FwVecKey(self.cube.id, gen, f, i) for f, i in tables.vectors]

    @staticmethod
    def _update(table: maps.BpfTable, keys: Sequence[Any], values: Sequence[Any],
                key_type: Any, value_type: Any) -> None:
        """Write many entries: BPF_MAP_UPDATE_BATCH, _BATCH at a time, or
        one by one where the map type has no batch operations (LPM tries).
        `key_type`, `value_type`: the ctypes types (BCC's, or maps' mirrors)."""
        for at in range(0, len(keys), _BATCH):
            ks, vs = keys[at:at + _BATCH], values[at:at + _BATCH]
            try:
                table.items_update_batch((key_type * len(ks))(*ks), (value_type * len(vs))(*vs))
            except Exception:  # noqa: BLE001 - BCC raises a bare Exception (EINVAL, ENOTSUPP)
                for k, v in zip(ks, vs, strict=True):
                    table[k] = v

    @staticmethod
    def _delete(table: maps.BpfTable, keys: Sequence[Any], key_type: Any) -> None:
        """Delete many entries (those already gone are no error)."""
        for at in range(0, len(keys), _BATCH):
            ks = keys[at:at + _BATCH]
            try:
                table.items_delete_batch((key_type * len(ks))(*ks))
            except Exception:  # noqa: BLE001 - a missing key fails the whole batch: one by one
                for k in ks:
                    try:
                        del table[k]
                    except KeyError:
                        pass

    def _write_tables(self, tables: Tables, gen: int) -> None:
        self._update(self._vecs_t, self._vec_keys(tables, gen),
                     [maps.FwVec.from_buffer_copy(tables.vector_bytes(k))
                      for k in tables.vectors], maps.FwVecKey, maps.FwVec)
        self._update(self._lpm_t, self._lpm_keys(tables, gen),
                     [ct.c_uint32(e.vector) for e in tables.lpm], maps.FwLpmKey, ct.c_uint32)

    def _drop_tables(self, tables: Tables, gen: int) -> None:
        self._delete(self._lpm_t, self._lpm_keys(tables, gen), maps.FwLpmKey)
        self._delete(self._vecs_t, self._vec_keys(tables, gen), maps.FwVecKey)

    def _hit_keys(self, indexes: Sequence[int]) -> list[maps.FwHitKey]:
        return [maps.FwHitKey(self.cube.id, i) for i in indexes]

    def _set_hits(self, indexes: Sequence[int]) -> None:
        """Create (or zero) the hit counters of `indexes`."""
        leaf = self._hits_t.Leaf
        self._update(self._hits_t, self._hit_keys(indexes), [leaf() for _ in indexes],
                     maps.FwHitKey, leaf)

    # ------------------------------------------------------------------ rule sets
    def set_rules(self, rules: list[Rule], default: str = "allow", fast: bool = False,
                  allow_replies: bool = False) -> None:
        """Replace the rule set. The new vectors are written under a new
        generation, then one config update switches to them and the old
        generation's entries are deleted; the program is recompiled only when
        the rule set's shape changes, and swapped into the instance's slot in
        one update each time, before and/or after the switch, so that the
        program in place can always evaluate the rules in force.

        `allow_replies`: packets of a connection this firewall allowed that
        come from the other end pass whatever the rules say (the opener's
        packets are judged by the rules each time). ValueError for more than
        MAX_RULES rules or an unknown default action; last_apply then holds
        the seconds of each phase (compile, write, switch, cleanup)."""
        if len(rules) > MAX_RULES:
            raise ValueError(f"a firewall holds at most {MAX_RULES} rules, got {len(rules)}")
        if default not in ACTIONS:
            raise ValueError(f"default action must be allow or drop, not {default!r}")
        t0 = time.monotonic()
        tables = compile_rules(rules)
        wanted = specialisation(rules, allow_replies)
        # fast: when the specialised program is not compiled yet, run the generic
        # one (it evaluates any rule set) now and specialise() later.
        spec = GENERIC if fast and not self.rt.has_variant(TYPE, wanted) else wanted
        variant = self.rt.load_variant(TYPE, spec)
        old_spec, old_gen, old_n, old_tables = self.spec, self.gen, len(self.rules), self.tables
        # Around the switch, the program in the slot must evaluate the old rules
        # and the new ones: the one specialised for the larger of each bound.
        # That is the new program when the shape grows, the old one when it
        # shrinks, and a third one when the loop bound shrinks while ports
        # become needed, or the reverse.
        span = _span(spec, old_spec)
        bridge = self.rt.load_variant(TYPE, span)
        self._bind_tables(variant.module)
        t1 = time.monotonic()
        gen = (old_gen + 1) & 0xFFFFFFFF
        try:
            self._write_tables(tables, gen)
            self._set_hits([*range(old_n, len(rules)), IDX_DEFAULT, IDX_REPLY])  # to count in
        except BaseException:
            # a full map, say: the old rules stay in force, the half-written
            # generation goes (the program never saw it)
            self._drop_tables(tables, gen)
            self._delete(self._hits_t, self._hit_keys(range(old_n, len(rules))), maps.FwHitKey)
            raise
        t2 = time.monotonic()
        if span != old_spec:
            self.rt.set_slot(self._slot, bridge.fd)
        self._cfg_t[ct.c_uint32(self.cube.id)] = maps.FwCfg(
            gen, len(rules), ACTIONS[default], CFG_ALLOW_REPLIES if allow_replies else 0)
        if span != spec:
            self.rt.set_slot(self._slot, variant.fd)
        t3 = time.monotonic()
        self._drop_tables(old_tables, old_gen)
        self._delete(self._hits_t, self._hit_keys(range(len(rules), old_n)), maps.FwHitKey)
        self._set_hits([*range(len(rules)), IDX_DEFAULT, IDX_REPLY])  # they start again
        self.rules, self.default, self.gen, self.spec = list(rules), default, gen, spec
        self.wanted_spec = wanted
        self.allow_replies, self.tables = allow_replies, tables
        self.cube.config = {"rules": [_rule_dict(r) for r in self.rules], "default": default,
                            "gen": gen, "allowReplies": allow_replies}
        self.last_apply = {"compile": t1 - t0, "write": t2 - t1, "switch": t3 - t2,
                           "cleanup": time.monotonic() - t3}

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

    # ------------------------------------------------------------------ counters
    def _count(self, idx: int) -> int:
        try:
            return int(sum(self._hits_t[maps.FwHitKey(self.cube.id, idx)]))
        except KeyError:
            return 0

    def hits(self) -> dict[str, int]:
        """Hits per rule (by "index: rule text"), of the default action
        ("default: allow|drop") and, when replies are tracked, of the replies
        let through ("replies: allow"). Packets since the rule set was set."""
        out = {f"{i}: {r}": self._count(i) for i, r in enumerate(self.rules)}
        out[f"default: {self.default}"] = self._count(IDX_DEFAULT)
        if self.allow_replies:
            out["replies: allow"] = self._count(IDX_REPLY)
        return out

    def rule_hits(self) -> list[int]:
        """Hits of each rule, in order."""
        return [self._count(i) for i in range(len(self.rules))]

    def default_hits(self) -> int:
        """Packets no rule matched (the default action's)."""
        return self._count(IDX_DEFAULT)

    def reply_hits(self) -> int:
        """Replies let through by connection tracking."""
        return self._count(IDX_REPLY)

    def delete(self) -> None:
        self._drop_tables(self.tables, self.gen)
        self._delete(self._hits_t, self._hit_keys([*range(len(self.rules)), IDX_DEFAULT,
                                                   IDX_REPLY]), maps.FwHitKey)
        try:
            del self._cfg_t[ct.c_uint32(self.cube.id)]
        except KeyError:
            pass
        self.rt.remove_cube(self.name)
