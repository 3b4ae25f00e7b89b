"""A node's kubelet: its KubeletConfiguration (kubelet.config.k8s.io/v1beta1)
and command line.

Choices (issue 10): cgroups v1 (this machine's hierarchy) need
``failCgroupV1: false`` since v1.35; the cgroupfs driver (no systemd in the
node) under a cgroup root of the node's own (`Layout.cgroup_root`, created
beforehand in every hierarchy); webhook authentication and authorization
(the API server's kubelet client is checked against RBAC) and a serving
certificate from the lab's CA; cluster DNS at the kube-dns Service
(10.96.0.10); eviction and image garbage collection thresholds low enough
that a busy shared disk never evicts the lab's pods or deletes its
imported images (nothing could pull them back); no host resolv.conf (the
lab is offline; CoreDNS answers cluster names only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pcn_lab.cluster.layout import CLUSTER_DOMAIN, DNS_SERVICE_IP, Layout

CONTROL_PLANE_TAINT = {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}


def config(layout: Layout, node: str) -> dict[str, Any]:
    pki = layout.pki
    cfg: dict[str, Any] = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": layout.node_ip(node),
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                           "x509": {"clientCAFile": str(pki / "ca.crt")}},
        "authorization": {"mode": "Webhook"},
        "tlsCertFile": str(pki / f"kubelet-serving-{node}.crt"),
        "tlsPrivateKeyFile": str(pki / f"kubelet-serving-{node}.key"),
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": layout.cgroup_root(node),
        "cgroupsPerQOS": True,
        "enforceNodeAllocatable": ["pods"],
        "failCgroupV1": False,
        "failSwapOn": False,
        "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
        "clusterDNS": [DNS_SERVICE_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": "",
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                         "nodefs.inodesFree": "1%", "imagefs.available": "1%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        "staticPodPath": "",
        "maxPods": 110,
    }
    if node == layout.control_plane:
        cfg["registerWithTaints"] = [CONTROL_PLANE_TAINT]
    return cfg


def argv(layout: Layout, node: str, bin_dir: Path, config_file: Path) -> list[str]:
    return [str(bin_dir / "kubelet"), f"--config={config_file}",
            f"--kubeconfig={layout.kubeconfigs / f'kubelet-{node}.conf'}",
            f"--hostname-override={node}", f"--node-ip={layout.node_ip(node)}", "--v=1"]
