"""The lab's stand-ins for kube-controller-manager's EndpointSlice and
Endpoints controllers, and a pass of the API server's Service defaulting and
allocators (pcn_lab.defaulting) over what updates leave out. Each function takes a client of the emulated API server and
makes one pass, as a controller's sync does; the supervisor runs them in a
loop.
"""

from __future__ import annotations

import datetime
import logging
import secrets
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pcn_lab.apiserver import ApiServerError, EmulatedApiServer
from pcn_lab.defaulting import family as _family
from pcn_lab.defaulting import service_defaults, used_addresses

log = logging.getLogger(__name__)


SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "endpointslice-controller.k8s.io"
HEADLESS_LABEL = "service.kubernetes.io/headless"
MAX_ENDPOINTS_PER_SLICE = 100  # kube-controller-manager --max-endpoints-per-slice
TRIGGER_TIME = "endpoints.kubernetes.io/last-change-trigger-time"

Obj = dict[str, Any]
_SLICES = "/apis/discovery.k8s.io/v1"


def _meta(o: Mapping[str, Any]) -> Mapping[str, Any]:
    return o.get("metadata") or {}


def _ns(o: Mapping[str, Any]) -> str:
    return str(_meta(o).get("namespace") or "default")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------- errors
# (controller, namespace, name) -> the last failure reported for it
_failing: dict[tuple[str, str, str], str] = {}


def for_each(controller: str, objs: Iterable[Mapping[str, Any]],
             sync: Callable[[Mapping[str, Any]], None]) -> None:
    """Run `sync` on each object, as a controller works through its queue:
    one object's failure (an invalid object, a conflict) does not hold up
    the others; it is retried on the next pass and logged when it starts,
    changes or ends, not on every pass."""
    for obj in objs:
        key = (controller, _ns(obj), str(_meta(obj).get("name")))
        try:
            sync(obj)
        except Exception as exc:
            msg = f"{type(exc).__name__}: {exc}"
            if _failing.get(key) != msg:
                log.warning("%s: %s/%s: %s (retried on every pass)", *key, msg)
                _failing[key] = msg
        else:
            if _failing.pop(key, None) is not None:
                log.info("%s: %s/%s: synced again", *key)


# ----------------------------------------------------------------------------- Services
def allocate_service_addresses(api: EmulatedApiServer) -> None:
    """Fill in the defaults and addresses (service_defaults) a Service lacks.
    The emulator does so when a Service is created; this pass does it for
    what updates leave out (a type changed to NodePort, say), which the API
    server would also fill in at once."""
    svcs = api.request("GET", "/api/v1/services").get("items", [])
    used_ips, used_ports = used_addresses(svcs)
    def sync(s: Mapping[str, Any]) -> None:
        patch = service_defaults(s, used_ips, used_ports)
        if patch:
            api.request("PATCH", f"/api/v1/namespaces/{_ns(s)}/services/{_meta(s)['name']}",
                        {"spec": patch}, "application/merge-patch+json")

    for_each("service addresses", svcs, sync)


