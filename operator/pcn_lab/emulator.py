"""kmock's KubernetesEmulator with what the lab needs of a real API server
and kmock 0.8 lacks: PUT (update, "replace"); the uid, creationTimestamp and
generation the server gives every new object; a new Service's defaults and
addresses (pcn_lab.defaulting), a new Pod's Pending phase.

kmock serves GET, LIST, WATCH, POST, PATCH (merge or JSON patch) and DELETE;
a PUT falls through to its "endpoint not found" reaction and is answered 404,
so a client that updates objects the ordinary way (the EndpointSlice
controller, `kubectl replace`, client-go's Update) never changes anything.
kmock keeps its objects and watch buses to itself, so the update is
implemented here, in a subclass that takes the same lock and feeds the same
watch buses as kmock's own writes. Imported only by the emulator's thread
(`pcn_lab.apiserver`), so the lab's command line does not load kmock.
"""

from __future__ import annotations

import copy
import datetime
import uuid
from typing import Any

import aiohttp.web
import kmock
from kmock._internal import parsing as kmock_parsing
from kmock._internal.k8s import (
    KubernetesError,
    KubernetesObjectNotFoundError,
    KubernetesResourceNotFoundError,
)
from kmock._internal.rendering import Request

from pcn_lab.defaulting import service_defaults, used_addresses
from pcn_lab.merging import apply_merge_patch, merge_patch

# What the API server owns in an object's metadata: a PUT cannot change it
# (rest.BeforeUpdate / FillObjectMetaSystemFields keep the stored values).
SERVER_METADATA = ("uid", "creationTimestamp", "deletionTimestamp",
                   "deletionGracePeriodSeconds", "generation", "resourceVersion")


