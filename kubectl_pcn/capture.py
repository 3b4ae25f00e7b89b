"""`kubectl pcn capture` and the way to a pod's node agent that it and
`kubectl pcn flows` share.

The agent image has the commands `pcn-agent capture` and `pcn-agent flows`
(they talk to the node's agent on its local socket). On a cluster, they run
in the pcn-agent pod of the pod's node through `kubectl exec -i` (as
`kubectl sniff` runs tcpdump in a pod), pcap streaming back on stdout and
progress on stderr. In the emulated lab (`pcn-lab up`), the agents are
processes of this machine whose sockets sit next to the lab's kubeconfig
(`<dir>/<node>.sock`): the same commands run here, on those sockets.

Our stdin pipe stays open for as long as we want the capture: when it
closes (we exit, or are interrupted), the command in the agent pod sees EOF
and ends the capture; if the connection dies without it, the agent stops
the capture once its heartbeats stop.

Permissions on a cluster (RBAC): `get` on the pod in its namespace (to find
its node), `list` on pods in the agents' namespace (to find that node's
pcn-agent pod), and `kubectl exec`'s own: `create` on `pods/exec` there, and
`get` too for kubectl's WebSocket exec (the API server authorizes the
upgrade as `get`, and since Kubernetes 1.35 also as `create`: feature
AuthorizePodWebsocketUpgradeCreatePermission, kubernetes#133515). Exec into
the agent is root on the node's network: grant it to whom you would grant
that. EXEC_ROLE is an example; a denied exec is reported naming it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

from .client import PODS, Cluster
from .errors import Forbidden, PcnError

AGENT_LABEL = "app.kubernetes.io/name=pcn-agent"
AGENT_CONTAINER = "agent"
AGENT_COMMAND = "pcn-agent"


# The least a user of `kubectl pcn capture` and `flows` needs on a cluster
# (the agents' namespace is pcn-system unless --system-namespace says else).
EXEC_ROLE = """\
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: pcn-observe, namespace: pcn-system}
rules:
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list]
- apiGroups: [""]
  resources: [pods/exec]
  verbs: [get, create]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: pcn-observe, namespace: pcn-system}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: pcn-observe}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: alice}
"""


@dataclass(frozen=True)
class Route:
    """How to run a command of the agent image for one node: `argv` prefix
    (the command itself last) and extra environment."""

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    via: str = ""  # for messages: "lab socket ..." or "pod pcn-system/pcn-agent-xyz"
    exec_namespace: str = ""  # through `kubectl exec` into a pod of this namespace; "": not


def exec_denied(r: Route, stderr: str) -> Forbidden | None:
    """The error to raise when `stderr` of a command run through `r` says
    that kubectl exec was refused by RBAC (kubectl prints the API server's
    403: `Error from server (Forbidden): pods "..." is forbidden: User "..."
    cannot create resource "pods/exec" ...`), else None."""
    if not r.exec_namespace:
        return None
    lines = [ln.strip() for ln in stderr.splitlines() if "forbidden" in ln.lower()]
    if not lines:
        return None
    ns = r.exec_namespace
    return Forbidden(
        f"forbidden: RBAC does not let you exec into {r.via}: `kubectl pcn capture` and "
        f"`flows` run `kubectl exec` there, which needs the verbs get and create on "
        f"pods/exec in namespace {ns} ({lines[0]})",
        f"ask a cluster admin for a Role in namespace {ns} granting get and create on "
        f"pods/exec (and get, list on pods), bound to you; `kubectl pcn capture --help` shows "
        f"one. Check with: kubectl auth can-i create pods/exec -n {ns}")


def pod_node(cluster: Cluster, namespace: str, name: str) -> str:
    pod = cluster.get(PODS, namespace, name)
    if pod is None:
        raise PcnError(f"pod {namespace}/{name} not found",
                       f"list them with: kubectl get pods -n {namespace}")
    node = (pod.get("spec") or {}).get("nodeName")
    if not node:
        raise PcnError(f"pod {namespace}/{name} is not scheduled on a node yet")
    if (pod.get("spec") or {}).get("hostNetwork"):
        raise PcnError(f"pod {namespace}/{name} uses the host's network: pcn does not carry "
                       f"its traffic, so there is nothing to capture or account")
    return str(node)


def _local_agent_command() -> list[str]:
    here = Path(sys.executable).parent / AGENT_COMMAND
    if here.exists():
        return [str(here)]
    found = shutil.which(AGENT_COMMAND)
    if found:
        return [found]
    return [sys.executable, "-m", "pcn_agent.control.cli"]


def route(cluster: Cluster, node: str, agents_namespace: str,
          kubectl_args: Sequence[str] = ()) -> Route:
    """The lab's socket for `node` when there is one next to the
    kubeconfig, else `kubectl exec` into the node's pcn-agent pod."""
    sock = Path(cluster.config_file.split(os.pathsep)[0]).parent / f"{node}.sock"
    if sock.is_socket():
        return Route(tuple(_local_agent_command()), (("PCN_SOCKET", str(sock)),),
                     f"the lab's agent socket {sock}")
    agents = [p for p in cluster.list(PODS, agents_namespace, label_selector=AGENT_LABEL)
              if (p.get("spec") or {}).get("nodeName") == node]
    running = [p for p in agents if (p.get("status") or {}).get("phase") == "Running"]
    if not running:
        raise PcnError(f"no running pcn-agent pod on node {node} (namespace "
                       f"{agents_namespace}, label {AGENT_LABEL})",
                       f"check: kubectl get pods -n {agents_namespace} -o wide")
    name = running[0]["metadata"]["name"]
    kubectl = shutil.which("kubectl") or "kubectl"
    return Route((kubectl, *kubectl_args, "exec", "-i", "-n", agents_namespace, name, "-c",
                  AGENT_CONTAINER, "--", AGENT_COMMAND), (),
                 f"pod {agents_namespace}/{name}", agents_namespace)