# ----------------------------------------------------------------------------- pods
def pod_ready(pod: Mapping[str, Any]) -> bool:
    """The pod's Ready condition is True (podutil.IsPodReady)."""
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def selected_pods(svc: Mapping[str, Any], pods: Iterable[Mapping[str, Any]]
                  ) -> list[Mapping[str, Any]]:
    """The pods behind a Service: in its namespace, matching its selector,
    with an IP, not finished (Succeeded or Failed); by name."""
    sel = (svc.get("spec") or {}).get("selector") or {}
    out = [p for p in pods if _ns(p) == _ns(svc)
           and all((_meta(p).get("labels") or {}).get(k) == v for k, v in sel.items())
           and (p.get("status") or {}).get("podIP")
           and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
    return sorted(out, key=lambda p: str(_meta(p).get("name")))


def resolve_port(pod: Mapping[str, Any], svc_port: Mapping[str, Any]) -> int | None:
    """The pod's port behind a Service port: targetPort when a number
    (default: port), else the container port of that name and protocol
    (podutil.FindPort); None when the pod has no such named port."""
    target = svc_port.get("targetPort")
    if target in (None, "", 0):
        target = svc_port.get("port")
    if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
        return int(target)
    proto = svc_port.get("protocol") or "TCP"
    for c in (pod.get("spec") or {}).get("containers") or []:
        for cp in c.get("ports") or []:
            if cp.get("name") == target and (cp.get("protocol") or "TCP") == proto:
                return int(cp["containerPort"])
    return None


def _pod_ips(pod: Mapping[str, Any]) -> list[str]:
    status = pod.get("status") or {}
    return [i["ip"] for i in status.get("podIPs") or [] if i.get("ip")] or \
        [status["podIP"]]


# ----------------------------------------------------------------------------- EndpointSlices
def _address_types(svc: Mapping[str, Any]) -> list[str]:
    """The slices' address types: the Service's IP families (getAddressTypesForService)."""
    spec = svc.get("spec") or {}
    fams = list(spec.get("ipFamilies") or [])
    if not fams:
        fams = [f for f in (_family(ip) for ip in spec.get("clusterIPs") or
                            [spec.get("clusterIP") or ""]) if f]
    return fams or ["IPv4"]


def desired_slices(svc: Mapping[str, Any], pods: Iterable[Mapping[str, Any]]
                   ) -> list[dict[str, Any]]:
    """What the EndpointSlice controller keeps for a Service with a selector:
    per address type, the pods grouped by their resolved ports, at most
    MAX_ENDPOINTS_PER_SLICE endpoints a slice; an endpoint is ready when
    its pod is Ready and not terminating (publishNotReadyAddresses: always),
    serving when its pod is Ready, terminating when its pod is being
    deleted. An address type with no endpoints gets one placeholder slice
    with no ports and no endpoints. Each item is {"addressType", "ports",
    "endpoints"}, without metadata (sync_endpoint_slices adds it)."""
    spec = svc.get("spec") or {}
    publish = bool(spec.get("publishNotReadyAddresses"))
    out: list[dict[str, Any]] = []
    for fam in _address_types(svc):
        groups: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
        for pod in selected_pods(svc, pods):
            addrs = [ip for ip in _pod_ips(pod) if _family(ip) == fam]
            if not addrs:
                continue
            ports = []
            for sp in spec.get("ports") or []:
                number = resolve_port(pod, sp)
                if number is None:
                    continue  # the controller leaves a port it cannot resolve out
                ep_port: dict[str, Any] = {"name": sp.get("name") or "",
                                           "protocol": sp.get("protocol") or "TCP",
                                           "port": number}
                if sp.get("appProtocol"):
                    ep_port["appProtocol"] = sp["appProtocol"]
                ports.append(ep_port)
            meta = _meta(pod)
            terminating = bool(meta.get("deletionTimestamp"))
            ready = pod_ready(pod)
            endpoint: dict[str, Any] = {
                "addresses": addrs[:1],
                "conditions": {"ready": publish or (ready and not terminating),
                               "serving": publish or ready, "terminating": terminating},
                "targetRef": {"kind": "Pod", "namespace": _ns(pod), "name": meta.get("name"),
                              **({"uid": meta["uid"]} if meta.get("uid") else {})}}
            node = (pod.get("spec") or {}).get("nodeName")
            if node:
                endpoint["nodeName"] = node
            pspec = pod.get("spec") or {}
            if pspec.get("hostname") and pspec.get("subdomain") == _meta(svc).get("name"):
                endpoint["hostname"] = pspec["hostname"]
            key = repr(ports)
            groups.setdefault(key, (ports, []))[1].append(endpoint)
        if not groups:
            out.append({"addressType": fam, "ports": [], "endpoints": []})
        for ports, endpoints in groups.values():
            for i in range(0, len(endpoints), MAX_ENDPOINTS_PER_SLICE):
                out.append({"addressType": fam, "ports": ports,
                            "endpoints": endpoints[i:i + MAX_ENDPOINTS_PER_SLICE]})
    return out


def _slice_labels(svc: Mapping[str, Any]) -> dict[str, str]:
    """The Service's labels, and the controller's (the controller copies a
    Service's labels onto its slices, so that a service proxy's label
    selector, e.g. service-proxy-name, sees them too)."""
    labels = dict(_meta(svc).get("labels") or {})
    labels[SERVICE_NAME_LABEL] = str(_meta(svc)["name"])
    labels[MANAGED_BY_LABEL] = MANAGED_BY
    if (svc.get("spec") or {}).get("clusterIP") == "None":
        labels[HEADLESS_LABEL] = ""
    return labels


def _owner(svc: Mapping[str, Any]) -> list[dict[str, Any]]:
    uid = _meta(svc).get("uid")
    if not uid:
        return []
    return [{"apiVersion": "v1", "kind": "Service", "name": _meta(svc)["name"], "uid": uid,
             "controller": True, "blockOwnerDeletion": True}]


def sync_endpoint_slices(api: EmulatedApiServer) -> None:
    """One pass of the EndpointSlice controller over every Service with a
    selector (desired_slices), and of the garbage collector over the slices
    it manages: slices are updated in place (PUT) where one of the same
    address type and ports exists, created where none does, and deleted when
    no longer wanted, when their Service is gone, was recreated (another
    uid) or lost its selector. Slices someone else manages (no
    endpointslice.kubernetes.io/managed-by of the controller) are left
    alone, as the controller does."""
    svcs = api.request("GET", "/api/v1/services").get("items", [])
    pods = api.request("GET", "/api/v1/pods").get("items", [])
    slices = api.request("GET", f"{_SLICES}/endpointslices").get("items", [])
    ours: dict[tuple[str, str], list[Obj]] = {}
    for s in slices:
        labels = _meta(s).get("labels") or {}
        if labels.get(MANAGED_BY_LABEL) == MANAGED_BY and SERVICE_NAME_LABEL in labels:
            ours.setdefault((_ns(s), labels[SERVICE_NAME_LABEL]), []).append(s)
    selecting = [svc for svc in svcs if (svc.get("spec") or {}).get("selector")]
    mine = {(_ns(svc), str(_meta(svc)["name"])): ours.pop((_ns(svc), str(_meta(svc)["name"])),
                                                          [])
            for svc in selecting}

    def sync(svc: Mapping[str, Any]) -> None:
        have = mine[(_ns(svc), str(_meta(svc)["name"]))]
        uid = _meta(svc).get("uid")
        stale = [s for s in have if uid and {o.get("uid") for o in
                                             _meta(s).get("ownerReferences") or []} != {uid}]
        _delete_slices(api, stale)
        _sync_service(api, svc, [s for s in have if s not in stale], desired_slices(svc, pods))

    for_each("endpointslice controller", selecting, sync)
    for gone in ours.values():  # no Service, or one without a selector
        _delete_slices(api, gone)


def _sync_service(api: EmulatedApiServer, svc: Mapping[str, Any], have: list[Obj],
                  want: list[dict[str, Any]]) -> None:
    ns, name = _ns(svc), str(_meta(svc)["name"])
    labels, owner = _slice_labels(svc), _owner(svc)
    spare = list(have)
    for w in want:
        match = next((s for s in spare if s.get("addressType") == w["addressType"]
                      and (s.get("ports") or []) == w["ports"]), None) or \
            next((s for s in spare if s.get("addressType") == w["addressType"]), None)
        body: dict[str, Any] = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                                **w}
        if match is None:  # generateName "<service>-", which the emulator lacks
            body["metadata"] = {"name": f"{name}-{secrets.token_hex(3)[:5]}", "namespace": ns,
                                "labels": labels, "ownerReferences": owner}
            api.request("POST", f"{_SLICES}/namespaces/{ns}/endpointslices", body)
            continue
        spare.remove(match)
        meta = dict(_meta(match))
        if (match.get("ports") or []) == w["ports"] and \
                (match.get("endpoints") or []) == w["endpoints"] and \
                meta.get("labels") == labels and (meta.get("ownerReferences") or []) == owner:
            continue
        meta.update(labels=labels, ownerReferences=owner)
        body["metadata"] = meta
        api.request("PUT", f"{_SLICES}/namespaces/{ns}/endpointslices/{meta['name']}", body)
    _delete_slices(api, spare)


