"""dataplane.programs: a restarted agent takes over the previous agent's
programs only when they are exactly what it would load."""

from __future__ import annotations

import secrets
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from pcn_agent.dataplane import bpffs, programs
from pcn_agent.dataplane.compiler import BpfModule, compile_bundle, compile_cube
from pcn_agent.dataplane.runtime import _sched_cls
from pcn_lab.topology import PREFIX

INSN = struct.Struct("<BBhi")


def _ld_map(imm: int, src: int = 1) -> bytes:
    """A 16-byte ld_imm64 of a map (BPF_PSEUDO_MAP_FD) with fd `imm`."""
    return INSN.pack(0x18, src << 4 | 1, 0, imm) + INSN.pack(0, 0, 0, 0)


EXIT = INSN.pack(0x95, 0, 0, 0)
MOV_R0 = INSN.pack(0xB7, 0, 0, 7)  # r0 = 7


def test_tags_ignore_map_fds_as_the_kernel_does() -> None:
    a = _ld_map(4) + MOV_R0 + EXIT
    b = _ld_map(19) + MOV_R0 + EXIT
    assert programs.instruction_tags(a) == programs.instruction_tags(b)
    assert len(programs.instruction_tags(a)) == 2  # SHA-1 (< 6.18) or SHA-256 (>= 6.18)


def test_tags_see_every_other_immediate() -> None:
    base = programs.instruction_tags(_ld_map(4) + MOV_R0 + EXIT)
    assert programs.instruction_tags(_ld_map(4) + INSN.pack(0xB7, 0, 0, 8) + EXIT) != base
    # an ld_imm64 of a constant (src 0) is code, not a map reference
    assert (programs.instruction_tags(_ld_map(4, src=0) + EXIT)
            != programs.instruction_tags(_ld_map(5, src=0) + EXIT))


@pytest.fixture
def pin_dirs() -> Iterator[list[Path]]:
    made: list[Path] = []
    yield made
    for d in made:
        bpffs.remove_instance(d)
    assert not any(d.exists() for d in made)


def _pin_dir(made: list[Path]) -> Path:
    d = bpffs.instance_dir(f"{PREFIX}-{secrets.token_hex(4)}-prog", bpffs.DEFAULT_ROOT)
    made.append(d)
    return d


def _loaded(module: BpfModule, names: list[str]) -> dict[str, int]:
    for n in names:
        module.load_func(n, _sched_cls())
    return programs.loaded_ids(module, names)


def test_the_same_program_on_the_same_maps_is_taken_over(pin_dirs: list[Path]) -> None:
    d = _pin_dir(pin_dirs)
    names = ["pcn_ingress", "pcn_egress", "router_rx"]
    old = compile_bundle(("entry", "router"), d)
    try:
        ids = _loaded(old, names)
        new = compile_bundle(("entry", "router"), d)
        try:
            assert sorted(programs.take_over(new, ids)) == sorted(names)
            assert programs.loaded_ids(new, names) == ids  # load_func returns the old ones
        finally:
            new.cleanup()
    finally:
        old.cleanup()


def test_other_instructions_are_loaded_anew(pin_dirs: list[Path]) -> None:
    d = _pin_dir(pin_dirs)
    # one vector word against two: another loop bound, other instructions
    old = compile_cube("firewall", d, {"FW_MAX_RULES": 64})
    try:
        ids = _loaded(old, ["firewall_rx"])
        new = compile_cube("firewall", d, {"FW_MAX_RULES": 128})
        try:
            assert programs.take_over(new, ids) == []
            fd = new.load_func("firewall_rx", _sched_cls()).fd
            assert programs.program_info(fd).id != ids["firewall_rx"]
        finally:
            new.cleanup()
    finally:
        old.cleanup()


def test_a_program_on_other_maps_is_loaded_anew(pin_dirs: list[Path]) -> None:
    """Same text, other pin directory: the old program's maps are not this
    module's (as an unpinned map would not be), so it is not taken over."""
    old = compile_cube("bridge", _pin_dir(pin_dirs))
    try:
        ids = _loaded(old, ["bridge_rx"])
        new = compile_cube("bridge", _pin_dir(pin_dirs))
        try:
            assert programs.take_over(new, ids) == []
        finally:
            new.cleanup()
    finally:
        old.cleanup()


def test_a_program_gone_is_loaded_anew(pin_dirs: list[Path]) -> None:
    d = _pin_dir(pin_dirs)
    old = compile_cube("bridge", d)
    ids = _loaded(old, ["bridge_rx"])
    old.cleanup()  # its only holder: the program is freed
    new = compile_cube("bridge", d)
    try:
        assert programs.take_over(new, ids) == []
        assert programs.take_over(new, {"no_such_prog": 1}) == []
    finally:
        new.cleanup()
