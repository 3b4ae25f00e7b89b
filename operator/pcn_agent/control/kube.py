"""Where the Kubernetes API is and how to talk to it, for the agent's own
writes (status, Events, derived NodePortRules) and for kopf's login.

Order: PCN_KUBE_URL (+ PCN_KUBE_TOKEN) for labs and tests; the in-cluster
service account; a kubeconfig (KUBECONFIG or ~/.kube/config).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import secrets
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

log = logging.getLogger(__name__)

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass(frozen=True)
class Endpoint:
    server: str
    token: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.server.startswith("https"):
            return False
        if self.insecure:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return ctx
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


def discover(kubeconfig: str | None = None, context: str | None = None) -> Endpoint:
    url = os.environ.get("PCN_KUBE_URL")
    if url:
        return Endpoint(url.rstrip("/"), os.environ.get("PCN_KUBE_TOKEN"))
    if (SA_DIR / "token").exists() and os.environ.get("KUBERNETES_SERVICE_HOST"):
        host = os.environ["KUBERNETES_SERVICE_HOST"]
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        return Endpoint(f"https://{host}:{port}", (SA_DIR / "token").read_text().strip(),
                        str(SA_DIR / "ca.crt"))
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        # KUBECONFIG read now: the module reads it once, when first imported
        config.load_kube_config(config_file=kubeconfig or os.environ.get("KUBECONFIG"),
                                context=context, client_configuration=cfg)
    except Exception as exc:
        raise RuntimeError(f"no Kubernetes API found: set PCN_KUBE_URL, run in a cluster, or "
                           f"give a kubeconfig ({exc})") from exc
    token = None
    # kubernetes >= 30 keeps "Bearer <token>" under BearerToken, older ones
    # under authorization (kubernetes/config/kube_config.py)
    auth = (cfg.api_key.get("BearerToken") or cfg.api_key.get("authorization")) \
        if cfg.api_key else None
    if auth:
        token = auth.split(" ", 1)[1] if " " in auth else auth
    return Endpoint(cfg.host.rstrip("/"), token, cfg.ssl_ca_cert, cfg.cert_file, cfg.key_file,
                    insecure=not cfg.verify_ssl)


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class Kube:
    """A small asynchronous client for the few calls the agent makes itself."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.ep = endpoint
        self._session: aiohttp.ClientSession | None = None

    async def _s(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Authorization": f"Bearer {self.ep.token}"} if self.ep.token else {}
            self._session = aiohttp.ClientSession(
                headers=headers, connector=aiohttp.TCPConnector(ssl=self.ep.ssl_context()),
                timeout=aiohttp.ClientTimeout(total=10))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(self, method: str, path: str, body: Any = None,
                      content_type: str = "application/json") -> Any:
        s = await self._s()
        data = json.dumps(body) if body is not None else None
        async with s.request(method, self.ep.server + path, data=data,
                             headers={"Content-Type": content_type}) as r:
            text = await r.text()
            if r.status >= 400:
                raise ApiError(r.status, text[:300])
            return json.loads(text) if text else None

    async def watch(self, path: str, read_timeout: float) -> AsyncIterator[dict[str, Any]]:
        """The events of a watch request (`path` with ?watch=true...), one JSON
        object a line, until the server ends the stream; ApiError for an
        error status. Lines are split here rather than by aiohttp's readline,
        which refuses lines over 64 KiB (an EndpointSlice of 1 000 endpoints)."""
        s = await self._s()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=read_timeout)
        async with s.get(self.ep.server + path, timeout=timeout) as r:
            if r.status >= 400:
                raise ApiError(r.status, (await r.text())[:300])
            buf = b""
            async for chunk in r.content.iter_any():
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)

    async def patch_status(self, group_path: str, plural: str, namespace: str | None, name: str,
                           status: Mapping[str, Any]) -> None:
        ns = f"/namespaces/{namespace}" if namespace else ""
        await self.request("PATCH", f"{group_path}{ns}/{plural}/{name}/status",
                           {"status": status}, "application/merge-patch+json")

    async def create(self, group_path: str, plural: str, obj: dict[str, Any],
                     namespace: str | None = None) -> None:
        ns = f"/namespaces/{namespace}" if namespace else ""
        await self.request("POST", f"{group_path}{ns}/{plural}", obj)

    async def delete(self, group_path: str, plural: str, name: str,
                     namespace: str | None = None) -> None:
        ns = f"/namespaces/{namespace}" if namespace else ""
        await self.request("DELETE", f"{group_path}{ns}/{plural}/{name}")

    async def event(self, involved: dict[str, Any], reason: str, message: str, node: str,
                    type_: str = "Warning") -> None:
        meta = involved.get("metadata") or {}
        ns = meta.get("namespace") or "default"
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        ev = {
            "apiVersion": "v1", "kind": "Event",
            # An explicit unique name, as kubectl and client-go do (<object>.<hex>).
            "metadata": {"name": f"{meta.get('name', 'pcn')}.{secrets.token_hex(8)}",
                         "namespace": ns},
            "involvedObject": {"apiVersion": involved.get("apiVersion"),
                               "kind": involved.get("kind"), "name": meta.get("name"),
                               "namespace": meta.get("namespace"), "uid": meta.get("uid")},
            "reason": reason, "message": message[:1000], "type": type_,
            "source": {"component": "pcn-agent", "host": node},
            "reportingComponent": "pcn.dev/agent", "reportingInstance": node,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        await self.request("POST", f"/api/v1/namespaces/{ns}/events", ev)
