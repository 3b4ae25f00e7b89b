"""The compiled form of network policies: what the policy cube enforces for
one pod (bpf/policy.c, pcn_agent.dataplane.cubes.policy), and what the
control plane's policy compiler (pcn_policy.compiler) produces from
NetworkPolicy (networking.k8s.io/v1) and ClusterNetworkPolicy
(policy.networking.k8s.io/v1alpha2, sigs.k8s.io/network-policy-api v0.3.0).

Evaluation of one packet of a new connection, for one pod and one direction
(`ingress`: traffic to the pod, the peer is the source; `egress`: traffic
from the pod, the peer is the destination, seen after Service translation):

1. `admin` rules (ClusterNetworkPolicy tier Admin, by priority, then rule
   order): the first that matches decides; ACCEPT and DENY end the
   evaluation, PASS skips the rest of the admin tier.
2. `namespaced` rules (NetworkPolicy, all ACCEPT): any match accepts. No
   match while `isolated` (the pod is selected by a NetworkPolicy whose
   policyTypes include this direction) denies.
3. `baseline` rules (ClusterNetworkPolicy tier Baseline): the first that
   matches decides; PASS skips the rest of the baseline tier (as in the
   admin tier), so it ends at 4 (network-policy-api v0.3.0: "Skips all
   further ClusterNetworkPolicy rules in the current tier").
4. Nothing decided: accepted.

A rule matches when the peer's address is in its address set and the packet
matches one of its ports (no ports: every packet, ICMP included). A
`named_port` rule matches the destination port its address set gives the
peer (an egress rule to a named port: resolved per destination pod).
Replies and ICMP errors of an accepted connection pass both ways
(connection tracking); the node's own addresses (`host_addresses` of the
cube) always reach its pods, as kubelet probes must.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum

IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP = 6, 17, 132
PROTOCOLS = {"TCP": IPPROTO_TCP, "UDP": IPPROTO_UDP, "SCTP": IPPROTO_SCTP}
PORTS_PER_RULE = 8  # PortMatch entries one Rule holds (the compiler splits longer lists)


class Action(IntEnum):
    """A rule's verdict (ClusterNetworkPolicy's Accept/Deny/Pass)."""
    ACCEPT = 0
    DENY = 1
    PASS = 2


class Direction(IntEnum):
    INGRESS = 0  # traffic to the pod
    EGRESS = 1   # traffic from the pod


@dataclass(frozen=True, order=True)
class PortMatch:
    """Destination ports `port_lo`..`port_hi` (host order, inclusive) of
    protocol `proto` (IPPROTO_*); `proto` 0 with 0..65535 is any packet."""
    proto: int
    port_lo: int = 0
    port_hi: int = 65535

    def __post_init__(self) -> None:
        if self.proto not in (0, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP):
            raise ValueError(f"protocol {self.proto}: only TCP, UDP and SCTP have ports")
        if not 0 <= self.port_lo <= self.port_hi <= 65535:
            raise ValueError(f"port range {self.port_lo}-{self.port_hi} is not within 0-65535")


@dataclass(frozen=True, order=True)
class RuleRef:
    """Which rule of which policy a compiled rule comes from (what its hit
    counter is reported as). `index` is the rule's position in the policy's
    ingress or egress list; -1 stands for a NetworkPolicy's isolation (the
    implicit deny at the end of the namespaced tier). `rule_name` is a
    ClusterNetworkPolicy rule's optional `name` (network-policy-api
    v1alpha2, at most 100 characters), shown beside the index."""
    kind: str  # "NetworkPolicy" or "ClusterNetworkPolicy"
    namespace: str  # "" for ClusterNetworkPolicy
    name: str
    direction: Direction
    index: int
    rule_name: str = ""

    def __str__(self) -> str:
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        side = "ingress" if self.direction == Direction.INGRESS else "egress"
        rule = "isolation" if self.index < 0 else f"{side}[{self.index}]"
        named = f" ({self.rule_name})" if self.rule_name else ""
        return f"{self.kind} {where} {rule}{named}"


@dataclass(frozen=True)
class SetEntry:
    """One prefix of an address set; a named-port set's /32 entries carry
    the peer pod's resolved port (`proto`, `port`), others have 0, 0."""
    prefix: str  # "10.244.1.7/32", "0.0.0.0/0", ...
    proto: int = 0
    port: int = 0

    def __post_init__(self) -> None:
        # raises ValueError with the prefix in it; the canonical text makes
        # equal prefixes equal entries (the cube diffs sets by entry)
        object.__setattr__(self, "prefix", str(ipaddress.IPv4Network(self.prefix)))


@dataclass(frozen=True)
class AddressSet:
    """Peers of a rule: disjoint prefixes (the compiler has already applied
    ipBlock `except` lists and unions). `name` identifies the content's
    meaning (for example a digest of the peer selectors) so that rules of
    many pods share one set and a label change is one update of it."""
    name: str
    entries: frozenset[SetEntry] = frozenset()


@dataclass(frozen=True)
class Rule:
    peers: str  # AddressSet.name
    ports: tuple[PortMatch, ...] = ()  # empty: any packet
    named_port: bool = False  # match the port the peer's set entry gives
    action: Action = Action.ACCEPT
    ref: RuleRef | None = None

    def __post_init__(self) -> None:
        if len(self.ports) > PORTS_PER_RULE:
            raise ValueError(f"{len(self.ports)} ports in one rule, at most {PORTS_PER_RULE}")
        if self.named_port and self.ports:
            raise ValueError("a named-port rule takes its port from its address set")


@dataclass(frozen=True)
class DirectionPolicy:
    admin: tuple[Rule, ...] = ()
    namespaced: tuple[Rule, ...] = ()
    isolated: bool = False
    isolated_by: tuple[RuleRef, ...] = ()  # the policies isolating it (index -1)
    baseline: tuple[Rule, ...] = ()

    @property
    def enforced(self) -> bool:
        """Whether anything can deny in this direction."""
        return self.isolated or any(r.action == Action.DENY
                                    for r in self.admin + self.baseline)

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self.admin + self.namespaced + self.baseline


@dataclass(frozen=True)
class PodPolicy:
    """What one pod is subject to, both ways."""
    ingress: DirectionPolicy = field(default_factory=DirectionPolicy)
    egress: DirectionPolicy = field(default_factory=DirectionPolicy)

    @property
    def enforced(self) -> bool:
        return self.ingress.enforced or self.egress.enforced

    def direction(self, d: Direction) -> DirectionPolicy:
        return self.ingress if d == Direction.INGRESS else self.egress


def used_sets(policies: Iterable[PodPolicy]) -> set[str]:
    """The names of the address sets the rules of `policies` refer to."""
    return {r.peers for p in policies for d in (p.ingress, p.egress) for r in d.rules}
