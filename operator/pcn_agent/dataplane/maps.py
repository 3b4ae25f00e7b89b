"""ctypes mirrors of the C structs in bpf/include and bpf/*.c.

Each struct is written once here; tests compare their sizes with the ones BCC
derives from the C source, so a change on one side fails loudly.
"""

from __future__ import annotations

import ctypes as ct
import enum
import ipaddress
import socket
from collections.abc import Callable, Iterable
from typing import Any, Protocol

# Sizes from bpf/include/pcn_helpers.h.
MAX_PORTS = 4096
MAX_CUBES = 1024
MAX_SLOTS = 256
CHAIN_MAX = 8
DROP_REASONS = 32
BRIDGE_MAX_PORTS = 128

PEER_NONE, PEER_NETDEV, PEER_PORT = 0, 1, 2
HOOK_INGRESS, HOOK_EGRESS = 0, 1
IFACE_PORT, IFACE_INJECT, IFACE_LOOPBACK = 0, 1, 2
LOOPBACK_IFINDEX = 1  # the kernel's: lo, in every network namespace
PORT_HOST_SHARED = 1
# a veth whose other end is in another network namespace (a pod's): delivered into
# with bpf_redirect_peer from tc ingress walks (bpf/include/pcn_chain.h)
PORT_PEER_NS = 2
INJECT_MAGIC = 0x70636E21
INJECT_TO_CUBE, INJECT_OUT_PORT = 1, 2


class DropReason(enum.IntEnum):
    NO_PORT = 1
    NO_PEER = 2
    TAIL_CALL = 3
    PARSE = 4
    NO_ROUTE = 5
    TTL = 6
    NOT_FOR_US = 7
    HAIRPIN = 8
    FILTERED = 9
    UNSUPPORTED = 10
    SLOWPATH = 11
    REJECTED = 12
    NO_BACKEND = 13
    NAT_EXHAUSTED = 14
    REWRITE = 15
    FRAGMENT = 16  # a fragment that cannot be judged or translated (bpf/include/pcn_frag.h)
    NO_MASQUERADE = 17  # a pod's packet that must leave masqueraded but cannot be translated
    TOO_BIG = 18  # larger than the router's out port's MTU (DF set: answered, ICMP frag. needed)
    POLICY = 19  # denied by a network policy (bpf/policy.c)
    RATE = 20  # over a policer's rate: its token bucket was short (bpf/policer.c)


class SlowReason(enum.IntEnum):
    ARP_MISS = 1
    NEIGH_LEARNED = 2


MacBytes = ct.c_uint8 * 6


class Hook(ct.Structure):
    _fields_ = [
        ("n", ct.c_uint32),
        ("slot", ct.c_uint32 * CHAIN_MAX),
        ("inst", ct.c_uint32 * CHAIN_MAX),
    ]


class Port(ct.Structure):
    _fields_ = [
        ("cube_id", ct.c_uint32),
        ("cube_slot", ct.c_uint32),
        ("peer_kind", ct.c_uint32),
        ("peer", ct.c_uint32),
        ("ip", ct.c_uint32),
        ("prefixlen", ct.c_uint32),
        ("mac", MacBytes),
        ("flags", ct.c_uint16),
        ("hooks", Hook * 2),
    ]


class Iface(ct.Structure):
    _fields_ = [("port", ct.c_uint32), ("kind", ct.c_uint32)]


class PortStats(ct.Structure):
    _fields_ = [
        ("rx_packets", ct.c_uint64),
        ("rx_bytes", ct.c_uint64),
        ("tx_packets", ct.c_uint64),
        ("tx_bytes", ct.c_uint64),
        ("drops", ct.c_uint64),
    ]


class SlowMsg(ct.Structure):
    _fields_ = [
        ("reason", ct.c_uint32),
        ("cube_id", ct.c_uint32),
        ("in_port", ct.c_uint32),
        ("out_port", ct.c_uint32),
        ("arg", ct.c_uint32),
        ("pkt_len", ct.c_uint32),
    ]


