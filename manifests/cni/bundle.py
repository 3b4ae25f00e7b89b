#!/usr/bin/env python3
"""Build the self-contained runtime of the pcn CNI plugin (run once, at image build).

The container runtime executes CNI plugins on the host, outside every
container, so `pcn-cni` can rely neither on the image's Python (not on the
host's file system) nor on the host's (absent on many nodes, or of another
version). This script gathers everything `pcn-cni` needs
into one relocatable directory:

  bin/python3      the interpreter running this script (the venv's base Python)
  lib/             its dynamic loader and every shared library that the
                   interpreter and the kept extension modules link, glibc included
  lib/python3.X/   the standard library, without tests, IDLE, tkinter, ...
  site/            the package pcn-cni imports: pcn_agent.cni (standard library
                   only, its netlink is pcn_agent.cni.rtnl: no pyroute2), with
                   pcn_agent's __init__ and nothing else of the agent
  cni/             the reference CNI plugins pcn delegates to (host-local, loopback
                   from Debian's containernetworking-plugins: linked against
                   glibc 2.34+, so they too run on the bundle's loader)
  pcn-cni.py       the entry point of the Python plugin
  pcn-cni          pcn-cni's C launcher (pcn_agent/cni/launcher.c, linked
                   statically: it runs on any host of the CPU architecture), which
                   hands each invocation to the agent and execs the Python plugin
                   (installed next to it as <launcher>-python) when the agent
                   cannot take it
  bundle.json      id (a hash of the content), loader, python, entry, launcher,
                   cniPlugins

It is started as
  <dir>/lib/<loader> --library-path <dir>/lib <dir>/bin/python3 -I -S <dir>/pcn-cni.py
so the bundle's own loader and glibc run it: it works on any host of the same
CPU architecture whatever its libc or Python, and it needs no fixed path
(Python finds its standard library next to its executable). install.py copies
it to the host, installs the C launcher as /opt/cni/bin/pcn and writes
/opt/cni/bin/pcn-python, the /bin/sh script that runs that line.

Usage: python bundle.py OUT [--package NAME ...] [--cni-plugin PATH ...] [--no-check]
"""

from __future__ import annotations

import argparse
import compileall
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

PACKAGES = ("pcn_agent.cni",)  # with its parents' __init__ only: the agent stays out
CNI_PLUGINS = ("/usr/lib/cni/host-local", "/usr/lib/cni/loopback")
# Modules pcn-cni must be able to import from the bundle (checked after the build).
SMOKE_IMPORTS = ("pcn_agent.cni.commands", "pcn_agent.cni.localapi", "pcn_agent.cni.rtnl",
                 "ctypes", "ssl", "json", "select", "socket", "subprocess", "zlib")
# Parts of the standard library that a CNI plugin never imports.
STDLIB_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "turtle.py", "ensurepip", "lib2to3",
               "pydoc_data", "venv", "site-packages", "dist-packages", "__phello__"}
# Extension modules that pcn-cni never loads and that would pull libraries in.
DYNLOAD_SKIP = re.compile(r"^(_dbm|_gdbm|_sqlite3|readline|_curses|_curses_panel|nis|_tkinter"
                          r"|_test\w*|_ctypes_test|xxlimited\w*|_xx\w*|xxsubtype)\.")
LDD_RESOLVED = re.compile(r"^\s*(\S+)\s+=>\s+(\S+)\s+\(0x[0-9a-f]+\)\s*$")
LDD_MISSING = re.compile(r"^\s*(\S+)\s+=>\s+not found\s*$")
LDD_LOADER = re.compile(r"^\s*(/\S+)\s+\(0x[0-9a-f]+\)\s*$")


class BundleError(RuntimeError):
    pass


def base_python() -> Path:
    """The real interpreter binary behind this (possibly virtualenv) Python."""
    exe = getattr(sys, "_base_executable", None) or sys.executable
    return Path(os.path.realpath(exe))


