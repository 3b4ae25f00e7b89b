"""Kubeconfig files of the cluster's clients (admin, controller-manager,
scheduler, one per kubelet), each with its CA and client certificate
embedded (``*-data`` fields, base64 of the PEM files) so that one file is
all a client needs."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import yaml

from pcn_lab.cluster.layout import Layout


def kubeconfig(server: str, ca_pem: bytes, cert_pem: bytes, key_pem: bytes, user: str,
               namespace: str = "default", cluster: str = "pcn-lab") -> dict[str, Any]:
    """A kubeconfig (v1 Config) for `user` at `server` (https URL)."""
    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode()

    return {"apiVersion": "v1", "kind": "Config", "current-context": cluster,
            "clusters": [{"name": cluster, "cluster": {
                "server": server, "certificate-authority-data": b64(ca_pem)}}],
            "users": [{"name": user, "user": {"client-certificate-data": b64(cert_pem),
                                              "client-key-data": b64(key_pem)}}],
            "contexts": [{"name": cluster, "context": {"cluster": cluster, "user": user,
                                                      "namespace": namespace}}]}


def write(path: Path, config: dict[str, Any]) -> None:
    """Write atomically, readable by root only (it holds a private key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.touch(mode=0o600)
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    tmp.replace(path)


def for_cert(layout: Layout, cert: str, server: str, namespace: str = "default"
             ) -> dict[str, Any]:
    """The kubeconfig of the client whose certificate is pki/<cert>.crt."""
    pki = layout.pki
    return kubeconfig(server, (pki / "ca.crt").read_bytes(), (pki / f"{cert}.crt").read_bytes(),
                      (pki / f"{cert}.key").read_bytes(), cert, namespace)


def write_all(layout: Layout) -> None:
    """The components' kubeconfigs in layout.kubeconfigs (they reach the API
    server at its address on the lab's switch)."""
    server = layout.api_url_inside()
    for cert in ("admin", "controller-manager", "scheduler"):
        write(layout.kubeconfigs / f"{cert}.conf", for_cert(layout, cert, server))
    for node in layout.nodes:
        write(layout.kubeconfigs / f"kubelet-{node}.conf",
              for_cert(layout, f"kubelet-{node}", server))
