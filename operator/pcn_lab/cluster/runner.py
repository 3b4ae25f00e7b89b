"""Starting, finding and stopping the cluster's processes.

Every process is started detached (its own session: it outlives `pcn-lab
up`), with its output in logs/<name>.log, its pid in pids/<name>.pid and
the lab's marker (layout.MARKER=<prefix>) in its environment, so that
`down` finds it by pid file or, after a crash, by scanning /proc. A node's
daemons run in the node's network and mount namespaces, entered with
``nsenter -t <holder pid> -m -n --`` (util-linux), which execs them: the pid
is the daemon's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pcn_lab.cluster.layout import MARKER, Layout
from pcn_lab.supervisor import alive

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def say(msg: str) -> None:
    print(f"==> {msg}", file=sys.stderr, flush=True)


def in_node(holder_pid: int, argv: list[str]) -> list[str]:
    """`argv` run in the namespaces of the node held by `holder_pid`."""
    return ["nsenter", "-t", str(holder_pid), "-m", "-n", "--", *argv]


def environment(layout: Layout, bin_dir: Path | None = None,
                extra: dict[str, str] | None = None) -> dict[str, str]:
    """A clean environment with the lab's marker and the built binaries first
    on PATH (containerd finds containerd-shim-runc-v2 there)."""
    path = f"{bin_dir}:{PATH}" if bin_dir else PATH
    return {"PATH": path, "HOME": "/root", MARKER: layout.prefix, "LANG": "C.UTF-8",
            **(extra or {})}


def start(layout: Layout, name: str, argv: list[str], env: dict[str, str]) -> int:
    """Start `argv` detached; returns its pid (also in pids/<name>.pid)."""
    layout.logs.mkdir(parents=True, exist_ok=True)
    layout.pids.mkdir(parents=True, exist_ok=True)
    with open(layout.logs / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True, cwd="/")
    (layout.pids / f"{name}.pid").write_text(f"{proc.pid}\n")
    return proc.pid


def pid_of(layout: Layout, name: str) -> int | None:
    f = layout.pids / f"{name}.pid"
    try:
        return int(f.read_text())
    except (OSError, ValueError):
        return None


def marked(prefix: str, proc_root: Path = Path("/proc")) -> list[int]:
    """Pids of the processes whose environment carries the lab's marker."""
    want = f"{MARKER}={prefix}".encode()
    found = []
    for d in proc_root.iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes()
        except OSError:
            continue
        if want in env.split(b"\0"):
            found.append(int(d.name))
    return found


def kill_all(pids: set[int], grace: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL what is left after `grace` seconds; returns the
    pids that were alive."""
    mine = {os.getpid(), os.getppid()}
    live = [p for p in pids if p not in mine and alive(p)]
    for p in live:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(p) for p in live):
        time.sleep(0.1)
    for p in live:
        if alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return live


def log_tail(layout: Layout, name: str, lines: int = 15) -> str:
    try:
        text = (layout.logs / f"{name}.log").read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def wait_for(what: str, ready: Callable[[], bool], timeout: float,
             failed: Callable[[], str | None] | None = None, every: float = 0.5) -> float:
    """Poll `ready` until true; `failed` returns a reason to stop early. A
    progress line every 10 s. Returns the seconds it took; raises
    RuntimeError on timeout or failure."""
    t0 = time.monotonic()
    next_note = t0 + 10
    while True:
        if ready():
            return time.monotonic() - t0
        why = failed() if failed else None
        if why:
            raise RuntimeError(f"{what}: {why}")
        now = time.monotonic()
        if now - t0 > timeout:
            raise RuntimeError(f"{what}: not ready after {timeout:.0f} s")
        if now >= next_note:
            say(f"still waiting for {what} ({now - t0:.0f} s)")
            next_note = now + 10
        time.sleep(every)