def _delete_slices(api: EmulatedApiServer, slices: Iterable[Obj]) -> None:
    for s in slices:
        try:
            api.request("DELETE", f"{_SLICES}/namespaces/{_ns(s)}/endpointslices/"
                                  f"{_meta(s)['name']}")
        except ApiServerError as exc:
            if exc.status != 404:
                raise


# ----------------------------------------------------------------------------- Endpoints
def desired_endpoints(svc: Mapping[str, Any], pods: Iterable[Mapping[str, Any]]
                      ) -> list[dict[str, Any]]:
    """The v1 Endpoints subsets of a Service with a selector (the endpoints
    controller): IPv4 and IPv6 addresses of its pods grouped by their
    resolved ports; not-Ready pods under notReadyAddresses (Ready, with
    publishNotReadyAddresses), terminating pods left out unless
    publishNotReadyAddresses."""
    spec = svc.get("spec") or {}
    publish = bool(spec.get("publishNotReadyAddresses"))
    groups: dict[str, dict[str, Any]] = {}
    for pod in selected_pods(svc, pods):
        meta = _meta(pod)
        if meta.get("deletionTimestamp") and not publish:
            continue
        ports = []
        for sp in spec.get("ports") or []:
            number = resolve_port(pod, sp)
            if number is not None:
                ports.append({**({"name": sp["name"]} if sp.get("name") else {}),
                              "port": number, "protocol": sp.get("protocol") or "TCP"})
        address: dict[str, Any] = {
            "ip": _pod_ips(pod)[0],
            "targetRef": {"kind": "Pod", "namespace": _ns(pod), "name": meta.get("name"),
                          **({"uid": meta["uid"]} if meta.get("uid") else {})}}
        if (pod.get("spec") or {}).get("nodeName"):
            address["nodeName"] = pod["spec"]["nodeName"]
        group = groups.setdefault(repr(ports), {"ports": ports})
        which = "addresses" if publish or pod_ready(pod) else "notReadyAddresses"
        group.setdefault(which, []).append(address)
    return [{k: g[k] for k in ("addresses", "notReadyAddresses", "ports") if g.get(k)}
            for g in groups.values()]


