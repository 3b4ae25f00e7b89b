"""Services the way kube-proxy (iptables mode) writes them, for the references.

`ruleset()` renders an iptables-restore file with kube-proxy's chains and
rules for ClusterIP services: in the nat table KUBE-SERVICES (one match per
service port, in installation order, the NodePort jump last), a KUBE-SVC-*
chain per service port (masquerade mark for sources outside the cluster, then
one jump per endpoint with `-m statistic --mode random --probability 1/(n-i)`
but the last), a KUBE-SEP-* chain per endpoint (hairpin mark, DNAT), the
KUBE-MARK-MASQ/KUBE-POSTROUTING pair, and the jumps from PREROUTING and OUTPUT
(and POSTROUTING); in the filter table KUBE-FORWARD and friends. Chain names
are kube-proxy's own hashes (sha256 of the service port name and protocol,
and endpoint, base32, 16 characters), comments are kube-proxy's.

`load()` hands the file to iptables-restore inside a (node) namespace: one
transaction, as kube-proxy's full sync is. Never run it in the root namespace.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .netns import exec_in

MASQ_MARK = "0x4000"


@dataclass(frozen=True)
class ServicePort:
    namespace: str
    name: str
    port_name: str
    cluster_ip: str
    port: int
    protocol: str  # "tcp" or "udp"
    endpoints: tuple[tuple[str, int], ...]  # (pod IP, target port)

    @property
    def port_id(self) -> str:
        """kube-proxy's ServicePortName string: namespace/name:port."""
        return f"{self.namespace}/{self.name}:{self.port_name}"


def _hash(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def svc_chain(sp: ServicePort) -> str:
    return "KUBE-SVC-" + _hash(sp.port_id + sp.protocol)


def sep_chain(sp: ServicePort, ip: str, port: int) -> str:
    return "KUBE-SEP-" + _hash(sp.port_id + sp.protocol + f"{ip}:{port}")


def ruleset(services: Sequence[ServicePort], cluster_cidr: str) -> str:
    """The nat and filter tables kube-proxy would write for `services`."""
    nat_chains = ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"]
    rules = [
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" '
        '-j KUBE-POSTROUTING',
        f"-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}",
        f"-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
        f"-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully",
    ]
    per_service: list[str] = []
    for sp in services:
        svc = svc_chain(sp)
        p = sp.protocol
        match = f"-m {p} -p {p} -d {sp.cluster_ip}/32 --dport {sp.port}"
        rules.append(f'-A KUBE-SERVICES -m comment --comment "{sp.port_id} cluster IP" '
                     f"{match} -j {svc}")
        if not sp.endpoints:
            continue  # kube-proxy rejects these in the filter table; none here
        nat_chains.append(svc)
        per_service.append(f'-A {svc} -m comment --comment "{sp.port_id} cluster IP" {match} '
                           f"! -s {cluster_cidr} -j KUBE-MARK-MASQ")
        n = len(sp.endpoints)
        for i, (ip, port) in enumerate(sp.endpoints):
            sep = sep_chain(sp, ip, port)
            nat_chains.append(sep)
            stat = (f"-m statistic --mode random --probability {1.0 / (n - i):0.10f} "
                    if i < n - 1 else "")
            per_service.append(f'-A {svc} -m comment --comment "{sp.port_id} -> {ip}:{port}" '
                               f"{stat}-j {sep}")
            per_service.append(f"-A {sep} -m comment --comment {sp.port_id} -s {ip}/32 "
                               f"-j KUBE-MARK-MASQ")
            per_service.append(f"-A {sep} -m comment --comment {sp.port_id} -m {p} -p {p} "
                               f"-j DNAT --to-destination {ip}:{port}")
    rules.append('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: '
                 'this must be the last rule in this chain" -m addrtype --dst-type LOCAL '
                 "-j KUBE-NODEPORTS")
    out = ["*nat", *(f":{c} ACCEPT [0:0]" for c in ("PREROUTING", "INPUT", "OUTPUT",
                                                     "POSTROUTING")),
           *(f":{c} - [0:0]" for c in nat_chains), *rules, *per_service, "COMMIT"]
    out += [
        "*filter",
        *(f":{c} ACCEPT [0:0]" for c in ("INPUT", "FORWARD", "OUTPUT")),
        *(f":{c} - [0:0]" for c in ("KUBE-NODEPORTS", "KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES",
                                    "KUBE-FORWARD", "KUBE-PROXY-FIREWALL")),
        '-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer '
        'firewall" -j KUBE-PROXY-FIREWALL',
        '-A INPUT -m comment --comment "kubernetes health check service ports" '
        "-j KUBE-NODEPORTS",
        '-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes '
        'externally-visible service portals" -j KUBE-EXTERNAL-SERVICES',
        '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer '
        'firewall" -j KUBE-PROXY-FIREWALL',
        '-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
        '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service '
        'portals" -j KUBE-SERVICES',
        '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes '
        'externally-visible service portals" -j KUBE-EXTERNAL-SERVICES',
        '-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer '
        'firewall" -j KUBE-PROXY-FIREWALL',
        '-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service '
        'portals" -j KUBE-SERVICES',
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" '
        f"-m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "COMMIT",
    ]
    return "\n".join(out) + "\n"


def restore_binary() -> str:
    exe = shutil.which("iptables-restore")
    if exe is None:
        raise RuntimeError("iptables-restore not found: apt-get install iptables (make setup)")
    return exe


def version() -> str:
    out = subprocess.run(["iptables", "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip() or out.stderr.strip()


def load(netns: str, text: str) -> float:
    """Replace the nat and filter tables of `netns` with `text` in one
    iptables-restore; returns the seconds it took."""
    t = time.perf_counter()
    proc = exec_in(netns, [restore_binary(), "-w", "5"], stdin=text, timeout=600, check=False)
    took = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"iptables-restore in {netns} failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[-500:]}")
    return took


def rule_count(services: Iterable[ServicePort]) -> int:
    """nat rules for `services` (what a packet of a new connection may walk)."""
    return sum(1 + (1 + 3 * len(sp.endpoints) if sp.endpoints else 0) for sp in services)
