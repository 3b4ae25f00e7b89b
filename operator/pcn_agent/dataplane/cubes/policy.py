"""Control of the `policy` cube (bpf/policy.c): Kubernetes network policy,
as compiled into pcn_policy.rules, enforced on every pod's
port of the node by one cube instance.

State in the maps (all pinned, keyed by the pod's port id where per pod):
  pol_cfgs   port -> generation and, per direction, the tiers' rule counts
             and whether the pod is isolated;
  pol_rules  {port, generation, index, direction} -> rule (address set id,
             counter id, action, ports or named port, tier);
  pol_sets   LPM {set id, prefix} -> named port (proto, port) of the peer;
  pol_host   LPM of the node's own prefixes (always reach the pods);
  pol_ct     connections accepted (pcn_ct.h), pol_ctrs per-CPU counters
             {port, counter id}, pol_epoch the policy epoch.

A pod's rules are written under a new generation, then one update of its
config switches to them (atomic for packets), then the old ones go. Every
change that may alter a verdict bumps the epoch, so tracked connections are
judged again on their next packet. Counter ids are per port, one per
RuleRef, and stay with the RuleRef across updates, so a rule's counts
survive unrelated policy changes.

`explain()` evaluates a packet in Python against what the maps hold (rules
and sets read back), in the order of policyrules' docstring and of
bpf/policy.c's pol_judge: what `kubectl pcn policy` shows.
"""

from __future__ import annotations

import ctypes as ct
import functools
import ipaddress
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pcn_agent.dataplane import maps
from pcn_agent.dataplane.runtime import Runtime, RuntimeError_
from pcn_policy.rules import (
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    Action,
    AddressSet,
    Direction,
    DirectionPolicy,
    PodPolicy,
    PortMatch,
    Rule,
    RuleRef,
    SetEntry,
    used_sets,
)

log = logging.getLogger(__name__)

TYPE = "policy"
MAX_RULES = 64  # policy.c POL_MAX_RULES: rules per pod and direction, all tiers
TIER_ADMIN, TIER_NAMESPACED, TIER_BASELINE = 0, 1, 2  # policy.c POL_TIER_*
CTR_DEFAULT = 0  # + direction (policy.c POL_CTR_*)
CTR_HOST = 2
CTR_UNNAMED = 3
CTR_ISOLATION = 4  # + direction
CTR_DROPS = 6  # + direction
CTR_FIRST_RULE = 8
RESERVED_COUNTERS = tuple(range(CTR_FIRST_RULE))
# Or-ed into a counter id: the packets of its connections that went the other
# way (replies), counted apart (policy.c POL_CTR_REPLY). Ids stay below it: at
# most CTR_FIRST_RULE + 2 * MAX_RULES of them per pod.
CTR_REPLY = 0x8000
# pcn_ct.h PCN_CTF_*
CTF_ORIG_A, CTF_REPLIED, CTF_FIN_ORIG, CTF_FIN_REPLY, CTF_RST, CTF_REVOKED = 1, 2, 4, 8, 16, 32
_S = 1_000_000_000
_PORT_PROTOCOLS = (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP)
_SCHED_CLS = 3  # BPF_PROG_TYPE_SCHED_CLS


class PolicyError(ValueError):
    """A policy the cube cannot hold (too many rules, unknown address set)."""


def _side(d: Direction) -> str:
    return "ingress" if d == Direction.INGRESS else "egress"


def ct_lifetime_ns(proto: int, flags: int) -> int:
    """pcn_ct.h pcn_ct_lifetime: how long an entry lives after its last packet."""
    if proto != IPPROTO_TCP:
        return 60 * _S
    if flags & CTF_RST:
        return 10 * _S
    if flags & CTF_REVOKED:
        return 1200 * _S
    if flags & (CTF_FIN_ORIG | CTF_FIN_REPLY) or not flags & CTF_REPLIED:
        return 120 * _S
    return 86400 * _S


# ------------------------------------------------------------------ JSON forms
def _ref_json(r: RuleRef | None) -> list[Any] | None:
    if r is None:
        return None
    out: list[Any] = [r.kind, r.namespace, r.name, int(r.direction), r.index]
    return out + [r.rule_name] if r.rule_name else out


