"""An emulated Kubernetes API server on loopback (kmock's KubernetesEmulator),
with the resources pcn uses, running in a thread of its own; and a small
synchronous client that applies objects the way `kubectl apply` does.

Used by the agent's tests and by the local lab.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from typing import Any

from pcn_lab import merging

RESOURCES: dict[str, dict[str, Any]] = {
    "v1/namespaces": {"kind": "Namespace", "namespaced": False, "shortnames": {"ns"},
                      "subresources": {"status"}},
    "v1/nodes": {"kind": "Node", "namespaced": False, "shortnames": {"no"},
                 "subresources": {"status"}},
    "v1/pods": {"kind": "Pod", "namespaced": True, "shortnames": {"po"},
                "subresources": {"status"}},
    "v1/services": {"kind": "Service", "namespaced": True, "shortnames": {"svc"},
                    "subresources": {"status"}},
    "v1/endpoints": {"kind": "Endpoints", "namespaced": True, "shortnames": {"ep"}},
    "v1/events": {"kind": "Event", "namespaced": True, "shortnames": {"ev"}},
    "v1/configmaps": {"kind": "ConfigMap", "namespaced": True, "shortnames": {"cm"}},
    "discovery.k8s.io/v1/endpointslices": {"kind": "EndpointSlice", "namespaced": True},
    "networking.k8s.io/v1/networkpolicies": {"kind": "NetworkPolicy", "namespaced": True,
                                             "shortnames": {"netpol"}},
    "policy.networking.k8s.io/v1alpha2/clusternetworkpolicies": {
        "kind": "ClusterNetworkPolicy", "namespaced": False, "shortnames": {"cnp"},
        "subresources": {"status"}},
    "pcn.dev/v1alpha1/networkfunctions": {"kind": "NetworkFunction", "namespaced": True,
                                          "shortnames": {"nf", "cube"},
                                          "categories": {"pcn"}, "subresources": {"status"}},
    "pcn.dev/v1alpha1/cubechains": {"kind": "CubeChain", "namespaced": True,
                                    "shortnames": {"cc", "chain"}, "categories": {"pcn"},
                                    "subresources": {"status"}},
    "pcn.dev/v1alpha1/cubetypes": {"kind": "CubeType", "namespaced": False,
                                   "shortnames": {"ct"}, "categories": {"pcn"},
                                   "subresources": {"status"}},
    "pcn.dev/v1alpha1/nodeportrules": {"kind": "NodePortRule", "namespaced": False,
                                       "shortnames": {"npr"}, "categories": {"pcn"},
                                       "subresources": {"status"}},
}
log = logging.getLogger(__name__)

# served from CRDs (network-policy-api's too); the rest is built into Kubernetes
CUSTOM_GROUPS = {"pcn.dev", "policy.networking.k8s.io"}
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}
PLURALS = {info["kind"]: path for path, info in RESOURCES.items()}


class ApiServerError(RuntimeError):
    """An HTTP error from the emulated API server; the message is its Status's
    message when the body is one (`networkfunctions.pcn.dev "x" not found`),
    else the body's start."""

    def __init__(self, status: int, message: str) -> None:
        try:
            body = json.loads(message)
        except ValueError:
            body = None
        if isinstance(body, dict) and body.get("kind") == "Status" and body.get("message"):
            message = str(body["message"])
        super().__init__(f"HTTP {status}: {message[:300]}")
        self.status = status


class EmulatedApiServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 resources: Mapping[str, dict[str, Any]] | None = None,
                 keep_requests: int | None = None) -> None:
        """`resources` (default RESOURCES) are the API resources served, keyed
        like RESOURCES; leave out pcn.dev's to emulate a cluster without the CRDs.

        kmock records every request it serves and matches each new one against
        the whole record, so an emulator that runs for long (a lab, a
        benchmark) gets slower with every request (~0.15 ms more per request
        served). `keep_requests` keeps only that many of the latest records;
        None keeps them all, for tests that inspect them. A request is matched
        right after it is recorded, so keep more than the requests in flight
        at once (a few watches and writes per agent). The errors kmock
        keeps (one per error answer) are trimmed alike."""
        if keep_requests is not None and keep_requests < 1:
            raise ValueError("keep_requests must be at least 1")
        self.host = host
        self.port = port
        self.resources = dict(RESOURCES if resources is None else resources)
        self.keep_requests = keep_requests
        self.url = ""
        self.emulator: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # ------------------------------------------------------------------ life cycle
    def start(self) -> EmulatedApiServer:
        self._thread = threading.Thread(target=self._run, name="pcn-apiserver", daemon=True)
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("the emulated API server did not start in 15 s")
        if self._error is not None:
            raise RuntimeError(f"the emulated API server failed: {self._error}") from self._error
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        import kmock

        from pcn_lab.emulator import LabEmulator

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with LabEmulator() as emulator, \
                kmock.Server(emulator, host=self.host, port=self.port or None) as server:
            for path, info in self.resources.items():
                # discovery's singularName is the lower-case kind (kmock's default,
                # the plural, makes `kubectl get endpointslice` unknown)
                emulator.resources[path] = kmock.ResourceInfo(
                    verbs=VERBS, **{"singular": info["kind"].lower(), **info})
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            self.port = server.port
            trimmer = self._trim_forever() if self.keep_requests is not None else None
            task = asyncio.get_running_loop().create_task(trimmer) if trimmer else None
            self._ready.set()
            await self._stop.wait()
            if task is not None:
                task.cancel()

    async def _trim_forever(self, period: float = 0.01) -> None:
        record = getattr(self.emulator, "_requests", None)
        if not isinstance(record, list):  # kmock changed: say so rather than slow down unseen
            log.warning("kmock keeps no request list to trim: requests will slow down over time")
            return
        keep = self.keep_requests
        assert keep is not None  # only started when requests are to be trimmed
        # kmock also keeps every error it answered (each 404, each 409) with its
        # traceback, for a test to re-raise: in a long run those only pile up
        errors = getattr(self.emulator, "_errors", None)
        while True:
            if len(record) > keep:
                del record[:-keep]
            for level in errors if isinstance(errors, list) else ():
                if isinstance(level, list) and len(level) > keep:
                    del level[:-keep]
            await asyncio.sleep(period)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> EmulatedApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ client
    def request(self, method: str, path: str, body: Any = None,
                content_type: str = "application/json") -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                text = r.read().decode()
        except urllib.error.HTTPError as exc:
            raise ApiServerError(exc.code, exc.read().decode()) from None
        return json.loads(text) if text else None


