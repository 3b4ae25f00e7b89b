"""Building pcn-cni's C launcher (launcher.c, next to this file) and the
Python plugin it falls back to.

The launcher is what the container runtime runs as the "pcn" plugin: it hands
each invocation to the agent (pcn_agent.control.localapi.CniService) and execs
`<launcher>-python`, the reference plugin, only when the agent cannot take
it (launcher.c says when and why). It is linked statically: like the CNI
bundle (manifests/cni/bundle.py) it runs on the host, whatever the host's C
library, and it starts in ~1 ms.

Used by `make setup` (scripts/setup.sh), the lab's kubelet stand-in
(pcn_lab.kubelet), the tests and the image build (manifests/Dockerfile,
through manifests/cni/bundle.py). Not imported by the plugin itself.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("launcher.c")
CC = os.environ.get("CC", "cc")
CFLAGS = ("-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-static")
FALLBACK_SUFFIX = "-python"


class BuildError(RuntimeError):
    pass


def compile_launcher(out: Path) -> Path:
    """Compile launcher.c into the executable `out` (replaced atomically, so a
    running ADD never sees half a file) unless it is newer than the source.
    Raises BuildError with the compiler's output; needs a C compiler and
    static glibc (Debian: gcc, libc6-dev)."""
    if out.exists() and out.stat().st_mtime >= SOURCE.stat().st_mtime:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    try:
        r = subprocess.run([CC, *CFLAGS, "-o", str(tmp), str(SOURCE)], capture_output=True,
                           text=True, check=False)
    except FileNotFoundError:
        raise BuildError(f"no C compiler {CC!r} to build pcn-cni's launcher: install gcc and "
                         f"libc6-dev (make setup does)") from None
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"compiling {SOURCE} failed:\n{r.stderr.strip()}")
    os.replace(tmp, out)
    return out


def write_fallback(launcher: Path, command: list[str]) -> Path:
    """Write `<launcher>-python`, the /bin/sh script the launcher execs when
    the agent cannot take an invocation: `command` (the Python plugin's
    command line) with the launcher's arguments. Replaced atomically."""
    path = launcher.with_name(launcher.name + FALLBACK_SUFFIX)
    text = ("#!/bin/sh\n"
            "# pcn-cni's Python plugin, the reference implementation: run by the launcher\n"
            f"# {launcher.name} when the pcn agent cannot take an invocation.\n"
            f"exec {shlex.join(command)} \"$@\"\n")
    if not path.exists() or path.read_text() != text:
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(text)
        tmp.chmod(0o755)
        os.replace(tmp, path)
    return path
