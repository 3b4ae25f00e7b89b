"""pcn-agent: the node agent (one per node, a DaemonSet in a cluster).

kopf handlers only record what they see and wake the reconcile loop; the loop
runs the pure reconciler, applies its plan to the node's data plane in a
worker thread, then writes status, Events and derived NodePortRules.

Configuration comes from the environment, as a DaemonSet gives it:
  NODE_NAME        this node's name (required)
  PCN_NETNS        network namespace of the node's data plane (labs; default: own)
  PCN_CONFIG       cluster settings: a JSON file or a mounted ConfigMap directory
  PCN_SOCKET       local API socket for the CNI plugin (default /run/pcn/agent.sock)
  PCN_METRICS_PORT Prometheus metrics port (default 9090; 0 disables)
  PCN_KUBE_URL     API server URL (labs/tests; else in-cluster or kubeconfig)
  PCN_BPF_ROOT / PCN_STATE_DIR  where maps are pinned / state is saved
  PCN_NAMESPACE    where the per-node status ConfigMap is written (default pcn-system)

Also, as commands of the agent's image (they talk to the running agent):
  pcn-agent capture POD -n NS [-f FILTER] [-c N] [--duration S] [-w FILE]
  pcn-agent flows POD -n NS

Start-up order: the node's cube types are compiled (the bulk of a start)
from the first moment, in a thread, while kopf and the Kubernetes client are
imported and the cluster is listed: compiling needs only the node's name.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pcn_agent.control.prepare import start_prepare


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pcn-agent", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--node-name", help="this node's name (default: $NODE_NAME)")
    ap.add_argument("--netns", help="network namespace of the node's data plane")
    ap.add_argument("--liveness", default=os.environ.get("PCN_LIVENESS", "http://0.0.0.0:8081/healthz"),
                    help="health endpoint URL (default %(default)s; '' disables)")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--ready", action="store_true",
                    help="do not run: ask the agent serving PCN_SOCKET whether its data plane "
                         "is ready (exit 0) or not (exit 1); the DaemonSet's readiness probe")
    return ap


def ready(socket_path: str) -> int:
    """0 when the agent at `socket_path` answers the local API's status op
    with ready (its data plane built, pods can be attached), else 1 with
    the reason on stderr. A live agent whose data plane is not built (no
    pod CIDR yet, a bad setting, a failed compile) is alive but not ready:
    the CNI plugin could not attach a pod there."""
    from pcn_agent.cni import localapi

    try:
        status = localapi.call(socket_path, {"op": "status"}, timeout=5.0)
    except localapi.LocalApiError as exc:
        print(f"pcn-agent: not ready: {exc}", file=sys.stderr)
        return 1
    if not status.get("ready"):
        print(f"pcn-agent: not ready: the agent on {status.get('node')} has not built its "
              "data plane yet (see its log)", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("capture", "flows"):  # client commands of the agent's image
        from pcn_agent.control import observecli

        return observecli.main(argv)
    args = parser().parse_args(argv)
    if args.ready:
        return ready(os.environ.get("PCN_SOCKET", "/run/pcn/agent.sock"))
    if args.node_name:
        os.environ["NODE_NAME"] = args.node_name
    if args.netns:
        os.environ["PCN_NETNS"] = args.netns
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    node = os.environ.get("NODE_NAME")
    if not node:
        print("pcn-agent: NODE_NAME is not set; pass --node-name or set NODE_NAME",
              file=sys.stderr)
        return 2
    prepared = start_prepare(node, os.environ.get("PCN_NETNS") or None)
    from pcn_agent.control import (
        agent,  # kopf and the Kubernetes client: most of a second, compiling meanwhile
    )

    return agent.run(args.liveness or None, args.verbose, prepared)


if __name__ == "__main__":
    sys.exit(main())
