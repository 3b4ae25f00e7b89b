"""Command lines of the control plane: etcd, kube-apiserver,
kube-controller-manager and kube-scheduler, all on the control-plane node
(pcn_lab.cluster.layout), all TLS.

Flags follow what kubeadm v1.37 writes into its static pod manifests, with
the choices of issue 10: RBAC on (`--authorization-mode=Node,RBAC`,
NodeRestriction admission), ServiceAccount token signing keys, node pod
CIDRs allocated by the controller manager (pcn's podCIDR, 10.244.0.0/16, /24
per node), Services in 10.96.0.0/12 (manifests/configmap.yaml's
serviceClusterIPRange), no kube-proxy, no cloud provider, no leader
election (one replica each).
"""

from __future__ import annotations

from pathlib import Path

from pcn_lab.cluster.layout import (
    API_PORT,
    CLUSTER_CIDR,
    CLUSTER_DOMAIN,
    ETCD_CLIENT_PORT,
    ETCD_PEER_PORT,
    NODE_CIDR_MASK,
    NODEPORT_RANGE,
    SERVICE_CIDR,
    Layout,
)


def etcd_argv(layout: Layout, bin_dir: Path) -> list[str]:
    """One etcd member on the control plane's loopback, client and peer TLS
    with client certificates required."""
    pki = layout.pki
    client = f"https://127.0.0.1:{ETCD_CLIENT_PORT}"
    peer = f"https://127.0.0.1:{ETCD_PEER_PORT}"
    return [str(bin_dir / "etcd"), "--name", "pcn-lab", "--data-dir", str(layout.etcd_data),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"pcn-lab={peer}", "--initial-cluster-state", "new",
            "--listen-metrics-urls", "http://127.0.0.1:2381",
            "--cert-file", str(pki / "etcd.crt"), "--key-file", str(pki / "etcd.key"),
            "--trusted-ca-file", str(pki / "ca.crt"), "--client-cert-auth",
            "--peer-cert-file", str(pki / "etcd.crt"), "--peer-key-file", str(pki / "etcd.key"),
            "--peer-trusted-ca-file", str(pki / "ca.crt"), "--peer-client-cert-auth",
            "--snapshot-count", "10000", "--log-level", "warn"]


def etcdctl_health_argv(layout: Layout, bin_dir: Path) -> list[str]:
    pki = layout.pki
    return [str(bin_dir / "etcdctl"), f"--endpoints=https://127.0.0.1:{ETCD_CLIENT_PORT}",
            f"--cacert={pki / 'ca.crt'}", f"--cert={pki / 'apiserver-etcd-client.crt'}",
            f"--key={pki / 'apiserver-etcd-client.key'}", "endpoint", "health"]


def apiserver_argv(layout: Layout, bin_dir: Path) -> list[str]:
    """kube-apiserver on every address of the control-plane node, port 6443,
    advertising its switch address (the endpoint of the `kubernetes`
    Service)."""
    pki = layout.pki
    return [str(bin_dir / "kube-apiserver"),
            f"--advertise-address={layout.api_ip}", "--bind-address=0.0.0.0",
            f"--secure-port={API_PORT}",
            f"--etcd-servers=https://127.0.0.1:{ETCD_CLIENT_PORT}",
            f"--etcd-cafile={pki / 'ca.crt'}",
            f"--etcd-certfile={pki / 'apiserver-etcd-client.crt'}",
            f"--etcd-keyfile={pki / 'apiserver-etcd-client.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            f"--kubelet-certificate-authority={pki / 'ca.crt'}",
            "--kubelet-preferred-address-types=InternalIP",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            "--allow-privileged=true",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--service-node-port-range={NODEPORT_RANGE}",
            f"--service-account-issuer=https://kubernetes.default.svc.{CLUSTER_DOMAIN}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--enable-bootstrap-token-auth=false",
            "--profiling=false"]


def controller_manager_argv(layout: Layout, bin_dir: Path) -> list[str]:
    pki = layout.pki
    conf = layout.kubeconfigs / "controller-manager.conf"
    return [str(bin_dir / "kube-controller-manager"),
            f"--kubeconfig={conf}", f"--authentication-kubeconfig={conf}",
            f"--authorization-kubeconfig={conf}", "--bind-address=127.0.0.1",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            "--use-service-account-credentials=true",
            "--allocate-node-cidrs=true", f"--cluster-cidr={CLUSTER_CIDR}",
            f"--node-cidr-mask-size={NODE_CIDR_MASK}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--configure-cloud-routes=false", "--leader-elect=false", "--profiling=false"]


def scheduler_argv(layout: Layout, bin_dir: Path) -> list[str]:
    conf = layout.kubeconfigs / "scheduler.conf"
    return [str(bin_dir / "kube-scheduler"), f"--kubeconfig={conf}",
            f"--authentication-kubeconfig={conf}", f"--authorization-kubeconfig={conf}",
            "--bind-address=127.0.0.1", "--leader-elect=false", "--profiling=false"]
