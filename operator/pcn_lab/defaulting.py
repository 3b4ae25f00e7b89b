"""What the API server fills in on a Service: SetDefaults_Service and the
Service REST storage's allocators (pkg/registry/core/service) of a
dual-stack cluster whose primary family is IPv4. The emulator applies them
to every Service created, the lab's controller pass to Services updated.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

SERVICE_RANGE = ipaddress.IPv4Network("10.96.0.0/12")
SERVICE_RANGE_V6 = ipaddress.IPv6Network("fd00:10:96::/112")
SERVICE_IP_OFFSET = 10  # the first addresses stay free, as a cluster keeps .1 for `kubernetes`
NODEPORT_RANGE = (30000, 32767)  # --service-node-port-range, inclusive


def family(ip: str) -> str | None:
    """"IPv4" or "IPv6" for an address, None for anything else ("None")."""
    try:
        return "IPv6" if ipaddress.ip_address(ip).version == 6 else "IPv4"
    except ValueError:
        return None


def used_addresses(services: Iterable[Mapping[str, Any]]) -> tuple[set[str], set[int]]:
    """(cluster IPs, NodePorts) the Services hold."""
    ips: set[str] = set()
    ports: set[int] = set()
    for s in services:
        spec = s.get("spec") or {}
        ips.update(ip for ip in spec.get("clusterIPs") or [spec.get("clusterIP")] if ip)
        ports.update(int(p["nodePort"]) for p in spec.get("ports") or []
                     if isinstance(p, Mapping) and p.get("nodePort"))
    return ips, ports


def service_defaults(svc: Mapping[str, Any], used_ips: set[str], used_ports: set[int]
                     ) -> dict[str, Any]:
    """The spec fields the API server fills in on a new Service, as a merge
    patch of .spec ({} when nothing is missing): type ClusterIP,
    sessionAffinity None, a port's protocol TCP and targetPort = port, the
    traffic policies Cluster; cluster IPs (none for ExternalName, none to
    allocate for a headless Service, clusterIP "None") from SERVICE_RANGE
    and, for an IPv6 or dual-stack Service (spec.ipFamilies, or
    ipFamilyPolicy Prefer/RequireDualStack), SERVICE_RANGE_V6, with
    clusterIPs, ipFamilies and ipFamilyPolicy to match; NodePorts for
    NodePort and LoadBalancer Services. `used_ips` and `used_ports` are
    taken by other Services; what is allocated here is added to them.
    Follows SetDefaults_Service and the Service REST storage's allocators
    (pkg/registry/core/service) of a dual-stack cluster whose primary family
    is IPv4."""
    spec = svc.get("spec") or {}
    out: dict[str, Any] = {}
    kind = spec.get("type") or "ClusterIP"
    if not spec.get("type"):
        out["type"] = kind
    if not spec.get("sessionAffinity"):
        out["sessionAffinity"] = "None"
    if not spec.get("internalTrafficPolicy") and kind != "ExternalName":
        out["internalTrafficPolicy"] = "Cluster"
    if kind in ("NodePort", "LoadBalancer") and not spec.get("externalTrafficPolicy"):
        out["externalTrafficPolicy"] = "Cluster"
    if kind != "ExternalName":
        out.update(_cluster_ips(spec, used_ips))
    ports = [dict(p) for p in spec.get("ports") or []]
    changed = False
    for p in ports:
        if not p.get("protocol"):
            p["protocol"] = "TCP"
            changed = True
        if p.get("targetPort") in (None, "", 0) and "port" in p:
            p["targetPort"] = p["port"]
            changed = True
        if kind in ("NodePort", "LoadBalancer") and not p.get("nodePort"):
            free = next((n for n in range(NODEPORT_RANGE[0], NODEPORT_RANGE[1] + 1)
                         if n not in used_ports), None)
            if free is None:
                raise RuntimeError("the NodePort range is exhausted")
            p["nodePort"] = free
            used_ports.add(free)
            changed = True
    if changed:
        out["ports"] = ports
    return out


def _cluster_ips(spec: Mapping[str, Any], used_ips: set[str]) -> dict[str, Any]:
    ips = [ip for ip in spec.get("clusterIPs") or [spec.get("clusterIP")] if ip]
    if ips[:1] == ["None"]:  # headless: nothing to allocate
        out: dict[str, Any] = {}
        if spec.get("clusterIP") != "None":
            out["clusterIP"] = "None"
        if not spec.get("clusterIPs"):
            out["clusterIPs"] = ["None"]
        if not spec.get("ipFamilyPolicy"):
            out["ipFamilyPolicy"] = "SingleStack"
        if not spec.get("ipFamilies"):
            out["ipFamilies"] = ["IPv4"]
        return out
    policy = spec.get("ipFamilyPolicy") or "SingleStack"
    families = list(spec.get("ipFamilies") or []) or \
        [f for f in (family(ip) for ip in ips) if f] or ["IPv4"]
    if policy in ("PreferDualStack", "RequireDualStack") and len(families) == 1:
        families.append("IPv6" if families[0] == "IPv4" else "IPv4")
    by_family = {family(ip): ip for ip in ips}
    new_ips = []
    for fam in families:
        ip = by_family.get(fam) or _allocate(fam, used_ips)
        used_ips.add(ip)
        new_ips.append(ip)
    want = {"clusterIP": new_ips[0], "clusterIPs": new_ips, "ipFamilies": families,
            "ipFamilyPolicy": policy}
    return {k: v for k, v in want.items() if spec.get(k) != v}


def _allocate(family: str, used: set[str]) -> str:
    net: ipaddress.IPv4Network | ipaddress.IPv6Network = \
        SERVICE_RANGE_V6 if family == "IPv6" else SERVICE_RANGE
    for offset in range(SERVICE_IP_OFFSET, net.num_addresses - 1):
        ip = str(net.network_address + offset)
        if ip not in used:
            return ip
    raise RuntimeError(f"the {family} Service range {net} is exhausted")


