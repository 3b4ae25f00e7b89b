"""Names, addresses and paths of one real-cluster lab, derived from its run id.

Everything a running cluster is made of is named here once, so that `up`,
every component's configuration and `down` (also after a crash) agree:

* nodes: ``pcnt-<run>-n1`` (the control plane: etcd, kube-apiserver,
  kube-controller-manager, kube-scheduler and a kubelet with the
  control-plane taint), ``pcnt-<run>-n2`` ... (workers). Each node is a
  network namespace of that name on the lab's switch (pcn_lab.topology's
  underlay, 192.168.250.<i>/24) and a mount namespace held by a holder
  process (pcn_lab.cluster.holder);
* the data folder ``/var/lib/pcn-lab/<prefix>`` (on disk: every node's
  containerd keeps a copy of every image), with ``pki/``, ``kubeconfigs/``,
  ``etcd/``, ``logs/``, ``pids/`` and ``nodes/<node>/`` (the node's own
  /var/lib/kubelet, /var/lib/containerd, ... bind-mounted in its mount
  namespace);
* a cgroup ``/<node>`` in every cgroup v1 hierarchy: the node's kubelet
  ``cgroupRoot``;
* the marker ``PCN_LAB_CLUSTER=<prefix>`` in the environment of every
  process the lab starts, so `down` finds them without their pid files.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from pcn_lab.topology import PREFIX, UNDERLAY

DATA_ROOT = Path("/var/lib/pcn-lab")
MARKER = "PCN_LAB_CLUSTER"
CLUSTER_CIDR = "10.244.0.0/16"
NODE_CIDR_MASK = 24
SERVICE_CIDR = "10.96.0.0/12"
NODEPORT_RANGE = "30000-32767"
KUBERNETES_SERVICE_IP = "10.96.0.1"
DNS_SERVICE_IP = "10.96.0.10"
CLUSTER_DOMAIN = "cluster.local"
API_PORT = 6443
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380

# (mount point on the node, folder under nodes/<node>/): what every node has
# of its own. /var/lib/cni holds host-local's address leases; /run/netns is
# where containerd 2.x mounts its pods' network namespaces (pkg/netns,
# "/var/run/netns" unless netns_mounts_under_state_dir).
NODE_BINDS: tuple[tuple[str, str], ...] = (
    ("/var/lib/kubelet", "kubelet"),
    ("/var/lib/containerd", "containerd"),
    ("/run/containerd", "run-containerd"),
    ("/run/pcn", "run-pcn"),
    ("/etc/cni/net.d", "cni-conf"),
    ("/opt/cni/bin", "cni-bin"),
    ("/opt/pcn", "opt-pcn"),
    ("/var/lib/cni", "cni-state"),
    ("/var/log/pods", "log-pods"),
    ("/var/log/containers", "log-containers"),
    ("/run/netns", "netns"),
)
# the binds that must propagate mounts both ways: kubelet's volumes, and the
# pods' network namespaces, which the agent's container (its /run/netns
# mounted HostToContainer) opens for pcn-cni's launcher, as on a systemd host
# whose mounts are shared from / down
RSHARED = ("/var/lib/kubelet", "/run/netns")


@dataclass(frozen=True)
class Layout:
    """One cluster's names and paths. `workers` excludes the control plane."""

    run_id: str
    workers: int = 2
    data_root: Path = DATA_ROOT

    @property
    def prefix(self) -> str:
        return f"{PREFIX}-{self.run_id}"

    @property
    def data(self) -> Path:
        return self.data_root / self.prefix

    @property
    def pki(self) -> Path:
        return self.data / "pki"

    @property
    def kubeconfigs(self) -> Path:
        return self.data / "kubeconfigs"

    @property
    def logs(self) -> Path:
        return self.data / "logs"

    @property
    def pids(self) -> Path:
        return self.data / "pids"

    @property
    def etcd_data(self) -> Path:
        return self.data / "etcd"

    @property
    def nodes(self) -> list[str]:
        """Every node, the control plane first."""
        return [self.node_name(i) for i in range(1, self.workers + 2)]

    @property
    def control_plane(self) -> str:
        return self.node_name(1)

    def node_name(self, i: int) -> str:
        return f"{self.prefix}-n{i}"

    def node_index(self, node: str) -> int:
        return int(node.rsplit("-n", 1)[1])

    def node_ip(self, node: str) -> str:
        return str(UNDERLAY.network_address + self.node_index(node))

    @property
    def api_ip(self) -> str:
        return self.node_ip(self.control_plane)

    def node_dir(self, node: str) -> Path:
        return self.data / "nodes" / node

    def node_path(self, node: str, mountpoint: str) -> Path:
        """Where the node's `mountpoint` (one of NODE_BINDS) is seen from the root
        mount namespace."""
        for point, sub in NODE_BINDS:
            if point == mountpoint:
                return self.node_dir(node) / sub
        raise KeyError(f"{mountpoint} is not one of a node's own folders")

    def containerd_socket(self, node: str) -> Path:
        """The node's containerd socket as seen from the root namespace."""
        return self.node_path(node, "/run/containerd") / "containerd.sock"

    def cgroup_root(self, node: str) -> str:
        """The node's kubelet cgroupRoot (one per node: two kubelets sharing one
        kill each other's pods)."""
        return f"/{node}"

    def config_dir(self, node: str) -> Path:
        return self.node_dir(node) / "config"

    def api_url_inside(self) -> str:
        return f"https://{self.api_ip}:{API_PORT}"

    def service_cidr_first(self) -> str:
        return str(ipaddress.IPv4Network(SERVICE_CIDR).network_address + 1)