class InjectTrailer(ct.Structure):
    _fields_ = [("port", ct.c_uint32), ("action", ct.c_uint32), ("magic", ct.c_uint32)]


class BridgeFdbKey(ct.Structure):
    _fields_ = [("cube", ct.c_uint32), ("mac", MacBytes), ("pad", ct.c_uint16)]


class BridgeFdbVal(ct.Structure):
    _fields_ = [("port", ct.c_uint32), ("pad", ct.c_uint32), ("seen_ns", ct.c_uint64)]


class BridgeCfg(ct.Structure):
    _fields_ = [
        ("aging_ns", ct.c_uint64),
        ("n_ports", ct.c_uint32),
        ("cube_port", ct.c_uint32),
        ("ports", ct.c_uint32 * BRIDGE_MAX_PORTS),
        ("ifindex", ct.c_uint32 * BRIDGE_MAX_PORTS),
    ]


class RouterRouteKey(ct.Structure):
    _fields_ = [("prefixlen", ct.c_uint32), ("cube", ct.c_uint32), ("dst", ct.c_uint32)]


class RouterRoute(ct.Structure):
    _fields_ = [("port", ct.c_uint32), ("nexthop", ct.c_uint32)]


class RouterNeighKey(ct.Structure):
    _fields_ = [("cube", ct.c_uint32), ("ip", ct.c_uint32)]


class RouterNeigh(ct.Structure):
    _fields_ = [
        ("mac", MacBytes),
        ("pad", ct.c_uint16),
        ("port", ct.c_uint32),
        ("updated_ns", ct.c_uint64),
    ]


SVC_INTERNAL, SVC_EXTERNAL = 0, 1  # pcn_lb.h PCN_SVC_*: which traffic an entry serves
LB_AFFINITY_CLIENT_IP, LB_DROP_EMPTY = 1, 2  # pcn_lb.h PCN_LB_*: Svc.flags


class SvcKey(ct.Structure):
    _fields_ = [("vip", ct.c_uint32), ("port", ct.c_uint16), ("proto", ct.c_uint8),
                ("scope", ct.c_uint8)]


class Svc(ct.Structure):
    _fields_ = [("id", ct.c_uint32), ("n_slots", ct.c_uint32), ("flags", ct.c_uint32),
                ("affinity_timeout_s", ct.c_uint32)]


class SlotKey(ct.Structure):
    _fields_ = [("svc", ct.c_uint32), ("slot", ct.c_uint32)]


class BackendVal(ct.Structure):
    _fields_ = [("ip", ct.c_uint32), ("port", ct.c_uint16), ("pad", ct.c_uint16)]


class Xlate(ct.Structure):
    _fields_ = [("ip", ct.c_uint32), ("port", ct.c_uint16), ("is_src", ct.c_uint8),
                ("kind", ct.c_uint8), ("ip2", ct.c_uint32), ("port2", ct.c_uint16),
                ("state", ct.c_uint8), ("pad", ct.c_uint8), ("svc", ct.c_uint32),
                ("born_ms", ct.c_uint32), ("seen_ns", ct.c_uint64)]


LIFETIMES = 10  # PCN_LIFETIMES: slots of SessionCfg.lifetime_ns (see pcn_session.h)


class SessionCfg(ct.Structure):
    _fields_ = [("lifetime_ns", ct.c_uint64 * LIFETIMES), ("grace_ns", ct.c_uint64)]


class Flow(ct.Structure):
    _fields_ = [("saddr", ct.c_uint32), ("daddr", ct.c_uint32), ("sport", ct.c_uint16),
                ("dport", ct.c_uint16), ("proto", ct.c_uint8), ("pad", ct.c_uint8 * 3)]