def object_path(obj: Mapping[str, Any], with_name: bool = True) -> str:
    """The REST path of an object (or of its collection)."""
    kind = obj.get("kind")
    if kind not in PLURALS:
        raise ValueError(f"unknown kind {kind!r}; known kinds: {', '.join(sorted(PLURALS))}")
    res = PLURALS[kind]
    group_version, plural = res.rsplit("/", 1)
    base = f"/api/{group_version}" if group_version == "v1" else f"/apis/{group_version}"
    meta = obj.get("metadata") or {}
    if RESOURCES[res]["namespaced"]:
        base += f"/namespaces/{meta.get('namespace') or 'default'}"
    base += f"/{plural}"
    return f"{base}/{meta['name']}" if with_name else base


def apply(api: EmulatedApiServer, obj: Mapping[str, Any]) -> str:
    """`kubectl apply` (client-side) of one object: create it, or change the
    live object by what changed in the configuration since it was last
    applied, so that a field removed from the YAML is removed from the
    object while fields others set (a cluster IP, an allocated nodePort, a
    controller's label) stay. The configuration is kept, as kubectl keeps
    it, in the kubectl.kubernetes.io/last-applied-configuration annotation.
    Built-in kinds merge lists with merge keys element by element (kubectl's
    strategic merge); custom resources replace lists (JSON merge). The
    result goes to the server as a merge patch (the emulator understands no
    strategic merge patch), computed against the object as read just
    before. .status is not applied. Returns 'created', 'configured' or
    'unchanged'; ApiServerError from the server."""
    config = copy.deepcopy(dict(obj))
    meta = dict(config.get("metadata") or {})
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items()
                   if k != merging.LAST_APPLIED}
    if annotations:
        meta["annotations"] = annotations
    else:
        meta.pop("annotations", None)
    config["metadata"] = meta
    modified = copy.deepcopy(config)
    modified["metadata"]["annotations"] = {
        **annotations,
        merging.LAST_APPLIED: json.dumps(config, sort_keys=True, separators=(",", ":"))}
    try:
        api.request("POST", object_path(obj, with_name=False), modified)
        return "created"
    except ApiServerError as exc:
        if exc.status != 409:
            raise
    current = api.request("GET", object_path(obj))
    try:
        original = json.loads(((current.get("metadata") or {}).get("annotations") or {})
                              .get(merging.LAST_APPLIED) or "{}")
    except ValueError:
        original = {}
    original.pop("status", None)
    modified.pop("status", None)
    strategic = PLURALS[str(obj["kind"])].split("/")[0] not in CUSTOM_GROUPS
    desired = merging.three_way_merge(original, modified, current, strategic)
    patch = merging.merge_patch(current, desired)
    if not patch:
        return "unchanged"
    api.request("PATCH", object_path(obj), patch, "application/merge-patch+json")
    return "configured"


def apply_all(api: EmulatedApiServer, objs: Iterable[Mapping[str, Any]]) -> list[str]:
    return [f"{o['kind'].lower()}/{o['metadata']['name']} {apply(api, o)}" for o in objs]


def delete(api: EmulatedApiServer, obj: Mapping[str, Any]) -> bool:
    try:
        api.request("DELETE", object_path(obj))
        return True
    except ApiServerError as exc:
        if exc.status == 404:
            return False
        raise


def get(api: EmulatedApiServer, kind: str, name: str, namespace: str | None = None) -> Any:
    return api.request("GET", object_path({"kind": kind, "metadata": {"name": name,
                                                                      "namespace": namespace}}))
