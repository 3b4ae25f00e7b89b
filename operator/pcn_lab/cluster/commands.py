"""`pcn-lab status | exec | check | down` on a real-cluster lab (the
emulated lab's commands in pcn_lab.cli hand over here when
``<lab dir>/cluster.json`` exists)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pcn_lab.cluster import cleanup, kubectl, runner
from pcn_lab.cluster.state import ClusterState, orphans


def status(state: ClusterState) -> int:
    lay = state.layout
    print(f"cluster {lay.prefix}: {'ready' if state.ready else 'NOT ready'} "
          f"(step {state.step}{', error: ' + state.error if state.error else ''})")
    print(f"  API server https://127.0.0.1:{state.relay_port} (relay to "
          f"{lay.api_url_inside()})   kubeconfig {state.kubeconfig}")
    print(f"  data {lay.data}")
    for name in sorted(p.stem for p in lay.pids.glob("*.pid")) if lay.pids.is_dir() else []:
        pid = runner.pid_of(lay, name)
        print(f"  {name:<40} {'running' if pid and runner.alive(pid) else 'STOPPED'} "
              f"(pid {pid})")
    if not state.relay_port:
        return 1
    rc = 0
    for args in (("get", "nodes", "-o", "wide"), ("get", "pods", "-A", "-o", "wide")):
        r = kubectl.run(state.kubeconfig, *args, check=False, timeout=20)
        print(r.stdout, end="")
        if r.returncode != 0:
            print(f"  API not reachable: {r.stderr.strip()}")
            rc = 1
    return rc if state.ready else 1


def exec_(state: ClusterState, pod: str, command: list[str], namespace: str | None) -> int:
    """`kubectl exec` into the pod (the kubeconfig's namespace unless given)."""
    if not command:
        print("pcn-lab: give a command after --, e.g. pcn-lab exec client -- ping -c1 "
              "10.244.2.11", file=sys.stderr)
        return 2
    ns = ["-n", namespace] if namespace else []
    return subprocess.call(kubectl.argv(state.kubeconfig, "exec", *ns, pod, "--", *command))


def down(state: ClusterState) -> int:
    runner.say(f"removing cluster {state.layout.prefix}")
    others = [o for o in orphans(state.layout.data.parent)
              if o.layout.prefix != state.layout.prefix and o.alive()]
    removed = cleanup.remove(cleanup.Teardown(state.layout, state.created_mountpoints,
                                              state.sysctls), others)
    procs = [r for r in removed if r.startswith("process ")]
    rest = [r for r in removed if not r.startswith("process ")]
    if procs:
        print(f"stopped {len(procs)} processes")
    for r in rest:
        print(f"removed {r}")
    left = cleanup.leftovers(state.layout)
    for f in (state.file, state.kubeconfig):
        f.unlink(missing_ok=True)
    if left:
        print(f"pcn-lab: left behind: {left}", file=sys.stderr)
        return 1
    print(f"cluster {state.layout.prefix} removed")
    return 0


def load(d: Path) -> ClusterState | None:
    return ClusterState.load(d)