class DispCfg(ct.Structure):
    _fields_ = [("node_ip", ct.c_uint32), ("vtep_ip", ct.c_uint32), ("local_pods", ct.c_uint32),
                ("local_pods_mask", ct.c_uint32), ("uplink_port", ct.c_uint32),
                ("overlay_port", ct.c_uint32), ("np_lo", ct.c_uint16), ("np_hi", ct.c_uint16),
                ("snat_lo", ct.c_uint16), ("snat_hi", ct.c_uint16)]


class LbCfg(ct.Structure):
    """struct lbrp_cfg (bpf/lbrp.c): an lbrp instance's view of its node."""

    _fields_ = [("svc_net", ct.c_uint32), ("svc_mask", ct.c_uint32),
                ("hairpin_ip", ct.c_uint32), ("node_ip", ct.c_uint32),
                ("host_pod_ip", ct.c_uint32), ("local_pods", ct.c_uint32),
                ("local_pods_mask", ct.c_uint32), ("host_port", ct.c_uint32),
                ("masq_lo", ct.c_uint16), ("masq_hi", ct.c_uint16)]


class NetKey(ct.Structure):
    _fields_ = [("prefixlen", ct.c_uint32), ("inst", ct.c_uint32), ("ip", ct.c_uint32)]


class NodePortKey(ct.Structure):
    _fields_ = [("inst", ct.c_uint32), ("port", ct.c_uint16), ("proto", ct.c_uint8),
                ("pad", ct.c_uint8)]


FW_CAP_WORDS = 160  # bpf/firewall.c FW_CAP_WORDS: 64-bit words of a rule vector


class FwLpmKey(ct.Structure):
    """struct fw_lpm_key (bpf/firewall.c): prefixlen = 96 + the value's
    significant bits; value in network order (a port in its upper 16 bits)."""

    _fields_ = [("prefixlen", ct.c_uint32), ("inst", ct.c_uint32), ("gen", ct.c_uint32),
                ("field", ct.c_uint32), ("value", ct.c_uint32)]


class FwVecKey(ct.Structure):
    _fields_ = [("inst", ct.c_uint32), ("gen", ct.c_uint32), ("field", ct.c_uint32),
                ("id", ct.c_uint32)]


class FwVec(ct.Structure):
    """struct fw_vec: bit i % 64 of word i // 64 is rule i."""

    _fields_ = [("w", ct.c_uint64 * FW_CAP_WORDS)]


class FwHitKey(ct.Structure):
    _fields_ = [("inst", ct.c_uint32), ("idx", ct.c_uint32)]


class FwCfg(ct.Structure):
    _fields_ = [("gen", ct.c_uint32), ("n_rules", ct.c_uint32), ("default_action", ct.c_uint32),
                ("flags", ct.c_uint32)]


CUBE_MAX_PARAMS = 16  # PCN_CUBE_MAX_PARAMS of bpf/include/pcn_cube_api.h


class CubeParams(ct.Structure):
    """A custom cube instance's parameter words (pcn_cube_api.h's
    struct pcn_cube_params), by index."""

    _fields_ = [("v", ct.c_uint64 * CUBE_MAX_PARAMS)]


class TbfParams(ct.Structure):
    """pcn_tbf.h's bucket parameters: bytes per ns and bytes in 32.32 fixed point."""

    _fields_ = [("rate_fp", ct.c_uint64), ("burst_fp", ct.c_uint64), ("fill_ns", ct.c_uint64)]


class Tbf(ct.Structure):
    """A token bucket (pcn_tbf.h); `lock` is the bpf_spin_lock, zero from user space."""

    _fields_ = [("lock", ct.c_uint32), ("pad", ct.c_uint32), ("tokens_fp", ct.c_uint64),
                ("last_ns", ct.c_uint64)]


class PlcCfg(ct.Structure):
    _fields_ = [("tbf", TbfParams), ("scope", ct.c_uint32), ("pad", ct.c_uint32)]


class PlcKey(ct.Structure):
    _fields_ = [("inst", ct.c_uint32), ("port", ct.c_uint32)]


class PlcCtr(ct.Structure):
    _fields_ = [("packets", ct.c_uint64), ("bytes", ct.c_uint64)]


