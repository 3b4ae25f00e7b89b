"""What the emulated API server lacks for `kubectl get`, added in front of it.

kmock's emulator answers lists without `kind`/`apiVersion`, serves no
server-side Table format (which printer columns need) and describes
subresources in discovery as if they were resources. This proxy on loopback
forwards everything to the emulator and fills those gaps, so the real
kubectl works against a lab. (What a server stamps on a new object is
stamped by the emulator itself, pcn_lab.emulator.)
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Mapping
from typing import Any

import aiohttp
from aiohttp import web

from pcn_lab import merging, selection
from pcn_lab.apiserver import CUSTOM_GROUPS, RESOURCES

# Patch types kube-apiserver accepts and the emulator does not (it applies
# every PATCH body as a merge patch, a list as a JSON patch).
_SERVER_PATCHES = {"application/strategic-merge-patch+json", "application/apply-patch+yaml"}
_DISCOVERY = re.compile(r"^/api/v1$|^/apis/[^/]+/[^/]+$")
_JSONPATH_FILTER = re.compile(r'^(\w+)\[\?\(@\.(\w+)==["\']([^"\']*)["\']\)\]$')
_HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "accept-encoding"}


def printer_columns() -> dict[str, list[dict[str, Any]]]:
    """Printer columns by kind: pcn's from the CRD models, Name/Age otherwise."""
    from pcn_crds.generate import RESOURCES as MODELS

    cols = {m.kind_name: list(m.printer_columns) for m in MODELS}
    age = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    cols.update({
        "Pod": [{"name": "Status", "type": "string", "jsonPath": ".status.phase"}, age,
                {"name": "IP", "type": "string", "jsonPath": ".status.podIP", "priority": 1},
                {"name": "Node", "type": "string", "jsonPath": ".spec.nodeName", "priority": 1}],
        "Service": [{"name": "Type", "type": "string", "cell": _service_type},
                    {"name": "Cluster-IP", "type": "string", "cell": _cluster_ip},
                    {"name": "External-IP", "type": "string", "cell": _external_ip},
                    {"name": "Port(s)", "type": "string", "cell": _service_ports}, age,
                    {"name": "Selector", "type": "string", "priority": 1,
                     "cell": lambda o: _labels((o.get("spec") or {}).get("selector"))}],
        "Endpoints": [{"name": "Endpoints", "type": "string", "cell": _endpoints}, age],
        "EndpointSlice": [
            {"name": "AddressType", "type": "string", "jsonPath": ".addressType"},
            {"name": "Ports", "type": "string", "cell": _slice_ports},
            {"name": "Endpoints", "type": "string", "cell": _slice_endpoints}, age],
        "Node": [{"name": "Pod-CIDR", "type": "string", "jsonPath": ".spec.podCIDR"}, age,
                 {"name": "Internal-IP", "type": "string", "priority": 1,
                  "jsonPath": '.status.addresses[?(@.type=="InternalIP")].address'}],
    })
    return cols


# Cells computed as kube-apiserver's table printers compute them
# (pkg/printers/internalversion/printers.go), for the built-in kinds whose
# columns are more than a JSONPath.
NONE = "<none>"


def _service_type(svc: Mapping[str, Any]) -> str:
    return str((svc.get("spec") or {}).get("type") or "ClusterIP")  # the server's default


def _cluster_ip(svc: Mapping[str, Any]) -> str:
    return str((svc.get("spec") or {}).get("clusterIP") or NONE)


def _external_ip(svc: Mapping[str, Any]) -> str:
    """getServiceExternalIP: externalIPs; a LoadBalancer's ingress, else
    <pending>; an ExternalName's name."""
    spec = svc.get("spec") or {}
    kind = _service_type(svc)
    external = list(spec.get("externalIPs") or [])
    if kind == "ExternalName":
        return str(spec.get("externalName") or NONE)
    if kind == "LoadBalancer":
        ingress = ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
        lb = [i.get("ip") or i.get("hostname") for i in ingress if i.get("ip") or i.get("hostname")]
        if external or lb:
            return ",".join(external + lb)
        return "<pending>"
    return ",".join(external) or NONE


