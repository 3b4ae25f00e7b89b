"""What `kubectl pcn policy` asks the policy compiler about: the destination
as the data plane judges it. A Service (its ClusterIP, or `svc/NAME`) is
translated to its ready endpoints and their target ports before policy sees
the packet, as kube-proxy and pcn's lbrp translate it; a port may be given
by number or by name (the destination pod's container port of that name,
or the Service's port of that name).

Pure: objects in (plain dicts as the API returns them), targets out;
errors are InputError naming the fix.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InputError

Obj = Mapping[str, Any]
SERVICE_NAME_LABEL = "kubernetes.io/service-name"  # discovery.k8s.io/v1 EndpointSlice
PORT_PROTOCOLS = ("TCP", "UDP", "SCTP")


@dataclass(frozen=True)
class Target:
    """One destination to judge: `endpoint` ("namespace/name" of a pod or an
    IPv4 address) on `port`; `via` says which Service led there ("" for
    none)."""

    endpoint: str
    port: int
    via: str = ""


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def qualified(text: str, namespace: str) -> str:
    """A pod named NAME in `namespace`, NAMESPACE/NAME as given, or an
    IPv4 address as given."""
    return text if "/" in text or _is_ipv4(text) else f"{namespace}/{text}"


def _meta(o: Obj) -> Mapping[str, Any]:
    return o.get("metadata") or {}


def _service_named(text: str, namespace: str, services: Sequence[Obj]) -> Obj | None:
    """The Service `text` designates: svc/NAME (in `namespace`),
    NAMESPACE/svc/NAME, or a ClusterIP; None when it is none of those."""
    parts = text.split("/")
    if len(parts) in (2, 3) and parts[-2] in ("svc", "service", "services"):
        ns = parts[0] if len(parts) == 3 else namespace
        for s in services:
            if _meta(s).get("namespace") == ns and _meta(s).get("name") == parts[-1]:
                return s
        raise InputError(f"no Service {ns}/{parts[-1]}",
                         f"list Services with: kubectl get services -n {ns}")
    if _is_ipv4(text):
        for s in services:
            spec = s.get("spec") or {}
            if text in (spec.get("clusterIPs") or [spec.get("clusterIP")]):
                return s
    return None


def _port_number(port: str, what: str) -> int | None:
    if not port.isdigit():
        return None
    n = int(port)
    if not 1 <= n <= 65535:
        raise InputError(f"--port {port}: {what} ports are 1-65535")
    return n


def _pod_port(pod: Obj | None, key: str, port: str, protocol: str) -> int:
    """A container port of `pod` by name (and protocol), or a number."""
    n = _port_number(port, "pod")
    if n is not None:
        return n
    named: dict[str, Any] = {}
    for c in list((pod or {}).get("spec", {}).get("containers") or []) + \
            list((pod or {}).get("spec", {}).get("initContainers") or []):
        for p in c.get("ports") or []:
            if p.get("name") and (p.get("protocol") or "TCP").upper() == protocol:
                named.setdefault(p["name"], p.get("containerPort"))
    if port in named and isinstance(named[port], int):
        return int(named[port])
    have = ", ".join(f"{k} ({v})" for k, v in sorted(named.items())) or "none"
    raise InputError(f"pod {key} has no {protocol} container port named {port!r} "
                     f"(its named {protocol} ports: {have})",
                     "give the port by number or by one of those names")


def targets(destination: str, namespace: str, port: str | None, protocol: str,
            pods: Sequence[Obj], services: Sequence[Obj], slices: Sequence[Obj]
            ) -> list[Target]:
    """The destinations a connection to `destination` port `port` (a
    number or a name; None for ICMP) reaches: a pod or address itself, or
    each ready endpoint of a Service with its target port (terminating and
    not-ready endpoints get no new connections, as kube-proxy does)."""
    protocol = protocol.upper()
    if protocol not in PORT_PROTOCOLS:  # ICMP: no port
        svc = _service_named(destination, namespace, services)
        if svc is not None:
            raise InputError("a Service forwards TCP, UDP and SCTP only: ICMP to a ClusterIP "
                             "reaches no backend", "ask about a backend pod instead")
        return [Target(qualified(destination, namespace), 0)]
    if not port:
        raise InputError(f"{protocol} needs a destination port",
                         "give one with --port NUMBER or --port NAME")
    svc = _service_named(destination, namespace, services)
    if svc is None:
        key = qualified(destination, namespace)
        pod = next((p for p in pods if f"{_meta(p).get('namespace')}/{_meta(p).get('name')}"
                    == key), None)
        if pod is None and not _is_ipv4(key) and not port.isdigit():
            raise InputError(f"no pod {key}", "list pods with: kubectl get pods -A -o wide")
        return [Target(key, _pod_port(pod, key, port, protocol))]
    return _service_targets(svc, port, protocol, pods, slices)


def _service_targets(svc: Obj, port: str, protocol: str, pods: Sequence[Obj],
                     slices: Sequence[Obj]) -> list[Target]:
    ns, name = str(_meta(svc).get("namespace")), str(_meta(svc).get("name"))
    ports = [p for p in (svc.get("spec") or {}).get("ports") or []
             if (p.get("protocol") or "TCP").upper() == protocol]
    n = _port_number(port, "Service")
    chosen = [p for p in ports if (p.get("port") == n if n is not None else p.get("name") == port)]
    if not chosen:
        have = ", ".join(f"{p.get('name') or '-'}:{p.get('port')}" for p in ports) or "none"
        raise InputError(f"Service {ns}/{name} has no {protocol} port {port} "
                         f"(its {protocol} ports: {have})", "give one of those with --port")
    sport = chosen[0]
    via = f"Service {ns}/{name} {protocol}/{sport.get('port')}"
    pod_keys = {f"{_meta(p).get('namespace')}/{_meta(p).get('name')}" for p in pods}
    out: list[Target] = []
    for s in slices:
        if _meta(s).get("namespace") != ns or \
                (_meta(s).get("labels") or {}).get(SERVICE_NAME_LABEL) != name or \
                s.get("addressType", "IPv4") != "IPv4":
            continue
        target = next((p.get("port") for p in s.get("ports") or []
                       if (p.get("name") or "") == (sport.get("name") or "")
                       and (p.get("protocol") or "TCP").upper() == protocol), None)
        if not isinstance(target, int):
            continue
        for e in s.get("endpoints") or []:
            if (e.get("conditions") or {}).get("ready") is False or not e.get("addresses"):
                continue
            ref = e.get("targetRef") or {}
            key = f"{ref.get('namespace') or ns}/{ref.get('name')}"
            endpoint = key if ref.get("kind") == "Pod" and key in pod_keys else e["addresses"][0]
            out.append(Target(endpoint, target, via))
    if not out:
        raise InputError(f"{via} has no ready endpoint: a connection to it is refused "
                         "before any policy is asked",
                         f"see its endpoints with: kubectl get endpointslices -n {ns} "
                         f"-l {SERVICE_NAME_LABEL}={name}")
    return sorted(set(out), key=lambda t: t.endpoint)
