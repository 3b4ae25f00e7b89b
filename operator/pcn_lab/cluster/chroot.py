"""Run a command inside a root filesystem folder, the way a Dockerfile's RUN
runs in its stage: a chroot with its own /proc, /sys (read-only) and a small
/dev, in a private mount namespace and a PID namespace of its own.

``run(root, argv, ...)`` starts ``unshare --mount --pid --fork
--propagation private`` with this module as the child (``python -m
pcn_lab.cluster.chroot``), which mounts, chroots and execs ``argv``. Every
mount lives in the child's mount namespace, so they all vanish when the
command ends (also when it is killed): nothing is left mounted on the host.
The PID namespace ends every process the command left behind.

Build-only files (the host's resolv.conf for apt and pip, the host's CA
bundle for pip behind a TLS-inspecting proxy, an apt.conf) are bind-mounted
over placeholders that ``run`` creates and removes again, so they never end
up in the image, as with ``docker build``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

_DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


def _prepare(root: Path, binds: Sequence[tuple[str, str]]) -> None:
    """Mount /proc, /sys, /dev and the binds under ``root`` (in our own
    mount namespace: nothing propagates to the host)."""
    _mount("--make-rprivate", "/")
    _mount("-t", "proc", "proc", str(root / "proc"))
    _mount("-t", "sysfs", "-o", "ro,nosuid,nodev,noexec", "sysfs", str(root / "sys"))
    dev = root / "dev"
    _mount("-t", "tmpfs", "-o", "mode=755,nosuid", "tmpfs", str(dev))
    for node in _DEV_NODES:
        (dev / node).touch()
        _mount("--bind", f"/dev/{node}", str(dev / node))
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, dev / name)
    (dev / "shm").mkdir()
    _mount("-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "shm", str(dev / "shm"))
    (dev / "pts").mkdir()
    _mount("-t", "devpts", "-o", "newinstance,ptmxmode=0666,mode=620", "devpts", str(dev / "pts"))
    os.symlink("pts/ptmx", dev / "ptmx")
    for source, target in binds:
        _mount("--bind", source, str(root / target.lstrip("/")))


def run(root: Path, argv: Sequence[str], *, env: Mapping[str, str], workdir: str = "/",
        binds: Mapping[str, str] | None = None, output: IO[bytes] | None = None) -> None:
    """Run ``argv`` in ``root`` with exactly ``env``, in ``workdir`` (created
    when missing). ``binds`` maps a host file to a path inside the root; a
    placeholder is created for a missing target and removed afterwards.
    The command's output goes to ``output`` (default: ours).
    Raises subprocess.CalledProcessError when the command fails."""
    created: list[Path] = []
    bind_args: list[str] = []
    try:
        for source, target in (binds or {}).items():
            path = root / target.lstrip("/")
            if path.is_symlink():
                raise ValueError(f"{path} is a symbolic link: cannot bind {source} over it")
            missing_parents = [p for p in reversed(path.parents) if not p.exists() and root in p.parents]
            for parent in missing_parents:
                parent.mkdir()
                created.append(parent)
            if not path.exists():
                path.touch()
                created.append(path)
            bind_args += ["--bind", f"{source}:{target}"]
        (root / workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
        cmd = ["unshare", "--mount", "--pid", "--fork", "--propagation", "private", "--",
               sys.executable, "-m", "pcn_lab.cluster.chroot", "--root", str(root),
               "--workdir", workdir, *bind_args, "--", *argv]
        subprocess.run(cmd, check=True, env=dict(env), stdin=subprocess.DEVNULL, stdout=output,
                       stderr=subprocess.STDOUT if output is not None else None)
    finally:
        for path in reversed(created):
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink(missing_ok=True)


def main(args: Sequence[str] | None = None) -> None:
    """The child: mount, chroot, exec. Not for direct use."""
    parser = argparse.ArgumentParser(prog="python -m pcn_lab.cluster.chroot")
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--workdir", default="/")
    parser.add_argument("--bind", action="append", default=[], help="SOURCE:TARGET")
    parser.add_argument("argv", nargs="+")
    opts = parser.parse_args(args)
    binds = [tuple(b.split(":", 1)) for b in opts.bind]
    _prepare(opts.root, binds)  # type: ignore[arg-type]
    env = dict(os.environ)
    os.chroot(opts.root)
    os.chdir(opts.workdir)
    try:
        os.execvpe(opts.argv[0], opts.argv, env)
    except OSError as exc:
        sys.exit(f"cannot run {opts.argv[0]} in {opts.root}: {exc}")


if __name__ == "__main__":
    main()
