"""Taking over the programs a previous agent loaded.

An agent that restarts compiles its bundle again (BCC has no object cache),
but it need not load it again: the previous agent's programs are still in
the kernel, attached by tc and held by the pinned program array. Loading a
program makes the verifier walk it, about a second and a half for the
node's bundle on two cores, while the node serves no CNI ADD. So a
restarted agent takes the old program over by id (`bpf_prog_get_fd_by_id`)
when, and only when, it is the very program it would load:

* its tag, the digest the kernel computes over the instructions with map
  references blanked (`bpf_prog_calc_tag`: SHA-1 before Linux 6.18,
  SHA-256 since), equals the digest of the instructions just compiled;
* every map it uses is a map of the new module (they are all pinned, so a
  program of the same text uses the same maps; a map not pinned would be
  the dead agent's copy, and the program is loaded anew instead).

Anything else (another source, another BCC, a program gone) falls back to
the normal load; this module never fails an agent start.
"""

from __future__ import annotations

import ctypes as ct
import ctypes.util
import hashlib
import logging
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_INSN = struct.Struct("<BBhi")  # struct bpf_insn: code, dst:4|src:4, off, imm
_LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW
_PSEUDO_MAP_FD, _PSEUDO_MAP_VALUE = 1, 2


class _ProgInfo(ct.Structure):
    """The head of struct bpf_prog_info (include/uapi/linux/bpf.h); the
    kernel fills as many bytes as we pass."""

    _fields_ = [
        ("type", ct.c_uint32),
        ("id", ct.c_uint32),
        ("tag", ct.c_uint8 * 8),
        ("jited_prog_len", ct.c_uint32),
        ("xlated_prog_len", ct.c_uint32),
        ("jited_prog_insns", ct.c_uint64),
        ("xlated_prog_insns", ct.c_uint64),
        ("load_time", ct.c_uint64),
        ("created_by_uid", ct.c_uint32),
        ("nr_map_ids", ct.c_uint32),
        ("map_ids", ct.c_uint64),
        ("name", ct.c_char * 16),
    ]


class _MapInfo(ct.Structure):
    """The head of struct bpf_map_info (include/uapi/linux/bpf.h)."""

    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32),
                ("map_flags", ct.c_uint32), ("name", ct.c_char * 16)]


@dataclass(frozen=True)
class StaleMap:
    """A map of a compiled module that is not what its source declares:
    BCC reuses a pinned map whatever the declaration says (bcc's
    BPF_TABLE_PINNED opens the pin and checks nothing), so a map pinned by
    an agent built with other sizes (lbServiceMapMax, ...) comes back with
    its old size. `pinned` and `declared`: (max_entries, map_flags)."""

    name: str  # the table's, in C
    pin: Path
    pinned: tuple[int, int]
    declared: tuple[int, int]


@dataclass(frozen=True)
class ProgramInfo:
    id: int
    tag: bytes
    map_ids: frozenset[int]


@cache
def _libbpf() -> Any:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    lib = ct.CDLL(name, use_errno=True)
    lib.bpf_prog_get_fd_by_id.argtypes = [ct.c_uint32]
    lib.bpf_prog_get_fd_by_id.restype = ct.c_int
    lib.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
    lib.bpf_obj_get_info_by_fd.restype = ct.c_int
    lib.bpf_obj_get.argtypes = [ct.c_char_p]
    lib.bpf_obj_get.restype = ct.c_int
    return lib


