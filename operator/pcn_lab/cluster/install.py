"""Installing pcn and the cluster add-ons the way a user does, with the
built kubectl against the real API server.

* pcn: ``kubectl apply -k`` of an overlay of the repository's manifests/
  (the README's install) whose only change is the one manifests/README.md
  asks of clusters without kube-proxy: both containers of the DaemonSet get
  KUBERNETES_SERVICE_HOST/PORT = the API server's own address. The lab is
  offline, so the overlay's base is manifests/ rewritten without its one
  remote resource: network-policy-api's standard CRDs from GitHub become the
  same folder of the module `make k8s` downloaded (offline_kustomization). The agent is a host-network pod that must reach the API before
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
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from pcn_lab.cluster import artifacts, containerd, policyapi
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


#: The remote resource manifests/kustomization.yaml may name: a folder of
#: sigs.k8s.io/network-policy-api at a tag (kustomize's GitHub URL form).
REMOTE_NETWORK_POLICY_API = re.compile(
    r"https://github\.com/kubernetes-sigs/network-policy-api/(?P<path>[a-z0-9/]+)"
    r"\?ref=(?P<ref>v\d+\.\d+\.\d+)")
#: The fields of manifests/kustomization.yaml that offline_kustomization carries.
KUSTOMIZATION_FIELDS = frozenset({"apiVersion", "kind", "resources", "images"})


def offline_resource(entry: str, manifests: Path, base: Path, gomodcache: Path) -> str:
    """One resource of manifests/kustomization.yaml as the offline base in
    folder `base` names it: a file is copied into `base` (kustomize reads
    files only from within a kustomization's folder) and named by its name;
    a folder (a kustomization) is named by its path relative to `base`; the
    network-policy-api URL by the same folder of the module in the Go module
    cache. Raises ValueError for another URL or a ref other than
    netpol.toml's pin, FileNotFoundError (naming `make k8s`) when the module
    is not downloaded."""
    if "://" not in entry:
        source = (manifests / entry).resolve()
        if source.is_dir():
            return os.path.relpath(source, base)
        shutil.copyfile(source, base / source.name)
        return source.name
    match = REMOTE_NETWORK_POLICY_API.fullmatch(entry)
    if match is None:
        raise ValueError(f"{entry}: a remote resource the offline lab has no copy of")
    module, version = policyapi.pin()
    if match["ref"] != version:
        raise ValueError(f"{entry}: ref {match['ref']} is not netpol.toml's {module} {version}")
    # The lab installs the channel netpol.toml names: the experimental CRD
    # has the fields (named ports, node peers) of the features the
    # conformance run declares; users get the standard one by default.
    path = match["path"]
    channel = policyapi.load().lab_channel
    if path.endswith("/standard"):
        path = path[: -len("standard")] + channel
    local = policyapi.module_dir(gomodcache) / path
    if not (local / "kustomization.yaml").is_file():
        raise FileNotFoundError(f"{local}/kustomization.yaml is missing ({entry})")
    return os.path.relpath(local, base)


def offline_kustomization(manifests: Path, base: Path,
                          gomodcache: Path | None = None) -> dict[str, Any]:
    """Write into folder `base` a kustomization that installs what
    manifests/kustomization.yaml does without the network: the same
    resources (offline_resource; files copied into `base`) and images;
    returns it. Raises ValueError when manifests/kustomization.yaml uses
    fields beyond KUSTOMIZATION_FIELDS (they would be lost)."""
    kust = yaml.safe_load((manifests / "kustomization.yaml").read_text())
    extra = set(kust) - KUSTOMIZATION_FIELDS
    if extra:
        raise ValueError(f"{manifests}/kustomization.yaml uses {sorted(extra)}: carry them in "
                         "pcn_lab.cluster.install.offline_kustomization")
    cache = gomodcache if gomodcache is not None else artifacts.go_mod_cache()
    base.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {
        "apiVersion": kust.get("apiVersion", "kustomize.config.k8s.io/v1beta1"),
        "kind": kust.get("kind", "Kustomization"),
        "resources": [offline_resource(r, manifests, base, cache) for r in kust["resources"]]}
    if kust.get("images"):
        out["images"] = kust["images"]
    (base / "kustomization.yaml").write_text(yaml.safe_dump(out, sort_keys=False))
    return out


def overlay(layout: Layout, manifests: Path, out: Path,
            agent_source: Path | None = None, gomodcache: Path | None = None) -> dict[str, Any]:
    """The kustomization (in folder `out`) that installs `manifests` with the
    API server's address in the agent's environment. Its base is
    `out`/base, written here: `manifests` without the network
    (offline_kustomization).

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
    # The lab's nodes share this machine's cgroup tree, and their kubelets
    # put pods under a cgroup root of each node's own (/<node>), where the
    # agent's default (the kubelet's pods cgroup at the top of the tree)
    # finds nothing, or, on a host that runs a kubelet of its own, the
    # host's pods: socket load balancing stays off here, the lbrp translates.
    config = {"apiVersion": "v1", "kind": "ConfigMap",
              "metadata": {"name": "pcn-config", "namespace": "pcn-system"},
              "data": {"socketLB": "false"}}
    offline_kustomization(manifests, out / "base", gomodcache)
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": ["base"],
            "patches": [{"patch": yaml.safe_dump(patch, sort_keys=False)},
                        {"patch": yaml.safe_dump(config, sort_keys=False)}]}


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
