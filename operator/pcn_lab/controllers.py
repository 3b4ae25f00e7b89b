"""The lab's stand-ins for kube-controller-manager and the API server's
allocators: Service addresses and NodePorts, EndpointSlices. Each function
takes a client of the emulated API server and makes one pass."""

from __future__ import annotations

import ipaddress
from typing import Any

from pcn_lab.apiserver import ApiServerError, EmulatedApiServer, apply

SERVICE_RANGE = ipaddress.IPv4Network("10.96.0.0/12")
NODEPORT_RANGE = (30000, 32767)


def allocate_service_addresses(api: EmulatedApiServer) -> None:
    """Give Services a cluster IP and NodePorts when they ask for none."""
    svcs = api.request("GET", "/api/v1/services").get("items", [])
    used_ips = {(s.get("spec") or {}).get("clusterIP") for s in svcs}
    used_ports = {p.get("nodePort") for s in svcs for p in (s.get("spec") or {}).get("ports")
                  or []}
    for s in svcs:
        spec = s.get("spec") or {}
        patch: dict[str, Any] = {}
        if not spec.get("clusterIP"):
            ip = next(str(a) for a in SERVICE_RANGE.hosts()
                      if int(a) - int(SERVICE_RANGE.network_address) >= 10
                      and str(a) not in used_ips)
            used_ips.add(ip)
            patch["clusterIP"] = ip
        if spec.get("type") in ("NodePort", "LoadBalancer"):
            ports = [dict(p) for p in spec.get("ports") or []]
            changed = False
            for p in ports:
                if not p.get("nodePort"):
                    p["nodePort"] = next(n for n in range(*NODEPORT_RANGE)
                                         if n not in used_ports)
                    used_ports.add(p["nodePort"])
                    changed = True
            if changed:
                patch["ports"] = ports
        if patch:
            m = s["metadata"]
            api.request("PATCH", f"/api/v1/namespaces/{m.get('namespace', 'default')}"
                                 f"/services/{m['name']}", {"spec": patch},
                        "application/merge-patch+json")


def sync_endpoint_slices(api: EmulatedApiServer) -> None:
    """One EndpointSlice per Service with a selector: its running pods."""
    svcs = api.request("GET", "/api/v1/services").get("items", [])
    pods = api.request("GET", "/api/v1/pods").get("items", [])
    for s in svcs:
        spec = s.get("spec") or {}
        sel = spec.get("selector")
        if not sel:
            continue
        ns = s["metadata"].get("namespace", "default")
        ready = [p for p in pods if p["metadata"].get("namespace", "default") == ns
                 and all((p["metadata"].get("labels") or {}).get(k) == v
                         for k, v in sel.items())
                 and (p.get("status") or {}).get("podIP")]
        ports = [{"name": p.get("name", ""), "protocol": p.get("protocol", "TCP"),
                  "port": int(p.get("targetPort") or p["port"])}
                 for p in spec.get("ports") or []]
        want: dict[str, Any] = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": f"{s['metadata']['name']}-lab", "namespace": ns,
                             "labels": {"kubernetes.io/service-name": s["metadata"]["name"]}},
                "addressType": "IPv4", "ports": ports,
                "endpoints": [{"addresses": [p["status"]["podIP"]],
                               "conditions": {"ready": True},
                               "nodeName": p["spec"].get("nodeName"),
                               "targetRef": {"kind": "Pod", "name": p["metadata"]["name"],
                                             "namespace": ns}}
                              for p in sorted(ready, key=lambda p: p["metadata"]["name"])]}
        path = f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices/{want['metadata']['name']}"
        try:
            have = api.request("GET", path)
        except ApiServerError:
            have = None
        if have is None:
            apply(api, want)
        elif have.get("endpoints") != want["endpoints"] or have.get("ports") != ports:
            api.request("PUT", path, want)