@cache
def _libbcc() -> Any:
    """libbcc with the few C entry points bcc's Python binding leaves unbound
    (bcc_common.h), on a handle of our own so bcc's own is left as it is."""
    lib = ct.CDLL("libbcc.so.0")
    lib.bpf_num_tables.argtypes = [ct.c_void_p]
    lib.bpf_num_tables.restype = ct.c_size_t
    lib.bpf_table_fd_id.argtypes = [ct.c_void_p, ct.c_size_t]
    lib.bpf_table_fd_id.restype = ct.c_int
    lib.bpf_function_start.argtypes = [ct.c_void_p, ct.c_char_p]
    lib.bpf_function_start.restype = ct.c_void_p
    lib.bpf_function_size.argtypes = [ct.c_void_p, ct.c_char_p]
    lib.bpf_function_size.restype = ct.c_size_t
    lib.bpf_table_name.argtypes = [ct.c_void_p, ct.c_size_t]
    lib.bpf_table_name.restype = ct.c_char_p
    lib.bpf_table_max_entries_id.argtypes = [ct.c_void_p, ct.c_size_t]
    lib.bpf_table_max_entries_id.restype = ct.c_size_t
    lib.bpf_table_flags_id.argtypes = [ct.c_void_p, ct.c_size_t]
    lib.bpf_table_flags_id.restype = ct.c_int
    return lib


def _info(fd: int, info: ct.Structure) -> None:
    size = ct.c_uint32(ct.sizeof(info))
    if _libbpf().bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)) != 0:
        err = ct.get_errno()
        raise OSError(err, f"bpf_obj_get_info_by_fd({fd}): {os.strerror(err)}")


def program_info(fd: int) -> ProgramInfo:
    """Id, tag and map ids of the loaded program `fd`. Raises OSError."""
    info = _ProgInfo()
    _info(fd, info)
    ids = (ct.c_uint32 * max(info.nr_map_ids, 1))()
    info2 = _ProgInfo(nr_map_ids=info.nr_map_ids, map_ids=ct.addressof(ids))
    _info(fd, info2)
    return ProgramInfo(info.id, bytes(info.tag), frozenset(ids[: info2.nr_map_ids]))


def map_id(fd: int) -> int:
    """The kernel's id of the map `fd`. Raises OSError."""
    info = _MapInfo()
    _info(fd, info)
    return int(info.id)


def map_size(fd: int) -> tuple[int, int]:
    """(max_entries, map_flags) of the map `fd`, as the kernel holds them
    (bpf_map_info). Raises OSError."""
    info = _MapInfo()
    _info(fd, info)
    return int(info.max_entries), int(info.map_flags)


def pinned_maps(pin_dir: Path) -> dict[int, Path]:
    """The maps pinned directly in `pin_dir`: map id -> pin path (pins that
    cannot be opened, or are not maps, are left out)."""
    lib = _libbpf()
    out: dict[int, Path] = {}
    try:
        paths = [p for p in pin_dir.iterdir() if not p.is_dir()]
    except FileNotFoundError:
        return out
    for path in paths:
        fd = lib.bpf_obj_get(str(path).encode())
        if fd < 0:
            continue
        try:
            # a map's fd shows its type in fdinfo (kernel/bpf/syscall.c
            # bpf_map_show_fdinfo); a program's would fill another info struct
            if "map_type:" not in Path(f"/proc/self/fdinfo/{fd}").read_text():
                continue
            info = _MapInfo()
            _info(fd, info)
            out[int(info.id)] = path
        except OSError:
            pass
        finally:
            os.close(fd)
    return out


def stale_maps(module: Any, pinned: Mapping[int, Path]) -> list[StaleMap]:
    """The maps of the bcc.BPF `module` among `pinned` (pinned_maps() taken
    before the compile: maps the compile found, not made) whose kernel map
    differs in max_entries or flags from the module's declaration (libbcc's
    bpf_table_max_entries_id, bpf_table_flags_id): maps left by a build with
    other sizes. Raises OSError when the kernel cannot describe a map."""
    lib = _libbcc()
    out: list[StaleMap] = []
    for i in range(lib.bpf_num_tables(module.module)):
        fd = lib.bpf_table_fd_id(module.module, i)
        info = _MapInfo()
        _info(fd, info)
        pin = pinned.get(int(info.id))
        if pin is None:
            continue
        declared = (int(lib.bpf_table_max_entries_id(module.module, i)),
                    int(lib.bpf_table_flags_id(module.module, i)))
        actual = (int(info.max_entries), int(info.map_flags))
        if actual != declared:
            name = lib.bpf_table_name(module.module, i).decode()
            out.append(StaleMap(name, pin, actual, declared))
    return out