class FmKey(ct.Structure):
    """bpf/flowmonitor.c struct fm_key: addresses and ports in network order."""

    _fields_ = [("saddr", ct.c_uint32), ("daddr", ct.c_uint32), ("sport", ct.c_uint16),
                ("dport", ct.c_uint16), ("proto", ct.c_uint8), ("dir", ct.c_uint8),
                ("pad", ct.c_uint16)]


class FmVal(ct.Structure):
    """bpf/flowmonitor.c struct fm_val: counters, CLOCK_MONOTONIC ns, TCP flags."""

    _fields_ = [("packets", ct.c_uint64), ("bytes", ct.c_uint64), ("first_ns", ct.c_uint64),
                ("last_ns", ct.c_uint64), ("tcp_flags", ct.c_uint64)]


class AffinityKey(ct.Structure):
    _fields_ = [("svc", ct.c_uint32), ("client", ct.c_uint32)]


class Affinity(ct.Structure):
    _fields_ = [("backend", BackendVal), ("seen_ns", ct.c_uint64)]


class SockRevKey(ct.Structure):
    """pcn_sock.h struct pcn_sock_rev_key: a socket (its cookie) and a backend."""

    _fields_ = [("cookie", ct.c_uint64), ("ip", ct.c_uint32), ("port", ct.c_uint16),
                ("pad", ct.c_uint16)]


class SockRev(ct.Structure):
    _fields_ = [("vip", ct.c_uint32), ("port", ct.c_uint16), ("pad", ct.c_uint16)]


class SockAffinityKey(ct.Structure):
    """pcn_sock.h struct pcn_sock_affinity_key: the client is a network
    namespace (bpf_get_netns_cookie), one per pod."""

    _fields_ = [("svc", ct.c_uint32), ("pad", ct.c_uint32), ("netns", ct.c_uint64)]


class FragKey(ct.Structure):
    """A fragmented datagram as one cube instance (`owner`) saw it (bpf/include/pcn_frag.h)."""

    _fields_ = [("saddr", ct.c_uint32), ("daddr", ct.c_uint32), ("id", ct.c_uint16),
                ("proto", ct.c_uint8), ("pad", ct.c_uint8), ("owner", ct.c_uint32)]


class FragVal(ct.Structure):
    """What its first fragment held (ports, ICMP type) and, for a firewall, decided."""

    _fields_ = [("sport", ct.c_uint16), ("dport", ct.c_uint16), ("icmp_type", ct.c_uint8),
                ("verdict", ct.c_uint8), ("rule", ct.c_uint16), ("seen_ns", ct.c_uint64)]


RouterAddrKey = RouterNeighKey  # same layout: {cube, ip}

POL_PORTS = 8  # policy.c POL_PORTS (= policyrules.PORTS_PER_RULE)


class PolTier(ct.Structure):
    """struct pol_tier (bpf/policy.c): one direction of a pod's policy."""

    _fields_ = [("n_admin", ct.c_uint16), ("n_namespaced", ct.c_uint16),
                ("n_baseline", ct.c_uint16), ("isolated", ct.c_uint8), ("pad", ct.c_uint8)]


class PolCfg(ct.Structure):
    _fields_ = [("gen", ct.c_uint32), ("pad", ct.c_uint32), ("dir", PolTier * 2)]


class PolRuleKey(ct.Structure):
    _fields_ = [("port", ct.c_uint32), ("gen", ct.c_uint32), ("idx", ct.c_uint16),
                ("dir", ct.c_uint8), ("pad", ct.c_uint8)]


class PolPortMatch(ct.Structure):
    _fields_ = [("lo", ct.c_uint16), ("hi", ct.c_uint16), ("proto", ct.c_uint8),
                ("pad", ct.c_uint8)]