def _ref_of(j: list[Any] | None) -> RuleRef | None:
    # five items: saved before rules had names (or a rule without one)
    return None if j is None else RuleRef(j[0], j[1], j[2], Direction(j[3]), j[4],
                                          j[5] if len(j) > 5 else "")


def _rule_json(r: Rule) -> dict[str, Any]:
    return {"peers": r.peers, "ports": [[p.proto, p.port_lo, p.port_hi] for p in r.ports],
            "named_port": r.named_port, "action": int(r.action), "ref": _ref_json(r.ref)}


def _rule_of(j: dict[str, Any]) -> Rule:
    return Rule(j["peers"], tuple(PortMatch(*p) for p in j["ports"]), j["named_port"],
                Action(j["action"]), _ref_of(j["ref"]))


def _dir_json(d: DirectionPolicy) -> dict[str, Any]:
    return {"admin": [_rule_json(r) for r in d.admin],
            "namespaced": [_rule_json(r) for r in d.namespaced],
            "baseline": [_rule_json(r) for r in d.baseline],
            "isolated": d.isolated, "isolated_by": [_ref_json(r) for r in d.isolated_by]}


def _dir_of(j: dict[str, Any]) -> DirectionPolicy:
    return DirectionPolicy(tuple(_rule_of(r) for r in j["admin"]),
                           tuple(_rule_of(r) for r in j["namespaced"]), j["isolated"],
                           tuple(r for r in (_ref_of(x) for x in j["isolated_by"])
                                 if r is not None),
                           tuple(_rule_of(r) for r in j["baseline"]))


def policy_json(p: PodPolicy) -> dict[str, Any]:
    """A PodPolicy as JSON (saved with the cube for the next agent)."""
    return {"ingress": _dir_json(p.ingress), "egress": _dir_json(p.egress)}


def policy_of(j: dict[str, Any]) -> PodPolicy:
    """The inverse of policy_json."""
    return PodPolicy(_dir_of(j["ingress"]), _dir_of(j["egress"]))


# ------------------------------------------------------------------ per pod state
@dataclass
class _Pod:
    gen: int
    policy: PodPolicy
    counters: dict[RuleRef, int]  # counter id of each RuleRef in force

    def json(self) -> dict[str, Any]:
        return {"gen": self.gen, "policy": policy_json(self.policy),
                "counters": [[_ref_json(r), i] for r, i in self.counters.items()]}


def _tiers(d: DirectionPolicy) -> list[tuple[int, Rule]]:
    return ([(TIER_ADMIN, r) for r in d.admin] + [(TIER_NAMESPACED, r) for r in d.namespaced]
            + [(TIER_BASELINE, r) for r in d.baseline])


def _lpm_key(set_id: int, prefix: str) -> maps.PolSetKey:
    length, address = _prefix_parts(prefix)
    return maps.PolSetKey(32 + length, set_id, address)


@functools.lru_cache(maxsize=262144)
def _prefix_parts(prefix: str) -> tuple[int, int]:
    """(prefix length, network address as the map holds it) of a CIDR:
    parsed once per prefix (a set update touches thousands)."""
    net = ipaddress.IPv4Network(prefix)
    return net.prefixlen, maps.ip_be(net.network_address)


