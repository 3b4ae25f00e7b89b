"""Installing pcn and the cluster add-ons the way a user does, with the
built kubectl against the real API server.

* pcn: ``kubectl apply -k`` of a two-line overlay of the repository's
  manifests/ (the README's install) whose only change is the one
  manifests/README.md asks of clusters without kube-proxy: both containers
  of the DaemonSet get KUBERNETES_SERVICE_HOST/PORT = the API server's own
  address. The agent is a host-network pod that must reach the API before
  its data plane (which serves the `kubernetes` Service) exists, so it
  cannot use the Service; CoreDNS and every other pod do use it (pcn is
  the service proxy).
* CoreDNS as kube-dns (coredns.yaml next to this module).
* images: every archive of images.json imported into every node's
  containerd with ctr (nothing is ever pulled).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from pcn_lab.cluster import containerd
from pcn_lab.cluster.layout import API_PORT, Layout

COREDNS = Path(__file__).with_name("coredns.yaml")
AGENT_CONTAINERS = ("install-cni", "agent")


def repo_root() -> Path:
    """The checkout pcn_lab runs from (manifests/ and examples/ are there)."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "manifests" / "kustomization.yaml").is_file():
        raise FileNotFoundError(f"no manifests/kustomization.yaml under {root}: run pcn-lab "
                                "from a pcn checkout (pip install -e .)")
    return root


# where the image's virtualenv has the project's packages (Debian 12's Python)
IMAGE_SITE_PACKAGES = "/opt/pcn/venv/lib/python3.11/site-packages"
SOURCE_PACKAGES = (("pcn_agent", "operator/pcn_agent"), ("pcn_bpf", "bpf"), ("pcn_crds", "crds"))


def overlay(layout: Layout, manifests: Path, out: Path,
            agent_source: Path | None = None) -> dict[str, Any]:
    """The kustomization (in folder `out`) that installs `manifests` with the
    API server's address in the agent's environment.

    `agent_source` (a development aid, off by default): a pcn checkout whose
    pcn_agent, pcn_bpf and pcn_crds are mounted read-only over the image's
    copies in the agent container, so a change is tried on the real cluster
    without rebuilding the image (the nodes see the machine's files)."""
    env = [{"name": "KUBERNETES_SERVICE_HOST", "value": layout.api_ip},
           {"name": "KUBERNETES_SERVICE_PORT", "value": str(API_PORT)}]
    agent: dict[str, Any] = {"name": "agent", "env": env}
    pod: dict[str, Any] = {"initContainers": [{"name": "install-cni", "env": env}],
                           "containers": [agent]}
    if agent_source is not None:
        agent["volumeMounts"] = [{"name": f"source-{pkg.replace('_', '-')}", "readOnly": True,
                                  "mountPath": f"{IMAGE_SITE_PACKAGES}/{pkg}"}
                                 for pkg, _ in SOURCE_PACKAGES]
        pod["volumes"] = [{"name": f"source-{pkg.replace('_', '-')}",
                           "hostPath": {"path": str(agent_source / rel), "type": "Directory"}}
                          for pkg, rel in SOURCE_PACKAGES]
    patch = {"apiVersion": "apps/v1", "kind": "DaemonSet",
             "metadata": {"name": "pcn-agent", "namespace": "pcn-system"},
             "spec": {"template": {"spec": pod}}}
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [os.path.relpath(manifests, out)],
            "patches": [{"patch": yaml.safe_dump(patch, sort_keys=False)}]}


def write_overlay(layout: Layout, manifests: Path, agent_source: Path | None = None) -> Path:
    out = layout.data / "install"
    out.mkdir(parents=True, exist_ok=True)
    (out / "kustomization.yaml").write_text(
        yaml.safe_dump(overlay(layout, manifests, out, agent_source), sort_keys=False))
    return out


def images(image_dir: Path) -> list[dict[str, str]]:
    """images.json: [{"ref": ..., "file": ...}], every file checked present."""
    index = image_dir / "images.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index} is missing: run `make k8s` first")
    entries: list[dict[str, str]] = json.loads(index.read_text())
    for e in entries:
        if not (image_dir / e["file"]).is_file():
            raise FileNotFoundError(f"{image_dir / e['file']} ({e['ref']}) is missing: run "
                                    "`make k8s` again")
    return entries


def pause_ref(entries: list[dict[str, str]]) -> str:
    for e in entries:
        if e["ref"].split("@")[0].rsplit(":", 1)[0].endswith("/pause"):
            return e["ref"]
    raise LookupError("images.json has no pause image (registry.k8s.io/pause:<tag>): "
                      "run `make k8s`")


def import_images(ctr: Path, socket: Path, image_dir: Path,
                  entries: list[dict[str, str]]) -> list[str]:
    """Import every archive into one node's containerd; returns the refs it
    holds afterwards that images.json names. Raises RuntimeError naming an
    image ctr could not import or that is not under its ref afterwards."""
    for e in entries:
        r = subprocess.run(containerd.import_argv(ctr, socket, image_dir / e["file"]),
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"ctr images import {e['file']} failed: {r.stderr.strip()}")
    r = subprocess.run(containerd.list_argv(ctr, socket), capture_output=True, text=True,
                       timeout=60, check=True)
    have = set(r.stdout.split())
    missing = [e["ref"] for e in entries if e["ref"] not in have]
    if missing:
        raise RuntimeError(f"after import, containerd lacks {missing} (it has {sorted(have)}): "
                           "the archives' index.json must name each image "
                           "(annotation org.opencontainers.image.ref.name or "
                           "io.containerd.image.name)")
    return [e["ref"] for e in entries]
