"""Read a pcn node's pinned service maps from outside the agent (libbpf via
ctypes, the same libbpf.so.1 BCC links): what the data plane holds, as the
lbrp program would look it up, whatever the agent believes."""

from __future__ import annotations

import ctypes as ct
import errno
import os
from pathlib import Path

from pcn_agent.dataplane import maps
from pcn_agent.dataplane.cubes.lbrp import PROTOCOLS, be16, from_be16

_lib: ct.CDLL | None = None


def _libbpf() -> ct.CDLL:
    global _lib
    if _lib is None:
        lib = ct.CDLL("libbpf.so.1", use_errno=True)
        lib.bpf_obj_get.argtypes = [ct.c_char_p]
        lib.bpf_obj_get.restype = ct.c_int
        for fn in (lib.bpf_map_lookup_elem, lib.bpf_map_get_next_key):
            fn.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
            fn.restype = ct.c_int
        _lib = lib
    return _lib


class PinnedMap:
    def __init__(self, path: Path, key_type: type, value_type: type) -> None:
        self.path = path
        self.key_type = key_type
        self.value_type = value_type
        self.fd = _libbpf().bpf_obj_get(str(path).encode())
        if self.fd < 0:
            err = ct.get_errno()
            raise OSError(err, f"cannot open pinned map {path}: {os.strerror(err)}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def get(self, key: ct.Structure):
        value = self.value_type()
        if _libbpf().bpf_map_lookup_elem(self.fd, ct.byref(key), ct.byref(value)) != 0:
            err = ct.get_errno()
            if err == errno.ENOENT:
                return None
            raise OSError(err, f"lookup in {self.path}: {os.strerror(err)}")
        return value

    def count(self) -> int:
        """Entries, by walking the keys (a hash map has no cheaper count)."""
        lib = _libbpf()
        key, nxt = self.key_type(), self.key_type()
        n = 0
        prev = None
        while lib.bpf_map_get_next_key(self.fd, prev, ct.byref(nxt)) == 0:
            n += 1
            ct.memmove(ct.byref(key), ct.byref(nxt), ct.sizeof(key))
            prev = ct.byref(key)
        return n


class ServiceMaps:
    """lb_services and lb_slots of one node (pins under <pin root>/<node>)."""

    def __init__(self, pin_dir: Path) -> None:
        self.services = PinnedMap(pin_dir / "lb_services", maps.SvcKey, maps.Svc)
        try:
            self.slots = PinnedMap(pin_dir / "lb_slots", maps.SlotKey, maps.BackendVal)
        except BaseException:
            self.services.close()
            raise

    @staticmethod
    def exist(pin_dir: Path) -> bool:
        return (pin_dir / "lb_services").exists() and (pin_dir / "lb_slots").exists()

    def close(self) -> None:
        self.services.close()
        self.slots.close()

    def backends(self, vip: str, port: int, proto: str = "tcp") -> list[tuple[str, int]] | None:
        """The service's slot table as the data plane holds it (None: no service)."""
        svc = self.services.get(maps.SvcKey(maps.ip_be(vip), be16(port), PROTOCOLS[proto]))
        if svc is None:
            return None
        out = []
        for i in range(svc.n_slots):
            b = self.slots.get(maps.SlotKey(svc.id, i))
            if b is None:
                return None  # half-written: not carried yet
            out.append((maps.ip_str(b.ip), from_be16(b.port)))
        return out

    def __enter__(self) -> ServiceMaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def possible_cpus() -> int:
    """CPUs a per-CPU map holds a value for (/sys/devices/system/cpu/possible)."""
    n = 0
    for part in Path("/sys/devices/system/cpu/possible").read_text().strip().split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


class CubeDrops:
    """A node's drop counters by cube and reason (pinned `cube_stats`, a per-CPU
    array indexed by cube id * DROP_REASONS + reason), as Runtime.cube_drops
    reads them, from outside the agent: they outlive its restarts."""

    def __init__(self, pin_dir: Path) -> None:
        self.map = PinnedMap(pin_dir / "cube_stats", ct.c_uint32,
                             ct.c_uint64 * possible_cpus())

    def close(self) -> None:
        self.map.close()

    def read(self, cubes: dict[int, str]) -> dict[str, dict[str, int]]:
        """{cube name: {reason name: drops}} for the cubes `cubes` (id -> name),
        non-zero counts only."""
        out: dict[str, dict[str, int]] = {}
        for cid, name in cubes.items():
            for reason in maps.DropReason:
                v = self.map.get(ct.c_uint32(cid * maps.DROP_REASONS + reason))
                n = sum(v) if v is not None else 0
                if n:
                    out.setdefault(name, {})[reason.name.lower()] = int(n)
        return out