def kubectl_flags(kubeconfig: str | None, context: str | None) -> list[str]:
    out = []
    if kubeconfig:
        out += ["--kubeconfig", kubeconfig]
    if context:
        out += ["--context", context]
    return out


def capture_argv(r: Route, namespace: str, pod: str, filter_: str, count: int,
                 duration: float, snaplen: int, budget: int, verbose: bool,
                 fmt: str = "pcapng") -> list[str]:
    """`pcn-agent capture`'s command line; `fmt` pcapng or pcap (observecli.FORMATS)."""
    argv = [*r.argv, "capture", pod, "-n", namespace, "-f", filter_, "-c", str(count),
            "--duration", f"{duration:g}", "-s", str(snaplen), "--budget", str(budget), "-w", "-",
            "--format", fmt, "--stop-on-stdin-eof"]
    return [*argv, "-v"] if verbose else argv


def _relay(src: IO[bytes], dst: BinaryIO, kept: deque[str]) -> None:
    """Copy `src` to `dst` line by line as it comes (the command's progress),
    keeping its last lines in `kept`."""
    for line in iter(src.readline, b""):
        kept.append(line.decode(errors="replace"))
        try:
            dst.write(line)
            dst.flush()
        except (OSError, ValueError):
            pass


def run_capture(r: Route, argv: Sequence[str], out: BinaryIO,
                err: BinaryIO | None = None) -> int:
    """Run the capture command, pcap to `out`, its stderr to `err` (ours by
    default); our end of its stdin stays open until it ends (closing it
    stops the capture). Returns its exit status; raises Forbidden when
    kubectl exec was refused (exec_denied)."""
    env = {**os.environ, **dict(r.env)}
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env)
    except FileNotFoundError:
        raise _not_found(argv[0]) from None
    assert proc.stdout is not None and proc.stdin is not None and proc.stderr is not None
    kept: deque[str] = deque(maxlen=20)
    relay = threading.Thread(target=_relay, args=(proc.stderr, err or sys.stderr.buffer, kept),
                             daemon=True)
    relay.start()
    try:
        while True:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            out.write(chunk)
            out.flush()
    except KeyboardInterrupt:
        pass  # the command ends the capture when its stdin closes, below
    except BrokenPipeError:
        pass  # whoever read our pcap went away
    finally:
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            rest = proc.stdout.read()
            if rest:
                out.write(rest)
                out.flush()
        except (OSError, ValueError, KeyboardInterrupt):
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        relay.join(timeout=5)
    if proc.returncode:
        denied = exec_denied(r, "".join(kept))
        if denied is not None:
            raise denied
    return proc.returncode


def _relay_progress(src: IO[bytes], dst: BinaryIO, kept: list[bytes]) -> None:
    """Keep every line of `src` (the command's stderr) in `kept`; copy its
    progress lines (those ending in "...", as `pcn-agent flows` writes them
    while the agent is busy) to `dst` as they come."""
    for line in iter(src.readline, b""):
        kept.append(line)
        if line.rstrip().endswith(b"..."):
            try:
                dst.write(line)
                dst.flush()
            except (OSError, ValueError):
                pass


def run_json(r: Route, argv: Sequence[str], err: BinaryIO | None = None,
             timeout: float = 120.0) -> dict[str, Any]:
    """Run a command that prints JSON (flows); its progress lines go to
    `err` (our stderr by default) as they come; raise PcnError with its
    stderr when it fails or takes more than `timeout` seconds."""
    import json

    env = {**os.environ, **dict(r.env)}
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env)
    except FileNotFoundError:
        raise _not_found(argv[0]) from None
    assert proc.stderr is not None and proc.stdout is not None
    kept: list[bytes] = []
    relay = threading.Thread(target=_relay_progress,
                             args=(proc.stderr, err or sys.stderr.buffer, kept), daemon=True)
    relay.start()
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        proc.kill()

    timer = threading.Timer(timeout, expire)
    timer.start()
    try:
        out = proc.stdout.read()
        proc.wait()
    finally:
        timer.cancel()
        relay.join(timeout=5)
    if expired.is_set():
        raise PcnError(f"{' '.join(argv[-4:])} through {r.via} did not answer within "
                       f"{timeout:g} s")
    if proc.returncode != 0:
        msg = b"".join(kept).decode(errors="replace").strip() or \
            f"exit status {proc.returncode}"
        denied = exec_denied(r, msg)
        if denied is not None:
            raise denied
        raise PcnError(f"{' '.join(argv[-4:])} through {r.via} failed: {msg}")
    data: dict[str, Any] = json.loads(out)
    return data


def _not_found(exe: str) -> PcnError:
    return PcnError(f"{exe} not found: kubectl pcn runs kubectl (exec into the node's pcn-agent "
                    f"pod) for this verb", "put kubectl on PATH")
