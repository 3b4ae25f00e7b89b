"""Cluster-wide settings, from the pcn ConfigMap (seed 003, listing 5.8)."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pcn_agent.dataplane.cubes.lbrp import MAX_TABLE_ENTRIES, LbSizes
from pcn_agent.dataplane.sessions import MAX_LIFETIME_S, SessionTimeouts

DEFAULT_FILE = Path("/etc/pcn/config.json")
UNDERLAY_MTU = 1500  # Ethernet's (RFC 894): what pod_mtu assumes when `mtu` is unset
# The bytes VXLAN adds to a pod's IP packet: outer IPv4 (20), UDP (8), VXLAN (8)
# and inner Ethernet (14) headers (RFC 7348 section 5).
VXLAN_OVERHEAD = 50


def _lifetime(default: int, what: str) -> int:
    return Field(default, ge=1, le=MAX_LIFETIME_S,
                 description=f"Session lifetime in seconds, {what}.")


class ClusterSettings(BaseModel):
    """Values are strings in a ConfigMap; they are parsed and checked here."""

    model_config = ConfigDict(extra="ignore")
    mtu: int | None = Field(None, ge=576, le=9000, description=(
        "Pod MTU; unset (or empty, or \"auto\"): the mode's, see pod_mtu."))
    serviceClusterIPRange: str = "10.96.0.0/12"
    serviceNodePortRange: str = "30000-32767"
    vtepsRange: str = "10.18.0.0/16"
    podCIDR: str = Field("10.244.0.0/16", description="The cluster's pod network (all nodes).")
    overlay: Literal["vxlan", "none"] = Field("vxlan", description=(
        "How pod traffic reaches other nodes: vxlan (encapsulated, any underlay) or "
        "none (routed to the peer's node IP unencapsulated: the nodes must share an L2 "
        "segment, or the underlay must route every node's pod CIDR to it)."))
    snatPortRange: str = "61000-65535"
    # Session lifetimes, whole seconds without a packet, by protocol and state
    # (pcn_agent.dataplane.sessions.SessionTimeouts has the defaults and where
    # they come from: conntrack's, kube-proxy's for established and close-wait).
    sessionTimeoutTCPSynSent: int = _lifetime(120, "TCP: SYN sent, no answer yet")
    sessionTimeoutTCPSynRecv: int = _lifetime(60, "TCP: SYN answered, handshake not done")
    sessionTimeoutTCPEstablished: int = _lifetime(86400, "TCP: established")
    sessionTimeoutTCPFinWait: int = _lifetime(120, "TCP: the opening side closed")
    sessionTimeoutTCPCloseWait: int = _lifetime(3600, "TCP: only the answering side closed")
    sessionTimeoutTCPTimeWait: int = _lifetime(120, "TCP: both sides closed")
    sessionTimeoutTCPClose: int = _lifetime(10, "TCP: reset")
    sessionTimeoutUDP: int = _lifetime(30, "UDP: no reply, or a short exchange")
    sessionTimeoutUDPStream: int = _lifetime(120, "UDP: a stream")
    sessionTimeoutICMP: int = _lifetime(30, "ICMP echo")
    sessionGCInterval: int = Field(10, ge=1, le=3600, description=(
        "Seconds between two passes of the session garbage collector."))
    socketLB: bool = Field(True, description=(
        "Translate pods' connections to ClusterIPs at the socket (cgroup connect/sendmsg "
        "hooks, pcn_agent.dataplane.socklb) instead of per packet; the lbrp keeps what the "
        "socket path cannot see. false: the lbrp translates everything."))
    # The service tables' sizes (pcn_agent.dataplane.cubes.lbrp.LbSizes), as
    # Cilium's bpf-lb-map-max: compiled into the programs, so a change takes
    # effect when the agents restart (each makes its tables anew at the new
    # size and writes its services into them again).
    lbServiceMapMax: int = Field(LbSizes.services, ge=16, le=MAX_TABLE_ENTRIES, description=(
        "Entries of a node's service table: one per Service port (ClusterIP) and per "
        "NodePort entry. A Service that would not fit is refused, with an error naming "
        "this setting. The default holds 100 000 single-port Services. Kernel memory: "
        "88 bytes per entry, preallocated (lb_services: 11 MiB at the default), plus 16 per "
        "entry and 72 per address in use (lb_vips: 2 MiB empty, 9 MiB with 100 000)."))
    lbBackendMapMax: int = Field(LbSizes.backends, ge=16, le=MAX_TABLE_ENTRIES, description=(
        "Entries of a node's backend table: one per backend of each Service port (up to "
        "1024 for one with weighted backends). The default holds 100 000 Services of 5 "
        "backends twice over. Kernel memory: 16 bytes per entry (the hash buckets, rounded "
        "up to a power of two: 16 MiB at the default) and 72 per slot in use (50 MiB with "
        "500 000 backends)."))
    socketLBCgroup: str = Field("", description=(
        "The cgroup v2 directory of the node's pods (absolute); empty: the kubelet's pods "
        "cgroup (kubepods.slice or kubepods) under $PCN_CGROUP_ROOT or the cgroup v2 mount."))

    @field_validator("socketLBCgroup")
    @classmethod
    def _cgroup(cls, v: str) -> str:
        if v and (not v.startswith("/") or "/../" in f"{v}/"):
            raise ValueError(f"socketLBCgroup {v!r} must be an absolute path without '..'")
        return v

    @field_validator("mtu", mode="before")
    @classmethod
    def _auto_mtu(cls, v: object) -> object:
        """ConfigMap values are strings: "" or "auto" leave the MTU to the mode."""
        if v is None or (isinstance(v, str) and v.strip().lower() in ("", "auto")):
            return None
        return v

    @field_validator("overlay", mode="before")
    @classmethod
    def _overlay(cls, v: object) -> object:
        """"direct" (the name an earlier ConfigMap documented) is "none"."""
        if isinstance(v, str) and v.strip().lower() == "direct":
            return "none"
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("serviceClusterIPRange", "vtepsRange", "podCIDR")
    @classmethod
    def _cidr(cls, v: str) -> str:
        try:
            return str(ipaddress.IPv4Network(v, strict=True))
        except ValueError as exc:
            raise ValueError(f"{v!r} is not an IPv4 network in CIDR notation: {exc}") from None

    @field_validator("serviceNodePortRange", "snatPortRange")
    @classmethod
    def _range(cls, v: str) -> str:
        lo, sep, hi = v.partition("-")
        if not sep or not lo.strip().isdigit() or not hi.strip().isdigit():
            raise ValueError(f"{v!r} is not a port range like 30000-32767")
        if not 1 <= int(lo) <= int(hi) <= 65535:
            raise ValueError(f"port range {v!r} must lie within 1-65535, low to high")
        return f"{int(lo)}-{int(hi)}"

    @model_validator(mode="after")
    def _disjoint(self) -> ClusterSettings:
        nets = {"podCIDR": self.podCIDR, "serviceClusterIPRange": self.serviceClusterIPRange,
                "vtepsRange": self.vtepsRange}
        items = list(nets.items())
        for i, (a, na) in enumerate(items):
            for b, nb in items[i + 1:]:
                if ipaddress.IPv4Network(na).overlaps(ipaddress.IPv4Network(nb)):
                    raise ValueError(f"{a} {na} overlaps {b} {nb}")
        return self

    @property
    def pod_mtu(self) -> int:
        """The pods' interface MTU in bytes: `mtu` when set, else that of a
        1500-byte underlay less the mode's encapsulation (VXLAN_OVERHEAD for
        vxlan, nothing for none: direct routing sends the pods' packets as
        they are, as Calico's and Flannel's host-gw modes do)."""
        if self.mtu is not None:
            return self.mtu
        return UNDERLAY_MTU - (VXLAN_OVERHEAD if self.overlay == "vxlan" else 0)

    @property
    def lb_sizes(self) -> LbSizes:
        """The node's service table sizes (NodeConfig.lb_sizes)."""
        return LbSizes(self.lbServiceMapMax, self.lbBackendMapMax)

    @property
    def nodeport_range(self) -> tuple[int, int]:
        lo, _, hi = self.serviceNodePortRange.partition("-")
        return int(lo), int(hi)

    @property
    def snat_range(self) -> tuple[int, int]:
        lo, _, hi = self.snatPortRange.partition("-")
        return int(lo), int(hi)

    @property
    def session_timeouts(self) -> SessionTimeouts:
        return SessionTimeouts(
            tcp_syn_sent=self.sessionTimeoutTCPSynSent, tcp_syn_recv=self.sessionTimeoutTCPSynRecv,
            tcp_established=self.sessionTimeoutTCPEstablished,
            tcp_fin_wait=self.sessionTimeoutTCPFinWait,
            tcp_close_wait=self.sessionTimeoutTCPCloseWait,
            tcp_time_wait=self.sessionTimeoutTCPTimeWait, tcp_close=self.sessionTimeoutTCPClose,
            udp=self.sessionTimeoutUDP, udp_stream=self.sessionTimeoutUDPStream,
            icmp=self.sessionTimeoutICMP)

    @classmethod
    def load(cls, path: Path | None = None) -> ClusterSettings:
        """From PCN_CONFIG (JSON or a directory of ConfigMap keys), else defaults."""
        src = path or Path(os.environ.get("PCN_CONFIG", str(DEFAULT_FILE)))
        if src.is_dir():  # a mounted ConfigMap: one file per key
            data = {p.name: p.read_text().strip() for p in src.iterdir()
                    if p.is_file() and not p.name.startswith(".")}
            return cls.model_validate(data)
        if src.is_file():
            return cls.model_validate(json.loads(src.read_text()))
        return cls()
