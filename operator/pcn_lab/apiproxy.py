"""What the emulated API server lacks for `kubectl get`, added in front of it.

kmock's emulator answers lists without `kind`/`apiVersion`, serves no
server-side Table format (which printer columns need), and sets no
creationTimestamp or uid. This proxy on loopback forwards everything to the
emulator and fills those gaps, so the real kubectl works against a lab.
"""

from __future__ import annotations

import datetime
import json
import re
import uuid
from collections.abc import Mapping
from typing import Any

import aiohttp
from aiohttp import web

from pcn_lab.apiserver import RESOURCES

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
        "Service": [{"name": "Type", "type": "string", "jsonPath": ".spec.type"},
                    {"name": "Cluster-IP", "type": "string", "jsonPath": ".spec.clusterIP"},
                    age],
        "Node": [{"name": "Pod-CIDR", "type": "string", "jsonPath": ".spec.podCIDR"}, age,
                 {"name": "Internal-IP", "type": "string", "priority": 1,
                  "jsonPath": '.status.addresses[?(@.type=="InternalIP")].address'}],
    })
    return cols


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
            value = jsonpath(obj, c["jsonPath"])
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
        body = await request.read()
        res = _resource_of(request.path)
        if request.method == "POST" and res and not res[2] and body:
            body = self._stamp(body)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        wants_table = "as=Table" in request.headers.get("Accept", "")
        if wants_table:
            headers["Accept"] = "application/json"
        watching = request.query.get("watch") in ("1", "true")
        async with self._session.request(request.method, self.upstream + request.path_qs,
                                         data=body or None, headers=headers) as up:
            if watching:
                return await self._stream(request, up)
            data = await up.read()
            ctype = up.headers.get("Content-Type", "application/json")
            if up.status < 300 and res and request.method == "GET" and "json" in ctype:
                data, ctype = self._decorate(data, res, wants_table), "application/json"
            elif up.status < 300 and request.path.rstrip("/") == "/api/v1":
                data = self._fix_core_discovery(data)
            return web.Response(status=up.status, body=data, content_type=ctype.split(";")[0])

    async def _stream(self, request: web.Request, up: aiohttp.ClientResponse) -> web.StreamResponse:
        out = web.StreamResponse(status=up.status)
        out.content_type = "application/json"
        await out.prepare(request)
        try:
            async for chunk in up.content.iter_any():
                await out.write(chunk)
        except (ConnectionResetError, aiohttp.ClientError):
            pass  # either side hung up; a cancellation (the client's) goes on up
        return out

    @staticmethod
    def _fix_core_discovery(data: bytes) -> bytes:
        """The emulator names the core group version "/v1"; clients expect "v1"."""
        try:
            doc = json.loads(data)
        except ValueError:
            return data
        if isinstance(doc, dict) and doc.get("groupVersion") == "/v1":
            doc["groupVersion"] = "v1"
        return json.dumps(doc).encode()

    def _stamp(self, body: bytes) -> bytes:
        """What a real API server adds to a new object."""
        try:
            obj = json.loads(body)
        except ValueError:
            return body
        if isinstance(obj, dict):
            meta = obj.setdefault("metadata", {})
            meta.setdefault("creationTimestamp",
                            datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("generation", 1)
        return json.dumps(obj).encode()

    def _decorate(self, data: bytes, res: tuple[str, str, bool], table: bool) -> bytes:
        try:
            doc = json.loads(data)
        except ValueError:
            return data
        gv, plural, single = res
        kind = self._kinds.get(f"{gv}/{plural}", "")
        if not single and isinstance(doc, dict) and "items" in doc:
            doc.setdefault("kind", f"{kind}List" if kind else "List")
            doc.setdefault("apiVersion", gv)
            for item in doc["items"]:
                item.setdefault("kind", kind)
                item.setdefault("apiVersion", gv)
        if table:
            items = doc.get("items", []) if not single else [doc]
            doc = to_table(kind, items, self._columns.get(kind, []))
        return json.dumps(doc).encode()