def elf_deps(files: list[Path]) -> tuple[dict[str, Path], Path]:
    """Shared libraries (soname -> file) and the dynamic loader of `files`, from ldd."""
    libs: dict[str, Path] = {}
    loader: Path | None = None
    for f in files:
        out = subprocess.run(["ldd", str(f)], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise BundleError(f"ldd {f} failed: {out.stderr.strip() or out.stdout.strip()}")
        for line in out.stdout.splitlines():
            if m := LDD_MISSING.match(line):
                raise BundleError(f"{f} needs {m.group(1)}, which is not installed: install the "
                                  f"Debian package that ships it, or skip that module")
            if m := LDD_RESOLVED.match(line):
                libs[m.group(1)] = Path(m.group(2))
            elif m := LDD_LOADER.match(line):
                loader = Path(m.group(1))
    if loader is None:
        raise BundleError(f"ldd named no dynamic loader for {files[0]}")
    return libs, loader


def _skip_stdlib(top: Path):
    def ignore(directory: str, names: list[str]) -> set[str]:
        skipped: set[str] = set()
        if Path(directory) == top:
            skipped |= {n for n in names if n in STDLIB_SKIP or n.startswith("config-")}
        if Path(directory).name == "lib-dynload":
            skipped |= {n for n in names if DYNLOAD_SKIP.match(n)}
        return skipped
    return ignore


def _tree_hash(root: Path, exclude: str) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != exclude:
            h.update(str(p.relative_to(root)).encode() + b"\0")
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


ENTRY = '''"""pcn CNI plugin, run from its self-contained bundle (manifests/cni/bundle.py)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "site"))
from pcn_agent.cni.commands import main  # noqa: E402

main()
'''


def build(out: Path, packages: tuple[str, ...] = PACKAGES,
          cni_plugins: tuple[str, ...] = CNI_PLUGINS) -> dict[str, Any]:
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"{out} exists and is not empty")
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if stdlib.name != ver or not (stdlib / "os.py").is_file():
        raise BundleError(f"unexpected standard library location {stdlib}")
    (out / "bin").mkdir(parents=True, exist_ok=True)
    (out / "site").mkdir()
    (out / "cni").mkdir()
    python = out / "bin" / "python3"
    shutil.copy2(base_python(), python)
    shutil.copytree(stdlib, out / "lib" / ver, ignore=_skip_stdlib(stdlib),
                    ignore_dangling_symlinks=True)
    if not (out / "lib" / ver / "lib-dynload").is_dir():
        raise BundleError(f"{stdlib} has no lib-dynload directory")

    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise BundleError(f"package {name} is not importable by {sys.executable}")
        src = Path(list(spec.submodule_search_locations)[0])
        shutil.copytree(src, out / "site" / Path(*name.split(".")),
                        ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
        parent = name.rpartition(".")[0]
        while parent:  # a sub-package needs its parents' __init__, and nothing else of them
            pspec = importlib.util.find_spec(parent)
            if pspec is None or pspec.origin is None:
                raise BundleError(f"package {parent} is not importable by {sys.executable}")
            shutil.copy2(pspec.origin, out / "site" / Path(*parent.split(".")) / "__init__.py")
            parent = parent.rpartition(".")[0]

    for plugin in map(Path, cni_plugins):
        if not plugin.is_file():
            raise BundleError(f"CNI plugin {plugin} is missing: install containernetworking-plugins")
        shutil.copy2(plugin, out / "cni" / plugin.name)

    elves = [python, *sorted((out / "lib").rglob("*.so")), *sorted((out / "site").rglob("*.so")),
             *sorted((out / "cni").iterdir())]
    libs, loader = elf_deps(elves)
    for soname, path in sorted(libs.items()):
        shutil.copy2(os.path.realpath(path), out / "lib" / soname)
    shutil.copy2(os.path.realpath(loader), out / "lib" / loader.name)

    (out / "pcn-cni.py").write_text(ENTRY)
    from pcn_agent.cni import launcher as cni_launcher

    try:
        cni_launcher.compile_launcher(out / "pcn-cni")
    except cni_launcher.BuildError as exc:
        raise BundleError(str(exc)) from None
    for tree in (out / "lib" / ver, out / "site"):
        if not compileall.compile_dir(tree, quiet=1, workers=0):
            raise BundleError(f"byte-compiling {tree} failed")
    meta = {"id": _tree_hash(out, "bundle.json"), "python": "bin/python3",
            "loader": f"lib/{loader.name}", "entry": "pcn-cni.py", "launcher": "pcn-cni",
            "pythonVersion": ".".join(map(str, sys.version_info[:3])),
            "packages": list(packages), "cniPlugins": sorted(p.name for p in (out / "cni").iterdir())}
    (out / "bundle.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def command(bundle: Path, meta: dict[str, Any], program: str | None = None) -> list[str]:
    """The command line that runs the bundle's Python, or one of its programs,
    on the bundle's loader (arguments follow)."""
    run = [str(bundle / meta["loader"]), "--library-path", str(bundle / "lib")]
    if program is not None:
        return [*run, str(bundle / program)]
    return [*run, str(bundle / meta["python"]), "-I", "-S"]


def check(bundle: Path, meta: dict[str, Any]) -> None:
    """Import what pcn-cni needs, and ask each CNI plugin its VERSION, with the
    bundle alone and an empty environment."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            + "; ".join(f"import {m}" for m in SMOKE_IMPORTS)
            + "; print(sys.prefix)")
    out = subprocess.run([*command(bundle, meta), "-c", code, str(bundle / "site")],
                         capture_output=True, text=True, env={}, check=False)
    if out.returncode != 0 or out.stdout.strip() != str(bundle):
        raise BundleError(f"the bundle does not run on its own (exit {out.returncode}): "
                          f"{out.stderr.strip()[-2000:] or out.stdout.strip()}")
    for name in meta["cniPlugins"]:
        out = subprocess.run(command(bundle, meta, f"cni/{name}"), input='{"cniVersion":"1.0.0"}',
                             capture_output=True, text=True, env={"CNI_COMMAND": "VERSION"},
                             check=False)
        if out.returncode != 0 or "supportedVersions" not in out.stdout:
            raise BundleError(f"CNI plugin {name} does not run from the bundle: "
                              f"{out.stderr.strip() or out.stdout.strip()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="directory to create")
    ap.add_argument("--package", action="append", dest="packages",
                    help=f"package to include (repeatable; default {', '.join(PACKAGES)})")
    ap.add_argument("--cni-plugin", action="append", dest="plugins",
                    help=f"CNI plugin binary to include (repeatable; default "
                         f"{', '.join(CNI_PLUGINS)})")
    ap.add_argument("--no-check", action="store_true", help="skip the smoke test")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    try:
        meta = build(out, tuple(args.packages or PACKAGES), tuple(args.plugins or CNI_PLUGINS))
        if not args.no_check:
            check(out, meta)
    except (BundleError, OSError) as exc:
        print(f"bundle: {exc}", file=sys.stderr)
        return 1
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"bundle: {out} id {meta['id']}, {size / 2**20:.0f} MiB, loader {meta['loader']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
