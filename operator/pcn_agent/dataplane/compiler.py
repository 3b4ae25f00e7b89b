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
    return inline_headers(path.read_text(), path.name, seen)


def inline_headers(text: str, what: str, seen: set[str] | None = None) -> str:
    """`text` with each `#include "NAME"` of bpf/include/ replaced by the
    header (itself inlined), each header once (`seen` holds those already
    in). CompileError naming `what` for a header that does not exist."""
    seen = set() if seen is None else seen

    def inline(text: str) -> str:
        def repl(m: re.Match[str]) -> str:
            name = m.group(1)
            if name in seen:
                return ""
            seen.add(name)
            header = INCLUDE_DIR / name
            if not header.is_file():
                raise CompileError(f"{what}: header {name} not found in {INCLUDE_DIR}")
            return f"/* --- {name} --- */\n" + inline(header.read_text()) + "\n"

        return _INCLUDE.sub(repl, text)

    return inline(text)


# Not -w (which this once passed): an implicit function declaration is a
# misspelt helper (`pcn_cube_parm` in a CubeType), and under -w clang emits a
# call to a function that does not exist, which the kernel then refuses with
# "jump out of range" at no source line. -Werror= makes it a compile error at
# its line, but -w silences even that, so instead the three warnings every
# compile gives are turned off by name: the kernel headers BCC includes
# (ignored 'nocf_check' attributes in asm/ibt.h, duplicate address-space
# specifiers in asm/current.h and asm/processor.h) and BCC's map helpers,
# which take non-const keys (a const key pointer warns). With these, entry,
# every cube of bpf/ and sock_lb compiled without a warning (BCC 0.26's
# clang, kernel 6.18 headers); another warning only prints on the agent's stderr.
WARNING_FLAGS = ("-Wno-ignored-attributes", "-Wno-duplicate-decl-specifier",
                 "-Wno-incompatible-pointer-types-discards-qualifiers",
                 "-Werror=implicit-function-declaration")


def cflags(pin_dir: Path, defines: Mapping[str, int | str] | None = None) -> list[str]:
    """Compiler flags for one specialisation. Values come from typed config, never
    from pasted text: names are checked, integers stay integers, strings are quoted."""
    flags = [f'-DPCN_PIN_DIR="{pin_dir}"', *WARNING_FLAGS]
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


class SourceCompileError(CompileError):
    """A source text that BCC could not compile (stage "compile") or whose
    program the kernel's verifier refused (stage "verify"); `output` is what
    clang or the verifier wrote (diagnostics at /virtual/main.c lines, or the
    verifier's log)."""

    def __init__(self, stage: str, message: str, output: str) -> None:
        super().__init__(message)
        self.stage = stage
        self.output = output


def compile_source(text: str, pin_dir: Path, program: str,
                   defines: Mapping[str, int | str] | None = None) -> tuple[BpfModule, int]:
    """Compile a whole C text (not a file of bpf/) with `defines` (the
    runtime's: a text that includes a shared header sees its maps' sizes)
    and load its tc program `program`: the module and the program's fd. SourceCompileError with the
    diagnostics otherwise: BCC prints clang's and the verifier's messages on
    file descriptor 2 and raises a bare Exception, so fd 2 is redirected to
    a file for the compile and load (under the compile lock, which the
    agent's other compiles also take) and what it caught is written back to
    the real stderr afterwards, so no log line of another thread is lost."""
    import os
    import tempfile

    from bcc import BPF

    stage = "compile"
    with _COMPILE_LOCK, tempfile.TemporaryFile() as caught:
        saved = os.dup(2)
        os.dup2(caught.fileno(), 2)
        module: BpfModule | None = None
        try:
            start = time.monotonic()
            module = BPF(text=text, cflags=cflags(pin_dir, defines))
            stage = "verify"
            fd = module.load_func(program, int(BPF.SCHED_CLS)).fd
        except Exception as exc:  # bcc raises plain Exception
            failure: Exception | None = exc
        else:
            failure = None
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        caught.seek(0)
        output = caught.read().decode(errors="replace")
    if output:
        os.write(2, output.encode())
    if failure is not None:
        if module is not None:
            module.cleanup()
        raise SourceCompileError(stage, f"{failure}", output) from failure
    assert module is not None
    log.info("compiled %s in %.0f ms", program, (time.monotonic() - start) * 1000)
    return module, fd
