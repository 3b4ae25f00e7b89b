"""Compiles cube C sources with BCC.

Local headers are inlined into the program text rather than passed with -I:
BCC rewrites map operations (`map.lookup()`, `prog.call()`) only in the main
file, and the shared headers are full of them.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from pcn_agent.dataplane.maps import BpfTable
from pcn_bpf import INCLUDE_DIR, SOURCE_DIR

log = logging.getLogger(__name__)

_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"\s*$', re.MULTILINE)
_DEFINE_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
# BCC's BPF() (clang front end, map creation and pinning) is not thread-safe
# (iovisor/bcc#4500: concurrent compiles fail or crash), and the agent
# compiles from several threads (warm-up, specialisation, reconcile): one at
# a time. A lock of its own, not the runtime's: pods attach meanwhile.
_COMPILE_LOCK = threading.Lock()


class CompileError(RuntimeError):
    pass


class BpfFunction(Protocol):
    """A program loaded from a module (bcc.BPF.Function)."""

    @property
    def fd(self) -> int: ...


class BpfModule(Protocol):
    """What the agent uses of a compiled module (bcc.BPF; bcc has no types)."""

    def __getitem__(self, name: bytes) -> BpfTable: ...

    def load_func(self, func_name: str, prog_type: int, device: str | None = ...,
                  attach_type: int = ...) -> BpfFunction: ...

    def perf_buffer_poll(self, timeout: int = ...) -> None: ...

    def cleanup(self) -> None: ...


def source_text(cube_type: str) -> str:
    """The C text of a cube type with its local headers inlined, each once."""
    return bundle_text((cube_type,))


def bundle_text(cube_types: Sequence[str]) -> str:
    """The C text of several cube types compiled as one module, each local
    header inlined once. One compile of N types costs about half of N
    compiles: the headers are parsed and the module set up once."""
    seen: set[str] = set()
    return "\n".join(_inlined(t, seen) for t in cube_types)


def _inlined(cube_type: str, seen: set[str]) -> str:
    path = SOURCE_DIR / f"{cube_type}.c"
    if not path.is_file():
        known = sorted(p.stem for p in SOURCE_DIR.glob("*.c"))
        raise CompileError(f"unknown cube type {cube_type!r}; known types: {', '.join(known)}")

    def inline(text: str) -> str:
        def repl(m: re.Match[str]) -> str:
            name = m.group(1)
            if name in seen:
                return ""
            seen.add(name)
            header = INCLUDE_DIR / name
            if not header.is_file():
                raise CompileError(f"{path.name}: header {name} not found in {INCLUDE_DIR}")
            return f"/* --- {name} --- */\n" + inline(header.read_text()) + "\n"

        return _INCLUDE.sub(repl, text)

    return inline(path.read_text())


def cflags(pin_dir: Path, defines: Mapping[str, int | str] | None = None) -> list[str]:
    """Compiler flags for one specialisation. Values come from typed config, never
    from pasted text: names are checked, integers stay integers, strings are quoted."""
    flags = [f'-DPCN_PIN_DIR="{pin_dir}"', "-w"]  # kernel headers are noisy under clang
    for name, value in sorted((defines or {}).items()):
        if not _DEFINE_NAME.match(name):
            raise CompileError(f"invalid define name {name!r}")
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise CompileError(f"define {name} must be an int or a str, got {type(value).__name__}")
        if isinstance(value, str):
            if '"' in value or "\\" in value or "\n" in value:
                raise CompileError(f"define {name} holds characters that cannot be quoted")
            flags.append(f'-D{name}="{value}"')
        else:
            flags.append(f"-D{name}={value}")
    return flags


def compile_cube(cube_type: str, pin_dir: Path,
                 defines: Mapping[str, int | str] | None = None) -> BpfModule:
    """Compile and load a cube type; returns the bcc.BPF module."""
    return compile_bundle((cube_type,), pin_dir, defines)


def compile_bundle(cube_types: Sequence[str], pin_dir: Path,
                   defines: Mapping[str, int | str] | None = None) -> BpfModule:
    """Compile several cube types into one bcc.BPF module (see bundle_text)."""
    from bcc import BPF  # imported late: unit tests of pure code need no kernel

    what = "+".join(cube_types)
    text = bundle_text(cube_types)
    try:
        with _COMPILE_LOCK:
            start = time.monotonic()
            module: BpfModule = BPF(text=text, cflags=cflags(pin_dir, defines))
    except Exception as exc:  # bcc raises plain Exception
        raise CompileError(f"BCC could not compile cube type {what!r}: {exc}") from exc
    log.info("compiled %s in %.0f ms", what, (time.monotonic() - start) * 1000)
    return module