def instruction_tags(insns: bytes) -> set[bytes]:
    """The tags the kernel may give a program of these instructions: the
    first 8 bytes of the digest of the instructions with the immediates of
    map loads zeroed (kernel/bpf/core.c bpf_prog_calc_tag), SHA-1 or
    SHA-256 depending on the kernel version."""
    out = bytearray(insns)
    was_ld_map = False
    for off in range(0, len(out) - len(out) % 8, 8):
        code, regs, ioff, _ = _INSN.unpack_from(out, off)
        src = regs >> 4
        if not was_ld_map and code == _LD_IMM64 and src in (_PSEUDO_MAP_FD, _PSEUDO_MAP_VALUE):
            was_ld_map = True
            _INSN.pack_into(out, off, code, regs, ioff, 0)
        elif was_ld_map and code == 0 and regs == 0 and ioff == 0:
            was_ld_map = False
            _INSN.pack_into(out, off, code, regs, ioff, 0)
        else:
            was_ld_map = False
    return {hashlib.sha1(out).digest()[:8], hashlib.sha256(out).digest()[:8]}


def names(module: Any) -> list[str]:
    """Every program a compiled module (bcc.BPF) holds, by name: the entry
    programs, each cube type's `<type>_rx`, and those a type reaches by tail
    call (the policy cube's judge): all are loaded, taken over and recorded
    alike."""
    from bcc import lib

    n = int(lib.bpf_num_functions(module.module))
    return [lib.bpf_function_name(module.module, i).decode() for i in range(n)]


def take_over(module: Any, previous: Mapping[str, int]) -> list[str]:
    """Give the bcc.BPF `module` the programs of `previous` (name -> program
    id, as `loaded_ids` returned them to the previous agent) that are exactly
    what it would load; its `load_func` then returns them without loading.
    Returns the names taken over."""
    from bcc import BPF  # late: unit tests of pure code need no kernel

    lib = _libbcc()
    try:
        own_maps = {map_id(lib.bpf_table_fd_id(module.module, i))
                    for i in range(lib.bpf_num_tables(module.module))}
    except OSError as exc:
        log.info("not taking over programs: %s", exc)
        return []
    taken: list[str] = []
    for name, prog_id in sorted(previous.items()):
        bname = name.encode()
        if bname in module.funcs or not lib.bpf_function_start(module.module, bname):
            continue
        size = lib.bpf_function_size(module.module, bname)
        insns = ct.string_at(lib.bpf_function_start(module.module, bname), size)
        fd = _libbpf().bpf_prog_get_fd_by_id(prog_id)
        if fd < 0:
            log.info("program %s (id %d) is gone: loading it", name, prog_id)
            continue
        try:
            info = program_info(fd)
        except OSError as exc:
            os.close(fd)
            log.info("program %s (id %d): %s: loading it", name, prog_id, exc)
            continue
        why = ("its instructions differ" if info.tag not in instruction_tags(insns)
               else "it uses maps this module does not have" if not info.map_ids <= own_maps
               else "")
        if why:
            os.close(fd)
            log.info("program %s (id %d) not taken over: %s", name, prog_id, why)
            continue
        module.funcs[bname] = BPF.Function(module, bname, fd)
        taken.append(name)
    return taken


def loaded_ids(module: Any, names: list[str]) -> dict[str, int]:
    """Program ids of the named programs loaded in `module` (for the next
    agent's take_over)."""
    out: dict[str, int] = {}
    for name in names:
        fn = module.funcs.get(name.encode())
        if fn is not None:
            out[name] = program_info(fn.fd).id
    return out