def stamp_new(obj: dict[str, Any]) -> None:
    """What the API server sets on every object it creates (in place):
    metadata.uid, creationTimestamp (RFC 3339, seconds, UTC) and generation
    1; a client's own values of these are replaced, as the server does."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        meta = obj["metadata"] = {}
    meta["uid"] = str(uuid.uuid4())
    meta["creationTimestamp"] = \
        datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    meta["generation"] = 1
    for owned in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds"):
        meta.pop(owned, None)


_kmock_parse_path = kmock_parsing.parse_path


def parse_path(path: str) -> Any:
    """kmock 0.8's path parser, except for the Namespace resource itself,
    which it reads as a namespace prefix with nothing after it (so that
    `GET /api/v1/namespaces`, a watch of namespaces, creating one or
    reading `/api/v1/namespaces/NAME` failed with a 500): those paths are
    the cluster-scoped resource `namespaces` of the core group, with a name
    and the `status`/`finalize` subresources, as kube-apiserver serves them."""
    parts = path.strip("/").split("/")
    if len(parts) >= 3 and parts[0] == "api" and parts[2] == "namespaces" and (
            len(parts) <= 4 or (len(parts) == 5 and parts[4] in ("status", "finalize"))):
        return kmock_parsing.ParsedPath(
            group="", version=parts[1], plural="namespaces", namespace=None,
            name=parts[3] if len(parts) > 3 else None,
            subresource=parts[4] if len(parts) > 4 else None)
    return _kmock_parse_path(path)


kmock_parsing.parse_path = parse_path  # kmock's request parser looks it up there


class LabEmulator(kmock.KubernetesEmulator):  # type: ignore[misc]
    """The emulator, plus PUT on an object and on its status subresource."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # cluster IPs and NodePorts handed to Services being created, not yet stored
        self._reserved: tuple[set[str], set[int]] = (set(), set())

    async def _handle(self, request: Request) -> aiohttp.web.StreamResponse:
        """kmock's handling with PUT and the server's defaults added, and its
        404s worded as kube-apiserver words them (not_found)."""
        try:
            return await self._handle_lab(request)
        except (KubernetesObjectNotFoundError, KubernetesResourceNotFoundError) as exc:
            raise not_found(request, isinstance(exc, KubernetesObjectNotFoundError)) from None

    async def _handle_lab(self, request: Request) -> aiohttp.web.StreamResponse:
        if request.method == kmock.method.PUT and request.resource is not None \
                and request.name is not None:
            return aiohttp.web.json_response(await self._replace(request))
        if request.method == kmock.method.PATCH and request.resource is not None \
                and request.name is not None and request.subresource is None \
                and isinstance(request.data, dict):
            self._next_generation(request)
        reserved: tuple[set[str], set[int]] = (set(), set())
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            stamp_new(request.data)  # before kmock stores it and tells the watchers
            res = request.resource
            if res is not None and res.group == "" and res.plural == "services":
                reserved = self._default_service(request.data)
            elif res is not None and res.group == "" and res.plural == "pods":
                # a new pod is Pending until its kubelet says otherwise (the API
                # server resets a new pod's status; a test's running pod keeps its)
                if not request.data.get("status"):
                    request.data["status"] = {"phase": "Pending"}
        try:
            response: aiohttp.web.StreamResponse = await super()._handle(request)
        finally:  # stored (or refused) now: the objects tell what is taken
            self._reserved[0].difference_update(reserved[0])
            self._reserved[1].difference_update(reserved[1])
        return response

    def _next_generation(self, request: Request) -> None:
        """A merge PATCH of an object: what the server owns (SERVER_METADATA,
        generation among it) is the server's, whatever the patch says; and a
        patch that changes anything but metadata and status raises
        metadata.generation, as kube-apiserver does for every update (kmock
        kept it at 1, so observedGeneration always looked current). Written
        into the patch before kmock stores it, so the answer and the MODIFIED
        event carry it."""
        resource, name = request.resource, request.name
        assert resource is not None and name is not None and isinstance(request.data, dict)
        meta = request.data.get("metadata")
        if isinstance(meta, dict):
            for field in SERVER_METADATA:
                meta.pop(field, None)
        key = (resource, request.namespace, name)
        if key not in self._objects or self._objects[key].deleted:
            return  # kmock answers 404
        old = self._objects[key].raw
        generation = (old.get("metadata") or {}).get("generation")
        if not isinstance(generation, int):
            return
        new = apply_merge_patch(copy.deepcopy(old), request.data)
        if isinstance(new, dict) and _content(new) != _content(old):
            if not isinstance(meta, dict):
                meta = request.data["metadata"] = {}
            meta["generation"] = generation + 1

    def _default_service(self, svc: dict[str, Any]) -> tuple[set[str], set[int]]:
        """Fill in a new Service's defaults and allocate its cluster IPs and
        NodePorts (pcn_lab.defaulting), as the API server does on create, so
        the answer and the ADDED event carry them. Returns what it took."""
        live = [o.raw for (res, _, _), o in self._objects.items()
                if res.group == "" and res.plural == "services" and not o.deleted]
        ips, ports = used_addresses(live)
        ips |= self._reserved[0]
        ports |= self._reserved[1]
        before_ips, before_ports = set(ips), set(ports)
        spec = svc.get("spec")
        if not isinstance(spec, dict):
            spec = svc["spec"] = {}
        try:
            spec.update(service_defaults(svc, ips, ports))
        except (RuntimeError, TypeError, ValueError, AttributeError):
            return set(), set()  # a range used up, or no valid Service: left as sent
        taken = (ips - before_ips, ports - before_ports)
        self._reserved[0].update(taken[0])
        self._reserved[1].update(taken[1])
        return taken

    async def _replace(self, request: Request) -> dict[str, Any]:
        """PUT .../NAME replaces the object with the body, except what the
        server owns (SERVER_METADATA) and, for a resource with a status
        subresource, its status; PUT .../NAME/status replaces only the
        status. 404 when the object does not exist (the built-in resources do
        not create on update), 400 when the body names another object.
        metadata.generation goes up when anything but metadata and status
        changed. Watchers see MODIFIED, or DELETED when the update removed the
        last finalizer of an object being deleted. Returns the stored object."""
        resource, name = request.resource, request.name
        assert resource is not None and name is not None  # see _handle
        body = request.data
        if not isinstance(body, dict):
            raise KubernetesError(status=400, reason="BadRequest",
                                  message="the body of an update must be a JSON object")
        meta = body.get("metadata") or {}
        if meta.get("name") not in (None, request.name):
            raise KubernetesError(status=400, reason="BadRequest", message=(
                f"the name of the object ({meta.get('name')}) does not match the name on "
                f"the URL ({request.name})"))
        if meta.get("namespace") not in (None, request.namespace):
            raise KubernetesError(status=400, reason="BadRequest", message=(
                "the namespace of the provided object does not match the namespace sent on "
                "the request"))
        if request.subresource not in (None, "status"):
            raise KubernetesError(status=404, reason="NotFound", message=(
                f"the server could not find the requested resource ({request.subresource})"))
        # (indexing kmock's resources would declare an unknown one: ask first)
        has_status = resource in self.resources and \
            "status" in (self.resources[resource].subresources or ())
        key = (resource, request.namespace, name)
        async with self._lock:
            if key not in self._objects or self._objects[key].deleted:
                raise KubernetesObjectNotFoundError()
            old = copy.deepcopy(self._objects[key].raw)
            if request.subresource == "status":
                new = {k: v for k, v in old.items() if k != "status"}
                if body.get("status") is not None:
                    new["status"] = copy.deepcopy(body["status"])
            else:
                new = self._updated(old, body, has_status)
            self._objects[key].patch(merge_patch(old, new))
            raw = self._objects[key].raw
            new_meta = raw.get("metadata") or {}
            if new_meta.get("deletionTimestamp") and not new_meta.get("finalizers"):
                self._objects[key].delete()
                await self._buses[resource].put({"type": "DELETED", "object": raw})
            else:
                await self._buses[resource].put({"type": "MODIFIED", "object": raw})
            return copy.deepcopy(raw)

    @staticmethod
    def _updated(old: dict[str, Any], body: dict[str, Any], has_status: bool) -> dict[str, Any]:
        new = {k: copy.deepcopy(v) for k, v in body.items() if v is not None}
        meta = dict(new.get("metadata") or {})
        old_meta = old.get("metadata") or {}
        for field in SERVER_METADATA:
            meta.pop(field, None)
            if field in old_meta:
                meta[field] = old_meta[field]
        meta["name"] = old_meta.get("name")
        if "namespace" in old_meta:
            meta["namespace"] = old_meta["namespace"]
        new["metadata"] = meta
        if has_status:
            new.pop("status", None)
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])

        if isinstance(meta.get("generation"), int) and _content(old) != _content(new):
            meta["generation"] += 1
        return new


def not_found(request: Request, object_missing: bool) -> KubernetesError:
    """The 404 kube-apiserver answers, for kmock's (whose message told a
    test author to add the object to `kmock.objects[...]`): a missing object
    is reason NotFound, `<plural>.<group> "<name>" not found` (the core
    group's plural alone), with details name, group and kind (the plural),
    as apimachinery's errors.NewNotFound builds it; an unknown resource is
    "the server could not find the requested resource"."""
    res = request.resource
    if object_missing and res is not None and request.name is not None:
        group = res.group or ""
        qualified = f"{res.plural}.{group}" if group else str(res.plural)
        return KubernetesError(status=404, reason="NotFound",
                               message=f'{qualified} "{request.name}" not found',
                               details={"name": request.name, "group": group,
                                        "kind": res.plural})
    # (details not empty: kmock puts a traceback in empty ones)
    return KubernetesError(status=404, reason="NotFound",
                           message="the server could not find the requested resource",
                           details={"group": (res.group or "") if res else "",
                                    "kind": (res.plural or "") if res else ""})


def _content(o: dict[str, Any]) -> dict[str, Any]:
    """What a change of raises metadata.generation: all but metadata and status."""
    return {k: v for k, v in o.items() if k not in ("metadata", "status")}