def _service_ports(svc: Mapping[str, Any]) -> str:
    """makePortString: port/PROTO, or port:nodePort/PROTO."""
    out = []
    for p in (svc.get("spec") or {}).get("ports") or []:
        proto = p.get("protocol") or "TCP"
        out.append(f"{p.get('port')}:{p['nodePort']}/{proto}" if p.get("nodePort")
                   else f"{p.get('port')}/{proto}")
    return ",".join(out) or NONE


def _labels(selector: Mapping[str, str] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((selector or {}).items())) or NONE


def _more(items: list[str], shown: int = 3) -> str:
    """formatEndpoints' and formatDiscoveryEndpoints' "a,b,c + N more..."."""
    if len(items) <= shown:
        return ",".join(items)
    return ",".join(items[:shown]) + f" + {len(items) - shown} more..."


def _endpoints(ep: Mapping[str, Any]) -> str:
    """formatEndpoints: ready ip:port pairs."""
    pairs = []
    for subset in ep.get("subsets") or []:
        for a in subset.get("addresses") or []:
            ports = subset.get("ports") or []
            pairs += [f"{a.get('ip')}:{p.get('port')}" for p in ports] if ports \
                else [str(a.get("ip"))]
    return _more(pairs) or NONE


def _slice_ports(s: Mapping[str, Any]) -> str:
    ports = [str(p.get("port")) for p in s.get("ports") or [] if p.get("port") is not None]
    return ",".join(ports) or "<unset>"


def _slice_endpoints(s: Mapping[str, Any]) -> str:
    addrs = [a for e in s.get("endpoints") or [] for a in e.get("addresses") or []]
    return _more(addrs) or "<unset>"


def _split(path: str) -> list[str]:
    """Split a JSONPath on dots outside brackets."""
    parts, cur, depth = [], "", 0
    for ch in path.strip().lstrip("."):
        if ch == "." and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        cur += ch
    parts.append(cur)
    return [p for p in parts if p]


def jsonpath(obj: Any, path: str) -> Any:
    """The small JSONPath subset printer columns use: .a.b and .a[?(@.k=="v")].b"""
    cur = obj
    for part in _split(path):
        m = _JSONPATH_FILTER.match(part)
        if m:
            field, key, value = m.groups()
            items = (cur or {}).get(field) if isinstance(cur, Mapping) else None
            cur = next((i for i in items or [] if str(i.get(key)) == value), None)
        elif isinstance(cur, Mapping):
            cur = cur.get(part)
        else:
            return None
        if cur is None:
            return None
    return cur