class PolRule(ct.Structure):
    _fields_ = [("set", ct.c_uint32), ("counter", ct.c_uint32), ("action", ct.c_uint8),
                ("n_ports", ct.c_uint8), ("named_port", ct.c_uint8), ("tier", ct.c_uint8),
                ("ports", PolPortMatch * POL_PORTS)]


class PolSetKey(ct.Structure):
    """An address set's prefix: `prefixlen` is 32 (the set id) + the prefix's."""

    _fields_ = [("prefixlen", ct.c_uint32), ("set", ct.c_uint32), ("ip", ct.c_uint32)]


class PolSetVal(ct.Structure):
    _fields_ = [("proto", ct.c_uint8), ("pad", ct.c_uint8), ("port", ct.c_uint16)]


class PolHostKey(ct.Structure):
    _fields_ = [("prefixlen", ct.c_uint32), ("ip", ct.c_uint32)]


class CtKey(ct.Structure):
    """struct pcn_ct_key (bpf/include/pcn_ct.h): a connection, ends in canonical order."""

    _fields_ = [("scope", ct.c_uint32), ("addr_a", ct.c_uint32), ("addr_b", ct.c_uint32),
                ("port_a", ct.c_uint16), ("port_b", ct.c_uint16), ("proto", ct.c_uint8),
                ("pad", ct.c_uint8 * 3)]


class Ct(ct.Structure):
    _fields_ = [("seen_ns", ct.c_uint64), ("epoch", ct.c_uint32), ("ref", ct.c_uint32),
                ("flags", ct.c_uint8), ("dir", ct.c_uint8), ("pad", ct.c_uint8 * 6)]


class PolQuery(ct.Structure):
    _fields_ = [("peer", ct.c_uint32), ("dport", ct.c_uint16), ("dir", ct.c_uint8),
                ("pad", ct.c_uint8)]


class PolScratch(ct.Structure):
    """struct pol_scratch (bpf/policy.c): what policy_rx hands policy_judge
    across the tail call (per CPU; pinned so that a restarted agent takes
    the programs over)."""

    _fields_ = [("q", PolQuery * 2), ("tier", PolTier * 2), ("k", CtKey), ("f", Flow),
                ("now", ct.c_uint64), ("gen", ct.c_uint32), ("epoch", ct.c_uint32),
                ("owner", ct.c_uint32), ("ip_id", ct.c_uint16), ("nq", ct.c_uint8),
                ("rejudge", ct.c_uint8), ("src_is_a", ct.c_uint8), ("dir", ct.c_uint8),
                ("tflags", ct.c_uint8), ("proto", ct.c_uint8), ("icmp_type", ct.c_uint8),
                ("icmp_error", ct.c_uint8), ("first_fragment", ct.c_uint8),
                ("skip_admin", ct.c_uint8), ("qi", ct.c_uint8)]


class PolCtrKey(ct.Structure):
    _fields_ = [("port", ct.c_uint32), ("id", ct.c_uint32)]


class PolCtr(ct.Structure):
    _fields_ = [("packets", ct.c_uint64), ("bytes", ct.c_uint64)]


class BpfTable(Protocol):
    """What the agent uses of a BCC table (bcc.table.TableBase and subclasses).

    Keys and values are ctypes objects whose types BCC derives from the C
    source at compile time (the mirrors above describe them), so they are
    Any here."""

    Key: Any  # the ctypes type of a key
    Leaf: Any  # the ctypes type of a value (per CPU: an array, one per CPU)
    max_entries: int  # as compiled (the runtime makes sure the kernel's map agrees)

    def __getitem__(self, key: Any) -> Any: ...

    def __setitem__(self, key: Any, value: Any) -> None: ...

    def __delitem__(self, key: Any) -> None: ...

    def __contains__(self, key: object) -> bool: ...

    def items(self) -> Iterable[tuple[Any, Any]]: ...

    # hash maps: many keys in one system call (BPF_MAP_UPDATE_BATCH, _DELETE_BATCH);
    # ctypes arrays of the key and value types
    def items_update_batch(self, ct_keys: Any, ct_values: Any) -> None: ...

    def items_delete_batch(self, ct_keys: Any = ...) -> None: ...

    # perf event arrays only (the slow path)
    def open_perf_buffer(self, callback: Callable[[int, int, int], None],
                         page_cnt: int = ...) -> None: ...


