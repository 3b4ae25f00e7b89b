"""Start-up in parallel: the node's runtime is opened and its cube types
compiled (the bulk of an agent's start) in a thread from the first moment,
while kopf and the Kubernetes client are imported and the cluster is listed.
This module loads in milliseconds: everything heavy is imported in the thread."""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pcn_agent.dataplane.cubes.lbrp import LbSizes
    from pcn_agent.dataplane.runtime import Runtime


def start_prepare(node_name: str, netns: str | None, pin_root: Path | None = None,
                  state_root: Path | None = None,
                  lb_sizes: LbSizes | None = None) -> concurrent.futures.Future[Runtime]:
    """Open the node's runtime and compile its cube types in a thread
    (pcn_agent.node.wiring.prepare_runtime); the roots default to PCN_BPF_ROOT / PCN_STATE_DIR,
    the service table sizes to the ConfigMap's (ClusterSettings.load(), read in
    the thread; the future holds its error if the ConfigMap is invalid)."""
    fut: concurrent.futures.Future[Runtime] = concurrent.futures.Future()

    def work() -> None:
        try:
            from pcn_agent.dataplane import bpffs
            from pcn_agent.dataplane.runtime import STATE_ROOT
            from pcn_agent.node.wiring import prepare_runtime

            if lb_sizes is None:
                from pcn_agent.control.settings import ClusterSettings

                sizes = ClusterSettings.load().lb_sizes
            else:
                sizes = lb_sizes
            fut.set_result(prepare_runtime(node_name, netns, pin_root or bpffs.DEFAULT_ROOT,
                                           state_root or STATE_ROOT, sizes))
        except BaseException as exc:
            fut.set_exception(exc)

    threading.Thread(target=work, name="pcn-prepare", daemon=True).start()
    return fut
