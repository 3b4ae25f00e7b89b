"""Where `make k8s` puts what it builds, keyed by the pinned versions.

Layout of one cache folder (`cache_dir()`):

* ``bin/``: kube-apiserver, kube-controller-manager, kube-scheduler, kubelet,
  kubectl, kube-proxy, e2e.test, ginkgo, etcd, etcdctl, containerd,
  containerd-shim-runc-v2, ctr, runc, crictl, coredns, agnhost, pause;
* ``images/``: one OCI image archive per image (``<file>.tar``, importable
  with ``ctr images import``) and ``images.json``, a list of
  ``{"ref": <image reference>, "file": <archive name>}``;
* ``stamps/``: one empty file per finished build step, so a second run skips
  it;
* ``work/``: build trees (wrapper Go modules, root filesystems).

The folder is ``$PCN_K8S_CACHE/<key>`` (default ``/var/cache/pcn/k8s/<key>``)
with ``<key>`` the first 12 hex digits of the SHA-256 of versions.toml.
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

VERSIONS_FILE = Path(__file__).with_name("versions.toml")
DEFAULT_ROOT = Path("/var/cache/pcn/k8s")


@cache
def versions() -> dict[str, Any]:
    """The parsed versions.toml: ``{component: {"module": ..., "version": ...}}``."""
    return tomllib.loads(VERSIONS_FILE.read_text())


def cache_key() -> str:
    return hashlib.sha256(VERSIONS_FILE.read_bytes()).hexdigest()[:12]


def cache_root() -> Path:
    return Path(os.environ.get("PCN_K8S_CACHE", str(DEFAULT_ROOT)))


def cache_dir() -> Path:
    return cache_root() / cache_key()


def bin_dir() -> Path:
    return cache_dir() / "bin"


def image_dir() -> Path:
    return cache_dir() / "images"


def stamp_dir() -> Path:
    return cache_dir() / "stamps"


def work_dir() -> Path:
    return cache_dir() / "work"


def go_mod_cache() -> Path:
    """Go's module cache, where ``go mod download`` (make k8s) unpacks modules:
    $GOMODCACHE, else $GOPATH/pkg/mod, else /root/go/pkg/mod (go env's
    defaults for root, who runs make k8s)."""
    if os.environ.get("GOMODCACHE"):
        return Path(os.environ["GOMODCACHE"])
    return Path(os.environ.get("GOPATH", "/root/go")) / "pkg" / "mod"


def binary(name: str) -> Path:
    """Path of a built binary. Raises FileNotFoundError naming the fix."""
    path = bin_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `make k8s` first")
    return path
