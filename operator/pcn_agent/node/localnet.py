"""Loopback hostPorts past kubelet's localnet guard.

kubelet installs in every node's filter table (pkg/kubelet/
kubelet_network_linux.go, for kubernetes/kubernetes#90259)::

    -A INPUT -j KUBE-FIREWALL
    -A OUTPUT -j KUBE-FIREWALL
    -A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment
       "block incoming localnet connections" -m conntrack
       ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP

A connection from a node address to a hostPort on 127.0.0.1 (upstream's
HostPort conformance test runs ``curl --interface <node IP>
http://127.0.0.1:<port>`` on the node) is translated by pcn at lo's tc
egress, after OUTPUT, so conntrack never marks it DNAT (the exemption the
reference portmap plugin's nat-table DNAT gets) and the guard drops it.
pcn exempts exactly its loopback hostPorts instead: a chain
PCN-LOCALNET-HOSTPORTS, first in OUTPUT, accepting packets to 127.0.0.0/8
on those ports and protocols. OUTPUT only: the guard keeps protecting
INPUT, which is what #90259 is about (other hosts reaching the node's
localhost services through route_localnet).

Nothing is done on a node without the guard (no iptables backend, nft or
legacy, holds kubelet's rule); the backend is the one that holds it.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Iterable

log = logging.getLogger(__name__)

CHAIN = "PCN-LOCALNET-HOSTPORTS"
GUARD_CHAIN = "KUBE-FIREWALL"
GUARD_COMMENT = "block incoming localnet connections"
BACKENDS = ("iptables-nft", "iptables-legacy")


def restore_input(ports: Iterable[tuple[str, int]]) -> str:
    """The iptables-restore text (with --noflush: only this chain is
    replaced) that makes CHAIN accept exactly `ports` ((proto, port) pairs,
    proto "tcp" or "udp") to 127.0.0.0/8."""
    lines = ["*filter", f":{CHAIN} - [0:0]"]
    for proto, port in sorted(set(ports)):
        if proto not in ("tcp", "udp") or not 1 <= port <= 65535:
            raise ValueError(f"not a hostPort: {port}/{proto}")
        lines.append(f"-A {CHAIN} -d 127.0.0.0/8 -p {proto} -m {proto} --dport {port} "
                     f"-m comment --comment \"pcn hostPort on loopback\" -j ACCEPT")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _run(netns: str | None, argv: list[str], stdin: str | None = None
         ) -> subprocess.CompletedProcess[str]:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.run([*prefix, *argv], input=stdin, capture_output=True, text=True,
                          timeout=30, check=False)


def guard_backend(netns: str | None) -> str | None:
    """The iptables backend whose filter table holds kubelet's localnet
    guard in `netns` (None: this process's namespace), or None."""
    for backend in BACKENDS:
        if shutil.which(backend) is None:
            continue
        r = _run(netns, [backend, "-w", "-t", "filter", "-S", GUARD_CHAIN])
        if r.returncode == 0 and GUARD_COMMENT in r.stdout:
            return backend
    return None


def sync(netns: str | None, ports: Iterable[tuple[str, int]]) -> bool:
    """Make the exemption exactly `ports` (idempotent; no ports: an empty
    chain). Returns whether a guard was found. Raises RuntimeError with
    iptables' message when the backend refuses."""
    backend = guard_backend(netns)
    if backend is None:
        return False
    wanted = list(ports)
    r = _run(netns, [f"{backend}-restore", "-w", "--noflush"], restore_input(wanted))
    if r.returncode != 0:
        raise RuntimeError(f"{backend}-restore: {r.stderr.strip() or r.returncode}")
    if _run(netns, [backend, "-w", "-C", "OUTPUT", "-j", CHAIN]).returncode != 0:
        r = _run(netns, [backend, "-w", "-I", "OUTPUT", "1", "-j", CHAIN])
        if r.returncode != 0:
            raise RuntimeError(f"{backend} -I OUTPUT: {r.stderr.strip() or r.returncode}")
    log.info("localnet guard (%s): loopback hostPorts exempted: %s", backend,
             ", ".join(f"{p}/{proto}" for proto, p in sorted(set(wanted))) or "none")
    return True


def remove(netns: str | None) -> None:
    """Remove the chain and its jump, from every backend that has them."""
    for backend in BACKENDS:
        if shutil.which(backend) is None:
            continue
        while _run(netns, [backend, "-w", "-D", "OUTPUT", "-j", CHAIN]).returncode == 0:
            pass
        if _run(netns, [backend, "-w", "-F", CHAIN]).returncode == 0:
            _run(netns, [backend, "-w", "-X", CHAIN])
