"""The holder of a node's mount namespace: started with
``ip netns exec <node> python -m pcn_lab.cluster.holder PLAN READY``, it
runs the node's mount plan (pcn_lab.cluster.node.mount_plan, a JSON list of
argument lists), writes its pid to READY and then sleeps until SIGTERM.
Every daemon of the node enters its namespaces with
``nsenter -t <holder pid> -m -n``. When the plan fails it writes
``error: <message>`` to READY and exits 1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    plan, ready = json.loads(Path(args[0]).read_text()), Path(args[1])
    for cmd in plan:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            ready.write_text(f"error: {' '.join(cmd)}: {r.stderr.strip()}\n")
            return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ready.write_text(f"{os.getpid()}\n")
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())