# (map name in C, key struct, value struct) for the size check.
MIRRORS: dict[str, tuple[type, type]] = {
    "pcn_ports": (ct.c_uint32, Port),
    "pcn_ifaces": (ct.c_uint32, Iface),
    "pcn_port_stats": (ct.c_uint32, PortStats),
    "bridge_fdb": (BridgeFdbKey, BridgeFdbVal),
    "bridge_cfgs": (ct.c_uint32, BridgeCfg),
    "router_routes": (RouterRouteKey, RouterRoute),
    "router_neigh": (RouterNeighKey, RouterNeigh),
    "router_addrs": (RouterAddrKey, ct.c_uint32),
    "router_mtus": (ct.c_uint32, ct.c_uint32),
    "lb_services": (SvcKey, Svc),
    "lb_slots": (SlotKey, BackendVal),
    "lb_sessions": (Flow, Xlate),
    "nat_sessions": (Flow, Xlate),
    "session_cfg": (ct.c_uint32, SessionCfg),
    "lb_affinity": (AffinityKey, Affinity),
    "lb_vips": (ct.c_uint32, ct.c_uint32),
    "lb_cfgs": (ct.c_uint32, LbCfg),
    "sock_rev": (SockRevKey, SockRev),
    "sock_affinity": (SockAffinityKey, Affinity),
    "disp_cfgs": (ct.c_uint32, DispCfg),
    "disp_nets": (NetKey, ct.c_uint32),
    "disp_nodeports": (NodePortKey, ct.c_uint32),
    "fw_lpm": (FwLpmKey, ct.c_uint32),
    "fw_vecs": (FwVecKey, FwVec),
    "fw_conf": (ct.c_uint32, FwCfg),
    "fw_rule_hits": (FwHitKey, ct.c_uint64),
    "fw_ct": (CtKey, Ct),
    "plc_cfgs": (ct.c_uint32, PlcCfg),
    "plc_buckets": (PlcKey, Tbf),
    "plc_ctrs": (ct.c_uint32, PlcCtr),
    "pcn_frags": (FragKey, FragVal),
    "pol_cfgs": (ct.c_uint32, PolCfg),
    "pol_rules": (PolRuleKey, PolRule),
    "pol_sets": (PolSetKey, PolSetVal),
    "pol_host": (PolHostKey, ct.c_uint32),
    "pol_ct": (CtKey, Ct),
    "pol_ctrs": (PolCtrKey, PolCtr),
    "pol_epoch": (ct.c_uint32, ct.c_uint32),
    "pol_scratch": (ct.c_uint32, PolScratch),
    "fm_flows": (FmKey, FmVal),
    "pcn_cube_params": (ct.c_uint32, CubeParams),  # CubeTypes (pcn_cube_api.h)
    "pcn_cube_ctrs": (ct.c_uint32, ct.c_uint64),
}


def ip_be(addr: str | ipaddress.IPv4Address) -> int:
    """An IPv4 address as the u32 whose memory holds it in network order."""
    return int.from_bytes(socket.inet_aton(str(addr)), "little")


def ip_str(value: int) -> str:
    return socket.inet_ntoa(int(value).to_bytes(4, "little"))


def mac_bytes(mac: str) -> ct.Array[ct.c_uint8]:
    parts = bytes(int(x, 16) for x in mac.split(":"))
    if len(parts) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return MacBytes(*parts)


def mac_str(raw: bytes | ct.Array[ct.c_uint8]) -> str:
    return ":".join(f"{b:02x}" for b in bytes(raw))


def discard(table: BpfTable, key: object) -> bool:
    """Delete a map entry if it is there; True when it was."""
    try:
        del table[key]
        return True
    except KeyError:
        return False
