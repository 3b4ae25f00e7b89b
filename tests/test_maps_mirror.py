"""The ctypes mirrors in pcn_agent.dataplane.maps (and testrun's __sk_buff prefix) against
what BCC derives from the C sources, and the Python constants against the C
#defines and enums they copy."""

from __future__ import annotations

import ctypes as ct
import re
from collections.abc import Iterator

import pytest
from bpfunit import UnitNet, unit_net

from pcn_agent.dataplane import maps
from pcn_agent.dataplane.compiler import BpfModule, cflags, compile_cube, source_text
from pcn_agent.dataplane.cubes import lbrp, policy
from pcn_agent.dataplane.runtime import ENTRY
from pcn_bpf import SOCKET_PROGRAMS, SOURCE_DIR
from pcn_policy import rules as policyrules
from pcn_testsupport import testrun

pytestmark = [pytest.mark.bpf,
              pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning")]

# Every cube type that ships (bpf/*.c), the entry programs first.
MODULES = (ENTRY, *sorted(p.stem for p in SOURCE_DIR.glob("*.c") if p.stem != ENTRY))
# Pinned maps of the chain itself whose key and value are plain integers. Any
# other map a cube declares belongs in maps.MIRRORS (plain ctypes integers are
# fine there too).
SCALAR_MAPS: dict[str, tuple[type, type]] = {
    "pcn_progs": (ct.c_uint32, ct.c_uint32),
    "pcn_cube_stats": (ct.c_uint32, ct.c_uint64),
    "pol_progs": (ct.c_uint32, ct.c_uint32),
}


@pytest.fixture(scope="module")
def net() -> Iterator[UnitNet]:
    with unit_net(veths=0) as built:
        assert built.rt.pin_dir is not None
        for t in MODULES[1:]:
            if t in SOCKET_PROGRAMS:  # not a cube: compiled, its maps checked all the same
                SOCKET_MODULES[t] = compile_cube(t, built.rt.pin_dir)
            else:
                built.rt.load_type(t)
        try:
            yield built
        finally:
            for module in SOCKET_MODULES.values():
                module.cleanup()
            SOCKET_MODULES.clear()


SOCKET_MODULES: dict[str, BpfModule] = {}


def c_sources() -> dict[str, str]:
    """The C text of every cube type as the compiler sees it (headers inlined):
    what ships, not headers nobody includes yet."""
    assert ENTRY in MODULES and len(MODULES) > 1, f"no cube sources under {SOURCE_DIR}"
    return {t: source_text(t) for t in MODULES}


def c_defines() -> dict[str, int]:
    values: dict[str, set[int]] = {}
    for text in c_sources().values():
        for m in re.finditer(r"^\s*#define\s+([A-Z][A-Z0-9_]*)\s+(0x[0-9a-fA-F]+|\d+)\b",
                             text, re.MULTILINE):
            values.setdefault(m.group(1), set()).add(int(m.group(2), 0))
    clash = {name: v for name, v in values.items() if len(v) > 1}
    assert not clash, f"defined with different values: {clash}"
    return {name: v.pop() for name, v in values.items()}


def c_enum(enum_name: str, prefix: str) -> dict[str, int]:
    for text in c_sources().values():
        m = re.search(rf"enum\s+{enum_name}\s*\{{(.*?)\}};", text, re.DOTALL)
        if m:
            return {k: int(v, 0) for k, v in
                    re.findall(rf"\b{prefix}(\w+)\s*=\s*(0x[0-9a-fA-F]+|\d+)", m.group(1))}
    raise AssertionError(f"enum {enum_name} not found in the C sources")


def c_pinned_maps() -> set[str]:
    names = set()
    for text in c_sources().values():
        names.update(re.findall(r"BPF_TABLE_PINNED\(\s*\"\w+\"\s*,[^;]*?,[^;]*?,\s*(\w+)\s*,",
                                text))
    return names


def tables_named(net: UnitNet, name: str) -> dict[str, object]:
    """The BCC table `name` in every loaded module that declares it."""
    found = {}
    for module in MODULES:
        try:
            found[module] = (SOCKET_MODULES[module][name.encode()] if module in SOCKET_MODULES
                             else net.rt.table(name, module))
        except KeyError:
            continue
    assert found, f"no loaded module declares a map named {name!r}"
    return found


def element_type(table) -> type:
    """A map value as the C declares it (BCC turns a per-CPU map's Leaf into
    an array of one value per CPU and keeps the element as sLeaf)."""
    return getattr(table, "sLeaf", table.Leaf)


def assert_same_layout(mirror: type, bcc_type: type, what: str) -> None:
    assert ct.sizeof(mirror) == ct.sizeof(bcc_type), \
        f"{what}: ctypes {mirror.__name__} is {ct.sizeof(mirror)} bytes, C is {ct.sizeof(bcc_type)}"
    if not issubclass(mirror, ct.Structure):
        return
    c_fields = {f[0] for f in bcc_type._fields_}
    for fname, *_ in mirror._fields_:
        assert fname in c_fields, f"{what}: C struct has no field {fname!r} (fields: {c_fields})"
        ours, theirs = getattr(mirror, fname), getattr(bcc_type, fname)
        assert (ours.offset, ours.size) == (theirs.offset, theirs.size), \
            f"{what}.{fname}: ctypes at {ours.offset}+{ours.size}, C at {theirs.offset}+{theirs.size}"


# ---------------------------------------------------------------------------- maps
@pytest.mark.parametrize("name", sorted(maps.MIRRORS))
def test_mirror_matches_c_map(net: UnitNet, name: str) -> None:
    key, value = maps.MIRRORS[name]
    for module, table in tables_named(net, name).items():
        assert_same_layout(key, table.Key, f"{name} key ({module})")
        assert_same_layout(value, element_type(table), f"{name} value ({module})")


@pytest.mark.parametrize("name", sorted(SCALAR_MAPS))
def test_scalar_map_types(net: UnitNet, name: str) -> None:
    key, value = SCALAR_MAPS[name]
    for module, table in tables_named(net, name).items():
        assert ct.sizeof(table.Key) == ct.sizeof(key), f"{name} key ({module})"
        assert ct.sizeof(element_type(table)) == ct.sizeof(value), f"{name} value ({module})"


def test_every_pinned_map_is_mirrored() -> None:
    declared = c_pinned_maps()
    assert "pcn_ports" in declared and "router_routes" in declared, "map regex is broken"
    unmirrored = declared - set(maps.MIRRORS) - set(SCALAR_MAPS)
    assert not unmirrored, f"pinned maps without a ctypes mirror in maps.MIRRORS: {unmirrored}"
    stale = (set(maps.MIRRORS) | set(SCALAR_MAPS)) - declared
    assert not stale, f"mirrors of maps the C sources no longer declare: {stale}"


def test_router_addr_key_is_a_router_addr_key(net: UnitNet) -> None:
    """RouterAddrKey reuses RouterNeighKey: both C keys must keep one layout."""
    a = net.rt.table("router_addrs", "router").Key
    n = net.rt.table("router_neigh", "router").Key
    assert_same_layout(maps.RouterAddrKey, a, "router_addrs key")
    assert_same_layout(maps.RouterNeighKey, n, "router_neigh key")


# ---------------------------------------------------------------------------- structs outside maps
def probe_layout(net: UnitNet, cube_type: str, c_type: str):
    """Compile a cube's source with one extra array whose value is `c_type`,
    and return the ctypes type BCC derived for it."""
    from bcc import BPF

    assert net.rt.pin_dir is not None
    text = source_text(cube_type) + f"\nBPF_ARRAY(pcn_layout_probe, {c_type}, 1);\n"
    module = BPF(text=text.encode(), cflags=cflags(net.rt.pin_dir))
    try:
        return module["pcn_layout_probe"].Leaf
    finally:
        module.cleanup()


def test_slow_msg_mirror(net: UnitNet) -> None:
    assert_same_layout(maps.SlowMsg, probe_layout(net, "router", "struct pcn_slow_msg"),
                       "struct pcn_slow_msg")


def test_inject_trailer_mirror(net: UnitNet) -> None:
    assert_same_layout(maps.InjectTrailer,
                       probe_layout(net, ENTRY, "struct pcn_inject_trailer"),
                       "struct pcn_inject_trailer")


def test_sk_buff_prefix_matches_kernel_uapi() -> None:
    from bcc import BPF

    module = BPF(text=b"BPF_ARRAY(skb_layout, struct __sk_buff, 1);", cflags=["-w"])
    try:
        skb = module["skb_layout"].Leaf
    finally:
        module.cleanup()
    assert_same_layout(testrun.SkBuffPrefix, _prefix_of(skb, ct.sizeof(testrun.SkBuffPrefix)),
                       "struct __sk_buff")
    assert testrun.SkBuffPrefix.cb.offset == 48


def _prefix_of(struct_type: type, size: int) -> type:
    """A ctypes struct made of the leading fields of `struct_type` that fit in `size`."""
    fields = [(n, t) for n, t, *_ in struct_type._fields_
              if getattr(struct_type, n).offset + getattr(struct_type, n).size <= size]
    return type("Prefix", (ct.Structure,), {"_fields_": fields})


# ---------------------------------------------------------------------------- constants
PY_FOR_C = {
    "PCN_MAX_PORTS": maps.MAX_PORTS,
    "PCN_MAX_CUBES": maps.MAX_CUBES,
    "PCN_MAX_SLOTS": maps.MAX_SLOTS,
    "PCN_CHAIN_MAX": maps.CHAIN_MAX,
    "PCN_DROP_REASONS": maps.DROP_REASONS,
    "BRIDGE_MAX_PORTS": maps.BRIDGE_MAX_PORTS,
    "PCN_PEER_NONE": maps.PEER_NONE,
    "PCN_PEER_NETDEV": maps.PEER_NETDEV,
    "PCN_PEER_PORT": maps.PEER_PORT,
    "PCN_HOOK_INGRESS": maps.HOOK_INGRESS,
    "PCN_HOOK_EGRESS": maps.HOOK_EGRESS,
    "PCN_IFACE_PORT": maps.IFACE_PORT,
    "PCN_IFACE_INJECT": maps.IFACE_INJECT,
    "PCN_IFACE_LOOPBACK": maps.IFACE_LOOPBACK,
    "LBRP_LOOPBACK_IFINDEX": maps.LOOPBACK_IFINDEX,
    "PCN_SVC_INTERNAL": maps.SVC_INTERNAL,
    "PCN_SVC_EXTERNAL": maps.SVC_EXTERNAL,
    "PCN_LB_AFFINITY_CLIENT_IP": maps.LB_AFFINITY_CLIENT_IP,
    "PCN_LB_DROP_EMPTY": maps.LB_DROP_EMPTY,
    "PCN_SESS_LB": lbrp.SESSION_LB,
    "PCN_SESS_LB_REV": lbrp.SESSION_LB_REV,
    "PCN_SESS_NODEPORT": lbrp.SESSION_NODEPORT,
    "PCN_SESS_NODEPORT_REV": lbrp.SESSION_NODEPORT_REV,
    "PCN_SESS_LB_HAIRPIN_REV": lbrp.SESSION_LB_HAIRPIN_REV,
    "PCN_INJECT_MAGIC": maps.INJECT_MAGIC,
    "PCN_INJECT_TO_CUBE": maps.INJECT_TO_CUBE,
    "PCN_INJECT_OUT_PORT": maps.INJECT_OUT_PORT,
    "POL_MAX_RULES": policy.MAX_RULES,
    "POL_PORTS": maps.POL_PORTS,
    "POL_TIER_ADMIN": policy.TIER_ADMIN,
    "POL_TIER_NAMESPACED": policy.TIER_NAMESPACED,
    "POL_TIER_BASELINE": policy.TIER_BASELINE,
    "POL_CTR_DEFAULT": policy.CTR_DEFAULT,
    "POL_CTR_HOST": policy.CTR_HOST,
    "POL_CTR_UNNAMED": policy.CTR_UNNAMED,
    "POL_CTR_ISOLATION": policy.CTR_ISOLATION,
    "POL_CTR_DROPS": policy.CTR_DROPS,
    "POL_CTR_FIRST_RULE": policy.CTR_FIRST_RULE,
    "POL_ACCEPT": int(policyrules.Action.ACCEPT),
    "POL_DENY": int(policyrules.Action.DENY),
    "POL_PASS": int(policyrules.Action.PASS),
    "POL_INGRESS": int(policyrules.Direction.INGRESS),
    "POL_EGRESS": int(policyrules.Direction.EGRESS),
    "PCN_CTF_ORIG_A": policy.CTF_ORIG_A,
    "PCN_CTF_REPLIED": policy.CTF_REPLIED,
    "PCN_CTF_FIN_ORIG": policy.CTF_FIN_ORIG,
    "PCN_CTF_FIN_REPLY": policy.CTF_FIN_REPLY,
    "PCN_CTF_RST": policy.CTF_RST,
}


@pytest.mark.parametrize("c_name", sorted(PY_FOR_C))
def test_constant_matches_c_define(c_name: str) -> None:
    defines = c_defines()
    assert c_name in defines, f"#define {c_name} not found in the C sources"
    assert PY_FOR_C[c_name] == defines[c_name], \
        f"{c_name}: C says {defines[c_name]}, pcn_agent.dataplane.maps says {PY_FOR_C[c_name]}"


def test_drop_reasons_match_c_enum() -> None:
    c = c_enum("pcn_drop_reason", "PCN_DROP_")
    assert c.pop("NONE") == 0
    assert {r.name: r.value for r in maps.DropReason} == c
    assert max(c.values()) < maps.DROP_REASONS


def test_slow_reasons_match_c_enum() -> None:
    assert {r.name: r.value for r in maps.SlowReason} == c_enum("pcn_slow_reason", "PCN_SLOW_")