class PolicyCube:
    """The node's one policy cube. `name` is its cube name in `rt`; an
    existing cube of that name (an agent restart) is adopted with its
    state, the pinned maps holding what traffic depends on."""

    def __init__(self, rt: Runtime, name: str = "policy") -> None:
        self.rt = rt
        self.name = name
        others = [c.name for c in rt.cubes.values() if c.type == TYPE and c.name != name]
        if others:
            raise RuntimeError_(f"a node has one policy cube; {others[0]!r} exists already")
        adopted = name in rt.cubes
        self.cube = rt.cube(name) if adopted else rt.add_cube(name, TYPE)
        t = rt.load_type(TYPE)
        judge = t.module.load_func("policy_judge", _SCHED_CLS)
        t.module[b"pol_progs"][ct.c_int(0)] = ct.c_int(judge.fd)  # atomic, also on adoption
        self._cfgs = rt.table("pol_cfgs", TYPE)
        self._rules = rt.table("pol_rules", TYPE)
        self._sets_t = rt.table("pol_sets", TYPE)
        self._host_t = rt.table("pol_host", TYPE)
        self._ct = rt.table("pol_ct", TYPE)
        self._ctrs = rt.table("pol_ctrs", TYPE)
        self._epoch_t = rt.table("pol_epoch", TYPE)
        c = self.cube.config
        self.host: list[str] = list(c.get("host", []))
        self.set_ids: dict[str, int] = {n: s["id"] for n, s in c.get("sets", {}).items()}
        self.sets: dict[str, AddressSet] = self._adopt_sets(c.get("sets", {}))
        self.pods: dict[int, _Pod] = {}
        for port, p in c.get("pods", {}).items():
            counters: dict[RuleRef, int] = {}
            for rj, i in p["counters"]:
                ref = _ref_of(rj)
                if ref is not None:
                    counters[ref] = i
            self.pods[int(port)] = _Pod(p["gen"], policy_of(p["policy"]), counters)
        self.writes = 0  # map updates and deletions done (for tests of idempotence)
        self._reply_counters_adopted()
        self._sets_json: dict[str, dict[str, Any]] = {
            n: {"id": i} for n, i in self.set_ids.items()}
        self._pods_json: dict[str, dict[str, Any]] = {
            str(p): pod.json() for p, pod in self.pods.items()}

    def _reply_counters_adopted(self) -> None:
        """The reply counters (CTR_REPLY) of the adopted pods' counters, for
        pods an agent from before them set up: the program counts only into
        entries that exist, and an unchanged policy writes nothing."""
        for port, pod in self.pods.items():
            for cid in (*RESERVED_COUNTERS, *pod.counters.values()):
                key = maps.PolCtrKey(port, cid | CTR_REPLY)
                try:
                    self._ctrs[key]
                except KeyError:
                    self._put(self._ctrs, key, self._ctrs.Leaf())

    # -------------------------------------------------------------- bookkeeping
    def _adopt_sets(self, saved: dict[str, Any]) -> dict[str, AddressSet]:
        """The address sets a previous agent left, read back from the pinned
        trie (the runtime's state names them; their entries, thousands with
        a large cluster, live only in the map: saving them with every change
        cost more than the change). A state written before that lists the
        entries itself."""
        by_id: dict[int, set[SetEntry]] = {i: set() for i in self.set_ids.values()}
        if any("entries" not in v for v in saved.values()):
            for k, v in self._sets_t.items():
                if int(k.set) in by_id:
                    by_id[int(k.set)].add(SetEntry(f"{maps.ip_str(k.ip)}/{int(k.prefixlen) - 32}",
                                                   int(v.proto), int(v.port)))
        out = {}
        for name, v in saved.items():
            entries = ({SetEntry(*e) for e in v["entries"]} if "entries" in v
                       else by_id[self.set_ids[name]])
            out[name] = AddressSet(name, frozenset(entries))
        return out

    def _set_json(self, name: str) -> None:
        self._sets_json[name] = {"id": self.set_ids[name]}

    def _save(self) -> None:
        """The cube's config for the runtime's state, from the JSON of each
        set and pod kept as they change (rebuilding all of it on every
        change cost milliseconds per operation at a thousand policies)."""
        self.cube.config = {"host": self.host, "sets": dict(self._sets_json),
                            "pods": dict(self._pods_json)}

    def _put(self, table: maps.BpfTable, key: object, value: object) -> None:
        table[key] = value
        self.writes += 1

    def _del(self, table: maps.BpfTable, key: object) -> None:
        if maps.discard(table, key):
            self.writes += 1

    @property
    def epoch(self) -> int:
        return int(self._epoch_t[ct.c_uint32(0)].value)

    def bump_epoch(self) -> None:
        """Have every tracked connection judged again on its next packet."""
        self._put(self._epoch_t, ct.c_uint32(0), ct.c_uint32((self.epoch + 1) & 0xFFFFFFFF))

    # -------------------------------------------------------------- host
    def configure(self, host_addresses: list[str]) -> None:
        """The node's own addresses or prefixes ("192.168.1.5", "10.244.1.1/32"):
        traffic from them always reaches the pods (kubelet probes). Diff-applied;
        a change bumps the epoch. Raises ValueError for a malformed prefix."""
        want = sorted({str(ipaddress.IPv4Network(a, strict=False)) for a in host_addresses})
        if want == self.host:
            return
        for p in set(want) - set(self.host):
            net = ipaddress.IPv4Network(p)
            self._put(self._host_t, maps.PolHostKey(net.prefixlen, maps.ip_be(net.network_address)),
                      ct.c_uint32(1))
        for p in set(self.host) - set(want):
            net = ipaddress.IPv4Network(p)
            self._del(self._host_t, maps.PolHostKey(net.prefixlen, maps.ip_be(net.network_address)))
        self.host = want
        self.bump_epoch()
        self._save()

    # -------------------------------------------------------------- address sets
    def _set_id(self, name: str) -> int:
        if name not in self.set_ids:
            used = set(self.set_ids.values())
            self.set_ids[name] = next(i for i in range(1, len(used) + 2) if i not in used)
        return self.set_ids[name]

    def set_address_set(self, s: AddressSet) -> bool:
        """Create or update one address set (by name); only the entries that
        changed are written, new ones before old ones go. True when anything
        changed (the epoch is then bumped)."""
        changed = self._apply_set(s)
        if changed:
            self.bump_epoch()
            self._save()
        return changed

    def set_address_sets(self, sets: Iterable[AddressSet]) -> bool:
        """set_address_set for each; one epoch bump for all. Sets not named
        stay (gc_sets() removes those no pod uses)."""
        changed = False
        for s in sets:
            changed = self._apply_set(s) or changed
        if changed:
            self.bump_epoch()
            self._save()
        return changed

    def _apply_set(self, s: AddressSet) -> bool:
        old = self.sets.get(s.name)
        if old is not None and old.entries == s.entries:
            return False
        sid = self._set_id(s.name)
        before = frozenset() if old is None else old.entries
        added = s.entries - before
        rewritten = {e.prefix for e in added}  # (a prefix's entries differ by port only)
        for e in added:
            self._put(self._sets_t, _lpm_key(sid, e.prefix), maps.PolSetVal(e.proto, 0, e.port))
        for e in before - s.entries:
            if e.prefix not in rewritten:
                self._del(self._sets_t, _lpm_key(sid, e.prefix))
        self.sets[s.name] = s
        self._set_json(s.name)
        return True

    def _used_sets(self) -> set[str]:
        return used_sets(pod.policy for pod in self.pods.values())

    def gc_sets(self) -> list[str]:
        """Remove the sets no pod's rules use; returns their names."""
        used = self._used_sets()
        gone = [n for n in self.sets if n not in used]
        for n in gone:
            sid = self.set_ids.pop(n)
            self._sets_json.pop(n, None)
            for e in self.sets.pop(n).entries:
                self._del(self._sets_t, _lpm_key(sid, e.prefix))
        if gone:
            self._save()
        return gone

    # -------------------------------------------------------------- pods
    def _counter_ids(self, port_id: int, policy: PodPolicy,
                     old: dict[RuleRef, int]) -> dict[RuleRef, int]:
        refs = [r.ref for d in (policy.ingress, policy.egress) for r in d.rules
                if r.ref is not None]
        out = {r: i for r, i in old.items() if r in refs}
        used = set(out.values())
        nxt = CTR_FIRST_RULE
        for r in refs:
            if r in out:
                continue
            while nxt in used:
                nxt += 1
            out[r] = nxt
            used.add(nxt)
        assert max(out.values(), default=0) < CTR_REPLY
        return out

    def _zero_counter(self, port_id: int, cid: int) -> None:
        """Counter `cid` of the port and its replies' (the program only
        counts into entries that exist)."""
        for k in (cid, cid | CTR_REPLY):
            self._put(self._ctrs, maps.PolCtrKey(port_id, k), self._ctrs.Leaf())

    def _drop_counter(self, port_id: int, cid: int) -> None:
        for k in (cid, cid | CTR_REPLY):
            self._del(self._ctrs, maps.PolCtrKey(port_id, k))

    def set_pod(self, port_id: int, policy: PodPolicy) -> None:
        """Enforce `policy` on the pod behind port `port_id`: its rules are
        written under a new generation, one config update switches to them,
        the old ones are deleted; the epoch is bumped so tracked connections
        are judged again. Nothing is written when the policy is unchanged.
        An empty policy (no rule, not isolated) allows everything and tracks
        the pod's connections (so that a later policy knows which end opened
        each); remove_pod() is what stops tracking. Raises PolicyError for
        more than MAX_RULES rules in a direction or a rule whose address set
        is unknown (set_address_set() it first)."""
        old = self.pods.get(port_id)
        if old is not None and old.policy == policy:
            return
        for d in (policy.ingress, policy.egress):
            if len(d.rules) > MAX_RULES:
                raise PolicyError(f"port {port_id}: {len(d.rules)} rules in one direction, "
                                  f"the policy cube holds at most {MAX_RULES}")
            unknown = sorted({r.peers for r in d.rules} - self.sets.keys())
            if unknown:
                raise PolicyError(f"port {port_id}: unknown address set(s) {', '.join(unknown)}")
        counters = self._counter_ids(port_id, policy, old.counters if old else {})
        gen = (old.gen + 1) & 0xFFFFFFFF if old else 1
        for direction in Direction:
            for i, (tier, r) in enumerate(_tiers(policy.direction(direction))):
                v = maps.PolRule()
                v.set = self.set_ids[r.peers]
                v.counter = counters[r.ref] if r.ref is not None else CTR_UNNAMED
                v.action = int(r.action)
                v.n_ports = len(r.ports)
                v.named_port = int(r.named_port)
                v.tier = tier
                for j, p in enumerate(r.ports):
                    v.ports[j] = maps.PolPortMatch(p.port_lo, p.port_hi, p.proto, 0)
                self._put(self._rules, maps.PolRuleKey(port_id, gen, i, int(direction), 0), v)
        new_ids = set(counters.values()) - set(old.counters.values() if old else ())
        for cid in sorted(new_ids | (set() if old else set(RESERVED_COUNTERS))):
            self._zero_counter(port_id, cid)
        cfg = maps.PolCfg()
        cfg.gen = gen
        for direction in Direction:
            d = policy.direction(direction)
            cfg.dir[int(direction)] = maps.PolTier(len(d.admin), len(d.namespaced),
                                                   len(d.baseline), int(d.isolated), 0)
        self._put(self._cfgs, ct.c_uint32(port_id), cfg)  # the switch
        if old is not None:
            self._delete_rules(port_id, old)
            for cid in set(old.counters.values()) - set(counters.values()):
                self._drop_counter(port_id, cid)
        self.pods[port_id] = _Pod(gen, policy, counters)
        self._pods_json[str(port_id)] = self.pods[port_id].json()
        self.bump_epoch()
        self._save()

    def _delete_rules(self, port_id: int, pod: _Pod) -> None:
        for direction in Direction:
            for i in range(len(pod.policy.direction(direction).rules)):
                self._del(self._rules, maps.PolRuleKey(port_id, pod.gen, i, int(direction), 0))

    def remove_pod(self, port_id: int) -> None:
        """Stop enforcing anything on the port: its config (first: packets
        then pass untouched), rules, counters and tracked connections go."""
        pod = self.pods.pop(port_id, None)
        self._pods_json.pop(str(port_id), None)
        self._del(self._cfgs, ct.c_uint32(port_id))
        if pod is not None:
            self._delete_rules(port_id, pod)
            for cid in [*RESERVED_COUNTERS, *pod.counters.values()]:
                self._drop_counter(port_id, cid)
        for k in [k for k, _ in self._ct.items() if k.scope == port_id]:
            self._del(self._ct, k)
        self._save()

    # -------------------------------------------------------------- reading
    def _counter(self, port_id: int, cid: int) -> tuple[int, int]:
        try:
            per_cpu = self._ctrs[maps.PolCtrKey(port_id, cid)]
        except KeyError:
            return 0, 0
        return (int(sum(c.packets for c in per_cpu)), int(sum(c.bytes for c in per_cpu)))

    def _counted(self, port_id: int, cid: int, **what: Any) -> dict[str, Any]:
        """`what` with counter `cid`'s packets and bytes and its replies'."""
        n, b = self._counter(port_id, cid)
        rn, rb = self._counter(port_id, cid | CTR_REPLY)
        return {**what, "packets": n, "bytes": b, "replyPackets": rn, "replyBytes": rb}

    def counters(self, port_id: int) -> list[dict[str, Any]]:
        """Per rule in force (by RuleRef, in evaluation order, ingress first):
        {"rule": str(RuleRef), "action": "ACCEPT"|"DENY"|"PASS", "direction":
        "ingress"|"egress", "packets": n, "bytes": n, "replyPackets": n,
        "replyBytes": n} — packets of the connections it accepted (or that
        it dropped) going its way (to the pod for an ingress rule), then
        those going the other way, their replies; then per isolated
        direction {"rule": "isolation", "action": "DENY", "policies":
        [str(RuleRef)...], ...} (before them, "unnamed" for the rules without
        a RuleRef, both ways, if any); then "default" (accepted as nothing
        decided) per direction and "host" (from the node's addresses)
        entries. [] for a port without policy."""
        pod = self.pods.get(port_id)
        if pod is None:
            return []
        out: list[dict[str, Any]] = []
        seen: set[RuleRef] = set()
        for direction in Direction:
            for r in pod.policy.direction(direction).rules:
                if r.ref is None or r.ref in seen:
                    continue
                seen.add(r.ref)
                out.append(self._counted(port_id, pod.counters[r.ref], rule=str(r.ref),
                                         action=r.action.name, direction=_side(direction)))
        if any(r.ref is None for d in (pod.policy.ingress, pod.policy.egress) for r in d.rules):
            out.append(self._counted(port_id, CTR_UNNAMED, rule="unnamed", action="",
                                     direction=""))
        for direction in Direction:
            d = pod.policy.direction(direction)
            if d.isolated:
                out.append(self._counted(port_id, CTR_ISOLATION + direction, rule="isolation",
                                         action=Action.DENY.name, direction=_side(direction),
                                         policies=[str(r) for r in d.isolated_by]))
        for direction in Direction:
            out.append(self._counted(port_id, CTR_DEFAULT + direction, rule="default",
                                     action=Action.ACCEPT.name, direction=_side(direction)))
        out.append(self._counted(port_id, CTR_HOST, rule="host", action=Action.ACCEPT.name,
                                 direction="ingress"))
        return out

    def drops(self, port_id: int) -> dict[str, dict[str, int]]:
        """Packets and bytes dropped by policy on the port, per direction."""
        out = {}
        for direction in Direction:
            n, b = self._counter(port_id, CTR_DROPS + direction)
            out[_side(direction)] = {"packets": n, "bytes": b}
        return out

    def explain(self, port_id: int, direction: Direction, peer_ip: str, proto: int,
                dport: int = 0) -> tuple[Action, RuleRef | None]:
        """The verdict for the first packet of a connection between the pod
        behind `port_id` and `peer_ip` (`direction` INGRESS: from the peer,
        EGRESS: to it), protocol `proto` (IPPROTO_*), destination port
        `dport` (ignored for protocols without ports), evaluated against the
        rules and sets in the maps, as bpf/policy.c's pol_judge does. Returns
        (ACCEPT or DENY, the deciding rule's RuleRef; for isolation the first
        isolating policy's; None when nothing decided, for the node's own
        addresses, or when the pod has no policy)."""
        pod = self.pods.get(port_id)
        try:
            cfg = self._cfgs[ct.c_uint32(port_id)]
        except KeyError:
            return Action.ACCEPT, None
        peer = maps.ip_be(peer_ip)
        if direction == Direction.INGRESS:
            try:
                self._host_t[maps.PolHostKey(32, peer)]
                return Action.ACCEPT, None
            except KeyError:
                pass
        has_ports = proto in _PORT_PROTOCOLS
        dport = dport if has_ports else 0
        by_id = {i: r for r, i in (pod.counters.items() if pod else ())}
        tier = cfg.dir[int(direction)]
        skip_admin = False
        for i in range(MAX_RULES):
            try:
                r = self._rules[maps.PolRuleKey(port_id, cfg.gen, i, int(direction), 0)]
            except KeyError:
                break
            if r.tier == TIER_BASELINE and tier.isolated:
                break
            if r.tier == TIER_ADMIN and skip_admin:
                continue
            if not self._matches(r, peer, proto, has_ports, dport):
                continue
            if r.tier == TIER_ADMIN and r.action == Action.PASS:
                skip_admin = True
                continue
            ref = by_id.get(int(r.counter))
            if r.tier == TIER_NAMESPACED:
                return Action.ACCEPT, ref
            return (Action.DENY if r.action == Action.DENY else Action.ACCEPT), ref
        if tier.isolated:
            isolating = pod.policy.direction(direction).isolated_by if pod else ()
            return Action.DENY, isolating[0] if isolating else None
        return Action.ACCEPT, None

    def _matches(self, r: Any, peer: int, proto: int, has_ports: bool, dport: int) -> bool:
        try:
            e = self._sets_t[maps.PolSetKey(64, r.set, peer)]
        except KeyError:
            return False
        if r.named_port:
            return has_ports and e.proto == proto and e.port == dport
        if r.n_ports == 0:
            return True
        for j in range(min(int(r.n_ports), maps.POL_PORTS)):
            m = r.ports[j]
            if m.proto == 0:
                return True
            if has_ports and m.proto == proto and m.lo <= dport <= m.hi:
                return True
        return False

    def connections(self, port_id: int) -> list[dict[str, Any]]:
        """The pod's tracked connections, as opened: {"proto", "src", "sport",
        "dst", "dport", "direction" (of the pod's policy that accepted it),
        "rule" (str(RuleRef), "host", "default" or "isolation"...: what
        accepted it, or for a revoked one what denied it), "epoch", "flags"
        (PCN_CTF_* names; "revoked": a later judgement disallowed it, its
        packets are dropped), "idle_s", "live"}. For debugging: walks
        the whole table."""
        pod = self.pods.get(port_id)
        by_id: dict[int, str] = {CTR_HOST: "host", CTR_UNNAMED: "unnamed",
                                 CTR_DEFAULT: "default", CTR_DEFAULT + 1: "default",
                                 CTR_ISOLATION: "isolation", CTR_ISOLATION + 1: "isolation"}
        if pod:
            by_id.update({i: str(r) for r, i in pod.counters.items()})
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        out = []
        for k, v in self._ct.items():
            if k.scope != port_id:
                continue
            a = (maps.ip_str(k.addr_a), _be16(k.port_a))
            b = (maps.ip_str(k.addr_b), _be16(k.port_b))
            src, dst = (a, b) if v.flags & CTF_ORIG_A else (b, a)
            flags = [n for n, bit in (("replied", CTF_REPLIED), ("fin_orig", CTF_FIN_ORIG),
                                      ("fin_reply", CTF_FIN_REPLY), ("rst", CTF_RST),
                                      ("revoked", CTF_REVOKED))
                     if v.flags & bit]
            idle = now - int(v.seen_ns)
            out.append({"proto": int(k.proto), "src": src[0], "sport": src[1], "dst": dst[0],
                        "dport": dst[1], "direction": _side(Direction(v.dir & 1)),
                        "rule": by_id.get(int(v.ref), str(int(v.ref))), "epoch": int(v.epoch),
                        "flags": flags, "idle_s": idle / _S,
                        "live": idle <= ct_lifetime_ns(int(k.proto), int(v.flags))})
        return out

    def delete(self) -> None:
        """Remove every pod's policy, the sets and host entries, and the cube."""
        for port in list(self.pods):
            self.remove_pod(port)
        for n in list(self.sets):
            sid = self.set_ids.pop(n)
            self._sets_json.pop(n, None)
            for e in self.sets.pop(n).entries:
                self._del(self._sets_t, _lpm_key(sid, e.prefix))
        self.configure([])
        self.rt.remove_cube(self.name)


def _be16(v: int) -> int:
    return int.from_bytes(int(v).to_bytes(2, "little"), "big")