def sync_endpoints(api: EmulatedApiServer) -> None:
    """One pass of the endpoints controller: an Endpoints object named after
    each Service with a selector (desired_endpoints), created, replaced when
    it changes, deleted with its Service or its selector."""
    svcs = api.request("GET", "/api/v1/services").get("items", [])
    pods = api.request("GET", "/api/v1/pods").get("items", [])
    eps = {(_ns(e), str(_meta(e)["name"])): e
           for e in api.request("GET", "/api/v1/endpoints").get("items", [])}
    selecting = [svc for svc in svcs if (svc.get("spec") or {}).get("selector")]
    wanted = {(_ns(svc), str(_meta(svc)["name"])) for svc in selecting}

    def sync(svc: Mapping[str, Any]) -> None:
        key = (_ns(svc), str(_meta(svc)["name"]))
        subsets = desired_endpoints(svc, pods)
        labels = dict(_meta(svc).get("labels") or {})
        if (svc.get("spec") or {}).get("clusterIP") == "None":
            labels[HEADLESS_LABEL] = ""
        stamp = {TRIGGER_TIME: _now()}
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "Endpoints",
                                "metadata": {"name": key[1], "namespace": key[0],
                                             "labels": labels, "annotations": stamp},
                                "subsets": subsets}
        have = eps.get(key)
        path = f"/api/v1/namespaces/{key[0]}/endpoints"
        if have is None:
            api.request("POST", path, body)
        elif (have.get("subsets") or []) != subsets or \
                (_meta(have).get("labels") or {}) != labels:
            body["metadata"] = {**_meta(have), "labels": labels,
                                "annotations": {**(_meta(have).get("annotations") or {}),
                                                **stamp}}
            api.request("PUT", f"{path}/{key[1]}", body)

    for_each("endpoints controller", selecting, sync)
    for key, have in eps.items():
        # the controller deletes the Endpoints of a deleted Service; it knows
        # the ones it wrote by their trigger-time annotation
        if key not in wanted and TRIGGER_TIME in (_meta(have).get("annotations") or {}):
            try:
                api.request("DELETE", f"/api/v1/namespaces/{key[0]}/endpoints/{key[1]}")
            except ApiServerError as exc:
                if exc.status != 404:
                    raise