def age(timestamp: str | None) -> str:
    if not timestamp:
        return "<unknown>"
    try:
        then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return "<invalid>"
    s = int((datetime.datetime.now(datetime.UTC) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{max(s, 0)}s"


def to_table(kind: str, items: list[dict[str, Any]], columns: list[dict[str, Any]]) -> dict:
    defs = [{"name": "Name", "type": "string", "format": "name", "description": "Name",
             "priority": 0}]
    defs += [{"name": c["name"], "type": c.get("type", "string"), "format": "",
              "description": c.get("description", c["name"]), "priority": c.get("priority", 0)}
             for c in columns]
    if not columns:
        defs.append({"name": "Age", "type": "string", "format": "", "description": "Age",
                     "priority": 0})
    rows = []
    for obj in items:
        meta = obj.get("metadata") or {}
        cells: list[Any] = [meta.get("name", "")]
        for c in columns or [{"type": "date", "jsonPath": ".metadata.creationTimestamp"}]:
            value = c["cell"](obj) if "cell" in c else jsonpath(obj, c["jsonPath"])
            if c.get("type") == "date":
                value = age(value)
            elif value is None:
                value = "" if c.get("type") == "string" else None
            cells.append(value)
        rows.append({"cells": cells, "object": {"kind": "PartialObjectMetadata",
                                                "apiVersion": "meta.k8s.io/v1",
                                                "metadata": meta}})
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {},
            "columnDefinitions": defs, "rows": rows}


def _resource_of(path: str) -> tuple[str, str, bool] | None:
    """(group/version, plural, names-an-object) of a REST path, if it is one."""
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 3:
        gv, rest = parts[1], parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 4:
        gv, rest = f"{parts[1]}/{parts[2]}", parts[3:]
    else:
        return None
    if len(rest) >= 3 and rest[0] == "namespaces":
        rest = rest[2:]  # a namespaced path
    if len(rest) == 1:
        return gv, rest[0], False
    if len(rest) == 2:
        return gv, rest[0], True
    return None  # a subresource


def _select_event(line: bytes, matcher: selection.Matcher, selected: set[tuple[str, str]]
                  ) -> bytes | None:
    """One watch event line through a selector; `selected` holds the
    (namespace, name) of the objects the watcher has been told of."""
    if not line.strip():
        return None
    try:
        event = json.loads(line)
        obj = event["object"]
        key = ((obj.get("metadata") or {}).get("namespace") or "",
               (obj.get("metadata") or {}).get("name") or "")
    except (ValueError, KeyError, TypeError, AttributeError):
        return line + b"\n"  # not an object's event (an ERROR): pass it on
    kind = event.get("type")
    if kind == "DELETED" or not matcher(obj):
        if key not in selected:
            return None
        selected.discard(key)
        event["type"] = "DELETED"
    else:
        if key not in selected:
            event["type"] = "ADDED"
        selected.add(key)
    return json.dumps(event).encode() + b"\n"


class ApiProxy:
    def __init__(self, upstream: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream = upstream.rstrip("/")
        self.host = host
        self.port = port
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._columns = printer_columns()
        self._kinds = {path: info["kind"] for path, info in RESOURCES.items()}

    async def start(self) -> ApiProxy:
        # No cap on connections to the emulator: a real API server does not
        # count long-running requests (watches) against a limit, and with
        # aiohttp's default of 100 the 101st watch (ten agents' worth) would
        # wait for one of them to end, and every request after it.
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None),
                                              connector=aiohttp.TCPConnector(limit=0))
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # A client that hangs up cancels its request here, and so closes the
        # request to the emulator: a dead agent's watches end with it (a
        # watch on a quiet resource would otherwise be held open for ever).
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.port = sock.getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        if request.path.rstrip("/") in ("/openapi/v2", "/openapi/v3"):
            return self._openapi(request.path.rstrip("/"))
        body = await request.read()
        res = _resource_of(request.path)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        wants_table = "as=Table" in request.headers.get("Accept", "")
        if wants_table:
            headers["Accept"] = "application/json"
        watching = request.query.get("watch") in ("1", "true")
        matcher = None
        if request.method == "GET" and res and not res[2]:
            try:
                matcher = selection.selector_of(request.query)
            except selection.SelectorError as exc:
                return web.json_response(
                    {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                     "reason": "BadRequest", "code": 400, "message": str(exc)}, status=400)
        ctype_in = request.headers.get("Content-Type", "").split(";")[0].strip()
        if request.method == "PATCH" and res and res[2] and ctype_in in _SERVER_PATCHES:
            translated = await self._translate_patch(request, res, ctype_in, body, headers)
            if isinstance(translated, web.Response):
                return translated
            body = translated
            headers["Content-Type"] = "application/merge-patch+json"
        async with self._session.request(request.method, self.upstream + request.path_qs,
                                         data=body or None, headers=headers) as up:
            if watching:
                return await self._stream(request, up, matcher if up.status < 300 else None)
            data = await up.read()
            ctype = up.headers.get("Content-Type", "application/json")
            if up.status < 300 and res and request.method == "GET" and "json" in ctype:
                data = self._decorate(data, res, wants_table, matcher)
                ctype = "application/json"
            elif up.status < 300 and _DISCOVERY.match(request.path.rstrip("/")):
                data = self._fix_discovery(data)
            return web.Response(status=up.status, body=data, content_type=ctype.split(";")[0])

    @staticmethod
    def _openapi(path: str) -> web.Response:
        """OpenAPI documents with no schemas: the lab's resources have none
        to offer (the emulator validates nothing), and kubectl, which will
        not apply or edit without downloading one, then skips client-side
        validation as it does for a kind the server does not describe. v3
        lists no group versions, so kubectl does not ask the server to
        validate fields either (the emulator could not); v2 is an empty
        protobuf Document, the format kubectl asks for."""
        if path == "/openapi/v3":
            return web.json_response({"paths": {}})
        return web.Response(body=b"",
                            content_type="application/com.github.proto-openapi.spec.v2.v1.0+protobuf")

    async def _translate_patch(self, request: web.Request, res: tuple[str, str, bool],
                               ctype: str, body: bytes, headers: dict[str, str]
                               ) -> bytes | web.Response:
        """A patch type the emulator does not understand, as the merge patch
        that has the same effect on the object as it is now. A strategic
        merge patch (kubectl apply, edit, label, patch for built-in kinds) is
        applied here (merging.apply_strategic_patch); on a custom resource it
        is refused with 415, as kube-apiserver refuses it. Server-side apply
        is refused with 415 too: the lab does not implement field management
        (use client-side `kubectl apply`)."""
        def refuse(message: str) -> web.Response:
            return web.json_response(
                {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                 "reason": "UnsupportedMediaType", "code": 415, "message": message},
                status=415)

        if ctype == "application/apply-patch+yaml":
            return refuse("server-side apply is not served by the pcn lab's emulated API "
                          "server; use client-side kubectl apply")
        if res[0].split("/")[0] in CUSTOM_GROUPS:
            return refuse(f"the body of the request was in an unknown format - accepted media "
                          f"types include: application/json-patch+json, "
                          f"application/merge-patch+json (got {ctype})")
        try:
            patch = json.loads(body)
        except ValueError:
            patch = None
        if not isinstance(patch, dict):
            return web.json_response(
                {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                 "reason": "BadRequest", "code": 400,
                 "message": "a strategic merge patch must be a JSON object"}, status=400)
        assert self._session is not None
        get = {k: v for k, v in headers.items() if k.lower() != "content-type"}
        async with self._session.get(self.upstream + request.path, headers=get) as cur:
            if cur.status != 200:
                return web.Response(status=cur.status, body=await cur.read(),
                                    content_type="application/json")
            current = json.loads(await cur.read())
        desired = merging.apply_strategic_patch(current, patch)
        return json.dumps(merging.merge_patch(current, desired)).encode()

    async def _stream(self, request: web.Request, up: aiohttp.ClientResponse,
                      matcher: selection.Matcher | None) -> web.StreamResponse:
        """Pass a watch through; with a selector, only the events of the
        objects it selects, as the API server's watch cache sends them: an
        object that comes to match is ADDED, one that stops matching is
        DELETED."""
        out = web.StreamResponse(status=up.status)
        out.content_type = "application/json"
        await out.prepare(request)
        selected: set[tuple[str, str]] = set()
        pending = b""
        try:
            async for chunk in up.content.iter_any():
                if matcher is None:
                    await out.write(chunk)
                    continue
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    event = _select_event(line, matcher, selected)
                    if event is not None:
                        await out.write(event)
        except (ConnectionResetError, aiohttp.ClientError):
            pass  # either side hung up; a cancellation (the client's) goes on up
        return out

    @staticmethod
    def _fix_discovery(data: bytes) -> bytes:
        """An APIResourceList as kube-apiserver writes it: the core group
        version is "v1" (the emulator says "/v1"), and a subresource
        (pods/status) has no singular, short names or categories of its own
        and the verbs get, patch, update; the emulator copies the resource's,
        so kubectl warns that `svc` "could also match lower priority resource
        services/status"."""
        try:
            doc = json.loads(data)
        except ValueError:
            return data
        if not isinstance(doc, dict):
            return data
        if doc.get("groupVersion") == "/v1":
            doc["groupVersion"] = "v1"
        for r in doc.get("resources") or []:
            if "/" in str(r.get("name", "")):
                r.update(singularName="", shortNames=[], verbs=["get", "patch", "update"])
                r.pop("categories", None)
        return json.dumps(doc).encode()


    def _decorate(self, data: bytes, res: tuple[str, str, bool], table: bool,
                  matcher: selection.Matcher | None = None) -> bytes:
        try:
            doc = json.loads(data)
        except ValueError:
            return data
        gv, plural, single = res
        kind = self._kinds.get(f"{gv}/{plural}", "")
        if not single and isinstance(doc, dict) and "items" in doc:
            if matcher is not None:
                doc["items"] = [i for i in doc["items"] if matcher(i)]
            doc.setdefault("kind", f"{kind}List" if kind else "List")
            doc.setdefault("apiVersion", gv)
            for item in doc["items"]:
                item.setdefault("kind", kind)
                item.setdefault("apiVersion", gv)
        if table:
            items = doc.get("items", []) if not single else [doc]
            doc = to_table(kind, items, self._columns.get(kind, []))
        return json.dumps(doc).encode()
