"""List and watch one kind of object for the agent's store, as client-go's
reflector does (k8s.io/client-go/tools/cache/reflector.go): a paginated
LIST, then a WATCH from the list's resourceVersion; the watch is opened
again from the last version seen when the server ends it, and a new LIST
replaces everything when that version has expired (HTTP 410 Gone, or an
ERROR event with code 410: "too old resource version").

For the kinds a node has many of and reads as they are (Services and
EndpointSlices): through kopf each event went through its per-object
machinery (a worker task, a memory, loggers, handler bookkeeping), about
a quarter of the agent's CPU at a start facing 10 000 Services (py-spy),
while the data plane was still compiling on the same two cores. Here an
event is one parsed line and one call of `observe`.

API reference: https://kubernetes.io/docs/reference/using-api/api-concepts/
(efficient detection of changes, retrieving large results in chunks, 410
Gone responses, watch bookmarks).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from pcn_agent.control.kube import ApiError, Kube

log = logging.getLogger(__name__)

PAGE = 500  # objects per LIST page (client-go's reflector asks for 500 too)
WATCH_TIMEOUT_S = 290  # the server ends each watch after this; it is opened again
RETRY_S = 1.0

Observe = Callable[[str | None, Mapping[str, Any]], None]  # (event type, object)
Replace = Callable[[list[Mapping[str, Any]]], None]  # every object after a LIST


class Expired(Exception):
    """The resourceVersion a watch started from is gone: list again."""


class ListWatch:
    """Keep `observe` and `replace` told about the objects at `path` (a
    collection, e.g. /api/v1/services): `replace(items)` after every LIST
    (the caller drops what is not among them), then `observe(type, obj)`
    for each ADDED, MODIFIED or DELETED event. `synced` is set after the
    first LIST. Runs until cancelled; errors are logged and retried."""

    def __init__(self, kube: Kube, path: str, kind: str, observe: Observe,
                 replace: Replace) -> None:
        self.kube, self.path, self.kind = kube, path, kind
        self.observe, self.replace = observe, replace
        self.synced = asyncio.Event()
        self.lists = 0  # LISTs made (1 + relists after expiry or errors)

    async def run(self) -> None:
        rv: str | None = None
        while True:
            try:
                if rv is None:
                    rv = await self._list()
                rv = await self._watch(rv)
            except asyncio.CancelledError:
                raise
            except Expired:
                log.info("%s: resourceVersion %s expired, listing again", self.kind, rv)
                rv = None
            except Exception as exc:  # the network, the server: the next try lists again
                log.warning("watching %s failed (%s: %s); again in %.0f s", self.kind,
                            type(exc).__name__, exc, RETRY_S)
                rv = None
                await asyncio.sleep(RETRY_S)

    async def _list(self) -> str:
        items: list[Mapping[str, Any]] = []
        cont = ""
        while True:
            query = f"?limit={PAGE}" + (f"&continue={cont}" if cont else "")
            try:
                page = await self.kube.request("GET", self.path + query) or {}
            except ApiError as exc:
                if exc.status == 410:  # the continue token expired: from the start
                    items, cont = [], ""
                    continue
                raise
            for obj in page.get("items") or []:
                items.append(obj)
            meta = page.get("metadata") or {}
            cont = meta.get("continue") or ""
            if not cont:
                break
        self.lists += 1
        self.replace(items)
        self.synced.set()
        return str(meta.get("resourceVersion") or "")

    async def _watch(self, rv: str) -> str:
        """Watch from `rv` until the server ends the stream; the last
        resourceVersion seen. Raises Expired when `rv` is too old."""
        query = (f"?watch=true&allowWatchBookmarks=true&timeoutSeconds={WATCH_TIMEOUT_S}"
                 + (f"&resourceVersion={rv}" if rv else ""))
        try:
            async for event in self.kube.watch(self.path + query, WATCH_TIMEOUT_S + 30):
                rv = self._event(event, rv)
        except ApiError as exc:
            if exc.status == 410:
                raise Expired(str(exc)) from None
            raise
        return rv

    def _event(self, event: Mapping[str, Any], rv: str) -> str:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Expired(obj.get("message", ""))
            raise ApiError(int(obj.get("code") or 500), str(obj.get("message", "")))
        new_rv = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            self.observe(kind, obj)
        return str(new_rv) if new_rv else rv
